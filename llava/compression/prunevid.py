"""PruneVid (ACL 2025, "PruneVid: Visual Token Pruning for Efficient Video Large Language Models").

Transcribed from the public code, Visual-AI/PruneVid at commit b12600c6176c606ee4b6b7d9e26f4aa46d0dfd42 (the PLLaVA
release; the LLaVA-OneVision code is not published), compared with ModelTC/LightCompress's LLaVA-OneVision port of
the first stage (``llmc/compression/token_reduction/prunevid.py``, commit 9701d035b0aac5df97a2ebaadb30bcf0707616f5).
Published settings (``scripts/eval.sh``, LightCompress's ``configs/.../PruneVid/prunevid.yml``): tau 0.8,
temporal_segment_ratio 0.25, cluster_ratio 0.5, selected_layer 10, alpha 0.4.

1. Before the LM (:class:`PruneVid`, ``merge_frames_dynamic`` in ``models/pllava/modeling_pllava.py``):

   - temporal segmentation: the frames' mean tokens are clustered with DPC-KNN (``cluster_dpc_knn``, k = 7) into
     ``int(F * temporal_segment_ratio)`` clusters; ``refine_clusters`` keeps each cluster's longest run(s) of
     consecutive frames (a cluster whose runs are all single frames is dissolved) and gives every other run to its
     longer neighbouring run (the left one on a tie); the segments are the runs of equal labels;
   - per segment of W frames, a spatial position is static when the mean cosine similarity of its tokens over the
     W * (W - 1) ordered pairs of different frames is above ``tau``. The static tokens are averaged over the
     segment's frames; the dynamic ones stay per frame;
   - each group (the segment's static tokens; each frame's dynamic tokens) of more than 14 tokens is clustered with
     DPC-KNN (k = 7) into ``int(size * cluster_ratio)`` clusters, each replaced by its members' mean, in the order
     of the cluster centres (highest density-peak score first); smaller groups stay as they are (spatial order);
   - the segment's tokens come as [static, frame 1's dynamic, frame 2's dynamic, ...], segments in time order.

   In the :class:`TokenSelection`, a static token (or static cluster) sits in the segment's first frame at its
   (centre's) spatial position, a dynamic one in its frame; ``values`` are the merged features.

2. In the LM (:class:`PruneVidLLM`, ``LlamaModelVTP.forward`` / ``VTPWindowCache`` in ``models/pllava/llama.py``
   and ``elastic_cache.py``, with the attention of ``LlamaAttention.forward``): in the prefill, layer
   ``selected_layer``'s attention probabilities of the text after the video over the video tokens are taken
   WITHOUT rotary embeddings and WITHOUT the causal mask (``attn_weights_wo_pos``: softmax over every prompt key),
   reduced by the maximum over heads, then over the text queries; each group of the first stage (a segment's
   static tokens, each frame's dynamic ones: ``TokenSelection.groups``, carried to the decode state as
   ``GenerationInputs.video_groups``) keeps its top ``int(size * alpha)`` tokens (``process_attention``).
   Layers after ``selected_layer`` run on the kept tokens only, at their original positions, and the KV cache of
   EVERY layer (``selected_layer`` and the ones before it included) holds only the kept tokens for decoding.
   This is FastV's mechanics with K = selected_layer + 1 (:class:`llava.compression.fastv.FastVState`), plus the
   cut of the cache of layers <= selected_layer to the same kept tokens once their prefill ran.

Departures from the public code, and why:

- density ties in DPC-KNN: the public code adds uniform noise of 1e-6 (a different result per run); here the lower
  index counts as denser and equal centre scores rank the lower index first (deterministic);
- fewer frames than the k = 7 neighbours, or fewer than 1 / temporal_segment_ratio frames (the public ``topk``
  fails): k is capped at F and at least one segment is made; likewise a group keeps at least one cluster. A
  one-frame segment (only a one-frame video can make one) has no frame pairs (the public code divides by zero
  there): all its tokens are dynamic;
- the in-LLM stage: in the prefill the queries are a row's tokens after its last video token (the LLaVA-OneVision
  newline included), padding is left out of the softmax, and the probabilities stay in float32 (the public code
  rounds them to the model dtype); several videos in a row each bring their own groups;
- batches: every row has its own selection (the public code handles batch 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from llava.compression.base import (
    TokenSelection,
    VideoTokenCompressor,
    check_video_features,
)
from llava.compression.decoding import (
    PREFILL,
    GenerationInputs,
    LayerInputs,
    mark_static,
)
from llava.compression.fastv import CompactLayout, FastV, FastVState, prunable_positions
from llava.compression.registry import Argument, Stages, register
from llava.compression.settings import check_setting

__all__ = ["PruneVid", "PruneVidLLM", "PruneVidState", "dpc_knn", "prunevid_segments", "question_attention",
           "refine_clusters"]

_NEIGHBOURS = 7  # DPC-KNN's k, both for the frames and for the tokens (the public code's k=7)
_MIN_TO_CLUSTER = 14  # groups of at most this many tokens are not clustered (the public code's `> 14`)


# ---- DPC-KNN clustering and the temporal segments -------------------------------------------------------------------


def dpc_knn(x: torch.Tensor, clusters: int, k: int = _NEIGHBOURS) -> tuple[torch.Tensor, torch.Tensor]:
    """Density-peak clustering of (N, C) tokens into ``clusters`` clusters (the public ``cluster_dpc_knn``).

    Returns (cluster of each token (N,), the centres (clusters,) in rank order: highest ``density * distance to a
    denser token`` first). Distances are Euclidean over sqrt(C); density = exp(-mean squared distance to the k
    nearest tokens, the token itself included); a token joins its nearest centre (the first on a tie), a centre its
    own cluster. Density ties: the lower index counts as denser; score ties: the lower index ranks first.
    """
    num = x.shape[0]
    x = x.float()
    dist = torch.cdist(x, x) / math.sqrt(x.shape[-1])
    nearest = dist.topk(min(k, num), dim=-1, largest=False).values
    density = (-(nearest**2).mean(dim=-1)).exp()
    index = torch.arange(num, device=x.device)
    # denser[i, j]: token j is denser than token i
    tie = (density[None, :] == density[:, None]) & (index[None, :] < index[:, None])
    denser = (density[None, :] > density[:, None]) | tie
    to_denser = torch.where(denser, dist, dist.max()).min(dim=-1).values
    centres = (to_denser * density).sort(descending=True, stable=True).indices[:clusters]
    assignment = dist[centres].argmin(dim=0)
    assignment[centres] = torch.arange(centres.numel(), device=x.device)
    return assignment, centres


def refine_clusters(labels: list[int]) -> list[int]:
    """The public ``refine_clusters`` on one row of frame labels: each label keeps its longest run(s) of
    consecutive frames (all runs of the maximal length; none when that length is 1), and every other run, left to
    right, takes the label of its longer neighbouring run (as refined so far; the left one on a tie; 0 with none)."""
    refined = list(labels)
    runs = _runs(labels)
    for label in set(labels):
        own = [(start, end) for start, end, value in runs if value == label]
        longest = max(end - start for start, end in own)
        for start, end in own:
            if longest == 1 or end - start < longest:
                refined[start:end] = [-1] * (end - start)
    position = 0
    while position < len(refined):
        if refined[position] != -1:
            position += 1
            continue
        end = position
        while end < len(refined) and refined[end] == -1:
            end += 1
        left = _run_length(refined, position - 1, -1) if position > 0 else 0
        right = _run_length(refined, end, 1) if end < len(refined) else 0
        if left == 0 and right == 0:
            label = 0
        else:
            label = refined[position - 1] if left >= right and left > 0 else refined[end]
        refined[position:end] = [label] * (end - position)
        position = end
    return refined


def _runs(labels: list[int]) -> list[tuple[int, int, int]]:
    """(start, end, label) of each run of equal labels, end exclusive."""
    runs, start = [], 0
    for position in range(1, len(labels) + 1):
        if position == len(labels) or labels[position] != labels[start]:
            runs.append((start, position, labels[start]))
            start = position
    return runs


def _run_length(labels: list[int], position: int, step: int) -> int:
    """Length of the run of ``labels[position]`` going from ``position`` in direction ``step``."""
    label, length = labels[position], 0
    while 0 <= position < len(labels) and labels[position] == label:
        length, position = length + 1, position + step
    return length


def prunevid_segments(features: torch.Tensor, temporal_segment_ratio: float) -> list[int]:
    """The lengths of the video's temporal segments, in time order, from its (F, N, D) features."""
    num_frames = features.shape[0]
    clusters = max(1, int(num_frames * temporal_segment_ratio))
    labels, _ = dpc_knn(features.float().mean(dim=1), clusters)
    return [end - start for start, end, _ in _runs(refine_clusters(labels.tolist()))]


# ---- the pre-LLM stage -----------------------------------------------------------------------------------------------


class PruneVid(VideoTokenCompressor):
    """PruneVid's first stage: temporal segments, static tokens merged over each segment, DPC-KNN spatial merging
    (see the module docstring)."""

    name = "prunevid"

    def __init__(self, tau: float = 0.8, temporal_segment_ratio: float = 0.25, cluster_ratio: float = 0.5):
        self.tau = check_setting("prunevid_tau", tau)
        self.temporal_segment_ratio = check_setting("prunevid_temporal_segment_ratio", temporal_segment_ratio)
        self.cluster_ratio = check_setting("prunevid_cluster_ratio", cluster_ratio)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "tau": self.tau, "temporal_segment_ratio": self.temporal_segment_ratio,
                "cluster_ratio": self.cluster_ratio}

    def select(self, features: torch.Tensor) -> TokenSelection:
        num_frames, tokens_per_frame, _ = check_video_features(features)
        index, values, groups, per_frame, start = [], [], [], [0] * num_frames, 0
        for length in prunevid_segments(features, self.temporal_segment_ratio):
            frames = features[start:start + length]
            static = self.static_positions(frames)
            parts = [(start, static, frames[:, static].mean(dim=0))]  # (frame, positions, features)
            parts += [(start + f, ~static, frames[f, ~static]) for f in range(length)]
            for frame, positions, part in parts:
                spots, merged = self.merge(part, positions.nonzero().flatten())
                index.append(frame * tokens_per_frame + spots)
                values.append(merged)
                # each part is a quota group of the in-LLM stage (an empty one, e.g. no static token, counts none)
                groups.append(torch.full_like(spots, len(groups)))
                per_frame[frame] += spots.numel()
            start += length
        device = features.device
        return TokenSelection(index=torch.cat(index), per_frame=torch.tensor(per_frame, device=device),
                              values=torch.cat(values), groups=torch.cat(groups))

    def static_positions(self, frames: torch.Tensor) -> torch.Tensor:
        """(N,) bool: the spatial positions whose tokens barely change over the segment's (W, N, D) frames."""
        length = frames.shape[0]
        if length < 2:  # no pair of frames (see the module docstring)
            return torch.zeros(frames.shape[1], dtype=torch.bool, device=frames.device)
        normed = F.normalize(frames.float(), dim=-1)
        similarity = torch.einsum("wlc,tlc->wtl", normed, normed)
        # the public code: (sum over t - 1) summed over w, i.e. the w != t pairs taking each self-similarity as 1
        return (similarity.sum(dim=(0, 1)) - length) / (length * (length - 1)) > self.tau

    def merge(self, group: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A group's (M, D) tokens at spatial ``positions`` (M,) -> (where each output token sits, its features):
        unchanged up to 14 tokens, else one token per DPC-KNN cluster (at its centre, the members' mean)."""
        size = group.shape[0]
        if size <= _MIN_TO_CLUSTER:
            return positions, group
        assignment, centres = dpc_knn(group, max(1, int(size * self.cluster_ratio)))
        members = F.one_hot(assignment, centres.numel()).to(group.dtype).T  # (clusters, M)
        merged = (members @ group) / members.sum(dim=1, keepdim=True)
        return positions[centres], merged


# ---- the in-LLM stage ------------------------------------------------------------------------------------------------


class PruneVidLLM(FastV):
    """PruneVid's second stage: the video tokens the text after the video attends to least at layer
    ``selected_layer`` are dropped from every later layer and from the decoding cache of all layers (see the module
    docstring). ``layer`` (FastV's K) is selected_layer + 1, the first layer that runs on the kept tokens."""

    name = "prunevid"
    label = "PruneVid"
    stats_key = "prunevid"
    layer_argument, ratio_argument = "prunevid_layer", "prunevid_alpha"

    def __init__(self, selected_layer: int = 10, alpha: float = 0.4):
        self.selected_layer = check_setting("prunevid_layer", selected_layer)
        self.alpha = check_setting("prunevid_alpha", alpha)
        self.layer, self.ratio = self.selected_layer + 1, 1 - self.alpha

    def describe(self) -> dict:
        return {"name": self.name, "selected_layer": self.selected_layer, "alpha": self.alpha}

    def unmodified_summary(self) -> dict:
        return {"selected_layer": self.selected_layer, "alpha": self.alpha, "image_tokens": [],
                "kept_image_tokens": [], "pruned": False, "decode_steps": 0}

    def compact_layout(self, inputs: GenerationInputs) -> GroupedLayout:
        """Each quota group (``GenerationInputs.video_groups``; a row's video tokens are one group without them)
        keeps ``int(size * alpha)`` of its tokens, as the public ``process_attention``."""
        prunable = prunable_positions(inputs.prunable)
        groups = inputs.video_groups if inputs.video_groups is not None else torch.zeros_like(prunable, dtype=torch.long)
        groups = groups.masked_fill(~prunable, -1)
        count = max(1, int(groups.max()) + 1)  # host reads of the group sizes: once per generation
        sizes = torch.zeros(groups.shape[0], count, dtype=torch.long, device=groups.device)
        sizes = sizes.scatter_add_(1, groups.clamp(min=0), prunable.long()).tolist()
        quota = [[int(size * self.alpha) for size in row] for row in sizes]
        return GroupedLayout.from_counts(prunable, [sum(row) for row in sizes], [sum(row) for row in quota],
                                         groups=groups, group_quota=torch.tensor(quota, device=groups.device))

    @property
    def layer_setting(self) -> int:
        return self.selected_layer

    @property
    def ratio_setting(self) -> float:
        return self.alpha

    def state_type(self) -> type[PruneVidState]:
        return PruneVidState


@dataclass
class GroupedLayout(CompactLayout):
    """FastV's compact layout when each quota group of a row keeps its own share."""

    groups: torch.Tensor  # (B, S) int64: the group of each prunable position, -1 elsewhere
    group_quota: torch.Tensor  # (B, G) int64: how many tokens each group keeps


class PruneVidState(FastVState):
    """PruneVid's in-LLM stage for one generation: FastV's compact layers >= K with PruneVid's ranking and per-group
    quotas; after the ranking layer's prefill the cache of the layers < K is cut to the same compact slots (the
    public ``prompt_prefill``), so every layer decodes over the kept tokens only."""

    def choose_kept(self, decoder_layer, inputs: LayerInputs, cache) -> torch.Tensor:
        scores = question_attention(decoder_layer, inputs.hidden_states, self.inputs.attention_mask,
                                    self.inputs.prunable)
        return self.top_video(scores)

    def top_video(self, scores: torch.Tensor) -> torch.Tensor:
        """(B, S) bool: the top ``group_quota[r, g]`` positions of every group g of row r by ``scores`` (B, S)."""
        groups, quota = self.layout.groups, self.layout.group_quota
        by_score = scores.masked_fill(groups < 0, float("-inf")).argsort(dim=1, descending=True, stable=True)
        order = by_score.gather(1, groups.gather(1, by_score).argsort(dim=1, stable=True))  # by group, then score
        grouped = groups.gather(1, order)
        positions = torch.arange(grouped.shape[1], device=grouped.device).expand_as(grouped)
        starts = torch.ones_like(grouped, dtype=torch.bool)
        starts[:, 1:] = grouped[:, 1:] != grouped[:, :-1]
        rank = positions - torch.where(starts, positions, 0).cummax(dim=1).values  # rank inside the group
        keep = (grouped >= 0) & (rank < quota.gather(1, grouped.clamp(min=0)))
        return torch.zeros_like(keep).scatter_(1, order, keep)

    def holds_compact_cache(self, layer_idx: int) -> bool:
        return True

    def observe(self, decoder_layer, layer_idx: int, inputs: LayerInputs, cache) -> None:
        super().observe(decoder_layer, layer_idx, inputs, cache)
        if self.phase == PREFILL and layer_idx == self.ranking_layer:
            self._cut_early_caches(cache)

    def _cut_early_caches(self, cache) -> None:
        """The cache of layers < K (all of them ran their prefill) keeps the compact slots only, gathered at the
        slots' prefill positions. A static layer gets new buffers of W + the new tokens, the size of the layers >= K
        (``static_cache_lengths``), before the first decoding step (which a compiled step captures)."""
        width = self.layout.width
        for layer in cache.layers[: self.first_pruned]:
            kept = [full.gather(2, self.index[:, None, :, None].expand(-1, full.shape[1], -1, full.shape[-1]))
                    for full in (layer.keys, layer.values)]
            if self.inputs.static_cache:
                layer.max_cache_len -= self.prefill_length - width
                kept = [_static_buffer(tensor, layer.max_cache_len) for tensor in kept]
                layer.cumulative_length.sub_(self.prefill_length - width)
            layer.keys, layer.values = kept

    def summary(self) -> dict:
        summary = super().summary()
        del summary["ratio"]
        return {**summary, "layer": self.method.selected_layer, "alpha": self.method.alpha}


def _static_buffer(kept: torch.Tensor, length: int) -> torch.Tensor:
    """A static cache buffer of ``length`` slots starting with the ``kept`` (B, H, W, D) entries, at a fixed address."""
    buffer = kept.new_zeros(*kept.shape[:2], length, kept.shape[-1])
    buffer[:, :, : kept.shape[2]] = kept
    mark_static(buffer)
    return buffer


def question_attention(decoder_layer, hidden_states: torch.Tensor, valid: torch.Tensor,
                       video: torch.Tensor) -> torch.Tensor:
    """(B, S) float32: PruneVid's score of every prompt position, from a decoder layer's prefill input
    ``hidden_states`` (B, S, hidden). Queries are each row's tokens after its last ``video`` token (its last token
    when none follows); the attention is the public ``attn_weights_wo_pos``: no rotary embedding, no causal mask
    (padding, ``valid`` False, is left out), softmax in float32; reduced by the maximum over heads, then over the
    queries."""
    attention = decoder_layer.self_attn
    batch, length, _ = hidden_states.shape
    positions = torch.arange(length, device=hidden_states.device)
    last_video = torch.where(video, positions, -1).amax(dim=1)
    last_valid = torch.where(valid, positions, -1).amax(dim=1)  # the query when no token follows the video
    queries = ((positions > last_video[:, None]) & valid) | (positions == last_valid[:, None])
    start = int(queries.float().argmax(dim=1).min())  # the first query of any row: one host read per prefill
    normed = decoder_layer.input_layernorm(hidden_states)
    query = _heads(attention, "q", normed[:, start:])  # (B, heads, Q, head_dim)
    keys = _heads(attention, "k", normed)  # (B, key heads, S, head_dim)
    grouped = query.reshape(batch, keys.shape[1], -1, *query.shape[2:])  # head h = k * groups + j
    scores = (torch.matmul(grouped, keys[:, :, None].transpose(-1, -2)) * attention.scaling).float()
    scores = scores.masked_fill(~valid[:, None, None, None, :], float("-inf"))
    probabilities = scores.softmax(dim=-1).amax(dim=(1, 2))  # (B, Q, S)
    return probabilities.masked_fill(~queries[:, start:, None], 0).amax(dim=1)


def _heads(attention, which: str, normed: torch.Tensor) -> torch.Tensor:
    """The layer's un-rotated queries or keys (B, heads, L, head_dim): projection, then Qwen3's per-head norm."""
    states = getattr(attention, f"{which}_proj")(normed).view(*normed.shape[:2], -1, attention.head_dim)
    norm = getattr(attention, f"{which}_norm", None)
    if norm is not None:
        states = norm(states)
    return states.transpose(1, 2)


@register(
    "prunevid",
    Argument("prunevid_tau", 0.8, "[-1, 1]", "similarity above which a position is static within a segment"),
    Argument("prunevid_temporal_segment_ratio", 0.25, "(0, 1]", "temporal segments per frame (DPC-KNN clusters)"),
    Argument("prunevid_cluster_ratio", 0.5, "(0, 1]", "share of tokens kept by spatial DPC-KNN merging"),
    Argument("prunevid_layer", 10, "layer", "layer whose question-to-video attention ranks the video tokens"),
    Argument("prunevid_alpha", 0.4, "(0, 1]",
             "share of video tokens kept after that layer; 1 turns the in-LM stage off"),
    summary="PruneVid: static tokens merged over temporal segments and clustered before the LM, then the video "
            "tokens the question attends to least dropped inside it",
    examples=(
        {"prunevid_layer": 2, "prunevid_alpha": 0.5},
        {"prunevid_layer": 1, "prunevid_alpha": 0.3, "prunevid_tau": 0.0, "prunevid_temporal_segment_ratio": 0.5,
         "prunevid_cluster_ratio": 0.3},
    ),
)
def build(settings) -> Stages:
    video = PruneVid(settings.prunevid_tau, settings.prunevid_temporal_segment_ratio, settings.prunevid_cluster_ratio)
    decoder = PruneVidLLM(settings.prunevid_layer, settings.prunevid_alpha) if settings.prunevid_alpha < 1 else None
    return Stages(video=video, decoder=decoder)
