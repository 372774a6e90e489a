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


# ---- grid_newlines="kept_rows": the public HoliTom placement (cokeshao/HoliTom holitom/llava_arch.py) ----------------


def reference_kept_rows(feats, newline, sel, h, w):
    """The ``kept_rows`` rule written out: per frame, per row, the row's kept tokens in column order (a merging
    selection's values in place of the features), then one newline if the row kept any."""
    table = {i: (sel.values[j] if sel.values is not None else feats.reshape(-1, DIM)[i])
             for j, i in enumerate(sel.index.tolist())}
    tokens, visual = [], []
    for f in range(feats.shape[0]):
        for row in range(h):
            kept = [f * h * w + row * w + col for col in range(w) if f * h * w + row * w + col in table]
            tokens += [table[i] for i in kept]
            visual += [True] * len(kept)
            if kept and newline is not None:
                tokens.append(newline)
                visual.append(False)
    return torch.stack(tokens), torch.tensor(visual)


def test_kept_rows_known_answer():
    """F=3, h=2, w=3. Frame 0 keeps (1, 1) and (0, 0); frame 1 keeps (0, 1), (0, 2): its row 1 keeps nothing; frame 2
    keeps nothing. By hand: [0, NL, 4, NL, 7, 8, NL]; the default rule: [0, 4, NL, NL, 7, 8, NL, NL, NL, NL]."""
    sel = TokenSelection(index=torch.tensor([4, 0, 8, 7]), per_frame=torch.tensor([2, 2, 0]))
    assert video_token_layout(3, 6, sel, "grid", (2, 3), grid_newlines="kept_rows").tolist() == [0, -1, 4, -1, 7, 8, -1]
    assert video_token_layout(3, 6, sel, "grid", (2, 3)).tolist() == [0, 4, -1, -1, 7, 8, -1, -1, -1, -1]
    assert video_token_layout(3, 6, sel, "grid", (2, 3), with_newline=False, grid_newlines="kept_rows").tolist() == [
        0, 4, 7, 8]
    feats, newline = make_video(3, 2, 3)
    values = torch.arange(4 * DIM, dtype=torch.float32).view(4, DIM)  # a merging method's tokens, in index order
    merged = TokenSelection(sel.index, sel.per_frame, values)
    out = assemble_video_tokens(feats, merged, newline, "grid", (2, 3), grid_newlines="kept_rows")
    expected = torch.stack([values[1], newline, values[0], newline, values[3], values[2], newline])
    assert torch.equal(out.tokens, expected)
    assert out.is_visual.tolist() == [True, False, True, False, True, True, False]


@pytest.mark.parametrize("compressor", [TemporalTokenMerging(0.6), VidCom2(0.2)], ids=["ttm", "vidcom2"])
@pytest.mark.parametrize("num_frames,h,w", [(5, 4, 4), (2, 3, 5)])
def test_kept_rows_on_selections(compressor, num_frames, h, w):
    feats, newline = make_video(num_frames, h, w)
    sel = compressor.select(feats)
    out = assemble_video_tokens(feats, sel, newline, "grid", (h, w), grid_newlines="kept_rows")
    ref_tokens, ref_visual = reference_kept_rows(feats, newline, sel, h, w)
    assert torch.equal(out.tokens, ref_tokens) and torch.equal(out.is_visual, ref_visual)
    # The visual tokens are the default rule's; only the newlines move: one per row that keeps a token.
    default = assemble_video_tokens(feats, sel, newline, "grid", (h, w))
    assert torch.equal(out.tokens[out.is_visual], default.tokens[default.is_visual])
    rows_kept = len(set((sel.index // w).tolist()))
    assert int((~out.is_visual).sum()) == rows_kept and int((~default.is_visual).sum()) == num_frames * h
    if isinstance(compressor, VidCom2):  # few tokens per frame: some rows keep nothing, so the rules differ
        assert rows_kept < num_frames * h


def test_kept_rows_changes_only_the_compressed_grid_layout():
    """No selection, an identity selection, the other positions and keep_positions are the same with either rule."""
    num_frames, h, w = 3, 2, 3
    feats, newline = make_video(num_frames, h, w)
    sel = TokenSelection(index=torch.tensor([4, 0, 8, 7]), per_frame=torch.tensor([2, 2, 0]))
    for position in NEWLINE_POSITIONS:
        for selection in (None, keep_all(num_frames, h * w), sel):
            if position == "grid" and selection is sel:
                continue
            a = assemble_video_tokens(feats, selection, newline, position, (h, w))
            b = assemble_video_tokens(feats, selection, newline, position, (h, w), grid_newlines="kept_rows")
            assert torch.equal(a.tokens, b.tokens) and torch.equal(a.is_visual, b.is_visual), (position, selection)
        a = video_token_layout(num_frames, h * w, sel, position, (h, w), keep_positions=True)
        b = video_token_layout(num_frames, h * w, sel, position, (h, w), keep_positions=True, grid_newlines="kept_rows")
        assert torch.equal(a, b), position


def test_unknown_grid_newlines():
    feats, newline = make_video(2, 2, 2)
    for call in (lambda: assemble_video_tokens(feats, None, newline, "grid", grid_newlines="rows"),
                 lambda: video_token_layout(2, 4, None, "grid", keep_positions=True, grid_newlines="rows")):
        with pytest.raises(ValueError, match="grid_newlines must be one of .*frame_end.*kept_rows"):
            call()
