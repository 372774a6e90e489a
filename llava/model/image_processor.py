"""SigLIP image preprocessing, numerically identical to LLaVA-NeXT's ``SigLipImageProcessor``.

Per image or video frame: convert to RGB (transparency composited onto white), resize to
``size`` with PIL bicubic, multiply by ``rescale_factor`` (in float64, then cast to float32),
then ``(x - mean) / std`` in float32, channels first. Defaults are the published
``google/siglip-so400m-patch14-384`` settings (384x384, bicubic, 1/255, mean = std = 0.5).

Accepted inputs of :meth:`SigLipImageProcessor.preprocess`:

* one PIL image;
* a uint8 numpy array or torch tensor shaped ``(H, W, 3)`` (one image) or ``(T, H, W, 3)``
  (a video, e.g. from decord);
* a list/tuple of PIL images and/or ``(H, W, 3)`` uint8 arrays/tensors.

The result is a :class:`transformers.BatchFeature` with ``"pixel_values"`` of shape
``(N, 3, height, width)``, float32.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature

SIGLIP_SO400M_384 = {
    "size": {"height": 384, "width": 384},
    "resample": int(Image.Resampling.BICUBIC),
    "rescale_factor": 1 / 255,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
}

PREPROCESSOR_CONFIG_NAME = "preprocessor_config.json"


class SigLipImageProcessor:
    """Resize + rescale + normalise images and video frames for a SigLIP vision tower.

    Attributes read by LLaVA-NeXT-style code: ``image_mean``, ``image_std`` (3-tuples),
    ``size`` (``(height, width)`` tuple, as LLaVA-NeXT's processor has it), ``crop_size``
    (``{"height", "width"}``: the anyres patch side), ``resample`` (a PIL filter),
    ``rescale_factor``.
    """

    def __init__(
        self,
        image_mean: Sequence[float] = (0.5, 0.5, 0.5),
        image_std: Sequence[float] = (0.5, 0.5, 0.5),
        size: Sequence[int] | int = (384, 384),
        crop_size: dict[str, int] | None = None,
        resample: int = Image.Resampling.BICUBIC,
        rescale_factor: float = 1 / 255,
        do_resize: bool = True,
        do_rescale: bool = True,
        do_normalize: bool = True,
    ):
        if isinstance(size, int):
            size = (size, size)
        self.size = (int(size[0]), int(size[1]))
        self.crop_size = dict(crop_size) if crop_size else {"height": self.size[0], "width": self.size[1]}
        self.image_mean = _three_floats(image_mean, "image_mean")
        self.image_std = _three_floats(image_std, "image_std")
        self.resample = Image.Resampling(int(resample))
        self.rescale_factor = float(rescale_factor)
        self.do_resize = do_resize
        self.do_rescale = do_rescale
        self.do_normalize = do_normalize
        self._lut = self._build_lookup_table()

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_dict(cls, config: dict[str, Any], **overrides: Any) -> "SigLipImageProcessor":
        """Build from a ``preprocessor_config.json`` dict as transformers writes it.

        ``size`` may be ``{"height", "width"}``, ``{"shortest_edge"}`` (square) or an int;
        unknown keys (``image_processor_type``, ``processor_class``, ...) are ignored.
        """
        merged = {**config, **overrides}
        kwargs: dict[str, Any] = {}
        if "size" in merged:
            kwargs["size"] = _size_from_config(merged["size"])
        if merged.get("crop_size") is not None:
            height, width = _size_from_config(merged["crop_size"])
            kwargs["crop_size"] = {"height": height, "width": width}
        for key in ("image_mean", "image_std", "resample", "rescale_factor", "do_resize", "do_rescale", "do_normalize"):
            if key in merged:
                kwargs[key] = merged[key]
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> "SigLipImageProcessor":
        """Build from a vision-tower folder (or a json file path).

        Uses ``preprocessor_config.json`` if the folder has one; otherwise the published defaults,
        with the square size taken from the folder's ``config.json`` ``image_size`` (a SigLIP
        vision config, or a full SigLIP config's ``vision_config``) when present.
        """
        path = os.fspath(path)
        if os.path.isfile(path):
            return cls.from_dict(_read_json(path), **overrides)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"No image processor config at {path!r} (not a file or folder)")
        preprocessor_file = os.path.join(path, PREPROCESSOR_CONFIG_NAME)
        if os.path.isfile(preprocessor_file):
            return cls.from_dict(_read_json(preprocessor_file), **overrides)
        config = dict(SIGLIP_SO400M_384)
        image_size = _image_size_from_model_config(os.path.join(path, "config.json"))
        if image_size is not None:
            config["size"] = {"height": image_size, "width": image_size}
        return cls.from_dict(config, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """The settings in ``preprocessor_config.json`` form (round-trips through :meth:`from_dict`)."""
        return {
            "image_processor_type": "SiglipImageProcessor",
            "size": {"height": self.size[0], "width": self.size[1]},
            "crop_size": dict(self.crop_size),
            "resample": int(self.resample),
            "rescale_factor": self.rescale_factor,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "do_resize": self.do_resize,
            "do_rescale": self.do_rescale,
            "do_normalize": self.do_normalize,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.to_dict()})"

    # ------------------------------------------------------------------ processing

    def __call__(self, images: Any, return_tensors: str | None = "pt", **kwargs: Any) -> BatchFeature:
        return self.preprocess(images, return_tensors=return_tensors, **kwargs)

    def preprocess(self, images: Any, return_tensors: str | None = "pt", **kwargs: Any) -> BatchFeature:
        """Preprocess one image, a list of images, or a ``(T, H, W, 3)`` uint8 video.

        Returns ``BatchFeature({"pixel_values": (N, 3, height, width) float32})``: a torch
        tensor for ``return_tensors="pt"``, a numpy array for ``"np"`` or ``None``.
        Raises ``ValueError``/``TypeError`` naming the problem for empty inputs, wrong shapes,
        channel counts or dtypes.
        """
        if return_tensors not in ("pt", "np", None):
            raise ValueError(f"Unsupported return_tensors={return_tensors!r}; use 'pt', 'np' or None")
        frames = [self._resize(frame) for frame in _to_rgb_frames(images)]
        _check_same_shape(frames)
        pixels = self._rescale_and_normalize(np.stack(frames))
        if return_tensors == "pt":
            pixels = torch.from_numpy(pixels)
        return BatchFeature(data={"pixel_values": pixels})

    def _resize(self, frame: np.ndarray) -> np.ndarray:
        if not self.do_resize:
            return frame
        height, width = self.size
        if frame.shape[:2] == (height, width):
            return frame  # PIL returns an exact copy for a same-size resize
        return np.asarray(Image.fromarray(frame).resize((width, height), resample=self.resample))

    def _build_lookup_table(self) -> np.ndarray:
        """Output value of every (channel, uint8 level): shape (3, 256), float32.

        The arithmetic is the reference's, step for step: float64 rescale cast to float32, then
        float32 ``(x - mean) / std``. A table lookup gives the same bits without float64
        temporaries the size of the whole video.
        """
        levels = np.arange(256, dtype=np.float64)
        values = (levels * self.rescale_factor if self.do_rescale else levels).astype(np.float32)
        values = np.broadcast_to(values, (3, 256))
        if self.do_normalize:
            mean = np.asarray(self.image_mean, dtype=np.float32)[:, None]
            std = np.asarray(self.image_std, dtype=np.float32)[:, None]
            values = (values - mean) / std
        return np.ascontiguousarray(values, dtype=np.float32)

    def _rescale_and_normalize(self, frames: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 -> (N, 3, H, W) float32."""
        out = np.empty((frames.shape[0], 3, *frames.shape[1:3]), dtype=np.float32)
        for channel in range(3):
            out[:, channel] = self._lut[channel][frames[..., channel]]
        return out


# ---------------------------------------------------------------------- input handling


def _to_rgb_frames(images: Any) -> list[np.ndarray]:
    """Turn any accepted input into a non-empty list of (H, W, 3) uint8 arrays."""
    if isinstance(images, Image.Image):
        return [_pil_to_rgb_array(images)]
    if isinstance(images, (np.ndarray, torch.Tensor)):
        array = _array_to_numpy(images, "images")
        if array.ndim == 3:
            return [_check_frame(array, "image")]
        if array.ndim == 4:
            if array.shape[0] == 0:
                raise ValueError("Got a video array with 0 frames: shape (0, H, W, 3)")
            return [_check_frame(frame, f"frame {i}") for i, frame in enumerate(array)]
        raise ValueError(
            f"Expected an image (H, W, 3) or a video (T, H, W, 3) uint8 array, got shape {tuple(array.shape)}"
        )
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError("Got an empty list of images (0 frames)")
        return [_single_to_rgb_array(image, f"item {i}") for i, image in enumerate(images)]
    raise TypeError(
        f"Unsupported input type {type(images).__name__}: expected a PIL image, a uint8 array/tensor "
        "of shape (H, W, 3) or (T, H, W, 3), or a list of images"
    )


def _single_to_rgb_array(image: Any, name: str) -> np.ndarray:
    if isinstance(image, Image.Image):
        return _pil_to_rgb_array(image)
    if isinstance(image, (np.ndarray, torch.Tensor)):
        array = _array_to_numpy(image, name)
        if array.ndim != 3:
            raise ValueError(f"{name}: expected an (H, W, 3) uint8 array, got shape {tuple(array.shape)}")
        return _check_frame(array, name)
    raise TypeError(f"{name}: unsupported type {type(image).__name__}; expected a PIL image or an (H, W, 3) array")


def _pil_to_rgb_array(image: Image.Image) -> np.ndarray:
    """RGB pixels; transparency is composited onto white, like transformers' ``convert_to_rgb``."""
    if image.mode != "RGB":
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba).convert("RGB")
    return np.asarray(image)


def _array_to_numpy(array: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        if array.dtype != torch.uint8:
            raise TypeError(f"{name}: expected a uint8 tensor with values 0..255, got dtype {array.dtype}")
        return array.detach().cpu().numpy()
    if array.dtype != np.uint8:
        raise TypeError(f"{name}: expected a uint8 array with values 0..255, got dtype {array.dtype}")
    return array


def _check_frame(frame: np.ndarray, name: str) -> np.ndarray:
    if frame.shape[-1] != 3:
        raise ValueError(
            f"{name}: expected channels-last RGB (H, W, 3), got shape {tuple(frame.shape)} "
            f"with {frame.shape[-1]} channels in the last axis (grayscale (T, H, W) videos and "
            "channels-first arrays are not accepted)"
        )
    if frame.shape[0] == 0 or frame.shape[1] == 0:
        raise ValueError(f"{name}: empty image of shape {tuple(frame.shape)}")
    return np.ascontiguousarray(frame)


def _check_same_shape(frames: list[np.ndarray]) -> None:
    shapes = {frame.shape for frame in frames}
    if len(shapes) > 1:
        raise ValueError(f"Images have different sizes after preprocessing ({sorted(shapes)}); enable do_resize")


# ---------------------------------------------------------------------- config helpers


def _three_floats(values: Sequence[float], name: str) -> tuple[float, float, float]:
    values = tuple(float(v) for v in values)
    if len(values) != 3:
        raise ValueError(f"{name} must have 3 values (one per RGB channel), got {values}")
    return values  # type: ignore[return-value]


def _size_from_config(size: Any) -> tuple[int, int]:
    """(height, width) from transformers' size forms: dict, int, or a pair."""
    if isinstance(size, dict):
        if "height" in size and "width" in size:
            return int(size["height"]), int(size["width"])
        if "shortest_edge" in size:
            return int(size["shortest_edge"]), int(size["shortest_edge"])
        raise ValueError(f"Unsupported size {size!r}: expected height/width or shortest_edge")
    if isinstance(size, (int, float)):
        return int(size), int(size)
    height, width = size
    return int(height), int(width)


def _read_json(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _image_size_from_model_config(path: str) -> int | None:
    if not os.path.isfile(path):
        return None
    config = _read_json(path)
    config = config.get("vision_config", config)
    size = config.get("image_size")
    return int(size) if size is not None else None
