"""SigLipImageProcessor against SigLIP preprocessing done by hand and against transformers'."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from llava.model.image_processor import SigLipImageProcessor

SIZE = 384


def _by_hand(frame: np.ndarray, size: int = SIZE) -> np.ndarray:
    """PIL bicubic resize, x/255 (float64 -> float32), (x - 0.5) / 0.5, channels first."""
    resized = np.asarray(Image.fromarray(frame).resize((size, size), Image.Resampling.BICUBIC))
    scaled = (resized.astype(np.float64) * (1 / 255)).astype(np.float32)
    normalised = (scaled - np.float32(0.5)) / np.float32(0.5)
    return normalised.transpose(2, 0, 1)


@pytest.fixture(scope="module")
def processor():
    return SigLipImageProcessor()


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(0)


def test_published_defaults(processor):
    assert processor.size == (384, 384)
    assert processor.crop_size == {"height": 384, "width": 384}
    assert processor.image_mean == (0.5, 0.5, 0.5) and processor.image_std == (0.5, 0.5, 0.5)
    assert processor.resample == Image.Resampling.BICUBIC
    assert processor.rescale_factor == pytest.approx(1 / 255)


@pytest.mark.parametrize("height,width", [(120, 200), (384, 384), (500, 333)])
def test_single_image_matches_hand_computation(processor, rng, height, width):
    frame = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    expected = _by_hand(frame)[None]
    for given in (Image.fromarray(frame), frame, torch.from_numpy(frame), [frame]):
        out = processor.preprocess(given, return_tensors="pt")["pixel_values"]
        assert out.dtype == torch.float32 and out.shape == (1, 3, SIZE, SIZE)
        np.testing.assert_array_equal(out.numpy(), expected)


def test_video_array_matches_hand_computation(processor, rng):
    video = rng.integers(0, 256, (5, 90, 160, 3), dtype=np.uint8)
    expected = np.stack([_by_hand(frame) for frame in video])
    out = processor(video)["pixel_values"]  # __call__ == preprocess, "pt" by default
    assert out.shape == (5, 3, SIZE, SIZE)
    np.testing.assert_array_equal(out.numpy(), expected)
    np.testing.assert_array_equal(processor.preprocess(torch.from_numpy(video))["pixel_values"].numpy(), expected)
    np.testing.assert_array_equal(processor.preprocess(list(video))["pixel_values"].numpy(), expected)


def test_matches_transformers_siglip_processor(processor, rng):
    try:
        from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
    except ImportError:
        pytest.skip("this transformers has no PIL SigLIP processor")
    reference = SiglipImageProcessorPil(size={"height": SIZE, "width": SIZE})
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(77, 130), (400, 260)]]
    ours = processor.preprocess(images)["pixel_values"]
    theirs = reference(images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_non_rgb_images_are_converted(processor):
    rgba = Image.new("RGBA", (20, 10), (255, 0, 0, 0))  # fully transparent: composited onto white
    out = processor.preprocess(rgba)["pixel_values"]
    assert torch.all(out == 1.0)
    gray = Image.new("L", (20, 10), 0)
    assert torch.all(processor.preprocess(gray)["pixel_values"] == -1.0)


def test_numpy_output(processor, rng):
    frame = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    out = processor.preprocess(frame, return_tensors="np")["pixel_values"]
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (1, 3, SIZE, SIZE)


@pytest.mark.parametrize(
    "bad,error,match",
    [
        (np.zeros((4, 32, 32), np.uint8), ValueError, "channels"),  # (T, H, W): no colour axis
        (np.zeros((0, 32, 32, 3), np.uint8), ValueError, "0 frames"),
        ([], ValueError, "0 frames"),
        (np.zeros((32, 32, 4), np.uint8), ValueError, "4 channels"),
        (np.zeros((3, 32, 32), np.uint8), ValueError, "channels-last"),
        (np.zeros((2, 3, 8, 8, 3), np.uint8), ValueError, "shape"),
        (np.zeros((32, 32, 3), np.float32), TypeError, "uint8"),
        (torch.zeros(2, 8, 8, 3), TypeError, "uint8"),
        ("frame.png", TypeError, "Unsupported input type"),
    ],
)
def test_clear_errors(processor, bad, error, match):
    with pytest.raises(error, match=match):
        processor.preprocess(bad)


def test_from_pretrained_reads_preprocessor_config(tmp_path, rng):
    config = {
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.5, 0.4, 0.3],
        "image_processor_type": "SiglipImageProcessor",
        "image_std": [0.2, 0.25, 0.5],
        "processor_class": "SiglipProcessor",
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"height": 28, "width": 28},
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    processor = SigLipImageProcessor.from_pretrained(tmp_path)
    assert processor.size == (28, 28) and processor.crop_size == {"height": 28, "width": 28}
    frame = rng.integers(0, 256, (50, 60, 3), dtype=np.uint8)
    resized = np.asarray(Image.fromarray(frame).resize((28, 28), Image.Resampling.BICUBIC))
    scaled = (resized.astype(np.float64) * config["rescale_factor"]).astype(np.float32)
    expected = ((scaled - np.float32(config["image_mean"])) / np.float32(config["image_std"])).transpose(2, 0, 1)
    np.testing.assert_array_equal(processor.preprocess(frame)["pixel_values"][0].numpy(), expected)
    assert SigLipImageProcessor.from_dict(processor.to_dict()).to_dict() == processor.to_dict()


def test_from_pretrained_falls_back_to_model_config_image_size(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "siglip_vision_model", "image_size": 56}))
    processor = SigLipImageProcessor.from_pretrained(tmp_path)
    assert processor.size == (56, 56) and processor.image_mean == (0.5, 0.5, 0.5)
    with pytest.raises(FileNotFoundError):
        SigLipImageProcessor.from_pretrained(tmp_path / "missing")
