"""EVS (Efficient Video Sampling): drop the tokens that repeat the same cell of the previous frame.

Behaviour follows vLLM's ``compute_retention_mask`` and ``compute_retained_tokens_count`` in
``vllm/multimodal/evs.py`` (vllm-project/vllm, read at commit 094f117823287790739d3022162a3f30f13d758b),
enabled there by ``--video-pruning-rate`` (``video_pruning_rate``, here ``evs_rate``).

What one "frame" is. vLLM runs EVS on the embeddings the language model receives: on Qwen2/2.5/3-VL each
token is one merged 2x2 patch cell (the vision merger's output, ``spatial_merge_size`` 2, so a frame has
``(grid_h / 2) * (grid_w / 2)`` tokens) and one step of its T is one temporal patch, i.e. two sampled frames
(``temporal_patch_size`` 2: ``T = grid_t = frames / 2``). LLaVA-OneVision / LLaVA-Video give each sampled
frame its own grid of N pooled tokens, so here one pooled frame is one step of T: T = F, tokens per
frame = N, and a token is compared with the token at the same grid position of the previous pooled frame.

Deliberate difference: the cosine similarity is computed in float32 whatever the feature dtype (vLLM uses
the embedding dtype, e.g. bfloat16), so the choice does not depend on half-precision rounding and ties.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .base import TokenSelection, VideoTokenCompressor, check_video_features
from .registry import Argument, Stages, register
from .settings import check_setting

__all__ = ["EVS", "evs_dissimilarity", "evs_retained_count"]

# vLLM's dissimilarity of every first-frame token: above any 1 - cos (at most 2), so frame 0 sorts first.
_FIRST_FRAME_DISSIMILARITY = 255.0


def evs_retained_count(num_frames: int, tokens_per_frame: int, rate: float) -> int:
    """Tokens EVS keeps: ``max(N, int(F * N * (1 - rate)))``, vLLM's rounding (never less than one frame)."""
    total = tokens_per_frame * num_frames
    return max(tokens_per_frame, int(total * (1 - rate)))


def evs_dissimilarity(features: torch.Tensor) -> torch.Tensor:
    """(F, N) float32: 1 - cosine similarity with the same token of the previous frame; 255 for frame 0."""
    feats = features.float()
    first = torch.full_like(feats[:1, :, 0], _FIRST_FRAME_DISSIMILARITY)
    return torch.cat([first, 1.0 - F.cosine_similarity(feats[1:], feats[:-1], dim=-1)])


class EVS(VideoTokenCompressor):
    """EVS with pruning rate ``rate`` (vLLM's ``video_pruning_rate``): about ``rate`` of the video's tokens go.

    All F * N tokens of the video are ranked together by their dissimilarity to the same token of the previous
    frame (stable descending sort: ties go to the earlier token); the first
    :func:`evs_retained_count` of them are kept. The first frame is always kept whole. Kept tokens come in
    original order (frames in time order, tokens in spatial order), so a frame may keep any number of tokens,
    from none to all. ``rate = 0`` keeps everything in original order.

    The default 0.7 is the rate NVIDIA ships as EVS's default for its EVS-trained Nemotron-Nano-12B-v2-VL
    (``video_pruning_rate`` 0.7 in that model's configuration; vLLM's own flag defaults to off).
    """

    name = "evs"

    def __init__(self, rate: float = 0.7) -> None:
        self.rate = check_setting("evs_rate", rate)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "rate": self.rate}

    def select(self, features: torch.Tensor) -> TokenSelection:
        num_frames, tokens_per_frame, _ = check_video_features(features)
        dissimilarity = evs_dissimilarity(features).reshape(-1)
        order = dissimilarity.argsort(descending=True, stable=True)
        keep = torch.zeros_like(dissimilarity, dtype=torch.bool)
        keep[order[: evs_retained_count(num_frames, tokens_per_frame, self.rate)]] = True
        index = keep.nonzero().squeeze(1)  # row-major: frames in time order, tokens in spatial order
        per_frame = keep.reshape(num_frames, tokens_per_frame).sum(dim=1)
        return TokenSelection(index=index, per_frame=per_frame)


@register(
    "evs",
    Argument("evs_rate", 0.7, "[0, 1)", "share of video tokens pruned (vLLM's video_pruning_rate); the first frame "
             "is always kept whole"),
    summary="EVS: tokens that repeat the same cell of the previous frame are dropped before the LM",
    examples=({"evs_rate": 0.5}, {"evs_rate": 0.9, "dycoke_l": 1, "dycoke_p": 0.7}),  # the second: with KV pruning
)
def build(settings) -> Stages:
    return Stages(video=EVS(settings.evs_rate) if settings.evs_rate > 0 else None)
