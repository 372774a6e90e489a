"""Qwen3-VL's deepstack under the in-LLM stages that shorten the hidden states below its deepstack layers: FastV (and
the methods built on it) from layer K on, FrameFusion from layer 0 on.

transformers' ``Qwen3VLTextModel.forward`` adds each deepstack layer's features to the hidden states at the visual
positions after that layer (``_deepstack_process``). The references here run that stock model (eager) on the full
sequence, hiding the removed tokens from the later layers with the mask, so they add every feature to every visual
position: ``HiddenFastV`` (tests/references.py, from ``pkunlp-icler/FastV``'s ``fastv_forward``),
``HiddenFrameFusion`` (tests/test_framefusion.py, from ``thu-nics/FrameFusion`` fbec1d2e, ``framefusion/main.py``)
and ``MergedHoliTom`` (tests/test_holitom.py, HoliTom's merge inside the LM).
Equal tokens and logits mean each token still in the compact sequence got its own features, merged ones included.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

import llava.compression.methods  # noqa: F401  (registers every method)
from llava.compression import compressed, native
from tests import native_models as nm
from tests.references import HiddenFastV, cache_variants
from tests.test_framefusion import SETTINGS, HiddenFrameFusion
from tests.test_holitom import MergedHoliTom

DEEPSTACK = 3  # of the 4 text layers: only the last one comes after them
STEPS = 4
VARIANTS = cache_variants()
TOKENS_PER_FRAME = (16 // nm.PATCH) ** 2 // nm.MERGE**2
# (cost, similarity_lower_bound, ratio_lower_bound) on this model and video: no merge at step 0, then pruning after
# layer 0's attention; merging steps after the attention of layers 0, 1 and 2 (each followed by deepstack features)
FRAMEFUSION_CASES = {"prunes": SETTINGS["merge-then-prune"], "merges": (0.6, 0.2, 0.02)}


def framefusion_settings(case: str) -> dict:
    names = ("framefusion_cost", "framefusion_similarity_lower_bound", "framefusion_ratio_lower_bound")
    return dict(zip(names, FRAMEFUSION_CASES[case]))


def deep_qwen3_vl(attn: str = "sdpa"):
    """The tiny Qwen3-VL of tests/native_models.py with a deepstack feature after each of its first 3 layers (its
    vision tower has 3 blocks, each feeding one)."""
    rope = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 2, 2], "mrope_interleaved": True}
    config = Qwen3VLConfig(
        text_config={**nm._TEXT, "head_dim": 16, "rope_parameters": rope},
        vision_config=dict(depth=DEEPSTACK, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           num_position_embeddings=16, deepstack_visual_indexes=list(range(DEEPSTACK)),
                           **nm._QWEN_VISION),
        **nm._TOKENS,
    )
    return nm._built(Qwen3VLForConditionalGeneration, config, attn, seed=0)


@pytest.fixture(scope="module")
def models():
    model, reference = deep_qwen3_vl(), deep_qwen3_vl("eager")
    assert model.config.text_config.num_hidden_layers > DEEPSTACK
    return model, reference


def video_positions(inputs: dict) -> torch.Tensor:
    return (inputs["input_ids"][0] == nm.VIDEO).nonzero().flatten()


def fastv_reference(reference, inputs: dict, layer: int):
    rule = HiddenFastV(reference, video_positions(inputs), layer, 0.5)
    try:
        return (*nm.greedy(reference, inputs, STEPS), rule)
    finally:
        rule.remove()


def framefusion_reference(reference, inputs: dict, case: str):
    rule = HiddenFrameFusion(reference, video_positions(inputs).tolist(), TOKENS_PER_FRAME, *FRAMEFUSION_CASES[case])
    try:
        return (*nm.greedy(reference, inputs, STEPS), rule)
    finally:
        rule.remove()


# ---- equal to the masked full-sequence references ------------------------------------------------------------------


@pytest.mark.parametrize(("layer", "variant"), [(1, "dynamic"), (1, "static"), (1, "static-compiled"),
                                                (2, "dynamic"), (2, "static")])
def test_fastv_below_the_deepstack_layers_matches_the_masked_reference(models, layer, variant):
    """K=1: layers 1 and 2 add their features to the compact sequence; K=2: layer 1 adds them to the whole prompt,
    before the compaction, and layer 2 to the compact one."""
    model, reference = models
    inputs = nm.video_inputs("qwen3_vl", model, ((5, 6, 7),), seed=3)
    ref_tokens, ref_logits, rule = fastv_reference(reference, inputs, layer)
    with compressed(model, compressor="fastv", fastv_k=layer, fastv_r=0.5) as handle:
        tokens, logits = nm.greedy(model, inputs, STEPS, **VARIANTS[variant])
        stats = handle.last_stats["fastv"]
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    positions = video_positions(inputs)
    kept = sorted(set(positions.tolist()) - set(rule.dropped.tolist()))
    assert stats["kept_video_positions"] == [kept] and len(kept) < len(positions)


@pytest.mark.parametrize(("case", "variant"), [("prunes", "dynamic"), ("prunes", "static"), ("merges", "dynamic"),
                                               ("merges", "static"), ("merges", "static-compiled")])
def test_framefusion_matches_the_masked_reference(models, case, variant):
    """Its steps run after the attention of deepstack layers (step l + 1 after layer l's): the tokens left get their
    own features, and a token others merged into gets its own, as on the full sequence."""
    model, reference = models
    inputs = nm.video_inputs("qwen3_vl", model, ((5, 6, 7),), seed=3)
    ref_tokens, ref_logits, rule = framefusion_reference(reference, inputs, case)
    with compressed(model, compressor="framefusion", **framefusion_settings(case)) as handle:
        tokens, logits = nm.greedy(model, inputs, STEPS, **VARIANTS[variant])
        stats = handle.last_stats["framefusion"]
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert stats["video_tokens_per_layer"] == [rule.per_layer] and rule.per_layer[-1] < len(video_positions(inputs))
    assert stats["merge_layers"] == [rule.merge_layers] and stats["prune_layer"] == [rule.prune_layer]
    inside = {"prunes": [rule.prune_layer], "merges": rule.merge_layers[1:]}[case]
    assert inside and all(step is not None and 0 < step <= DEEPSTACK for step in inside)


@pytest.mark.parametrize("layer", [1, 2])
def test_holitom_merging_below_the_deepstack_layers_matches_the_merged_reference(models, layer):
    """HoliTom merges the dropped tokens into the kept ones before layer K (``MergedHoliTom``, tests/test_holitom.py,
    from ``cokeshao/HoliTom``): with K=2, layer 1's features were added to every token before the merge, as on the full
    sequence; the merged tokens then get their own features after layer 2. The reference runs the same stage before
    the LM (holitom_llm_r=0) on the stock model."""
    model, reference = models
    inputs = nm.video_inputs("qwen3_vl", model, ((5, 6, 7),), frames=16, seed=3)
    outer = {"compressor": "holitom", "holitom_r": 0.5, "holitom_t": 0.3, "holitom_k": layer}
    with compressed(reference, **outer, holitom_llm_r=0) as handle:
        nm.greedy(reference, inputs, 1)
        positions = torch.tensor(handle.last_stats["video_positions"][0])
        rule = MergedHoliTom(reference, positions, layer, 0.5)
        try:
            ref_tokens, ref_logits = nm.greedy(reference, inputs, STEPS)
        finally:
            rule.remove()
    with compressed(model, **outer, holitom_llm_r=0.5) as handle:
        tokens, logits = nm.greedy(model, inputs, STEPS)
        stats = handle.last_stats
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=3e-5)
    assert stats["video_positions"][0] == positions.tolist()
    assert stats["holitom"]["kept_video_positions"] == [sorted(rule.kept.tolist())] and len(rule.dropped)


@pytest.mark.parametrize("method", ["fastv", "framefusion"])
def test_the_features_the_hooks_add_change_the_output(models, method, monkeypatch):
    """The comparisons above can fail: without the hooks' features the logits are far from the reference's."""
    model, reference = models
    inputs = nm.video_inputs("qwen3_vl", model, ((5, 6, 7),), seed=3)
    if method == "fastv":
        _, ref_logits, _ = fastv_reference(reference, inputs, 1)
        settings = {"fastv_k": 1, "fastv_r": 0.5}
    else:
        _, ref_logits, _ = framefusion_reference(reference, inputs, "merges")
        settings = framefusion_settings("merges")
    features = native._Deepstack.features
    monkeypatch.setattr(native._Deepstack, "features", lambda self, layer, like: features(self, layer, like) * 0)
    with compressed(model, compressor=method, **settings):
        logits = nm.greedy(model, inputs, STEPS)[1]
    assert (logits - ref_logits).abs().max() > 100 * 1e-4


# ---- batches, and nothing kept --------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["dynamic", "static"])
@pytest.mark.parametrize("method", ["fastv", "framefusion"])
def test_a_padded_batch_equals_its_rows(models, method, variant):
    model, _ = models
    batch = nm.video_inputs("qwen3_vl", model, ((5, 6, 7), (8,)), seed=5)
    settings = {"fastv_k": 1, "fastv_r": 0.5} if method == "fastv" else framefusion_settings("merges")
    with compressed(model, compressor=method, **settings):
        tokens, logits = nm.greedy(model, batch, STEPS, **VARIANTS[variant])
        rows = [nm.greedy(model, nm.row(batch, index), STEPS, **VARIANTS[variant]) for index in range(2)]
    for index, (row_tokens, row_logits) in enumerate(rows):
        assert torch.equal(tokens[index : index + 1], row_tokens)
        torch.testing.assert_close(logits[index : index + 1], row_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["fastv", "framefusion"])
def test_the_features_are_gone_before_decoding_and_nothing_stays_on_the_model(models, method, monkeypatch):
    """The features live in the generation's cache for the prefill only: no decoding step can reach them, nothing
    of the generation stays on the model after generate, and no hook after remove_compression."""
    model, _ = models
    inputs = nm.video_inputs("qwen3_vl", model, ((5, 6, 7),), seed=3)
    made, alive_at_decoding = [], []

    class Recorded(native._Deepstack):
        def __init__(self, *args):
            super().__init__(*args)
            made.append(weakref.ref(self))

    def decoding_step(module, args, kwargs):
        if kwargs["input_ids"].shape[1] == 1:
            gc.collect()
            alive_at_decoding.append(any(ref() is not None for ref in made))

    monkeypatch.setattr(native, "_Deepstack", Recorded)
    settings = {"fastv_k": 1, "fastv_r": 0.5} if method == "fastv" else framefusion_settings("merges")
    with compressed(model, compressor=method, **settings):
        hook = model.register_forward_pre_hook(decoding_step, with_kwargs=True)
        try:
            output = model.generate(**inputs, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
                                    pad_token_id=nm.PAD, return_dict_in_generate=True)
        finally:
            hook.remove()
        state = weakref.ref(output.get("cache", output.get("past_key_values")).compression)
        del output
        gc.collect()
        assert state() is None
    assert len(made) == 1 and alive_at_decoding == [False] * (STEPS - 1)
    for module in model.modules():  # no tensor hangs off a module but its parameters, buffers and the stock
        # model's own rope_deltas (transformers' Qwen3VLModel keeps the last prompt's, compressed or not)
        assert not [k for k, v in vars(module).items() if isinstance(v, torch.Tensor) and k != "rope_deltas"]
    assert all(not layer._forward_pre_hooks and not layer._forward_hooks for layer in model.model.language_model.layers)
