"""PruneVid (llava/compression/prunevid.py) against the public code, Visual-AI/PruneVid at commit
b12600c6176c606ee4b6b7d9e26f4aa46d0dfd42, ``models/pllava/modeling_pllava.py`` (``cluster_dpc_knn``,
``refine_clusters``, ``segment_lengths``, ``compute_cluster_vectors``, ``PllavaForConditionalGeneration.
merge_frames_dynamic``) and ``models/pllava/llama.py`` / ``elastic_cache.py`` (``LlamaAttention.forward``'s
``attn_weights_wo_pos``, ``LlamaModelVTP.forward``, ``VTPWindowCache.obtain_language_attention`` /
``process_attention`` / ``prompt_prefill``): the first stage equals a loop transcription of that code, the second
the public rule applied with hooks on an eager model that hides the dropped tokens with the attention mask."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import llava.compression.prunevid  # noqa: F401  (registers the method before test_every_method collects)
from llava.compression.prunevid import (
    PruneVid,
    PruneVidLLM,
    dpc_knn,
    prunevid_segments,
    refine_clusters,
)
from llava.transformers_compat import output_cache
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

# ---- the public first stage, transcribed as loops (batch 1, as the public code runs it) ----------------------------


def public_cluster_dpc_knn(x, cluster_num, k, generator):
    """``cluster_dpc_knn`` on (N, C) tokens, with its 1e-6 density noise (drawn from ``generator``).
    Returns (cluster of each token, the centres in topk order)."""
    n, c = x.shape
    dist = torch.cdist(x.float()[None], x.float()[None])[0] / (c**0.5)
    nearest = dist.topk(k, dim=-1, largest=False).values
    density = (-(nearest**2).mean(dim=-1)).exp()
    density = density + torch.rand(density.shape, generator=generator) * 1e-6
    dist_max = dist.max()
    to_denser = []
    for i in range(n):
        candidates = [dist[i, j] if density[j] > density[i] else dist_max for j in range(n)]
        to_denser.append(min(candidates))
    score = torch.stack(to_denser) * density
    centres = score.topk(cluster_num).indices
    assignment = []
    for i in range(n):
        distances = [float(dist[centre, i]) for centre in centres]
        assignment.append(distances.index(min(distances)))
    for rank, centre in enumerate(centres.tolist()):
        assignment[centre] = rank
    return assignment, centres.tolist()


def public_refine_clusters(labels):
    """``refine_clusters`` for one row, step by step as the public loops do it."""
    refined = list(labels)
    n = len(labels)
    segment_info = {}
    for label in sorted(set(labels)):
        indices = [i for i, value in enumerate(labels) if value == label]
        segments, start, prev = [], indices[0], indices[0]
        for i in indices[1:]:
            if i == prev + 1:
                prev = i
            else:
                segments.append((start, prev))
                start = prev = i
        segments.append((start, prev))
        segment_info[label] = segments
    for label, segments in segment_info.items():
        max_length = max(end - start + 1 for start, end in segments)
        for start, end in segments:
            if max_length == 1 or end - start + 1 != max_length:
                refined[start:end + 1] = [-1] * (end - start + 1)
    idx = 0
    while idx < n:
        if refined[idx] != -1:
            idx += 1
            continue
        start = idx
        while idx < n and refined[idx] == -1:
            idx += 1
        end = idx - 1
        left_label = right_label = None
        left_length = right_length = 0
        if start > 0:
            left_label = refined[start - 1]
            l_idx = start - 1
            while l_idx >= 0 and refined[l_idx] == left_label:
                l_idx -= 1
            left_length = start - l_idx - 1
        if end < n - 1:
            right_label = refined[end + 1]
            r_idx = end + 1
            while r_idx < n and refined[r_idx] == right_label:
                r_idx += 1
            right_length = r_idx - end - 1
        if left_length > right_length:
            new_label = left_label
        elif right_length > left_length:
            new_label = right_label
        else:
            new_label = left_label if left_label is not None else right_label
        refined[start:end + 1] = [0 if new_label is None else new_label] * (end - start + 1)
    return refined


def public_segment_lengths(labels):
    lengths, run = [], 1
    for previous, current in itertools.pairwise(labels):
        if current != previous:
            lengths.append(run)
            run = 0
        run += 1
    return lengths + [run]


def public_spatial_merge(tokens, positions, cluster_ratio, generator):
    """``spatial_merge_tokens`` (with ``compute_cluster_vectors``) when the group has more than 14 tokens;
    returns [(position of the token or its cluster's centre, features)] in output order."""
    if tokens.shape[0] <= 14:
        return list(zip(positions, tokens))
    cluster_num = int(tokens.shape[0] * cluster_ratio)
    assignment, centres = public_cluster_dpc_knn(tokens, cluster_num, 7, generator)
    out = []
    for rank, centre in enumerate(centres):
        members = [tokens[i] for i in range(tokens.shape[0]) if assignment[i] == rank]
        out.append((positions[centre], torch.stack(members).sum(dim=0) / len(members)))
    return out


def public_merge_frames_dynamic(frames, tau, temporal_segment_ratio, cluster_ratio, seed=0, sizes=None):
    """``merge_frames_dynamic`` on (F, N, C) frames: [(frame, position, features)] in output order. k = 7 capped at F
    and at least one segment (where the public code fails, see the module docstring of prunevid.py). ``sizes``, a
    list, receives what the public function returns for the second stage: (static_size, dynamic tokens per frame,
    window_size) of each segment."""
    generator = torch.Generator().manual_seed(seed)
    num_frames, n, _ = frames.shape
    labels, _ = public_cluster_dpc_knn(frames.mean(dim=1), max(1, int(num_frames * temporal_segment_ratio)),
                                       min(7, num_frames), generator)
    out, start = [], 0
    for window in public_segment_lengths(public_refine_clusters(labels)):
        current = frames[start:start + window]
        normed = F.normalize(current, p=2, dim=-1)
        static = []
        for l in range(n):
            total = sum(float(normed[w, l] @ normed[t, l]) for w in range(window) for t in range(window))
            static.append(window > 1 and (total - window) / (window * (window - 1)) > tau)
        static_positions = [l for l in range(n) if static[l]]
        dynamic_positions = [l for l in range(n) if not static[l]]
        before = len(out)
        if static_positions:
            mean = current[:, static_positions].mean(dim=0)
            out += [(start, p, v) for p, v in public_spatial_merge(mean, static_positions, cluster_ratio, generator)]
        static_size = len(out) - before
        for w in range(window):
            if dynamic_positions:
                tokens = current[w, dynamic_positions]
                out += [(start + w, p, v) for p, v in public_spatial_merge(tokens, dynamic_positions, cluster_ratio,
                                                                         generator)]
        if sizes is not None:
            sizes.append((static_size, (len(out) - before - static_size) // window, window))
        start += window
    return out


def assert_selection_is(selection, expected, tokens_per_frame, num_frames):
    """``expected``: [(frame, position, features)] in output order."""
    assert selection.index.tolist() == [frame * tokens_per_frame + p for frame, p, _ in expected]
    torch.testing.assert_close(selection.values, torch.stack([v for _, _, v in expected]), rtol=1e-5, atol=1e-6)
    per_frame = [sum(1 for frame, _, _ in expected if frame == f) for f in range(num_frames)]
    assert selection.per_frame.tolist() == per_frame


# ---- the first stage: known answers --------------------------------------------------------------------------------


def test_refine_clusters_known_answers():
    # label 0: runs [0,1) and [2,4): the shorter one joins its longer neighbour; 1's single frame too
    assert refine_clusters([0, 1, 0, 0, 2, 2, 1, 1, 1]) == [0, 0, 0, 0, 2, 2, 1, 1, 1]
    # every cluster only single frames: all dissolved, nothing to the left or right -> cluster 0
    assert refine_clusters([3, 1, 2]) == [0, 0, 0]
    # a dissolved run between runs of equal length goes left; between unequal ones to the longer one
    assert refine_clusters([4, 4, 7, 5, 5]) == [4, 4, 4, 5, 5]
    assert refine_clusters([4, 4, 7, 5, 5, 5]) == [4, 4, 5, 5, 5, 5]
    # two runs of the maximal length are both kept
    assert refine_clusters([1, 1, 2, 2, 1, 1]) == [1, 1, 2, 2, 1, 1]


def test_refine_clusters_equals_the_public_loops_on_random_labels():
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        length = int(torch.randint(1, 17, (1,), generator=generator))
        labels = torch.randint(0, 4, (length,), generator=generator).tolist()
        assert refine_clusters(labels) == public_refine_clusters(labels), labels


def test_two_scenes_make_two_segments_each_merged_into_one_frame():
    """Frames 0-3 show scene A, frames 4-7 scene B: 8 * 0.25 = 2 clusters are the two scenes; every position is
    static within a scene (cosine 1), so each scene becomes its 9 tokens once, in its first frame."""
    generator = torch.Generator().manual_seed(1)
    scene_a, scene_b = torch.randn(2, 9, 32, generator=generator)
    features = torch.cat([scene_a.expand(4, -1, -1), scene_b.expand(4, -1, -1)])
    assert prunevid_segments(features, 0.25) == [4, 4]
    selection = PruneVid(tau=0.8, temporal_segment_ratio=0.25, cluster_ratio=0.5).select(features)
    expected = [(0, p, scene_a[p]) for p in range(9)] + [(4, p, scene_b[p]) for p in range(9)]
    assert_selection_is(selection, expected, 9, 8)


def test_static_positions_are_averaged_and_dynamic_ones_kept_per_frame():
    """One segment (4 * 0.25 = 1 cluster) whose positions 0-4 barely change while 5-8 are new in every frame:
    positions 0-4 become one token each (the mean over the frames) in frame 0, 5-8 stay in their frames."""
    generator = torch.Generator().manual_seed(2)
    still = torch.randn(5, 64, generator=generator)
    features = torch.randn(4, 9, 64, generator=generator)
    features[:, :5] = still + 0.01 * torch.randn(4, 5, 64, generator=generator)
    selection = PruneVid(tau=0.8, temporal_segment_ratio=0.25, cluster_ratio=0.5).select(features)
    expected = [(0, p, features[:, p].mean(dim=0)) for p in range(5)]
    expected += [(f, p, features[f, p]) for f in range(4) for p in range(5, 9)]
    assert_selection_is(selection, expected, 9, 4)


def test_more_than_14_tokens_are_clustered_and_duplicates_merge_into_one():
    """A one-frame video (no frame pairs: every token dynamic) of 8 distinct tokens, each at two positions (2i and
    2i + 1): 16 > 14 tokens, 16 * 0.5 = 8 clusters. A duplicate's distance to a denser token is 0, so the centres
    are the 8 first copies (the lower index counts as denser on the density tie) and each cluster is one pair."""
    generator = torch.Generator().manual_seed(3)
    distinct = torch.randn(8, 32, generator=generator)
    features = distinct.repeat_interleave(2, dim=0)[None]
    selection = PruneVid(tau=0.8, temporal_segment_ratio=0.25, cluster_ratio=0.5).select(features)
    order = selection.index.argsort()
    assert selection.index[order].tolist() == list(range(0, 16, 2))
    torch.testing.assert_close(selection.values[order], distinct)
    assert selection.per_frame.tolist() == [8]


def test_dpc_knn_assigns_every_token_to_its_nearest_centre():
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(30, 8, generator=generator)
    assignment, centres = dpc_knn(x, 6)
    distance = torch.cdist(x, x)[centres]  # (centres, tokens)
    assert torch.equal(assignment, distance.argmin(dim=0))
    assert assignment[centres].tolist() == list(range(6))


# ---- the first stage against the public loops on random features --------------------------------------------------


def drifting_scenes(frames, tokens, generator, dim=24):
    """(frames, tokens, dim) features: a new scene (its own offset and tokens) every 4 frames; within a scene each
    token drifts by its own amount (some positions static, some dynamic)."""
    features = []
    for f in range(frames):
        if f % 4 == 0:
            offset, base = torch.randn(dim, generator=generator), torch.randn(tokens, dim, generator=generator)
            scale = 2 * torch.rand(tokens, 1, generator=generator)
        features.append(offset + base + scale * torch.randn(tokens, dim, generator=generator))
    return torch.stack(features)


@pytest.mark.parametrize(("frames", "tokens", "tau", "segment_ratio", "cluster_ratio"), [
    (8, 36, 0.8, 0.25, 0.5),  # the published settings; groups of > 14 tokens are clustered
    (16, 25, 0.5, 0.25, 0.3),
    (6, 16, 0.6, 0.5, 0.5),  # fewer frames than k = 7
    (3, 40, 0.7, 0.25, 1.0),  # cluster_ratio 1: every token its own cluster, in centre order
])
def test_first_stage_equals_the_public_code(frames, tokens, tau, segment_ratio, cluster_ratio):
    generator = torch.Generator().manual_seed(frames * 100 + tokens)
    features = drifting_scenes(frames, tokens, generator)
    selection = PruneVid(tau, segment_ratio, cluster_ratio).select(features)
    sizes = []
    expected = public_merge_frames_dynamic(features, tau, segment_ratio, cluster_ratio, sizes=sizes)
    assert_selection_is(selection, expected, tokens, frames)
    assert len(expected) < frames * tokens  # it merged something
    # the quota groups of the second stage: each segment's static tokens, then each of its frames' dynamic ones
    assert selection.groups.tolist() == groups_of_sizes(sizes)


# ---- the second stage: the public rule with hooks on an eager model -------------------------------------------------


LAYER, ALPHA, STEPS, FRAMES = 1, 0.4, 6, 8
STAGE1 = {"prunevid_tau": 0.5, "prunevid_temporal_segment_ratio": 0.25, "prunevid_cluster_ratio": 0.5}
VARIANTS = cache_variants()


class HiddenPruneVid:
    """PruneVid's in-LLM rule on an eager model (batch 1), with hooks. At the prefill, layer ``selected_layer``'s
    input gives the un-rotated queries and keys (``attn_weights_wo_pos``: no RoPE, no mask, softmax over every
    key; Qwen3's per-head q/k norms applied, as its attention does before the rotary embedding); the maximum over
    heads, then over the text after the video (``obtain_language_attention``), scores the video ``positions`` (read
    at them: Qwen3-VL has text between its frames' spans). As the public ``process_attention`` (elastic_cache.py,
    Visual-AI/PruneVid b12600c), each quota group keeps its top int(size * alpha) tokens (``groups``: the group of
    each of ``positions``, e.g. ``groups_of_sizes``; None: one group). The others are hidden by the additive mask
    from the later layers (prefill and decoding) and, while decoding, from layers <= selected_layer too
    (``prompt_prefill`` cuts the cache of those layers). ``early=False`` leaves those layers alone (to show that the
    check sees the difference)."""

    def __init__(self, model, positions, selected_layer, alpha, early=True, groups=None):
        self.positions, self.layer, self.early, self.alpha = positions, selected_layer, early, alpha
        self.groups = torch.zeros(len(positions), dtype=torch.long) if groups is None else torch.as_tensor(groups)
        assert len(self.groups) == len(positions)
        self.dropped = self.kept = None
        layers = decoder_layers(model)
        self.handles = [layers[selected_layer].register_forward_pre_hook(self.rank, with_kwargs=True)]
        self.handles += [layer.self_attn.register_forward_pre_hook(self.hide, with_kwargs=True) for layer in layers]

    def rank(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] == 1:
            return
        attention = module.self_attn
        normed = module.input_layernorm(hidden)
        q, k = (_unrotated(attention, which, normed) for which in ("q", "k"))
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # repeat_kv
        weights = torch.softmax(q @ k.transpose(2, 3) / math.sqrt(attention.head_dim), dim=-1, dtype=torch.float32)
        text_to_video = weights[0, :, int(self.positions[-1]) + 1:, self.positions]
        scores = text_to_video.max(dim=0).values.max(dim=0).values
        kept = []
        for group in self.groups.unique().tolist():
            members = (self.groups == group).nonzero().flatten()
            kept += self.positions[members[scores[members].topk(int(len(members) * self.alpha)).indices]].tolist()
        self.kept = sorted(kept)
        self.dropped = self.positions[~torch.isin(self.positions, torch.tensor(kept, dtype=torch.long))]

    def hide(self, module, args, kwargs):
        decoding = kwargs["hidden_states"].shape[1] == 1
        if module.layer_idx <= self.layer and not (decoding and self.early):
            return None
        mask = kwargs["attention_mask"]
        kwargs["attention_mask"] = mask.index_fill(-1, self.dropped, torch.finfo(mask.dtype).min)
        return args, kwargs

    def remove(self):
        for handle in self.handles:
            handle.remove()


def _unrotated(attention, which: str, normed: torch.Tensor) -> torch.Tensor:
    """A layer's queries or keys before the rotary embedding (1, heads, L, head_dim)."""
    states = getattr(attention, f"{which}_proj")(normed).view(*normed.shape[:2], -1, attention.head_dim)
    norm = getattr(attention, f"{which}_norm", None)  # Qwen3's per-head norm
    return (states if norm is None else norm(states)).transpose(1, 2)


def groups_of_sizes(sizes) -> list[int]:
    """The group of each video token from ``public_merge_frames_dynamic``'s sizes (the video span is [static,
    frame 1's dynamic, ...] segment after segment): a segment's static tokens, then each of its frames' dynamic ones."""
    lengths = [size for static, dynamic, window in sizes for size in [static] + [dynamic] * window]
    return [group for group, length in enumerate(lengths) for _ in range(length)]


@pytest.fixture(scope="module")
def models(tiny_checkpoint):
    tokenizer, model = load(tiny_checkpoint, compressor="prunevid", prunevid_layer=LAYER, prunevid_alpha=ALPHA,
                            **STAGE1)
    # the reference runs the same first stage; its in-LLM stage is off (alpha 1): the hooks do it
    _, reference = load(tiny_checkpoint, "eager", compressor="prunevid", prunevid_layer=LAYER, prunevid_alpha=1.0,
                        **STAGE1)
    return tokenizer, model, reference


def public_group_sizes(model, ids, video) -> list[tuple[int, int, int]]:
    """The public first stage's (static_size, dynamic per frame, window_size) of each segment of ``video``'s pooled
    features in ``model``."""
    pooled = model.build_multimodal_inputs(ids, None, None, [video], ["video"], None).videos[0].pooled
    sizes = []
    public_merge_frames_dynamic(pooled.float(), STAGE1["prunevid_tau"], STAGE1["prunevid_temporal_segment_ratio"],
                                STAGE1["prunevid_cluster_ratio"], sizes=sizes)
    return sizes


def reference_run(reference, tokenizer, ids, video, early=True, layer=LAYER, **kwargs):
    rule = HiddenPruneVid(reference, video_positions(reference, ids, video), layer, ALPHA, early=early,
                          groups=groups_of_sizes(public_group_sizes(reference, ids, video)))
    try:
        tokens, logits = greedy(reference, tokenizer, ids, [video], STEPS, **kwargs)
    finally:
        rule.remove()
    return tokens, logits, rule


@pytest.mark.parametrize("variant", VARIANTS)
def test_in_llm_stage_matches_the_hidden_token_reference(models, variant):
    tokenizer, model, reference = models
    ids, video = prompt(tokenizer), random_video(FRAMES, model.get_vision_tower().image_size, seed=3)
    ref_tokens, ref_logits, rule = reference_run(reference, tokenizer, ids, video)
    tokens, logits = greedy(model, tokenizer, ids, [video], STEPS, **VARIANTS[variant])
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=3e-5)
    stats = model.last_compression_stats
    positions = video_positions(reference, ids, video)
    assert stats["video_tokens_after"] < stats["video_tokens_before"]  # the first stage merged
    pruned = stats["prunevid"]
    kept = sorted(set(positions.tolist()) - set(rule.dropped.tolist()))
    assert pruned["pruned"] and pruned["kept_video_positions"][0] == kept  # exactly the public rule's tokens
    sizes = public_group_sizes(reference, ids, video)
    assert len(sizes) > 1 and any(static for static, _, _ in sizes)  # several segments, with static tokens
    quota = sum(int(static * ALPHA) + window * int(dynamic * ALPHA) for static, dynamic, window in sizes)
    assert pruned["kept_image_tokens"] == [quota] != [int(len(positions) * ALPHA)]  # per group, not over the video
    assert pruned["decode_steps"] == STEPS - 1


@pytest.mark.parametrize("layer", [2, 3])  # 3: the last layer; no layer runs compact, only decoding is cut
def test_other_layers_match_their_reference(models, layer):
    tokenizer, model, reference = models
    ids, video = prompt(tokenizer), random_video(FRAMES, model.get_vision_tower().image_size, seed=4)
    model.configure_compression(prunevid_layer=layer)
    try:
        tokens, logits = greedy(model, tokenizer, ids, [video], STEPS)
        kept = model.last_compression_stats["prunevid"]["kept_video_positions"][0]
    finally:
        model.configure_compression(prunevid_layer=LAYER)
    ref_tokens, ref_logits, rule = reference_run(reference, tokenizer, ids, video, layer=layer)
    positions = video_positions(reference, ids, video)
    assert kept == sorted(set(positions.tolist()) - set(rule.dropped.tolist()))
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=3e-5)


def test_the_reference_sees_the_early_layers_decoding_mask(models):
    """Hiding the dropped tokens from layers <= selected_layer while decoding changes the logits: the check above
    would fail without that mask."""
    tokenizer, model, reference = models
    ids, video = prompt(tokenizer), random_video(FRAMES, model.get_vision_tower().image_size, seed=3)
    _, with_early, _ = reference_run(reference, tokenizer, ids, video)
    _, without_early, _ = reference_run(reference, tokenizer, ids, video, early=False)
    torch.testing.assert_close(with_early[:, 0], without_early[:, 0])  # the prefill's logits: the same
    assert not torch.allclose(with_early[:, 1:], without_early[:, 1:], atol=1e-4)


@pytest.mark.parametrize("variant", ["dynamic", "static"])
def test_every_layer_decodes_over_the_kept_tokens_only(models, variant):
    """The public ``prompt_prefill`` cuts the cache of the layers <= selected_layer too: after generate every layer's
    cache holds the compact prompt and the decoded tokens (a static cache's buffers are that long), and the cache
    still counts the whole prompt as seen."""
    tokenizer, model, _ = models
    ids, video = prompt(tokenizer), random_video(FRAMES, model.get_vision_tower().image_size, seed=3)
    output = model.generate(ids, images=[video], modalities=["video"], do_sample=False, max_new_tokens=STEPS,
                            min_new_tokens=STEPS, pad_token_id=tokenizer.pad_token_id, return_dict_in_generate=True,
                            **VARIANTS[variant])
    stats, cache = model.last_compression_stats["prunevid"], output_cache(output)
    assert stats["pruned"] and stats["compact_tokens"] < stats["prefill_tokens"]
    held = stats["compact_tokens"] + STEPS - 1  # the last token generated is never fed back
    # a static cache: every layer's buffers are W + the new tokens long (layers < K reallocated after the prefill)
    allocated = held if variant == "dynamic" else stats["compact_tokens"] + STEPS
    for layer in cache.layers:
        assert int(layer.get_seq_length()) == held
        assert layer.keys.shape[-2] == layer.values.shape[-2] == allocated
    assert int(cache.get_seq_length()) == stats["prefill_tokens"] + STEPS - 1


def test_padded_batch_equals_rows_alone(models):
    tokenizer, model, _ = models
    size = model.get_vision_tower().image_size
    ids = [prompt(tokenizer), prompt(tokenizer, "Which colours appear, and what moves in this short clip?")]
    videos = [random_video(FRAMES, size, seed=5), random_video(FRAMES - 2, size, seed=6)]
    padded = torch.full((2, max(i.shape[1] for i in ids)), tokenizer.pad_token_id)
    mask = torch.zeros_like(padded)
    for row, i in enumerate(ids):
        padded[row, : i.shape[1]], mask[row, : i.shape[1]] = i[0], 1
    for variant in ("dynamic", "static"):
        alone = [greedy(model, tokenizer, i, [v], 5, **VARIANTS[variant]) for i, v in zip(ids, videos)]
        tokens, logits = greedy(model, tokenizer, padded, videos, 5, attention_mask=mask, **VARIANTS[variant])
        for row, (row_tokens, row_logits) in enumerate(alone):
            assert torch.equal(tokens[row], row_tokens[0]), (variant, row)
            torch.testing.assert_close(logits[row], row_logits[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_a_decoding_step_reads_the_host_as_often_as_without_the_in_llm_stage(models, cache):
    tokenizer, model, _ = models
    ids, video = prompt(tokenizer), random_video(FRAMES, model.get_vision_tower().image_size, seed=3)
    counts = {}
    for alpha in (1.0, ALPHA):  # the first stage alone, then both stages
        model.configure_compression(prunevid_alpha=alpha)
        with HostReads(model, decoding_only=True) as reads:
            greedy(model, tokenizer, ids, [video], 6, **VARIANTS[cache])
        counts[alpha] = reads.count
    assert reads.forwards == 5 and model.last_compression_stats["prunevid"]["pruned"]
    assert counts[ALPHA] == counts[1.0]


def test_a_group_of_more_than_14_tokens_keeps_at_least_one_cluster():
    features = torch.randn(1, 15, 8, generator=torch.Generator().manual_seed(7))
    selection = PruneVid(cluster_ratio=0.05).select(features)  # int(15 * 0.05) = 0: the public topk fails
    assert selection.per_frame.tolist() == [1]
    torch.testing.assert_close(selection.values, features[0].mean(dim=0, keepdim=True))


# ---- settings -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("make", "argument"), [
    (lambda: PruneVid(tau=1.5), "prunevid_tau"),
    (lambda: PruneVid(temporal_segment_ratio=0), "prunevid_temporal_segment_ratio"),
    (lambda: PruneVid(cluster_ratio=1.2), "prunevid_cluster_ratio"),
    (lambda: PruneVid(cluster_ratio="half"), "prunevid_cluster_ratio"),
    (lambda: PruneVidLLM(selected_layer=0), "prunevid_layer"),
    (lambda: PruneVidLLM(selected_layer=2.5), "prunevid_layer"),
    (lambda: PruneVidLLM(alpha=0), "prunevid_alpha"),
])
def test_bad_settings_name_the_argument(make, argument):
    with pytest.raises(ValueError, match=argument):
        make()


def test_a_layer_beyond_the_model_names_the_argument(models):
    _, model, _ = models
    with pytest.raises(ValueError, match="prunevid_layer"):
        model.configure_compression(prunevid_layer=model.config.num_hidden_layers)
    assert model.compression.prunevid_layer == LAYER


def test_on_qwen3_vl_a_layer_inside_its_deepstack_layers_equals_hiding_its_dropped_tokens():
    """Qwen3-VL adds visual features after its first (here 3) layers; prunevid_layer=1 ranks at layer 1 and drops
    from layer 2 on, so layer 1 adds them to the whole prompt and layer 2 to the kept tokens only. Equal to the
    stock model (its text model adds every feature at every visual position) with the same first stage
    (prunevid_alpha=1) and the tokens the model dropped hidden: from the layers after layer 1 in the prefill, from
    every layer while decoding (the public ``prompt_prefill``). Which tokens PruneVid drops is checked above."""
    from llava.compression import compressed
    from tests import native_models as nm
    from tests.test_qwen3_vl_deepstack import deep_qwen3_vl

    model, reference = deep_qwen3_vl(), deep_qwen3_vl("eager")
    inputs = nm.video_inputs("qwen3_vl", model, ((5, 6, 7),), frames=16, seed=3)
    with compressed(model, compressor="prunevid", prunevid_layer=1, prunevid_alpha=0.5) as handle:
        tokens, logits = nm.greedy(model, inputs, STEPS)
        video, kept = handle.last_stats["video_positions"][0], handle.last_stats["prunevid"]["kept_video_positions"][0]
    dropped = torch.tensor(sorted(set(video) - set(kept)))
    assert len(dropped) and set(kept) < set(video)

    def hide(module, args, kwargs):
        if module.layer_idx <= 1 and kwargs["hidden_states"].shape[1] > 1:
            return None
        mask = kwargs["attention_mask"]
        kwargs["attention_mask"] = mask.index_fill(-1, dropped, torch.finfo(mask.dtype).min)
        return args, kwargs

    hooks = [layer.self_attn.register_forward_pre_hook(hide, with_kwargs=True) for layer in decoder_layers(reference)]
    try:
        with compressed(reference, compressor="prunevid", prunevid_layer=1, prunevid_alpha=1.0):
            ref_tokens, ref_logits = nm.greedy(reference, inputs, STEPS)
    finally:
        for hook in hooks:
            hook.remove()
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=3e-5)
