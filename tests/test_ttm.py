"""DyCoke temporal token merging (llava.compression.ttm)."""

import math

import pytest
import torch

from llava.compression import TemporalTokenMerging, TokenSelection
from tests.references import reference_ttm

# Expected (pruned frame -> reference frame) by frame count, read off DESIGN.md section 4:
# stage 1 prunes every odd frame against the one before it; stage 2 prunes frame i + 2
# against frame i for i in range(0, F - 4, 4). An unpaired last frame stays whole.
EXPECTED_PRUNED = {
    1: {},
    2: {1: 0},
    3: {1: 0},
    5: {1: 0, 3: 2, 2: 0},
    6: {1: 0, 3: 2, 5: 4, 2: 0},
    7: {1: 0, 3: 2, 5: 4, 2: 0},
    8: {1: 0, 3: 2, 5: 4, 7: 6, 2: 0},
    9: {1: 0, 3: 2, 5: 4, 7: 6, 2: 0, 6: 4},
}


def moving_patch_video(num_frames: int, n_tok: int) -> tuple[torch.Tensor, list[int]]:
    """Identical frames except one patch that moves (frame f: position f) and turns further
    away from the background as f grows. Tokens are 2-D unit vectors at random angles with
    random lengths, so the cosine between frames is exactly known.

    Returns the (F, N, 2) features and the patch position of each frame.
    """
    gen = torch.Generator().manual_seed(num_frames)
    angle = torch.rand(n_tok, generator=gen) * 2 * math.pi
    length = 0.5 + torch.rand(num_frames, n_tok, generator=gen)
    angles = angle.expand(num_frames, n_tok).clone()
    positions = list(range(num_frames))
    assert num_frames <= n_tok
    for f, p in enumerate(positions):
        # Rotation theta_f grows with f, so cos(theta_f) falls: later patches are less similar.
        angles[f, p] += math.pi * (f + 1) / (num_frames + 2)
    feats = torch.stack([angles.cos(), angles.sin()], dim=-1) * length[..., None]
    return feats, positions


@pytest.mark.parametrize("num_frames", sorted(EXPECTED_PRUNED))
def test_moving_patch_exact_survivors(num_frames):
    n_tok = 16
    k = 0.875  # n = int(0.125 * 16) = 2: exactly the two positions where the frames differ
    feats, pos = moving_patch_video(num_frames, n_tok)
    sel = TemporalTokenMerging(k).select(feats)

    expected_index, expected_counts = [], []
    for f in range(num_frames):
        ref = EXPECTED_PRUNED[num_frames].get(f)
        if ref is None:
            local = list(range(n_tok))
        else:
            # The pruned frame's own patch (larger rotation) is least similar: it comes first.
            local = [pos[f], pos[ref]]
        expected_index += [f * n_tok + t for t in local]
        expected_counts.append(len(local))
    assert sel.index.tolist() == expected_index
    assert sel.per_frame.tolist() == expected_counts
    assert int(sel.per_frame.sum()) == sel.index.numel()


@pytest.mark.parametrize("num_frames", sorted(EXPECTED_PRUNED))
def test_frame_counts_and_pruned_frames(num_frames):
    n_tok, k = 10, 0.7
    n = int((1 - k) * n_tok)
    feats = torch.randn(num_frames, n_tok, 6, generator=torch.Generator().manual_seed(1))
    sel = TemporalTokenMerging(k).select(feats)
    pruned = set(EXPECTED_PRUNED[num_frames])
    assert sel.per_frame.tolist() == [n if f in pruned else n_tok for f in range(num_frames)]
    assert sel.index.numel() == n * len(pruned) + n_tok * (num_frames - len(pruned))
    frames = (sel.index // n_tok).tolist()
    assert frames == sorted(frames), "frames must stay in time order"
    if num_frames % 2 == 1:  # the unpaired last frame is kept whole, not dropped
        assert sel.index[-n_tok:].tolist() == list(range((num_frames - 1) * n_tok, num_frames * n_tok))


@pytest.mark.parametrize("num_frames", [1, 4, 9])
def test_k_zero_keeps_everything_in_order(num_frames):
    feats = torch.randn(num_frames, 7, 5)
    sel = TemporalTokenMerging(0).select(feats)
    assert sel.index.tolist() == list(range(num_frames * 7))
    assert sel.per_frame.tolist() == [7] * num_frames


@pytest.mark.parametrize("num_frames", [1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 16])
@pytest.mark.parametrize("k", [0.0, 0.3, 0.7, 0.95])
def test_matches_loop_reference(num_frames, k):
    feats = torch.randn(num_frames, 25, 12, generator=torch.Generator().manual_seed(num_frames))
    sel = TemporalTokenMerging(k).select(feats)
    index, per_frame = reference_ttm(feats, k)
    assert sel.index.tolist() == index
    assert sel.per_frame.tolist() == per_frame
    assert sel.index.dtype == torch.long and sel.per_frame.dtype == torch.long


def test_half_precision_input_is_scored_in_float32():
    feats = torch.randn(8, 20, 16, generator=torch.Generator().manual_seed(3)).bfloat16()
    sel = TemporalTokenMerging(0.6).select(feats)
    index, _ = reference_ttm(feats.float(), 0.6)
    assert sel.index.tolist() == index


def test_returns_token_selection_and_describe():
    ttm = TemporalTokenMerging(0.7)
    assert isinstance(ttm.select(torch.randn(4, 9, 3)), TokenSelection)
    assert ttm.describe() == {"name": "dycoke_ttm", "k": 0.7}


@pytest.mark.parametrize(
    "k, why",
    [(-0.1, r"out of range; allowed: \[0, 1\)"), (1.0, r"allowed: \[0, 1\)"), (1.5, r"allowed: \[0, 1\)"),
     (float("nan"), "finite"), ("0.5", "not a string"), (True, "not a number"), (None, "not a number")],
)
def test_invalid_k(k, why):
    with pytest.raises(ValueError, match=rf"dycoke_k=.*{why}"):
        TemporalTokenMerging(k)


@pytest.mark.parametrize("bad", [torch.randn(4, 9), torch.randn(0, 9, 3), torch.ones(2, 3, 4, dtype=torch.long)])
def test_invalid_features(bad):
    with pytest.raises(ValueError, match="features"):
        TemporalTokenMerging(0.5).select(bad)
