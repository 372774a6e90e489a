"""DyCoke's dynamic KV pruning in the LLaVA model, checked against the masked reference (tests/references.py).

Three regimes of the same small random checkpoint, set by scaling the attention logits: the active set is kept
after the first step ("kept"), recomputed at some steps with partial changes ("mixed"), or recomputed at every step
("changing"). Each runs with a dynamic cache, a static cache, and a static cache with compiled decoding.
"""

from __future__ import annotations

import gc
import weakref
from dataclasses import dataclass

import pytest
import torch
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

from llava.compression.decoding import CompressionDynamicCache, CompressionStaticCache
from llava.compression.dycoke_kv import DyCokeKV
from llava.model import compression_mixin
from llava.model.language_model.llava_qwen import LlavaQwenDecoderLayer
from llava.transformers_compat import output_cache
from tests.conftest import random_video
from tests.references import (
    HostReads,
    MaskedDyCoke,
    cache_variants,
    greedy,
    load,
    prompt,
    scale_attention_logits,
    video_positions,
)

LAYER, RATIO, STEPS, FRAMES = 2, 0.7, 12, 8
# attention-logit scale and video seed of each regime (found by running them: see the regime assertions), with
# clear margins at the active set's boundary (tests/references.py MaskedDyCoke.margins)
REGIMES = {"kept": (0.1, 0), "mixed": (0.36, 6), "changing": (1.0, 6)}
VARIANTS = cache_variants()


@dataclass
class Case:
    tokenizer: object
    model: torch.nn.Module  # DyCoke, sdpa
    reference: torch.nn.Module  # the same weights, merging only (p=0), eager attention
    ids: torch.Tensor
    video: torch.Tensor


@pytest.fixture(scope="module")
def case(tiny_checkpoint):
    made: dict[str, Case] = {}

    def get(regime: str) -> Case:
        if regime not in made:
            scale, seed = REGIMES[regime]
            tokenizer, model = load(tiny_checkpoint, dycoke=True, dycoke_l=LAYER, dycoke_p=RATIO)
            _, reference = load(tiny_checkpoint, "eager", dycoke=True, dycoke_l=LAYER, dycoke_p=0.0)
            for m in (model, reference):
                scale_attention_logits(m, scale)
            size = model.get_vision_tower().image_size
            made[regime] = Case(tokenizer, model, reference, prompt(tokenizer), random_video(FRAMES, size, seed))
        return made[regime]

    return get


def reference_run(case: Case, public_quirks: bool = False, steps: int = STEPS, **generate_kwargs):
    positions = video_positions(case.reference, case.ids, case.video)
    rule = MaskedDyCoke(case.reference, positions, LAYER, RATIO, public_quirks=public_quirks)
    try:
        tokens, logits = greedy(case.reference, case.tokenizer, case.ids, [case.video], steps, **generate_kwargs)
    finally:
        rule.remove()
    return tokens, logits, rule


def dycoke_run(case: Case, steps: int = STEPS, **generate_kwargs):
    return greedy(case.model, case.tokenizer, case.ids, [case.video], steps, **generate_kwargs)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("regime", REGIMES)
def test_matches_the_masked_reference(case, regime, variant):
    c = case(regime)
    ref_tokens, ref_logits, rule = reference_run(c)
    assert min(rule.margins) > 1e-5  # no near-tie at the kept set's boundary: the selection is well defined
    tokens, logits = dycoke_run(c, **VARIANTS[variant])
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    kv = c.model.last_compression_stats["kv_pruning"]
    assert kv["decode_steps"] == STEPS - 1
    assert kv["recompute_steps"][0] == [step for step, hit in enumerate(rule.recomputed) if hit]
    keep = int(kv["image_tokens"][0] * (1 - RATIO))
    assert kv["active_image_tokens"] == [keep] and keep == rule.keep
    entered = kv["entered"][0]
    assert 0 < entered[0] <= keep  # the first step brings the top tokens into the active slots
    assert all(count == 0 for count, hit in zip(entered, rule.recomputed) if not hit)  # a kept set copies nothing
    # Each regime is what its name says.
    if regime == "kept":
        assert rule.recomputed == [True] + [False] * (STEPS - 2)
    elif regime == "changing":
        assert all(rule.recomputed) and all(count > 0 for count in entered)
    else:
        assert 2 < sum(rule.recomputed) < STEPS - 1
        assert any(0 < count < keep for count in entered[1:])  # a recomputed set that partly stayed


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_padded_batch_matches_the_reference_row_by_row(case, variant):
    c = case("mixed")
    questions = ("What happens in the video?", "Describe the colours and the motion in this short video clip.")
    rows = [Case(c.tokenizer, c.model, c.reference, prompt(c.tokenizer, q), random_video(frames, c.video.shape[-1], s))
            for q, frames, s in zip(questions, (FRAMES, FRAMES - 2), (6, 13))]  # uneven prompts and video tokens
    width = max(row.ids.shape[1] for row in rows)
    padded = torch.full((2, width), c.tokenizer.pad_token_id)
    mask = torch.zeros_like(padded)
    for index, row in enumerate(rows):  # right padding in the input: generate re-pads the spliced prompts on the left
        padded[index, : row.ids.shape[1]], mask[index, : row.ids.shape[1]] = row.ids[0], 1
    tokens, logits = greedy(c.model, c.tokenizer, padded, [row.video for row in rows], STEPS, attention_mask=mask,
                            **VARIANTS[variant])
    kv = c.model.last_compression_stats["kv_pruning"]
    for index, row in enumerate(rows):
        ref_tokens, ref_logits, rule = reference_run(row)
        assert min(rule.margins) > 1e-5
        assert torch.equal(tokens[index], ref_tokens[0])
        torch.testing.assert_close(logits[index], ref_logits[0], rtol=1e-5, atol=1e-5)
        assert kv["recompute_steps"][index] == [step for step, hit in enumerate(rule.recomputed) if hit]
    assert kv["image_tokens"][0] != kv["image_tokens"][1]  # each row its own active count


@pytest.mark.parametrize("variant", ["dynamic", "static"])
def test_a_decoding_step_reads_the_host_as_often_as_the_baseline(case, variant):
    c = case("mixed")
    counts = {}
    for p in (0.0, RATIO):  # merging alone (no decode-time pruning) and DyCoke
        c.model.dycoke_p = p
        with HostReads(c.model, decoding_only=True) as reads:
            dycoke_run(c, 6, **VARIANTS[variant])
        counts[p] = reads.count
    c.model.dycoke_p = RATIO
    assert reads.forwards == 5  # the five decoding forwards were watched
    assert counts[RATIO] == counts[0.0]  # 0 on transformers 5.23; 5.4 reads the mask once per dynamic step


def test_a_dynamic_cache_grows_past_the_planned_length(case, monkeypatch):
    c = case("mixed")
    expected_tokens, expected_logits = dycoke_run(c)
    monkeypatch.setattr(compression_mixin, "new_token_budget", lambda *args: 2)  # plan 2 tokens, decode 12
    tokens, logits = dycoke_run(c)
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
    assert c.model.last_compression_stats["kv_pruning"]["decode_steps"] == STEPS - 1


def test_compiled_decoding_never_recompiles_when_the_active_set_changes(case):
    c = case("changing")
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        dycoke_run(c, **VARIANTS["static-compiled"])  # compiles once, then every step changes the set
        assert all(c.model.last_compression_stats["kv_pruning"]["entered"][0])
        dycoke_run(c, **VARIANTS["static-compiled"])  # a new generation with the same shapes reuses the graph


@pytest.mark.parametrize("variant", ["dynamic", "static-compiled"])
def test_nothing_of_a_generation_stays_reachable_from_the_model(case, variant):
    c = case("mixed")
    output = c.model.generate(
        c.ids, images=[c.video], modalities=["video"], max_new_tokens=4, do_sample=False,
        pad_token_id=c.tokenizer.pad_token_id, return_dict_in_generate=True, **VARIANTS[variant],
    )
    cache = output_cache(output)
    assert isinstance(cache, (CompressionDynamicCache, CompressionStaticCache))  # the state lived in the cache
    state = weakref.ref(cache.compression)
    del output, cache
    gc.collect()
    assert state() is None
    for module in c.model.modules():  # no tensor hangs off a module but its parameters and buffers
        extra = [name for name, value in vars(module).items() if isinstance(value, torch.Tensor)]
        assert not extra, f"{type(module).__name__} holds {extra}"
    assert isinstance(c.model.last_compression_stats["kv_pruning"]["entered"][0][0], int)  # a plain summary


def test_public_quirks_reproduce_the_public_code(case):
    c = case("mixed")
    ref_tokens, ref_logits, rule = reference_run(c, public_quirks=True)
    c.model.dycoke_public_quirks = True
    try:
        for variant in ("dynamic", "static-compiled"):
            tokens, logits = dycoke_run(c, **VARIANTS[variant])
            assert torch.equal(tokens, ref_tokens)
            torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
            kv = c.model.last_compression_stats["kv_pruning"]
            video_tokens = len(video_positions(c.reference, c.ids, c.video))
            assert kv["mode"] == "public_quirks" and kv["image_tokens"] == [video_tokens]
            assert kv["scored_image_tokens"] == [video_tokens - 1]  # a span of M - 1
            # its top int((M - 1) * (1 - p)), and the last video token
            assert kv["active_image_tokens"] == [int((video_tokens - 1) * (1 - RATIO)) + 1]
    finally:
        c.model.dycoke_public_quirks = False
    _, default_logits = dycoke_run(c)
    assert (default_logits - ref_logits).abs().max() > 1e-3  # the switch changes what is computed


def test_the_layers_are_stock_qwen2_layers_when_nothing_is_pruned(tiny_checkpoint):
    _, model = load(tiny_checkpoint)
    layers = model.get_model().layers
    assert all(type(layer) is LlavaQwenDecoderLayer for layer in layers)  # from construction, never switched
    assert all(isinstance(layer, Qwen2DecoderLayer) for layer in layers)
    stock = Qwen2DecoderLayer(model.config, 1).eval()
    stock.load_state_dict(layers[1].state_dict())
    hidden = torch.randn(1, 5, model.config.hidden_size)
    positions = torch.arange(5)[None]
    embeddings = model.get_model().rotary_emb(hidden, positions)
    assert torch.equal(
        layers[1](hidden, position_embeddings=embeddings, position_ids=positions),
        stock(hidden, position_embeddings=embeddings, position_ids=positions),
    )


def test_rejected_settings_leave_the_model_as_it_was(case):
    c = case("kept")
    model = c.model
    before = (model.compression, model.decode_compressor, model.video_compressor())
    bad = [
        {"dycoke_l": 2.5}, {"dycoke_l": 4}, {"dycoke_p": 1.0}, {"dycoke_k": -0.1}, {"compressor": "sparse"},
        {"dycoke": True, "compressor": "none"}, {"dycoke_public_quirks": "maybe"}, {"fastv_r": float("nan")},
        {"dycoke_p": 0.5, "dycoke_l": 0},  # one good value with a bad one: nothing applied
    ]
    for kwargs in bad:
        with pytest.raises(ValueError):
            model.configure_compression(**kwargs)
        assert (model.compression, model.decode_compressor, model.video_compressor()) == before
    with pytest.raises(ValueError, match=r"dycoke_l=2.5 must be an integer"):
        model.dycoke_l = 2.5
    assert model.dycoke_l == LAYER and model.decode_compressor is before[1]


def test_decode_compressor_follows_the_settings(case):
    c = case("kept")
    method = c.model.decode_compressor
    assert isinstance(method, DyCokeKV) and (method.layer, method.ratio) == (LAYER, RATIO)
    c.model.dycoke_p = 0.0  # merging alone: nothing to do at decoding steps
    assert c.model.decode_compressor is None
    c.model.dycoke_p = RATIO
    assert c.model.decode_compressor.ratio == RATIO


def test_unsupported_generate_arguments_are_clear_errors(case):
    c = case("kept")
    for kwargs, message in (
        ({"num_beams": 2}, "num_beams=2"),
        ({"use_cache": False}, "use_cache=True"),
        ({"cache_implementation": "offloaded"}, "cache_implementation='offloaded'"),
    ):
        with pytest.raises(ValueError, match=message):
            dycoke_run(c, 3, **kwargs)
