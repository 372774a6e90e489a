"""tokenizer_image_token, KeywordsStoppingCriteria, anyres tiling and process_images.

The tokenizers are built offline: a byte-level BPE with no merges (one token per byte, like a
Qwen2 tokenizer stripped of its merges) plus ChatML special tokens, optionally with a BOS
post-processor.
"""

import base64
import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, StoppingCriteriaList

from llava.constants import IMAGE_TOKEN_INDEX
from llava.conversation import conv_templates
from llava.mm_utils import (
    KeywordsStoppingCriteria,
    divide_to_patches,
    expand2square,
    get_anyres_image_grid_shape,
    get_model_name_from_path,
    load_image_from_base64,
    parse_grid_pinpoints,
    process_anyres_image,
    process_images,
    resize_and_pad_image,
    select_best_resolution,
    tokenizer_image_token,
)
from llava.model.image_processor import SigLipImageProcessor

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _byte_level_tokenizer(bos: str | None = None) -> PreTrainedTokenizerFast:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS + ([bos] if bos else []))
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )


@pytest.fixture(scope="module")
def qwen_like():
    return _byte_level_tokenizer()


@pytest.fixture(scope="module")
def with_bos():
    return _byte_level_tokenizer(bos="<s>")


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False).input_ids


# --------------------------------------------------------------------------- tokenizer_image_token


def test_image_token_inserted_between_chunks(qwen_like):
    conv = conv_templates["qwen_1_5"].copy()
    conv.append_message(conv.roles[0], "<image>\nWhat?")
    conv.append_message(conv.roles[1], None)
    prompt = conv.get_prompt()
    before, after = prompt.split("<image>")

    ids = tokenizer_image_token(prompt, qwen_like, IMAGE_TOKEN_INDEX, return_tensors="pt")
    assert ids.dtype == torch.long and ids.dim() == 1
    assert ids.tolist() == _ids(qwen_like, before) + [IMAGE_TOKEN_INDEX] + _ids(qwen_like, after)
    assert ids.tolist().count(IMAGE_TOKEN_INDEX) == 1
    assert qwen_like.decode([i for i in ids.tolist() if i >= 0]) == before + after


def test_several_images_and_list_output(qwen_like):
    ids = tokenizer_image_token("<image> <image>\nab<image>", qwen_like)
    assert isinstance(ids, list)
    image = [IMAGE_TOKEN_INDEX]
    assert ids == image + _ids(qwen_like, " ") + image + _ids(qwen_like, "\nab") + image


def test_bos_kept_once_at_the_start(with_bos):
    bos = with_bos.bos_token_id
    ids = tokenizer_image_token("Hi <image>\nQ<image>", with_bos)
    assert ids == [bos] + _ids(with_bos, "Hi ") + [IMAGE_TOKEN_INDEX] + _ids(with_bos, "\nQ") + [IMAGE_TOKEN_INDEX]
    ids = tokenizer_image_token("<image>\nQ", with_bos)
    assert ids == [bos, IMAGE_TOKEN_INDEX] + _ids(with_bos, "\nQ")


def test_custom_index_and_bad_tensor_type(qwen_like):
    assert tokenizer_image_token("a<image>", qwen_like, image_token_index=-7) == _ids(qwen_like, "a") + [-7]
    with pytest.raises(ValueError, match="Unsupported tensor type"):
        tokenizer_image_token("a", qwen_like, return_tensors="tf")


def test_get_model_name_from_path():
    assert get_model_name_from_path("lmms-lab/llava-onevision-qwen2-7b-ov") == "llava-onevision-qwen2-7b-ov"
    assert get_model_name_from_path("/ckpt/run1/checkpoint-500/") == "run1_checkpoint-500"
    assert get_model_name_from_path("local-model") == "local-model"


# --------------------------------------------------------------------------- stopping


def test_stops_per_row_with_prompt_in_the_sequence(qwen_like):
    end = qwen_like.convert_tokens_to_ids("<|im_end|>")
    prompt = torch.tensor([_ids(qwen_like, "user: hi")] * 2)
    crit = KeywordsStoppingCriteria(["<|im_end|>"], qwen_like, prompt)
    step1 = torch.cat([prompt, torch.tensor([[end], [_ids(qwen_like, "o")[0]]])], dim=1)
    done = crit(step1, None)
    assert done.dtype == torch.bool and done.tolist() == [True, False]
    step2 = torch.cat([step1, torch.tensor([[0], [end]])], dim=1)
    assert crit(step2, None).tolist() == [False, True]


def test_prompt_ending_with_keyword_does_not_stop(qwen_like):
    end = qwen_like.convert_tokens_to_ids("<|im_end|>")
    prompt = torch.tensor([_ids(qwen_like, "abc") + [end]])
    crit = KeywordsStoppingCriteria(["<|im_end|>"], qwen_like, prompt)
    step = torch.cat([prompt, torch.tensor([_ids(qwen_like, "x")])], dim=1)
    assert crit(step, None).tolist() == [False]


def test_new_tokens_only_mode_inputs_embeds(qwen_like):
    # generate(inputs_embeds=...) returns only new tokens: the sequence starts at length 1.
    prompt = torch.zeros(1, 50, dtype=torch.long)
    crit = KeywordsStoppingCriteria(["###"], qwen_like, prompt)
    text = "The end ###"
    ids = _ids(qwen_like, text)
    decisions = [crit(torch.tensor([ids[: n + 1]]), None).item() for n in range(len(ids))]
    assert decisions == [False] * (len(ids) - 1) + [True]


def test_textual_keyword_split_over_tokens(qwen_like):
    # "STOP" is 4 byte tokens; the text window covers the whole keyword.
    prompt = torch.tensor([_ids(qwen_like, "q")])
    crit = KeywordsStoppingCriteria(["STOP"], qwen_like, prompt)
    seq = torch.tensor([_ids(qwen_like, "q") + _ids(qwen_like, "ab STOP")])
    assert crit(seq, None).tolist() == [True]


def test_works_inside_stopping_criteria_list(qwen_like):
    end = qwen_like.convert_tokens_to_ids("<|im_end|>")
    prompt = torch.tensor([[1, 2], [3, 4]])
    crits = StoppingCriteriaList([KeywordsStoppingCriteria(["<|im_end|>"], qwen_like, prompt)])
    out = crits(torch.tensor([[1, 2, 5, end], [3, 4, 5, 6]]), None)
    assert out.tolist() == [True, False]


# --------------------------------------------------------------------------- anyres

PINPOINTS_OV = "(1x1),...,(6x6)"


def test_select_best_resolution_non_square():
    # 800x400 fits 768x384 exactly (full effective resolution 768*384, no waste) and every
    # larger candidate keeps at most the original 800*400 pixels while wasting more.
    candidates = [(384, 384), (768, 384), (384, 768), (768, 768), (1152, 384)]
    assert select_best_resolution((800, 400), candidates) == (768, 384)
    # Up-scaling: 300x150 keeps all its pixels in every candidate; least waste wins.
    assert select_best_resolution((300, 150), candidates) == (384, 384)


def test_parse_grid_pinpoints_range_form():
    resolutions = parse_grid_pinpoints(PINPOINTS_OV, 384)
    assert len(resolutions) == 36
    assert resolutions[0] == (384, 384) and resolutions[-1] == (2304, 2304)
    assert (384, 768) in resolutions and (768, 384) in resolutions
    assert parse_grid_pinpoints("[[384, 768], [768, 384]]", 384) == [(384, 768), (768, 384)]


def test_grid_shape_for_wide_image():
    # 1000x500 keeps all its 500000 pixels only in grids of at least 1152 (3 columns) by
    # 768 (2 rows); the smallest such grid wastes least.
    assert get_anyres_image_grid_shape((1000, 500), PINPOINTS_OV, 384) == (3, 2)
    # Both candidates downscale it to 768x384 (same effective resolution): the tie goes to the
    # one wasting fewer pixels, 1152x384 (147456 wasted) over 768x768 (294912 wasted).
    assert get_anyres_image_grid_shape((1000, 500), [[1152, 384], [768, 768]], 384) == (3, 1)


def test_resize_and_pad_and_patches():
    image = Image.new("RGB", (200, 100), (255, 0, 0))
    padded = resize_and_pad_image(image, (768, 768))
    assert padded.size == (768, 768)
    pixels = np.asarray(padded)
    assert (pixels[0, 0] == 0).all() and (pixels[384, 384] == (255, 0, 0)).all()  # black bars, red centre
    patches = divide_to_patches(padded, 384)
    assert len(patches) == 4 and all(p.size == (384, 384) for p in patches)


def test_expand2square():
    image = Image.new("RGB", (40, 20), (10, 20, 30))
    square = expand2square(image, (127, 127, 127))
    assert square.size == (40, 40)
    pixels = np.asarray(square)
    assert tuple(pixels[0, 0]) == (127, 127, 127) and tuple(pixels[20, 20]) == (10, 20, 30)


def _random_image(rng, width, height):
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_process_anyres_image_counts_and_base_image():
    processor = SigLipImageProcessor()
    image = _random_image(np.random.default_rng(0), 600, 300)
    columns, rows = get_anyres_image_grid_shape(image.size, PINPOINTS_OV, 384)
    assert (columns, rows) == (2, 1)
    pixels = process_anyres_image(image, processor, PINPOINTS_OV)
    assert pixels.shape == (1 + columns * rows, 3, 384, 384)
    base = processor.preprocess(image.resize((384, 384)))["pixel_values"][0]
    assert torch.equal(pixels[0], base)
    padded = resize_and_pad_image(image, (768, 384))
    right = processor.preprocess(padded.crop((384, 0, 768, 384)))["pixel_values"][0]
    assert torch.equal(pixels[2], right)


def test_process_images_modes():
    processor = SigLipImageProcessor()
    rng = np.random.default_rng(1)
    images = [_random_image(rng, 600, 300), _random_image(rng, 300, 900)]

    anyres_cfg = SimpleNamespace(image_aspect_ratio="anyres_max_9", image_grid_pinpoints=PINPOINTS_OV)
    tiles = process_images(images, processor, anyres_cfg)
    assert isinstance(tiles, list) and [t.shape[0] for t in tiles] == [3, 4]  # 2x1 grid, 1x3 grid

    padded = process_images(images, processor, SimpleNamespace(image_aspect_ratio="pad"))
    assert padded.shape == (2, 3, 384, 384)
    expected = processor.preprocess(expand2square(images[0], (127, 127, 127)))["pixel_values"][0]
    assert torch.equal(padded[0], expected)

    plain = process_images(images, processor, SimpleNamespace())
    assert torch.equal(plain, processor.preprocess(images)["pixel_values"])

    with pytest.raises(ValueError, match="no images"):
        process_images([], processor, SimpleNamespace(image_aspect_ratio="pad"))


def test_load_image_from_base64():
    buffer = io.BytesIO()
    Image.new("RGB", (3, 2), (1, 2, 3)).save(buffer, format="PNG")
    image = load_image_from_base64(base64.b64encode(buffer.getvalue()).decode())
    assert image.size == (3, 2) and image.getpixel((0, 0)) == (1, 2, 3)


# --------------------------------------------------------------------------- with generate()


class _ScriptedTokens:
    """LogitsProcessor forcing row b to emit script[b][step] (then padding id 0)."""

    def __init__(self, script, prompt_len):
        self.script, self.prompt_len = script, prompt_len

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_len
        forced = torch.full_like(scores, float("-inf"))
        for row, tokens in enumerate(self.script):
            forced[row, tokens[step] if step < len(tokens) else 0] = 0.0
        return forced


@pytest.mark.parametrize("from_embeds", [False, True])
def test_generate_stops_each_row_on_its_keyword(qwen_like, from_embeds):
    from transformers import LogitsProcessorList, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(qwen_like), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
    )
    model = Qwen2ForCausalLM(config).eval()
    prompt = torch.tensor([_ids(qwen_like, "Q: hi"), _ids(qwen_like, "Q: yo")])
    script = [_ids(qwen_like, "ok ### more text"), _ids(qwen_like, "no stop words here")]
    criterion = KeywordsStoppingCriteria(["###"], qwen_like, prompt)
    inputs = {"inputs_embeds": model.get_input_embeddings()(prompt)} if from_embeds else {"input_ids": prompt}
    with torch.no_grad():
        out = model.generate(
            **inputs, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
            pad_token_id=qwen_like.pad_token_id, eos_token_id=qwen_like.eos_token_id,  # never emitted;
            # with an EOS id set, transformers pads rows that a stopping criterion finished
            logits_processor=LogitsProcessorList([_ScriptedTokens(script, 0 if from_embeds else prompt.shape[1])]),
            stopping_criteria=StoppingCriteriaList([criterion]),
        )
    new = out if from_embeds else out[:, prompt.shape[1] :]
    stop_at = len(_ids(qwen_like, "ok ###"))
    assert new.shape[1] == 12  # row 1 never stops, so generation runs to max_new_tokens
    assert new[0, :stop_at].tolist() == script[0][:stop_at]
    assert (new[0, stop_at:] == qwen_like.pad_token_id).all()  # row 0 finished right after "###"
    assert new[1].tolist() == script[1][:12]
