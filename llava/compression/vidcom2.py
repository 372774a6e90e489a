"""VidCom2: frame-uniqueness-aware video token compression.

Behaviour follows ``token_compressor/vidcom2/vidcom2.py`` in the public VidCom2 code
(``vidcom2_compression`` with its default "outlier retention" strategy).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .base import TokenSelection, VideoTokenCompressor, check_video_features
from .registry import Argument, Stages, register
from .settings import check_setting

__all__ = ["VidCom2", "vidcom2_frame_budgets", "vidcom2_token_scores"]

_ALPHAS = tuple(2.0**e for e in range(-3, 2))  # 1/8 .. 2
_CHANNEL_RATIO = 0.5
_TEMPERATURE = 0.01


def _gaussian_similarity(x: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """sum over alpha of exp(-||x - c||^2 / (2 alpha)), reduced over the last dim."""
    dist_sq = (x - center).pow(2).sum(dim=-1)
    return sum(torch.exp(-dist_sq / (2.0 * a)) for a in _ALPHAS)


def vidcom2_token_scores(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token similarity to the video centre and to its frame centre, each (F, N), float32.

    Uses the half of the channels with the lowest variance over all tokens of the
    video, each token L2-normalised on those channels.
    """
    num_frames, tokens_per_frame, dim = features.shape
    flat = features.float().reshape(num_frames * tokens_per_frame, dim)
    num_channels = int(dim * _CHANNEL_RATIO)
    channels = flat.var(dim=0, unbiased=False).topk(num_channels, largest=False).indices
    x = F.normalize(flat[:, channels].reshape(num_frames, tokens_per_frame, num_channels), dim=-1)
    video_center = x.mean(dim=(0, 1), keepdim=True)
    frame_center = x.mean(dim=1, keepdim=True)
    return _gaussian_similarity(x, video_center), _gaussian_similarity(x, frame_center)


def vidcom2_frame_budgets(video_similarity: torch.Tensor, r: float) -> torch.Tensor:
    """Tokens to keep per frame, (F,) int64, from the (F, N) video similarities.

    A frame whose tokens are far from the video centre (high uniqueness) gets more:
    ``round(N * min(1, r * (1 + p_f - mean(p))))``, at least 1, where
    p = softmax(uniqueness / 0.01) and uniqueness = -mean video similarity.
    """
    tokens_per_frame = video_similarity.shape[1]
    uniqueness = -video_similarity.mean(dim=-1)
    probs = torch.softmax((uniqueness - uniqueness.max()) / _TEMPERATURE, dim=0)
    scale = (r * (1.0 + probs - probs.mean())).clamp(max=1.0)
    # torch.round (half to even), as the public code.
    return (scale * tokens_per_frame).round().long().clamp(min=1)


class VidCom2(VideoTokenCompressor):
    """VidCom2 with retention ratio ``r``: about ``r * F * N`` tokens survive.

    Each frame gets a budget from its uniqueness (:func:`vidcom2_frame_budgets`) and
    keeps the tokens with the lowest (video similarity + frame similarity), i.e. the
    tokens most distinct from both the whole video and their own frame. Kept tokens
    come in spatial order inside each frame; frames in time order.

    Scores are computed in float32 whatever the feature dtype (the public code uses
    the model dtype); ties in the score are broken by lower spatial index.
    """

    name = "vidcom2"

    def __init__(self, r: float = 0.25) -> None:
        self.r = check_setting("vidcom2_r", r)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "r": self.r}

    def select(self, features: torch.Tensor) -> TokenSelection:
        num_frames, tokens_per_frame, dim = check_video_features(features)
        if dim < 2:
            raise ValueError(f"VidCom2 needs features with at least 2 channels, got {dim}")
        video_sim, frame_sim = vidcom2_token_scores(features)
        budget = vidcom2_frame_budgets(video_sim, self.r)

        # Rank of each token inside its frame (0 = most distinct); keep rank < budget.
        order = (video_sim + frame_sim).argsort(dim=-1, stable=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(tokens_per_frame, device=order.device).expand_as(order))
        keep = rank < budget[:, None]
        # nonzero of a (F, N) mask is row-major: frames in time order, tokens in spatial order.
        index = keep.reshape(-1).nonzero().squeeze(1)
        return TokenSelection(index=index, per_frame=budget)


@register(
    "vidcom2",
    Argument("vidcom2_r", 0.25, "(0, 1]", "share of video tokens kept"),
    summary="VidCom2: frame-uniqueness-aware token selection before the LM",
    examples=({"vidcom2_r": 0.5}, {"vidcom2_r": 0.1}),
)
def build(settings) -> Stages:
    return Stages(video=VidCom2(settings.vidcom2_r))
