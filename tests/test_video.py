"""Video loading: lmms-eval-compatible sampling, fps sampling, the sample clip, error cases."""

import numpy as np
import pytest

import llava.video as video_module
from llava.video import (
    VideoInfo,
    VideoLoadError,
    fps_indices,
    load_video,
    make_sample_video,
    time_instruction,
    uniform_indices,
)

NUM_FRAMES, FPS, SIZE = 48, 8, (240, 320)


@pytest.fixture(scope="module")
def sample_path(tmp_path_factory):
    return make_sample_video(tmp_path_factory.mktemp("video") / "sample.mp4", NUM_FRAMES, SIZE, FPS)


def _square_left_edge(frame: np.ndarray) -> int:
    red = (frame[..., 0] > 180) & (frame[..., 1] < 90) & (frame[..., 2] < 90)
    assert red.sum() > 0, "no red square found"
    return int(np.nonzero(red)[1].min())


def test_uniform_sampling_matches_lmms_eval(sample_path):
    frames, info = load_video(sample_path, 8)
    expected = np.linspace(0, NUM_FRAMES - 1, 8, dtype=int)  # lmms-eval's load_video
    assert info.indices == tuple(expected.tolist())
    assert frames.shape == (8, *SIZE, 3) and frames.dtype == np.uint8
    assert info.total_frames == NUM_FRAMES and info.avg_fps == pytest.approx(FPS)
    assert info.duration == pytest.approx(NUM_FRAMES / FPS)
    assert info.frame_time == ",".join(f"{i / FPS:.2f}s" for i in expected)


def test_frames_show_the_motion(sample_path):
    frames, info = load_video(sample_path, 6)
    edges = [_square_left_edge(frame) for frame in frames]
    assert all(b > a for a, b in zip(edges, edges[1:])), edges
    # Left edge of frame i is margin + travel * i // (n - 1), up to codec blur of a few pixels.
    height, width = SIZE
    side, margin = height // 5, width // 16
    expected = [margin + (width - side - 2 * margin) * i // (NUM_FRAMES - 1) for i in info.indices]
    assert np.abs(np.array(edges) - np.array(expected)).max() <= 3


def test_more_frames_than_the_video_repeats_indices_like_lmms_eval(sample_path):
    with pytest.warns(UserWarning, match=rf"has {NUM_FRAMES} frames and 100 were requested: frames repeat"):
        frames, info = load_video(sample_path, 100)
    assert frames.shape[0] == 100
    assert info.indices == tuple(np.linspace(0, NUM_FRAMES - 1, 100, dtype=int).tolist())
    assert np.array_equal(frames[0], frames[1])  # indices 0, 0


def test_fps_sampling(sample_path):
    # 8 fps source, 2 fps target: every 4th frame -> 12 frames, under the cap of 16.
    frames, info = load_video(sample_path, 16, fps=2)
    assert info.indices == tuple(range(0, NUM_FRAMES, 4)) and frames.shape[0] == 12
    assert info.frame_time.startswith("0.00s,0.50s,1.00s")
    # Over the cap: uniform sampling of max_frames instead.
    _, capped = load_video(sample_path, 16, fps=2, max_frames=5)
    assert capped.indices == tuple(np.linspace(0, NUM_FRAMES - 1, 5, dtype=int).tolist())
    # A target above the source rate reads every frame.
    _, dense = load_video(sample_path, 64, fps=30)
    assert dense.indices == tuple(range(NUM_FRAMES))


def test_index_helpers():
    assert uniform_indices(10, 4).tolist() == [0, 3, 6, 9]
    assert fps_indices(300, 29.97, 1, 64).tolist() == list(range(0, 300, 30))
    assert fps_indices(3000, 30.0, 1, 64).tolist() == np.linspace(0, 2999, 64, dtype=int).tolist()


def test_time_instruction():
    info = VideoInfo(path="v.mp4", total_frames=40, avg_fps=10.0, indices=(0, 20, 39))
    assert time_instruction(info) == (
        "The video lasts for 4.00 seconds, and 3 frames are uniformly sampled from it. "
        "These frames are located at 0.00s,2.00s,3.90s."
        "Please answer the following questions related to this video."
    )


def test_frames_feed_the_image_processor(sample_path):
    from llava.model.image_processor import SigLipImageProcessor

    frames, _ = load_video(sample_path, 4)
    pixels = SigLipImageProcessor().preprocess(frames, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (4, 3, 384, 384)


# --------------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    path = tmp_path / "nope.mp4"
    with pytest.raises(VideoLoadError, match="not found") as info:
        load_video(path)
    assert str(path) in str(info.value)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"")
    with pytest.raises(VideoLoadError, match="empty") as info:
        load_video(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("content", ["random", "truncated"])
def test_corrupt_file(tmp_path, sample_path, content):
    path = tmp_path / f"{content}.mp4"
    data = np.random.default_rng(0).bytes(4096) if content == "random" else sample_path.read_bytes()[:2000]
    path.write_bytes(data)
    with pytest.raises(VideoLoadError, match="Cannot decode") as info:
        load_video(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_zero_frames(tmp_path, monkeypatch, sample_path):
    class EmptyReader:
        def __init__(self, *args, **kwargs):
            pass

        def __len__(self):
            return 0

    import decord

    monkeypatch.setattr(decord, "VideoReader", EmptyReader)
    with pytest.raises(VideoLoadError, match="no frames") as info:
        load_video(sample_path)
    assert str(sample_path) in str(info.value)


@pytest.mark.parametrize("kwargs", [{"num_frames": 0}, {"num_frames": -3}, {"fps": 0}, {"max_frames": 0, "fps": 1}])
def test_bad_arguments(sample_path, kwargs):
    with pytest.raises(VideoLoadError, match=">") as info:
        load_video(sample_path, **kwargs)
    assert str(sample_path) in str(info.value)


def test_make_sample_video_validates(tmp_path):
    with pytest.raises(ValueError, match="even"):
        make_sample_video(tmp_path / "odd.mp4", size=(15, 32))
    tiny = video_module.make_sample_video(tmp_path / "sub" / "tiny.mp4", 3, (16, 32), 4)
    frames, info = load_video(tiny, 3)
    assert frames.shape == (3, 16, 32, 3) and info.total_frames == 3
    # decord misreads 16-pixel-wide frames: refused, and no broken file left behind.
    with pytest.raises(ValueError, match="decord cannot read"):
        make_sample_video(tmp_path / "narrow.mp4", 3, (16, 16), 4)
    assert not (tmp_path / "narrow.mp4").exists()
