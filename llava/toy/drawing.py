"""Pixels of the synthetic clips: the shapes' masks, the colours and the backgrounds (numpy only).

Shapes are drawn with hard edges (no anti-aliasing) in exact colours, so a colour's pixels in a frame are exactly
the pixels of the shape that has it: tests read the facts back from the frames by colour. The noisy background's
channels stay below ``NOISE_LEVELS``, far from every shape colour.
"""

from __future__ import annotations

import numpy as np

SHAPES = ("square", "circle", "triangle")
COLOURS = {
    "red": (235, 35, 35),
    "green": (40, 210, 60),
    "blue": (50, 90, 250),
    "yellow": (245, 225, 40),
    "white": (245, 245, 245),
    "magenta": (230, 50, 230),
}
BACKGROUNDS = ("black", "noise")
NOISE_LEVELS = 64  # noise pixels take channel values in [0, NOISE_LEVELS)


def shape_mask(kind: str, side: int) -> np.ndarray:
    """A (side, side) boolean mask of ``kind``: a filled square, a disc, or a triangle pointing up (base at the
    bottom row, apex in the top row's centre)."""
    centre = (side - 1) / 2
    rows, cols = np.mgrid[0:side, 0:side]
    if kind == "square":
        return np.ones((side, side), dtype=bool)
    if kind == "circle":
        return (rows - centre) ** 2 + (cols - centre) ** 2 <= (side / 2) ** 2
    if kind == "triangle":
        half_width = (rows + 1) / side * side / 2  # grows linearly from the apex row to the base row
        return np.abs(cols - centre) <= half_width
    raise ValueError(f"Unknown shape {kind!r}; allowed: {', '.join(SHAPES)}.")


def background(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A (size, size, 3) uint8 background: black, or static dark noise (independent channels)."""
    if kind == "black":
        return np.zeros((size, size, 3), dtype=np.uint8)
    if kind == "noise":
        return rng.integers(0, NOISE_LEVELS, (size, size, 3), dtype=np.uint8)
    raise ValueError(f"Unknown background {kind!r}; allowed: {', '.join(BACKGROUNDS)}.")


def paint(frame: np.ndarray, mask: np.ndarray, top_left: tuple[int, int], colour: str) -> None:
    """Paint ``mask`` in ``colour`` onto ``frame`` (H, W, 3) in place, its top-left corner at ``(x, y)``."""
    x, y = top_left
    height, width = mask.shape
    frame[y : y + height, x : x + width][mask] = COLOURS[colour]
