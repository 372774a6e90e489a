"""Dense training targets for the toy model: what each video token of a clip shows.

The answers alone are a weak signal for a model trained from scratch: one word per clip says "triangle: red", and
the tower must discover shape kinds, the LM how to read motion, from that word only. ``scripts/train_toy.py`` adds
dense auxiliary losses (the heads are dropped after training; the checkpoint keeps the stock format): at every patch
of the projector's output, the kind and colour of the shape it shows; at every video token (a pooled cell), in the
LM's hidden state, the direction in which that shape moves (causal attention lets the token see the earlier frames;
a shape seen for the first time has no target); and, for the questions that name a shape (colour, direction),
which video tokens show that shape: the LM's attention at the answer is asked to rest on them (binding the question's
shape word to the tokens of that kind).

The frame is cut into a ``grid`` x ``grid`` partition (the patches, 8x8, or the pooled tokens, 4x4, of the toy
model). A cell shows the shape that has the largest share of its own area in the cell, if that share is at least
``MIN_SHAPE_SHARE`` (a shape straddling four cells shows in all four), else the background (class 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from llava.toy.drawing import COLOURS, SHAPES, shape_mask
from llava.toy.videoqa import DIRECTIONS, Sample

BACKGROUND = 0  # class 0 of every target; a shape's class is 1 + its index in SHAPES / COLOURS / DIRECTIONS
MIN_SHAPE_SHARE = 0.2  # a cell shows a shape when it holds at least this share of the shape's pixels
UNKNOWN = -100  # no target (cross-entropy's ignore index): the motion of a shape in the first frame it is seen


@dataclass(frozen=True)
class CellTargets:
    """Per sampled frame and cell (raster order): (frames, grid * grid) int64 class indices."""

    kind: np.ndarray  # BACKGROUND or 1 + SHAPES.index
    colour: np.ndarray  # BACKGROUND or 1 + list(COLOURS).index
    motion: np.ndarray  # BACKGROUND or 1 + DIRECTIONS.index; UNKNOWN where the shape is seen for the first time


_mask = lru_cache(maxsize=None)(lambda kind, side: shape_mask(kind, side).astype(float))  # shared: read only


def shape_shares(sample: Sample, frame: int, grid: int) -> np.ndarray:
    """(shapes, grid, grid): the share of each shape's pixels that falls in each cell of clip frame ``frame``
    (zero where the shape is not visible)."""
    if sample.size % grid:
        raise ValueError(f"grid {grid} does not divide the frame size {sample.size}.")
    cell = sample.size // grid
    shares = np.zeros((len(sample.shapes), grid, grid))
    for index, shape in enumerate(sample.shapes):
        if shape.visible(frame):
            mask = _mask(shape.kind, shape.side)
            x, y = shape.positions[frame]
            rows = np.eye(grid)[(y + np.arange(shape.side)) // cell]  # (side, grid): the cell row of each mask row
            cols = np.eye(grid)[(x + np.arange(shape.side)) // cell]
            shares[index] = rows.T @ mask @ cols / mask.sum()
    return shares


def cell_targets(sample: Sample, grid: int, num_frames: int | None = None) -> CellTargets:
    """The targets of the ``num_frames`` frames the model sees (default: the sample's ``sampled_frames``)."""
    frames = sample.sampled_indices(num_frames)
    kind = np.full((len(frames), grid * grid), BACKGROUND, dtype=np.int64)
    colour, motion = kind.copy(), kind.copy()
    colour_names = list(COLOURS)
    seen_before = set()  # shapes visible in an earlier sampled frame
    for row, frame in enumerate(frames):
        shares = shape_shares(sample, int(frame), grid).reshape(len(sample.shapes), -1)
        best = shares.argmax(axis=0)
        for cell in np.flatnonzero(shares.max(axis=0) >= MIN_SHAPE_SHARE):
            shape = sample.shapes[best[cell]]
            kind[row, cell] = 1 + SHAPES.index(shape.kind)
            colour[row, cell] = 1 + colour_names.index(shape.colour)
            motion[row, cell] = 1 + DIRECTIONS.index(shape.direction) if best[cell] in seen_before else UNKNOWN
        seen_before.update(i for i, shape in enumerate(sample.shapes) if shape.visible(int(frame)))
    motion[0] = UNKNOWN  # nothing was seen before (a background cell could be anything moving in)
    return CellTargets(kind, colour, motion)


def subject_cells(sample: Sample, grid: int, num_frames: int | None = None) -> np.ndarray:
    """(frames, grid * grid) bool: the cells that show the shape the question names (``sample.subject``), by the
    rule of :func:`cell_targets` (a clip's colours are distinct, so a cell shows the subject when it shows its
    colour)."""
    if sample.subject is None:
        raise ValueError(f"a {sample.family!r} question names no shape; only colour and direction questions do.")
    subject_colour = 1 + list(COLOURS).index(sample.shapes[sample.subject].colour)
    return cell_targets(sample, grid, num_frames).colour == subject_colour
