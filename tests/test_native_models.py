"""Compression on transformers' own video LLMs (llava.compression.native), tiny random configs of each.

The oracles: the stock model itself (``compressor="none"``; dropped tokens hidden by the attention mask at their
original positions, which gives the same logits as removing them), this package's LLaVA-NeXT model (the same
LLaVA-OneVision weights converted), the selection references of tests/references.py and the masked DyCoke rule.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers import DynamicCache

from llava.compression import apply_compression, compressed, remove_compression
from llava.transformers_compat import CACHE_ARG, output_cache
from tests import native_models as nm
from tests.conftest import random_video
from tests.test_evs import reference_evs
from tests.references import (
    MaskedDyCoke,
    greedy,
    load,
    prompt,
    reference_ttm,
    reference_vidcom2,
    transformers_onevision,
)

QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
SETTINGS = {
    "dycoke": dict(compressor="dycoke", dycoke_k=0.5, dycoke_l=2, dycoke_p=0.5),
    "vidcom2": dict(compressor="vidcom2", vidcom2_r=0.5),
    "fastv": dict(compressor="fastv", fastv_k=2, fastv_r=0.5),
}
QUESTIONS = ((5, 6, 7), (5, 6, 7, 8, 9, 10, 11))  # two rows of different lengths: the batch is padded


@pytest.fixture(scope="module")
def models():
    return {name: make() for name, make in nm.MODELS.items()}


def inputs_for(name, model, questions=QUESTIONS[:1]):
    return nm.video_inputs(name, model, questions)


@pytest.mark.parametrize("name", nm.MODELS)
def test_compressor_none_is_the_stock_model(models, name):
    model = models[name]
    inputs = inputs_for(name, model, QUESTIONS)
    stock_tokens, stock_logits = nm.greedy(model, inputs, 4)
    with compressed(model, compressor="none") as handle:
        tokens, logits = nm.greedy(model, inputs, 4)
        assert handle.last_stats["video_tokens_after"] == handle.last_stats["video_tokens_before"] > 0
    assert torch.equal(tokens, stock_tokens)
    torch.testing.assert_close(logits, stock_logits, rtol=1e-5, atol=1e-5)
    assert "llava_compression" not in model.__dict__ and not model.model.language_model._forward_pre_hooks


def _hide_dropped(model, kept_columns, video_token_id):
    """A hook on the stock language model: the video tokens not kept are hidden from every query by the mask."""

    def hide(module, args, kwargs):
        embeds = kwargs["inputs_embeds"]
        batch, length = embeds.shape[:2]
        allowed = torch.ones(length, length, dtype=torch.bool).tril().expand(batch, -1, -1).clone()
        padding = kwargs["attention_mask"]
        if isinstance(padding, torch.Tensor) and padding.ndim == 2:
            allowed &= padding.bool()[:, None, :]
        for row, kept in enumerate(kept_columns):
            dropped = (hide.ids[row] == video_token_id).nonzero().flatten().tolist()
            dropped = [column for column in dropped if column not in set(kept)]
            allowed[row][:, dropped] = False
        allowed |= torch.eye(length, dtype=torch.bool)  # a hidden token still attends to itself (no empty row)
        kwargs["attention_mask"] = torch.zeros(allowed.shape, dtype=embeds.dtype).masked_fill(
            ~allowed, torch.finfo(embeds.dtype).min
        )[:, None]
        return args, kwargs

    return hide


@pytest.mark.parametrize("method", ["dycoke", "vidcom2"])
@pytest.mark.parametrize("name", QWEN)
def test_qwen_prefill_equals_the_stock_model_with_dropped_tokens_hidden(models, name, method):
    """Kept tokens keep their original multimodal positions: the compressed prefill's last logits are the stock
    model's on the whole sequence with the dropped video tokens hidden by the mask (its own position ids)."""
    model = models[name]
    inputs = inputs_for(name, model, QUESTIONS)
    settings = {**SETTINGS[method], "dycoke_p": 0.0} if method == "dycoke" else SETTINGS[method]
    with compressed(model, **settings) as handle:
        with torch.no_grad():
            logits = model(**inputs).logits[:, -1]
        kept = handle.last_stats["kept_video_columns"]
    hide = _hide_dropped(model, kept, nm.VIDEO)
    hide.ids = inputs["input_ids"]
    hook = model.model.language_model.register_forward_pre_hook(hide, with_kwargs=True)
    try:
        with torch.no_grad():
            reference = model(**inputs).logits[:, -1]
    finally:
        hook.remove()
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    assert all(len(row) < (inputs["input_ids"][i] == nm.VIDEO).sum() for i, row in enumerate(kept))


SELECTION_REFERENCES = {  # method -> (the loop reference, the settings that make the method run it at ratio 0.5)
    "dycoke": (reference_ttm, {"compressor": "dycoke", "dycoke_k": 0.5, "dycoke_p": 0.0}),
    "vidcom2": (reference_vidcom2, {"compressor": "vidcom2", "vidcom2_r": 0.5}),
    "evs": (reference_evs, {"compressor": "evs", "evs_rate": 0.5}),
}


@pytest.mark.parametrize("method", SELECTION_REFERENCES)
@pytest.mark.parametrize("name", [*QWEN, "llava_onevision"])
def test_selections_per_frame_equal_the_reference(models, name, method):
    """A frame is one temporal step of video_grid_thw (Qwen) or one pooled frame (LLaVA-OneVision)."""
    model = models[name]
    inputs = inputs_for(name, model)
    with torch.no_grad():
        features = model.model.get_video_features(
            inputs["pixel_values_videos"], *([inputs["video_grid_thw"]] if "video_grid_thw" in inputs else [])
        ).pooler_output[0]
    video_columns = (inputs["input_ids"][0] == nm.VIDEO).nonzero().flatten()
    if name == "llava_onevision":  # pooled frames, then the video's one newline (never compressed)
        frames = inputs["pixel_values_videos"].shape[1]
        video_columns = video_columns[:-1]
        features = features[: len(video_columns)]  # transformers 5.23 returns the newline too, 5.4 does not
    else:
        frames = int(inputs["video_grid_thw"][0, 0])
    features = features.reshape(frames, -1, features.shape[-1])
    reference, settings = SELECTION_REFERENCES[method]
    index, per_frame = reference(features, 0.5)
    expected = [int(video_columns[i]) for i in index]
    with compressed(model, **settings) as handle:
        with torch.no_grad():
            model(**inputs)
    kept = handle.last_stats["kept_video_columns"][0]
    if name == "llava_onevision":
        assert kept == expected  # the selection's order, as LLaVA-NeXT builds the sequence
    else:
        assert kept == sorted(expected)  # the original order
    assert len(kept) == sum(per_frame)


# Each method at a strong setting, with what it claims to change (a hook that silently stops firing, as the
# transformers 5.25 cache-argument rename once made it, must fail here).
CLAIMS = {
    "merging": dict(compressor="dycoke", dycoke_k=0.5, dycoke_p=0),
    "vidcom2": dict(compressor="vidcom2", vidcom2_r=0.25),
    "fastv": dict(compressor="fastv", fastv_k=2, fastv_r=0.9),
    "kv_pruning": dict(compressor="dycoke", dycoke_k=0, dycoke_l=2, dycoke_p=0.9),
}


@pytest.mark.parametrize("method", CLAIMS)
@pytest.mark.parametrize("name", nm.MODELS)
def test_every_method_changes_what_it_claims(models, name, method):
    model = models[name]
    inputs = inputs_for(name, model)
    stock_logits = nm.greedy(model, inputs, 3)[1]
    with compressed(model, **CLAIMS[method]) as handle:
        logits = nm.greedy(model, inputs, 3)[1]
        stats = handle.last_stats
    changed = (logits - stock_logits).abs().amax(dim=-1)[0]  # per step
    if method in ("merging", "vidcom2"):  # fewer video tokens enter the LM: every step sees other keys
        assert 0 < stats["video_tokens_after"] < stats["video_tokens_before"]
        assert bool((changed > 1e-5).all()), changed
    elif method == "fastv":  # layers >= K keep round(n * 0.1) of the video tokens from the prefill on
        fastv = stats["fastv"]
        assert fastv["pruned"] and fastv["kept_image_tokens"][0] == round(fastv["image_tokens"][0] * 0.1)
        assert fastv["compact_tokens"] < fastv["prefill_tokens"]
        assert bool((changed > 1e-5).all()), changed
    else:  # the prefill is exact; every decoding step attends to 10% of the video tokens from layer L on
        kv = stats["kv_pruning"]
        assert kv["decode_steps"] == 2 and kv["recomputations"][0] >= 1
        assert kv["active_image_tokens"][0] == int(kv["image_tokens"][0] * (1 - 0.9)) < kv["image_tokens"][0]
        assert float(changed[0]) < 1e-5 and bool((changed[1:] > 1e-5).all()), changed


@pytest.mark.parametrize("method", SETTINGS)
@pytest.mark.parametrize("name", nm.MODELS)
def test_a_padded_batch_equals_its_rows_alone(models, name, method):
    model = models[name]
    inputs = inputs_for(name, model, QUESTIONS)
    with compressed(model, **SETTINGS[method]):
        tokens, logits = nm.greedy(model, inputs, 5)
        for index in range(2):
            row_tokens, row_logits = nm.greedy(model, nm.row(inputs, index), 5)
            assert torch.equal(tokens[index], row_tokens[0])
            torch.testing.assert_close(logits[index], row_logits[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", SETTINGS)
@pytest.mark.parametrize("name", ["qwen2_vl", "llava_onevision"])
def test_static_cache_equals_dynamic_cache(models, name, method):
    model = models[name]
    inputs = inputs_for(name, model, QUESTIONS)
    with compressed(model, **SETTINGS[method]):
        dynamic = nm.greedy(model, inputs, 5)
        static = nm.greedy(model, inputs, 5, cache_implementation="static")
    assert torch.equal(dynamic[0], static[0])
    torch.testing.assert_close(dynamic[1], static[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", QWEN)
def test_qwen_dycoke_decoding_equals_the_masked_rule(name):
    """DyCoke's KV pruning through the layer hooks equals the plain rule (tests/references.py) on an eager copy
    that merges (TTM) the same way but does not prune."""
    steps, layer, ratio = 8, 2, 0.7
    model, eager = nm.MODELS[name](), nm.MODELS[name](attn="eager")
    inputs = inputs_for(name, model)
    with compressed(eager, compressor="dycoke", dycoke_k=0.5, dycoke_l=layer, dycoke_p=0.0) as handle:
        with torch.no_grad():
            eager(**inputs)
        positions = torch.tensor(handle.last_stats["video_positions"][0])
        rule = MaskedDyCoke(eager, positions, layer, ratio)
        try:
            ref_tokens, ref_logits = nm.greedy(eager, inputs, steps)
        finally:
            rule.remove()
    with compressed(model, compressor="dycoke", dycoke_k=0.5, dycoke_l=layer, dycoke_p=ratio):
        output = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                pad_token_id=nm.PAD, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(output.sequences[:, inputs["input_ids"].shape[1]:], ref_tokens)
    torch.testing.assert_close(torch.stack(output.logits, 1), ref_logits, rtol=1e-5, atol=1e-5)
    kv = output_cache(output).compression.summary()  # the generation's state came back with its cache
    assert kv["recompute_steps"][0] == [step for step, hit in enumerate(rule.recomputed) if hit]
    assert kv["image_tokens"] == [len(positions)]


@pytest.mark.parametrize("name", QWEN)
def test_a_decoding_loop_without_generate_continues_from_the_stock_positions(models, name):
    """Without explicit position ids a Qwen VL model places the next token at (cached tokens + rope_deltas); the
    compressed cache holds fewer tokens, and the deltas follow: the next token gets the stock model's position.
    (generate passes positions itself; transformers 5.23's Qwen2.5-VL places it differently there, compressed
    or not.)"""
    model = models[name]
    inputs = inputs_for(name, model)

    def next_positions():
        seen = []
        hook = model.model.language_model.register_forward_pre_hook(
            lambda module, args, kwargs: seen.append(kwargs["position_ids"]), with_kwargs=True
        )
        try:
            with torch.no_grad():
                output = model(**inputs, use_cache=True)
                token = output.logits[:, -1:].argmax(-1)
                model(input_ids=token, **{CACHE_ARG: output_cache(output)}, use_cache=True)
        finally:
            hook.remove()
        return seen[-1]

    stock = next_positions()
    with compressed(model, **SETTINGS["dycoke"]) as handle:
        ours = next_positions()
    assert handle.last_stats["video_tokens_after"] < handle.last_stats["video_tokens_before"]
    assert torch.equal(ours[-3:], stock[-3:])  # the 3 multimodal rows (a 4th, first row is the text position)


def test_native_onevision_dycoke_gives_the_tokens_of_the_llava_next_model(tiny_checkpoint):
    """The same weights in both formats, DyCoke with the same settings: the same answer."""
    settings = dict(dycoke=True, dycoke_k=0.7, dycoke_l=2, dycoke_p=0.7)
    tokenizer, ours = load(tiny_checkpoint, **settings)
    theirs, placeholder = transformers_onevision(tiny_checkpoint, ours)
    size = ours.get_vision_tower().image_size
    video = random_video(8, size, seed=5)
    ids = prompt(tokenizer)
    our_tokens, our_logits = greedy(ours, tokenizer, ids, [video], 10)
    count = 8 * math.ceil(ours.get_vision_tower().num_patches_per_side / 2) ** 2 + 1
    at = int((ids[0] == -200).nonzero())
    expanded = torch.cat([ids[:, :at], torch.full((1, count), placeholder), ids[:, at + 1 :]], dim=1)
    with compressed(theirs, **settings) as handle:
        output = theirs.generate(input_ids=expanded, pixel_values_videos=video[None], max_new_tokens=10,
                                 min_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                 output_logits=True, return_dict_in_generate=True)
    assert torch.equal(output.sequences[:, expanded.shape[1]:], our_tokens)
    torch.testing.assert_close(torch.stack(output.logits, 1), our_logits, rtol=1e-4, atol=1e-4)
    assert handle.last_stats["video_tokens_after"] == ours.last_compression_stats["video_tokens_after"]


def test_invalid_uses_are_clear_errors(models):
    with pytest.raises(TypeError, match=r"does not support Linear; supported: LlavaOnevisionForConditionalGeneration"):
        apply_compression(nn.Linear(2, 2), compressor="dycoke")
    model = models["qwen2_vl"]
    for settings, message in (
        ({"compressor": "dycoke", "dycoke_l": 4}, r"dycoke_l=4 is out of range; allowed: \[1, 3\]"),
        ({"compressor": "zip"}, "compressor='zip'"),
        ({"dycoke": True, "compressor": "fastv"}, "contradicts"),
    ):
        with pytest.raises(ValueError, match=message):
            apply_compression(model, **settings)
        assert "llava_compression" not in model.__dict__  # nothing applied
    deep = nm.qwen3_vl()
    deep.config.vision_config.deepstack_visual_indexes = [0, 1]
    # a layer inside Qwen3-VL's deepstack layers is fine: hooks add the features (tests/test_qwen3_vl_deepstack.py)
    apply_compression(deep, compressor="fastv", fastv_k=1)
    assert [len(layer._forward_hooks) for layer in deep.model.language_model.layers] == [2, 2, 1, 1]
    remove_compression(deep)
    inputs = inputs_for("qwen2_vl", model)
    with compressed(model, compressor="dycoke"):
        with pytest.raises(ValueError, match="use_cache=True"):
            model.generate(**inputs, max_new_tokens=2, use_cache=False)
    with compressed(model, compressor="vidcom2"):
        for name in sorted({"past_key_values", CACHE_ARG}):  # the cache argument's old and new names
            with pytest.raises(ValueError, match=r"leave past_key_values \(cache\) out"):
                model.generate(**inputs, max_new_tokens=2, **{name: DynamicCache(config=model.config)})
    inputs.pop("video_grid_thw")
    with compressed(model, compressor="vidcom2"), pytest.raises(ValueError, match="no video_grid_thw"):
        model(**inputs)


def test_apply_again_replaces_and_the_package_model_is_accepted(models, tiny_checkpoint):
    model = models["qwen2_vl"]
    apply_compression(model, compressor="dycoke")
    handle = apply_compression(model, compressor="vidcom2", vidcom2_r=0.3)
    hooks = len(model.model.language_model.layers[0]._forward_pre_hooks)
    assert model.llava_compression is handle and hooks == 1  # replaced, not stacked
    remove_compression(model)
    assert not model.model.language_model.layers[0]._forward_pre_hooks
    assert "get_video_features" not in model.model.__dict__
    _, ours = load(tiny_checkpoint)
    with compressed(ours, compressor="vidcom2", vidcom2_r=0.3):
        assert ours.compressor == "vidcom2"
    assert ours.compressor == "none"
