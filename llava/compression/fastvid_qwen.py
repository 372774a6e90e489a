"""FastVID as its public code runs it on Qwen2.5-VL: another selection than the LLaVA one (:mod:`.fastvid`).

Transcribed from the public FastVID code (github.com/LunarShen/FastVID at a40a109cb8df20e8c2c17c6850f8269717369990,
``fastvid_qwen25vl/lmms-eval/lmms_eval/models/qwenvlutils/modeling_qwen2_5_vl.py``,
``Qwen2_5_VLForConditionalGeneration.forward``, the block after ``if seq_length > 1``), with the default arguments of
its ``fastvid_qwen25vl/scripts/eval.sh`` (retention 0.27, DySeg_c 8, DySeg_tau 0.84, DySeg_ignore 0.95, STPrune_d 0.4,
DTM_p 4, DTM_beta 0.6). The arguments are FastVID's own (``compressor="fastvid"``, one more: ``fastvid_dyseg_ignore``);
their registered defaults are the LLaVA ones (retention 0.10, tau 0.9): pass the Qwen values explicitly to reproduce
that script. :mod:`llava.compression.native` uses this variant on Qwen2-VL, Qwen2.5-VL and Qwen3-VL (the public code
has Qwen2.5-VL only; the other two get the same rule).

Inputs: each temporal step's (F) tokens of the merged video embeddings (F, N, D); their per-frame mean is the frame's
global feature (the public ``frame_global_features``); and ``attention`` (F, N), the last vision block's per-step
mean-query attention over the merged groups' mean keys (:data:`llava.compression.tower_attention.FRAME_QUERY`).

1. **DySeg**: segments end at the ``dyseg_c - 1`` least similar transitions of the global features and wherever the
   cosine similarity is below ``dyseg_tau`` (:func:`llava.compression.fastvid.fastvid_segments`).
2. **Budgets** (:func:`fastvid_qwen_budgets`): a segment of L frames keeps ``R * L`` tokens with R = int(N * r):
   ``max(int(R * L * d), 1)`` contextual, the rest salient. A one-frame segment keeps them all in its frame. A longer
   one is split again where consecutive frames' similarity is below ``dyseg_ignore``; only the LAST frame of each
   such group keeps tokens: the salient ones shared evenly between the groups, the contextual ones evenly between
   every ``dtm_p``-th group counted from the last (capped at N // 2 per frame, salient then at N minus that).
3. **Selection** per frame: its most attended tokens (salient), then among the others its top density-peak tokens
   (:func:`llava.compression.fastvid.fastvid_density_scores`) as contextual tokens.
4. **DTM**: each frame's contextual tokens absorb the segment's tokens that are neither salient nor that frame's
   contextual tokens, each assigned to its most cosine-similar contextual token, weight ``max(1/(count+1), beta)``.

Kept tokens come in original order (``index``), merged values in ``values``.

Departures: ties are broken by the lower index (the public code uses ``topk`` and 1e-6 uniform noise on the density);
scores, means and merges are computed in float32 (the public code merges in the model dtype); the public code fails
when a segment has no salient or no contextual token (``torch.cat`` of nothing), with fewer than 4 candidate tokens for
the density, and with one frame or fewer than ``dyseg_c`` frames (``topk``); here those cases keep what the budgets say.
Kept as public: a non-positive salient budget keeps no salient token, so a segment keeps at least one token even when
int(N * r) = 0; a contextual token of one frame may absorb another frame's contextual tokens.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .base import TokenSelection, check_video_features
from .fastvid import (
    FastVID,
    _check_grid,
    _check_input,
    _merge,
    fastvid_density_scores,
    fastvid_segments,
)
from .tower_attention import FRAME_QUERY

__all__ = ["FastVIDQwen", "fastvid_qwen_budgets"]


def fastvid_qwen_budgets(frame_global: torch.Tensor, tokens_per_frame: int, retention_ratio: float,
                         stprune_d: float, dyseg_ignore: float, dtm_p: int) -> tuple[list[int], list[int]]:
    """(salient, contextual) token counts of each frame of ONE segment, from its (L, G) global features."""
    length, n = frame_global.shape[0], tokens_per_frame
    retain = int(n * retention_ratio) * length
    context = max(int(retain * stprune_d), 1)
    salient = retain - context
    if length == 1:
        return [max(salient, 0)], [context]
    g = F.normalize(frame_global.float(), dim=-1)
    cuts = ((g[:-1] * g[1:]).sum(dim=-1) < dyseg_ignore).nonzero().flatten().tolist()
    groups = [end - start for start, end in zip([-1] + cuts, cuts + [length - 1])]
    group_salient = _split_evenly(salient, len(groups))
    anchor_context = _split_evenly(context, -(-len(groups) // dtm_p))
    # Every dtm_p-th group gets the next share, then the list is reversed: the last group gets the first share.
    group_context = [min(anchor_context[i // dtm_p], n // 2) if i % dtm_p == 0 else 0 for i in range(len(groups))][::-1]
    salient_counts, context_counts = [], []
    for size, s, c in zip(groups, group_salient, group_context):
        salient_counts += [0] * (size - 1) + [max(min(s, n - c), 0)]
        context_counts += [0] * (size - 1) + [c]
    return salient_counts, context_counts


def _split_evenly(total: int, parts: int) -> list[int]:
    """``total`` in ``parts`` shares, the first ``total % parts`` one larger (Python's floor division, as public)."""
    chunk, remainder = divmod(total, parts)
    return [chunk + (1 if i < remainder else 0) for i in range(parts)]


class FastVIDQwen(FastVID):
    """FastVID's Qwen2.5-VL selection (module docstring): :class:`llava.compression.fastvid.FastVID`'s arguments with the
    public Qwen script's defaults, another selection, scored by the tower's attention instead of the pooling head."""

    needs_pooling_head = False
    needs_tower_attention = True
    tower_rule = FRAME_QUERY

    def __init__(self, retention_ratio: float = 0.27, dyseg_c: int = 8, dyseg_tau: float = 0.84,
                 dyseg_ignore: float = 0.95, stprune_d: float = 0.4, dtm_p: int = 4, dtm_beta: float = 0.6) -> None:
        super().__init__(retention_ratio, dyseg_c, dyseg_tau, stprune_d, dtm_p, dtm_beta, dyseg_ignore)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "variant": "qwen", "dyseg_ignore": self.dyseg_ignore}

    def select(self, features: torch.Tensor, grid_hw: tuple[int, int] | None = None, *,
               attention: torch.Tensor | None = None, keys: torch.Tensor | None = None) -> TokenSelection:
        """Choose and merge the tokens to keep.

        Args:
            features: (F, N, D) merged video embeddings of one video, one frame per temporal step.
            grid_hw: (h, w) of each frame's token grid, checked against N (the selection does not use it).
            attention: (F, N) each token's score (the recorder's ``FRAME_QUERY`` attention).
            keys: accepted with the tower attention, not used.
        """
        num_frames, n, dim = check_video_features(features)
        _check_grid(n, grid_hw)
        if attention is None:
            raise ValueError("compressor='fastvid' on the Qwen models needs attention=: the last vision block's "
                             "per-frame mean-query attention (llava.compression.tower_attention.FRAME_QUERY)")
        _check_input("attention", attention, (num_frames, n))
        feats = features.float().reshape(num_frames * n, dim)
        frame_global = features.float().mean(dim=1)
        index, values, start = [], [], 0
        for length in fastvid_segments(frame_global, self.dyseg_c, self.dyseg_tau):
            frames = slice(start, start + length)
            budgets = fastvid_qwen_budgets(frame_global[frames], n, self.retention_ratio, self.stprune_d,
                                           self.dyseg_ignore, self.dtm_p)
            kept, merged = self._segment(feats[start * n : (start + length) * n], attention[frames].float(), *budgets)
            index.append(kept + start * n)
            values.append(merged)
            start += length
        index, values = torch.cat(index), torch.cat(values)
        order = index.argsort()
        index = index[order]
        per_frame = torch.bincount(index // n, minlength=num_frames)
        return TokenSelection(index=index, per_frame=per_frame, values=values[order].to(features.dtype))

    def _segment(self, tokens: torch.Tensor, attention: torch.Tensor, salient: list[int], context: list[int]):
        """One segment's kept token indices (into its (L * N, D) ``tokens``) and their values, unsorted."""
        n = attention.shape[1]
        salient_index, context_index = [], []
        for frame, (s, c) in enumerate(zip(salient, context)):
            top = attention[frame].argsort(descending=True, stable=True)[:s]
            salient_index.append(top + frame * n)
            if c > 0:
                rest = torch.ones(n, dtype=torch.bool, device=tokens.device)
                rest[top] = False
                rest = rest.nonzero().flatten()
                scores = fastvid_density_scores(tokens[rest + frame * n][None])[0]
                chosen = scores.argsort(descending=True, stable=True)[:c].sort().values
                context_index.append(rest[chosen] + frame * n)
        salient_index = torch.cat(salient_index)
        index, values = [salient_index], [tokens[salient_index]]
        for anchors in context_index:
            pool = torch.ones(tokens.shape[0], dtype=torch.bool, device=tokens.device)
            pool[salient_index] = False
            pool[anchors] = False
            values.append(_merge(tokens[pool][None], tokens[anchors][None], self.dtm_beta)[0])
            index.append(anchors)
        return torch.cat(index), torch.cat(values)
