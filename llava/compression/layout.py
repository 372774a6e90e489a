"""The token sequence the language model sees for one video.

Without a selection the layouts are LLaVA-NeXT's (``prepare_inputs_labels_for_multimodal``
with ``mm_newline_position``):

* ``one_token``: all frames flattened in time order, then ONE newline;
* ``grid``: per frame, each row's w tokens followed by a newline (F * h * (w + 1) tokens),
  as ``add_token_per_grid``;
* ``frame``: each frame's N tokens followed by a newline, as ``add_token_per_frame``;
* ``no_token``: flattened, no newline.

With a :class:`TokenSelection`:

* ``one_token`` / ``no_token``: kept tokens in selection order (then the newline for one_token);
* ``frame``: each frame's kept tokens in selection order, then that frame's newline
  (a frame that keeps nothing still gets its newline);
* ``grid``: the rule of the public VidCom2 code for LLaVA-Video (``_map_grid_vid`` in
  ``token_compressor/vidcom2/vidcom2.py``). It indexes the full grid sequence and, per
  frame, takes the kept tokens in spatial (row-major) order followed by ALL h row
  newlines of that frame. So each frame becomes
  ``[kept tokens, spatial order][newline x h]``: the newlines are kept, but grouped at
  the end of the frame rather than interleaved with the rows. This is the default
  (``grid_newlines="frame_end"``) whatever the compressor; a selection keeping every token in
  original order (e.g. TTM with k = 0) gives the baseline grid layout.
  ``grid_newlines="kept_rows"`` is the rule of the public HoliTom code (``add_newline_token``
  in ``holitom/llava_arch.py``): per frame the kept tokens in spatial order, with ONE newline
  after each row that keeps a token, so a row that keeps nothing has no newline and a frame
  that keeps nothing contributes nothing. A compressor chooses its rule with its
  ``grid_newlines`` attribute (:class:`~llava.compression.base.VideoTokenCompressor`).

With ``keep_positions=True`` (the ``keep_positions`` setting) every layout is the uncompressed one with the dropped
video tokens left out: kept tokens in their original order, each newline where it is without compression (grid: after
its row), and :func:`video_token_positions` gives each token its position in the uncompressed layout, so that the
language model sees the uncompressed sequence with the dropped tokens removed (what hiding them with the attention
mask gives). ``grid_newlines`` does not change these layouts: every newline stays where it is without compression.

``newline=None`` means no newline tokens at all (``mm_patch_merge_type`` without
``unpad`` for one_token): the visual tokens are laid out as above without newlines.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

from .base import TokenSelection, check_video_features

__all__ = ["GRID_NEWLINES", "NEWLINE_POSITIONS", "VideoTokens", "assemble_video_tokens",
           "assemble_video_tokens_in_place", "video_token_layout"]

NEWLINE_POSITIONS = ("one_token", "grid", "frame", "no_token")
GRID_NEWLINES = ("frame_end", "kept_rows")
"""Where the grid layout puts the row newlines of a selection (see the module docstring); the first is the default."""

NEWLINE = -1
"""Marker for a newline token in :func:`video_token_layout`."""


class VideoTokens(NamedTuple):
    """Result of :func:`assemble_video_tokens`."""

    tokens: torch.Tensor  # (M', D) the sequence the LM sees
    is_visual: torch.Tensor  # (M',) bool: True for visual feature tokens, False for newlines


def video_token_layout(
    num_frames: int,
    tokens_per_frame: int,
    selection: TokenSelection | None,
    position: str,
    grid_hw: tuple[int, int] | None = None,
    *,
    with_newline: bool = True,
    device: torch.device | str | None = None,
    keep_positions: bool = False,
    grid_newlines: str = "frame_end",
) -> torch.Tensor:
    """Source of each output token: (M',) int64, an index into ``features.reshape(F * N, D)``
    or ``NEWLINE`` (-1) for a newline token. See the module docstring for the layouts.

    ``grid_hw`` (h, w) with h * w == N is needed for ``grid`` (default: square, h = w = sqrt(N))
    and checked against N when given for the other positions. ``keep_positions``: the uncompressed layout less the
    dropped tokens (see :func:`assemble_video_tokens_in_place`). ``grid_newlines``: one of ``GRID_NEWLINES``, the
    grid layout's newline rule for a selection (ignored with ``keep_positions``).
    """
    _check_grid_newlines(grid_newlines)
    if keep_positions:
        return _in_place(num_frames, tokens_per_frame, selection, position, grid_hw, with_newline, device)[0]
    if position not in NEWLINE_POSITIONS:
        raise ValueError(f"position (mm_newline_position) must be one of {NEWLINE_POSITIONS}, got {position!r}")
    h, w = _grid_shape(tokens_per_frame, grid_hw, required=position == "grid")
    total = num_frames * tokens_per_frame
    if selection is not None:
        device = selection.index.device
        if selection.num_frames != num_frames:
            raise ValueError(
                f"selection.per_frame has {selection.num_frames} frames but the features have {num_frames}"
            )
        if position == "grid" and selection.num_kept == total and _is_identity(selection.index):
            selection = None  # keeps everything in order: the baseline layout
    if selection is None:
        index = torch.arange(total, device=device)
    elif position == "grid":
        index = torch.sort(selection.index).values  # frames in time order, tokens in spatial order
    else:
        index = selection.index

    if not with_newline or position == "no_token":
        return index
    newline = torch.full((1,), NEWLINE, dtype=torch.long, device=index.device)
    if position == "one_token":
        return torch.cat([index, newline])
    if selection is None:
        # Baseline: append a newline column to every frame (frame) or every row (grid).
        rows = index.view(num_frames, tokens_per_frame) if position == "frame" else index.view(num_frames * h, w)
        return torch.cat([rows, newline.expand(rows.shape[0], 1)], dim=1).reshape(-1)
    if position == "grid" and grid_newlines == "kept_rows":
        return _kept_rows(index, num_frames * h, w)

    # With a selection: each kept token moves right by the number of newlines before it.
    newlines_per_frame = h if position == "grid" else 1
    frame = torch.div(index, tokens_per_frame, rounding_mode="floor")
    out = torch.full((index.numel() + num_frames * newlines_per_frame,), NEWLINE, dtype=torch.long, device=index.device)
    out[torch.arange(index.numel(), device=index.device) + frame * newlines_per_frame] = index
    return out


def _kept_rows(index: torch.Tensor, rows: int, w: int) -> torch.Tensor:
    """The grid layout of the kept tokens ``index`` by the public HoliTom rule: the baseline grid less the dropped
    tokens and less the newlines of the rows that keep nothing."""
    kept = torch.zeros(rows * w, dtype=torch.bool, device=index.device)
    kept[index] = True
    kept = kept.view(rows, w)
    survives = torch.cat([kept, kept.any(dim=1, keepdim=True)], dim=1).reshape(-1)
    full = torch.arange(rows * w, device=index.device).view(rows, w)
    full = torch.cat([full, torch.full((rows, 1), NEWLINE, dtype=torch.long, device=index.device)], dim=1).reshape(-1)
    return full[survives]  # a host read (the length depends on the rows kept), once per video at the prefill


def _check_grid_newlines(grid_newlines: str) -> None:
    if grid_newlines not in GRID_NEWLINES:
        raise ValueError(f"grid_newlines must be one of {GRID_NEWLINES}, got {grid_newlines!r}")


def _in_place(num_frames, tokens_per_frame, selection, position, grid_hw, with_newline, device):
    """(sources, positions, span): the uncompressed layout with the tokens ``selection`` drops left out."""
    if selection is not None:
        device = selection.index.device
    full = video_token_layout(num_frames, tokens_per_frame, None, position, grid_hw, with_newline=with_newline,
                              device=device)
    if selection is not None and selection.num_frames != num_frames:
        raise ValueError(f"selection.per_frame has {selection.num_frames} frames but the features have {num_frames}")
    if selection is None:
        return full, torch.arange(full.numel(), device=full.device), full.numel()
    # kept[s]: source s survives; the extra last entry is what NEWLINE (-1) indexes: newlines always survive.
    kept = torch.zeros(num_frames * tokens_per_frame + 1, dtype=torch.bool, device=full.device)
    kept[selection.index] = True
    kept[-1] = True
    positions = kept[full].nonzero().flatten()  # a host read, once per video at the prefill
    return full[positions], positions, full.numel()


def assemble_video_tokens(
    features: torch.Tensor,
    selection: TokenSelection | None,
    newline: torch.Tensor | None,
    position: str,
    grid_hw: tuple[int, int] | None = None,
    *,
    keep_positions: bool = False,
    grid_newlines: str = "frame_end",
) -> VideoTokens:
    """Build the token sequence the LM sees for one video.

    Args:
        features: (F, N, D) pooled per-frame tokens, N == h * w.
        selection: tokens to keep (None = keep all, the LLaVA-NeXT layout); a merging method's ``values``
            replace the features of its kept tokens.
        newline: (D,) the ``image_newline`` embedding, or None for no newline tokens.
        position: ``mm_newline_position``, one of ``NEWLINE_POSITIONS``.
        grid_hw: (h, w) of each frame's token grid (default: square).
        keep_positions: lay the tokens out in their uncompressed order, newlines where they are without
            compression (with their positions: :func:`assemble_video_tokens_in_place`).
        grid_newlines: one of ``GRID_NEWLINES``, where the grid layout puts a selection's row newlines (the
            compressor's ``grid_newlines``); ignored with ``keep_positions``.
    Returns:
        ``VideoTokens(tokens, is_visual)``: (M', D) tokens in ``features``' dtype and
        device, and the (M',) bool mask that is False exactly at newline tokens.
    """
    _check_grid_newlines(grid_newlines)
    if keep_positions:
        return assemble_video_tokens_in_place(features, selection, newline, position, grid_hw)[0]
    num_frames, tokens_per_frame, _ = _check_inputs(features, newline)
    source = video_token_layout(
        num_frames, tokens_per_frame, selection, position, grid_hw, with_newline=newline is not None,
        device=features.device, grid_newlines=grid_newlines,
    )
    return _gathered(features, selection, newline, source)


def assemble_video_tokens_in_place(
    features: torch.Tensor,
    selection: TokenSelection | None,
    newline: torch.Tensor | None,
    position: str,
    grid_hw: tuple[int, int] | None = None,
) -> tuple[VideoTokens, torch.Tensor, int]:
    """The ``keep_positions`` layout of one video: (its tokens as :func:`assemble_video_tokens` gives them, each
    token's offset from the video's first token in the uncompressed layout (M',) increasing, and the uncompressed
    layout's length, where the text after the video continues)."""
    num_frames, tokens_per_frame, _ = _check_inputs(features, newline)
    source, positions, span = _in_place(num_frames, tokens_per_frame, selection, position, grid_hw,
                                        newline is not None, features.device)
    return _gathered(features, selection, newline, source), positions, span


def _check_inputs(features: torch.Tensor, newline: torch.Tensor | None) -> tuple[int, int, int]:
    num_frames, tokens_per_frame, dim = check_video_features(features)
    if newline is not None and (not isinstance(newline, torch.Tensor) or newline.shape != (dim,)):
        shape = tuple(newline.shape) if isinstance(newline, torch.Tensor) else type(newline).__name__
        raise ValueError(f"newline must be a ({dim},) tensor matching the feature dim, got {shape}")
    return num_frames, tokens_per_frame, dim


def _gathered(features, selection: TokenSelection | None, newline, source: torch.Tensor) -> VideoTokens:
    """The tokens of a layout ``source`` (indices into the flattened features, NEWLINE for newlines)."""
    num_frames, tokens_per_frame, dim = features.shape
    is_visual = source != NEWLINE
    table = features.reshape(num_frames * tokens_per_frame, dim)
    if selection is not None and selection.values is not None:  # a merging method: its kept tokens' own values
        table = table.index_copy(0, selection.index, selection.values.to(table.dtype))
    tokens = table[source.clamp(min=0)]
    if newline is not None:
        tokens = torch.where(is_visual[:, None], tokens, newline.to(device=tokens.device, dtype=tokens.dtype))
    return VideoTokens(tokens, is_visual)


def _grid_shape(tokens_per_frame: int, grid_hw: tuple[int, int] | None, *, required: bool) -> tuple[int, int]:
    if grid_hw is None:
        side = math.isqrt(tokens_per_frame)
        if required and side * side != tokens_per_frame:
            raise ValueError(
                f"grid_hw is required for the grid layout when tokens per frame ({tokens_per_frame}) is not a square"
            )
        return side, side
    if not isinstance(grid_hw, (tuple, list)) or len(grid_hw) != 2 or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1 for v in grid_hw):
        raise ValueError(f"grid_hw must be two positive ints (h, w), got {grid_hw!r}")
    h, w = int(grid_hw[0]), int(grid_hw[1])
    if h * w != tokens_per_frame:
        raise ValueError(f"grid_hw {grid_hw!r} gives {h * w} tokens per frame, but the features have {tokens_per_frame}")
    return h, w


def _is_identity(index: torch.Tensor) -> bool:
    return bool(torch.equal(index, torch.arange(index.numel(), device=index.device)))
