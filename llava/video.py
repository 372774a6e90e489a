"""Video loading for inference (decord), with lmms-eval's / LLaVA-Video's frame sampling.

* Uniform sampling (default): ``np.linspace(0, total - 1, num_frames, dtype=int)``, exactly
  the indices lmms-eval's ``llava_onevision`` wrapper reads. A video with fewer frames than
  requested therefore gets repeated indices (always ``num_frames`` frames back), as in lmms-eval:
  compatibility with the benchmark numbers wins over avoiding duplicates.
* FPS sampling (``fps=...``, LLaVA-Video's loader): every ``round(source_fps / fps)``-th frame
  from frame 0; if that gives more than ``max_frames`` frames (default ``num_frames``), uniform
  sampling of ``max_frames`` frames instead.

:func:`load_video` returns the frames as a ``(T, H, W, 3)`` uint8 array plus a :class:`VideoInfo`
(frame counts, source fps, indices, duration, and the "frame time" string LLaVA-Video puts in its
time instruction, see :func:`time_instruction`). Every failure is a :class:`VideoLoadError`
naming the file.

:func:`write_mp4` writes frames as an mp4 that decord reads back; :func:`make_sample_video` writes a small
synthetic clip (a red square moving left to right over a gradient) for demos and tests.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path

import numpy as np

PathLike = str | os.PathLike


class VideoLoadError(ValueError):
    """A video could not be loaded; the message names the file and the reason."""


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """What was read from a video and where the sampled frames sit in it.

    ``avg_fps`` is decord's average frame rate (0.0 when the file does not say); then
    ``duration`` and ``frame_times`` are reported as 0.
    """

    path: str
    total_frames: int
    avg_fps: float
    indices: tuple[int, ...]

    @property
    def num_frames(self) -> int:
        """Number of sampled frames."""
        return len(self.indices)

    @property
    def duration(self) -> float:
        """Video length in seconds: ``total_frames / avg_fps``."""
        return self.total_frames / self.avg_fps if self.avg_fps > 0 else 0.0

    @property
    def frame_times(self) -> tuple[float, ...]:
        """Timestamp in seconds of each sampled frame: ``index / avg_fps``."""
        if self.avg_fps <= 0:
            return tuple(0.0 for _ in self.indices)
        return tuple(i / self.avg_fps for i in self.indices)

    @property
    def frame_time(self) -> str:
        """LLaVA-Video's form of the timestamps: ``"0.00s,1.00s,..."``."""
        return ",".join(f"{t:.2f}s" for t in self.frame_times)


# --------------------------------------------------------------------------- sampling


def uniform_indices(total_frames: int, num_frames: int) -> np.ndarray:
    """lmms-eval's indices: ``linspace(0, total - 1, num_frames)`` truncated to int (may repeat)."""
    if total_frames < 1 or num_frames < 1:
        raise ValueError(f"need total_frames >= 1 and num_frames >= 1, got {total_frames}, {num_frames}")
    return np.linspace(0, total_frames - 1, num_frames, dtype=int)


def fps_indices(total_frames: int, avg_fps: float, fps: float, max_frames: int) -> np.ndarray:
    """LLaVA-Video's indices: every ``round(avg_fps / fps)``-th frame, or uniform if over ``max_frames``.

    The step is at least 1 (the public code crashes when ``fps`` exceeds the source rate).
    """
    if avg_fps <= 0:
        raise ValueError("the source frame rate is unknown, so fps sampling is impossible")
    step = max(1, round(avg_fps / fps))
    indices = np.arange(0, total_frames, step)
    if len(indices) > max_frames:
        return uniform_indices(total_frames, max_frames)
    return indices


# --------------------------------------------------------------------------- loading


def load_video(
    path: PathLike,
    num_frames: int = 32,
    *,
    fps: float | None = None,
    max_frames: int | None = None,
    num_threads: int = 0,
) -> tuple[np.ndarray, VideoInfo]:
    """Read sampled frames of a video file with decord.

    Args:
        path: the video file.
        num_frames: frames to sample uniformly (ignored when ``fps`` is given, except as the
            default of ``max_frames``).
        fps: if given, sample at this rate instead (LLaVA-Video), capped by ``max_frames``.
        max_frames: the cap for fps sampling; defaults to ``num_frames``.
        num_threads: decord decoding threads (0 = decord's choice, as lmms-eval uses).

    Returns:
        ``(frames, info)``: frames ``(T, H, W, 3)`` uint8 RGB in time order, and a :class:`VideoInfo`.

    Raises:
        VideoLoadError: missing, empty, unreadable or frameless file, or invalid arguments.
    """
    name = os.fspath(path)
    max_frames = num_frames if max_frames is None else max_frames
    _check_arguments(name, num_frames, fps, max_frames)
    _check_file(name)
    reader = _open_reader(name, num_threads)
    try:
        total = len(reader)
        if total < 1:
            raise VideoLoadError(f"Video {name!r} has no frames")
        avg_fps = _average_fps(reader)
        if fps is None:
            if num_frames > total:
                warnings.warn(
                    f"{name!r} has {total} frames and {num_frames} were requested: frames repeat (uniform sampling "
                    "as lmms-eval does it). Request at most as many frames as the video has to avoid it.",
                    stacklevel=2,
                )
            indices = uniform_indices(total, num_frames)
        elif avg_fps <= 0:
            raise VideoLoadError(f"Video {name!r} has no frame rate, so it cannot be sampled at fps={fps}")
        else:
            indices = fps_indices(total, avg_fps, fps, max_frames)
        frames = _read_frames(reader, name, indices)
    finally:
        del reader
    info = VideoInfo(path=name, total_frames=total, avg_fps=avg_fps, indices=tuple(int(i) for i in indices))
    return frames, info


def time_instruction(info: VideoInfo) -> str:
    """The sentence LLaVA-Video puts before the question (``add_time_instruction``)."""
    return (
        f"The video lasts for {info.duration:.2f} seconds, and {info.num_frames} frames are uniformly "
        f"sampled from it. These frames are located at {info.frame_time}."
        "Please answer the following questions related to this video."
    )


def _check_arguments(name: str, num_frames: int, fps: float | None, max_frames: int) -> None:
    if num_frames < 1:
        raise VideoLoadError(f"Cannot load {name!r}: num_frames must be >= 1, got {num_frames}")
    if fps is not None and not fps > 0:
        raise VideoLoadError(f"Cannot load {name!r}: fps must be > 0, got {fps}")
    if max_frames < 1:
        raise VideoLoadError(f"Cannot load {name!r}: max_frames must be >= 1, got {max_frames}")


def _check_file(name: str) -> None:
    if not os.path.exists(name):
        raise VideoLoadError(f"Video file not found: {name!r}")
    if not os.path.isfile(name):
        raise VideoLoadError(f"Video path is not a file: {name!r}")
    if os.path.getsize(name) == 0:
        raise VideoLoadError(f"Video file is empty (0 bytes): {name!r}")


def _open_reader(name: str, num_threads: int):
    import decord  # imported lazily: importing the rest of llava must not need it

    try:
        return decord.VideoReader(name, ctx=decord.cpu(0), num_threads=num_threads)
    except Exception as error:  # decord raises RuntimeError / DECORDError with C++ context
        raise VideoLoadError(f"Cannot decode video {name!r} (corrupt or not a video): {_first_line(error)}") from error


def _average_fps(reader) -> float:
    try:
        fps = float(reader.get_avg_fps())
    except Exception:
        return 0.0
    return fps if np.isfinite(fps) and fps > 0 else 0.0


def _read_frames(reader, name: str, indices: np.ndarray) -> np.ndarray:
    try:
        frames = reader.get_batch(indices.tolist()).asnumpy()
    except Exception as error:
        reason = _first_line(error)
        raise VideoLoadError(f"Cannot decode frames {indices.tolist()} of video {name!r}: {reason}") from error
    if frames.ndim != 4 or frames.shape[0] != len(indices) or frames.shape[-1] != 3:
        raise VideoLoadError(f"Video {name!r} decoded to an unexpected array of shape {frames.shape}")
    return frames


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# --------------------------------------------------------------------------- sample video


def make_sample_video(
    path: PathLike, num_frames: int = 48, size: tuple[int, int] = (240, 320), fps: int = 8
) -> Path:
    """Write a synthetic mp4 (MPEG-4 part 2, yuv420p) that decord can read; returns its path.

    Frame ``i`` shows a horizontal grey gradient with a red square (side ``height // 5``)
    whose left edge moves linearly from ``x = width // 16`` at frame 0 to
    ``width - side - width // 16`` at the last frame, vertically centred.
    ``size`` is ``(height, width)``; both must be even and at least 16.

    The file is read back with decord before returning: decord 0.6 misreads a few narrow
    widths (16, 24, 48 and 72 pixels were seen to fail), and such a size raises ``ValueError``.
    """
    height, width = size
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    return write_mp4(path, np.stack([_sample_frame(i, num_frames, height, width) for i in range(num_frames)]), fps)


def write_mp4(path: PathLike, frames: np.ndarray, fps: int = 8) -> Path:
    """Write ``frames`` (T, H, W, 3) uint8 RGB as an mp4 (MPEG-4 part 2, yuv420p) and check that decord reads it
    back; returns its path. H and W must be even and at least 16; a size decord misreads raises ``ValueError``.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or frames.shape[0] < 1:
        raise ValueError(f"frames must be a (T, H, W, 3) uint8 array with T >= 1, got {frames.dtype} {frames.shape}")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2 or height < 16 or width < 16:
        raise ValueError(f"size must be even and at least 16x16 (yuv420p), got {(height, width)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _encode_mp4(path, list(frames), fps)
    try:
        load_video(path, 1)
    except VideoLoadError as error:
        path.unlink()
        raise ValueError(f"decord cannot read back a {height}x{width} video; choose another size ({error})") from error
    return path


def _encode_mp4(path: Path, frames: list[np.ndarray], fps: int) -> None:
    import av

    height, width = frames[0].shape[:2]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.bit_rate = 4_000_000  # high enough that colours and edges survive compression
        for pixels in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())  # flush the encoder


def _sample_frame(index: int, num_frames: int, height: int, width: int) -> np.ndarray:
    frame = np.empty((height, width, 3), dtype=np.uint8)
    frame[:] = np.linspace(40, 160, width, dtype=np.uint8)[None, :, None]
    side = max(height // 5, 2)
    margin = width // 16
    travel = width - side - 2 * margin
    left = margin + (travel * index) // max(num_frames - 1, 1)
    top = (height - side) // 2
    frame[top : top + side, left : left + side] = (230, 20, 20)
    return frame
