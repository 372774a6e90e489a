"""``llava-video --visualize out.png``: a picture of which video tokens the compressors kept.

* Top: the sampled frames, each covered by its pooled token grid (side x side cells over the whole frame: the
  image processor resizes the frame to a square, so cell (i, j) is the i-th row / j-th column of the frame).
  One row of frames per method, DyCoke's temporal token merging (TTM) and VidCom2: a dropped token's cell is
  dimmed (and crossed when the grid is small enough to read), a kept one is left clear.
* Bottom: DyCoke's dynamic KV pruning over the decoding steps: a (decoding step x frame) heatmap of the
  fraction of each frame's prompt tokens (those TTM kept) that layers >= L attended at that step.

Where the data comes from: ``model.compression_trace()`` (see :mod:`llava.model.compression_mixin`), entered
around one ``generate`` call, records the pooled features and the selection of the (first) video, the
video-token positions of the spliced prompt and DyCoke's active image positions after each decoding step. A method that did not run is drawn from its selection computed on the
same pooled features (the compressors are deterministic functions of them), and says so in its label.

Needs matplotlib (the ``viz`` extra: ``pip install llava[viz]``).
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np
import torch

from llava.compression.base import TokenSelection
from llava.compression.layout import video_token_layout
from llava.compression.ttm import TemporalTokenMerging
from llava.compression.vidcom2 import VidCom2
from llava.model.compression_mixin import CompressionTrace

__all__ = ["CompressionTrace", "write_visualization", "kept_mask", "active_fraction_per_frame"]

_FRAMES_PER_ROW = 8
_PANEL_INCHES = 1.9
_MAX_FRAME_PIXELS = 320  # frames are downscaled to this size before plotting
_CROSS_MAX_SIDE = 8  # cross dropped cells only when the grid has at most this many cells per side
_TTM_COLOR = "#1f77b4"
_VIDCOM2_COLOR = "#ff7f0e"
_CROSS_COLOR = "white"


# ---- recording -----------------------------------------------------------------------------------------------


# ---- what to draw ----------------------------------------------------------------------------------------------


def kept_mask(selection: TokenSelection | None, num_frames: int, tokens_per_frame: int) -> np.ndarray:
    """(F, N) bool: True where the selection keeps the token (everything when ``selection`` is None)."""
    mask = np.zeros(num_frames * tokens_per_frame, dtype=bool)
    if selection is None:
        mask[:] = True
    else:
        mask[selection.index.detach().cpu().numpy()] = True
    return mask.reshape(num_frames, tokens_per_frame)


def active_fraction_per_frame(
    active_positions: Sequence[torch.Tensor],
    video_positions: torch.Tensor,
    prompt_sources: torch.Tensor,
    tokens_per_frame: int,
    num_frames: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Map DyCoke's active KV positions per decoding step to frames.

    Args:
        active_positions: per decoding step, the (K,) cache positions of the active video tokens.
        video_positions: (V,) sorted cache positions of the prompt's video tokens.
        prompt_sources: (V,) for the v-th video token of the prompt, its index into the flattened (F * N)
            pooled features (``video_token_layout`` without newlines).
    Returns:
        ``(fraction, active, in_prompt)``: (steps, F) fraction of each frame's prompt tokens active at each step,
        (steps, F) active counts, and (F,) the number of each frame's tokens in the prompt.
    """
    video_positions = video_positions.detach().cpu().long()
    frame_of_token = torch.div(prompt_sources.detach().cpu().long(), tokens_per_frame, rounding_mode="floor")
    in_prompt = torch.bincount(frame_of_token, minlength=num_frames).numpy()
    active = np.zeros((len(active_positions), num_frames), dtype=np.int64)
    for step, positions in enumerate(active_positions):
        positions = positions.detach().cpu().long()
        rank = torch.searchsorted(video_positions, positions)
        valid = (rank < video_positions.numel()) & (video_positions[rank.clamp(max=video_positions.numel() - 1)] == positions)
        active[step] = torch.bincount(frame_of_token[rank[valid]], minlength=num_frames).numpy()
    fraction = active / np.maximum(in_prompt, 1)[None, :]
    return fraction, active, in_prompt


def _pooled_features(model, pixels: torch.Tensor, traces: list[CompressionTrace]) -> torch.Tensor:
    for trace in traces:
        if trace.pooled is not None:
            return trace.pooled
    # Nothing recorded: encode the frames again, exactly as the architecture does for a video.
    tower = model.get_vision_tower()
    dtype = next(tower.parameters()).dtype
    device = next(tower.parameters()).device
    with torch.inference_mode():
        return model.get_2dPool(model.encode_images(pixels.to(device=device, dtype=dtype)))


def _method_selection(
    traces: list[CompressionTrace], compressor: str, build, pooled: torch.Tensor
) -> tuple[TokenSelection | None, bool]:
    """The selection ``compressor`` made in a recorded run, else the one it makes on ``pooled``; and whether it ran."""
    for trace in traces:
        if trace.compressor == compressor and trace.selection_recorded:
            return trace.selection, True
    compressor_object = build()
    with torch.inference_mode():
        selection = compressor_object.select(pooled) if compressor_object is not None else None
    return selection, False


def _thumbnails(frames, count: int) -> list[np.ndarray]:
    from PIL import Image

    thumbs = []
    for frame in list(frames)[:count]:
        array = np.asarray(frame)
        if array.dtype != np.uint8:
            array = np.clip(array * (255 if array.max() <= 1.0 else 1), 0, 255).astype(np.uint8)
        image = Image.fromarray(array)
        scale = _MAX_FRAME_PIXELS / max(image.size)
        if scale < 1:
            image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BILINEAR)
        thumbs.append(np.asarray(image.convert("RGB")))
    return thumbs


def _frame_labels(num_frames: int, frame_times: Sequence[float] | None) -> list[str]:
    if frame_times is not None and len(frame_times) == num_frames and any(t > 0 for t in frame_times):
        return [f"frame {i} ({t:.1f} s)" for i, t in enumerate(frame_times)]
    return [f"frame {i}" for i in range(num_frames)]


# ---- the picture -------------------------------------------------------------------------------------------------


def write_visualization(
    path: str | os.PathLike,
    frames,
    model,
    pixels: torch.Tensor,
    results: Sequence[dict],
    frame_times: Sequence[float] | None = None,
) -> str:
    """Write the PNG described in the module docstring to ``path`` and return the path.

    Args:
        frames: the sampled frames, (F, H, W, 3) uint8 (as ``load_video`` returns them).
        model: the loaded LLaVA model (its current compression settings give k, r, L and p).
        pixels: the preprocessed frames, used only when no run recorded the pooled features.
        results: the command-line tool's per-compressor results; a ``"trace"`` entry
            (:class:`CompressionTrace`) is used when present.
        frame_times: optional timestamps (seconds) of the frames, for the labels.
    """
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
        from matplotlib.gridspec import GridSpec
        from matplotlib.legend_handler import HandlerTuple
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("--visualize needs matplotlib: pip install 'llava[viz]' (or pip install matplotlib)") from error

    traces = [r["trace"] for r in results if isinstance(r, dict) and r.get("trace") is not None]
    pooled = _pooled_features(model, pixels, traces)
    num_frames, tokens_per_frame = int(pooled.shape[0]), int(pooled.shape[1])
    side = math.isqrt(tokens_per_frame)
    grid_h, grid_w = (side, side) if side * side == tokens_per_frame else (1, tokens_per_frame)
    settings = model.compression
    k, r = float(settings.dycoke_k), float(settings.vidcom2_r)

    ttm_selection, ttm_ran = _method_selection(
        traces, "dycoke", lambda: TemporalTokenMerging(k) if k > 0 else None, pooled
    )
    vidcom2_selection, vidcom2_ran = _method_selection(traces, "vidcom2", lambda: VidCom2(r), pooled)
    methods = [
        ("DyCoke TTM", f"k={k:g}", ttm_ran, kept_mask(ttm_selection, num_frames, tokens_per_frame), _TTM_COLOR),
        ("VidCom2", f"r={r:g}", vidcom2_ran, kept_mask(vidcom2_selection, num_frames, tokens_per_frame), _VIDCOM2_COLOR),
    ]

    thumbs = _thumbnails(frames, num_frames)
    if len(thumbs) < num_frames:  # frames not given (or fewer): draw the grid on grey
        thumbs += [np.full((grid_h * 16, grid_w * 16, 3), 128, np.uint8)] * (num_frames - len(thumbs))
    labels = _frame_labels(num_frames, frame_times)
    aspect = thumbs[0].shape[0] / thumbs[0].shape[1]

    columns = min(num_frames, _FRAMES_PER_ROW)
    blocks = math.ceil(num_frames / columns)
    panel_w = _PANEL_INCHES
    panel_h = panel_w * aspect + 0.35
    kv_trace = next((t for t in traces if t.compressor == "dycoke" and t.kv_stats and t.kv_stats.get("decode_steps")), None)
    heat_h = 3.2 if kv_trace is not None else 1.0  # a one-line message when there is nothing to plot
    header_h = 1.3
    fig_w = max(columns * panel_w + 1.6, 9.0)
    fig_h = header_h + blocks * len(methods) * panel_h + heat_h + 0.4
    fig = plt.figure(figsize=(fig_w, fig_h), dpi=110)
    grid = GridSpec(
        blocks * len(methods) + 1, columns, figure=fig,
        height_ratios=[panel_h] * (blocks * len(methods)) + [heat_h],
        left=1.3 / fig_w, right=1 - 0.3 / fig_w, top=1 - header_h / fig_h, bottom=0.6 / fig_h,
        hspace=0.45, wspace=0.08,
    )

    total = num_frames * tokens_per_frame
    summary = ", ".join(f"{name} keeps {int(mask.sum())} ({mask.sum() / total:.0%})" for name, _, _, mask, _ in methods)
    fig.suptitle(
        f"Video tokens kept per frame: {num_frames} frames x {grid_h}x{grid_w} pooled tokens = {total} tokens\n{summary}",
        fontsize=12, y=1 - 0.15 / fig_h, va="top",
    )
    dropped_handle = (Patch(facecolor="0.3"), Line2D([], [], color=_CROSS_COLOR, marker="x", markersize=7, linestyle="none"))
    fig.legend(
        [Patch(facecolor="white", edgecolor="0.4"), dropped_handle],
        ["kept token (one cell of the frame's pooled grid)", "dropped token (dimmed, crossed)"],
        handler_map={tuple: HandlerTuple(ndivide=1)},  # the cross drawn over the dimmed patch
        loc="upper center", ncol=2, frameon=False, fontsize=9, bbox_to_anchor=(0.5, 1 - 0.75 / fig_h),
    )

    for block in range(blocks):
        for m, (name, parameter, ran, mask, color) in enumerate(methods):
            row = block * len(methods) + m
            for column in range(columns):
                frame = block * columns + column
                ax = fig.add_subplot(grid[row, column])
                if frame >= num_frames:
                    ax.axis("off")
                    continue
                _draw_frame(ax, thumbs[frame], mask[frame], grid_h, grid_w, color)
                ax.set_title(f"{labels[frame]}: {int(mask[frame].sum())}/{tokens_per_frame}", fontsize=8, pad=2)
                if column == 0:
                    note = "" if ran else "\n(not run; computed on\nthe same features)"
                    ax.set_ylabel(f"{name}\n{parameter}{note}", fontsize=9, color=color, fontweight="bold")

    _draw_kv_heatmap(fig.add_subplot(grid[-1, :]), fig, traces, pooled, ttm_selection, model, num_frames, tokens_per_frame)
    path = os.fspath(path)
    fig.savefig(path, dpi=110, facecolor="white")
    plt.close(fig)
    return path


def _draw_frame(ax, image: np.ndarray, keep: np.ndarray, grid_h: int, grid_w: int, color: str) -> None:
    height, width = image.shape[:2]
    ax.imshow(image, extent=(0, width, height, 0), interpolation="bilinear")
    shade = np.zeros((grid_h, grid_w, 4), dtype=float)
    shade[..., 3] = np.where(keep.reshape(grid_h, grid_w), 0.0, 0.65)
    ax.imshow(shade, extent=(0, width, height, 0), interpolation="nearest")
    cell_w, cell_h = width / grid_w, height / grid_h
    for i in range(1, grid_w):
        ax.axvline(i * cell_w, color="white", linewidth=0.4, alpha=0.5)
    for i in range(1, grid_h):
        ax.axhline(i * cell_h, color="white", linewidth=0.4, alpha=0.5)
    if max(grid_h, grid_w) <= _CROSS_MAX_SIDE:
        rows, cols = np.nonzero(~keep.reshape(grid_h, grid_w))
        for row, col in zip(rows, cols):
            x0, y0, inset = col * cell_w, row * cell_h, 0.2
            xs = [x0 + inset * cell_w, x0 + (1 - inset) * cell_w]
            ys = [y0 + inset * cell_h, y0 + (1 - inset) * cell_h]
            ax.plot(xs, ys, color=_CROSS_COLOR, linewidth=0.8, alpha=0.8)
            ax.plot(xs, ys[::-1], color=_CROSS_COLOR, linewidth=0.8, alpha=0.8)
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(color)
        spine.set_linewidth(1.5)


def _draw_kv_heatmap(ax, fig, traces, pooled, ttm_selection, model, num_frames: int, tokens_per_frame: int) -> None:
    trace = next((t for t in traces if t.compressor == "dycoke"), None)
    stats = trace.kv_stats if trace is not None else None
    settings = model.compression
    layer = (trace.kv_settings.get("layer") if trace else None) or settings.dycoke_l
    ratio = (trace.kv_settings.get("ratio") if trace else None) or settings.dycoke_p
    threshold = (trace.kv_settings.get("threshold") if trace else None) or 0.9
    title = f"DyCoke dynamic KV pruning (layers >= L={layer} attend to {1 - ratio:.0%} of the video tokens, p={ratio:g})"

    if trace is None or not stats or not stats.get("decode_steps"):
        if trace is None:
            reason = "DyCoke did not run in this invocation: run with --compressor dycoke (and --compare for the baseline)."
        elif not stats:
            reason = f"KV pruning was off in the DyCoke run (dycoke_p={settings.dycoke_p:g})."
        else:
            reason = "No decoding step was pruned (generation stopped after the first token; raise --max-new-tokens)."
        _message(ax, title, reason)
        return

    mapping_ok = (
        trace.active_positions
        and trace.video_positions is not None
        and len(trace.active_positions) == stats["decode_steps"]
    )
    sources = None
    if mapping_ok:
        position = getattr(model.config, "mm_newline_position", None) or "one_token"
        side = math.isqrt(tokens_per_frame)
        grid_hw = (side, side) if side * side == tokens_per_frame else None
        if position == "grid" and grid_hw is None:
            mapping_ok = False
        else:
            sources = video_token_layout(
                num_frames, tokens_per_frame, ttm_selection, position, grid_hw, with_newline=False,
                device=torch.device("cpu") if ttm_selection is None else None,
            )
            mapping_ok = sources.numel() == trace.video_positions.numel()  # False if the prompt was truncated

    recompute_steps = set((stats.get("recompute_steps") or [[]])[0])
    steps = stats["decode_steps"]
    if not mapping_ok:
        active = (stats.get("active_image_tokens") or [0])[0]
        image_tokens = (stats.get("image_tokens") or [0])[0]
        ax.bar(range(steps), [active] * steps, color="#4c72b0")
        for step in recompute_steps:
            ax.annotate("*", (step, active), ha="center", va="bottom", fontsize=12)
        ax.set_xlabel("decoding step (* = active set recomputed)")
        ax.set_ylabel("active video tokens")
        ax.set_title(f"{title}\n{active} of {image_tokens} video tokens active per step "
                     "(which frames they belong to was not recorded)", fontsize=10)
        return

    fraction, active, in_prompt = active_fraction_per_frame(
        trace.active_positions, trace.video_positions, sources, tokens_per_frame, num_frames
    )
    image = ax.imshow(fraction, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks(range(num_frames))
    ax.set_xticklabels([f"{f}\n({n})" for f, n in enumerate(in_prompt)], fontsize=7 if num_frames > 16 else 8)
    ax.set_xlabel("frame (its tokens in the prompt after TTM)", fontsize=9)
    tick_every = max(1, math.ceil(steps / 24))
    ticks = list(range(0, steps, tick_every))
    ax.set_yticks(ticks)
    ax.set_yticklabels([f"{s}*" if s in recompute_steps else str(s) for s in ticks], fontsize=8)
    ax.set_ylabel("decoding step\n(* = active set recomputed)", fontsize=9)
    if steps * num_frames <= 200:
        for step in range(steps):
            for frame in range(num_frames):
                value = fraction[step, frame]
                ax.text(frame, step, f"{active[step, frame]}", ha="center", va="center", fontsize=7,
                        color="white" if value < 0.6 else "black")
    total_active = int(active[0].sum())
    ax.set_title(
        f"{title}\nfraction of each frame's prompt tokens active at each decoding step "
        f"({total_active} of {int(in_prompt.sum())} per step; numbers are token counts; "
        f"recomputed when cos(a, a_prev) < {threshold:g})",
        fontsize=10,
    )
    colorbar = fig.colorbar(image, ax=ax, fraction=0.025, pad=0.01)
    colorbar.set_label("fraction active", fontsize=8)


def _message(ax, title: str, text: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=10, wrap=True, transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])
