"""HoliTom (NeurIPS 2025, "Holistic Token Merging for Fast Video Large Language Models"): video tokens merged before
the language model (global temporal segmentation, temporal then spatial merging) and again inside it (at layer K
every dropped video token is averaged into its most similar kept one).

Transcribed from the public code, github.com/cokeshao/HoliTom at commit e9b2972f6895c9e7d7fe74eb8c3a2ecaab8056e0
(``holitom/llava_arch.py``, ``LlavaMetaForCausalLM_holitom``: ``prepare_inputs_labels_for_multimodal``,
``select_static_windows``, ``get_static_dynamic_features``, ``holitom``, ``merge_tokens_by_attention_density``,
``merge_tokens_by_density``, ``cluster_dpc_knn``, ``merge_tokens_by_clustering``; ``holitom/modeling_qwen2.py``,
``Qwen2Model_holitom.forward``), compared with ModelTC/LightCompress at commit
9701d035b0aac5df97a2ebaadb30bcf0707616f5 (``llmc/compression/token_reduction/holitom.py``, the same algorithm).

Before the LM, on one video's pooled features (F, N, D) and the tower attention each pooled token receives:

1. Segmentation: s_t = cos(frame t, frame t+1) per token. A window [s, e] of frames saves
   ``(e - s) * #{tokens static over it}`` tokens (static: s_t > T for every t in [s, e)); a dynamic programme over
   the frames picks the windows (at most ``max_window`` frames) that save most; ties keep the shorter window.
2. The retention ratio is raised to ``r' = min(r * F * N / (F * N - saved), 1)``.
3. Per window of more than one frame: its static tokens are averaged over the window's frames, then clustered
   (DPC-kNN) into ``round(S * r')`` tokens; its other (dynamic) tokens and single-frame windows keep, per frame,
   ``ceil(L * r')`` tokens: ``round(ceil(L * r') * (1 - d))`` with the highest tower attention and the rest as
   DPC-kNN clusters of the remaining tokens. A cluster's token is ``beta * centre + (1 - beta) * mean(members)``
   (the centre alone when nothing joined it).
4. Order (the public one_token layout): per window, its static tokens (in spatial order, sitting in the window's
   first frame), then per frame the attention-chosen tokens and then the cluster tokens, each in spatial order.
   LLaVA-Video's grid layout (``holitom``, ``add_newline_token``): per frame its kept tokens in spatial order (a
   window's static tokens sorted in among its first frame's), one newline after each row that keeps a token, none
   for a row or a frame that keeps nothing: ``grid_newlines = "kept_rows"`` (:mod:`llava.compression.layout`; other
   methods put all of a frame's newlines at its end). With ``keep_positions`` every newline stays in its place.

Inside the LM (:class:`HoliTomMerge`): FastV's ranking (layer K-1's attention of the last prompt token keeps the
``round(n * (1 - llm_r))`` most attended video tokens), and before layer K each dropped token is merged into the kept
token with the highest cosine similarity of layer K's input. The public code merges one dropped token after the other
in position order, ``kept = (kept + dropped) / 2``, so a kept token joined by d_1..d_m ends up as
``kept / 2^m + sum_j d_j / 2^(m - j + 1)``: that running average is kept here, computed in one pass.

Departures from the public code, on purpose:

* DPC-kNN adds uniform noise of 1e-6 to the densities to break ties at random; here equal densities are ordered by
  index (the lower index counts as denser), so the result is deterministic. Top-k ties go to the lower index.
* With ``d > 0`` the public code fails (``pos.masked_select(mask.unsqueeze(-1))`` broadcasts to (L, L) and the
  ``view`` raises); here the cluster tokens of a dynamic frame sit at their centres' positions, as intended.
* Similarities, averages and merges are computed in float32 (the public code uses the model dtype).
* Each video gets its own raised ratio r' (the public loop over a batch's videos raises the previous video's r' again
  and pools the whole batch's tower attention for each video; it runs with batch 1).
* Inside the LM, each row of a padded batch is ranked and merged on its own (the public code reads row 0's span),
  newline tokens are never merged or dropped (the public span includes them: LLaVA-OV's one, LLaVA-Video's row
  newlines), and layers >= K run on the compact sequence with the kept tokens' original positions, as
  :mod:`llava.compression.fastv` does.

Defaults are the published evaluation command (README and ``scripts/eval_ov-7b_holitom.sh``: ``RETAIN_RATIO=0.15
T=0.80 HOLITOM_k=18 HOLITOM_r=0.5``) and the code's own (``BETA=0.6 D=0 K=7 MAX_WINDOW_SIZE=1024``; its merge
reads ``NO_BETA`` with default "0", so the BETA rule applies, although the log line prints NO_BETA 1).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .base import TokenSelection, VideoTokenCompressor, check_video_features
from .fastv import FastV, FastVState
from .registry import Argument, Stages, register
from .settings import check_setting

__all__ = ["HoliTom", "HoliTomMerge", "HoliTomState", "dpc_knn", "merge_into_kept", "static_windows"]


# ---- before the LM -------------------------------------------------------------------------------------------------


def frame_similarity(features: torch.Tensor) -> torch.Tensor:
    """(F - 1, N) float32: cosine similarity of each token with the same token of the next frame."""
    x = torch.nn.functional.normalize(features.float(), dim=-1)
    return torch.nn.functional.cosine_similarity(x[:-1], x[1:], dim=-1)


def static_windows(similarity: torch.Tensor, tau: float, max_window: int) -> tuple[list[tuple[int, int]], int]:
    """The segmentation: windows ``(start, end)`` (inclusive) covering frames 0..F-1 in order, and the tokens they
    save. ``similarity`` (F - 1, N) as :func:`frame_similarity`."""
    num_frames = similarity.shape[0] + 1
    static = (similarity > tau).long()
    saved = [[0] * num_frames for _ in range(num_frames)]  # saved[s][e]: (e - s) * tokens static over [s, e]
    for start in range(num_frames - 1):
        still = static[start:].cumprod(dim=0).sum(dim=1).tolist()
        for end in range(start + 1, num_frames):
            saved[start][end] = still[end - start - 1] * (end - start)
    best, first = [0] * num_frames, [0] * num_frames  # best[i]: most saved over frames 0..i; first: last window's start
    for i in range(num_frames):
        best[i], first[i] = (best[i - 1] if i > 0 else 0), i
        for size in range(2, min(i + 1, max_window) + 1):  # strictly better only: ties keep the shorter window
            value = (best[i - size] if i >= size else 0) + saved[i - size + 1][i]
            if value > best[i]:
                best[i], first[i] = value, i - size + 1
    windows, end = [], num_frames - 1
    while end >= 0:
        windows.append((first[end], end))
        end = first[end] - 1
    return windows[::-1], best[-1]


def dpc_knn(x: torch.Tensor, count: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-kNN cluster centres of each row of ``x`` (B, L, C): (centres (B, count) in increasing order, distances
    (B, L, L)). Density: exp(-mean squared distance to the k nearest tokens, itself included); a token's score is its
    density times its distance to the nearest denser token (the largest distance for the densest)."""
    length = x.shape[1]
    distances = torch.cdist(x.float(), x.float()) / x.shape[-1] ** 0.5
    nearest = distances.topk(k, dim=-1, largest=False).values
    density = (-(nearest**2).mean(dim=-1)).exp()
    order = torch.arange(length, device=x.device)
    denser = (density[:, None, :] > density[:, :, None]) | (
        (density[:, None, :] == density[:, :, None]) & (order[None, :] < order[:, None])
    )
    farthest = distances.flatten(1).max(dim=-1).values[:, None, None]
    parent_distance = torch.where(denser, distances, farthest).min(dim=-1).values
    score = parent_distance * density
    centres = score.argsort(dim=-1, descending=True, stable=True)[:, :count].sort(dim=-1).values
    return centres, distances


def cluster_merge(x: torch.Tensor, centres: torch.Tensor, distances: torch.Tensor, beta: float) -> torch.Tensor:
    """(B, count, C) float32: each centre's token. Every other token joins its nearest centre (ties: the first);
    a centre joined by some becomes ``beta * centre + (1 - beta) * mean(joined)``, else stays itself."""
    x = x.float()
    is_centre = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device).scatter_(1, centres, True)
    others = (~is_centre).nonzero()[:, 1].view(x.shape[0], -1)  # row-major: index order
    to_centres = _rows(_rows(distances, others).transpose(1, 2), centres).transpose(1, 2)  # (B, others, count)
    joins = torch.nn.functional.one_hot(to_centres.argmin(dim=-1), centres.shape[1]).float()
    sizes = joins.sum(dim=1)[..., None]
    means = joins.transpose(1, 2) @ _rows(x, others) / sizes.clamp(min=1)
    centre_tokens = _rows(x, centres)
    return torch.where(sizes > 0, beta * centre_tokens + (1 - beta) * means, centre_tokens)


def merge_by_density(x: torch.Tensor, ratio: float, beta: float, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The static tokens of a window, (L, C): ``round(L * ratio)`` cluster tokens as (positions, values)."""
    count = round(x.shape[0] * ratio)
    if count == 0:
        return x.new_zeros(0, dtype=torch.long), x.new_zeros(0, x.shape[1], dtype=torch.float32)
    centres, distances = dpc_knn(x[None], count, min(k, count))
    return centres[0], cluster_merge(x[None], centres, distances, beta)[0]


def merge_by_attention_density(x: torch.Tensor, attention: torch.Tensor, ratio: float, d: float, beta: float,
                               k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The dynamic tokens of each frame, (W, L, C) with their attention (W, L): per frame ``ceil(L * ratio)`` tokens
    as (positions (W, M), values (W, M, C)): the most attended ones, then ``d`` of them as clusters of the rest."""
    frames, length, _ = x.shape
    total = math.ceil(length * ratio)
    dominant = round(total * (1 - d))
    contextual = total - dominant
    top = attention.float().argsort(dim=-1, descending=True, stable=True)[:, :dominant]
    chosen = torch.zeros(frames, length, dtype=torch.bool, device=x.device).scatter_(1, top, True)
    dominant_pos = chosen.nonzero()[:, 1].view(frames, dominant)  # spatial order
    positions, values = [dominant_pos], [_rows(x.float(), dominant_pos)]
    if contextual > 0:
        rest_pos = (~chosen).nonzero()[:, 1].view(frames, length - dominant)
        rest = _rows(x, rest_pos)
        centres, distances = dpc_knn(rest, contextual, min(k, contextual))
        positions.append(rest_pos.gather(1, centres))
        values.append(cluster_merge(rest, centres, distances, beta))
    return torch.cat(positions, dim=1), torch.cat(values, dim=1)


class HoliTom(VideoTokenCompressor):
    """HoliTom's outer-LLM stage (see the module docstring): about ``r`` of the video's tokens reach the LM."""

    name = "holitom"
    needs_tower_attention = True  # the default d = 0 chooses every dynamic token by the tower's attention
    grid_newlines = "kept_rows"  # the public add_newline_token: a newline after each row that keeps a token

    def __init__(self, r: float = 0.15, t: float = 0.8, beta: float = 0.6, d: float = 0.0, knn: int = 7,
                 max_window: int = 1024) -> None:
        self.r = check_setting("holitom_r", r)
        self.t = check_setting("holitom_t", t)
        self.beta = check_setting("holitom_beta", beta)
        self.d = check_setting("holitom_d", d)
        self.knn = check_setting("holitom_knn", knn)
        self.max_window = check_setting("holitom_max_window", max_window)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "r": self.r, "t": self.t, "beta": self.beta, "d": self.d, "knn": self.knn,
                "max_window": self.max_window}

    def select(self, features: torch.Tensor, grid_hw: tuple[int, int] | None = None, *,
               attention: torch.Tensor | None = None, **inputs: Any) -> TokenSelection:
        num_frames, tokens_per_frame, _ = check_video_features(features)
        if not isinstance(attention, torch.Tensor) or tuple(attention.shape) != (num_frames, tokens_per_frame):
            raise ValueError(
                "HoliTom needs attention=: the attention each pooled token receives in the vision tower's last layer, "
                f"shape ({num_frames}, {tokens_per_frame}); got "
                f"{tuple(attention.shape) if isinstance(attention, torch.Tensor) else type(attention).__name__}"
            )
        similarity = frame_similarity(features)
        windows, saved = static_windows(similarity, self.t, self.max_window)
        total = num_frames * tokens_per_frame
        ratio = min(self.r / ((total - saved) / total), 1)  # the public code's float arithmetic
        pieces = []  # (frame, positions, values) in output order
        for start, end in windows:
            static = torch.zeros(tokens_per_frame, dtype=torch.bool, device=features.device)
            if end > start:  # static tokens: averaged over the window, then clustered; they sit in its first frame
                static = (similarity[start:end] > self.t).all(dim=0)
                static_pos = static.nonzero()[:, 0]
                mean = features[start : end + 1, static_pos].float().mean(dim=0)
                centres, values = merge_by_density(mean, ratio, self.beta, self.knn)
                pieces.append((start, static_pos[centres], values))
            dynamic_pos = (~static).nonzero()[:, 0]
            positions, values = merge_by_attention_density(
                features[start : end + 1, dynamic_pos], attention[start : end + 1, dynamic_pos], ratio, self.d,
                self.beta, self.knn)
            pieces += [(start + f, dynamic_pos[positions[f]], values[f]) for f in range(end - start + 1)]
        index = torch.cat([frame * tokens_per_frame + positions for frame, positions, _ in pieces])
        frames = torch.tensor([frame for frame, positions, _ in pieces for _ in range(positions.numel())],
                              dtype=torch.long, device=features.device)
        per_frame = torch.bincount(frames, minlength=num_frames)
        values = torch.cat([values for _, _, values in pieces]).to(features.dtype)
        return TokenSelection(index=index, per_frame=per_frame, values=values)


def _rows(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x[b, positions[b]] for every row b: (B, P, C) from (B, L, C) and (B, P)."""
    return x.gather(1, positions[..., None].expand(-1, -1, x.shape[-1]))


# ---- inside the LM -------------------------------------------------------------------------------------------------


def merge_into_kept(hidden_states: torch.Tensor, video: torch.Tensor, kept: torch.Tensor, max_kept: int,
                    max_dropped: int) -> torch.Tensor:
    """``hidden_states`` (B, S, D) with every dropped video token (``video & ~kept``) merged into its most
    cosine-similar kept one (ties: the kept token with the lowest position), by the public code's running average in
    position order (see the module docstring). ``max_kept`` / ``max_dropped``: the most kept / dropped tokens of a
    row (Python ints, known before the prefill). Rows are independent; nothing but the kept tokens changes."""
    if max_kept == 0 or max_dropped == 0:
        return hidden_states
    kept_pos, kept_valid = _first_true(kept, max_kept)
    dropped_pos, dropped_valid = _first_true(video & ~kept, max_dropped)
    x = hidden_states.float()
    targets, sources = _rows(x, kept_pos), _rows(x, dropped_pos)
    sources = torch.where(dropped_valid[..., None], sources, 0.0)
    similarity = (sources / sources.norm(dim=-1, keepdim=True)) @ (targets / targets.norm(dim=-1, keepdim=True)).mT
    nearest = similarity.masked_fill(~kept_valid[:, None, :], float("-inf")).argmax(dim=-1)  # (B, dropped)
    joins = torch.nn.functional.one_hot(nearest, max_kept).float() * dropped_valid[..., None]  # (B, dropped, kept)
    later = ((joins.flip(1).cumsum(dim=1).flip(1) - joins) * joins).sum(dim=-1)  # later joins of the same target
    weights = 0.5 ** (later + 1) * dropped_valid
    merged = targets * 0.5 ** joins.sum(dim=1)[..., None] + (joins * weights[..., None]).mT @ sources
    merged = torch.where(kept_valid[..., None], merged, targets).to(hidden_states.dtype)
    return hidden_states.scatter(1, kept_pos[..., None].expand(-1, -1, hidden_states.shape[-1]), merged)


def _first_true(mask: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions (B, width), valid (B, width)): each row's True positions in increasing order, padded."""
    positions = mask.long().argsort(dim=1, descending=True, stable=True)[:, :width]
    return positions, mask.gather(1, positions)


class HoliTomMerge(FastV):
    """HoliTom's inner-LLM merging: ranked at layer ``layer - 1`` as FastV, ``ratio`` of the video tokens merged
    into the kept ones before layer ``layer`` (the public HOLITOM_k and HOLITOM_r)."""

    name = "holitom"
    label = "HoliTom"
    stats_key = "holitom"
    layer_argument, ratio_argument = "holitom_k", "holitom_llm_r"  # round(n * (1 - r)) kept: FastV's rounding

    def __init__(self, layer: int = 18, ratio: float = 0.5):
        self.layer = check_setting("holitom_k", layer)
        self.ratio = check_setting("holitom_llm_r", ratio)

    def state_type(self) -> type[HoliTomState]:
        return HoliTomState


class HoliTomState(FastVState):
    """One generation of :class:`HoliTomMerge`. The ranking is FastV's (the public code's is the same: the last
    prompt token's head-averaged attention at layer K-1), so ``choose_kept`` is inherited; ``compact`` merges."""

    def compact(self, hidden_states: torch.Tensor) -> torch.Tensor:
        layout = self.layout
        dropped = max(count - keep for count, keep in zip(layout.video_counts, layout.keep_counts))
        merged = merge_into_kept(hidden_states, layout.prunable, self.kept_video, max(layout.keep_counts), dropped)
        return super().compact(merged)


@register(
    "holitom",
    Argument("holitom_r", 0.15, "(0, 1]", "share of video tokens kept before the LM (RETAIN_RATIO)"),
    Argument("holitom_t", 0.8, "[-1, 1]", "cosine similarity to the next frame above which a token is static (T)"),
    Argument("holitom_beta", 0.6, "[0, 1]", "weight of a cluster's centre in its merged token (BETA)"),
    Argument("holitom_d", 0.0, "[0, 1]", "share of a frame's kept dynamic tokens made by clustering instead of "
             "chosen by the tower's attention (D)"),
    Argument("holitom_knn", 7, "[1, inf)", "neighbours of DPC-kNN's density (K)", integer=True),
    Argument("holitom_max_window", 1024, "[1, inf)", "most frames in a temporal segment (MAX_WINDOW_SIZE)",
             integer=True),
    Argument("holitom_k", 18, "layer", "layer before which video tokens are merged inside the LM (HOLITOM_k)"),
    Argument("holitom_llm_r", 0.5, "[0, 1)", "share of video tokens merged into the others at layer K; 0 turns the "
             "inner-LLM merging off (HOLITOM_r)"),
    summary="HoliTom: temporal segmentation and spatio-temporal merging before the LM, similarity merging at layer K",
    examples=({"holitom_r": 0.5, "holitom_k": 2, "holitom_llm_r": 0.5},
              {"holitom_r": 0.2, "holitom_t": 0.3, "holitom_d": 0.5, "holitom_k": 1, "holitom_llm_r": 0.9}),
)
def build(settings) -> Stages:
    video = HoliTom(settings.holitom_r, settings.holitom_t, settings.holitom_beta, settings.holitom_d,
                    settings.holitom_knn, settings.holitom_max_window)
    decoder = HoliTomMerge(settings.holitom_k, settings.holitom_llm_r) if settings.holitom_llm_r > 0 else None
    return Stages(video=video, decoder=decoder)
