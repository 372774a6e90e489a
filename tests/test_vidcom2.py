"""VidCom2 token selection (llava.compression.vidcom2)."""

import math

import pytest
import torch

from llava.compression import TokenSelection, VidCom2
from tests.references import reference_vidcom2


@pytest.mark.parametrize("num_frames", [1, 2, 5, 8, 16])
@pytest.mark.parametrize("r", [0.1, 0.25, 0.5, 1.0])
def test_matches_loop_reference(num_frames, r):
    feats = torch.randn(num_frames, 49, 16, generator=torch.Generator().manual_seed(num_frames)) * 3 + 1
    sel = VidCom2(r).select(feats)
    index, per_frame = reference_vidcom2(feats, r)
    assert sel.per_frame.tolist() == per_frame
    assert sel.index.tolist() == index
    assert isinstance(sel, TokenSelection) and sel.index.dtype == torch.long


def similar_frames_with_one_unique(num_frames=8, n_tok=36, dim=32, unique=5):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(n_tok, dim, generator=gen)
    feats = base + 0.05 * torch.randn(num_frames, n_tok, dim, generator=gen)
    feats[unique] = torch.randn(n_tok, dim, generator=gen)
    return feats


def test_unique_frame_gets_larger_budget():
    unique = 5
    feats = similar_frames_with_one_unique(unique=unique)
    budget = VidCom2(0.25).select(feats).per_frame
    others = torch.cat([budget[:unique], budget[unique + 1 :]])
    assert (budget[unique] > others).all(), budget.tolist()


@pytest.mark.parametrize("r", [0.1, 0.25, 0.4])
@pytest.mark.parametrize("num_frames", [4, 16])
def test_retention_ratio(r, num_frames):
    n_tok = 64
    feats = torch.randn(num_frames, n_tok, 24, generator=torch.Generator().manual_seed(7))
    sel = VidCom2(r).select(feats)
    # The budgets' scales sum to r * F before clamping (none here: r * 2 <= 1) and each
    # frame's budget is rounded (error <= 0.5 a frame).
    assert abs(sel.index.numel() - r * num_frames * n_tok) <= 0.5 * num_frames
    assert int(sel.per_frame.sum()) == sel.index.numel()


def test_spatial_order_and_time_order():
    feats = torch.randn(6, 30, 20, generator=torch.Generator().manual_seed(2))
    sel = VidCom2(0.3).select(feats)
    start = 0
    for f, count in enumerate(sel.per_frame.tolist()):
        chunk = sel.index[start : start + count]
        assert ((chunk // 30) == f).all(), "each frame's tokens are contiguous, frames in time order"
        assert (chunk[1:] > chunk[:-1]).all(), "tokens inside a frame are in spatial order"
        start += count
    assert start == sel.index.numel()


def test_at_least_one_token_per_frame_and_it_is_the_outlier():
    """Tiny r: every budget rounds to 0 and is raised to 1. Each frame has one token pointing
    the opposite way from all the others, which is the most distinct one: it must be kept."""
    num_frames, n_tok, dim = 5, 25, 16
    gen = torch.Generator().manual_seed(4)
    common = torch.randn(dim, generator=gen).abs() + 1
    feats = common + 0.01 * torch.randn(num_frames, n_tok, dim, generator=gen)
    outlier = [(3 * f + 2) % n_tok for f in range(num_frames)]
    for f, p in enumerate(outlier):
        feats[f, p] = -common
    sel = VidCom2(1e-3).select(feats)
    assert sel.per_frame.tolist() == [1] * num_frames
    assert sel.index.tolist() == [f * n_tok + p for f, p in enumerate(outlier)]


def test_budget_capped_at_whole_frame():
    feats = similar_frames_with_one_unique(unique=2)
    sel = VidCom2(0.9).select(feats)  # the unique frame's scale 0.9 * (2 - 1/F) > 1 is clamped to 1
    assert int(sel.per_frame[2]) == feats.shape[1]
    assert (sel.per_frame <= feats.shape[1]).all()


def test_half_precision_input():
    feats = torch.randn(4, 25, 16, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    sel = VidCom2(0.25).select(feats)
    assert sel.index.tolist() == reference_vidcom2(feats.float(), 0.25)[0]


def test_describe():
    assert VidCom2(0.3).describe() == {"name": "vidcom2", "r": 0.3}


@pytest.mark.parametrize(
    "r, why",
    [(0, r"allowed: \(0, 1\]"), (0.0, r"allowed: \(0, 1\]"), (-0.5, r"allowed: \(0, 1\]"), (1.01, r"allowed: \(0, 1\]"),
     (math.inf, "finite"), (float("nan"), "finite"), ("0.25", "not a string"), (True, "not a number"),
     (None, "not a number")],
)
def test_invalid_r(r, why):
    with pytest.raises(ValueError, match=rf"vidcom2_r=.*{why}"):
        VidCom2(r)


def test_invalid_features():
    with pytest.raises(ValueError, match="features"):
        VidCom2(0.5).select(torch.randn(10, 4))
