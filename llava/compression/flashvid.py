"""FlashVID (ICLR 2026), its vision side: ADTS token selection plus tree-based spatio-temporal merging.

Behaviour follows the public FlashVID code (github.com/Fanziyang-v/FlashVID) on LLaVA-OneVision / LLaVA-Video:
``flashvid_compression``, ``segment``, ``additional_segment``, ``segment_compression``,
``spatiotemporal_compression`` and ``dpc_knn`` in ``flashvid/utils.py``, and ``attn_div_v2_based_token_selection``
(ADTS v2, the default ``token_selection_method`` of ``flashvid()``) in ``flashvid/token_selection.py``.
The public method then prunes again inside the LLM (``fastv_prune`` in ``flashvid/utils.py``, called from the
patched ``Qwen2Model_forward`` in ``flashvid/modeling_qwen2.py``): during the prefill, layer ``pruning_layer - 1``'s
attention of the last prompt token, averaged over heads, ranks the video tokens; the top
``ceil(video tokens * llm_retention_ratio)`` (the newline tokens count as video tokens, as there) go on from layer
``pruning_layer``, at their own positions, the others are dropped: FastV's mechanics with ``ceil``
(:class:`FlashVIDLLMPruning`).

Besides the pooled features, the selection needs the vision tower's attention score of every pooled token:
see :class:`FlashVID`.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .base import TokenSelection, VideoTokenCompressor, check_video_features
from .fastv import FastV
from .registry import Argument, Stages, register

__all__ = ["FLASHVID_ARGUMENTS", "FlashVID", "FlashVIDLLMPruning", "adts_select", "dpc_knn_merge", "flashvid_budget", "flashvid_segments",
           "temporal_tree_merge"]

FLASHVID_ARGUMENTS = (
    Argument("flashvid_retention_ratio", 0.25, "(0, 1]",
             "share of video tokens the whole method aims at; the vision side keeps retention_ratio * expansion"),
    Argument("flashvid_expansion", 1.25, "(0, inf)",
             "vision-side budget multiplier (the public method prunes the surplus again inside the LLM)"),
    Argument("flashvid_alpha", 0.7, "[0, 1]",
             "share of each frame's budget chosen by attention and diversity (ADTS); the rest is merged"),
    Argument("flashvid_temporal_threshold", 0.8, "[-1, 1]",
             "cosine similarity above which a token joins its best match in the previous frame "
             "(1: no temporal merging)"),
    Argument("flashvid_do_segment", True, "flag", "split the video into segments at scene changes"),
    Argument("flashvid_segment_threshold", 0.9, "[-1, 1]",
             "cut between two frames whose mean features have a cosine similarity below this"),
    Argument("flashvid_min_segment_num", 8, "[1, inf)",
             "at least this many segments (more cuts at the least similar transitions)", integer=True),
    Argument("flashvid_complementary_segment", True, "flag", "add cuts until there are min_segment_num segments"),
    Argument("flashvid_pruning_layer", 20, "layer", "layer from which the in-LLM pruning drops video tokens"),
    Argument("flashvid_llm_retention_ratio", 0.3, "(0, 1]",
             "share of the video tokens reaching the LLM that layers >= pruning_layer keep (1: no in-LLM pruning)"),
)
_ARGUMENTS = {argument.name: argument for argument in FLASHVID_ARGUMENTS}

_ATTENTION_SCALE = 1e6  # the public code scales the attention "to avoid numerical issues"
_KNN = 7  # neighbours for the DPC-kNN density


def flashvid_budget(
    tokens_per_frame: int, retention_ratio: float, expansion: float, alpha: float
) -> tuple[int, int, int]:
    """(tokens per frame, of which chosen by ADTS, of which merged), the public code's rounding:
    ``budget = ceil(N * retention_ratio * expansion)`` (capped at N here), ``adts = ceil(budget * alpha)``,
    ``merged = budget - adts``."""
    budget = min(tokens_per_frame, math.ceil(tokens_per_frame * retention_ratio * expansion))
    num_adts = math.ceil(budget * alpha)
    return budget, num_adts, budget - num_adts


def flashvid_segments(features: torch.Tensor, threshold: float, min_segments: int, complementary: bool) -> list[int]:
    """Lengths of the segments (DySeg) of a (F, N, D) video, in time order.

    Cut between frames t and t + 1 when the cosine similarity of their mean features is below ``threshold``;
    with ``complementary``, while there are fewer than ``min_segments`` segments, also cut at the least similar of
    the remaining transitions (ties: the earlier one).
    """
    num_frames = features.shape[0]
    means = features.float().mean(dim=1)
    means = means / means.norm(dim=-1, keepdim=True)
    similarity = (means[:-1] * means[1:]).sum(dim=-1)  # (F - 1,)
    cut = similarity < threshold
    missing = min_segments - (int(cut.sum()) + 1)
    if complementary and missing > 0:
        # As the public code: existing cuts are ranked as similarity 1.0, so they are only re-picked (a no-op)
        # when too few transitions remain.
        extra = similarity.masked_fill(cut, 1.0).argsort(stable=True)[: min(missing, num_frames - 1)]
        cut[extra] = True
    ends = torch.cat([cut.nonzero().squeeze(1), torch.tensor([num_frames - 1], device=cut.device)])
    return torch.diff(ends, prepend=ends.new_tensor([-1])).tolist()


def adts_select(
    features: torch.Tensor, attention: torch.Tensor, segment_lengths: list[int], count: int
) -> torch.Tensor:
    """ADTS v2: (F, count) indices of the tokens each frame keeps, ascending.

    Per frame, the cosine distance between tokens i and j is calibrated by token j's attention and by its
    event relevance (its dot product with the mean feature of its segment): ``d[i, j] = (1 - cos) * a_j * e_j``.
    The first token maximises its second-smallest calibrated distance over i (its nearest other token); each
    next one maximises its smallest calibrated distance to the tokens already chosen (max-min diversity).
    """
    num_frames, tokens_per_frame, _ = features.shape
    normed = features / features.norm(dim=-1, keepdim=True)
    distance = 1.0 - normed @ normed.transpose(1, 2)  # (F, N, N)
    segment = torch.repeat_interleave(torch.arange(len(segment_lengths), device=features.device),
                                      torch.tensor(segment_lengths, device=features.device))
    frame_mean = features.mean(dim=1)  # (F, D)
    segment_mean = torch.zeros(len(segment_lengths), features.shape[-1], device=features.device)
    segment_mean = segment_mean.index_add(0, segment, frame_mean) / torch.bincount(segment)[:, None]
    relevance = (features * segment_mean[segment][:, None, :]).sum(dim=-1)  # (F, N)
    distance = distance * (attention * _ATTENTION_SCALE)[:, None, :] * relevance[:, None, :]

    frames = torch.arange(num_frames, device=features.device)
    nearest = distance.kthvalue(min(2, tokens_per_frame), dim=1).values  # (F, N), per column j
    chosen = torch.empty(num_frames, count, dtype=torch.long, device=features.device)
    chosen[:, 0] = nearest.argmax(dim=-1)
    picked = torch.zeros(num_frames, tokens_per_frame, dtype=torch.bool, device=features.device)
    picked[frames, chosen[:, 0]] = True
    closest = distance[frames, chosen[:, 0]]  # (F, N): min calibrated distance to the chosen tokens
    for i in range(1, count):
        # Deliberate fix: the public v2 loop can pick a token twice; chosen tokens are excluded as in its v1.
        chosen[:, i] = closest.masked_fill(picked, -math.inf).argmax(dim=-1)
        picked[frames, chosen[:, i]] = True
        closest = torch.minimum(closest, distance[frames, chosen[:, i]])
    return chosen.sort(dim=-1).values


def temporal_tree_merge(
    features: torch.Tensor, candidates: torch.Tensor, threshold: float, lower_bound: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The temporal half of TSTM on one segment (L >= 2 frames): (values (L, N, D), kept (L, N) bool).

    Each candidate token (not chosen by ADTS) of frame t + 1 finds its most cosine-similar candidate of frame t;
    above ``threshold`` it joins that token's tree. If fewer than ``lower_bound`` tokens (candidates and ADTS
    tokens together) would stay, the threshold is raised to the (L * N - lower_bound)-th largest similarity.
    Trees are folded from the last frame back: a staying token's value is its accumulated sum divided by its
    count, and each joining token adds its accumulated sum to its parent but counts there as ONE token (the public
    code's counting, kept: a chain a -> b -> c gives c the value (a + b + c) / 2).
    """
    length, tokens_per_frame, _ = features.shape
    normed = features / features.norm(dim=-1, keepdim=True)
    similarity = normed[1:] @ normed[:-1].transpose(1, 2)  # [t, n, m]: frame t + 1 token n vs frame t token m
    similarity = similarity.masked_fill(~candidates[1:, :, None], -1.0).masked_fill(~candidates[:-1, None, :], -1.0)
    best, parent = similarity.max(dim=-1)
    best = torch.cat([best.new_full((1, tokens_per_frame), -1.0), best])  # frame 0 never joins
    parent = torch.cat([parent.new_zeros(1, tokens_per_frame), parent])

    joins = best > threshold
    if int((~joins).sum()) < lower_bound:
        rank = length * tokens_per_frame - lower_bound
        if rank > 0:
            soft = max(float(best.flatten().sort(descending=True).values[rank - 1]), -1.0 + 1e-6)
            joins = best > soft
        else:  # every token must stay (the public code fails here)
            joins = torch.zeros_like(joins)

    values = features.clone()
    counts = torch.ones(length, tokens_per_frame, device=features.device)
    for t in range(length - 1, -1, -1):
        stays = ~joins[t]
        values[t, stays] = values[t, stays] / counts[t, stays, None]
        counts[t, stays] = 1.0
        if t > 0 and bool(joins[t].any()):
            values[t - 1].index_add_(0, parent[t, joins[t]], values[t, joins[t]])
            counts[t - 1].index_add_(0, parent[t, joins[t]], torch.ones_like(counts[t, joins[t]]))
    return values, ~joins & candidates


def dpc_knn_merge(tokens: torch.Tensor, num_clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-kNN clustering of one frame's (n, D) tokens: (centres (c,) indices into ``tokens``, values (c, D)).

    Density = exp(-mean of the squared distances to the k = min(c, 7) nearest tokens, itself included), distances
    Euclidean / sqrt(D) (``torch.cdist``, as the public code); a token's score is its density times its distance to
    the nearest denser token (the largest distance of all for the densest). The c best scores are the centres;
    every token joins its nearest centre and a cluster's value is the mean of its tokens. The public code breaks density ties with random noise
    of 1e-6; here the lower index counts as denser. Score ties go to the lower index.
    """
    n, dim = tokens.shape
    distance = torch.cdist(tokens, tokens) / math.sqrt(dim)
    nearest = distance.topk(min(num_clusters, _KNN), dim=-1, largest=False).values
    density = (-(nearest**2)).mean(dim=-1).exp()
    index = torch.arange(n, device=tokens.device)
    # denser[i, j]: token j is denser than token i
    tie = (density[None, :] == density[:, None]) & (index[None, :] < index[:, None])
    denser = (density[None, :] > density[:, None]) | tie
    to_denser = torch.where(denser, distance, distance.max()).min(dim=-1).values
    centres = (to_denser * density).argsort(descending=True, stable=True)[:num_clusters]
    cluster = distance[:, centres].argmin(dim=-1)
    cluster[centres] = torch.arange(num_clusters, device=tokens.device)
    sums = torch.zeros(num_clusters, dim, dtype=tokens.dtype, device=tokens.device).index_add_(0, cluster, tokens)
    return centres, sums / torch.bincount(cluster, minlength=num_clusters)[:, None].to(tokens.dtype)


class FlashVID(VideoTokenCompressor):
    """FlashVID's vision side: per frame, ``budget = min(N, ceil(N * retention_ratio * expansion))`` tokens on average.

    1. DySeg (``do_segment``): the video is cut into segments (:func:`flashvid_segments`).
    2. ADTS: each frame keeps ``ceil(budget * alpha)`` tokens chosen by attention and diversity
       (:func:`adts_select`), with their own features.
    3. TSTM, per segment, on the other tokens: temporal trees across consecutive frames
       (:func:`temporal_tree_merge`; a one-frame segment, or ``temporal_threshold = 1``, has none), then per frame
       DPC-kNN clustering (:func:`dpc_knn_merge`) down to ``ceil(n_f * ratio)`` tokens, where
       ``ratio = (budget - adts) * L / (tokens left in the segment)``; with ``ratio >= 1`` the tree tokens stay as
       they are.
       A merged token sits at its cluster centre's (tree root's) position and carries the cluster's mean value.

    All kept tokens come in original order (frames in time order, spatial order inside a frame), as the public
    code sorts them. A segment of L frames keeps between ``budget * L`` and ``budget * L + L`` tokens.

    ``select`` needs ``attention``: (F, N), for every pooled token the vision tower's attention score, i.e. the
    softmax attention of the tower's LAST kept encoder layer (layer 26 of so400m's 27, whose output is the
    features), averaged over heads and over queries -> (F, 729), then pooled per frame exactly like the features
    (``get_2dPool``: bilinear 27x27 -> 14x14 for OV, average -> 13x13 for LLaVA-Video). The public code gets it
    from its patched ``SigLipAttention.forward`` (``attn_weights.mean(1).mean(1)``);
    :func:`llava.compression.visionzip.siglip_attention_scores` computes the same score.

    Deliberate departures from the public code: scores and merges are computed in float32 (the public code uses the
    model dtype) and the values are returned in the features' dtype; ADTS never picks a token twice; a one-frame
    segment merges only the tokens ADTS did not choose (the public code clusters all N tokens of that frame again,
    so a selected token could also be a cluster centre: two tokens at one position); ties are broken
    deterministically (see :func:`dpc_knn_merge`); settings the public code crashes on (``temporal_threshold = 1``,
    ``retention_ratio * expansion >= 1``) are handled.
    """

    name = "flashvid"
    needs_tower_attention = True  # the model hands over ``attention`` (and ``keys``, unused here)

    def __init__(
        self,
        retention_ratio: float = 0.25,
        expansion: float = 1.25,
        alpha: float = 0.7,
        temporal_threshold: float = 0.8,
        do_segment: bool = True,
        segment_threshold: float = 0.9,
        min_segment_num: int = 8,
        complementary_segment: bool = True,
    ) -> None:
        self.retention_ratio = _check("flashvid_retention_ratio", retention_ratio)
        self.expansion = _check("flashvid_expansion", expansion)
        self.alpha = _check("flashvid_alpha", alpha)
        self.temporal_threshold = _check("flashvid_temporal_threshold", temporal_threshold)
        self.do_segment = _check("flashvid_do_segment", do_segment)
        self.segment_threshold = _check("flashvid_segment_threshold", segment_threshold)
        self.min_segment_num = _check("flashvid_min_segment_num", min_segment_num)
        self.complementary_segment = _check("flashvid_complementary_segment", complementary_segment)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "retention_ratio": self.retention_ratio,
            "expansion": self.expansion,
            "alpha": self.alpha,
            "temporal_threshold": self.temporal_threshold,
            "do_segment": self.do_segment,
            "segment_threshold": self.segment_threshold,
            "min_segment_num": self.min_segment_num,
            "complementary_segment": self.complementary_segment,
        }

    def budget(self, tokens_per_frame: int) -> tuple[int, int, int]:
        """(tokens per frame, of which chosen by ADTS, of which merged): see :func:`flashvid_budget`."""
        return flashvid_budget(tokens_per_frame, self.retention_ratio, self.expansion, self.alpha)

    def select(self, features: torch.Tensor, grid_hw: tuple[int, int] | None = None, *,
               attention: torch.Tensor | None = None, **inputs: Any) -> TokenSelection:
        num_frames, tokens_per_frame, _ = check_video_features(features)
        _check_grid(grid_hw, tokens_per_frame)
        if not isinstance(attention, torch.Tensor) or tuple(attention.shape) != (num_frames, tokens_per_frame):
            raise ValueError(
                f"FlashVID needs attention=: the vision tower's last-layer attention score of each pooled token, "
                f"shape ({num_frames}, {tokens_per_frame}); got {_shape(attention)}"
            )
        _, num_adts, num_merged = self.budget(tokens_per_frame)
        x = features.float()
        if self.do_segment:
            lengths = flashvid_segments(x, self.segment_threshold, self.min_segment_num, self.complementary_segment)
        else:
            lengths = [num_frames]

        index, values = [], []
        candidates = torch.ones(num_frames, tokens_per_frame, dtype=torch.bool, device=features.device)
        if num_adts > 0:
            chosen = adts_select(x, attention.float(), lengths, num_adts)
            candidates.scatter_(1, chosen, False)
            offsets = torch.arange(num_frames, device=features.device)[:, None] * tokens_per_frame
            index.append((chosen + offsets).flatten())
            values.append(x.reshape(-1, x.shape[-1])[index[-1]])
        if num_merged > 0:
            start = 0
            for length in lengths:
                frames = slice(start, start + length)
                segment_index, segment_values = self._merge_segment(x[frames], candidates[frames], num_adts, num_merged)
                index += [i + start * tokens_per_frame for i in segment_index]
                values += segment_values
                start += length

        index = torch.cat(index)
        order = index.argsort()
        index = index[order]
        per_frame = torch.bincount(torch.div(index, tokens_per_frame, rounding_mode="floor"), minlength=num_frames)
        merged = torch.cat(values)[order].to(features.dtype) if num_merged > 0 else None
        return TokenSelection(index=index, per_frame=per_frame, values=merged)

    def _merge_segment(self, x: torch.Tensor, candidates: torch.Tensor, num_adts: int, num_merged: int):
        """TSTM on one segment: (flat indices into the segment, values) per frame, of its merged tokens."""
        length, tokens_per_frame, _ = x.shape
        if length > 1 and self.temporal_threshold < 1.0:
            lower_bound = (num_adts + num_merged) * length
            x, candidates = temporal_tree_merge(x, candidates, self.temporal_threshold, lower_bound)
        counts = candidates.sum(dim=1).tolist()
        ratio = num_merged * length / sum(counts)
        index, values = [], []
        for t in range(length):
            position = candidates[t].nonzero().squeeze(1)
            tokens = x[t, position]
            num_clusters = math.ceil(counts[t] * ratio)
            if num_clusters > 0 and ratio < 1.0:
                centres, tokens = dpc_knn_merge(tokens, num_clusters)
                position = position[centres]
            index.append(position + t * tokens_per_frame)
            values.append(tokens)
        return index, values


def _check(name: str, value: Any) -> Any:
    return _ARGUMENTS[name].check(value)


def _check_grid(grid_hw: tuple[int, int] | None, tokens_per_frame: int) -> None:
    if grid_hw is not None and (len(grid_hw) != 2 or int(grid_hw[0]) * int(grid_hw[1]) != tokens_per_frame):
        raise ValueError(f"grid_hw {grid_hw!r} does not give the {tokens_per_frame} tokens per frame of the features")


def _shape(value: Any) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(type(value).__name__)


class FlashVIDLLMPruning(FastV):
    """FlashVID's in-LLM stage: FastV ranked at layer ``layer - 1`` by the last prompt token's attention, keeping
    ``ceil(n * retention_ratio)`` of the n video tokens from layer ``layer`` on (the public ``fastv_prune``)."""

    name = "flashvid_llm"
    label = "FlashVID in-LLM pruning"
    stats_key = "flashvid_llm"
    layer_argument, ratio_argument = "flashvid_pruning_layer", "flashvid_llm_retention_ratio"
    keep_rounding = staticmethod(math.ceil)

    def __init__(self, layer: int = 20, retention_ratio: float = 0.3):
        self.layer = _check("flashvid_pruning_layer", layer)
        self.retention_ratio = _check("flashvid_llm_retention_ratio", retention_ratio)
        self.ratio = 1.0 - self.retention_ratio  # the share dropped, as FastV counts it

    @property
    def ratio_setting(self) -> float:
        return self.retention_ratio

    def describe(self) -> dict:
        return {"name": self.name, "layer": self.layer, "retention_ratio": self.retention_ratio}


@register(
    "flashvid",
    *FLASHVID_ARGUMENTS,
    summary="FlashVID: per frame, tokens chosen by the tower's attention and diversity plus tree-merged spatio-temporal "
            "tokens, then FastV-like pruning inside the LLM",
    examples=(
        {"flashvid_retention_ratio": 0.5, "flashvid_expansion": 1.0, "flashvid_min_segment_num": 2,
         "flashvid_pruning_layer": 2, "flashvid_llm_retention_ratio": 0.6},
        {"flashvid_retention_ratio": 0.1, "flashvid_alpha": 0.5, "flashvid_do_segment": False,
         "flashvid_pruning_layer": 1, "flashvid_llm_retention_ratio": 1.0},
    ),
)
def build(settings) -> Stages:
    video = FlashVID(
        settings.flashvid_retention_ratio, settings.flashvid_expansion, settings.flashvid_alpha,
        settings.flashvid_temporal_threshold, settings.flashvid_do_segment, settings.flashvid_segment_threshold,
        settings.flashvid_min_segment_num, settings.flashvid_complementary_segment,
    )
    retention = settings.flashvid_llm_retention_ratio
    decoder = FlashVIDLLMPruning(settings.flashvid_pruning_layer, retention) if retention < 1 else None
    return Stages(video=video, decoder=decoder)
