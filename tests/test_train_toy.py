"""scripts/train_toy.py's pieces that the end-to-end run (tests/test_toy_model.py) cannot check: the binding loss
reads the right attention row and tokens, the token dropping keeps what the answers rest on, and the dropped
tokens are exactly the ones the training targets are taken from."""

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from llava.constants import IMAGE_TOKEN_INDEX
from llava.toy.supervision import BACKGROUND, cell_targets, subject_cells
from llava.toy.videoqa import make_sample
from tests.conftest import load_script, random_video

GRID = 4  # the toy model's pooled tokens per frame side


@pytest.fixture(scope="module")
def script():
    return load_script("train_toy")


def hand_made_batch(shown: np.ndarray, before: int = 3, after: int = 6):
    """A two-row batch's labels and video-token mask: ``before`` text tokens, len(shown) video tokens, ``after``
    text tokens of which the last 3 are labels; and the position predicting the first label."""
    video = shown.size
    length = before + video + after
    answer_at = before + video + after - 4
    mm = SimpleNamespace(labels=torch.full((2, length), -100), video_token_mask=torch.zeros((2, length), dtype=bool))
    mm.labels[:, answer_at + 1:] = 7
    mm.video_token_mask[:, before:before + video] = True
    return mm, answer_at, before + np.flatnonzero(shown), length


def test_binding_loss_is_minus_log_the_answer_positions_attention_mass_on_the_subject(script):
    """On hand-made attention: the row that predicts the first answer token (one before the first label), the video
    tokens in ``video_token_mask`` order, the samples naming no shape skipped."""
    named, unnamed = make_sample("colour", (34, 0)), make_sample("count", (34, 1))
    shown = subject_cells(named, GRID).reshape(-1)
    all_kept = [np.arange(shown.size)] * 2
    mm, answer_at, subject_positions, length = hand_made_batch(shown)

    on_subject = torch.zeros((2, length, length))
    on_subject[0, answer_at, subject_positions] = 1 / len(subject_positions)
    on_subject[1, answer_at, 0] = 1.0  # the count sample's row: ignored
    assert script.binding_loss([named, unnamed], on_subject, mm, GRID, all_kept).item() == pytest.approx(0, abs=1e-6)

    uniform = torch.full((2, length, length), 1 / length)
    expected = -np.log(len(subject_positions) / length)
    loss = script.binding_loss([named, unnamed], uniform, mm, GRID, all_kept).item()
    assert loss == pytest.approx(expected, rel=1e-5)

    elsewhere = torch.zeros((2, length, length))
    elsewhere[0, answer_at - 1, subject_positions] = 1.0  # the right tokens one row too early: not read
    elsewhere[0, answer_at, 0] = 1.0
    assert script.binding_loss([named], elsewhere, mm, GRID, all_kept).item() == pytest.approx(-np.log(1e-6))
    assert script.binding_loss([unnamed], uniform[1:], mm, GRID, all_kept).item() == 0.0


def test_binding_loss_follows_the_tokens_that_reached_the_lm(script):
    """With tokens dropped, the video positions stand for the kept cells only: the subject's kept tokens."""
    named = make_sample("direction", (35, 0))
    shown = subject_cells(named, GRID).reshape(-1)
    kept = np.flatnonzero(np.arange(shown.size) % 3 != 1)  # a third of the tokens dropped
    assert shown[kept].any() and not shown[kept].all()
    mm, answer_at, subject_positions, length = hand_made_batch(shown[kept])
    attention = torch.zeros((2, length, length))
    attention[0, answer_at, subject_positions] = 0.5
    assert script.binding_loss([named], attention, mm, GRID, [kept]).item() == pytest.approx(-np.log(0.5 * len(
        subject_positions)), rel=1e-5)


@pytest.mark.parametrize("family", ["flash", "order", "direction"])
def test_token_drop_plan_keeps_frame_0_and_every_shapes_first_sight(script, family):
    schedule = replace(script.SCHEDULES["full"], drop_share=1.0, max_drop_rate=0.99)
    rng = np.random.default_rng(0)
    dropped = 0
    for seed in range(8):
        sample = make_sample(family, (36, seed))
        plan = script.token_drop_plan(sample, GRID, rng, schedule).reshape(len(sample.sampled_indices()), -1)
        colours = cell_targets(sample, GRID).colour
        assert plan[0].all()
        for colour in set(colours[colours != BACKGROUND].tolist()):  # each shape, by its (distinct) colour
            first = np.flatnonzero((colours == colour).any(axis=1))[0]
            assert plan[first][colours[first] == colour].all(), (colour, first, sample.facts())
        dropped += (~plan).sum()
    assert dropped > 0
    never = replace(schedule, drop_share=0.0)
    assert script.token_drop_plan(make_sample(family, (36, 0)), GRID, rng, never) is None


def test_dropped_tokens_are_the_ones_the_targets_skip(script, loaded_tiny):
    """Through the model's own splicing (``spliced_inputs``): the video tokens the LM gets are the pooled tokens the
    plans keep, sample by sample in frame order (a None plan keeps all), and ``kept_tokens`` names them."""
    _, model, _, _ = loaded_tiny
    size = model.get_vision_tower().image_size
    videos = [random_video(3, size, seed=1), random_video(4, size, seed=2), random_video(2, size, seed=3)]
    cells = script.pooled_grid(model) ** 2
    rng = np.random.default_rng(1)
    plans = [rng.random(3 * cells) > 0.5, None, rng.random(2 * cells) > 0.3]
    ids = torch.tensor([[1, IMAGE_TOKEN_INDEX, 2], [1, IMAGE_TOKEN_INDEX, 2], [1, IMAGE_TOKEN_INDEX, 2]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": None, "images": videos,
             "modalities": ["video"] * 3}
    projected = []
    hook = model.get_model().mm_projector.register_forward_hook(lambda module, args, output: projected.append(output))
    try:
        with torch.no_grad():
            mm = script.spliced_inputs(model, batch, plans)
    finally:
        hook.remove()
    pooled = model.get_2dPool(projected[0]).split([3, 4, 2])
    kept = script.kept_tokens(mm)
    assert [list(k) for k in kept] == [list(np.flatnonzero(plans[0])), list(range(4 * cells)),
                                       list(np.flatnonzero(plans[2]))]
    expected = torch.cat([video.reshape(-1, video.shape[-1])[index] for video, index in zip(pooled, kept)])
    assert torch.equal(mm.inputs_embeds[mm.video_token_mask], expected)
    assert "video_compressor" not in model.__dict__  # the model is left as it was
