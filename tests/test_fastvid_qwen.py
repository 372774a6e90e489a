"""FastVID's Qwen2.5-VL selection (llava/compression/fastvid_qwen.py) and its inputs on transformers' Qwen VL models.

Oracles:
* ``reference_fastvid_qwen``: a loop transcription of the public FastVID code (github.com/LunarShen/FastVID at
  a40a109cb8df20e8c2c17c6850f8269717369990, ``fastvid_qwen25vl/lmms-eval/lmms_eval/models/qwenvlutils/
  modeling_qwen2_5_vl.py``, ``Qwen2_5_VLForConditionalGeneration.forward``: DySeg, the per-segment split with
  ``fastvid_DySeg_ignore``, salient / context counts per frame, density peaks, DTM), without its 1e-6 density noise;
* ``reference_frame_attention``: the same file's ``Qwen2_5_VLVisionFlashAttention2.forward`` (per temporal step the
  mean query over the 2x2-averaged keys, softmax, mean over heads) and
  ``Qwen2_5_VisionTransformerPretrainedModel.forward`` (``reverse_indices``), recomputed in loops from the queries
  and keys the model's own eager attention receives in its last vision block;
* budgets derived by hand from the public formulas (known answers);
* each row of a padded batch run alone.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from transformers.vision_utils import get_vision_window_index

import llava.compression.fastvid_qwen  # noqa: F401
from llava.compression import compressed
from llava.compression.fastvid_qwen import FastVIDQwen, fastvid_qwen_budgets
from llava.compression.settings import settings_from_kwargs
from tests import native_models as nm

QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
SIDE = 24  # 6 x 6 patches, 3 x 3 tokens per step: Qwen2.5-VL's 2 x 2 windows split a frame unevenly
SETTINGS = {"compressor": "fastvid", "fastvid_retention_ratio": 0.5, "fastvid_dyseg_c": 2, "fastvid_dyseg_tau": 0.84,
            "fastvid_DySeg_ignore": 0.95, "fastvid_stprune_d": 0.4, "fastvid_dtm_p": 1, "fastvid_dtm_beta": 0.6}


# ---- the references ---------------------------------------------------------------------------------------------


def reference_budgets(global_normed, frm_len, r, d, ignore, p):
    """Per frame of one segment (salient, context), as the public code's counts (lists, in its own structure)."""
    seg_len = global_normed.shape[0]
    seg_retain = int(frm_len * r) * seg_len
    seg_context = max(int(seg_retain * d), 1)
    seg_salient = seg_retain - seg_context
    if seg_len == 1:
        return [seg_salient], [seg_context]
    cuts = [i for i in range(seg_len - 1) if float((global_normed[i] * global_normed[i + 1]).sum()) < ignore]
    if cuts:
        sizes = [cuts[0] + 1] + [cuts[i] - cuts[i - 1] for i in range(1, len(cuts))] + [seg_len - cuts[-1] - 1]
    else:
        sizes = [seg_len]
    groups = len(sizes)
    salient = [seg_salient // groups + (1 if i < seg_salient % groups else 0) for i in range(groups)]
    anchors = (groups + p - 1) // p
    shares = [seg_context // anchors + (1 if i < seg_context % anchors else 0) for i in range(anchors)]
    context, k = [], 0
    for i in range(groups):
        if i % p == 0:
            context.append(min(shares[k], frm_len // 2))
            k += 1
        else:
            context.append(0)
    context.reverse()
    frame_salient, frame_context = [], []
    for g in range(groups):
        frame_salient += [0] * (sizes[g] - 1)
        frame_context += [0] * (sizes[g] - 1)
        if context[g] == 0:
            frame_salient.append(min(salient[g], frm_len))
            frame_context.append(0)
        else:
            frame_context.append(min(context[g], frm_len // 2))
            frame_salient.append(min(salient[g], frm_len - frame_context[-1]))
    return frame_salient, frame_context


def reference_density_peaks(x):
    """Scores of the (M, D) tokens: density (exp of minus the mean squared distance to the 4 nearest, itself
    included) times the distance to the nearest denser token (the largest distance for the densest)."""
    m, dim = x.shape
    dist = torch.cdist(x[None], x[None])[0] / dim**0.5
    density = [math.exp(-sum(float(v) ** 2 for v in sorted(dist[i].tolist())[:4]) / 4) for i in range(m)]
    largest = float(dist.max())
    scores = []
    for i in range(m):
        denser = [float(dist[i, j]) for j in range(m) if density[j] > density[i]]
        scores.append((min(denser) if denser else largest) * density[i])
    return scores


def reference_merge(tokens, targets, merge, beta):
    """DTM: each token of ``merge`` joins its most cosine-similar target (the first on a tie)."""
    normed = tokens / tokens.norm(dim=-1, keepdim=True)
    groups = {t: [] for t in targets}
    for j in merge:
        similarity = [float(normed[j] @ normed[t]) for t in targets]
        groups[targets[similarity.index(max(similarity))]].append(j)
    out = []
    for t in targets:
        weight = max(1 / (len(groups[t]) + 1), beta)
        mean = tokens[groups[t]].mean(dim=0) if groups[t] else torch.zeros_like(tokens[t])
        out.append(weight * tokens[t] + (1 - weight) * mean)
    return out


def reference_fastvid_qwen(features, attention, r, c, tau, ignore, d, p, beta):
    """(sorted kept indices, their values) of one (F, N, D) video, in the public code's loops."""
    frames, n, dim = features.shape
    x = features.float()
    g = x.mean(dim=1)
    g = g / g.norm(dim=1, keepdim=True)
    similarity = [float((g[i] * g[i + 1]).sum()) for i in range(frames - 1)]
    lowest = sorted(range(frames - 1), key=lambda i: similarity[i])[: c - 1]
    cuts = sorted(set(lowest) | {i for i, s in enumerate(similarity) if s < tau})
    sizes = [cuts[0] + 1] + [cuts[i] - cuts[i - 1] for i in range(1, len(cuts))] + [frames - cuts[-1] - 1]
    kept, start = {}, 0
    for size in sizes:
        salient, context = reference_budgets(g[start:start + size], n, r, d, ignore, p)
        tokens = x[start:start + size].reshape(size * n, dim)
        salient_index, context_index = [], []
        for f in range(size):
            scores = attention[start + f].tolist()
            top = sorted(range(n), key=lambda j: -scores[j])[: max(salient[f], 0)]
            salient_index += [j + f * n for j in top]
            if context[f] > 0:
                rest = [j for j in range(n) if j not in top]
                peaks = reference_density_peaks(tokens[[j + f * n for j in rest]])
                chosen = sorted(sorted(range(len(rest)), key=lambda k: -peaks[k])[: context[f]])
                context_index.append([rest[k] + f * n for k in chosen])
        for j in salient_index:
            kept[j + start * n] = tokens[j]
        for targets in context_index:
            merge = [j for j in range(size * n) if j not in salient_index and j not in targets]
            for t, value in zip(targets, reference_merge(tokens, targets, merge, beta)):
                kept[t + start * n] = value
        start += size
    order = sorted(kept)
    return torch.tensor(order), torch.stack([kept[i] for i in order])


def reference_frame_attention(model, inputs, monkeypatch):
    """Per video, (F, N): the public per-step mean-query attention of the last vision block, from the rotary-embedded
    queries and keys that the model's eager attention gets there (tower order), in loops; window order undone."""
    visual = model.model.visual
    module = importlib.import_module(type(visual.blocks[-1].attn).__module__)
    stock, last, captured = module.eager_attention_forward, visual.blocks[-1].attn, []

    def recording(attention, query, key, value, attention_mask, **kwargs):
        if attention is last:
            captured.append((query[0].double(), key[0].double()))  # (heads, L, head_dim) per attended chunk
        return stock(attention, query, key, value, attention_mask, **kwargs)

    monkeypatch.setattr(module, "eager_attention_forward", recording)
    with torch.no_grad():
        model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
    monkeypatch.setattr(module, "eager_attention_forward", stock)
    queries = torch.cat([q for q, _ in captured], dim=1)  # the whole tower sequence
    keys = torch.cat([k for _, k in captured], dim=1)
    heads, _, head_dim = queries.shape
    unit = visual.spatial_merge_size**2
    grids = inputs["video_grid_thw"]
    scores, start = [], 0
    for t, h, w in grids.tolist():
        for _ in range(t):
            q = queries[:, start:start + h * w].mean(dim=1)  # (heads, head_dim)
            k = keys[:, start:start + h * w].reshape(heads, h * w // unit, unit, head_dim).mean(dim=2)
            probs = [torch.softmax(k[head] @ q[head] / math.sqrt(head_dim), dim=0) for head in range(heads)]
            scores += (sum(probs) / heads).tolist()
            start += h * w
    if hasattr(visual, "fullatt_block_indexes"):
        window = get_vision_window_index(grids, visual.spatial_merge_size, visual.window_size, visual.patch_size)[0]
        in_order = [None] * len(scores)
        for position, token in enumerate(window.tolist()):
            in_order[token] = scores[position]
        scores = in_order
    videos, start = [], 0
    for t, h, w in grids.tolist():
        count = t * h * w // unit
        videos.append(torch.tensor(scores[start:start + count], dtype=torch.float64).view(t, -1))
        start += count
    return videos


def run_reference(features, attention, settings=SETTINGS):
    return reference_fastvid_qwen(
        features, attention, r=settings["fastvid_retention_ratio"], c=settings["fastvid_dyseg_c"],
        tau=settings["fastvid_dyseg_tau"], ignore=settings["fastvid_DySeg_ignore"], d=settings["fastvid_stprune_d"],
        p=settings["fastvid_dtm_p"], beta=settings["fastvid_dtm_beta"])


# ---- the selection ------------------------------------------------------------------------------------------------


def _global(similarities):
    """(L, 2) unit vectors whose consecutive cosine similarities are the given ones (angles accumulate)."""
    angles = [0.0]
    for s in similarities:
        angles.append(angles[-1] + math.acos(s))
    return torch.tensor([[math.cos(a), math.sin(a)] for a in angles], dtype=torch.float64)


@pytest.mark.parametrize(("similarities", "n", "r", "p", "expected"), [
    # R = 4, 5 frames: 20 tokens, 8 contextual, 12 salient; groups [2, 2, 1] (cuts after frames 1 and 3) get 4
    # salient each; ceil(3 / 2) = 2 anchor groups share 8 -> [4, 4] at groups 0 and 2 (reversed: the same).
    ([0.99, 0.5, 0.99, 0.5], 16, 0.25, 2, ([0, 4, 0, 4, 4], [0, 4, 0, 0, 4])),
    # R = 4, 3 frames: 12 tokens, int(4.8) = 4 contextual, 8 salient; groups [1, 1, 1]: salient [3, 3, 2];
    # 2 anchor groups share 4 -> [2, 2], at groups 0 and 2 (reversed: [2, 0, 2]); salient capped at 16 - 2.
    ([0.5, 0.5], 16, 0.25, 2, ([3, 3, 2], [2, 0, 2])),
    # R = 2, 3 frames, one group (no similarity below 0.95): 6 tokens, int(2.4) = 2 contextual (N // 2 = 2), 4 salient
    # capped at N - 2 = 2, all in the last frame.
    ([0.99, 0.99], 4, 0.5, 4, ([0, 0, 2], [0, 0, 2])),
    # R = 6, 3 frames: 18 tokens, int(7.2) = 7 contextual, 11 salient -> [4, 4, 3]; 2 anchor groups share 7 -> [4, 3]
    # at groups 0 and 2, reversed: the LAST group gets the larger share.
    ([0.5, 0.5], 40, 0.15, 2, ([4, 4, 3], [3, 0, 4])),
    # int(N * r) = 0: one contextual token per segment, no salient one (a negative share keeps none).
    ([], 16, 0.01, 4, ([0], [1])),
])
def test_the_budgets_are_the_public_formulas(similarities, n, r, p, expected):
    got = fastvid_qwen_budgets(_global(similarities), n, r, 0.4, 0.95, p)
    assert got == expected
    salient, context = reference_budgets(_global(similarities), n, r, 0.4, 0.95, p)
    assert got == ([max(v, 0) for v in salient], context)  # a negative salient count keeps none


CASES = [
    dict(SETTINGS),
    dict(SETTINGS, fastvid_retention_ratio=0.27, fastvid_dyseg_c=3, fastvid_dtm_p=4),
    dict(SETTINGS, fastvid_retention_ratio=0.4, fastvid_dyseg_c=2, fastvid_dyseg_tau=-1.0, fastvid_DySeg_ignore=1.0,
         fastvid_dtm_p=2),  # two segments, every frame its own group (the public code needs a cut)
    dict(SETTINGS, fastvid_retention_ratio=0.3, fastvid_dyseg_c=2, fastvid_dyseg_tau=-1.0, fastvid_DySeg_ignore=-1.0,
         fastvid_stprune_d=0.6),  # segments of one group each: only their last frame keeps tokens
]


def _video(seed, frames=6, n=16, dim=12, similar=False):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(frames, n, dim, generator=generator)
    if similar:  # slowly changing frames: sub-segments form under dyseg_ignore
        features = features[:1] + 0.15 * features
    return features, torch.rand(frames, n, generator=generator).softmax(dim=-1)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("case", range(len(CASES)))
def test_the_selection_is_the_public_loop(case, seed):
    settings = CASES[case]
    features, attention = _video(seed, similar=seed % 2 == 1)
    selection = settings_compressor(settings).select(features, attention=attention)
    index, values = run_reference(features, attention, settings)
    assert selection.index.tolist() == index.tolist()
    torch.testing.assert_close(selection.values, values, rtol=1e-5, atol=1e-5)
    assert selection.per_frame.tolist() == torch.bincount(index // 16, minlength=6).tolist()
    assert selection.index.numel() < features.shape[0] * features.shape[1]


def settings_compressor(settings) -> FastVIDQwen:
    parsed = settings_from_kwargs(settings)
    return FastVIDQwen(parsed.fastvid_retention_ratio, parsed.fastvid_dyseg_c, parsed.fastvid_dyseg_tau,
                       parsed.fastvid_dyseg_ignore, parsed.fastvid_stprune_d, parsed.fastvid_dtm_p,
                       parsed.fastvid_dtm_beta)


def test_cases_the_public_code_fails_on_keep_their_budget():
    """One frame, fewer frames than dyseg_c, fewer than 4 candidates, a segment without salient tokens."""
    compressor = FastVIDQwen(retention_ratio=0.27)
    for frames, n in ((1, 16), (3, 16), (2, 4)):
        features, attention = _video(7, frames=frames, n=n)
        selection = compressor.select(features, attention=attention)
        assert 0 < selection.index.numel() < frames * n
        assert selection.index.tolist() == sorted(set(selection.index.tolist()))
    features, attention = _video(3, frames=1)
    assert FastVIDQwen(retention_ratio=0.01).select(features, attention=attention).index.numel() == 1


def test_bad_settings_and_inputs_are_refused_by_name():
    with pytest.raises(ValueError, match="fastvid_dyseg_ignore"):
        FastVIDQwen(dyseg_ignore=1.5)
    with pytest.raises(ValueError, match="fastvid_dyseg_ignore"):
        settings_from_kwargs({"compressor": "fastvid", "fastvid_DySeg_ignore": 2})
    assert settings_from_kwargs({"compressor": "fastvid", "fastvid_DySeg_ignore": 0.5}).fastvid_dyseg_ignore == 0.5
    features, attention = _video(0)
    with pytest.raises(ValueError, match="attention"):
        FastVIDQwen().select(features)
    with pytest.raises(ValueError, match="attention"):
        FastVIDQwen().select(features, attention=attention[:, :3])


# ---- on the Qwen models -------------------------------------------------------------------------------------------


class Spy:
    """What the applied compressor's ``select`` gets and returns."""

    def __init__(self, handle):
        self.calls = []
        select = handle.video_compressor.select

        def spied(features, *args, **kwargs):
            selection = select(features, *args, **kwargs)
            self.calls.append((features, kwargs, selection))
            return selection

        handle.video_compressor.select = spied


@pytest.mark.parametrize("name", QWEN)
def test_on_the_qwen_models_the_selection_is_the_reference_on_the_public_inputs(name, monkeypatch):
    model = nm.MODELS[name](attn="eager")
    inputs = nm.video_inputs(name, model, ((5, 6, 7), (5, 6, 7, 8, 9)), frames=12, side=SIDE)  # two videos
    attention = reference_frame_attention(model, inputs, monkeypatch)
    seen = []
    with compressed(model, **SETTINGS) as handle:
        assert isinstance(handle.video_compressor, FastVIDQwen)
        spy = Spy(handle)

        def language_model_inputs(module, args, kwargs):
            seen.append(kwargs["inputs_embeds"].detach().clone())

        hook = handle.language_model.register_forward_pre_hook(language_model_inputs, with_kwargs=True)
        try:
            nm.greedy(model, inputs, 2)
        finally:
            hook.remove()
        stats = handle.last_stats
    assert len(spy.calls) == 2
    for row, ((features, kwargs, selection), expected) in enumerate(zip(spy.calls, attention)):
        torch.testing.assert_close(kwargs["attention"].double(), expected, rtol=1e-5, atol=1e-7)
        index, values = run_reference(features, expected)
        assert selection.index.tolist() == index.tolist()
        # The merged values are what the language model gets at the kept video tokens.
        reached = seen[0][row, stats["video_positions"][row]]
        torch.testing.assert_close(reached, values.to(reached.dtype), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(values, features.reshape(-1, features.shape[-1])[index].float())  # merged


@pytest.mark.parametrize("name", QWEN)
def test_on_the_qwen_models_a_padded_batch_equals_its_rows(name):
    model = nm.MODELS[name]()
    inputs = nm.video_inputs(name, model, ((5, 6, 7), (5, 6, 7, 8, 9, 10)), frames=12, side=SIDE)
    with compressed(model, **SETTINGS) as handle:
        batch = nm.greedy(model, inputs, 3)
        assert handle.last_stats["video_tokens_after"] < handle.last_stats["video_tokens_before"]
        for index in range(2):
            alone = nm.greedy(model, nm.row(inputs, index), 3)
            assert batch[0][index].tolist() == alone[0][0].tolist()
            torch.testing.assert_close(batch[1][index], alone[1][0], rtol=1e-4, atol=1e-4)
    assert "llava_compression" not in model.__dict__


def test_fastvid_runs_the_qwen_variant_on_qwen_and_needs_a_head_on_llava_onevision():
    """The Qwen VL models run the public Qwen2.5-VL FastVID (tests/test_fastvid_qwen.py); LLaVA-OneVision reads SigLIP's
    pooling head from the tower checkpoint (the published one when its config names none: not reachable offline, so
    refused by name here; tests/test_native_tower_attention.py runs it with a local one)."""
    from llava.compression.fastvid_qwen import FastVIDQwen

    with pytest.raises(ValueError, match="compressor='fastvid' reads SigLIP's pooling head .*siglip-so400m"), compressed(
            nm.llava_onevision(), compressor="fastvid"):
        pass
    with compressed(nm.qwen2_5_vl(), compressor="fastvid") as handle:
        assert isinstance(handle.video_compressor, FastVIDQwen)
