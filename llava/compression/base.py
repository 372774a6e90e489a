"""The interface shared by the video-token compressors.

A compressor looks at the pooled per-frame features of ONE video, shape (F, N, D),
and decides which tokens the language model keeps. It never builds the token
sequence itself: it returns a :class:`TokenSelection` (indices into the
flattened features) and :func:`llava.compression.layout.assemble_video_tokens`
turns that into the sequence, newline tokens included.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["TokenSelection", "VideoTokenCompressor", "KeepAll", "keep_all", "check_video_features"]


@dataclass(frozen=True)
class TokenSelection:
    """Which tokens of a (F, N, D) video survive, and in which order.

    Attributes:
        index: (M,) int64 indices into ``features.reshape(F * N, D)``, in OUTPUT order.
            Frames appear in time order: every index of frame f comes before every
            index of frame f + 1. Inside a frame the order is the compressor's.
        per_frame: (F,) int64 number of kept tokens of each frame; ``per_frame.sum() == M``.
        values: (M, D) the features of the kept tokens, in output order, for methods that merge tokens (a kept
            token then stands for several: ``index`` is where it sits, e.g. for its position); None (selecting
            methods) means ``features.reshape(F * N, D)[index]``.
        groups: (M,) int64, for a method whose in-LLM stage keeps a share of each group of tokens (PruneVid: a
            segment's static tokens, each frame's moving ones): the group of each kept token, in output order,
            numbered from 0. None: the video is one group.
    """

    index: torch.Tensor
    per_frame: torch.Tensor
    values: torch.Tensor | None = None
    groups: torch.Tensor | None = None

    def __post_init__(self) -> None:
        # Shape and dtype checks only: checking values would force a device sync.
        for name in ("index", "per_frame"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype != torch.long:
                raise ValueError(f"TokenSelection.{name} must be a 1-D torch.long tensor, got {_describe(t)}")
        if self.values is not None and (
            not isinstance(self.values, torch.Tensor) or self.values.dim() != 2 or self.values.shape[0] != self.index.numel()
        ):
            raise ValueError(
                f"TokenSelection.values must be a (M, D) tensor with M = {self.index.numel()} kept tokens, "
                f"got {_describe(self.values)}"
            )
        if self.groups is not None and (
            not isinstance(self.groups, torch.Tensor) or self.groups.dtype != torch.long
            or tuple(self.groups.shape) != (self.index.numel(),)
        ):
            raise ValueError(
                f"TokenSelection.groups must be a ({self.index.numel()},) torch.long tensor (one group per kept "
                f"token), got {_describe(self.groups)}"
            )

    def kept_features(self, features: torch.Tensor) -> torch.Tensor:
        """(M, D) the features of the kept tokens in output order (merged values where the method merges)."""
        if self.values is not None:
            return self.values.to(features.dtype)
        return features.reshape(-1, features.shape[-1])[self.index]

    def groups_at(self, source: torch.Tensor, num_features: int) -> torch.Tensor:
        """(L,) int64: the group of each entry of a layout ``source`` (indices into the ``num_features`` = F * N
        flattened features, -1 for a newline): -1 at newlines, the kept token's group elsewhere (0 for every kept
        token of a selection without groups)."""
        table = torch.full((num_features + 1,), -1, dtype=torch.long, device=source.device)
        table[self.index] = self.groups if self.groups is not None else 0
        return table[source]  # a newline (-1) reads the last entry

    @property
    def num_frames(self) -> int:
        return self.per_frame.numel()

    @property
    def num_kept(self) -> int:
        return self.index.numel()


class VideoTokenCompressor(ABC):
    """A training-free compressor of one video's pooled frame tokens."""

    name: str
    # A method that scores tokens with the vision tower's attention (VisionZip) sets this: ``select`` then also gets
    # ``attention=`` (F, N), the attention each pooled token receives in the tower's last layer, and ``keys=``
    # (F, N, head_dim), that layer's keys, both pooled like the features (llava.model.llava_arch).
    needs_tower_attention: bool = False
    # A method that reads SigLIP's attention-pooling head (FastVID) sets this: ``select`` then also gets
    # ``frame_global=`` (F, C), each frame's pooled feature, and ``saliency=`` (F, N), the head's attention over the
    # patches, pooled like the features (llava.model.pooling_head).
    needs_pooling_head: bool = False
    # Where LLaVA-Video's grid layout puts the row newlines of the kept tokens (llava.compression.layout.GRID_NEWLINES):
    # "frame_end", all of a frame's newlines after its kept tokens (the public VidCom2 rule), or "kept_rows", one after
    # each row that keeps a token (the public HoliTom code). Layouts with keep_positions do not depend on it.
    grid_newlines: str = "frame_end"

    @abstractmethod
    def select(self, features: torch.Tensor) -> TokenSelection:
        """Choose the tokens to keep.

        Args:
            features: (F, N, D) pooled tokens of one video, frames in time order.
        Returns:
            A :class:`TokenSelection` over ``features.reshape(F * N, D)``.
        """

    def describe(self) -> dict[str, Any]:
        """The compressor's name and arguments, for logs and statistics."""
        return {"name": self.name}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.describe().items() if k != "name")
        return f"{type(self).__name__}({args})"


def keep_all(num_frames: int, tokens_per_frame: int, device: torch.device | str | None = None) -> TokenSelection:
    """The identity selection: every token of every frame, in original order."""
    if num_frames < 1 or tokens_per_frame < 1:
        raise ValueError(
            f"keep_all needs num_frames >= 1 and tokens_per_frame >= 1, got {num_frames} and {tokens_per_frame}"
        )
    index = torch.arange(num_frames * tokens_per_frame, dtype=torch.long, device=device)
    per_frame = torch.full((num_frames,), tokens_per_frame, dtype=torch.long, device=device)
    return TokenSelection(index=index, per_frame=per_frame)


class KeepAll(VideoTokenCompressor):
    """The no-op compressor: keeps everything (useful as a baseline in benchmarks)."""

    name = "none"

    def select(self, features: torch.Tensor) -> TokenSelection:
        num_frames, tokens_per_frame, _ = check_video_features(features)
        return keep_all(num_frames, tokens_per_frame, features.device)


def check_video_features(features: torch.Tensor) -> tuple[int, int, int]:
    """Validate a (F, N, D) video feature tensor and return (F, N, D)."""
    if not isinstance(features, torch.Tensor) or features.dim() != 3:
        raise ValueError(f"features must be a (frames, tokens, dim) tensor, got {_describe(features)}")
    num_frames, tokens_per_frame, dim = features.shape
    if num_frames < 1 or tokens_per_frame < 1 or dim < 1:
        raise ValueError(f"features must have at least one frame, token and channel, got shape {tuple(features.shape)}")
    if not features.is_floating_point():
        raise ValueError(f"features must be a floating-point tensor, got {features.dtype}")
    return num_frames, tokens_per_frame, dim


def _describe(obj: Any) -> str:
    if isinstance(obj, torch.Tensor):
        return f"tensor of shape {tuple(obj.shape)} and dtype {obj.dtype}"
    return repr(type(obj).__name__)
