"""Synthetic video question answering: short clips of coloured shapes, and questions whose answers follow from
what is drawn. Deterministic: the same seed gives the same clip, question and answer.

A clip has 8-32 frames of 64-128 px (square, a multiple of 16), 1-3 shapes (square, circle, triangle; side 10-25% of
the frame) in distinct colours (red, green, blue, yellow, white, magenta) on a black or static noisy background. Each
shape moves in a straight line (left, right, up, down; 40-75% of the frame over the clip) or stays still. Shapes
never touch: in every frame where two are visible, their boxes are at least ``GAP`` pixels apart.

The five question families and their rules (the answer is always exactly one of the given forms):

* ``colour``  "What colour is the {shape}?" -> "{colour}."; the shapes are of distinct kinds, all visible throughout.
* ``direction`` "Which direction does the {shape} move?" -> "left." / "right." / "up." / "down." / "none.";
  distinct kinds, all visible throughout.
* ``count``   "How many shapes are there?" -> "one." / "two." / "three."; no brief events: every shape is visible
  in every frame (kinds may repeat; colours are distinct).
* ``flash``   "Which colour flashes?" -> "{colour}."; 0-2 shapes visible throughout plus one still shape visible
  in only 1-3 consecutive clip frames, with a colour no other shape has.
* ``order``   "List the colours in order of appearance." -> "{colour}, {colour}, {colour}."; three shapes that
  appear one after another and then stay to the end.

The model sees ``sampled_frames`` frames picked as lmms-eval picks them (:func:`llava.video.uniform_indices`), so
the brief events are placed on frames that sampling keeps: a flash covers at least one sampled frame, and the
shapes of an ``order`` clip first show in different sampled frames, at least two sampled frames apart (the first
may be there from frame 0). Give the frame count your model samples as ``sampled_frames`` (default ``SAMPLED_FRAMES``, 8:
the toy model's).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llava.toy.drawing import BACKGROUNDS, COLOURS, SHAPES, background, paint, shape_mask
from llava.video import uniform_indices

FAMILIES = ("colour", "direction", "count", "flash", "order")
QUESTIONS = {
    "colour": "What colour is the {shape}?",
    "direction": "Which direction does the {shape} move?",
    "count": "How many shapes are there?",
    "flash": "Which colour flashes?",
    "order": "List the colours in order of appearance.",
}
DIRECTIONS = ("left", "right", "up", "down", "none")
COUNT_WORDS = ("one", "two", "three")

CLIP_FRAMES = (8, 32)  # shortest and longest clip
FRAME_SIZES = (64, 80, 96, 112, 128)  # multiples of 16: every one encodes to an mp4 that decord reads back
SAMPLED_FRAMES = 8  # frames the toy model samples from a clip (lmms-eval's max_frames_num)
SIDE_SHARE = (0.10, 0.25)  # a shape's side, as a share of the frame size
TRAVEL_SHARE = (0.4, 0.75)  # how far a moving shape travels over the clip, as a share of the frame size (at most
# the room the shape has): two to three video tokens of the toy model, so that motion is visible in the pooled tokens
FLASH_FRAMES = (1, 3)  # a flash lasts this many consecutive clip frames
ORDER_SLOT_GAP = 2  # the order family's shapes first show at least this many sampled frames apart
GAP = 2  # pixels between two visible shapes' boxes, at least
HELD_OUT_SEED = 1_000_003  # the held-out (evaluation) set's seed: make_dataset(HELD_OUT_SEED, ...)
TRAINING_STREAM = 1000  # seed-key tag of sample_stream; dataset keys use the family's index (0-4) instead
_PLACEMENT_ATTEMPTS = 1000

Seed = int | Sequence[int]


@dataclass(frozen=True)
class ShapeTrack:
    """One drawn shape and where it is in every clip frame."""

    kind: str  # square, circle, triangle
    colour: str
    side: int  # pixels
    direction: str  # left, right, up, down, none
    positions: tuple[tuple[int, int], ...]  # (x, y) of the top-left corner in every clip frame
    first_frame: int  # visible in clip frames first_frame..last_frame (inclusive)
    last_frame: int
    role: str  # "throughout", "flash" or "appears" (the order family's: from first_frame to the end)

    def visible(self, frame: int) -> bool:
        return self.first_frame <= frame <= self.last_frame

    def centre(self, frame: int) -> tuple[float, float]:
        x, y = self.positions[frame]
        return x + (self.side - 1) / 2, y + (self.side - 1) / 2

    def facts(self) -> dict:
        return {"kind": self.kind, "colour": self.colour, "side": self.side, "direction": self.direction,
                "first_frame": self.first_frame, "last_frame": self.last_frame, "role": self.role,
                "positions": [list(p) for p in self.positions]}


@dataclass(frozen=True, eq=False)
class Sample:
    """A clip, its question and answer, and the facts the answer follows from."""

    family: str
    question: str
    answer: str
    frames: np.ndarray  # (T, H, W, 3) uint8, every clip frame
    shapes: tuple[ShapeTrack, ...]
    background: str
    sampled_frames: int  # the frame count the brief events were placed for
    subject: int | None  # index in ``shapes`` of the shape the question names (colour, direction), else None
    key: tuple[int, ...]  # the seed the sample was drawn from

    @property
    def num_frames(self) -> int:
        return self.frames.shape[0]

    @property
    def size(self) -> int:
        return self.frames.shape[1]

    def sampled_indices(self, num_frames: int | None = None) -> np.ndarray:
        """The clip frames a model sees, sampled as lmms-eval samples them (default: ``sampled_frames``)."""
        return uniform_indices(self.num_frames, num_frames or self.sampled_frames)

    def sampled(self, num_frames: int | None = None) -> np.ndarray:
        """The frames a model sees: (num_frames, H, W, 3) uint8."""
        return self.frames[self.sampled_indices(num_frames)]

    def facts(self) -> dict:
        """Everything but the pixels, JSON-serialisable."""
        return {"family": self.family, "question": self.question, "answer": self.answer,
                "num_frames": self.num_frames, "size": self.size, "background": self.background,
                "sampled_frames": self.sampled_frames, "subject": self.subject, "key": list(self.key),
                "shapes": [shape.facts() for shape in self.shapes]}


# ---- making samples ----------------------------------------------------------------------------------------------


def make_sample(
    family: str,
    seed: Seed,
    *,
    clip_frames: int | None = None,
    size: int | None = None,
    sampled_frames: int = SAMPLED_FRAMES,
    background_kind: str | None = None,
) -> Sample:
    """One sample of ``family``, drawn from ``seed`` (an int or a sequence of ints).

    ``clip_frames`` (8-32), ``size`` (64-128, even) and ``background_kind`` (black, noise) are drawn from the seed
    when not given. ``sampled_frames``: how many frames the model samples from the clip (see the module's notes).
    """
    if family not in FAMILIES:
        raise ValueError(f"Unknown family {family!r}; allowed: {', '.join(FAMILIES)}.")
    if sampled_frames < 1:
        raise ValueError(f"sampled_frames must be >= 1, got {sampled_frames}.")
    key = (seed,) if isinstance(seed, int) else tuple(int(s) for s in seed)
    rng = np.random.default_rng(list(key))
    clip_frames = int(rng.integers(CLIP_FRAMES[0], CLIP_FRAMES[1] + 1)) if clip_frames is None else clip_frames
    size = int(rng.choice(FRAME_SIZES)) if size is None else size
    background_kind = str(rng.choice(BACKGROUNDS)) if background_kind is None else background_kind
    if not CLIP_FRAMES[0] <= clip_frames <= CLIP_FRAMES[1]:
        raise ValueError(f"clip_frames must be in [{CLIP_FRAMES[0]}, {CLIP_FRAMES[1]}], got {clip_frames}.")
    if not 64 <= size <= 128 or size % 2:
        raise ValueError(f"size must be even and in [64, 128], got {size}.")

    plans = _PLANNERS[family](rng, clip_frames, sampled_frames)
    shapes = _place(rng, plans, clip_frames, size)
    frames = render(shapes, np.broadcast_to(background(background_kind, size, rng), (clip_frames, size, size, 3)))
    subject = int(rng.integers(len(shapes))) if family in ("colour", "direction") else None
    question, answer = question_and_answer(family, shapes, subject)
    return Sample(family, question, answer, frames, shapes, background_kind, sampled_frames, subject, key)


def make_dataset(seed: int, per_family: int, families: Sequence[str] = FAMILIES, **options) -> list[Sample]:
    """``per_family`` samples of each family in ``families``, family by family.

    Sample ``i`` of a family is drawn from the key ``(seed, index of the family in FAMILIES, i)``: it does not depend
    on ``per_family`` or on which other families are asked for. ``options`` go to :func:`make_sample`.
    """
    return [make_sample(family, (seed, FAMILIES.index(family), i), **options)
            for family in families for i in range(per_family)]


def sample_stream(
    seed: int, families: Sequence[str] = FAMILIES, start: int = 0, frame_counts: Sequence[int] = (SAMPLED_FRAMES,),
    **options,
) -> Iterator[Sample]:
    """An endless stream of samples for training, the families in turn: sample ``i`` is drawn from the key
    ``(seed, TRAINING_STREAM, i)``, never a key of :func:`make_dataset`. Each sample is made for a frame count
    drawn from ``frame_counts`` (its ``sampled_frames``; the order family only from counts of at least
    ``2 * ORDER_SLOT_GAP + 1``). ``options`` go to :func:`make_sample`."""
    index = start
    while True:
        family = families[index % len(families)]
        key = (seed, TRAINING_STREAM, index)
        counts = [n for n in frame_counts if family != "order" or n >= 2 * ORDER_SLOT_GAP + 1] or [SAMPLED_FRAMES]
        frames = int(np.random.default_rng([*key, 1]).choice(counts))
        yield make_sample(family, key, sampled_frames=frames, **options)
        index += 1


def write_mp4(sample: Sample, path: str | os.PathLike, fps: int = 8) -> Path:
    """Write every clip frame of ``sample`` to an mp4 that :func:`llava.video.load_video` reads (lossy: colours
    move by a few levels and the chroma is halved at the edges, as in any mp4)."""
    from llava.video import write_mp4 as write_frames

    return write_frames(path, sample.frames, fps=fps)


# ---- questions and answers ---------------------------------------------------------------------------------------


def question_and_answer(family: str, shapes: Sequence[ShapeTrack], subject: int | None) -> tuple[str, str]:
    """The question and its answer, from the drawn shapes."""
    template = QUESTIONS[family]
    if family == "colour":
        return template.format(shape=shapes[subject].kind), f"{shapes[subject].colour}."
    if family == "direction":
        return template.format(shape=shapes[subject].kind), f"{shapes[subject].direction}."
    if family == "count":
        return template, f"{COUNT_WORDS[len(shapes) - 1]}."
    if family == "flash":
        (flash,) = [shape for shape in shapes if shape.role == "flash"]
        return template, f"{flash.colour}."
    in_order = sorted(shapes, key=lambda shape: shape.first_frame)
    return template, ", ".join(shape.colour for shape in in_order) + "."


def vocabulary() -> list[str]:
    """Every word of the questions and answers, each with and without a leading space (as BPE sees words)."""
    words = set()
    texts = [t.replace("{shape}", s) for t in QUESTIONS.values() for s in SHAPES]
    texts += list(COLOURS) + list(DIRECTIONS) + list(COUNT_WORDS)
    for text in texts:
        for word in text.replace("?", " ").replace(".", " ").replace(",", " ").split():
            words.update((word, " " + word))
    return sorted(words)


# ---- what each family draws --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """A shape before it is placed."""

    kind: str
    colour: str
    direction: str
    first_frame: int
    last_frame: int
    role: str


def _colours(rng: np.random.Generator, count: int) -> list[str]:
    return [str(c) for c in rng.choice(list(COLOURS), count, replace=False)]


def _directions(rng: np.random.Generator, count: int) -> list[str]:
    return [str(d) for d in rng.choice(DIRECTIONS, count)]


def _plan_throughout(rng, clip_frames: int, distinct_kinds: bool) -> list[_Plan]:
    """1-3 shapes visible throughout, in distinct colours (and, if asked, of distinct kinds)."""
    count = int(rng.integers(1, 4))
    kinds = [str(k) for k in rng.choice(SHAPES, count, replace=not distinct_kinds)]
    return [_Plan(k, c, d, 0, clip_frames - 1, "throughout")
            for k, c, d in zip(kinds, _colours(rng, count), _directions(rng, count))]


def _plan_named(rng, clip_frames, sampled_frames) -> list[_Plan]:
    """colour, direction: 1-3 shapes of distinct kinds (the question names one), visible throughout."""
    return _plan_throughout(rng, clip_frames, distinct_kinds=True)


def _plan_count(rng, clip_frames, sampled_frames) -> list[_Plan]:
    """count: 1-3 shapes (kinds may repeat), visible throughout, no brief events."""
    return _plan_throughout(rng, clip_frames, distinct_kinds=False)


def _plan_flash(rng, clip_frames, sampled_frames) -> list[_Plan]:
    """flash: 0-2 shapes visible throughout and one still shape visible in 1-3 consecutive frames, one of them
    sampled."""
    others = int(rng.integers(0, 3))
    colours = _colours(rng, others + 1)
    kinds = [str(k) for k in rng.choice(SHAPES, others + 1)]
    plans = [_Plan(k, c, d, 0, clip_frames - 1, "throughout")
             for k, c, d in zip(kinds, colours, _directions(rng, others))]
    length = int(rng.integers(FLASH_FRAMES[0], FLASH_FRAMES[1] + 1))
    seen = int(rng.choice(np.unique(uniform_indices(clip_frames, sampled_frames))))  # a sampled frame it covers
    first = int(rng.integers(max(0, seen - length + 1), min(seen, clip_frames - length) + 1))
    plans.append(_Plan(kinds[-1], colours[-1], "none", first, first + length - 1, "flash"))
    return plans


def _plan_order(rng, clip_frames, sampled_frames) -> list[_Plan]:
    """order: three shapes, each first visible in a different sampled frame (ORDER_SLOT_GAP apart), then to the end.

    A shape whose slot is sampled frame k appears at a clip frame after sampled frame k-1, up to sampled frame k.
    """
    kept = np.unique(uniform_indices(clip_frames, sampled_frames))
    if len(kept) < 2 * ORDER_SLOT_GAP + 1:
        raise ValueError(f"the order family needs at least {2 * ORDER_SLOT_GAP + 1} distinct sampled frames; "
                         f"{sampled_frames} of a {clip_frames}-frame clip give {len(kept)}.")
    while True:
        slots = np.sort(rng.choice(len(kept), 3, replace=False))
        if np.all(np.diff(slots) >= ORDER_SLOT_GAP):
            break
    firsts = [0 if slot == 0 else int(rng.integers(kept[slot - 1] + 1, kept[slot] + 1)) for slot in slots]
    kinds = [str(k) for k in rng.choice(SHAPES, 3)]
    order = rng.permutation(3)  # which drawn shape gets which slot
    return [_Plan(kinds[i], c, d, firsts[order[i]], clip_frames - 1, "appears")
            for i, (c, d) in enumerate(zip(_colours(rng, 3), _directions(rng, 3)))]


_PLANNERS = {"colour": _plan_named, "direction": _plan_named, "count": _plan_count, "flash": _plan_flash,
             "order": _plan_order}


# ---- placing and drawing -----------------------------------------------------------------------------------------


def _trajectory(rng: np.random.Generator, side: int, direction: str, clip_frames: int, size: int) -> np.ndarray:
    """(clip_frames, 2) top-left corners of a shape moving in ``direction`` at a constant speed, inside the frame."""
    limit = size - side  # the largest top-left coordinate that keeps the shape inside
    if direction == "none":
        return np.broadcast_to(rng.integers(0, limit + 1, 2), (clip_frames, 2)).copy()
    travel = min(int(round(rng.uniform(*TRAVEL_SHARE) * size)), limit)
    sign = -1 if direction in ("left", "up") else 1
    start = int(rng.integers(0, limit - travel + 1)) + (travel if sign < 0 else 0)
    along = start + sign * np.round(travel * np.arange(clip_frames) / max(clip_frames - 1, 1)).astype(int)
    across = np.full(clip_frames, rng.integers(0, limit + 1))
    columns = (along, across) if direction in ("left", "right") else (across, along)
    return np.stack(columns, axis=1)


def _apart(a: np.ndarray, side_a: int, b: np.ndarray, side_b: int) -> np.ndarray:
    """Per frame: whether two boxes (top-left corners a, b) are at least GAP pixels apart along x or y."""
    x_apart = (a[:, 0] + side_a + GAP <= b[:, 0]) | (b[:, 0] + side_b + GAP <= a[:, 0])
    y_apart = (a[:, 1] + side_a + GAP <= b[:, 1]) | (b[:, 1] + side_b + GAP <= a[:, 1])
    return x_apart | y_apart


def _all_apart(plans: Sequence[_Plan], sides: list[int], paths: list[np.ndarray]) -> bool:
    for i in range(len(plans)):
        for j in range(i + 1, len(plans)):
            both = slice(max(plans[i].first_frame, plans[j].first_frame), min(plans[i].last_frame, plans[j].last_frame) + 1)
            if not _apart(paths[i][both], sides[i], paths[j][both], sides[j]).all():
                return False
    return True


def _place(rng: np.random.Generator, plans: Sequence[_Plan], clip_frames: int, size: int) -> tuple[ShapeTrack, ...]:
    """Sizes and trajectories for ``plans``, redrawn until no two shapes come closer than GAP while both visible."""
    for _ in range(_PLACEMENT_ATTEMPTS):
        sides = [max(3, int(round(rng.uniform(*SIDE_SHARE) * size))) for _ in plans]
        paths = [_trajectory(rng, side, plan.direction, clip_frames, size) for plan, side in zip(plans, sides)]
        if _all_apart(plans, sides, paths):
            return tuple(
                ShapeTrack(plan.kind, plan.colour, side, plan.direction, tuple(map(tuple, path.tolist())),
                           plan.first_frame, plan.last_frame, plan.role)
                for plan, side, path in zip(plans, sides, paths))
    raise RuntimeError(f"could not place {len(plans)} shapes apart in a {size}px frame")  # not seen in practice


def render(shapes: Sequence[ShapeTrack], backgrounds: np.ndarray) -> np.ndarray:
    """The clip: ``shapes`` painted over ``backgrounds`` (T, H, W, 3), each in the frames where it is visible."""
    frames = backgrounds.copy()
    for shape in shapes:
        mask = shape_mask(shape.kind, shape.side)
        for frame in range(shape.first_frame, shape.last_frame + 1):
            paint(frames[frame], mask, shape.positions[frame], shape.colour)
    return frames
