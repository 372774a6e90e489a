"""Prompt tokenisation, image preprocessing and stopping helpers with LLaVA-NeXT's semantics.

Public names (the ones lmms-eval's wrappers and LLaVA-NeXT-style scripts import):

* :func:`tokenizer_image_token`: tokenise a prompt, putting ``IMAGE_TOKEN_INDEX`` where
  each "<image>" was.
* :func:`process_images`: PIL images -> pixel tensors according to ``model_cfg.image_aspect_ratio``
  ("pad", "anyres", "anyres_max_N", anything else = plain resize).
* :func:`select_best_resolution`, :func:`resize_and_pad_image`, :func:`divide_to_patches`,
  :func:`process_anyres_image`, :func:`get_anyres_image_grid_shape`, :func:`expand2square`:
  the anyres building blocks.
* :func:`get_model_name_from_path`, :func:`load_image_from_base64`.
* :class:`KeywordsStoppingCriteria`: stop a row once it generated one of the keywords.

Sizes follow LLaVA-NeXT's conventions: PIL sizes and resolutions are ``(width, height)``.
"""

from __future__ import annotations

import ast
import base64
import math
import re
from io import BytesIO
from typing import Any, Sequence

import torch
from PIL import Image
from transformers import StoppingCriteria

from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX

Resolution = tuple[int, int]  # (width, height)
# A config's image_grid_pinpoints: [[w, h], ...], its string literal, or "(1x1),...,(6x6)".
GridPinpoints = str | Sequence[Sequence[int]]


# --------------------------------------------------------------------------- tokenisation


def tokenizer_image_token(
    prompt: str,
    tokenizer: Any,
    image_token_index: int = IMAGE_TOKEN_INDEX,
    return_tensors: str | None = None,
) -> list[int] | torch.Tensor:
    """Tokenise ``prompt`` with every "<image>" replaced by one ``image_token_index`` id.

    Each text chunk between "<image>" markers is tokenised on its own with the tokenizer's
    default special tokens. If the tokenizer prepends a BOS token, the result starts with a
    single BOS and the BOS of every later chunk is dropped (LLaVA-NeXT's rule); tokenizers
    without BOS (Qwen2) are used as is.

    Returns a list of ints, or a 1-D ``torch.long`` tensor when ``return_tensors="pt"``.
    """
    if return_tensors not in (None, "pt"):
        raise ValueError(f"Unsupported tensor type: {return_tensors}")
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split(DEFAULT_IMAGE_TOKEN)]
    bos = tokenizer.bos_token_id
    starts_with_bos = bos is not None and len(chunks[0]) > 0 and chunks[0][0] == bos

    input_ids: list[int] = [bos] if starts_with_bos else []
    for i, chunk in enumerate(chunks):
        if i > 0:
            input_ids.append(image_token_index)
        if starts_with_bos and chunk and chunk[0] == bos:
            chunk = chunk[1:]
        input_ids.extend(chunk)

    if return_tensors == "pt":
        return torch.tensor(input_ids, dtype=torch.long)
    return input_ids


def get_model_name_from_path(model_path: str) -> str:
    """The last path component; ``.../run/checkpoint-N`` gives ``"run_checkpoint-N"``."""
    parts = model_path.strip("/").split("/")
    if parts[-1].startswith("checkpoint-") and len(parts) > 1:
        return parts[-2] + "_" + parts[-1]
    return parts[-1]


# --------------------------------------------------------------------------- stopping


class KeywordsStoppingCriteria(StoppingCriteria):
    """Stop each sequence once its generated text ends with (or contains) one of ``keywords``.

    ``input_ids`` is the prompt batch given to ``generate``; only its length is used. The
    criterion works both when ``generate`` hands it the prompt plus the new tokens (generation
    from ``input_ids``) and when it hands it the new tokens only (generation from
    ``inputs_embeds``, as LLaVA's ``generate`` does): the mode is fixed on the first call by
    comparing the sequence length with the prompt length.

    A row is done when its last tokens equal a keyword's token ids, or when the decoded text of
    its last few generated tokens (special tokens skipped) contains a keyword. Returns a bool
    tensor of shape ``(batch,)``, one decision per row.
    """

    def __init__(self, keywords: Sequence[str], tokenizer: Any, input_ids: torch.Tensor):
        self.keywords = list(keywords)
        self.tokenizer = tokenizer
        self.start_len = int(input_ids.shape[1])
        self.keyword_ids = [self._keyword_token_ids(k, tokenizer) for k in self.keywords]
        longest = max((len(ids) for ids in self.keyword_ids), default=0)
        # How many trailing generated tokens are examined: LLaVA-NeXT decodes the last 3;
        # never fewer than a whole keyword's ids.
        self.text_window = max(3, longest)
        self._prompt_len: int | None = None

    @staticmethod
    def _keyword_token_ids(keyword: str, tokenizer: Any) -> list[int]:
        ids = list(tokenizer(keyword).input_ids)
        if len(ids) > 1 and ids[0] == tokenizer.bos_token_id:
            ids = ids[1:]
        return ids

    def __call__(self, input_ids: torch.LongTensor, scores: Any = None, **kwargs) -> torch.BoolTensor:
        window = min(self._num_generated(input_ids.shape[1]), self.text_window)
        if window == 0:
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        tails = input_ids[:, -window:].tolist()  # one host transfer for the whole batch
        done = [self._tail_done(tail) for tail in tails]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    def _num_generated(self, seq_len: int) -> int:
        if self._prompt_len is None:
            # generate() calls us after each new token: a sequence longer than the prompt
            # holds the prompt; otherwise (inputs_embeds) it holds new tokens only.
            self._prompt_len = self.start_len if seq_len > self.start_len else 0
        return max(seq_len - self._prompt_len, 0)

    def _tail_done(self, tail: list[int]) -> bool:
        """Whether the last generated tokens of one row end with / contain a keyword."""
        for ids in self.keyword_ids:
            if ids and len(tail) >= len(ids) and tail[-len(ids) :] == ids:
                return True
        text = self.tokenizer.decode(tail, skip_special_tokens=True)
        return any(keyword in text for keyword in self.keywords)


# --------------------------------------------------------------------------- images


def load_image_from_base64(image: str | bytes) -> Image.Image:
    """Decode a base64-encoded image file into a PIL image."""
    return Image.open(BytesIO(base64.b64decode(image)))


def expand2square(pil_img: Image.Image, background_color: tuple[int, ...]) -> Image.Image:
    """Pad the shorter side (centred) with ``background_color`` to make the image square."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    side = max(width, height)
    result = Image.new(pil_img.mode, (side, side), background_color)
    result.paste(pil_img, ((side - width) // 2, (side - height) // 2))
    return result


def select_best_resolution(original_size: Resolution, possible_resolutions: Sequence[Sequence[int]]) -> Resolution:
    """Pick the candidate ``(width, height)`` that keeps the most of the image's pixels.

    The image is scaled (aspect ratio kept) to fit each candidate; the candidate with the largest
    effective resolution (capped at the original pixel count) wins, ties going to the one that
    wastes the fewest pixels, then to the earliest in the list.
    """
    original_width, original_height = original_size
    best_fit: Resolution | None = None
    max_effective, min_wasted = 0, float("inf")
    for width, height in possible_resolutions:
        scale = min(width / original_width, height / original_height)
        downscaled = int(original_width * scale) * int(original_height * scale)
        effective = min(downscaled, original_width * original_height)
        wasted = width * height - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            max_effective, min_wasted = effective, wasted
            best_fit = (int(width), int(height))
    if best_fit is None:
        raise ValueError(f"No usable resolution among {list(possible_resolutions)!r} for size {original_size}")
    return best_fit


def resize_and_pad_image(image: Image.Image, target_resolution: Resolution) -> Image.Image:
    """Resize to fit ``(width, height)`` keeping the aspect ratio, centred on a black RGB canvas."""
    original_width, original_height = image.size
    target_width, target_height = target_resolution
    scale_w = target_width / original_width
    scale_h = target_height / original_height
    if scale_w < scale_h:
        new_width, new_height = target_width, min(math.ceil(original_height * scale_w), target_height)
    else:
        new_width, new_height = min(math.ceil(original_width * scale_h), target_width), target_height

    resized = image.resize((new_width, new_height))  # PIL's default filter, as LLaVA-NeXT
    canvas = Image.new("RGB", (target_width, target_height), (0, 0, 0))
    canvas.paste(resized, ((target_width - new_width) // 2, (target_height - new_height) // 2))
    return canvas


def divide_to_patches(image: Image.Image, patch_size: int) -> list[Image.Image]:
    """Cut the image into ``patch_size`` squares, row by row (edge patches are zero-filled crops)."""
    width, height = image.size
    return [
        image.crop((left, top, left + patch_size, top + patch_size))
        for top in range(0, height, patch_size)
        for left in range(0, width, patch_size)
    ]


def parse_grid_pinpoints(grid_pinpoints: GridPinpoints, patch_size: int) -> list[Resolution]:
    """Candidate ``(width, height)`` resolutions from a config's ``image_grid_pinpoints``.

    Accepts a list of pairs, a string literal of such a list, or LLaVA-NeXT's range form
    ``"(1x1),...,(6x6)"``, which means every grid from the first to the last (inclusive, in
    both dimensions) times ``patch_size``.
    """
    if isinstance(grid_pinpoints, str) and "x" in grid_pinpoints:
        matches = re.findall(r"\((\d+)x(\d+)\)", grid_pinpoints)
        if not matches:
            raise ValueError(f"Cannot parse image_grid_pinpoints {grid_pinpoints!r}")
        (w0, h0), (w1, h1) = map(int, matches[0]), map(int, matches[-1])
        return [(i * patch_size, j * patch_size) for i in range(w0, w1 + 1) for j in range(h0, h1 + 1)]
    if isinstance(grid_pinpoints, str):
        grid_pinpoints = ast.literal_eval(grid_pinpoints)
    resolutions = [(int(w), int(h)) for w, h in grid_pinpoints]
    if not resolutions:
        raise ValueError("image_grid_pinpoints is empty")
    return resolutions


def get_anyres_image_grid_shape(
    image_size: Resolution, grid_pinpoints: GridPinpoints, patch_size: int
) -> tuple[int, int]:
    """``(columns, rows)`` of tower-sized patches anyres tiling gives an image of ``(width, height)``."""
    width, height = select_best_resolution(image_size, parse_grid_pinpoints(grid_pinpoints, patch_size))
    return width // patch_size, height // patch_size


def process_anyres_image(image: Image.Image, processor: Any, grid_pinpoints: GridPinpoints) -> torch.Tensor:
    """Anyres tiling: ``(1 + rows*cols, 3, S, S)`` pixels.

    The first entry is the whole image resized (squashed, not padded: LLaVA-NeXT's choice, kept
    for fidelity) to the tower size S; then the patches of the image resized-and-padded to the
    best grid resolution, row by row.
    """
    tower_size = _processor_square_size(processor)
    resolutions = parse_grid_pinpoints(grid_pinpoints, tower_size)
    padded = resize_and_pad_image(image, select_best_resolution(image.size, resolutions))
    patches = divide_to_patches(padded, processor.crop_size["height"])
    base = image.resize((tower_size, tower_size))
    pixels = [processor.preprocess(tile, return_tensors="pt")["pixel_values"][0] for tile in [base, *patches]]
    return torch.stack(pixels, dim=0)


def _processor_square_size(processor: Any) -> int:
    """The tower's input side from ``processor.size`` (tuple, list or transformers-style dict)."""
    size = processor.size
    if isinstance(size, dict):
        if "shortest_edge" in size:
            return int(size["shortest_edge"])
        return int(min(size["height"], size["width"]))
    if isinstance(size, (int, float)):
        return int(size)
    return int(min(size))


def process_images(
    images: Sequence[Image.Image], image_processor: Any, model_cfg: Any
) -> torch.Tensor | list[torch.Tensor]:
    """Preprocess PIL images as the model config says (``model_cfg.image_aspect_ratio``).

    * ``"anyres"`` / ``"anyres_max_N"``: :func:`process_anyres_image` per image with
      ``model_cfg.image_grid_pinpoints``; each gives ``(1 + patches, 3, S, S)``.
    * ``"pad"``: pad to square with the processor's mean colour, then resize: ``(3, S, S)`` each.
    * anything else (``None``, ``"square"``, ...): the processor's plain resize of all images,
      returned directly as ``(N, 3, S, S)``.

    Per-image results are stacked into one tensor when they share a shape, otherwise returned
    as a list (anyres images of different aspect ratios).
    """
    if len(images) == 0:
        raise ValueError("process_images got no images")
    aspect = getattr(model_cfg, "image_aspect_ratio", None)
    if aspect in ("highres", "crop_split"):
        raise NotImplementedError(f"image_aspect_ratio={aspect!r} is a training-time mode and is not supported")
    if aspect is not None and (aspect == "anyres" or "anyres_max" in aspect):
        pinpoints = model_cfg.image_grid_pinpoints
        processed = [process_anyres_image(image, image_processor, pinpoints) for image in images]
    elif aspect == "pad":
        background = tuple(int(x * 255) for x in image_processor.image_mean)
        processed = [
            image_processor.preprocess(expand2square(image, background), return_tensors="pt")["pixel_values"][0]
            for image in images
        ]
    else:
        return image_processor.preprocess(images, return_tensors="pt")["pixel_values"]
    if all(x.shape == processed[0].shape for x in processed):
        return torch.stack(processed, dim=0)
    return processed
