"""EVS token selection (llava.compression.evs) against a loop transcription of vLLM's EVS."""

import math

import pytest
import torch

from llava.compression.base import TokenSelection
from llava.compression.evs import EVS


def reference_evs(features: torch.Tensor, rate: float) -> tuple[list[int], list[int]]:
    """(index, per_frame) by plain loops, from vLLM's ``compute_retention_mask`` and
    ``compute_retained_tokens_count`` (vllm-project/vllm, vllm/multimodal/evs.py): the dissimilarity of a token is
    1 - cos with the same cell of the previous frame, 255 for the first frame; all tokens are sorted by it,
    descending and stable; the first max(N, int(F * N * (1 - q))) are kept, in original order. Float64."""
    num_frames, tokens_per_frame, _ = features.shape
    x = features.double().tolist()
    scored = []
    for f in range(num_frames):
        for n in range(tokens_per_frame):
            if f == 0:
                dissimilarity = 255.0
            else:
                a, b = x[f][n], x[f - 1][n]
                dot = sum(p * q for p, q in zip(a, b))
                norms = math.sqrt(sum(p * p for p in a)) * math.sqrt(sum(q * q for q in b))
                dissimilarity = 1.0 - dot / max(norms, 1e-8)
            scored.append((dissimilarity, f * tokens_per_frame + n))
    keep = max(tokens_per_frame, int(num_frames * tokens_per_frame * (1 - rate)))
    chosen = sorted(scored, key=lambda s: (-s[0], s[1]))[:keep]  # stable descending: the earlier token first
    index = sorted(position for _, position in chosen)
    per_frame = [sum(1 for i in index if i // tokens_per_frame == f) for f in range(num_frames)]
    return index, per_frame


GRIDS = [(4, 4), (3, 4), (2, 5)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grid_hw", GRIDS)
@pytest.mark.parametrize("num_frames", [1, 2, 5, 8])
@pytest.mark.parametrize("rate", [0.0, 0.3, 0.7, 0.9])
def test_matches_loop_reference(rate, num_frames, grid_hw, dtype):
    n_tok = grid_hw[0] * grid_hw[1]
    gen = torch.Generator().manual_seed(num_frames * 100 + n_tok)
    # Correlated frames, as in a video: each frame drifts from the previous one.
    feats = torch.randn(1, n_tok, 12, generator=gen) + 0.6 * torch.randn(num_frames, n_tok, 12, generator=gen).cumsum(0)
    feats = feats.to(dtype)
    sel = EVS(rate).select(feats)
    index, per_frame = reference_evs(feats, rate)
    assert isinstance(sel, TokenSelection) and sel.index.dtype == torch.long and sel.values is None
    assert sel.index.tolist() == index
    assert sel.per_frame.tolist() == per_frame


def moving_square(path, grid_hw=(4, 4), dim=8):
    """A static background (one random vector per cell, the same in every frame) and a square that covers
    cell ``path[f]`` in frame f."""
    gen = torch.Generator().manual_seed(3)
    h, w = grid_hw
    background = torch.randn(h * w, dim, generator=gen).abs() + 0.5  # all positive
    feats = background.expand(len(path), -1, -1).clone()
    for f, cell in enumerate(path):
        feats[f, cell] = -background[cell]  # cosine -1 against the background: dissimilarity 2
    return feats


@pytest.mark.parametrize("grid_hw, path", [((4, 4), [5, 6, 10, 9, 13]), ((3, 5), [0, 1, 2, 7, 12])])
def test_known_answer_moving_square(grid_hw, path):
    """Frame 0 whole, then in each frame the cell the square leaves and the cell it enters: with a budget of
    exactly those tokens (N + 2 (F - 1) = 0.3 * F * N here), nothing else."""
    n_tok = grid_hw[0] * grid_hw[1]
    feats = moving_square(path, grid_hw)
    num_frames = len(path)
    expected = list(range(n_tok))
    for f in range(1, num_frames):
        expected += sorted(f * n_tok + cell for cell in {path[f - 1], path[f]})
    rate = 1 - len(expected) / (num_frames * n_tok)
    assert int(num_frames * n_tok * (1 - rate)) == len(expected)
    sel = EVS(rate).select(feats)
    assert sel.index.tolist() == expected
    assert sel.per_frame.tolist() == [n_tok] + [2] * (num_frames - 1)


def test_known_answer_square_standing_still_is_dropped():
    """The square stops at cell 6 from frame 2 on: frames 3 and 4 repeat frame 2 and keep nothing."""
    feats = moving_square([5, 6, 6, 6, 6])
    sel = EVS(1 - 18 / 80).select(feats)  # 16 + 2 tokens
    assert sel.index.tolist() == list(range(16)) + [16 + 5, 16 + 6]
    assert sel.per_frame.tolist() == [16, 2, 0, 0, 0]


def test_ties_keep_the_earlier_token():
    """Every token after frame 0 is orthogonal to its predecessor (dissimilarity exactly 1): the stable sort
    keeps the earliest ones."""
    num_frames, n_tok, dim = 4, 9, 16
    eye = torch.eye(dim)
    feats = torch.stack([torch.stack([eye[(f + n) % dim] for n in range(n_tok)]) for f in range(num_frames)])
    sel = EVS(0.5).select(feats)
    assert sel.index.tolist() == list(range(18))
    assert sel.per_frame.tolist() == [9, 9, 0, 0]


def test_first_frame_always_whole():
    feats = torch.randn(6, 16, 8, generator=torch.Generator().manual_seed(1))
    sel = EVS(0.99).select(feats)  # int(96 * 0.01) = 0 < N: one frame's worth, all from frame 0
    assert sel.index.tolist() == list(range(16))
    assert sel.per_frame.tolist() == [16, 0, 0, 0, 0, 0]


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.25, 0.5, 0.7, 0.75, 0.9, 0.95])
@pytest.mark.parametrize("num_frames, n_tok", [(1, 16), (5, 12), (8, 49), (32, 196)])
def test_kept_count_is_vllm_budget(rate, num_frames, n_tok):
    feats = torch.randn(num_frames, n_tok, 4, generator=torch.Generator().manual_seed(num_frames))
    sel = EVS(rate).select(feats)
    assert sel.num_kept == max(n_tok, int(num_frames * n_tok * (1 - rate)))
    assert int(sel.per_frame.sum()) == sel.num_kept
    frames = (sel.index // n_tok).tolist()
    assert frames == sorted(frames), "frames in time order"
    assert (sel.index[1:] > sel.index[:-1]).all(), "original order inside each frame"


@pytest.mark.parametrize("num_frames", [1, 3])
def test_rate_zero_keeps_everything_in_order(num_frames):
    feats = torch.randn(num_frames, 10, 6, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    sel = EVS(0).select(feats)
    assert sel.index.tolist() == list(range(num_frames * 10))
    assert sel.per_frame.tolist() == [10] * num_frames


def test_default_and_describe():
    assert EVS().rate == 0.7
    assert EVS(0.5).describe() == {"name": "evs", "rate": 0.5}
    assert repr(EVS(0.25)) == "EVS(rate=0.25)"


@pytest.mark.parametrize(
    "rate, why",
    [(1, r"out of range; allowed: \[0, 1\)"), (1.2, r"out of range; allowed: \[0, 1\)"),
     (-0.1, r"out of range; allowed: \[0, 1\)"), (math.inf, "finite"), (float("nan"), "finite"),
     ("0.5", "not a string"), (True, "not a number"), (None, "not a number")],
)
def test_invalid_rate(rate, why):
    with pytest.raises(ValueError, match=rf"^evs_rate=.*{why}"):
        EVS(rate)


def test_invalid_inputs():
    with pytest.raises(ValueError, match="features"):
        EVS(0.5).select(torch.randn(10, 4))
    with pytest.raises(ValueError, match="features must have at least one frame"):
        EVS(0.5).select(torch.randn(0, 12, 4))


def test_the_llava_model_keeps_the_references_tokens_of_the_pooled_features_it_sees(loaded_tiny):
    """Inside the model: EVS runs on the pooled features that enter the LM, and the trace records its choice."""
    from tests.conftest import random_video
    from tests.test_conformance import prompt_ids

    tokenizer, model, _, _ = loaded_tiny
    video = random_video(8, model.get_vision_tower().image_size, seed=50)
    try:
        model.configure_compression(compressor="evs", evs_rate=0.6)  # not the default: it must reach EVS
        with model.compression_trace() as trace:
            model.generate(prompt_ids(tokenizer, "What is moving?"), images=[video], modalities=["video"],
                           max_new_tokens=2, do_sample=False)
    finally:
        model.reset_compression()
    index, per_frame = reference_evs(trace.pooled, 0.6)
    assert trace.selection.index.tolist() == index and trace.selection.per_frame.tolist() == per_frame
    assert model.last_compression_stats["video_tokens_after"] == len(index) < trace.pooled.shape[0] * trace.pooled.shape[1]
