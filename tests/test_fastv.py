"""FastV in the LLaVA model, checked against the hidden-token reference (tests/references.py): dropping the tokens
and running layers >= K on the compact sequence gives the logits of hiding them with the mask, positions kept."""

from __future__ import annotations

import pytest
import torch

from llava.model import compression_mixin
from llava.transformers_compat import output_cache
from tests.conftest import random_video
from tests.references import (
    HiddenFastV,
    HostReads,
    cache_variants,
    greedy,
    load,
    prompt,
    video_positions,
)

LAYER, RATIO, STEPS, FRAMES = 2, 0.5, 8, 8
VARIANTS = cache_variants()


@pytest.fixture(scope="module")
def models(tiny_checkpoint):
    tokenizer, model = load(tiny_checkpoint, compressor="fastv", fastv_k=LAYER, fastv_r=RATIO)
    _, reference = load(tiny_checkpoint, "eager")
    return tokenizer, model, reference


def reference_run(reference, tokenizer, ids, video, steps=STEPS, layer=LAYER):
    rule = HiddenFastV(reference, video_positions(reference, ids, video), layer, RATIO)
    try:
        tokens, logits = greedy(reference, tokenizer, ids, [video], steps)
    finally:
        rule.remove()
    return tokens, logits, rule


@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_the_hidden_token_reference(models, variant):
    tokenizer, model, reference = models
    ids, video = prompt(tokenizer), random_video(FRAMES, model.get_vision_tower().image_size, seed=3)
    ref_tokens, ref_logits, rule = reference_run(reference, tokenizer, ids, video)
    tokens, logits = greedy(model, tokenizer, ids, [video], STEPS, **VARIANTS[variant])
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    stats = model.last_compression_stats["fastv"]
    positions = video_positions(reference, ids, video)
    kept = sorted(set(positions.tolist()) - set(rule.dropped.tolist()))
    assert stats["pruned"] and stats["kept_video_positions"][0] == kept  # exactly the most attended tokens
    assert stats["kept_image_tokens"] == [round(len(positions) * (1 - RATIO))]
    assert stats["compact_tokens"] == ids.shape[1] - 1 + len(positions) + 1 - len(rule.dropped)  # + the newline
    assert stats["decode_steps"] == STEPS - 1


def test_a_static_cache_allocates_layers_from_k_at_the_compact_length(models):
    """Layers >= K hold the W compact slots from the prefill on: their static buffers are W + the new tokens long,
    the others the whole prompt + the new tokens (the decoding steps above match the reference with them)."""
    tokenizer, model, _ = models
    ids, video = prompt(tokenizer), random_video(FRAMES, model.get_vision_tower().image_size, seed=3)
    output = model.generate(ids, images=[video], modalities=["video"], do_sample=False, max_new_tokens=STEPS,
                            min_new_tokens=STEPS, pad_token_id=tokenizer.pad_token_id, return_dict_in_generate=True,
                            cache_implementation="static")
    stats = model.last_compression_stats["fastv"]
    assert stats["compact_tokens"] < stats["prefill_tokens"]
    lengths = [layer.keys.shape[-2] for layer in output_cache(output).layers]
    assert lengths == [stats["prefill_tokens"] + STEPS] * LAYER + [stats["compact_tokens"] + STEPS] * (len(lengths) - LAYER)


def test_another_layer_k_matches_its_reference(models):
    """K=1 (the other tests use the default, 2): the setting reaches the model, and the tokens and logits are the
    reference's that drops at layer 1. The tolerance is 3e-5: three layers now run on the compact sequence, and
    the eager reference computes its softmax in float32, so rounding grows (2e-5 on logits of magnitude 5)."""
    tokenizer, model, reference = models
    ids, video = prompt(tokenizer), random_video(FRAMES, model.get_vision_tower().image_size, seed=3)
    model.configure_compression(fastv_k=1)
    try:
        tokens, logits = greedy(model, tokenizer, ids, [video], STEPS)
        stats = model.last_compression_stats["fastv"]
    finally:
        model.configure_compression(fastv_k=LAYER)
    ref_tokens, ref_logits, rule = reference_run(reference, tokenizer, ids, video, layer=1)
    _, _, rule_at_2 = reference_run(reference, tokenizer, ids, video)
    assert not torch.equal(rule.dropped.sort().values, rule_at_2.dropped.sort().values)  # K changes the selection
    positions = video_positions(reference, ids, video)
    assert stats["kept_video_positions"][0] == sorted(set(positions.tolist()) - set(rule.dropped.tolist()))
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=3e-5)


def padded_batch(tokenizer, size):
    """Two prompts of different lengths, right-padded, with videos of different lengths: a batch whose rows have
    invalid slots, so the decoding steps read FastV's key mask."""
    ids = [prompt(tokenizer), prompt(tokenizer, "Which colours appear, and what moves in this short clip?")]
    videos = [random_video(FRAMES, size, seed=5), random_video(FRAMES - 2, size, seed=6)]  # uneven kept counts
    padded = torch.full((2, max(i.shape[1] for i in ids)), tokenizer.pad_token_id)
    mask = torch.zeros_like(padded)
    for row, i in enumerate(ids):
        padded[row, : i.shape[1]], mask[row, : i.shape[1]] = i[0], 1
    return ids, videos, padded, mask


def test_batch_with_padding_equals_rows_alone(models):
    tokenizer, model, _ = models
    ids, videos, padded, mask = padded_batch(tokenizer, model.get_vision_tower().image_size)
    for variant in ("dynamic", "static"):
        alone = [greedy(model, tokenizer, i, [v], 5, **VARIANTS[variant]) for i, v in zip(ids, videos)]
        tokens, logits = greedy(model, tokenizer, padded, videos, 5, attention_mask=mask, **VARIANTS[variant])
        for row, (row_tokens, row_logits) in enumerate(alone):
            assert torch.equal(tokens[row], row_tokens[0])
            torch.testing.assert_close(logits[row], row_logits[0], rtol=1e-4, atol=1e-4)
        stats = model.last_compression_stats["fastv"]
        assert min(row[0] for row in stats["compact_positions"]) == -1  # the shorter row has invalid front slots


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_a_decoding_step_reads_the_host_as_often_as_the_baseline(models, cache):
    tokenizer, model, _ = models
    ids, video = prompt(tokenizer), random_video(FRAMES, model.get_vision_tower().image_size, seed=3)
    counts = {}
    for ratio in (0.0, RATIO):  # the baseline (FastV off) and FastV
        model.configure_compression(fastv_r=ratio)
        with HostReads(model, decoding_only=True) as reads:
            greedy(model, tokenizer, ids, [video], 6, **VARIANTS[cache])
        counts[ratio] = reads.count
    assert reads.forwards == 5 and model.last_compression_stats["fastv"]["pruned"]
    assert counts[RATIO] == counts[0.0]  # 0 on transformers 5.23; 5.4 reads the mask once per dynamic step


def test_a_dynamic_cache_grows_past_the_planned_length(models, monkeypatch):
    """The decoding key mask is planned for the token budget; a dynamic cache that decodes past it (a budget
    that undercounts) grows the mask and gives the same tokens. A padded batch, so the mask is read at every step,
    and few dropped tokens (r=0.05), so the planned mask's spare room runs out within the 16 steps."""
    tokenizer, model, _ = models
    _, videos, padded, mask = padded_batch(tokenizer, model.get_vision_tower().image_size)
    model.configure_compression(fastv_r=0.05)
    try:
        expected_tokens, expected_logits = greedy(model, tokenizer, padded, videos, 16, attention_mask=mask)
        monkeypatch.setattr(compression_mixin, "new_token_budget", lambda *args: 1)  # plan 1 token, decode 16
        tokens, logits = greedy(model, tokenizer, padded, videos, 16, attention_mask=mask)
    finally:
        model.configure_compression(fastv_r=RATIO)
    assert tokens.shape == expected_tokens.shape == (2, 16)
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)


def test_prompts_without_video_run_the_stock_model(models):
    tokenizer, model, reference = models
    ids = tokenizer("Hello there, how are you?", return_tensors="pt").input_ids
    outputs = []
    for m in (model, reference):
        output = m.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id, output_logits=True, return_dict_in_generate=True)
        outputs.append(torch.stack(output.logits, 1))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
    assert model.last_compression_stats["fastv"]["pruned"] is False


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_the_decoding_key_mask_holds_the_dtype_minimum_in_every_float_dtype(dtype):
    """The additive mask of FastV's and DyCoke's decoding steps: 0 where a key is valid, the dtype's minimum where
    hidden (float64 included: a float64 model once failed here), decoded slots hidden until their step marks them."""
    from llava.compression.masks import ADDITIVE, KeyMask

    valid = torch.tensor([[True, False, True], [False, True, True]])
    mask = KeyMask(valid, decoded_capacity=2, kind=ADDITIVE, dtype=dtype)
    hidden = torch.finfo(dtype).min
    assert mask.values.dtype == dtype
    expected = torch.tensor([[0, hidden, 0, hidden, hidden], [hidden, 0, 0, hidden, hidden]], dtype=dtype)
    assert torch.equal(mask.values, expected)
    mask.mark_decoded(torch.tensor([0]))
    expected[:, 3] = 0
    assert torch.equal(mask.values, expected)
