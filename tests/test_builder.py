"""load_pretrained_model and the model's input contract: formats, options and clear errors on bad input."""

from __future__ import annotations

import json
import re
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from llava.checkpoint_maker import make_tiny_checkpoint
from llava.model.builder import load_pretrained_model
from llava.model.language_model.llava_qwen import LlavaQwenForCausalLM
from tests.conftest import random_video
from tests.test_conformance import prompt_ids


def load(path, **kwargs):
    options = dict(device_map="cpu", torch_dtype="float32", attn_implementation="sdpa")
    options.update(kwargs)
    return load_pretrained_model(str(path), None, "llava_qwen", **options)


def test_returns_llava_next_tuple(loaded_tiny, tiny_checkpoint):
    tokenizer, model, image_processor, max_length = loaded_tiny
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert max_length == config["max_position_embeddings"]
    assert type(model).__name__ == "LlavaQwenForCausalLM"
    assert model.config.model_type == "llava_qwen"
    # Tied embeddings: lm_head.weight is absent from the files and shares the embedding's storage.
    assert model.lm_head.weight.data_ptr() == model.get_model().embed_tokens.weight.data_ptr()
    assert image_processor.preprocess(torch.zeros(2, 30, 40, 3, dtype=torch.uint8).numpy())["pixel_values"].shape == (
        2, 3, model.get_vision_tower().image_size, model.get_vision_tower().image_size)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == config["eos_token_id"]


def test_registered_with_auto_classes():
    from transformers import AutoConfig, AutoModelForCausalLM

    from llava.model import LlavaQwenConfig, LlavaQwenForCausalLM

    assert AutoConfig.for_model("llava_qwen").__class__ is LlavaQwenConfig
    assert AutoModelForCausalLM._model_mapping[LlavaQwenConfig] is LlavaQwenForCausalLM


@pytest.mark.parametrize("dtype,expected", [("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_dtype_is_honoured(tiny_checkpoint, dtype, expected):
    _, model, _, _ = load(tiny_checkpoint, torch_dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {expected}


def test_overwrite_config_is_applied_before_building(tiny_checkpoint):
    _, model, _, _ = load(tiny_checkpoint, overwrite_config={"mm_spatial_pool_stride": 1, "mm_newline_position": "frame"})
    video = random_video(2, model.get_vision_tower().image_size)
    tokens, mask, _ = model.encode_visual_items([video], ["video"], None)[0]
    side = model.get_vision_tower().num_patches_per_side
    assert tokens.shape[0] == 2 * (side * side + 1)  # stride 1: no pooling; a newline after each frame
    assert int(mask.sum()) == 2 * side * side


def test_unsharded_and_untied_checkpoint_loads(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "untied", "tiny", tie_word_embeddings=False)
    assert (path / "model.safetensors").is_file()
    _, model, _, _ = load(path)
    assert not torch.equal(model.lm_head.weight, model.get_model().embed_tokens.weight)


def test_missing_weight_is_named(tmp_path, tiny_checkpoint):
    path = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    name = "model.mm_projector.2.weight"
    shard = path / index["weight_map"].pop(name)
    tensors = load_file(str(shard))
    tensors.pop(name)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"missing weights: \['model.mm_projector.2.weight'\]"):
        load(path)


def test_unexpected_weight_is_named(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "extra", "tiny")
    tensors = load_file(str(path / "model.safetensors"))
    tensors["model.surprise.weight"] = torch.zeros(3)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="unexpected weights: .*model.surprise.weight"):
        load(path)


def copy_of(checkpoint, tmp_path):
    path = tmp_path / "copy"
    shutil.copytree(checkpoint, path)
    return path


def shard_holding(path, name):
    index = json.loads((path / "model.safetensors.index.json").read_text())
    return path / index["weight_map"][name]


@pytest.mark.parametrize("name", [
    "config.json", "model.safetensors.index.json", "vision_tower/config.json", "vision_tower/preprocessor_config.json",
])
def test_invalid_json_names_the_file(tmp_path, tiny_checkpoint, name):
    path = copy_of(tiny_checkpoint, tmp_path)
    (path / name).write_text((path / name).read_text()[:-30])  # cut short, as by a failed copy
    with pytest.raises(ValueError, match=re.escape(str(path / name)) + r" is not valid JSON \(.*line \d+"):
        load(path)


def test_weight_of_the_wrong_shape_is_named_before_loading(tmp_path, tiny_checkpoint, monkeypatch):
    path = copy_of(tiny_checkpoint, tmp_path)
    name = "model.mm_projector.2.weight"
    shard = shard_holding(path, name)
    tensors = load_file(str(shard))
    rows, columns = tensors[name].shape
    tensors[name] = torch.zeros(rows, columns + 1)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    loaded = []
    monkeypatch.setattr(LlavaQwenForCausalLM, "from_pretrained", lambda *a, **k: loaded.append(1))
    expected = f"weights with the wrong shape: ['{name} ({shard.name}): stored [{rows}, {columns + 1}], the model expects [{rows}, {columns}]']"
    with pytest.raises(ValueError, match=re.escape(expected)):
        load(path)
    assert not loaded, "the shapes must be checked before any weight is loaded"


def test_truncated_shard_is_named(tmp_path, tiny_checkpoint):
    path = copy_of(tiny_checkpoint, tmp_path)
    shard = shard_holding(path, "model.norm.weight")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) * 2 // 3])  # an interrupted download
    with pytest.raises(ValueError, match=f"Weight file {re.escape(str(shard))} cannot be read .*truncated or corrupt"):
        load(path)


def test_missing_shard_is_named(tmp_path, tiny_checkpoint):
    path = copy_of(tiny_checkpoint, tmp_path)
    shard = shard_holding(path, "model.norm.weight")
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"lists shard\\(s\\) missing from .*: {shard.name}"):
        load(path)


def test_missing_or_broken_tokenizer_fails_before_the_weights(tmp_path, tiny_checkpoint, monkeypatch):
    loaded = []
    monkeypatch.setattr(LlavaQwenForCausalLM, "from_pretrained", lambda *a, **k: loaded.append(1))
    path = copy_of(tiny_checkpoint, tmp_path)
    tokenizer_file = path / "tokenizer.json"
    content = tokenizer_file.read_text()
    tokenizer_file.unlink()
    with pytest.raises(FileNotFoundError, match=f"{re.escape(str(path))} has no tokenizer files: .*tokenizer.json"):
        load(path)
    tokenizer_file.write_text(content[: len(content) // 2])
    with pytest.raises(ValueError, match=f"The tokenizer files in {re.escape(str(path))} cannot be loaded"):
        load(path)
    assert not loaded


@pytest.mark.parametrize("field,value,message", [
    ("model_type", "llama", "Unsupported model_type 'llama'"),
    ("architectures", ["LlavaLlamaForCausalLM"], "Unsupported architectures"),
])
def test_unknown_model_type_or_architecture(tmp_path, tiny_checkpoint, field, value, message):
    path = tmp_path / "other"
    shutil.copytree(tiny_checkpoint, path)
    config = json.loads((path / "config.json").read_text())
    config[field] = value
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        load(path)


def test_bad_paths_and_arguments(tmp_path, tiny_checkpoint):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        load(tmp_path / "nowhere" / "model")
    with pytest.raises(ValueError, match="torch_dtype='float8'"):
        load(tiny_checkpoint, torch_dtype="float8")
    with pytest.raises(ValueError, match="attn_implementation='magic'"):
        load(tiny_checkpoint, attn_implementation="magic")
    with pytest.raises(TypeError, match="unknown keyword argument.*colour"):
        load(tiny_checkpoint, colour="blue")
    with pytest.raises(ValueError, match="dycoke_p=1.0 is out of range"):
        load(tiny_checkpoint, dycoke=True, dycoke_p=1.0)


def test_unknown_vision_tower_is_named(tmp_path, tiny_checkpoint):
    path = tmp_path / "tower"
    shutil.copytree(tiny_checkpoint, path)
    config = json.loads((path / "config.json").read_text())
    config["mm_vision_tower"] = "someone/unknown-tower"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="Unknown vision tower 'someone/unknown-tower'"):
        load(path)


def test_placeholder_and_image_count_must_match(loaded_tiny):
    tokenizer, model, _, _ = loaded_tiny
    video = random_video(2, model.get_vision_tower().image_size)
    with_placeholder = prompt_ids(tokenizer, "Hi")
    without = prompt_ids(tokenizer, "Hi", with_image=False)
    with pytest.raises(ValueError, match=r"0 '<image>' placeholder\(s\).*1 image"):
        model.generate(without, images=[video], modalities=["video"], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"1 '<image>' placeholder\(s\).*0 image"):
        model.generate(with_placeholder, max_new_tokens=2)


def test_bad_video_tensors_are_named(loaded_tiny):
    tokenizer, model, _, _ = loaded_tiny
    size = model.get_vision_tower().image_size
    ids = prompt_ids(tokenizer, "Hi")
    with pytest.raises(ValueError, match=r"video 0 must be a tensor of shape \(frames, 3, 98, 98\); got \(4, 98, 98, 3\)"):
        model.generate(ids, images=[torch.zeros(4, size, size, 3)], modalities=["video"], max_new_tokens=2)
    with pytest.raises(ValueError, match="video 0 has zero frames"):
        model.generate(ids, images=[torch.zeros(0, 3, size, size)], modalities=["video"], max_new_tokens=2)
    with pytest.raises(ValueError, match="Unknown modality 'audio'"):
        model.generate(ids, images=[random_video(2, size)], modalities=["audio"], max_new_tokens=2)


PREPROCESS_FIX = re.escape('image_processor.preprocess(frames, return_tensors="pt")["pixel_values"]')


@pytest.mark.parametrize("raw", [
    torch.full((4, 3, 98, 98), 200, dtype=torch.uint8),  # resized but not rescaled/normalised
    torch.zeros((4, 120, 160, 3), dtype=torch.uint8),  # frames straight from the decoder
])
def test_integer_pixels_are_rejected_with_the_fix(loaded_tiny, raw):
    tokenizer, model, _, _ = loaded_tiny
    ids = prompt_ids(tokenizer, "Hi")
    with pytest.raises(ValueError, match=r"video 0 has dtype torch.uint8: raw 0-255 pixels.*" + PREPROCESS_FIX):
        model.generate(ids, images=[raw], modalities=["video"], max_new_tokens=2)


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_non_finite_pixels_name_the_item(loaded_tiny, bad_value):
    tokenizer, model, _, _ = loaded_tiny
    size = model.get_vision_tower().image_size
    ids = prompt_ids(tokenizer, "Compare with <image> please.")
    broken = random_video(3, size, seed=1)
    broken[2, 1, 5, 7] = bad_value
    with pytest.raises(ValueError, match=r"video 1 has NaN or infinite pixel values.*" + PREPROCESS_FIX):
        model.generate(ids, images=[random_video(2, size), broken], modalities=["video", "video"], max_new_tokens=2)
    image = random_video(1, size)
    image[0, 0, 0, 0] = bad_value
    with pytest.raises(ValueError, match=r"image 0 has NaN or infinite pixel values.*process_images"):
        model.generate(prompt_ids(tokenizer, "Hi"), images=[image], modalities=["image"], max_new_tokens=2)


def test_pixel_checks_read_the_device_once_per_call():
    from torch.utils._python_dispatch import TorchDispatchMode

    from llava.model.llava_arch import _check_pixels

    class CountHostReads(TorchDispatchMode):
        reads = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default):
                CountHostReads.reads += 1
            return func(*args, **(kwargs or {}))

    items = [random_video(2, 14, seed=i) for i in range(5)]
    with CountHostReads():
        _check_pixels(items, ["video"] * 5, 14)
    assert CountHostReads.reads == 1


def test_padded_batch_rows_equal_single_runs(loaded_tiny):
    tokenizer, model, _, _ = loaded_tiny
    size = model.get_vision_tower().image_size
    videos = [random_video(4, size, seed=5), random_video(6, size, seed=6)]
    prompts = [prompt_ids(tokenizer, "What moves?")[0], prompt_ids(tokenizer, "Describe the whole scene in detail.")[0]]
    singles = [
        model.generate(p[None], images=[v], modalities=["video"], max_new_tokens=6, do_sample=False, eos_token_id=None)
        for p, v in zip(prompts, videos)
    ]
    # Right-padded input, as a naive caller would build it: rows are re-padded internally.
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    batch = torch.full((2, width), pad)
    mask = torch.zeros((2, width), dtype=torch.long)
    for row, p in enumerate(prompts):
        batch[row, : len(p)] = p
        mask[row, : len(p)] = 1
    together = model.generate(batch, attention_mask=mask, images=videos, modalities=["video", "video"],
                              max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=pad)
    assert torch.equal(together[0], singles[0][0])
    assert torch.equal(together[1], singles[1][0])


def test_two_videos_in_one_prompt(loaded_tiny):
    tokenizer, model, _, _ = loaded_tiny
    size = model.get_vision_tower().image_size
    ids = prompt_ids(tokenizer, "Compare with <image> please.")
    assert int((ids == -200).sum()) == 2
    first, second = random_video(2, size, seed=7), random_video(3, size, seed=8)
    mm = model.build_multimodal_inputs(ids, None, None, [first, second], ["video"], None)
    per_frame = model.get_2dPool(model.encode_images(first)).shape[1]
    assert mm.visual_token_count == (2 + 3) * per_frame + 2  # one newline per video (one_token)
    assert int(mm.video_token_mask.sum()) == (2 + 3) * per_frame


def test_hub_id_without_network_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="Could not get nobody-here/no-such-llava from the hub or its local cache"):
        load("nobody-here/no-such-llava")


@pytest.mark.parametrize("option", ["load_4bit", "load_8bit"])
def test_quantized_loading_names_its_missing_dependency(tiny_checkpoint, monkeypatch, option):
    # A None entry in sys.modules makes `import bitsandbytes` fail, whether or not it is installed here.
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match=r"load_8bit / load_4bit need the bitsandbytes package \(pip install bitsandbytes\)"):
        load(tiny_checkpoint, **{option: True})
