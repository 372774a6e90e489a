"""FastVID token selection and merging (llava.compression.fastvid) against a loop transcription of the public code."""

import json
import math

import pytest
import torch

from llava.compression.base import TokenSelection
from llava.compression.fastvid import (
    FastVID,
    fastvid_context_counts,
    fastvid_default_inputs,
    fastvid_pool_saliency,
    fastvid_segments,
)


def _unit(v):
    norm = math.sqrt(sum(a * a for a in v))
    return [a / max(norm, 1e-12) for a in v]


def _dot(a, b):
    return sum(p * q for p, q in zip(a, b))


def reference_segments(frame_global, c, tau):
    """DySeg by loops: a cut after frame i when cos(g_i, g_i+1) is among the c - 1 lowest or below tau."""
    g = [_unit(v) for v in frame_global.double().tolist()]
    sims = [_dot(g[i], g[i + 1]) for i in range(len(g) - 1)]
    lowest = sorted(range(len(sims)), key=lambda i: (sims[i], i))[: c - 1]
    cuts = sorted(set(lowest) | {i for i, s in enumerate(sims) if s < tau})
    sizes, previous = [], -1
    for cut in cuts + [len(g) - 1]:
        sizes.append(cut - previous)
        previous = cut
    return sizes


def reference_fastvid(features, frame_global, saliency, r, c, tau, d, p, beta):
    """(index, per_frame, values) by plain loops in float64, transcribed from the FastVID block of
    ``Qwen2Model.forward`` in the public FastVID code (LunarShen/FastVID @ a40a109,
    fastvid_llavaonevision/LLaVA-NeXT/llava/model/language_model/modeling_qwen2.py): DySeg, anchor token
    distribution, ATS, density scores, DTM for single-frame segments (frames whose share equals C) and for
    multi-frame segments (frames whose share exceeds C), final sort by position. With the fixes the module
    documents: counts clamped to what exists, ties to the lower index, no random density noise."""
    num_frames, n_tok, dim = features.shape
    x = features.double().tolist()
    sal = saliency.double().tolist()
    sizes = reference_segments(frame_global, c, tau)

    retain = int(n_tok * r)
    salient = retain - int(retain * d)
    context = retain - salient
    counts = []  # anchor token distribution
    for length in sizes:
        anchors = math.ceil(length / p)
        share = context * length // anchors
        counts += [share if (length - 1 - j) % p == 0 else 0 for j in range(length)]

    kept = {}  # position in the video -> value
    rest, scores = [], []
    for f in range(num_frames):
        top = sorted(range(n_tok), key=lambda n: (-sal[f][n], n))[:salient]  # ATS
        for n in top:
            kept[f * n_tok + n] = x[f][n]
        others = [n for n in range(n_tok) if n not in top]
        rest.append(others)
        dist = [[math.dist(x[f][i], x[f][j]) / math.sqrt(dim) for j in others] for i in others]
        density = []
        for row in dist:
            nearest = sorted(row)[:4]
            density.append(math.exp(-sum(v * v for v in nearest) / len(nearest)))
        dist_max = max((max(row) for row in dist), default=0.0)
        frame_scores = []
        for i in range(len(others)):
            to_denser = [dist[i][j] for j in range(len(others))
                         if density[j] > density[i] or (density[j] == density[i] and j < i)]
            frame_scores.append((min(to_denser) if to_denser else dist_max) * density[i])
        scores.append(frame_scores)

    def top_context(f, k):
        order = sorted(range(len(rest[f])), key=lambda i: (-scores[f][i], i))[:k]
        return [rest[f][i] for i in order]

    def merge(pool, targets):
        groups = [[] for _ in targets]
        units = [_unit(t) for t in targets]
        for v in pool:
            sims = [_dot(_unit(v), u) for u in units]
            groups[max(range(len(units)), key=lambda k: (sims[k], -k))].append(v)  # first max
        merged = []
        for t, group in zip(targets, groups):
            w = max(1.0 / (len(group) + 1), beta)
            mean = [sum(col) / len(group) for col in zip(*group)] if group else [0.0] * dim
            merged.append([w * a + (1 - w) * m for a, m in zip(t, mean)])
        return merged

    if context > 0:
        for f in range(num_frames):  # DTM for single-frame segments
            if counts[f] == context:
                chosen = top_context(f, context)
                pool = [x[f][n] for n in rest[f]]
                for n, v in zip(chosen, merge(pool, [x[f][n] for n in chosen])):
                    kept[f * n_tok + n] = v
        start = 0
        for length in sizes:  # DTM for multi-frame segments
            frames = range(start, start + length)
            pool = [x[g][n] for g in frames for n in rest[g]]
            for f in frames:
                if counts[f] > context:
                    chosen = top_context(f, min(counts[start + length - 1], n_tok - salient))
                    for n, v in zip(chosen, merge(pool, [x[f][n] for n in chosen])):
                        kept[f * n_tok + n] = v
            start += length

    index = sorted(kept)
    per_frame = [sum(1 for i in index if i // n_tok == f) for f in range(num_frames)]
    return index, per_frame, torch.tensor([kept[i] for i in index], dtype=torch.float64).reshape(-1, dim)


def reference_budget(sizes, n_tok, r, d, p):
    """Kept tokens: per segment, S per frame plus ceil(L / p) anchor frames of min(share, N - S) tokens."""
    retain = int(n_tok * r)
    salient = retain - int(retain * d)
    context = retain - salient
    total = 0
    for length in sizes:
        anchors = math.ceil(length / p)
        total += length * salient + anchors * min(context * length // anchors, n_tok - salient)
    return total


def assert_values_close(actual, expected, dtype):
    tol = {"rtol": 2**-7, "atol": 1e-5} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(actual.double(), expected, **tol)


# (r, c, tau, d, p, beta): single-frame segments, multi-frame segments, one segment (shares capped at N - S),
# every frame an anchor, no contextual tokens.
SETTINGS = [
    (0.5, 2, 0.0, 0.4, 2, 0.6),
    (0.25, 3, 0.5, 0.4, 4, 0.6),
    (1.0, 1, -1.0, 0.4, 4, 0.6),
    (0.3, 8, 0.9, 0.5, 1, 0.2),
    (0.4, 2, 0.9, 0.0, 2, 0.6),
]


def video(num_frames, n_tok, dim, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    feats = (torch.randn(1, n_tok, dim, generator=gen) + 0.5 * torch.randn(num_frames, n_tok, dim, generator=gen))
    # Frame globals close to each other (long segments) with random jumps, and random saliency.
    frame_global = torch.randn(1, 6, generator=gen) + 0.3 * torch.randn(num_frames, 6, generator=gen)
    frame_global[num_frames // 2 :] += torch.randn(6, generator=gen)
    saliency = torch.rand(num_frames, n_tok, generator=gen)
    return feats.to(dtype), frame_global, saliency


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grid_hw", [(4, 4), (3, 4), (2, 5)])
@pytest.mark.parametrize("num_frames", [1, 2, 5, 8])
@pytest.mark.parametrize("setting", SETTINGS)
def test_matches_loop_reference(setting, num_frames, grid_hw, dtype):
    r, c, tau, d, p, beta = setting
    n_tok = grid_hw[0] * grid_hw[1]
    feats, frame_global, saliency = video(num_frames, n_tok, 6, dtype, seed=num_frames * 10 + n_tok)
    sel = FastVID(r, c, tau, d, p, beta).select(feats, grid_hw, frame_global=frame_global, saliency=saliency)
    index, per_frame, values = reference_fastvid(feats, frame_global, saliency, r, c, tau, d, p, beta)
    assert isinstance(sel, TokenSelection) and sel.index.dtype == torch.long
    assert sel.index.tolist() == index
    assert sel.per_frame.tolist() == per_frame
    assert sel.values.dtype == dtype
    assert_values_close(sel.values, values, dtype)
    sizes = reference_segments(frame_global, c, tau)
    assert sel.num_kept == reference_budget(sizes, n_tok, r, d, p)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_frames", [1, 5])
def test_default_inputs_match_loop_reference(num_frames, dtype):
    """Without the encoder's inputs: the frame's mean token, and softmax(x . mean / sqrt(D)) over its tokens."""
    feats, _, _ = video(num_frames, 12, 6, dtype, seed=5)
    frame_global, saliency = fastvid_default_inputs(feats)
    x = feats.double().tolist()
    for f in range(num_frames):
        mean = [sum(col) / 12 for col in zip(*x[f])]
        logits = [_dot(v, mean) / math.sqrt(6) for v in x[f]]
        total = sum(math.exp(v) for v in logits)
        torch.testing.assert_close(frame_global[f].double(), torch.tensor(mean, dtype=torch.float64))
        torch.testing.assert_close(saliency[f].double(), torch.tensor([math.exp(v) / total for v in logits],
                                                                       dtype=torch.float64))
    setting = (0.5, 2, 0.9, 0.4, 2, 0.6)
    sel = FastVID(*setting).select(feats, frame_global=frame_global, saliency=saliency)
    index, per_frame, values = reference_fastvid(feats, frame_global, saliency, *setting)
    assert (sel.index.tolist(), sel.per_frame.tolist()) == (index, per_frame)
    assert_values_close(sel.values, values, dtype)


def stand_in(feats):
    """The explicit stand-in for the head's inputs, where a test is about the selection, not the inputs."""
    frame_global, saliency = fastvid_default_inputs(feats)
    return {"frame_global": frame_global, "saliency": saliency}


def clusters(offset_e3=0.0):
    """One frame of 12 tokens in 4 dims: salient tokens at 0 and 7; cluster A (centre at 3, on e1) and
    cluster B (centre at 8, on e2), each a centre and 4 tokens around it at +-0.1 e3, +0.1 e4, -0.2 e4.
    The centres are their clusters' densest tokens and the two density peaks."""
    e = torch.eye(4, dtype=torch.float64)
    around = [0.1 * e[2], -0.1 * e[2], 0.1 * e[3], -0.2 * e[3]]
    frame = torch.zeros(12, 4, dtype=torch.float64)
    frame[0], frame[7] = torch.tensor([-3.0, 1.0, 2.0, 0.5]), torch.tensor([1.0, -4.0, 0.0, 2.0])
    for centre, positions, axis in ((3, [1, 2, 4, 5], e[0]), (8, [6, 9, 10, 11], e[1])):
        frame[centre] = 10 * axis
        for pos, delta in zip(positions, around):
            frame[pos] = 10 * axis + delta
    frame[[1, 2, 3, 4, 5]] += offset_e3 * e[2]
    return frame


SALIENCY = torch.tensor([[9.0, 0, 0, 0, 0, 0, 0, 8.0, 0, 0, 0, 0]])


def test_known_answer_single_frame():
    """S = 2 salient (0 and 7), C = 2 contextual: the two cluster centres, each merged with its cluster:
    w = max(1 / (5 + 1), 0.6) = 0.6 and the cluster mean is centre - 0.02 e4, so centre - 0.008 e4."""
    feats = clusters()[None].float()
    sel = FastVID(0.34, stprune_d=0.5).select(feats, (3, 4), frame_global=torch.ones(1, 3), saliency=SALIENCY)
    assert FastVID(0.34, stprune_d=0.5).token_counts(12) == (2, 2)
    assert sel.index.tolist() == [0, 3, 7, 8]
    assert sel.per_frame.tolist() == [4]
    expected = clusters()[[0, 3, 7, 8]].clone()
    expected[[1, 3], 3] -= 0.008
    torch.testing.assert_close(sel.values.double(), expected, rtol=0, atol=1e-6)


def test_known_answer_duplicate_peak_counts_once():
    """Token 1 duplicates cluster A's centre (token 3): equal densities, and the public code's random noise
    makes one the other's denser neighbour, so the pair is ONE density peak (here the lower index, token 1)
    and the second contextual token is cluster B's centre. A's mean is centre - 0.02 (e3 + e4)."""
    frame = clusters()
    frame[1] = frame[3]
    sel = FastVID(0.34, stprune_d=0.5).select(frame[None].float(), frame_global=torch.ones(1, 3), saliency=SALIENCY)
    assert sel.index.tolist() == [0, 1, 7, 8]
    expected = frame[[0, 1, 7, 8]].clone()
    expected[1, 2:] -= 0.008
    expected[3, 3] -= 0.008
    torch.testing.assert_close(sel.values.double(), expected, rtol=0, atol=1e-6)


def test_known_answer_two_frame_segment():
    """Two similar frames, one segment (c = 1, tau = -1), dtm_p = 2: frame 1 is the only anchor frame and
    keeps the segment's 2 x C = 2 contextual tokens, the centres; frame 0 keeps its salient tokens only.
    The centres merge the non-salient tokens of both frames: cluster A's 10 tokens, frame 0's shifted by
    0.05 e3, have mean centre - 0.02 e4 + 0.025 e3, so the merged centre is centre - 0.008 e4 + 0.01 e3."""
    feats = torch.stack([clusters(offset_e3=0.05), clusters()]).float()
    fastvid = FastVID(0.25, dyseg_c=1, dyseg_tau=-1.0, stprune_d=0.4, dtm_p=2)
    assert fastvid.token_counts(12) == (2, 1)
    sel = fastvid.select(feats, frame_global=torch.ones(2, 3), saliency=SALIENCY.expand(2, -1))
    assert sel.index.tolist() == [0, 7, 12, 15, 19, 20]
    assert sel.per_frame.tolist() == [2, 4]
    expected = clusters()[[0, 7, 0, 3, 7, 8]].clone()
    expected[3, 3] -= 0.008
    expected[3, 2] += 0.01
    expected[5, 3] -= 0.008  # cluster B is the same in both frames
    torch.testing.assert_close(sel.values.double(), expected, rtol=0, atol=1e-6)


def test_known_answer_segments_and_anchor_counts():
    e = torch.eye(3)
    frame_global = torch.stack([e[0]] * 3 + [e[1]] * 5)  # a scene change after frame 2
    assert fastvid_segments(frame_global, 2, 0.5) == [3, 5]
    assert fastvid_segments(frame_global, 1, 0.5) == [3, 5]  # the threshold alone
    assert fastvid_segments(frame_global, 1, -1.0) == [8]
    assert fastvid_segments(frame_global, 3, -1.0) == [1, 2, 5]  # the cut, then the earliest of the ties
    assert fastvid_segments(frame_global, 20, 0.5) == [1] * 8  # fewer frames than c: every frame alone
    assert fastvid_segments(frame_global[:1], 8, 0.9) == [1]
    assert fastvid_segments(torch.stack([e[0], e[0], e[1]]), 1, 0.0) == [3]  # a cut needs cos < tau, strictly
    # Anchor frames: the last of each segment and every p-th before it; the segment's budget split between them.
    assert fastvid_context_counts([3, 5], 2, 2) == [3, 0, 3, 3, 0, 3, 0, 3]
    assert fastvid_context_counts([3, 5], 2, 4) == [0, 0, 6, 5, 0, 0, 0, 5]
    assert fastvid_context_counts([1, 2], 7, 1) == [7, 7, 7]


@pytest.mark.parametrize("r", [0.1, 0.25, 0.5])
def test_kept_count_every_frame_an_anchor(r):
    """dtm_p = 1 (or single-frame segments): exactly int(N * r) tokens per frame."""
    feats = torch.randn(8, 196, 8, generator=torch.Generator().manual_seed(0))
    sel = FastVID(r, dtm_p=1).select(feats, (14, 14), **stand_in(feats))
    assert sel.per_frame.tolist() == [int(196 * r)] * 8
    assert int(sel.per_frame.sum()) == sel.num_kept


@pytest.mark.parametrize("r", [0.1, 0.25, 0.5, 1.0])
def test_kept_count_budget_rule_with_long_segments(r):
    feats, frame_global, saliency = video(16, 36, 8, torch.float32, seed=1)
    fastvid = FastVID(r, dyseg_c=2, dyseg_tau=-1.0)
    sel = fastvid.select(feats, frame_global=frame_global, saliency=saliency)
    sizes = reference_segments(frame_global, 2, -1.0)
    assert len(sizes) == 2 and max(sizes) > 4
    assert sel.num_kept == reference_budget(sizes, 36, r, 0.4, 4) <= 16 * int(36 * r)
    frames = (sel.index // 36).tolist()
    assert frames == sorted(frames) and (sel.index[1:] > sel.index[:-1]).all(), "original order"
    assert int(sel.per_frame.sum()) == sel.num_kept == sel.values.shape[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keep_everything(dtype):
    feats = torch.randn(5, 12, 6, generator=torch.Generator().manual_seed(4)).to(dtype)
    sel = FastVID(1.0, stprune_d=0.0).select(feats, (3, 4), **stand_in(feats))
    assert sel.index.tolist() == list(range(60))
    assert sel.per_frame.tolist() == [12] * 5
    assert torch.equal(sel.values, feats.reshape(-1, 6))
    # Every token its own anchor (dtm_p = 1): each merges only itself, 0.6 x + 0.4 x.
    sel = FastVID(1.0, dtm_p=1).select(feats, (3, 4), **stand_in(feats))
    assert sel.index.tolist() == list(range(60))
    assert_values_close(sel.values, feats.reshape(-1, 6).double(), dtype)


def test_pool_saliency_bilinear():
    """get_attn_2dPool: bilinear (align_corners=False) from the encoder's square grid to the token grid,
    checked against the interpolation written out."""
    attention = torch.rand(2, 27 * 27, generator=torch.Generator().manual_seed(0))
    pooled = fastvid_pool_saliency(attention, (14, 14))
    assert pooled.shape == (2, 196)
    a = attention.double().reshape(2, 27, 27).tolist()

    def source(i):
        s = max((i + 0.5) * 27 / 14 - 0.5, 0.0)
        i0 = int(s)
        return i0, min(i0 + 1, 26), s - i0

    for f in range(2):
        for i in range(14):
            y0, y1, ly = source(i)
            for j in range(14):
                x0, x1, lx = source(j)
                want = ((1 - ly) * ((1 - lx) * a[f][y0][x0] + lx * a[f][y0][x1])
                        + ly * ((1 - lx) * a[f][y1][x0] + lx * a[f][y1][x1]))
                assert abs(float(pooled[f, i * 14 + j]) - want) < 1e-6


def test_zero_tokens_per_frame_warns():
    feats = torch.randn(3, 16, 4)
    with pytest.warns(UserWarning, match="fastvid_retention_ratio=0.05"):
        sel = FastVID(0.05).select(feats, **stand_in(feats))
    assert sel.num_kept == 0 and sel.per_frame.tolist() == [0, 0, 0]


def test_defaults_and_describe():
    assert FastVID().describe() == {"name": "fastvid", "retention_ratio": 0.1, "dyseg_c": 8, "dyseg_tau": 0.9,
                                    "stprune_d": 0.4, "dtm_p": 4, "dtm_beta": 0.6}
    # LLaVA-OneVision, 196 tokens per frame: 19 kept, 12 salient and 7 contextual.
    assert FastVID().token_counts(196) == (12, 7)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"retention_ratio": 0}, r"fastvid_retention_ratio=0 is out of range; allowed: \(0, 1\]"),
     ({"retention_ratio": 1.5}, r"fastvid_retention_ratio=1.5 is out of range; allowed: \(0, 1\]"),
     ({"retention_ratio": "0.1"}, r"fastvid_retention_ratio='0.1' must be a number, not a string"),
     ({"retention_ratio": math.nan}, r"fastvid_retention_ratio=nan must be a finite number"),
     ({"dyseg_c": 0}, r"fastvid_dyseg_c=0 is out of range; allowed: \[1, inf\)"),
     ({"dyseg_c": 2.5}, r"fastvid_dyseg_c=2.5 must be an integer"),
     ({"dyseg_c": True}, r"fastvid_dyseg_c=True is not a number"),
     ({"dyseg_tau": 1.5}, r"fastvid_dyseg_tau=1.5 is out of range; allowed: \[-1, 1\]"),
     ({"stprune_d": -0.1}, r"fastvid_stprune_d=-0.1 is out of range; allowed: \[0, 1\]"),
     ({"dtm_p": 0}, r"fastvid_dtm_p=0 is out of range; allowed: \[1, inf\)"),
     ({"dtm_beta": 2}, r"fastvid_dtm_beta=2 is out of range; allowed: \[0, 1\]"),
     ({"dtm_beta": None}, r"fastvid_dtm_beta=None is not a number")],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        FastVID(**kwargs)


def test_invalid_inputs():
    feats = torch.randn(2, 12, 4)
    with pytest.raises(ValueError, match="features"):
        FastVID().select(torch.randn(12, 4))
    with pytest.raises(ValueError, match="grid_hw"):
        FastVID().select(feats, (3, 3))
    with pytest.raises(ValueError, match=r"saliency must be a floating-point tensor of shape \(2, 12\)"):
        FastVID().select(feats, frame_global=torch.rand(2, 5), saliency=torch.rand(2, 9))
    with pytest.raises(ValueError, match=r"frame_global must be a floating-point tensor of shape \(2, any\)"):
        FastVID().select(feats, frame_global=torch.rand(3, 5), saliency=torch.rand(2, 12))
    with pytest.raises(ValueError, match="compressor='fastvid' needs frame_global= and saliency="):  # no stand-in
        FastVID().select(feats, frame_global=torch.rand(2, 5))


# --- In the model: SigLIP's pooling head, read from the tower's own checkpoint ----------------------------------


def reference_head_inputs(tower_folder, patches, post_layernorm, pooled_hw):
    """(frame_global, saliency) as the public ``SigLipVisionAbstract.forward`` and ``get_attn_2dPool`` make them:
    post_layernorm, transformers' own pooling head for the pooled feature; the probe's attention by hand (in_proj
    split into q, k; softmax per head, mean over heads), bilinear to the pooled grid."""
    from safetensors.torch import load_file
    from transformers import SiglipVisionConfig
    from transformers.models.siglip.modeling_siglip import (
        SiglipMultiheadAttentionPoolingHead,
    )

    config = SiglipVisionConfig(**json.loads((tower_folder / "config.json").read_text()))
    weights = {k.split("vision_model.head.", 1)[1]: v for k, v in load_file(tower_folder / "model.safetensors").items()}
    head = SiglipMultiheadAttentionPoolingHead(config)
    head.load_state_dict(weights)
    with torch.no_grad():
        x = post_layernorm(patches).double()
        frame_global = head.double()(x)
        dim, heads = config.hidden_size, config.num_attention_heads
        w, b = weights["attention.in_proj_weight"].double(), weights["attention.in_proj_bias"].double()
        q = weights["probe"].double()[0] @ w[:dim].T + b[:dim]  # (1, dim)
        k = x @ w[dim: 2 * dim].T + b[dim: 2 * dim]  # (F, P, dim)
        hd = dim // heads
        attention = sum(
            torch.softmax((k[..., h * hd:(h + 1) * hd] @ q[0, h * hd:(h + 1) * hd]) / math.sqrt(hd), dim=-1)
            for h in range(heads)
        ) / heads
    return frame_global, fastvid_pool_saliency(attention, pooled_hw)


FASTVID_MODEL_SETTING = {"fastvid_retention_ratio": 0.5, "fastvid_dyseg_c": 2, "fastvid_dtm_p": 2}


def test_the_llava_model_feeds_fastvid_the_pooling_heads_output_and_attention(loaded_tiny, tiny_checkpoint):
    from tests.conftest import random_video as frames
    from tests.test_conformance import prompt_ids

    tokenizer, model, _, _ = loaded_tiny
    tower = model.get_vision_tower()
    video = frames(6, tower.image_size, seed=63)
    before = set(model.state_dict())
    model.configure_compression(compressor="fastvid", **FASTVID_MODEL_SETTING)
    try:
        with model.compression_trace() as trace:
            model.generate(prompt_ids(tokenizer, "What is moving?"), images=[video], modalities=["video"],
                           max_new_tokens=2, do_sample=False)
    finally:
        model.reset_compression()
    side = math.isqrt(trace.pooled.shape[1])
    frame_global, saliency = reference_head_inputs(
        tiny_checkpoint / "vision_tower", tower(video), tower.vision_tower.vision_model.post_layernorm, (side, side))
    index, per_frame, values = reference_fastvid(trace.pooled.double(), frame_global, saliency, 0.5, 2, 0.9, 0.4, 2, 0.6)
    assert trace.selection.index.tolist() == index and trace.selection.per_frame.tolist() == per_frame
    torch.testing.assert_close(trace.selection.values.double(), torch.as_tensor(values).double(), rtol=1e-5, atol=1e-5)
    assert set(model.state_dict()) == before  # the head is read, not added to the model's weights


def test_the_public_argument_names_are_accepted():
    from llava.compression.settings import settings_from_kwargs

    settings = settings_from_kwargs({"compressor": "fastvid", "fastvid_DySeg_c": 4, "fastvid_DTM_beta": 0.5})
    assert (settings.fastvid_dyseg_c, settings.fastvid_dtm_beta) == (4, 0.5)


def test_a_tower_checkpoint_without_the_head_is_refused_by_name(tiny_checkpoint, tmp_path):
    """LLaVA checkpoints do not ship the head; without the tower's own weights FastVID says where it looked."""
    import shutil

    from llava.model.builder import load_pretrained_model

    copy = shutil.copytree(tiny_checkpoint, tmp_path / "no-head")
    (copy / "vision_tower" / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"compressor='fastvid' reads SigLIP's pooling head .* has no \*\.safetensors"):
        load_pretrained_model(str(copy), None, "llava_qwen", device_map="cpu", compressor="fastvid")
    _, model, _, _ = load_pretrained_model(str(copy), None, "llava_qwen", device_map="cpu")
    with pytest.raises(ValueError, match=r"has no \*\.safetensors"):  # at configuration, the model unchanged
        model.configure_compression(compressor="fastvid")
    assert model.compression.compressor == "none"
    model.config.mm_vision_tower = "elsewhere"
    with pytest.raises(ValueError, match=r"mm_vision_tower='elsewhere' is no folder .* and no hub id"):
        model.configure_compression(compressor="fastvid")
    model.config.mm_vision_tower = "google/siglip-so400m-patch14-384"  # the published name, offline here
    with pytest.raises(ValueError, match=r"mm_vision_tower='google/siglip-so400m-patch14-384' .* could not get it"):
        model.configure_compression(compressor="fastvid")
