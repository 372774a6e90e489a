"""DyCoke temporal token merging (TTM), stage 1 of DyCoke.

Behaviour follows ``dycole_ttm`` in the public DyCoke code, with its frame-count
bugs fixed (see :class:`TemporalTokenMerging`).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F

from .base import TokenSelection, VideoTokenCompressor, check_video_features, keep_all
from .settings import check_setting

__all__ = ["TemporalTokenMerging", "ttm_pruned_frames"]


def ttm_pruned_frames(num_frames: int) -> list[tuple[int, int]]:
    """The (pruned frame, reference frame) pairs TTM uses for a video of ``num_frames`` frames.

    Stage 1 pairs frames (0, 1), (2, 3), ...: the second of each pair is pruned
    against the first. Stage 2, for each window start i in ``range(0, F - 4, 4)``,
    prunes frame i + 2 against frame i. The result is sorted by pruned frame.
    """
    pairs = [(f, f - 1) for f in range(1, num_frames, 2)]
    # The public code's window range: the last window is never revisited. Kept as is.
    pairs += [(i + 2, i) for i in range(0, num_frames - 4, 4)]
    return sorted(pairs)


class TemporalTokenMerging(VideoTokenCompressor):
    """DyCoke TTM: drop tokens that repeat the same-position token of an earlier frame.

    With ``n = int((1 - k) * N)``:

    * frames are paired (0, 1), (2, 3), ...; the second frame of each pair keeps its
      n tokens least cosine-similar to the same-position token of the first frame;
    * for each window start i in ``range(0, F - 4, 4)``, frame i + 2 keeps its n tokens
      least similar to frame i (similarities on the original, unpruned features);
    * every other frame is kept whole.

    Kept tokens of a pruned frame come in ``torch.topk(..., largest=False)`` order
    (ascending similarity); frames stay in time order. ``k = 0`` keeps everything
    in original order.

    Deliberate fixes of the public code: it drops the last frame when F is odd and
    crashes (``torch.stack`` of an empty list) when F < 5. Here an unpaired last frame
    is kept whole and any F >= 1 works.

    Similarities are computed in float32 whatever the feature dtype, so the choice
    does not depend on half-precision rounding.
    """

    name = "dycoke_ttm"

    def __init__(self, k: float = 0.7) -> None:
        self.k = check_setting("dycoke_k", k)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "k": self.k}

    def tokens_kept_per_pruned_frame(self, tokens_per_frame: int) -> int:
        """n = int((1 - k) * N), the public code's rounding."""
        return int((1.0 - self.k) * tokens_per_frame)

    def select(self, features: torch.Tensor) -> TokenSelection:
        num_frames, tokens_per_frame, _ = check_video_features(features)
        device = features.device
        pairs = ttm_pruned_frames(num_frames)
        if self.k == 0.0 or not pairs:
            return keep_all(num_frames, tokens_per_frame, device)

        n = self.tokens_kept_per_pruned_frame(tokens_per_frame)
        if n == 0:
            warnings.warn(
                f"dycoke_k={self.k} keeps int((1 - k) * {tokens_per_frame}) = 0 tokens of each merged frame: "
                f"{len(pairs)} of the {num_frames} frames reach the language model empty. Use a smaller dycoke_k.",
                stacklevel=3,
            )
        pruned, reference = (torch.tensor(col, dtype=torch.long, device=device) for col in zip(*pairs))

        feats = features.float()
        similarity = F.cosine_similarity(feats[pruned], feats[reference], dim=-1)  # (P, N)
        kept_local = similarity.topk(n, dim=-1, largest=False).indices  # (P, n), ascending similarity

        # order[f, j]: local token index at output slot j of frame f; slots >= per_frame[f] are unused.
        order = torch.arange(tokens_per_frame, device=device).expand(num_frames, tokens_per_frame).clone()
        order[pruned, :n] = kept_local
        per_frame = torch.full((num_frames,), tokens_per_frame, dtype=torch.long, device=device)
        per_frame[pruned] = n

        slot_used = torch.arange(tokens_per_frame, device=device) < per_frame[:, None]
        frame_offset = torch.arange(num_frames, device=device)[:, None] * tokens_per_frame
        index = (order + frame_offset)[slot_used]  # boolean indexing keeps row-major (time) order
        return TokenSelection(index=index, per_frame=per_frame)
