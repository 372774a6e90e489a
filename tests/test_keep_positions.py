"""``keep_positions=True``: the video tokens a pre-LLM method keeps stay at their uncompressed positions.

The oracle (the masked reference): the uncompressed model on the full sequence, the dropped video tokens hidden from
every query by a 4-D attention mask, explicit original position ids, decoded step by step on its own cache. Which
tokens are dropped is read from the method's selection on the baseline's pooled features and the baseline's own
layout (the video columns in source order), never from the layout code under test. With the positions kept, the
compressed model's prefill logits (every kept token's, in order) and its decoding must equal that reference for each
pre-LLM method (every registered one, found through its stages), each newline layout (one_token, grid, frame), with
DyCoke's KV pruning on top (tests/references.py MaskedDyCoke on the reference), with the dynamic and static cache and
compiled decoding, for a left-padded batch (each row equal to the row alone) and with an image in the same prompt.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import DynamicCache

from llava.compression.registry import METHODS, method_names
from llava.compression.settings import (
    CompressionSettings,
    parse_setting,
    setting_names,
    settings_from_kwargs,
)
from llava.constants import IMAGE_TOKEN_INDEX
from llava.conversation import conv_templates
from llava.mm_utils import tokenizer_image_token
from llava.transformers_compat import CACHE_ARG
from tests import native_models as nm
from tests.conftest import random_video
from tests.references import (
    HostReads,
    MaskedDyCoke,
    cache_variants,
    greedy,
    load,
    prompt,
)

STEPS = 6
VARIANTS = cache_variants()
LAYOUTS = ("one_token", "grid", "frame")
SEEDS = (9, 10, 11, 12, 13, 14)


# The in-LLM stage of a method that also works inside the LM, turned off: its video stage alone is what
# keep_positions changes (the masked reference here does not model the in-LLM stages; their own tests do).
VIDEO_STAGE_ONLY = {"flashvid": {"flashvid_llm_retention_ratio": 1.0}, "prunevid": {"prunevid_alpha": 1.0, "prunevid_tau": 0.0},  # tau 0: random frames merge too
                    "holitom": {"holitom_llm_r": 0.0}}


def pre_llm_settings() -> dict[str, dict]:
    """Every registered method that compresses before the LM, at its first example, without decode-time pruning
    (DyCoke: merging alone; its KV pruning on top is tested below; the others' in-LLM stages off)."""
    cases = {}
    for name in method_names():
        for example in METHODS[name].examples[:1]:
            settings = {"compressor": name, **example, **VIDEO_STAGE_ONLY.get(name, {})}
            if name == "dycoke":
                settings["dycoke_p"] = 0.0
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                built = METHODS[name].build(settings_from_kwargs(settings))
            assert built.video is None or built.decoder is None, f"{name}: turn its in-LLM stage off above"
            if built.video is not None:
                cases[name] = {key: value for key, value in settings.items()
                               if not (key in ("dycoke_l", "dycoke_p") and name != "dycoke")}
    return cases


PRE_LLM = pre_llm_settings()
KV_ON_TOP = {  # DyCoke's KV pruning after a pre-LLM method: DyCoke itself, and composed with EVS
    "dycoke": {"compressor": "dycoke", "dycoke_k": 0.5, "dycoke_l": 2, "dycoke_p": 0.7},
    "evs+kv": {"compressor": "evs", "evs_rate": 0.5, "dycoke_l": 2, "dycoke_p": 0.7},
}


def test_every_registered_pre_llm_method_is_covered():
    assert {"dycoke", "vidcom2", "evs", "visionzip", "fastvid", "flashvid", "prunevid", "holitom"} <= set(PRE_LLM)
    assert not {"none", "fastv"} & set(PRE_LLM)


# ---- models ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tiny_checkpoint, tiny_video_checkpoint):
    """layout -> (tokenizer, compressed sdpa model, uncompressed eager reference); 'frame' is the one_token
    checkpoint with mm_newline_position='frame'."""
    made = {}

    def get(layout: str):
        if layout not in made:
            checkpoint = tiny_video_checkpoint if layout == "grid" else tiny_checkpoint
            tokenizer, model = load(checkpoint)
            _, reference = load(checkpoint, "eager")
            for m in (model, reference):
                m.config.mm_newline_position = layout
            made[layout] = (tokenizer, model, reference)
        tokenizer, model, reference = made[layout]
        model.reset_compression()
        return tokenizer, model, reference

    return get


def configure(model, settings: dict, keep_positions: bool = True):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.configure_compression(**settings, keep_positions=keep_positions)


def two_item_prompt(tokenizer, question: str = "What is in the video and the image?") -> torch.Tensor:
    """A prompt with a video, some text, then an image."""
    conv = conv_templates["qwen_1_5"].copy()
    conv.append_message(conv.roles[0], f"<image>\nThe image: <image>\n{question}")
    conv.append_message(conv.roles[1], None)
    return tokenizer_image_token(conv.get_prompt(), tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")[None]


# ---- the masked reference -----------------------------------------------------------------------------------------


class Reference:
    """The uncompressed model on the full prompt (one row), with the video tokens ``model``'s pre-LLM method drops
    hidden by the mask at every query, original positions; greedy decoding on its own cache."""

    def __init__(self, reference, model, ids, images, modalities):
        self.model = reference
        mm = reference.build_multimodal_inputs(ids, None, None, images, modalities, None, padding_side="left")
        assert reference.video_compressor() is None and not mm.attention_mask.logical_not().any()
        self.embeds = mm.inputs_embeds.clone()
        video_columns = mm.video_token_mask[0].nonzero().flatten()  # the baseline layout: source order per video
        # The method's own choice on these videos (what it keeps is each method's own test's business; here, where
        # its tokens go): as the compressed model recorded it, with whatever inputs the method reads.
        selections = [video.selection for video in
                      model.build_multimodal_inputs(ids, None, None, images, modalities, None, padding_side="left").videos]
        hidden = torch.zeros(self.embeds.shape[1], dtype=torch.bool)
        start = 0
        self.kept_video = []
        for record, selection in zip(mm.videos, selections):
            columns = video_columns[start : start + record.tokens_before]
            start += record.tokens_before
            kept = columns[selection.index]
            if selection.values is not None:  # a merging method: its merged values at the kept tokens
                self.embeds[0, kept] = selection.values.to(self.embeds.dtype)
            hidden[columns] = True
            hidden[kept] = False
            self.kept_video.append(kept.sort().values)
        assert start == len(video_columns)
        self.hidden = hidden
        self.visible = (~hidden).nonzero().flatten()  # the columns the compressed prompt keeps, in order
        self.video_positions = torch.cat(self.kept_video)

    def mask(self, queries: int, keys: int) -> torch.Tensor:
        """(1, 1, queries, keys) additive mask: causal, hidden columns invisible (each query still sees itself)."""
        hidden = torch.cat([self.hidden, torch.zeros(keys - len(self.hidden), dtype=torch.bool)])
        rows = torch.arange(keys - queries, keys)[:, None]
        allowed = (torch.arange(keys)[None] <= rows) & ~hidden[None]
        allowed |= torch.arange(keys)[None] == rows
        dtype = self.embeds.dtype
        return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[None, None]

    @torch.no_grad()
    def run(self, steps: int):
        """(prefill logits (S, V), greedy tokens (steps,), per-step logits (steps, V)) of the reference."""
        length = self.embeds.shape[1]
        cache = DynamicCache(config=self.model.config)
        out = self.model(inputs_embeds=self.embeds, attention_mask=self.mask(length, length),
                         position_ids=torch.arange(length)[None], use_cache=True, **{CACHE_ARG: cache})
        prefill = out.logits[0]
        logits, tokens = [prefill[-1]], [int(prefill[-1].argmax())]
        embed = self.model.get_model().embed_tokens
        for step in range(1, steps):
            keys = length + step
            out = self.model(inputs_embeds=embed(torch.tensor([[tokens[-1]]])), attention_mask=self.mask(1, keys),
                             position_ids=torch.tensor([[keys - 1]]), use_cache=True, **{CACHE_ARG: cache})
            logits.append(out.logits[0, -1])
            tokens.append(int(out.logits[0, -1].argmax()))
        return prefill, torch.tensor(tokens), torch.stack(logits)


@torch.no_grad()
def compressed_prefill(model, ids, images, modalities):
    """The compressed model's forward over the prompt: logits of every prompt token (its own order)."""
    return model(ids, images=images, modalities=modalities).logits[0]


def video_inputs(model, seed: int = 9, frames: int = 8):
    return [random_video(frames, model.get_vision_tower().image_size, seed=seed)], ["video"]


# ---- prefill and decoding equal the masked reference ---------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("method", PRE_LLM)
def test_prefill_and_positions_equal_the_masked_reference(models, method, layout):
    tokenizer, model, reference = models(layout)
    configure(model, PRE_LLM[method])
    ids = prompt(tokenizer)
    images, modalities = video_inputs(model)
    ref = Reference(reference, model, ids, images, modalities)
    assert 0 < ref.hidden.sum() < ref.embeds.shape[1]  # something dropped, something kept
    mm = model.build_multimodal_inputs(ids, None, None, images, modalities, None, padding_side="left")
    # Every kept token (video, newline, text) sits at its column of the uncompressed prompt, in order.
    assert torch.equal(mm.position_ids[0], ref.visible)
    assert torch.equal(mm.position_ids[0][mm.video_token_mask[0]], ref.video_positions)
    torch.testing.assert_close(mm.inputs_embeds[0], ref.embeds[0, ref.visible], rtol=0, atol=0)
    logits = compressed_prefill(model, ids, images, modalities)
    expected = ref.run(1)[0][ref.visible]
    torch.testing.assert_close(logits, expected, rtol=2e-5, atol=2e-5)
    # Without the option the kept tokens are renumbered: the prefill differs (the option matters here).
    configure(model, PRE_LLM[method], keep_positions=False)
    renumbered = model.build_multimodal_inputs(ids, None, None, images, modalities, None, padding_side="left")
    assert torch.equal(renumbered.position_ids[0], torch.arange(renumbered.inputs_embeds.shape[1]))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("method", PRE_LLM)
def test_decoding_equals_the_masked_reference_step_by_step(models, method, layout, variant):
    tokenizer, model, reference = models(layout)
    configure(model, PRE_LLM[method])
    ids = prompt(tokenizer)
    images, modalities = video_inputs(model)
    _, ref_tokens, ref_logits = Reference(reference, model, ids, images, modalities).run(STEPS)
    tokens, logits = greedy(model, tokenizer, ids, images, STEPS, **VARIANTS[variant])
    assert torch.equal(tokens[0], ref_tokens)
    torch.testing.assert_close(logits[0], ref_logits, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("variant", ["dynamic", "static", "static-compiled"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", KV_ON_TOP)
def test_kv_pruning_on_top_equals_the_masked_dycoke_rule(models, case, layout, variant):
    """DyCoke's decision at layer L-1 ranks the kept video tokens over the cache of kept tokens: on the reference,
    over the full cache with the dropped ones hidden (MaskedDyCoke over the kept video columns)."""
    tokenizer, model, reference = models(layout)
    settings = KV_ON_TOP[case]
    configure(model, settings)
    ids = prompt(tokenizer)
    for seed in SEEDS:  # the first video whose active sets have clear margins (a near-tie is decided by rounding)
        images, modalities = video_inputs(model, seed=seed)
        ref = Reference(reference, model, ids, images, modalities)
        rule = MaskedDyCoke(reference, ref.video_positions, settings["dycoke_l"], settings["dycoke_p"])
        try:
            _, ref_tokens, ref_logits = ref.run(10)
        finally:
            rule.remove()
        if min(rule.margins) > 1e-5:
            break
    assert min(rule.margins) > 1e-5, "no video of SEEDS without a near-tie"
    tokens, logits = greedy(model, tokenizer, ids, images, 10, **VARIANTS[variant])
    assert torch.equal(tokens[0], ref_tokens)
    torch.testing.assert_close(logits[0], ref_logits, rtol=1e-4, atol=1e-4)  # sdpa against eager, sharp attention
    kv = model.last_compression_stats["kv_pruning"]
    assert kv["image_tokens"] == [len(ref.video_positions)]
    assert kv["recompute_steps"][0] == [step for step, hit in enumerate(rule.recomputed) if hit]
    assert sum(rule.recomputed) > 1


# ---- batches, images, no-ops ----------------------------------------------------------------------------------------


def padded(tokenizer, questions):
    prompts = [prompt(tokenizer, q)[0] for q in questions]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), tokenizer.pad_token_id)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):], mask[row, width - len(p):] = p, 1
    return prompts, ids, mask


@pytest.mark.parametrize("method", ["dycoke", "evs+kv"])
@pytest.mark.parametrize("layout", ["one_token", "grid"])
def test_a_left_padded_batch_equals_its_rows_alone(models, method, layout):
    tokenizer, model, _ = models(layout)
    configure(model, KV_ON_TOP[method])
    size = model.get_vision_tower().image_size
    prompts, ids, mask = padded(tokenizer, ["What is moving?", "Describe every frame of the video in order."])
    videos = [random_video(8, size, seed=40), random_video(5, size, seed=41)]
    batch_mm = model.build_multimodal_inputs(ids, mask, None, videos, ["video"] * 2, None, padding_side="left")
    singles = []
    for row, (p, video) in enumerate(zip(prompts, videos)):
        alone = model.build_multimodal_inputs(p[None], None, None, [video], ["video"], None, padding_side="left")
        width = alone.position_ids.shape[1]
        assert torch.equal(batch_mm.position_ids[row, -width:], alone.position_ids[0])  # each row's own positions
        assert alone.position_ids[0, -1] > width - 1  # the positions run past the compressed length
        singles.append(greedy(model, tokenizer, p[None], [video], STEPS))
    for cache in ("dynamic", "static"):
        tokens, logits = greedy(model, tokenizer, ids, videos, STEPS, attention_mask=mask, cache_implementation=cache)
        for row, (row_tokens, row_logits) in enumerate(singles):
            assert torch.equal(tokens[row], row_tokens[0]), (cache, row)
            torch.testing.assert_close(logits[row], row_logits[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["dycoke", "evs"])
def test_an_image_after_the_video_keeps_its_positions_and_equals_the_masked_reference(models, method):
    tokenizer, model, reference = models("one_token")
    configure(model, PRE_LLM[method])
    size = model.get_vision_tower().image_size
    ids = two_item_prompt(tokenizer)
    images, modalities = [random_video(8, size, seed=9), random_video(1, size, seed=5)], ["video", "image"]
    ref = Reference(reference, model, ids, images, modalities)
    mm = model.build_multimodal_inputs(ids, None, None, images, modalities, None, padding_side="left")
    baseline = reference.build_multimodal_inputs(ids, None, None, images, modalities, None, padding_side="left")
    assert torch.equal(mm.position_ids[0], ref.visible)
    # The image's tokens (after the video) are where they are without compression, with the same embeddings.
    video_length = int(baseline.video_token_mask.sum()) + 1  # the video's tokens and its one newline
    image_start = int((ids[0] == IMAGE_TOKEN_INDEX).nonzero()[1]) + video_length - 1
    image_length = baseline.inputs_embeds.shape[1] - (ids.shape[1] - 2) - video_length
    image_columns = torch.arange(image_start, image_start + image_length)
    at = torch.searchsorted(mm.position_ids[0], image_columns)
    assert torch.equal(mm.position_ids[0, at], image_columns)
    torch.testing.assert_close(mm.inputs_embeds[0, at], baseline.inputs_embeds[0, image_columns], rtol=0, atol=0)
    prefill, ref_tokens, ref_logits = ref.run(STEPS)
    torch.testing.assert_close(compressed_prefill(model, ids, images, modalities), prefill[ref.visible],
                               rtol=2e-5, atol=2e-5)
    output = model.generate(ids, images=images, modalities=modalities, do_sample=False, max_new_tokens=STEPS,
                            min_new_tokens=STEPS, pad_token_id=tokenizer.pad_token_id, output_logits=True,
                            return_dict_in_generate=True)
    assert torch.equal(output.sequences[0], ref_tokens)
    torch.testing.assert_close(torch.stack(output.logits, 1)[0], ref_logits, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("variant", ["dynamic", "static"])
def test_without_a_pre_llm_method_the_option_changes_nothing(models, variant):
    """dycoke_k=0 (merging off) is the baseline token for token, with or without KV pruning; FastV and the baseline
    have no pre-LLM stage, so the option leaves them exactly as they are."""
    tokenizer, model, _ = models("one_token")
    ids = prompt(tokenizer)
    images, _ = video_inputs(model)
    runs = {}
    for name, settings in {
        "none": {"compressor": "none"},
        "k0": {"compressor": "dycoke", "dycoke_k": 0.0, "dycoke_p": 0.0},
        "k0-kv": {"compressor": "dycoke", "dycoke_k": 0.0, "dycoke_l": 2, "dycoke_p": 0.7},
        "fastv": {"compressor": "fastv", "fastv_k": 2, "fastv_r": 0.5},
    }.items():
        for keep in (False, True):
            configure(model, settings, keep_positions=keep)
            assert model.keep_positions is keep and not model.keep_video_positions()
            runs[name, keep] = greedy(model, tokenizer, ids, images, STEPS, **VARIANTS[variant])
    for name in ("none", "k0", "k0-kv", "fastv"):
        for got, expected in zip(runs[name, True], runs[name, False]):
            assert torch.equal(got, expected), name
    for got, expected in zip(runs["k0", True], runs["none", False]):
        assert torch.equal(got, expected)


# ---- fast decoding: no host reads, no recompilation ---------------------------------------------------------------


@pytest.mark.parametrize("variant", ["dynamic", "static"])
def test_a_decoding_step_reads_the_host_as_often_as_with_renumbered_positions(models, variant):
    tokenizer, model, _ = models("one_token")
    ids = prompt(tokenizer)
    images, _ = video_inputs(model)
    counts = {}
    for keep in (False, True):
        configure(model, KV_ON_TOP["dycoke"], keep_positions=keep)
        with HostReads(model, decoding_only=True) as reads:
            greedy(model, tokenizer, ids, images, STEPS, **VARIANTS[variant])
        counts[keep] = reads.count
        assert reads.forwards == STEPS - 1
    assert counts[True] == counts[False]


def test_compiled_decoding_does_not_recompile_for_another_video(models):
    """Two prompts of the same shapes whose kept tokens sit at different positions share one compiled graph."""
    tokenizer, model, _ = models("one_token")
    configure(model, KV_ON_TOP["dycoke"])
    ids = prompt(tokenizer)
    size = model.get_vision_tower().image_size
    torch._dynamo.reset()
    positions = []
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in (9, 10):
            video = random_video(8, size, seed=seed)
            positions.append(model.build_multimodal_inputs(ids, None, None, [video], ["video"], None, "left").position_ids)
            greedy(model, tokenizer, ids, [video], STEPS, **VARIANTS["static-compiled"])
    assert not torch.equal(positions[0], positions[1])


# ---- every door --------------------------------------------------------------------------------------------------


def test_the_option_is_a_validated_flag_behind_every_door(tiny_checkpoint):
    from llava import cli
    from llava.eval.model_args import split_model_args

    assert "keep_positions" in setting_names() and CompressionSettings().keep_positions is False
    assert settings_from_kwargs({"compressor": "evs", "keep_positions": True}).keep_positions is True
    assert parse_setting("keep_positions", "True") is True
    for bad in (2, "yes", None):
        with pytest.raises(ValueError, match="keep_positions"):
            settings_from_kwargs({"keep_positions": bad})
    settings = settings_from_kwargs({"keep_positions": True, "compressor": "vidcom2"})
    assert settings_from_kwargs({"compressor": "evs"}, settings).keep_positions is True  # not a method's argument

    _, model = load(tiny_checkpoint, compressor="vidcom2", keep_positions=True)  # load_pretrained_model
    assert model.keep_positions is True and model.keep_video_positions()
    model.keep_positions = False  # the model attribute
    assert model.compression.keep_positions is False
    with pytest.raises(ValueError, match="keep_positions"):
        model.keep_positions = "sometimes"
    assert model.configure_compression(keep_positions=True).keep_positions is True

    def stock_init(self, pretrained=None, max_frames_num=32):
        pass

    args = split_model_args("llava_vid", stock_init, {"pretrained": "x", "compressor": "evs", "keep_positions": "True"})
    assert settings_from_kwargs(args.compression).keep_positions is True
    assert cli.parse_args(["--compressor", "evs", "--keep-positions"]).compression["keep_positions"] is True
    assert "keep_positions" not in cli.parse_args(["--compressor", "evs"]).compression


# ---- transformers' LLaVA-OneVision (llava_hf): the same option ---------------------------------------------------


def _hide_dropped_every_step(ids, kept_columns):
    """A pre-hook on the stock language model: the video tokens compression drops (each row's video columns but the
    kept ones and the video's trailing newline) hidden from every query, at the prefill and at every decoding step,
    from generate's own 2-D mask (padding) and positions (left as they are)."""

    def hide(module, args, kwargs):
        embeds, padding = kwargs["inputs_embeds"], kwargs["attention_mask"]
        batch, queries = embeds.shape[:2]
        keys = padding.shape[-1]
        rows = torch.arange(keys - queries, keys)[:, None]
        allowed = ((torch.arange(keys)[None] <= rows)[None] & padding.bool()[:, None, :]).clone()
        for row, kept in enumerate(kept_columns):
            video = (ids[row] == nm.VIDEO).nonzero().flatten()[:-1]  # the last one is the newline: always kept
            allowed[row][:, video[~torch.isin(video, torch.tensor(kept))]] = False
        allowed |= torch.arange(keys)[None, None] == rows[None]
        minimum = torch.finfo(embeds.dtype).min
        kwargs["attention_mask"] = torch.zeros(allowed.shape, dtype=embeds.dtype).masked_fill(~allowed, minimum)[:, None]
        return args, kwargs

    return hide


@pytest.fixture(scope="module")
def onevision():
    return nm.MODELS["llava_onevision"]()


@pytest.mark.parametrize("variant", ["dynamic", "static"])
@pytest.mark.parametrize("method", ["dycoke", "vidcom2", "evs"])
def test_llava_hf_keeps_positions_and_equals_the_masked_stock_model(onevision, method, variant):
    """transformers' LLaVA-OneVision with keep_positions=True (a left-padded batch of two): the prefill's last logits
    (a forward without position ids) and greedy decoding equal the stock model on the whole prompt with the dropped
    video tokens hidden; without the option the positions are renumbered and the output differs."""
    from llava.compression import compressed

    model = onevision
    inputs = nm.video_inputs("llava_onevision", model, ((5, 6, 7), (5, 6, 7, 8, 9, 10, 11)))
    settings = {**PRE_LLM[method], "keep_positions": True}
    with compressed(model, **settings) as handle:
        with torch.no_grad():
            prefill = model(**inputs).logits[:, -1]
        kept = handle.last_stats["kept_video_columns"]
        tokens, logits = nm.greedy(model, inputs, STEPS, cache_implementation=variant)
        assert handle.last_stats["kept_video_columns"] == kept
        assert all(row == sorted(row) for row in kept)  # original order
    with compressed(model, **PRE_LLM[method]):
        renumbered = nm.greedy(model, inputs, STEPS)[1]
    hook = model.model.language_model.register_forward_pre_hook(
        _hide_dropped_every_step(inputs["input_ids"], kept), with_kwargs=True)
    try:
        with torch.no_grad():
            ref_prefill = model(**inputs).logits[:, -1]
        ref_tokens, ref_logits = nm.greedy(model, inputs, STEPS)
    finally:
        hook.remove()
    assert all(len(row) < int((inputs["input_ids"][i] == nm.VIDEO).sum()) - 1 for i, row in enumerate(kept))
    torch.testing.assert_close(prefill, ref_prefill, rtol=1e-5, atol=1e-5)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(renumbered, ref_logits, rtol=1e-4, atol=1e-4)
