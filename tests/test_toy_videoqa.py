"""The synthetic video-QA generator (llava.toy.videoqa): deterministic by seed, within the specified ranges, and
every answer read back from the pixels (shapes are drawn in exact colours, so a colour's pixels are its shape's)."""

import numpy as np
import pytest

from llava.toy.drawing import COLOURS, NOISE_LEVELS, shape_mask
from llava.toy.videoqa import (
    CLIP_FRAMES,
    COUNT_WORDS,
    FAMILIES,
    QUESTIONS,
    SAMPLED_FRAMES,
    make_dataset,
    make_sample,
    sample_stream,
)
from llava.video import uniform_indices

SEEDS = range(40)


def colour_pixels(frame: np.ndarray, colour: str) -> np.ndarray:
    return np.all(frame == np.array(COLOURS[colour], dtype=np.uint8), axis=-1)


def colours_in(frame: np.ndarray) -> set[str]:
    return {colour for colour in COLOURS if colour_pixels(frame, colour).any()}


def centre_of(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(mask)
    return np.array([cols.mean(), rows.mean()])


def direction_from_pixels(frames: np.ndarray, colour: str) -> str:
    """The direction a colour's pixels move between the first and the last frame."""
    dx, dy = centre_of(colour_pixels(frames[-1], colour)) - centre_of(colour_pixels(frames[0], colour))
    if abs(dx) < 1 and abs(dy) < 1:
        return "none"
    if abs(dx) > abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def test_same_seed_same_sample_other_seed_other_sample():
    a, b, c = make_sample("order", (3, 1)), make_sample("order", (3, 1)), make_sample("order", (3, 2))
    assert np.array_equal(a.frames, b.frames) and a.facts() == b.facts()
    assert not (a.frames.shape == c.frames.shape and np.array_equal(a.frames, c.frames))


def test_dataset_samples_do_not_depend_on_the_dataset_size_or_families():
    small = make_dataset(5, 2)
    large = make_dataset(5, 4, families=("flash", "colour"))
    assert [s.family for s in small] == [f for f in FAMILIES for _ in range(2)]
    flash_small = [s for s in small if s.family == "flash"]
    flash_large = [s for s in large if s.family == "flash"][:2]
    assert all(np.array_equal(x.frames, y.frames) for x, y in zip(flash_small, flash_large))


def test_training_stream_never_repeats_a_held_out_key():
    stream = sample_stream(5)
    training_keys = {next(stream).key for _ in range(20)}
    held_out_keys = {s.key for s in make_dataset(5, 4)}
    assert not training_keys & held_out_keys


@pytest.mark.parametrize("family", FAMILIES)
def test_clips_are_within_the_specified_ranges(family):
    for seed in SEEDS:
        sample = make_sample(family, (1, seed))
        frames = sample.frames
        assert CLIP_FRAMES[0] <= sample.num_frames <= CLIP_FRAMES[1]
        assert frames.dtype == np.uint8 and frames.shape[1] == frames.shape[2] and 64 <= sample.size <= 128
        assert 1 <= len(sample.shapes) <= 3
        assert len({shape.colour for shape in sample.shapes}) == len(sample.shapes)  # colours are distinct
        for shape in sample.shapes:
            assert 0.10 * sample.size - 1 <= shape.side <= 0.25 * sample.size + 1
            assert shape.kind in ("square", "circle", "triangle")
        background = ~np.any([colour_pixels(frames, c) for c in COLOURS], axis=0)
        values = frames[background]
        if sample.background == "black":
            assert values.max() == 0
        else:
            assert values.max() < NOISE_LEVELS and values.std() > 5


@pytest.mark.parametrize("family", FAMILIES)
def test_question_and_answer_have_the_exact_forms(family):
    for seed in SEEDS:
        sample = make_sample(family, (2, seed))
        colours = "|".join(COLOURS)
        if family in ("colour", "direction"):
            assert sample.question == QUESTIONS[family].format(shape=sample.shapes[sample.subject].kind)
        else:
            assert sample.question == QUESTIONS[family]
        pattern = {
            "colour": rf"({colours})\.",
            "direction": r"(left|right|up|down|none)\.",
            "count": r"(one|two|three)\.",
            "flash": rf"({colours})\.",
            "order": rf"({colours}), ({colours}), ({colours})\.",
        }[family]
        import re

        assert re.fullmatch(pattern, sample.answer), sample.answer


def test_shapes_are_drawn_where_the_facts_say_and_never_touch():
    for family in FAMILIES:
        for seed in SEEDS:
            sample = make_sample(family, (3, seed))
            for index in range(sample.num_frames):
                frame = sample.frames[index]
                for shape in sample.shapes:
                    drawn = colour_pixels(frame, shape.colour)
                    if not shape.visible(index):
                        assert not drawn.any()
                        continue
                    expected = np.zeros(drawn.shape, dtype=bool)
                    x, y = shape.positions[index]
                    expected[y : y + shape.side, x : x + shape.side] = shape_mask(shape.kind, shape.side)
                    assert np.array_equal(drawn, expected)  # nothing painted over it: shapes never overlap


@pytest.mark.parametrize("family", ["colour", "direction"])
def test_named_shape_answers_follow_from_the_pixels(family):
    for seed in SEEDS:
        sample = make_sample(family, (4, seed))
        kinds = [shape.kind for shape in sample.shapes]
        assert len(set(kinds)) == len(kinds)  # "the {shape}" names exactly one
        subject = sample.shapes[sample.subject]
        if family == "colour":
            assert sample.answer == f"{subject.colour}."
            assert all(subject.colour in colours_in(frame) for frame in sample.frames)
        else:
            assert sample.answer == f"{direction_from_pixels(sample.frames, subject.colour)}."


def test_count_answer_is_the_number_of_colours_in_every_frame():
    for seed in SEEDS:
        sample = make_sample("count", (5, seed))
        counts = {len(colours_in(frame)) for frame in sample.frames}
        assert len(counts) == 1  # no brief events
        assert sample.answer == f"{COUNT_WORDS[counts.pop() - 1]}."


def test_flash_colour_shows_in_one_to_three_frames_including_a_sampled_one():
    for seed in SEEDS:
        sample = make_sample("flash", (6, seed))
        colour = sample.answer.rstrip(".")
        shown = [i for i, frame in enumerate(sample.frames) if colour in colours_in(frame)]
        assert 1 <= len(shown) <= 3 and shown == list(range(shown[0], shown[-1] + 1))
        assert set(shown) & set(uniform_indices(sample.num_frames, SAMPLED_FRAMES).tolist())
        others = [c for c in COLOURS if c != colour and any(c in colours_in(f) for f in sample.frames)]
        assert all(all(c in colours_in(f) for f in sample.frames) for c in others)  # the others stay throughout


def test_order_answer_is_the_order_of_first_appearance_in_the_sampled_frames():
    for seed in SEEDS:
        sample = make_sample("order", (7, seed))
        sampled = sample.sampled()
        first_seen = {}
        for index, frame in enumerate(sampled):
            for colour in colours_in(frame):
                first_seen.setdefault(colour, index)
        assert len(first_seen) == 3
        assert len(set(first_seen.values())) == 3  # each appears in its own sampled frame
        in_order = sorted(first_seen, key=first_seen.get)
        assert sample.answer == ", ".join(in_order) + "."
        assert all(colour in colours_in(sampled[-1]) for colour in first_seen)  # they stay to the end


def test_every_family_and_answer_occurs():
    samples = make_dataset(9, 60)
    for family in ("colour", "flash"):
        assert {s.answer for s in samples if s.family == family} == {f"{c}." for c in COLOURS}
    assert {s.answer for s in samples if s.family == "direction"} == {f"{d}." for d in
                                                                      ("left", "right", "up", "down", "none")}
    assert {s.answer for s in samples if s.family == "count"} == {f"{w}." for w in COUNT_WORDS}
    assert {s.background for s in samples} == {"black", "noise"}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"family": "size"}, "Unknown family 'size'"),
        ({"clip_frames": 7}, "clip_frames must be in [8, 32]"),
        ({"size": 130}, "size must be even and in [64, 128]"),
        ({"sampled_frames": 0}, "sampled_frames must be >= 1"),
        ({"family": "order", "sampled_frames": 3}, "the order family needs at least 5 distinct sampled frames"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    family = kwargs.pop("family", "colour")
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        make_sample(family, 0, **kwargs)
