"""The in-LLM stages of FlashVID, HoliTom, PruneVid and FrameFusion on transformers' own video LLMs (LLaVA-OneVision,
Qwen2-VL, Qwen2.5-VL, Qwen3-VL through ``llava.compression.native.apply_compression``), against masked references that
keep the full sequence, with the dynamic cache, the static cache and compiled decoding.

The reference is the same model class with eager attention and the SAME pre-LLM stage (the method applied with its
in-LLM stage off), plus hooks that apply the in-LLM rule to the full sequence that the first stage leaves: the video
tokens it drops are hidden by the attention mask from the layers that no longer see them (position ids unchanged),
and HoliTom's merge rewrites the kept tokens' hidden states. The compressed model runs layers >= K on a compact
sequence with the kept tokens' original (M-RoPE on the Qwen models) positions; hiding a key by the mask while every
position id stays is the same computation, so equal tokens and logits over the prefill and the decoding steps check
the selection, the merge, the positions and the cache bookkeeping together.

Rules (each reference class cites its public code):
- FlashVID: ``fastv_prune`` (Fanziyang-v/FlashVID, ``flashvid/utils.py``): ``HiddenFastV`` with ``ceil``;
- HoliTom: ``Qwen2Model_holitom.forward`` (cokeshao/HoliTom at e9b2972f6895c9e7d7fe74eb8c3a2ecaab8056e0,
  ``holitom/modeling_qwen2.py``): ``MergedHoliTom``;
- PruneVid: ``VTPWindowCache.process_attention`` / ``obtain_language_attention`` / ``prompt_prefill``
  (Visual-AI/PruneVid at b12600c6176c606ee4b6b7d9e26f4aa46d0dfd42, ``models/pllava/elastic_cache.py``) with
  ``LlamaAttention.forward``'s ``attn_weights_wo_pos`` (``models/pllava/llama.py``): ``HiddenPruneVid``
  (tests/test_prunevid.py), whose quota groups (a segment's static tokens; each frame's dynamic tokens) come from ``merge_frames_dynamic``
  (``models/pllava/modeling_pllava.py``, its loop transcription in tests/test_prunevid.py) on the video features
  the model computed;
- FrameFusion: ``FrameFusion.forward`` and the steps it calls (thu-nics/FrameFusion at
  fbec1d2e6bd383361c2c87ca13e73f80a8c1a9e9, ``framefusion/main.py``): ``HiddenFrameFusion`` (tests/test_framefusion.py).
  It has no pre-LLM stage: its reference is the stock eager model with that class's hooks, which merge (averaging the
  runs' first tokens' hidden states) and prune on the full sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

import llava.compression.methods  # noqa: F401  (registers every method)
from llava.compression import compressed
from llava.compression import fastv as fastv_module
from tests import native_models as nm
from tests.references import HiddenFastV, cache_variants
from tests.test_framefusion import HiddenFrameFusion
from tests.test_holitom import MergedHoliTom
from tests.test_prunevid import (
    HiddenPruneVid,
    public_merge_frames_dynamic,
)

FAMILIES = list(nm.MODELS)
VARIANTS = cache_variants()
STEPS = 4
# K, the first layer without the dropped tokens: past the tiny Qwen3-VL's deepstack layer (one); the stages that drop
# inside the deepstack layers are checked in tests/test_qwen3_vl_deepstack.py.
LAYER = 2


@dataclass(frozen=True)
class Method:
    """A method's settings on the tiny models: the pre-LLM stage (shared by model and reference), and the argument
    values that turn its in-LLM stage on (the model) and off (the reference, whose hooks do that stage)."""

    stage1: dict
    on: dict
    off: dict
    stats_key: str


# FlashVID's retention 0.4: ceil(n * 0.4) (fastv_prune) differs from FastV's round on these models' n (8 and 16).
PRUNEVID_ALPHA, HOLITOM_LLM_R, FLASHVID_LLM_RETENTION = 0.7, 0.5, 0.4
# PruneVid's static threshold per model: both static and moving groups occur on these tiny models' features, so that
# the per-group quotas keep another count than int(n * alpha) of the whole video (asserted below).
PRUNEVID_TAU = {"qwen2_vl": 0.0, "qwen2_5_vl": 0.0, "qwen3_vl": 0.0, "llava_onevision": 0.3}
PRUNEVID_STAGE1 = {"prunevid_temporal_segment_ratio": 0.5, "prunevid_cluster_ratio": 0.5}
METHODS = {
    "flashvid": Method(
        {"compressor": "flashvid", "flashvid_retention_ratio": 0.5, "flashvid_expansion": 1.0,
         "flashvid_min_segment_num": 2, "flashvid_pruning_layer": LAYER},
        {"flashvid_llm_retention_ratio": FLASHVID_LLM_RETENTION}, {"flashvid_llm_retention_ratio": 1.0},
        "flashvid_llm"),
    "holitom": Method(
        {"compressor": "holitom", "holitom_r": 0.5, "holitom_t": 0.3, "holitom_k": LAYER},
        {"holitom_llm_r": HOLITOM_LLM_R}, {"holitom_llm_r": 0}, "holitom"),
    "prunevid": Method(
        {"compressor": "prunevid", **PRUNEVID_STAGE1, "prunevid_layer": LAYER - 1},  # ranks at layer K - 1
        {"prunevid_alpha": PRUNEVID_ALPHA}, {"prunevid_alpha": 1.0}, "prunevid"),
}


def settings(method: str, family: str, stage: str) -> dict:
    spec = METHODS[method]
    extra = {"prunevid_tau": PRUNEVID_TAU[family]} if method == "prunevid" else {}
    return {**spec.stage1, **extra, **getattr(spec, stage)}


# ---- PruneVid's reference: per-group quotas ----------------------------------------------------------------------


def quota_groups(sizes: list[tuple[int, int, int]]) -> list[int]:
    """The quota group of each first-stage token, in output order, from the public (static_size, dynamic tokens per
    frame, window_size) of each segment (``public_merge_frames_dynamic(..., sizes=)``): ``process_attention`` gives a
    segment's static tokens one quota, then each of its frames' dynamic tokens one."""
    groups, number = [], 0
    for static, dynamic, window in sizes:
        for size in [static] + [dynamic] * window:
            groups += [number] * size
            number += 1
    return groups


def video_columns(family: str, inputs: dict) -> torch.Tensor:
    """Prompt columns of the video's frame tokens, frame after frame (LLaVA-OneVision's trailing newline left out)."""
    columns = (inputs["input_ids"][0] == nm.VIDEO).nonzero().flatten()
    return columns[:-1] if family == "llava_onevision" else columns


def video_features(model, family: str, inputs: dict) -> torch.Tensor:
    """(frames, tokens per frame, hidden): the video features entering the language model (no compression)."""
    seen = {}
    handle = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    features = seen["embeds"][0, video_columns(family, inputs)]
    if family == "llava_onevision":
        frames = inputs["pixel_values_videos"].shape[1]
    else:
        frames = int(inputs["video_grid_thw"][0, 0])  # temporal steps
    return features.reshape(frames, -1, features.shape[-1])


def prunevid_groups(features, family, inputs, first_stage: dict, positions: torch.Tensor) -> torch.Tensor:
    """The quota group of each of ``positions`` (the compact positions of the video tokens the first stage kept):
    the public first stage on the video's ``features``, its (frame, spot) tokens mapped to prompt columns, then to
    the compact positions the reference's own first stage put them at."""
    tau = PRUNEVID_TAU[family]
    ratios = PRUNEVID_STAGE1["prunevid_temporal_segment_ratio"], PRUNEVID_STAGE1["prunevid_cluster_ratio"]
    sizes = []
    public = public_merge_frames_dynamic(features, tau, *ratios, sizes=sizes)
    columns = video_columns(family, inputs)
    group_of = {int(columns[frame * features.shape[1] + spot]): group
                for (frame, spot, _), group in zip(public, quota_groups(sizes), strict=True)}
    compact = dict(zip(first_stage["video_positions"][0], first_stage["kept_video_columns"][0], strict=True))
    assert sorted(group_of) == sorted(compact.values())  # the model's first stage kept the public code's tokens
    return torch.tensor([group_of[compact[int(p)]] for p in positions])


# ---- running model and reference ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models():
    """Per model class: (the model with sdpa, the same weights with eager attention: the reference), made lazily."""
    made = {}

    def get(family):
        if family not in made:
            made[family] = nm.MODELS[family](), nm.MODELS[family]("eager")
        return made[family]

    return get


def hooked(method: str, family: str, reference, inputs, first_stage: dict, features):
    """The in-LLM rule of ``method`` hooked on ``reference`` (which runs the method's first stage only)."""
    positions = torch.tensor(first_stage["video_positions"][0])
    if method == "flashvid":
        return HiddenFastV(reference, positions, LAYER, 1 - FLASHVID_LLM_RETENTION, rounding=math.ceil)
    if method == "holitom":
        return MergedHoliTom(reference, positions, LAYER, HOLITOM_LLM_R)
    groups = prunevid_groups(features, family, inputs, first_stage, positions)
    return HiddenPruneVid(reference, positions, LAYER - 1, PRUNEVID_ALPHA, groups=groups)


@pytest.fixture(scope="module")
def references(models):
    """Per (model class, method): the reference's tokens and logits, its first stage's statistics, the rule that
    ran (its kept set), and the logits without the in-LLM rule (first stage only)."""
    done = {}

    def get(family, method):
        if (family, method) not in done:
            _, reference = models(family)
            inputs = nm.video_inputs(family, reference, ((5, 6, 7),))
            features = video_features(reference, family, inputs)  # before the hooks compact the prompt
            with compressed(reference, **settings(method, family, "off")) as handle:
                _, first_stage_only = nm.greedy(reference, inputs, STEPS)
                first_stage = handle.last_stats
                rule = hooked(method, family, reference, inputs, first_stage, features)
                try:
                    tokens, logits = nm.greedy(reference, inputs, STEPS)
                finally:
                    rule.remove()
            done[family, method] = inputs, tokens, logits, first_stage, rule, first_stage_only
        return done[family, method]

    return get


def kept_positions(method: str, rule) -> list[int]:
    if method == "prunevid":
        return rule.kept
    return sorted(set(rule.positions.tolist()) - set(rule.dropped.tolist()))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_the_in_llm_stage_matches_the_masked_reference(models, references, family, method, variant):
    inputs, ref_tokens, ref_logits, first_stage, rule, first_stage_only = references(family, method)
    model, _ = models(family)
    if "compile_config" in VARIANTS[variant]:
        # compiled from scratch: torch.compile's per-code-object cache (8 entries) is shared by every model here,
        # and this module compiles 12 (model class, method) pairs
        torch._dynamo.reset()
    with compressed(model, **settings(method, family, "on")) as handle:
        tokens, logits = nm.greedy(model, inputs, STEPS, **VARIANTS[variant])
        stats = handle.last_stats
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=3e-5)
    # the same first stage, which compressed the video; then the in-LLM stage kept the reference's tokens
    assert stats["kept_video_columns"] == first_stage["kept_video_columns"]
    assert stats["video_tokens_after"] == first_stage["video_tokens_after"] < first_stage["video_tokens_before"]
    n = len(rule.positions)
    expected = {"flashvid": math.ceil(n * FLASHVID_LLM_RETENTION), "holitom": round(n * (1 - HOLITOM_LLM_R)),
                "prunevid": len(kept_positions(method, rule))}[method]
    in_llm = stats[METHODS[method].stats_key]
    assert in_llm["pruned"] and in_llm["kept_image_tokens"] == [expected] and 0 < expected < n
    if method == "flashvid":
        assert expected != round(n * FLASHVID_LLM_RETENTION)  # the settings tell ceil from round
    assert in_llm["kept_video_positions"] == [kept_positions(method, rule)]
    assert in_llm["decode_steps"] == STEPS - 1
    assert not torch.allclose(logits, first_stage_only, rtol=1e-3, atol=1e-3)  # the in-LLM stage changed the output


@pytest.mark.parametrize("family", FAMILIES)
def test_prunevid_keeps_a_share_of_each_group_not_of_the_whole_video(references, family):
    """The settings tell the public per-group quotas apart from int(n * alpha) of the whole video, and the reference
    kept exactly each group's quota."""
    _, _, _, _, rule, _ = references(family, "prunevid")
    sizes = torch.bincount(rule.groups)
    quotas = [int(int(size) * PRUNEVID_ALPHA) for size in sizes if size]
    assert sum(quotas) == len(rule.kept) != int(len(rule.positions) * PRUNEVID_ALPHA)
    kept_groups = rule.groups[torch.isin(rule.positions, torch.tensor(rule.kept))]
    assert [int(c) for c in torch.bincount(kept_groups, minlength=len(sizes))[sizes > 0]] == quotas


@pytest.mark.parametrize("family", FAMILIES)
def test_holitom_merging_is_not_dropping(models, references, family):
    """The same kept set without the merge (only hidden) gives other logits: the reference's merge is checked."""
    inputs, _, ref_logits, _, _, _ = references(family, "holitom")
    _, reference = models(family)
    with compressed(reference, **settings("holitom", family, "off")) as handle:
        nm.greedy(reference, inputs, 1)
        rule = MergedHoliTom(reference, torch.tensor(handle.last_stats["video_positions"][0]), LAYER, HOLITOM_LLM_R)
        rule.handles.pop(1).remove()  # the merge hook
        try:
            _, dropped = nm.greedy(reference, inputs, STEPS)
        finally:
            rule.remove()
    assert not torch.allclose(dropped, ref_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_the_reference_sees_the_positions_of_the_kept_tokens(models, references, family, monkeypatch):
    """The oracle is sensitive to positions: layers >= K run with the kept tokens renumbered 0..W-1 instead of their
    original M-RoPE positions, the prefill's logits no longer match the masked reference."""
    inputs, _, ref_logits, _, _, _ = references(family, "flashvid")
    model, _ = models(family)
    original = fastv_module._gather_positions
    monkeypatch.setattr(fastv_module, "_gather_positions",
                        lambda table, index: original(table, torch.arange(index.shape[1]).expand_as(index)))
    with compressed(model, **settings("flashvid", family, "on")):
        _, logits = nm.greedy(model, inputs, 1)
    assert not torch.allclose(logits[:, 0], ref_logits[:, 0], rtol=1e-3, atol=1e-3)


# ---- FrameFusion: no pre-LLM stage, the stock model with HiddenFrameFusion's hooks ---------------------------------

# Per model class: (input seed, (framefusion_cost, framefusion_similarity_lower_bound, framefusion_ratio_lower_bound)).
# On these 4-layer models and videos the steps merge tokens before layer 0 and after layer 0's attention (the compact
# sequence), then prune some after layer 1's (Qwen2-VL, Qwen3-VL) or layer 2's attention (Qwen2.5-VL, which merges
# there too, and LLaVA-OneVision, whose merging step there merges none): asserted below.
FRAMEFUSION = {
    "qwen2_vl": (1, (0.5, 0.3, 0.1)),
    "qwen2_5_vl": (3, (0.5, 0.1, 0.15)),
    "qwen3_vl": (1, (0.4, 0.05, 0.3)),
    "llava_onevision": (1, (0.3, 0.4, 0.1)),
}


def framefusion_settings(family: str) -> dict:
    names = ("framefusion_cost", "framefusion_similarity_lower_bound", "framefusion_ratio_lower_bound")
    return {"compressor": "framefusion", **dict(zip(names, FRAMEFUSION[family][1], strict=True))}


def tokens_per_frame(family: str, model) -> int:
    if family == "llava_onevision":  # bilinear pooling to ceil(side / 2) per side
        vision = model.config.vision_config
        return math.ceil(vision.image_size // vision.patch_size / 2) ** 2
    return (16 // nm.PATCH) ** 2 // nm.MERGE**2  # one temporal step of nm.video_inputs' 16x16 frames


@pytest.fixture(scope="module")
def framefusion_references(models):
    """Per model class: the inputs, the reference's tokens and logits, and its rule (what each step did)."""
    done = {}

    def get(family):
        if family not in done:
            _, reference = models(family)
            seed, steps = FRAMEFUSION[family]
            inputs = nm.video_inputs(family, reference, ((5, 6, 7),), seed=seed)
            positions = video_columns(family, inputs).tolist()
            rule = HiddenFrameFusion(reference, positions, tokens_per_frame(family, reference), *steps)
            try:
                tokens, logits = nm.greedy(reference, inputs, STEPS)
            finally:
                rule.remove()
            done[family] = inputs, tokens, logits, rule
        return done[family]

    return get


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_framefusion_matches_the_masked_reference(models, framefusion_references, family, variant):
    """Equal tokens and logits, and the same steps as the reference: the layers they ran after, each merging step's
    share, the video tokens each layer saw. Both a merge (before layer 0 and after layer 0's attention, on the compact
    sequence) and a prune happen. Qwen3-VL with several deepstack layers: tests/test_qwen3_vl_deepstack.py."""
    inputs, ref_tokens, ref_logits, rule = framefusion_references(family)
    model, _ = models(family)
    if "compile_config" in VARIANTS[variant]:
        torch._dynamo.reset()  # as in test_the_in_llm_stage_matches_the_masked_reference
    with compressed(model, **framefusion_settings(family)) as handle:
        tokens, logits = nm.greedy(model, inputs, STEPS, **VARIANTS[variant])
        stats = handle.last_stats["framefusion"]
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=3e-5)
    assert stats["merge_layers"] == [rule.merge_layers] and stats["prune_layer"] == [rule.prune_layer]
    assert stats["sparsities"][0] == pytest.approx(rule.sparsities)
    assert stats["video_tokens_per_layer"] == [rule.per_layer]
    n, seen, prune = len(rule.video), rule.per_layer, rule.prune_layer
    assert stats["image_tokens"] == [n] and stats["kept_image_tokens"] == [seen[-1]]
    assert n > seen[0] > seen[1] and 1 in rule.merge_layers  # merges before layer 0 and after its attention
    assert prune is not None and prune > max(rule.merge_layers)  # then a pruning step
    # step 0 acts on layer 0's input, step l + 1 on layer l + 1's: what left before the pruning step merged
    assert stats["merged"] == [n - seen[prune - 1]] and stats["pruned"] == [seen[prune - 1] - seen[prune]]
    assert seen[prune - 1] > seen[prune] > 0
    assert stats["decode_steps"] == STEPS - 1
