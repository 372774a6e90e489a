"""FrameFusion, checked against loop references transcribed from its public code (``thu-nics/FrameFusion`` at commit
fbec1d2e6bd383361c2c87ca13e73f80a8c1a9e9, ``framefusion/main.py``: ``FrameFusion.forward``,
``compute_similarity_and_token_index_by_patch``, ``merge_tokens_and_get_mask``, ``_compute_pruning_ratio``), and
in the models against a reference that keeps the full sequence: the same steps on the full sequence's hidden
states, the tokens that left hidden from the later layers by the mask, every position id unchanged."""

from __future__ import annotations

import functools
import math

import pytest
import torch

import llava.compression.methods  # noqa: F401  (registers every method)
from llava.compression import compressed
from llava.compression.decoding import GenerationInputs
from llava.compression.framefusion import FrameFusion, merge_step, pruning_ratio
from llava.model import compression_mixin
from llava.transformers_compat import output_cache
from tests import native_models as nm
from tests.conftest import random_video
from tests.references import (
    HostReads,
    cache_variants,
    decoder_layers,
    greedy,
    load,
    prompt,
    video_positions,
)

VARIANTS = cache_variants()
STEPS, FRAMES = 6, 8
# (cost, similarity_lower_bound, ratio_lower_bound): merging steps 0, 1 and 2, then pruning at step 3 (on the tiny
# model and these videos); merging capped at layer 0; no merging, pruning at layer 1.
SETTINGS = {"merge-then-prune": (0.5, 0.6, 0.1), "capped": (0.3, 0.0, 0.1), "prune-only": (0.4, 0.95, 0.1)}


# ---- loop references, transcribed from the public code --------------------------------------------------------------


def public_pruning_ratio(sparsity_list, cost, num_layers=28):
    """``FrameFusion._compute_pruning_ratio``, line by line (the public code's default of 28 layers)."""
    s, total = 1, 0
    for sparsity in sparsity_list:
        s *= 1 - sparsity
        total += s
    remain = num_layers * cost - total
    if remain < 0:
        raise ValueError("The cost is too small")
    if remain / ((num_layers - len(sparsity_list)) * s) > 1:
        return 0
    return 1 - remain / ((num_layers - len(sparsity_list)) * s)


def reference_ratio(sparsities, cost, num_layers):
    """The public ratio with the model's layers; 1 (prune what is left) where the public code raises."""
    try:
        return public_pruning_ratio(sparsities, cost, num_layers)
    except ValueError:
        return 1.0


def reference_merge(hidden: torch.Tensor, patch: list[int], cap: float, bound: float):
    """One merging step with loops: (merged flags, hidden states after, share, capped). A token's similarity is its
    cosine (dot / norms, no eps) with the latest earlier token of its patch (-2 without one); below the cap, the
    tokens at or above the bound merge, else the int(cap * n) most similar; a merged token's run collapses into the
    run's first token as the plain mean (``merge_tokens_and_get_mask``: index_add of the members, then / (m + 1))."""
    n = len(patch)
    states = hidden.float()
    previous, last = [None] * n, {}
    for i in range(n):
        previous[i], last[patch[i]] = last.get(patch[i]), i
    similarity = []
    for i in range(n):
        if previous[i] is None:
            similarity.append(-2.0)
        else:
            a, b = states[i], states[previous[i]]
            similarity.append(float((a * b).sum() / (a.norm() * b.norm())))
    above = [i for i in range(n) if similarity[i] >= bound]
    share = len(above) / n
    capped = share >= cap
    chosen = set(sorted(range(n), key=lambda i: -similarity[i])[: int(cap * n)]) if capped else set(above)
    runs: dict[int, list[int]] = {}
    for i in range(n):
        if i in chosen:
            root = previous[i]
            while root in chosen:
                root = previous[root]
            runs.setdefault(root, []).append(i)
    result = hidden.clone()
    for root, members in runs.items():
        total = hidden[root].clone()
        for member in members:
            total = total + hidden[member]
        result[root] = total / (len(members) + 1)
    return [i in chosen for i in range(n)], result, share, capped


class HiddenFrameFusion:
    """FrameFusion's rule on an unmodified eager model (batch 1), with hooks, where the public code runs it
    (``Qwen2DecoderLayer_merge_then_prune_by_cost_forward``): step 0 before layer 0 on the embeddings, step l + 1
    after layer l's attention on the residual stream (layer input + attention output), before its MLP. Steps run on
    the full sequence with the loop references: merging rewrites the runs' first tokens (through the attention
    output, so that the residual holds the mean), pruning ranks by that layer's eager attention of the last prompt
    token, averaged over heads. A token that left at step l is hidden by the mask from layer l on, in the prefill and
    in every decoding step. Records what each step did."""

    def __init__(self, model, positions: list[int], per_frame: int, cost: float, bound: float, lower: float):
        self.video, self.patch = positions, {p: k % per_frame for k, p in enumerate(positions)}
        self.cost, self.bound, self.lower = cost, bound, lower
        layers = decoder_layers(model)
        self.num_layers = len(layers)
        self.sparsities, self.merging_done, self.pruning_done = [], False, False
        self.removed: list[int] = []
        self.hidden_at: dict[int, list[int]] = {}
        self.layer_input = None
        self.merge_layers, self.prune_layer, self.per_layer = [], None, []
        self.handles = []
        for index, layer in enumerate(layers):
            before = functools.partial(self.before, index)
            self.handles.append(layer.register_forward_pre_hook(before, with_kwargs=True))
            self.handles.append(layer.self_attn.register_forward_hook(functools.partial(self.after_attention, index)))

    def remove(self):
        for handle in self.handles:
            handle.remove()

    def before(self, index, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] > 1:
            if index == 0:
                hidden = self.merge(0, hidden)
            self.layer_input = hidden
            self.hidden_at[index] = list(self.removed)
            self.per_layer.append(len(self.video) - len(self.removed))
        mask = kwargs["attention_mask"]
        if self.hidden_at[index]:
            hidden_keys = torch.tensor(self.hidden_at[index])
            kwargs["attention_mask"] = mask.index_fill(-1, hidden_keys, torch.finfo(mask.dtype).min)
        if args:
            args = (hidden, *args[1:])
        else:
            kwargs["hidden_states"] = hidden
        return args, kwargs

    def after_attention(self, index, module, args, output):
        attention_output, weights = output[0], output[1]
        if weights.shape[2] == 1 or self.pruning_done or index == self.num_layers - 1:
            return None
        if self.merging_done:
            self.prune(index + 1, weights[0].mean(dim=0)[-1])
            return None
        residual = self.layer_input + attention_output
        merged = self.merge(index + 1, residual)
        changed = (merged != residual).any(dim=-1)
        attention_output = attention_output.clone()
        attention_output[changed] = merged[changed] - self.layer_input[changed]  # the residual now holds the mean
        return (attention_output, *output[1:])

    def prune(self, step, attention):
        alive = [p for p in self.video if p not in self.removed]
        ratio = reference_ratio(self.sparsities, self.cost, self.num_layers)
        kept = sorted(alive, key=lambda p: -float(attention[p]))[: round(len(alive) * (1 - ratio))]
        self.removed += [p for p in alive if p not in kept]
        self.pruning_done, self.prune_layer = True, step

    def merge(self, step, hidden):
        alive = [p for p in self.video if p not in self.removed]
        ratio = reference_ratio(self.sparsities, self.cost, self.num_layers)
        patches = [self.patch[p] for p in alive]
        merged, states, share, capped = reference_merge(hidden[0, alive], patches, ratio, self.bound)
        hidden = hidden.clone()
        hidden[0, alive] = states
        self.removed += [p for p, gone in zip(alive, merged) if gone]
        self.merge_layers.append(step)
        if capped:
            self.merging_done = self.pruning_done = True
        else:
            self.sparsities.append(share)
            self.merging_done = share < self.lower
        return hidden


# ---- the rule on known-answer hidden states -------------------------------------------------------------------------


def frames_of(base: torch.Tensor, noise: torch.Tensor, scales: list[float]) -> tuple[torch.Tensor, list[int]]:
    """Frames f = 0..F-1 of P patches: base (P, D) + scales[f] * noise[f] (F, P, D), flattened in time order."""
    frames = torch.stack([base + scale * noise[f] for f, scale in enumerate(scales)])
    return frames.flatten(0, 1), list(range(base.shape[0])) * len(scales)


def test_the_published_pruning_ratio():
    assert pruning_ratio([], 0.3, 28) == pytest.approx(1 - 28 * 0.3 / 28)  # no merging yet: 1 - cost
    for sparsities in ([], [0.2], [0.4, 0.15], [0.3, 0.3, 0.05]):
        for cost in (0.2, 0.3, 0.5, 1.0):
            assert pruning_ratio(sparsities, cost, 28) == pytest.approx(public_pruning_ratio(sparsities, cost))
    # 4 layers, cost 0.3: two merging steps spent more than 4 * 0.3 token-layers; the public code raises, here all go
    with pytest.raises(ValueError, match="cost is too small"):
        public_pruning_ratio([0.3, 0.05], 0.3, 4)
    assert pruning_ratio([0.3, 0.05], 0.3, 4) == 1.0


def test_identical_patches_merge_into_their_first_frame_as_the_mean():
    """Known answer: patch 0 is the same vector in the 4 frames (similarity 1), the other patches are unrelated
    random vectors: patch 0 of frames 1..3 merges into frame 0, which holds the mean of the four."""
    torch.manual_seed(0)
    hidden = torch.randn(4, 5, 16)
    hidden[:, 0] = torch.randn(16)
    hidden[:, 0] *= torch.tensor([1.0, 2.0, 0.5, 3.0])[:, None]  # cosine 1 whatever the norm
    flat, patch = hidden.flatten(0, 1), list(range(5)) * 4
    result = merge_step(flat, torch.tensor(patch), cap=0.7, similarity_lower_bound=0.99)
    assert result.merged.nonzero().flatten().tolist() == [5, 10, 15]
    assert result.share == 3 / 20 and not result.capped
    torch.testing.assert_close(result.hidden[0], hidden[:, 0].mean(dim=0))
    torch.testing.assert_close(result.hidden[1:], flat[1:])  # everything else unchanged


@pytest.mark.parametrize("cap", [0.1, 0.35, 0.7])
@pytest.mark.parametrize("bound", [-1.0, 0.3, 0.6, 0.9])
def test_a_merging_step_equals_the_loop_reference(cap, bound):
    """Frames drifting away from a shared base by growing noise: every similarity is distinct, runs of merged
    tokens of several lengths; the capped branch (share >= cap) and the uncapped one both occur."""
    generator = torch.Generator().manual_seed(7)
    base, noise = torch.randn(6, 12, generator=generator), torch.randn(5, 6, 12, generator=generator)
    flat, patch = frames_of(base, noise, [0.3, 0.5, 1.2, 0.4, 2.0])
    result = merge_step(flat, torch.tensor(patch), cap, bound)
    merged, hidden, share, capped = reference_merge(flat, patch, cap, bound)
    assert result.merged.tolist() == merged
    assert result.share == share and result.capped == capped
    torch.testing.assert_close(result.hidden, hidden, rtol=1e-6, atol=1e-6)
    if capped:
        assert sum(merged) == int(cap * len(patch))


def test_merging_follows_the_latest_present_token_of_the_patch():
    """A second step compares a token with the latest token of its patch still present, the frame before it when
    that one merged away; the loop reference on the surviving tokens gives the same answer."""
    generator = torch.Generator().manual_seed(3)
    base, noise = torch.randn(4, 10, generator=generator), torch.randn(6, 4, 10, generator=generator)
    flat, patch = frames_of(base, noise, [0.2, 0.25, 1.5, 0.3, 0.35, 1.0])
    first = merge_step(flat, torch.tensor(patch), 0.9, 0.8)
    alive = (~first.merged).nonzero().flatten()
    states, patches = first.hidden[alive], [patch[i] for i in alive.tolist()]
    second = merge_step(states, torch.tensor(patches), 0.9, 0.3)
    merged, hidden, share, capped = reference_merge(states, patches, 0.9, 0.3)
    assert any(first.merged.tolist()) and any(merged)
    assert second.merged.tolist() == merged and second.share == share and second.capped == capped
    torch.testing.assert_close(second.hidden, hidden, rtol=1e-6, atol=1e-6)


# ---- in the LLaVA model ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tiny_checkpoint):
    tokenizer, model = load(tiny_checkpoint, compressor="framefusion")
    _, reference = load(tiny_checkpoint, "eager")
    return tokenizer, model, reference


def per_frame(model) -> int:
    tower = model.get_vision_tower()
    return math.ceil(tower.image_size // tower.config.patch_size / 2) ** 2


def configure(model, setting: str):
    cost, bound, lower = SETTINGS[setting]
    model.configure_compression(compressor="framefusion", framefusion_cost=cost,
                                framefusion_similarity_lower_bound=bound, framefusion_ratio_lower_bound=lower)


def reference_run(reference, tokenizer, ids, video, setting: str, tokens_per_frame: int):
    positions = video_positions(reference, ids, video).tolist()
    rule = HiddenFrameFusion(reference, positions, tokens_per_frame, *SETTINGS[setting])
    try:
        tokens, logits = greedy(reference, tokenizer, ids, [video], STEPS)
    finally:
        rule.remove()
    return tokens, logits, rule


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_the_full_sequence_reference(models, setting, variant):
    tokenizer, model, reference = models
    ids, video = prompt(tokenizer), random_video(FRAMES, model.get_vision_tower().image_size, seed=3)
    ref_tokens, ref_logits, rule = reference_run(reference, tokenizer, ids, video, setting, per_frame(model))
    configure(model, setting)
    tokens, logits = greedy(model, tokenizer, ids, [video], STEPS, **VARIANTS[variant])
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    stats = model.last_compression_stats["framefusion"]
    assert stats["merge_layers"] == [rule.merge_layers] and stats["prune_layer"] == [rule.prune_layer]
    assert stats["sparsities"][0] == pytest.approx(rule.sparsities)
    assert stats["video_tokens_per_layer"] == [rule.per_layer]
    assert stats["image_tokens"] == [FRAMES * per_frame(model)]
    assert stats["kept_image_tokens"] == [rule.per_layer[-1]] and 0 < rule.per_layer[-1] < FRAMES * per_frame(model)
    assert stats["decode_steps"] == STEPS - 1
    expected = {"merge-then-prune": ([0, 1, 2], 3), "capped": ([0], None), "prune-only": ([0], 1)}[setting]
    assert (rule.merge_layers, rule.prune_layer) == expected  # each setting runs the steps it is named after


def test_a_static_cache_allocates_each_layer_at_the_length_it_holds(models):
    """A layer that runs the prefill on a shorter layout holds that layout's slots and the decoded tokens: its static
    buffers are that long (the reference checks above run with them)."""
    tokenizer, model, _ = models
    ids, video = prompt(tokenizer), random_video(FRAMES, model.get_vision_tower().image_size, seed=3)
    configure(model, "merge-then-prune")
    output = model.generate(ids, images=[video], modalities=["video"], do_sample=False, max_new_tokens=STEPS,
                            min_new_tokens=STEPS, pad_token_id=tokenizer.pad_token_id, return_dict_in_generate=True,
                            cache_implementation="static")
    widths = model.last_compression_stats["framefusion"]["layer_widths"]
    assert len(set(widths)) > 2  # the prompt's own length, then shorter ones
    assert [layer.keys.shape[-2] for layer in output_cache(output).layers] == [width + STEPS for width in widths]


def test_grid_newlines_are_not_video_tokens(tiny_video_checkpoint):
    """LLaVA-Video's layout: a newline after every row of every frame, so a frame's tokens are not contiguous; the
    newlines are never merged or pruned, and the result is the reference's on the same video tokens."""
    tokenizer, model = load(tiny_video_checkpoint, compressor="framefusion")
    _, reference = load(tiny_video_checkpoint, "eager")
    ids, video = prompt(tokenizer), random_video(FRAMES, model.get_vision_tower().image_size, seed=4)
    tower = model.get_vision_tower()
    tokens_per_frame = (tower.image_size // tower.config.patch_size // 2) ** 2  # average pooling: floor
    ref_tokens, ref_logits, rule = reference_run(reference, tokenizer, ids, video, "merge-then-prune", tokens_per_frame)
    configure(model, "merge-then-prune")
    tokens, logits = greedy(model, tokenizer, ids, [video], STEPS)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    stats = model.last_compression_stats["framefusion"]
    assert stats["image_tokens"] == [len(rule.video)] == [FRAMES * tokens_per_frame]
    assert stats["video_tokens_per_layer"] == [rule.per_layer] and rule.per_layer[-1] < len(rule.video)
    assert rule.video[-1] - rule.video[0] + 1 > len(rule.video)  # the newlines sit between them


def test_a_prompt_without_video_runs_the_stock_model(models):
    tokenizer, model, reference = models
    model.configure_compression(compressor="framefusion")
    ids = tokenizer("Hello there, how are you?", return_tensors="pt").input_ids
    outputs = []
    for m in (model, reference):
        output = m.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id, output_logits=True, return_dict_in_generate=True)
        outputs.append(torch.stack(output.logits, 1))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
    assert model.last_compression_stats["framefusion"]["image_tokens"] == []


def padded_batch(tokenizer, size):
    questions = ["What is moving?", "Describe every frame of the video in detail."]
    ids = [prompt(tokenizer, q) for q in questions]
    videos = [random_video(FRAMES, size, seed=5), random_video(5, size, seed=6)]
    width = max(i.shape[1] for i in ids)
    padded = torch.full((2, width), tokenizer.pad_token_id)
    mask = torch.zeros((2, width), dtype=torch.long)
    for row, i in enumerate(ids):
        padded[row, width - i.shape[1]:], mask[row, width - i.shape[1]:] = i[0], 1
    return ids, videos, padded, mask


@pytest.mark.parametrize("setting", ["merge-then-prune", "prune-only"])
def test_a_padded_batch_equals_its_rows_alone(models, setting):
    tokenizer, model, _ = models
    configure(model, setting)
    ids, videos, padded, mask = padded_batch(tokenizer, model.get_vision_tower().image_size)
    for variant in ("dynamic", "static"):
        alone = [greedy(model, tokenizer, i, [v], 5, **VARIANTS[variant]) for i, v in zip(ids, videos)]
        rows = [model.last_compression_stats["framefusion"]]
        tokens, logits = greedy(model, tokenizer, padded, videos, 5, attention_mask=mask, **VARIANTS[variant])
        for row, (row_tokens, row_logits) in enumerate(alone):
            assert torch.equal(tokens[row, -5:], row_tokens[0, -5:])
            torch.testing.assert_close(logits[row], row_logits[0], rtol=1e-4, atol=1e-4)
        stats = model.last_compression_stats["framefusion"]
        assert stats["image_tokens"] == [FRAMES * per_frame(model), 5 * per_frame(model)]
        assert stats["kept_image_tokens"][1] == rows[0]["kept_image_tokens"][0]  # the last row alone


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_a_decoding_step_reads_the_host_as_often_as_the_baseline(models, cache):
    tokenizer, model, _ = models
    ids, video = prompt(tokenizer), random_video(FRAMES, model.get_vision_tower().image_size, seed=3)
    counts = {}
    for compressor in ("none", "framefusion"):
        model.configure_compression(compressor=compressor)
        with HostReads(model, decoding_only=True) as reads:
            greedy(model, tokenizer, ids, [video], 6, **VARIANTS[cache])
        counts[compressor] = reads.count
    stats = model.last_compression_stats["framefusion"]
    assert reads.forwards == 5 and stats["kept_image_tokens"][0] < stats["image_tokens"][0]
    assert counts["framefusion"] == counts["none"]


def test_a_dynamic_cache_grows_past_the_planned_length(models, monkeypatch):
    """Each layer's decoding mask is planned for the token budget; decoding past it (a budget that undercounts)
    grows the masks and gives the same tokens (a padded batch: the masks are read at every step)."""
    tokenizer, model, _ = models
    configure(model, "merge-then-prune")
    _, videos, padded, mask = padded_batch(tokenizer, model.get_vision_tower().image_size)
    expected_tokens, expected_logits = greedy(model, tokenizer, padded, videos, 12, attention_mask=mask)
    monkeypatch.setattr(compression_mixin, "new_token_budget", lambda *args: 1)  # plan 1 token, decode 12
    tokens, logits = greedy(model, tokenizer, padded, videos, 12, attention_mask=mask)
    assert tokens.shape[0] == 2 and torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)


# ---- settings and inputs it refuses ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("argument", "value"), [
    ("cost", 0.0), ("cost", 1.5), ("cost", "high"), ("similarity_lower_bound", 1.2), ("similarity_lower_bound", -3),
    ("ratio_lower_bound", -0.1), ("ratio_lower_bound", 2.0),
])
def test_bad_settings_raise_naming_the_argument(models, argument, value):
    with pytest.raises(ValueError, match=f"framefusion_{argument}"):
        FrameFusion(**{argument: value})
    _, model, _ = models
    model.configure_compression(compressor="framefusion")
    before = model.compression
    with pytest.raises(ValueError, match=f"framefusion_{argument}"):
        model.configure_compression(compressor="framefusion", **{f"framefusion_{argument}": value})
    assert model.compression == before


def generation_inputs(prunable: torch.Tensor, tokens_per_frame):
    return GenerationInputs(prunable=prunable, attention_mask=torch.ones_like(prunable), decoded_capacity=4,
                            static_cache=False, num_layers=4, attn_implementation="sdpa", dtype=torch.float32,
                            tokens_per_frame=tokens_per_frame)


def test_inputs_without_whole_frames_raise_naming_the_method():
    prunable = torch.zeros(1, 20, dtype=torch.bool)
    prunable[0, 2:14] = True
    with pytest.raises(ValueError, match="framefusion"):
        FrameFusion().new_state(generation_inputs(prunable, None))
    with pytest.raises(ValueError, match="framefusion: row 0 has 12 video tokens, not whole frames of 5"):
        FrameFusion().new_state(generation_inputs(prunable, 5))
    assert FrameFusion().new_state(generation_inputs(prunable, 4)) is not None
    assert FrameFusion().new_state(generation_inputs(torch.zeros(1, 20, dtype=torch.bool), 4)) is None


# ---- on transformers' own video LLMs --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
def test_on_transformers_models_a_padded_batch_equals_its_rows(family):
    """M-RoPE (Qwen2-VL) and 1-D positions (LLaVA-OneVision): each row of a padded batch as alone, the video
    compressed, nothing left on the model after."""
    model = nm.MODELS[family]()
    inputs = nm.video_inputs(family, model, ((5, 6, 7), (8, 9, 10, 11, 12, 13)))
    with compressed(model, compressor="framefusion", framefusion_cost=0.5) as handle:
        tokens, logits = nm.greedy(model, inputs, 3)
        stats = handle.last_stats["framefusion"]
        for row in range(2):
            row_tokens, row_logits = nm.greedy(model, nm.row(inputs, row), 3)
            assert torch.equal(tokens[row], row_tokens[0])
            torch.testing.assert_close(logits[row], row_logits[0], rtol=1e-4, atol=1e-4)
    assert all(kept < n for kept, n in zip(stats["kept_image_tokens"], stats["image_tokens"]))
    layers = model.model.language_model.layers
    assert all(not layer._forward_pre_hooks and not layer._forward_hooks for layer in layers)


# The masked full-sequence reference on each transformers model class (with the dynamic and static caches and compiled
# decoding): tests/test_native_in_llm_references.py; with several deepstack layers on Qwen3-VL:
# tests/test_qwen3_vl_deepstack.py.
