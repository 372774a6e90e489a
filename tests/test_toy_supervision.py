"""The toy model's dense training targets (llava.toy.supervision), read back from the pixels: what each cell of
each sampled frame shows, and the order in which the training script pairs them with the model's video tokens."""

import re

import numpy as np
import pytest
import torch

from llava.constants import IMAGE_TOKEN_INDEX
from llava.toy.drawing import COLOURS, SHAPES
from llava.toy.supervision import BACKGROUND, MIN_SHAPE_SHARE, UNKNOWN, cell_targets, subject_cells
from llava.toy.videoqa import DIRECTIONS, FAMILIES, make_sample
from tests.conftest import random_video
from tests.test_toy_videoqa import colour_pixels, colours_in, direction_from_pixels

GRID = 4  # the toy model's pooled tokens per frame side (its patches: 8)


def kind_from_pixels(mask: np.ndarray) -> str:
    """A whole shape's kind from how much of its bounding box it fills: a square all of it, a disc about pi/4, a
    triangle about half."""
    rows, cols = np.nonzero(mask)
    fill = mask.sum() / (np.ptp(rows) + 1) / (np.ptp(cols) + 1)
    return "square" if fill > 0.95 else "circle" if fill > 0.68 else "triangle"


def targets_from_pixels(sample, grid: int) -> dict[str, np.ndarray]:
    """The rule of llava.toy.supervision applied to the pixels: shapes found by their (distinct, exact) colours."""
    sampled = sample.sampled()
    cell = sample.size // grid
    names = list(COLOURS)
    expected = {name: np.full((len(sampled), grid * grid), BACKGROUND) for name in ("kind", "colour", "motion")}
    shown_in = {c: [f for f in sample.frames if colour_pixels(f, c).any()] for c in COLOURS}
    moves = {c: direction_from_pixels(np.stack(frames), c) for c, frames in shown_in.items() if frames}
    seen = set()
    for row, frame in enumerate(sampled):
        present = sorted(colours_in(frame))
        if not present:  # a flash clip between flashes
            continue
        shares = np.stack([colour_pixels(frame, c).reshape(grid, cell, grid, cell).sum(axis=(1, 3)).reshape(-1)
                           / colour_pixels(frame, c).sum() for c in present])
        for index in np.flatnonzero(shares.max(axis=0) >= MIN_SHAPE_SHARE):
            colour = present[shares[:, index].argmax()]
            expected["kind"][row, index] = 1 + SHAPES.index(kind_from_pixels(colour_pixels(frame, colour)))
            expected["colour"][row, index] = 1 + names.index(colour)
            expected["motion"][row, index] = 1 + DIRECTIONS.index(moves[colour]) if colour in seen else UNKNOWN
        seen.update(present)
    expected["motion"][0] = UNKNOWN
    return expected


@pytest.mark.parametrize("grid", [GRID, 2 * GRID])
@pytest.mark.parametrize("family", FAMILIES)
def test_cell_targets_follow_from_the_pixels(family, grid):
    shown = 0
    for seed in range(12):
        sample = make_sample(family, (31, seed))
        targets = cell_targets(sample, grid)
        expected = targets_from_pixels(sample, grid)
        for name in expected:
            assert np.array_equal(getattr(targets, name), expected[name]), (name, sample.facts())
        shown += (targets.kind != BACKGROUND).sum()
    assert shown > 12  # shapes do show in the targets


def test_a_shape_straddling_cells_shows_in_each_cell_holding_enough_of_it():
    sample = next(s for seed in range(200) if len((s := make_sample("count", (32, seed), size=64)).shapes) == 1)
    targets = cell_targets(sample, GRID)
    counts = (targets.kind != BACKGROUND).sum(axis=1)
    assert counts.min() >= 1 and counts.max() <= 4
    assert set(targets.colour[targets.colour != BACKGROUND]) == {1 + list(COLOURS).index(sample.shapes[0].colour)}


def test_a_grid_that_does_not_divide_the_frame_is_named():
    with pytest.raises(ValueError, match="grid 3 does not divide the frame size 64"):
        cell_targets(make_sample("count", 1, size=64), 3)


def test_video_tokens_come_in_the_order_of_the_pooled_frames(loaded_tiny):
    """scripts/train_toy.py pairs the LM's hidden states at the video tokens (``video_token_mask``, row by row) with
    the targets of the pooled frames (sample by sample, frame by frame, cell by cell): the spliced tokens must be
    exactly the pooled projector outputs in that order, also when the videos have different frame counts."""
    _, model, _, _ = loaded_tiny
    size = model.get_vision_tower().image_size
    videos = [random_video(3, size, seed=1), random_video(5, size, seed=2)]
    ids = torch.tensor([[1, IMAGE_TOKEN_INDEX, 2, 3, 0], [1, 2, IMAGE_TOKEN_INDEX, 3, 4]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    projected = []
    hook = model.get_model().mm_projector.register_forward_hook(lambda module, args, output: projected.append(output))
    try:
        with torch.no_grad():
            mm = model.build_multimodal_inputs(ids, mask, None, videos, ["video", "video"])
    finally:
        hook.remove()
    pooled = model.get_2dPool(projected[0])
    assert torch.equal(mm.inputs_embeds[mm.video_token_mask], pooled.reshape(-1, pooled.shape[-1]))


def named_colour_from_pixels(sample) -> str:
    """The colour of the shape the question names ("... the {shape} ..."), found in the first frame's pixels: the
    colour whose shape has that kind (colour and direction clips hold distinct kinds, all visible throughout)."""
    kind = re.search(r"the (\w+)", sample.question).group(1)
    frame = sample.frames[0]
    (colour,) = [c for c in colours_in(frame) if kind_from_pixels(colour_pixels(frame, c)) == kind]
    return colour


@pytest.mark.parametrize("family", ["colour", "direction"])
def test_subject_cells_are_the_cells_showing_the_shape_the_question_names(family):
    for seed in range(12):
        sample = make_sample(family, (33, seed))
        colour = 1 + list(COLOURS).index(named_colour_from_pixels(sample))
        expected = targets_from_pixels(sample, GRID)["colour"] == colour
        assert np.array_equal(subject_cells(sample, GRID), expected), sample.facts()
        assert expected[0].any()


def test_subject_cells_of_a_question_naming_no_shape_is_an_error():
    with pytest.raises(ValueError, match="a 'count' question names no shape"):
        subject_cells(make_sample("count", 1), GRID)
