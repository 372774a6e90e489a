"""Video token layouts (llava.compression.layout)."""

import pytest
import torch

from llava.compression import (
    NEWLINE_POSITIONS,
    TemporalTokenMerging,
    TokenSelection,
    VidCom2,
    assemble_video_tokens,
    keep_all,
    video_token_layout,
)

DIM = 6


def make_video(num_frames, h, w):
    feats = torch.randn(num_frames, h * w, DIM, generator=torch.Generator().manual_seed(num_frames * 100 + h * 10 + w))
    newline = torch.full((DIM,), 1000.0)  # unlike any feature token
    return feats, newline


def reference_baseline(feats, newline, position, h, w):
    """LLaVA-NeXT's layouts, token by token, with the visual mask."""
    tokens, visual = [], []

    def add(t, is_visual):
        tokens.append(t)
        visual.append(is_visual)

    for f in range(feats.shape[0]):
        for row in range(h):
            for col in range(w):
                add(feats[f, row * w + col], True)
            if position == "grid" and newline is not None:
                add(newline, False)
        if position == "frame" and newline is not None:
            add(newline, False)
    if position == "one_token" and newline is not None:
        add(newline, False)
    return torch.stack(tokens), torch.tensor(visual)


@pytest.mark.parametrize("position", NEWLINE_POSITIONS)
@pytest.mark.parametrize("num_frames,h,w", [(1, 3, 3), (4, 3, 3), (3, 2, 5)])
@pytest.mark.parametrize("with_newline", [True, False])
def test_baseline_layouts_match_llava_next(position, num_frames, h, w, with_newline):
    feats, newline = make_video(num_frames, h, w)
    newline = newline if with_newline else None
    out = assemble_video_tokens(feats, None, newline, position, (h, w))
    ref_tokens, ref_visual = reference_baseline(feats, newline, position, h, w)
    assert torch.equal(out.tokens, ref_tokens)
    assert torch.equal(out.is_visual, ref_visual)
    # Identity selection gives the same sequence in every layout.
    same = assemble_video_tokens(feats, keep_all(num_frames, h * w), newline, position, (h, w))
    assert torch.equal(same.tokens, ref_tokens) and torch.equal(same.is_visual, ref_visual)


def test_baseline_counts_and_newline_positions():
    num_frames, h, w = 4, 3, 3
    feats, newline = make_video(num_frames, h, w)
    n_tok = h * w
    grid = assemble_video_tokens(feats, None, newline, "grid")  # square grid inferred
    assert grid.tokens.shape == (num_frames * h * (w + 1), DIM)
    assert (~grid.is_visual).nonzero().squeeze(1).tolist() == list(range(w, num_frames * h * (w + 1), w + 1))
    one = assemble_video_tokens(feats, None, newline, "one_token")
    assert one.tokens.shape[0] == num_frames * n_tok + 1 and (~one.is_visual).nonzero().item() == num_frames * n_tok
    frame = assemble_video_tokens(feats, None, newline, "frame")
    assert (~frame.is_visual).nonzero().squeeze(1).tolist() == list(range(n_tok, num_frames * (n_tok + 1), n_tok + 1))
    none = assemble_video_tokens(feats, None, newline, "no_token")
    assert torch.equal(none.tokens, feats.reshape(-1, DIM)) and none.is_visual.all()


def reference_selected(feats, newline, position, sel, h, w):
    """Layout of a selection, written from the rule: one_token / no_token / frame keep the
    selection order; grid sorts each frame's kept tokens spatially, then adds h newlines."""
    n_tok = h * w
    kept = {f: [] for f in range(feats.shape[0])}
    for i in sel.index.tolist():
        kept[i // n_tok].append(i % n_tok)
    tokens, visual = [], []
    for f in range(feats.shape[0]):
        local = sorted(kept[f]) if position == "grid" else kept[f]
        for t in local:
            tokens.append(feats[f, t])
            visual.append(True)
        extra = {"grid": h, "frame": 1}.get(position, 0)
        for _ in range(extra):
            tokens.append(newline)
            visual.append(False)
    if position == "one_token":
        tokens.append(newline)
        visual.append(False)
    return torch.stack(tokens), torch.tensor(visual)


@pytest.mark.parametrize("position", NEWLINE_POSITIONS)
@pytest.mark.parametrize("compressor", [TemporalTokenMerging(0.6), VidCom2(0.3)], ids=["ttm", "vidcom2"])
@pytest.mark.parametrize("num_frames,h,w", [(5, 4, 4), (2, 3, 5)])
def test_selected_layouts(position, compressor, num_frames, h, w):
    feats, newline = make_video(num_frames, h, w)
    sel = compressor.select(feats)
    out = assemble_video_tokens(feats, sel, newline, position, (h, w))
    ref_tokens, ref_visual = reference_selected(feats, newline, position, sel, h, w)
    assert torch.equal(out.tokens, ref_tokens)
    assert torch.equal(out.is_visual, ref_visual)
    assert int(out.is_visual.sum()) == sel.index.numel()
    # Without newline tokens the visual part is unchanged.
    bare = assemble_video_tokens(feats, sel, None, position, (h, w))
    assert torch.equal(bare.tokens, ref_tokens[ref_visual]) and bare.is_visual.all()


def test_grid_selection_follows_public_vidcom2_grid_mapping():
    """VidCom2's LLaVA-Video code indexes the full grid sequence (frame stride h * (w + 1)):
    kept token (row, col) -> row * (w + 1) + col, then every row newline row * (w + 1) + w."""
    num_frames, h, w = 3, 4, 4
    feats, newline = make_video(num_frames, h, w)
    sel = VidCom2(0.25).select(feats)
    baseline = assemble_video_tokens(feats, None, newline, "grid").tokens
    stride = h * (w + 1)
    grid_index = []
    start = 0
    for f, count in enumerate(sel.per_frame.tolist()):
        local = sel.index[start : start + count] - f * h * w
        start += count
        grid_index += (f * stride + (local // w) * (w + 1) + local % w).tolist()
        grid_index += [f * stride + row * (w + 1) + w for row in range(h)]
    out = assemble_video_tokens(feats, sel, newline, "grid")
    assert torch.equal(out.tokens, baseline[grid_index])
    assert out.tokens.shape[0] == sel.index.numel() + num_frames * h


def test_frame_layout_with_empty_frame():
    feats, newline = make_video(3, 2, 2)
    sel = TokenSelection(index=torch.tensor([3, 1, 10]), per_frame=torch.tensor([2, 0, 1]))
    layout = video_token_layout(3, 4, sel, "frame").tolist()
    assert layout == [3, 1, -1, -1, 10, -1]
    out = assemble_video_tokens(feats, sel, newline, "frame")
    assert out.is_visual.tolist() == [i >= 0 for i in layout]


def test_dtype_and_device_follow_features():
    feats, newline = make_video(2, 2, 2)
    out = assemble_video_tokens(feats.bfloat16(), None, newline, "grid")
    assert out.tokens.dtype == torch.bfloat16 and out.is_visual.dtype == torch.bool
    assert torch.equal(out.tokens[~out.is_visual], newline.bfloat16().expand(4, DIM))


def test_unknown_position():
    feats, newline = make_video(2, 2, 2)
    with pytest.raises(ValueError) as err:
        assemble_video_tokens(feats, None, newline, "row")
    for name in NEWLINE_POSITIONS:
        assert name in str(err.value)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(position="grid", grid_hw=(2, 3)), "grid_hw"),
        (dict(position="one_token", grid_hw=(3, 3)), "grid_hw"),
        (dict(position="grid", grid_hw=(2, -2)), "grid_hw"),
        (dict(position="grid", grid_hw=None, shape=(2, 6, DIM)), "grid_hw is required"),
        (dict(position="grid", newline=torch.zeros(DIM + 1)), "newline"),
        (dict(position="frame", selection=keep_all(3, 4)), "frames"),
        (dict(position="frame", shape=(2, 4)), "features"),
    ],
)
def test_invalid_arguments(kwargs, message):
    shape = kwargs.pop("shape", (2, 4, DIM))
    feats = torch.randn(*shape)
    args = dict(selection=None, newline=torch.zeros(DIM), grid_hw=None) | kwargs
    with pytest.raises(ValueError, match=message):
        assemble_video_tokens(feats, args["selection"], args["newline"], args["position"], args["grid_hw"])


def test_selection_validation():
    with pytest.raises(ValueError, match="index"):
        TokenSelection(index=torch.tensor([0.0, 1.0]), per_frame=torch.tensor([2]))
    with pytest.raises(ValueError, match="per_frame"):
        TokenSelection(index=torch.tensor([0, 1]), per_frame=torch.tensor([[2]]))
