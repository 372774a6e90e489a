"""FlashVID's vision side (llava.compression.flashvid) against a loop transcription of the public code."""

import math

import pytest
import torch

from llava.compression import TokenSelection
from llava.compression.flashvid import FlashVID, flashvid_budget, flashvid_segments

# --- Reference -------------------------------------------------------------------------------------------------
# Plain loops in float64, written from github.com/Fanziyang-v/FlashVID:
#   flashvid/utils.py: flashvid_compression, segment, additional_segment, segment_compression,
#                      spatiotemporal_compression, dpc_knn
#   flashvid/token_selection.py: attn_div_v2_based_token_selection
# with the departures FlashVID's docstring lists: ADTS picks a token once; a one-frame segment merges only the
# tokens ADTS left; DPC density ties go to the lower index (the public code adds random noise); the budget is
# capped at N; temporal_threshold = 1 means no temporal merging.


def _dot(a, b):
    return sum(p * q for p, q in zip(a, b))


def _cos(a, b):
    return _dot(a, b) / math.sqrt(_dot(a, a) * _dot(b, b))


def _mean(vectors):
    return [sum(column) / len(vectors) for column in zip(*vectors)]


def _first_argmax(values):
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def ref_segments(x, threshold, min_segments, complementary):
    """segment + additional_segment: lengths of the segments."""
    num_frames = len(x)
    means = [_mean(frame) for frame in x]
    sims = [_cos(means[t], means[t + 1]) for t in range(num_frames - 1)]
    cuts = {t for t in range(num_frames - 1) if sims[t] < threshold}
    if complementary and len(cuts) + 1 < min_segments:
        ranked = sorted(range(num_frames - 1), key=lambda t: (1.0 if t in cuts else sims[t], t))
        cuts |= set(ranked[: min(min_segments - len(cuts) - 1, num_frames - 1)])
    lengths, start = [], 0
    for end in sorted(cuts) + [num_frames - 1]:
        lengths.append(end + 1 - start)
        start = end + 1
    return lengths


def ref_adts(seg, seg_attention, count):
    """attn_div_v2_based_token_selection on one segment: sorted local indices per frame."""
    frame_means = [_mean(frame) for frame in seg]
    chosen_per_frame = []
    for frame, attention in zip(seg, seg_attention):
        n = len(frame)
        relevance = [sum(_dot(frame[j], p) for p in frame_means) / len(frame_means) for j in range(n)]
        calibration = [attention[j] * 1e6 * relevance[j] for j in range(n)]
        dist = [[(1.0 - _cos(frame[i], frame[j])) * calibration[j] for j in range(n)] for i in range(n)]
        nearest = [sorted(dist[i][j] for i in range(n))[min(1, n - 1)] for j in range(n)]
        chosen = [_first_argmax(nearest)]
        while len(chosen) < count:
            best, best_value = None, None
            for j in range(n):
                if j in chosen:
                    continue
                value = min(dist[s][j] for s in chosen)
                if best is None or value > best_value:
                    best, best_value = j, value
            chosen.append(best)
        chosen_per_frame.append(sorted(chosen))
    return chosen_per_frame


def ref_temporal(seg, candidate, threshold, lower_bound):
    """spatiotemporal_compression: (values, kept) of one segment with at least two frames."""
    length, n = len(seg), len(seg[0])
    best = [[-1.0] * n]
    parent = [[0] * n]
    for t in range(1, length):
        best.append([]), parent.append([])
        for i in range(n):
            sims = [_cos(seg[t][i], seg[t - 1][m]) if candidate[t][i] and candidate[t - 1][m] else -1.0
                    for m in range(n)]
            parent[t].append(_first_argmax(sims))
            best[t].append(sims[parent[t][-1]])
    joins = [[b > threshold for b in row] for row in best]
    if sum(not j for row in joins for j in row) < lower_bound:
        rank = length * n - lower_bound
        if rank > 0:
            soft = max(sorted((b for row in best for b in row), reverse=True)[rank - 1], -1.0 + 1e-6)
            joins = [[b > soft for b in row] for row in best]
        else:
            joins = [[False] * n for _ in range(length)]
    values = [[list(token) for token in frame] for frame in seg]
    counts = [[1.0] * n for _ in range(length)]
    for t in range(length - 1, -1, -1):
        for i in range(n):
            if not joins[t][i]:
                values[t][i] = [v / counts[t][i] for v in values[t][i]]
                counts[t][i] = 1.0
        for i in range(n):
            if joins[t][i]:
                p = parent[t][i]
                values[t - 1][p] = [a + b for a, b in zip(values[t - 1][p], values[t][i])]
                counts[t - 1][p] += 1.0  # one per joining token, whatever it carries (public code)
                counts[t][i] = 0.0
    kept = [[candidate[t][i] and not joins[t][i] for i in range(n)] for t in range(length)]
    return values, kept


def ref_dpc(tokens, num_clusters):
    """dpc_knn: (centres, cluster means)."""
    n, dim = len(tokens), len(tokens[0])
    dist = [[math.sqrt(sum((a - b) ** 2 for a, b in zip(tokens[i], tokens[j]))) / math.sqrt(dim) for j in range(n)]
            for i in range(n)]
    k = min(num_clusters, 7)
    density = [math.exp(sum(-(d**2) for d in sorted(dist[i])[:k]) / k) for i in range(n)]
    largest = max(max(row) for row in dist)
    score = []
    for i in range(n):
        denser = [dist[i][j] for j in range(n) if density[j] > density[i] or (density[j] == density[i] and j < i)]
        score.append(min(denser, default=largest) * density[i])
    centres = sorted(range(n), key=lambda i: (-score[i], i))[:num_clusters]
    members = [[] for _ in centres]
    for i in range(n):
        if i in centres:
            members[centres.index(i)].append(tokens[i])
        else:
            members[_first_argmax([-dist[i][c] for c in centres])].append(tokens[i])
    return centres, [_mean(group) for group in members]


def reference_flashvid(features, attention, retention_ratio=0.25, expansion=1.25, alpha=0.7, temporal_threshold=0.8,
                       do_segment=True, segment_threshold=0.9, min_segment_num=8, complementary_segment=True):
    """flashvid_compression: (index, per_frame, values) in output order."""
    num_frames, n, _ = features.shape
    x = features.double().tolist()
    att = attention.double().tolist()
    budget = min(n, math.ceil(n * retention_ratio * expansion))
    num_adts = math.ceil(budget * alpha)
    num_merged = budget - num_adts
    lengths = ref_segments(x, segment_threshold, min_segment_num, complementary_segment) if do_segment else [num_frames]
    kept = {}
    start = 0
    for length in lengths:
        seg, seg_att = x[start:start + length], att[start:start + length]
        candidate = [[True] * n for _ in range(length)]
        if num_adts > 0:
            for t, chosen in enumerate(ref_adts(seg, seg_att, num_adts)):
                for i in chosen:
                    kept[(start + t) * n + i] = seg[t][i]
                    candidate[t][i] = False
        if num_merged > 0:
            values = seg
            if length > 1 and temporal_threshold < 1.0:
                values, candidate = ref_temporal(seg, candidate, temporal_threshold, budget * length)
            counts = [sum(row) for row in candidate]
            ratio = num_merged * length / sum(counts)
            for t in range(length):
                positions = [i for i in range(n) if candidate[t][i]]
                tokens = [values[t][i] for i in positions]
                num_clusters = math.ceil(len(positions) * ratio)
                if num_clusters > 0 and ratio < 1.0:
                    centres, tokens = ref_dpc(tokens, num_clusters)
                    positions = [positions[c] for c in centres]
                for i, value in zip(positions, tokens):
                    kept[(start + t) * n + i] = value
        start += length
    index = sorted(kept)
    per_frame = [sum(1 for i in index if i // n == f) for f in range(num_frames)]
    return index, per_frame, torch.tensor([kept[i] for i in index], dtype=torch.float64)


# --- Inputs ----------------------------------------------------------------------------------------------------


def random_video(num_frames, tokens, dim=8, seed=0, dtype=torch.float32):
    """Scenes of three frames: a shared offset (positive event relevance, as real features), a per-scene pattern,
    per-frame noise; attention a softmax over each frame's tokens."""
    gen = torch.Generator().manual_seed(seed)
    common = torch.randn(dim, generator=gen)
    scenes = [torch.randn(tokens, dim, generator=gen) for _ in range(math.ceil(num_frames / 3))]
    feats = torch.stack([1.5 * common + scenes[f // 3] + 0.45 * torch.randn(tokens, dim, generator=gen)
                         for f in range(num_frames)])
    attention = torch.softmax(2 * torch.randn(num_frames, tokens, generator=gen), dim=-1)
    return feats.to(dtype), attention.to(dtype)


SETTINGS = [
    {},
    {"min_segment_num": 2},
    {"min_segment_num": 3, "alpha": 0.0, "retention_ratio": 0.5},
    {"do_segment": False},
    {"do_segment": False, "temporal_threshold": 0.5, "retention_ratio": 0.1, "expansion": 1.0},
    {"do_segment": False, "temporal_threshold": 0.95, "retention_ratio": 0.6, "expansion": 1.5},
    {"alpha": 1.0},
    {"do_segment": False, "temporal_threshold": 1.0},
    {"segment_threshold": 0.999, "complementary_segment": False, "alpha": 0.4},
]


def check_against_reference(features, attention, grid_hw=None, **settings):
    sel = FlashVID(**settings).select(features, grid_hw, attention=attention)
    index, per_frame, values = reference_flashvid(features, attention, **settings)
    assert isinstance(sel, TokenSelection) and sel.index.dtype == torch.long
    assert sel.index.tolist() == index
    assert sel.per_frame.tolist() == per_frame
    if settings.get("alpha") == 1.0:
        assert sel.values is None  # selection only
        return sel
    assert sel.values.dtype == features.dtype
    if features.dtype == torch.float32:
        torch.testing.assert_close(sel.values.double(), values, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(sel.values, values.to(features.dtype))
    return sel


# --- Against the reference ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "defaults")
@pytest.mark.parametrize("num_frames", [1, 2, 5, 8])
def test_matches_reference_random(num_frames, settings):
    features, attention = random_video(num_frames, 49, seed=num_frames)
    check_against_reference(features, attention, (7, 7), **settings)


@pytest.mark.parametrize("settings", [{"min_segment_num": 2}, {"do_segment": False, "alpha": 0.5}])
@pytest.mark.parametrize("grid_hw", [(4, 6), (3, 5)])
@pytest.mark.parametrize("num_frames", [1, 2, 5, 8])
def test_matches_reference_non_square_bfloat16(num_frames, grid_hw, settings):
    features, attention = random_video(num_frames, grid_hw[0] * grid_hw[1], seed=10 + num_frames, dtype=torch.bfloat16)
    check_against_reference(features, attention, grid_hw, **settings)


def test_reference_runs_every_stage():
    """The random inputs do exercise temporal merging, the forced lower bound and segmentation (else the tests
    above would not check them)."""
    features, _ = random_video(8, 49, seed=8)
    x = features.double().tolist()
    candidate = [[True] * 49 for _ in range(3)]
    _, kept = ref_temporal(x[:3], candidate, 0.8, 16 * 3)
    assert 0 < sum(not k for row in kept for k in row)  # some tokens joined a tree
    _, kept = ref_temporal(x[:3], candidate, 0.5, 49 * 3 - 5)
    assert sum(not k for row in kept for k in row) == 4  # the lower bound stops the merging
    assert ref_segments(x, 0.9, 2, True) != [8]


# --- Known answers -------------------------------------------------------------------------------------------------


def frames_with_means(means, tokens=4):
    return torch.tensor(means, dtype=torch.float32)[:, None, :].expand(-1, tokens, -1).contiguous()


def test_segments_known_answer():
    # Transition similarities: 0.98, 0.96, 0 (a scene cut), 0.995, 0.999.
    video = frames_with_means([[1, 0, 0, 0], [1, 0.2, 0, 0], [1, 0.2, 0.3, 0],
                               [0, 0, 0, 1], [0, 0.1, 0, 1], [0, 0.1, 0.05, 1]])
    assert flashvid_segments(video, 0.9, 1, True) == [3, 3]
    assert flashvid_segments(video, 0.9, 3, True) == [2, 1, 3]  # plus the least similar transition, 1 -> 2
    assert flashvid_segments(video, 0.9, 4, True) == [1, 1, 1, 3]  # and 0 -> 1
    assert flashvid_segments(video, 0.9, 4, False) == [3, 3]
    assert flashvid_segments(video, 0.9, 10, True) == [1] * 6
    assert flashvid_segments(video[:1], 0.9, 8, True) == [1]


def orthogonal_tokens(n):
    """n tokens u + e_i: every pair has cosine similarity 1/2."""
    return (torch.eye(n + 1)[:n] + torch.eye(n + 1)[n])[None]


def test_adts_equal_distances_keeps_top_attention():
    features = orthogonal_tokens(6)
    attention = torch.tensor([[0.1, 0.5, 0.2, 0.9, 0.3, 0.05]])
    sel = FlashVID(retention_ratio=0.5, expansion=1.0, alpha=1.0).select(features, attention=attention)
    assert sel.index.tolist() == [1, 3, 4] and sel.values is None


def test_adts_keeps_one_of_two_identical_tokens():
    features = orthogonal_tokens(6)
    features[0, 1] = features[0, 0]  # tokens 0 and 1 are identical and have the highest attention
    attention = torch.tensor([[0.9, 0.8, 0.1, 0.2, 0.3, 0.15]])
    sel = FlashVID(retention_ratio=0.5, expansion=1.0, alpha=1.0).select(features, attention=attention)
    # Plain top-3 attention would be [0, 1, 4]. ADTS: 4 first (0 and 1 have a twin at distance 0), then 0, then 3.
    assert sel.index.tolist() == [0, 3, 4]


def test_adts_never_picks_a_token_twice():
    """Tokens 2 and 3 point away from the segment mean (negative event relevance, so negative calibrated distances):
    after 0 and 1, the public v2 loop would pick 0 or 1 again (their self-distance ~0 beats any negative value)."""
    features = torch.tensor([[[10.0, 0.0], [9.0, 1.0], [-1.0, 0.5], [-1.0, -0.5]]])
    attention = torch.full((1, 4), 0.25)
    sel = FlashVID(retention_ratio=0.75, expansion=1.0, alpha=1.0).select(features, attention=attention)
    assert sel.index.tolist()[:2] == [0, 1] and len(set(sel.index.tolist())) == 3
    assert sel.index.tolist() == reference_flashvid(features, attention, 0.75, 1.0, 1.0)[0]


def test_repeated_frame_merges_into_the_first_and_pairs_cluster():
    """Frame 1 repeats frame 0, whose 16 tokens are 8 identical pairs; no ADTS (alpha 0), budget 4 a frame.
    Every token of frame 1 joins its twin in frame 0 (cosine 1 > 0.8); frame 0 then clusters its 16 tree roots
    into ceil(16 * 8 / 16) = 8 clusters: one per pair, centred on its first token, valued as the pair."""
    gen = torch.Generator().manual_seed(3)
    pairs = torch.randint(-4, 5, (8, 6), generator=gen).float() + 6  # integers: averages of copies are exact
    frame = pairs.repeat_interleave(2, dim=0)
    features = torch.stack([frame, frame])
    attention = torch.full((2, 16), 1 / 16)
    compressor = FlashVID(retention_ratio=0.25, expansion=1.0, alpha=0.0, do_segment=False)
    sel = compressor.select(features, attention=attention)
    assert sel.per_frame.tolist() == [8, 0]
    assert sel.index.tolist() == list(range(0, 16, 2))
    torch.testing.assert_close(sel.values, pairs)
    assert reference_flashvid(features, attention, 0.25, 1.0, 0.0, do_segment=False)[0] == sel.index.tolist()


def test_distinct_frames_do_not_merge_in_time():
    """Orthogonal frames: no temporal trees, so each frame keeps its own budget."""
    features = torch.zeros(3, 8, 24)
    for f in range(3):
        features[f, :, 8 * f:8 * f + 8] = torch.eye(8) + 1
    attention = torch.rand(3, 8, generator=torch.Generator().manual_seed(0))
    compressor = FlashVID(retention_ratio=0.5, expansion=1.0, alpha=0.5, do_segment=False)
    sel = compressor.select(features, attention=attention)
    assert sel.per_frame.tolist() == [4, 4, 4]


# --- Budget, order, shapes ---------------------------------------------------------------------------------------


def test_budget_known_values():
    assert flashvid_budget(196, 0.25, 1.25, 0.7) == (62, 44, 18)  # ceil(61.25), ceil(43.4)
    assert flashvid_budget(169, 0.25, 1.25, 0.7) == (53, 38, 15)  # ceil(52.8125), ceil(37.1)
    assert flashvid_budget(196, 0.4, 1.25, 0.7) == (98, 69, 29)  # 50 %
    assert flashvid_budget(196, 0.2, 1.25, 0.7) == (49, 35, 14)  # 25 %
    assert flashvid_budget(196, 0.08, 1.25, 0.7) == (20, 14, 6)  # ceil(19.6): about 10 %
    assert flashvid_budget(16, 1.0, 1.25, 0.7) == (16, 12, 4)  # capped at N
    assert flashvid_budget(16, 0.25, 1.0, 0.0) == (4, 0, 4)


@pytest.mark.parametrize("settings", [{}, {"min_segment_num": 2}, {"do_segment": False}, {"retention_ratio": 0.1},
                                      {"retention_ratio": 0.4, "alpha": 0.3},
                                      {"retention_ratio": 1.0, "expansion": 1.0}])
@pytest.mark.parametrize("num_frames", [1, 5, 8])
def test_kept_count_follows_budget(num_frames, settings):
    """A segment of L frames keeps between budget * L and budget * L + L tokens (one ceil per frame)."""
    features, attention = random_video(num_frames, 36, seed=num_frames + 20)
    compressor = FlashVID(**settings)
    budget = compressor.budget(36)[0]
    sel = compressor.select(features, attention=attention)
    assert num_frames * budget <= sel.num_kept <= num_frames * (budget + 1)
    assert int(sel.per_frame.sum()) == sel.index.numel() == sel.values.shape[0]
    assert len(set(sel.index.tolist())) == sel.num_kept  # one token per position


def test_frames_in_time_order_and_spatial_order():
    features, attention = random_video(6, 25, seed=5)
    sel = FlashVID(min_segment_num=2).select(features, attention=attention)
    assert (sel.index[1:] > sel.index[:-1]).all()
    start = 0
    for f, count in enumerate(sel.per_frame.tolist()):
        assert ((sel.index[start:start + count] // 25) == f).all()
        start += count


def test_features_and_attention_are_not_modified():
    features, attention = random_video(4, 16, seed=1)
    before = features.clone(), attention.clone()
    FlashVID(do_segment=False).select(features, attention=attention)
    assert torch.equal(features, before[0]) and torch.equal(attention, before[1])


def test_describe():
    assert FlashVID().describe() == {
        "name": "flashvid", "retention_ratio": 0.25, "expansion": 1.25, "alpha": 0.7, "temporal_threshold": 0.8,
        "do_segment": True, "segment_threshold": 0.9, "min_segment_num": 8, "complementary_segment": True}


# --- Validation --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, value", [
    ("retention_ratio", 0), ("retention_ratio", 1.5), ("retention_ratio", "0.25"), ("retention_ratio", float("nan")),
    ("expansion", 0), ("expansion", -1.0), ("expansion", math.inf),
    ("alpha", -0.1), ("alpha", 1.1), ("alpha", None),
    ("temporal_threshold", 1.5), ("temporal_threshold", -2),
    ("do_segment", "yes"), ("do_segment", 2),
    ("segment_threshold", 2.0), ("segment_threshold", -1.5),
    ("min_segment_num", 0), ("min_segment_num", 2.5),
    ("complementary_segment", 3),
])
def test_invalid_arguments_name_themselves(name, value):
    with pytest.raises(ValueError, match=rf"flashvid_{name}="):
        FlashVID(**{name: value})


def test_select_needs_attention_of_the_right_shape():
    features, attention = random_video(2, 9)
    with pytest.raises(ValueError, match="attention"):
        FlashVID().select(features)
    with pytest.raises(ValueError, match=r"attention.*\(2, 9\)"):
        FlashVID().select(features, attention=attention[:, :8])
    with pytest.raises(ValueError, match="grid_hw"):
        FlashVID().select(features, (2, 4), attention=attention)
    with pytest.raises(ValueError, match="features"):
        FlashVID().select(features[0], attention=attention)


@pytest.mark.parametrize("position", ["one_token", "frame", "grid"])
def test_layout_places_merged_values(position):
    from llava.compression import assemble_video_tokens

    features, attention = random_video(4, 16, seed=3)
    sel = FlashVID(min_segment_num=2).select(features, attention=attention)
    newline = torch.full((features.shape[-1],), 99.0)
    tokens, is_visual = assemble_video_tokens(features, sel, newline, position, (4, 4))
    assert int(is_visual.sum()) == sel.num_kept
    # Indices are already in original order, so every layout shows the kept tokens in selection order.
    torch.testing.assert_close(tokens[is_visual], sel.values)


# --- In the model ------------------------------------------------------------------------------------------------
# The vision side on the tower's real attention, and the in-LLM pruning (flashvid/utils.py fastv_prune, called at
# pruning_layer from the patched Qwen2Model_forward in flashvid/modeling_qwen2.py) against the hidden-token
# reference: the same model with the vision side only, the pruned video tokens hidden from layers >= pruning_layer.

LLM_LAYER, LLM_RETENTION = 2, 0.6
# (a layer argument is checked against the model even when its stage is off: the tiny model has 4 layers, not 21)
VISION = {"flashvid_retention_ratio": 0.5, "flashvid_expansion": 1.0, "flashvid_min_segment_num": 2,
          "flashvid_pruning_layer": LLM_LAYER}


def test_the_llava_model_scores_with_its_towers_last_layer_and_keeps_the_references_tokens(loaded_tiny):
    """The attention of the tower's last kept layer for the frames' own input, pooled as the features are, reaches
    FlashVID; the trace records the reference's choice and merged values; the tower's output is unchanged."""
    from llava.compression.visionzip import siglip_attention_scores
    from tests.conftest import random_video as frames
    from tests.test_conformance import prompt_ids

    tokenizer, model, _, _ = loaded_tiny
    video = frames(6, model.get_vision_tower().image_size, seed=61)
    layer = model.get_vision_tower().vision_tower.vision_model.encoder.layers[-1]
    inputs = []
    handle = layer.register_forward_pre_hook(lambda m, a, k: inputs.append(a[0] if a else k["hidden_states"]),
                                             with_kwargs=True)
    try:
        plain = model.encode_images(video)
        model.configure_compression(compressor="flashvid", **VISION, flashvid_llm_retention_ratio=1.0)
        with model.compression_trace() as trace:
            model.generate(prompt_ids(tokenizer, "What is moving?"), images=[video], modalities=["video"],
                           max_new_tokens=2, do_sample=False)
    finally:
        handle.remove()
        model.reset_compression()
    attention, _ = siglip_attention_scores(layer, inputs[0])
    pooled_attention = model.get_2dPool(attention[..., None])[..., 0]
    settings = {"retention_ratio": 0.5, "expansion": 1.0, "min_segment_num": 2}
    index, per_frame, values = reference_flashvid(trace.pooled.float(), pooled_attention.float(), **settings)
    assert trace.selection.index.tolist() == index and trace.selection.per_frame.tolist() == per_frame
    torch.testing.assert_close(trace.selection.values.double(), values.double(), rtol=1e-5, atol=1e-5)
    assert torch.equal(model.encode_images(video), plain)  # recording changed nothing


@pytest.fixture(scope="module")
def pruned_and_reference(tiny_checkpoint):
    from tests.references import load

    tokenizer, model = load(tiny_checkpoint, compressor="flashvid", **VISION, flashvid_llm_retention_ratio=LLM_RETENTION)
    _, reference = load(tiny_checkpoint, "eager", compressor="flashvid", **VISION, flashvid_llm_retention_ratio=1.0)
    return tokenizer, model, reference


@pytest.mark.parametrize("variant", ["dynamic", "static", "static-compiled"])
def test_the_in_llm_pruning_matches_the_hidden_token_reference(pruned_and_reference, variant):
    from tests.conftest import random_video as frames
    from tests.references import (
        HiddenFastV,
        cache_variants,
        greedy,
        prompt,
        video_positions,
    )

    tokenizer, model, reference = pruned_and_reference
    ids, video = prompt(tokenizer), frames(8, model.get_vision_tower().image_size, seed=62)
    positions = video_positions(reference, ids, video)
    rule = HiddenFastV(reference, positions, LLM_LAYER, 1 - LLM_RETENTION, rounding=math.ceil)
    try:
        ref_tokens, ref_logits = greedy(reference, tokenizer, ids, [video], 6)
    finally:
        rule.remove()
    tokens, logits = greedy(model, tokenizer, ids, [video], 6, **cache_variants()[variant])
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=3e-5, atol=3e-5)
    stats = model.last_compression_stats["flashvid_llm"]
    kept = sorted(set(positions.tolist()) - set(rule.dropped.tolist()))
    assert stats["kept_video_positions"][0] == kept
    assert stats["kept_image_tokens"] == [math.ceil(len(positions) * LLM_RETENTION)]  # ceil, as fastv_prune
    assert model.last_compression_stats["video_tokens_after"] < model.last_compression_stats["video_tokens_before"]


def test_composes_with_kv_pruning_only_without_its_own_in_llm_stage():
    from llava.compression.settings import settings_from_kwargs

    assert settings_from_kwargs({"compressor": "flashvid", "flashvid_llm_retention_ratio": 1.0, "dycoke_p": 0.7}).kv_pruning
    with pytest.warns(UserWarning, match="dycoke_p do nothing with compressor='flashvid'"):
        assert not settings_from_kwargs({"compressor": "flashvid", "dycoke_p": 0.7}).kv_pruning


def test_the_pruning_layer_is_checked_against_the_model(loaded_tiny):
    _, model, _, _ = loaded_tiny
    layers = model.config.num_hidden_layers
    with pytest.raises(ValueError, match=f"flashvid_pruning_layer={layers}.*allowed: \\[1, {layers - 1}\\]"):
        model.configure_compression(compressor="flashvid", flashvid_pruning_layer=layers)
    with pytest.raises(ValueError, match="flashvid_pruning_layer=20"):  # the published default, on a tiny model
        model.configure_compression(compressor="flashvid")
    assert model.compression.compressor == "none"
