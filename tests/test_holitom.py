"""HoliTom (llava/compression/holitom.py) against references transcribed from the public code:
github.com/cokeshao/HoliTom at commit e9b2972f6895c9e7d7fe74eb8c3a2ecaab8056e0, ``holitom/llava_arch.py``
(``LlavaMetaForCausalLM_holitom.prepare_inputs_labels_for_multimodal``, ``select_static_windows``,
``get_static_dynamic_features``, ``holitom``, ``merge_tokens_by_attention_density``, ``merge_tokens_by_density``,
``cluster_dpc_knn``, ``merge_tokens_by_clustering``) and ``holitom/modeling_qwen2.py`` (``Qwen2Model_holitom.forward``,
the ``layer_idx == HOLITOM_k`` branch). The references are loops in the public code's structure, with the
module's documented departures only: index tie-breaks instead of DPC-kNN's random noise, and the cluster tokens of
``d > 0`` at their centres' positions (the public code fails there).

Run first so that its import registers the method:
``python -m pytest tests/test_holitom.py tests/test_every_method.py -k holitom``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llava.compression import holitom  # its import registers "holitom"
from llava.compression.holitom import (
    HoliTom,
    HoliTomMerge,
    merge_into_kept,
    static_windows,
)
from llava.compression.layout import assemble_video_tokens
from llava.constants import IMAGE_TOKEN_INDEX
from tests.conftest import random_video
from tests.references import (
    cache_variants,
    decoder_layers,
    greedy,
    load,
    prompt,
    video_positions,
)

# ---- the outer-LLM reference ----------------------------------------------------------------------------------------


def reference_windows(feature_sim, num_frames, tau, max_window_size):
    """``select_static_windows``: the public tensors and loops."""
    similarity_matrix = torch.ones((num_frames, num_frames, feature_sim.shape[1]))
    for start in range(num_frames - 1):
        cum_similarity = torch.cumprod(feature_sim[start:] > tau, dim=0)
        similarity_matrix[start, start + 1 : start + 1 + len(cum_similarity)] = cum_similarity
    window_lengths = (torch.arange(num_frames)[None] - torch.arange(num_frames)[:, None]).clamp(min=0)
    pruned_static_count = (similarity_matrix.sum(dim=-1) * window_lengths).float()
    dp = torch.zeros(num_frames)
    prev = torch.zeros(num_frames, dtype=torch.long)
    for i in range(num_frames):
        max_val = dp[i - 1] if i > 0 else 0
        best_j = i
        for window_size in range(2, min(i + 1, max_window_size) + 1):
            j = i - window_size
            current_val = (dp[j] if j >= 0 else 0) + pruned_static_count[j + 1, i]
            if current_val > max_val:
                max_val = current_val
                best_j = j + 1
        dp[i] = max_val
        prev[i] = best_j
    selected, i = [], num_frames - 1
    while i >= 0:
        selected.append((prev[i].item(), i))
        i = prev[i].item() - 1
    return selected[::-1], dp[-1].item()


def reference_dpc_knn(x, cluster_num, k):
    """``cluster_dpc_knn`` on one row (L, C); the random density noise replaced by the index tie-break."""
    length, dim = x.shape
    dist = torch.cdist(x[None].float(), x[None].float())[0] / dim**0.5
    density = [math.exp(-(dist[i].topk(k, largest=False).values ** 2).mean().item()) for i in range(length)]
    dist_max = dist.max().item()
    score = []
    for i in range(length):
        denser = [j for j in range(length) if density[j] > density[i] or (density[j] == density[i] and j < i)]
        parent = min([dist[i, j].item() for j in denser], default=dist_max)
        score.append(min(parent, dist_max) * density[i])
    centres = sorted(range(length), key=lambda i: (-score[i], i))[:cluster_num]
    return sorted(centres), dist


def reference_clustering(x, centres, dist, beta):
    """``merge_tokens_by_clustering`` (its default BETA path) on one row: one token per centre."""
    others = [i for i in range(x.shape[0]) if i not in centres]
    nearest = {i: min(range(len(centres)), key=lambda c: (dist[i, centres[c]].item(), c)) for i in others}
    tokens = []
    for c, centre in enumerate(centres):
        members = [i for i in others if nearest[i] == c]
        if members:
            tokens.append(beta * x[centre] + (1 - beta) * x[members].mean(dim=0))
        else:
            tokens.append(x[centre])
    return tokens


def reference_frame(feat, attn, pos, ratio, d, beta, k):
    """``merge_tokens_by_attention_density`` on one frame: (positions, tokens), dominant then contextual."""
    length = feat.shape[0]
    dominant_num = round(math.ceil(length * ratio) * (1 - d))
    contextual_num = math.ceil(length * ratio) - dominant_num
    top = sorted(sorted(range(length), key=lambda i: (-attn[i].item(), i))[:dominant_num])
    positions, tokens = [pos[i] for i in top], [feat[i] for i in top]
    if contextual_num > 0:
        rest = [i for i in range(length) if i not in top]
        centres, dist = reference_dpc_knn(feat[rest], contextual_num, min(k, contextual_num))
        positions += [pos[rest[c]] for c in centres]
        tokens += reference_clustering(feat[rest], centres, dist, beta)
    return positions, tokens


def reference_segments(features, attention, r, tau, beta=0.6, d=0.0, k=7, max_window=1024):
    """The outer-LLM stage of ``prepare_inputs_labels_for_multimodal`` for one video, per window as ``holitom`` gets
    it: ``(start, (static positions, static tokens), [(positions, tokens) of each frame's dynamic tokens])``."""
    num_frames, n, _ = features.shape
    normed = F.normalize(features.float(), p=2, dim=-1)
    feature_sim = F.cosine_similarity(normed[:-1], normed[1:], dim=-1)
    windows, reduced = reference_windows(feature_sim, num_frames, tau, max_window)
    total = num_frames * n
    ratio = min(r / ((total - reduced) / total), 1)
    segments = []
    for start, end in windows:
        static = [p for p in range(n) if end > start and bool((feature_sim[start:end, p] > tau).all())]
        dynamic = [p for p in range(n) if p not in static]
        merged_static = ([], [])
        if end > start:  # merge_tokens_by_density on the static tokens averaged over the window
            static_feat = features[start : end + 1, static].float().mean(dim=0)
            cluster_num = round(len(static) * ratio)
            if cluster_num > 0:
                centres, dist = reference_dpc_knn(static_feat, cluster_num, min(k, cluster_num))
                merged_static = ([static[c] for c in centres], reference_clustering(static_feat, centres, dist, beta))
        frames = [reference_frame(features[frame, dynamic].float(), attention[frame, dynamic], dynamic, ratio, d,
                                  beta, k) for frame in range(start, end + 1)]
        segments.append((start, merged_static, frames))
    return segments


def reference_holitom(features, attention, r, tau, beta=0.6, d=0.0, k=7, max_window=1024):
    """The one_token layout of :func:`reference_segments`: (index, per_frame, values) of the kept tokens in output
    order (per window its static tokens in its first frame, then each frame's dynamic ones)."""
    num_frames, n, _ = features.shape
    index, per_frame, values = [], [0] * num_frames, []

    def emit(frame, positions, tokens):
        index.extend(frame * n + p for p in positions)
        per_frame[frame] += len(positions)
        values.extend(tokens)

    for start, static, frames in reference_segments(features, attention, r, tau, beta, d, k, max_window):
        emit(start, *static)
        for offset, (positions, tokens) in enumerate(frames):
            emit(start + offset, positions, tokens)
    return index, per_frame, torch.stack(values) if values else torch.zeros(0, features.shape[-1])


def known_answer_video():
    """Frames 0-2 identical (every token static: one window saving 2 * 4 tokens), frames 3 and 4 unlike their
    predecessors (cosine < 0.8 for every token). Frame 0's tokens are two tight pairs, {a, a + 0.01 e2} and
    {b, b + 0.01 e1}."""
    a, a2, b, b2 = [1.0, 0, 0], [1.0, 0.01, 0], [0, 1.0, 0], [0.01, 1.0, 0]
    first = torch.tensor([a, a2, b, b2])
    frame3 = torch.tensor([[0, 0, 1.0], [0, 1.0, 1.0], [1.0, 0, 1.0], [1.0, 1.0, 0]])
    frame4 = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    features = torch.stack([first, first, first, frame3, frame4])
    attention = torch.tensor([[0.1, 0.2, 0.3, 0.4]] * 3 + [[0.4, 0.1, 0.3, 0.2], [0.1, 0.2, 0.2, 0.5]])
    return features, attention


def test_the_known_answer_video():
    """Derived by hand: window (0, 2) saves 2 * 4 tokens of 20, so r' = 0.3 / (12 / 20) = 0.5. The 4 static tokens
    become round(4 * 0.5) = 2 clusters: within each pair the densities tie and the lower index is the denser, so the
    centres are 0 (the densest) and 2 (b, far from the denser a pair); 1 joins 0 and 3 joins 2, each centre becomes
    0.6 * itself + 0.4 * its member. Frames 3 and 4 keep ceil(4 * 0.5) = 2 tokens each by attention, spatial order
    (frame 4's tie at 0.2 goes to the lower index)."""
    features, attention = known_answer_video()
    assert static_windows(holitom.frame_similarity(features), 0.8, 1024) == ([(0, 2), (3, 3), (4, 4)], 8)
    selection = HoliTom(0.3).select(features, attention=attention)
    assert selection.index.tolist() == [0, 2, 12 + 0, 12 + 2, 16 + 1, 16 + 3]
    assert selection.per_frame.tolist() == [2, 0, 0, 2, 2]
    first = features[0]
    expected = torch.stack([0.6 * first[0] + 0.4 * first[1], 0.6 * first[2] + 0.4 * first[3],
                            features[3, 0], features[3, 2], features[4, 1], features[4, 3]])
    torch.testing.assert_close(selection.values, expected)
    index, per_frame, values = reference_holitom(features, attention, 0.3, 0.8)
    assert (selection.index.tolist(), selection.per_frame.tolist()) == (index, per_frame)
    torch.testing.assert_close(selection.values, values)


def test_a_short_max_window_splits_the_segment():
    """max_window 2: the three identical frames make a window of two and a single frame (saving 4, not 8)."""
    features, _ = known_answer_video()
    windows, saved = static_windows(holitom.frame_similarity(features), 0.8, 2)
    assert (windows, saved) == ([(0, 1), (2, 2), (3, 3), (4, 4)], 4)


def redundant_video(seed, frames=8, tokens=16, dim=12):
    """Random frames in runs of four (frames 0-3, 4-7): in each run about half of the tokens follow their predecessor
    all along and a few more for one frame, each with its own noise level (so the threshold matters)."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(frames, tokens, dim, generator=generator)
    scale = 0.6 * torch.rand(tokens, 1, generator=generator)
    for frame in range(frames):
        if frame % 4 == 0:
            persistent = torch.rand(tokens, generator=generator) < 0.5
            continue
        repeat = persistent | (torch.rand(tokens, generator=generator) < 0.3)
        noise = scale * torch.randn(tokens, dim, generator=generator)
        features[frame, repeat] = features[frame - 1, repeat] + noise[repeat]
    return features, torch.rand(frames, tokens, generator=generator)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(("r", "tau", "d", "max_window"), [(0.15, 0.8, 0.0, 1024), (0.3, 0.9, 0.0, 3),
                                                           (0.5, 0.8, 0.5, 1024), (0.25, 0.5, 1.0, 1024)])
def test_random_videos_match_the_reference(seed, r, tau, d, max_window):
    features, attention = redundant_video(seed)
    selection = HoliTom(r, tau, d=d, max_window=max_window).select(features, attention=attention)
    index, per_frame, values = reference_holitom(features, attention, r, tau, d=d, max_window=max_window)
    assert selection.index.tolist() == index
    assert selection.per_frame.tolist() == per_frame
    torch.testing.assert_close(selection.values, values)
    windows, _ = static_windows(holitom.frame_similarity(features), tau, max_window)
    if tau == 0.8:  # the videos have long static windows: the segmentation and the static merge are exercised
        assert any(end - start >= 2 for start, end in windows)


def test_a_single_frame_and_half_precision():
    features, attention = redundant_video(5, frames=1)
    selection = HoliTom(0.25).select(features.bfloat16(), attention=attention)
    index, per_frame, _ = reference_holitom(features.bfloat16(), attention, 0.25, 0.8)
    assert selection.index.tolist() == index and per_frame == [4]
    assert selection.values.dtype == torch.bfloat16


# ---- the inner-LLM merge --------------------------------------------------------------------------------------------


def public_merge(hidden_states, top_attention_rank_index, non_topk_indices):
    """The merge of ``Qwen2Model_holitom.forward`` (one row's kept and dropped positions): each dropped token in
    position order averaged into its most cosine-similar kept token, in place."""
    hidden_states = hidden_states.clone()
    non_topk_states = hidden_states[:, non_topk_indices, :]
    topk_states = hidden_states[:, top_attention_rank_index, :]
    non_topk_norm = torch.norm(non_topk_states, dim=-1, keepdim=True)
    topk_norm = torch.norm(topk_states, dim=-1, keepdim=True)
    sim_matrix = torch.bmm(non_topk_states, topk_states.transpose(1, 2)) / (non_topk_norm * topk_norm.transpose(1, 2))
    _, sim_max_index = torch.max(sim_matrix, dim=-1)
    for b in range(hidden_states.size(0)):
        for i in range(len(non_topk_indices)):
            target = top_attention_rank_index[sim_max_index[b, i]]
            hidden_states[b, target, :] = (hidden_states[b, target, :] + hidden_states[b, non_topk_indices[i], :]) / 2
    return hidden_states


def test_the_merge_equals_the_public_loop_row_by_row():
    """Two rows with different video spans and kept sets; only kept tokens change, by the public running average."""
    generator = torch.Generator().manual_seed(7)
    hidden = torch.randn(2, 30, 8, generator=generator)
    video = torch.zeros(2, 30, dtype=torch.bool)
    video[0, 3:23], video[1, 8:20] = True, True
    kept = torch.zeros_like(video)
    kept[0, [4, 9, 10, 17, 22]], kept[1, [8, 15]] = True, True
    merged = merge_into_kept(hidden, video, kept, max_kept=5, max_dropped=15)
    for row in range(2):
        kept_pos = kept[row].nonzero().flatten()
        dropped_pos = (video[row] & ~kept[row]).nonzero().flatten()
        expected = public_merge(hidden[row : row + 1], kept_pos.flip(0), dropped_pos)[0]
        torch.testing.assert_close(merged[row], expected)
        assert not torch.equal(merged[row, kept_pos], hidden[row, kept_pos])


class MergedHoliTom:
    """HoliTom's inner-LLM rule on an eager model (batch 1) that keeps the full sequence: layer K-1's attention of the
    last prompt token keeps the top round(n * (1 - r)) video tokens; before layer K the prefill's hidden states get
    the public merge; layers >= K see the dropped tokens hidden by the mask (positions unchanged)."""

    def __init__(self, model, positions, layer, ratio):
        self.positions, self.keep = positions, round(len(positions) * (1 - ratio))
        layers = decoder_layers(model)
        self.handles = [layers[layer - 1].self_attn.register_forward_hook(self.rank),
                        layers[layer].register_forward_pre_hook(self.merge, with_kwargs=True)]
        self.handles += [later.self_attn.register_forward_pre_hook(self.hide, with_kwargs=True)
                         for later in layers[layer:]]

    def rank(self, module, args, output):
        weights = output[1]
        if weights.shape[2] == 1:
            return
        attention = weights[0].mean(dim=0)[-1][self.positions]
        self.kept = self.positions[attention.topk(self.keep).indices]
        self.dropped = self.positions[~torch.isin(self.positions, self.kept)]

    def merge(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] == 1:
            return None
        hidden = public_merge(hidden, self.kept, self.dropped)
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    def hide(self, module, args, kwargs):
        mask = kwargs["attention_mask"]
        kwargs["attention_mask"] = mask.index_fill(-1, self.dropped, torch.finfo(mask.dtype).min)
        return args, kwargs

    def remove(self):
        for handle in self.handles:
            handle.remove()


LAYER, LLM_R, OUTER_R, STEPS, FRAMES = 2, 0.5, 0.5, 6, 8
VARIANTS = cache_variants()


@pytest.fixture(scope="module")
def models(tiny_checkpoint):
    outer = {"compressor": "holitom", "holitom_r": OUTER_R, "holitom_t": 0.3}
    tokenizer, model = load(tiny_checkpoint, **outer, holitom_k=LAYER, holitom_llm_r=LLM_R)
    _, reference = load(tiny_checkpoint, "eager", **outer, holitom_k=LAYER, holitom_llm_r=0)  # the outer stage only
    return tokenizer, model, reference


@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_the_merged_full_sequence_reference(models, variant):
    tokenizer, model, reference = models
    ids, video = prompt(tokenizer), random_video(FRAMES, model.get_vision_tower().image_size, seed=3)
    positions = video_positions(reference, ids, video)
    assert torch.equal(positions, video_positions(model, ids, video))  # the same outer-LLM stage
    rule = MergedHoliTom(reference, positions, LAYER, LLM_R)
    try:
        ref_tokens, ref_logits = greedy(reference, tokenizer, ids, [video], STEPS)
    finally:
        rule.remove()
    _, unmerged = greedy(reference, tokenizer, ids, [video], STEPS)
    tokens, logits = greedy(model, tokenizer, ids, [video], STEPS, **VARIANTS[variant])
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=3e-5)
    assert not torch.allclose(logits, unmerged, rtol=1e-3, atol=1e-3)
    stats = model.last_compression_stats
    assert stats["video_tokens_after"] < stats["video_tokens_before"] and len(positions) == stats["video_tokens_after"]
    merged = stats["holitom"]
    assert merged["pruned"] and merged["kept_video_positions"][0] == sorted(rule.kept.tolist())
    assert merged["kept_image_tokens"] == [round(len(positions) * (1 - LLM_R))]
    assert merged["decode_steps"] == STEPS - 1


def test_merging_is_not_dropping(models):
    """The same kept set without the merge (the hidden-token FastV rule) gives other logits: the merge matters."""
    tokenizer, model, reference = models
    ids, video = prompt(tokenizer), random_video(FRAMES, model.get_vision_tower().image_size, seed=3)
    rule = MergedHoliTom(reference, video_positions(reference, ids, video), LAYER, LLM_R)
    rule.handles.pop(1).remove()  # no merge hook: only hiding
    try:
        _, dropped_logits = greedy(reference, tokenizer, ids, [video], 2)
    finally:
        rule.remove()
    _, logits = greedy(model, tokenizer, ids, [video], 2)
    assert not torch.allclose(logits, dropped_logits, rtol=1e-4, atol=1e-4)


def test_a_padded_batch_equals_each_row_alone(models):
    tokenizer, model, _ = models
    size = model.get_vision_tower().image_size
    ids = [prompt(tokenizer), prompt(tokenizer, "Which colours appear, and what moves in this short clip?")]
    videos = [random_video(FRAMES, size, seed=5), random_video(FRAMES - 3, size, seed=6)]
    padded = torch.full((2, max(i.shape[1] for i in ids)), tokenizer.pad_token_id)
    mask = torch.zeros_like(padded)
    for row, i in enumerate(ids):  # left padding
        padded[row, padded.shape[1] - i.shape[1]:], mask[row, padded.shape[1] - i.shape[1]:] = i[0], 1
    for variant in ("dynamic", "static"):
        alone = [greedy(model, tokenizer, i, [v], 4, **VARIANTS[variant]) for i, v in zip(ids, videos)]
        tokens, logits = greedy(model, tokenizer, padded, videos, 4, attention_mask=mask, **VARIANTS[variant])
        for row, (row_tokens, row_logits) in enumerate(alone):
            assert torch.equal(tokens[row], row_tokens[0]), (variant, row)
            torch.testing.assert_close(logits[row], row_logits[0], rtol=1e-4, atol=1e-4)
        kept = model.last_compression_stats["holitom"]["kept_image_tokens"]
        assert kept[0] != kept[1]  # rows of different lengths: the compact layout has invalid slots


# ---- settings -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("build", "name"), [
    (lambda: HoliTom(r=0), "holitom_r"),
    (lambda: HoliTom(t=1.5), "holitom_t"),
    (lambda: HoliTom(beta=-0.1), "holitom_beta"),
    (lambda: HoliTom(d=2), "holitom_d"),
    (lambda: HoliTom(knn=0.5), "holitom_knn"),
    (lambda: HoliTom(max_window=0), "holitom_max_window"),
    (lambda: HoliTomMerge(layer=0), "holitom_k"),
    (lambda: HoliTomMerge(ratio=1.0), "holitom_llm_r"),
])
def test_bad_settings_name_the_argument(build, name):
    with pytest.raises(ValueError, match=name):
        build()


def test_a_layer_beyond_the_model_names_the_argument(models):
    _, model, _ = models
    with pytest.raises(ValueError, match="holitom_k"):
        model.configure_compression(holitom_k=4)  # the tiny model has 4 layers: K is in [1, 3]


def test_the_tower_attention_is_required():
    features, _ = known_answer_video()
    with pytest.raises(ValueError, match="attention="):
        HoliTom().select(features)


# ---- LLaVA-Video's grid layout --------------------------------------------------------------------------------------


def public_add_newline_token(positions, tokens, grid_size, newline):
    """``add_newline_token`` on one frame's tokens sorted by position: each row's tokens, then one newline if the row
    has any. Returns (token, is_visual) pairs."""
    out = []
    for row in range(grid_size):
        found = [(token, True) for position, token in zip(positions, tokens) if position // grid_size == row]
        out += found + [(newline, False)] * bool(found)
    return out


def reference_grid_sequence(features, attention, newline, r, tau, **kwargs):
    """The ``mm_newline_position == "grid"`` branch of ``holitom`` (cokeshao/HoliTom e9b2972f, holitom/llava_arch.py,
    ``LlavaMetaForCausalLM_holitom.holitom`` with ``add_newline_token``), one window after the other: the window's
    static tokens and its first frame's dynamic ones sorted together by position, then each later frame's dynamic
    tokens sorted; each with one newline after every row that keeps a token. Returns (tokens (M', D), is_visual)."""
    grid_size = int(math.sqrt(features.shape[1]))
    pairs = []
    for _, (static_pos, static_tokens), frames in reference_segments(features, attention, r, tau, **kwargs):
        first = (static_pos + frames[0][0], static_tokens + frames[0][1])
        for positions, tokens in [first, *frames[1:]]:
            order = sorted(range(len(positions)), key=positions.__getitem__)
            pairs += public_add_newline_token([positions[i] for i in order], [tokens[i] for i in order], grid_size,
                                              newline)
    return torch.stack([token.float() for token, _ in pairs]), torch.tensor([visual for _, visual in pairs])


VIDEO_R, VIDEO_T = 0.3, 0.7
VIDEO_HOLITOM = {"compressor": "holitom", "holitom_r": VIDEO_R, "holitom_t": VIDEO_T, "holitom_k": LAYER,
                 "holitom_llm_r": 0}  # the outer-LLM stage only


@pytest.fixture(scope="module")
def video_model(tiny_video_checkpoint):
    """The LLaVA-Video checkpoint (grid newlines, 3 x 3 tokens per frame) with HoliTom."""
    return load(tiny_video_checkpoint, **VIDEO_HOLITOM)


def static_video(size):
    """Frames 0-2 equal (a static window whose later frames keep nothing), then five random frames."""
    video = random_video(FRAMES, size, seed=9)
    video[1:3] = video[0]
    return video


def spied_inputs(model, monkeypatch):
    """What HoliTom's ``select`` receives (the pooled features and tower attention), recorded on each call."""
    compressor, seen = model.video_compressor(), {}
    select = compressor.select

    def spy(features, **inputs):
        seen.update(features=features, **inputs)
        return select(features, **inputs)

    monkeypatch.setattr(compressor, "select", spy)
    return seen


def test_llava_video_places_newlines_as_the_public_code(video_model, monkeypatch):
    """The whole prompt embedding the LM sees on LLaVA-Video equals the text embeddings around the public grid
    branch's sequence (a row that keeps nothing has no newline, frames 1 and 2 contribute nothing)."""
    tokenizer, model = video_model
    ids, video = prompt(tokenizer), static_video(model.get_vision_tower().image_size)
    seen = spied_inputs(model, monkeypatch)
    mm = model.build_multimodal_inputs(ids, None, None, [video], ["video"], None, padding_side="left")
    newline = model.get_model().image_newline
    ref_tokens, ref_visual = reference_grid_sequence(seen["features"], seen["attention"], newline, VIDEO_R, VIDEO_T)
    at = int((ids[0] == IMAGE_TOKEN_INDEX).nonzero())
    embed = model.get_model().embed_tokens
    expected = torch.cat([embed(ids[0, :at]), ref_tokens, embed(ids[0, at + 1 :])])
    torch.testing.assert_close(mm.inputs_embeds[0], expected)
    assert torch.equal(mm.video_token_mask[0, at : at + len(ref_visual)], ref_visual)
    # The case is discriminating: the equal frames' window, another multi-frame window (static tokens sorted in among
    # its first frame's dynamic ones), and fewer newlines than rows (the default rule keeps every row's).
    frames, tokens_per_frame, _ = seen["features"].shape
    windows, _ = static_windows(holitom.frame_similarity(seen["features"]), VIDEO_T, 1024)
    assert windows[0] == (0, 2) and any(end > start for start, end in windows[1:])
    assert int((~ref_visual).sum()) < frames * math.isqrt(tokens_per_frame)


def test_other_layouts_keep_every_row_newline(video_model):
    """VidCom2 on the same model, and HoliTom with keep_positions: every frame keeps its h row newlines."""
    _, model = video_model
    video = static_video(model.get_vision_tower().image_size)
    frames, side = FRAMES, model.get_vision_tower().num_patches_per_side // 2  # average pooling floors
    newline = model.get_model().image_newline
    try:
        for settings in ({"compressor": "vidcom2", "vidcom2_r": 0.1}, {**VIDEO_HOLITOM, "keep_positions": True}):
            model.configure_compression(**settings)
            tokens, mask, record = model.encode_visual_items([video], ["video"], None)[0]
            assert int(mask.sum()) == record.selection.num_kept < frames * side * side
            assert torch.equal(tokens[~mask], newline.expand(frames * side, -1))
            if "vidcom2_r" in settings:  # grouped at each frame's end: the public VidCom2 rule
                expected = assemble_video_tokens(record.pooled, record.selection, newline, "grid", (side, side))
                assert torch.equal(tokens, expected.tokens)
    finally:
        model.configure_compression(**VIDEO_HOLITOM, keep_positions=False)
