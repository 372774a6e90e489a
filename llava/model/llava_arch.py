"""LLaVA's multimodal glue, with LLaVA-NeXT's names and meaning.

``LlavaMetaModel`` adds the vision tower, projector and ``image_newline`` to the language model;
``LlavaMetaForCausalLM`` turns images and videos into token embeddings and splices them into the
prompt where ``IMAGE_TOKEN_INDEX`` placeholders sit (``prepare_inputs_labels_for_multimodal``).

Video path: frames -> tower -> projector -> 2D pooling per frame -> (optional video-token compressor)
-> layout with newline tokens (``mm_newline_position``). Positions: consecutive over the spliced prompt (the kept
video tokens packed together, as LLaVA-NeXT does), or with ``keep_video_positions()`` (the ``keep_positions``
setting) each token's position in the uncompressed prompt: kept video tokens and newlines at their source positions,
the text after a video where it would be; ``generate`` then passes them and decoding continues after the last one.
Image path: anyres tiles with unpadding and per-row newlines, or a single image followed by one newline.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from llava.compression.base import TokenSelection
from llava.compression.layout import (
    assemble_video_tokens,
    assemble_video_tokens_in_place,
    video_token_layout,
)
from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.mm_utils import get_anyres_image_grid_shape
from llava.model.projector import build_vision_projector
from llava.model.vision_tower import (
    SigLipVisionTower,
    llava_tower_config,
    published_tower_config,
)

logger = logging.getLogger(__name__)

NEWLINE_POSITIONS = ("one_token", "grid", "frame", "no_token")
POOL_MODES = ("bilinear", "average", "max")


class LlavaMetaModel:
    """Mixin for the base model: builds ``vision_tower``, ``mm_projector`` and ``image_newline``."""

    def __init__(self, config):
        super().__init__(config)
        if getattr(config, "mm_vision_tower", None):
            self.vision_tower = build_vision_tower(config)
            self.mm_projector = build_vision_projector(
                getattr(config, "mm_projector_type", "linear"), config.mm_hidden_size, config.hidden_size
            )
            if "unpad" in getattr(config, "mm_patch_merge_type", ""):
                # Initialised here (as transformers' LlavaOnevision does): the base model's own post_init has
                # already run, so transformers' weight initialisation would leave this parameter untouched.
                std = config.hidden_size**-0.5
                self.image_newline = nn.Parameter(torch.randn(config.hidden_size, dtype=self.dtype) * std)

    def get_vision_tower(self) -> SigLipVisionTower | None:
        return getattr(self, "vision_tower", None)


def build_vision_tower(config) -> SigLipVisionTower:
    published = getattr(config, "mm_vision_tower_config", None) or published_tower_config(config.mm_vision_tower)
    tower_config = llava_tower_config(published)
    if getattr(config, "mm_hidden_size", tower_config.hidden_size) != tower_config.hidden_size:
        raise ValueError(
            f"mm_hidden_size={config.mm_hidden_size} does not match the vision tower's hidden size {tower_config.hidden_size}."
        )
    return SigLipVisionTower(tower_config)


def unpad_image(features: torch.Tensor, original_size) -> torch.Tensor:
    """Crop the padding that anyres resizing added. ``features`` (C, H, W); ``original_size`` (width, height)."""
    original_width, original_height = int(original_size[0]), int(original_size[1])
    current_height, current_width = features.shape[1:]
    if original_width / original_height > current_width / current_height:
        new_height = int(original_height * (current_width / original_width))
        padding = (current_height - new_height) // 2
        return features[:, padding : current_height - padding, :]
    new_width = int(original_width * (current_height / original_height))
    padding = (current_width - new_width) // 2
    return features[:, :, padding : current_width - padding]


@dataclass
class MultimodalInputs:
    """The prompt with visual tokens spliced in, padded to one batch."""

    inputs_embeds: torch.Tensor  # (B, S, hidden)
    attention_mask: torch.Tensor  # (B, S) bool
    position_ids: torch.Tensor  # (B, S): consecutive per row, or the uncompressed positions (keep_positions)
    labels: torch.Tensor  # (B, S)
    video_token_mask: torch.Tensor  # (B, S) bool: True at video feature tokens (not newlines)
    # (B, S) int64: the quota group of each video token (TokenSelection.groups; a video without groups is one),
    # numbered per row across its videos; -1 elsewhere
    video_groups: torch.Tensor
    visual_token_count: int  # all visual tokens (image and video, newlines included) over the batch
    videos: list[VideoRecord] = field(default_factory=list)  # what the video compressor did, per video


@dataclass
class VideoRecord:
    """One video's pooled features and the compressor's choice (None: every token kept)."""

    pooled: torch.Tensor  # (F, N, D)
    selection: TokenSelection | None
    # keep_positions: each token's offset in the uncompressed layout and that layout's length (None: consecutive)
    positions: torch.Tensor | None = None
    span: int | None = None
    # the group of each token of the video's sequence (TokenSelection.groups_at, -1 at newlines); None: one group
    token_groups: torch.Tensor | None = None

    def groups(self, video_mask: torch.Tensor) -> torch.Tensor:
        """(M',) int64: the group of each token of the video's sequence (``video_mask`` (M',): its video tokens)."""
        if self.token_groups is not None:
            return self.token_groups
        return torch.where(video_mask, 0, -1)

    @property
    def tokens_before(self) -> int:
        return self.pooled.shape[0] * self.pooled.shape[1]

    @property
    def tokens_after(self) -> int:
        return self.tokens_before if self.selection is None else self.selection.num_kept


class LlavaMetaForCausalLM:
    """Mixin for the causal LM: visual encoding and the splicing of visual tokens into the prompt."""

    def get_model(self):
        return self.model

    def get_vision_tower(self) -> SigLipVisionTower:
        return self.get_model().get_vision_tower()

    # -- visual features -------------------------------------------------------------------------

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) pixel values -> (N, patches, hidden) projected features."""
        model = self.get_model()
        features = model.get_vision_tower()(images)
        projector_dtype = next(model.mm_projector.parameters()).dtype
        return model.mm_projector(features.to(projector_dtype))

    def get_2dPool(self, features: torch.Tensor, stride: int | None = None) -> torch.Tensor:
        """Per-frame 2D pooling of (F, side*side, D) features with ``mm_spatial_pool_mode`` / ``_stride``."""
        stride = int(stride if stride is not None else getattr(self.config, "mm_spatial_pool_stride", 2) or 1)
        mode = getattr(self.config, "mm_spatial_pool_mode", "bilinear")
        side = self.get_vision_tower().num_patches_per_side
        frames, _, dim = features.shape
        grid = features.view(frames, side, side, dim).permute(0, 3, 1, 2)
        if stride <= 1:
            pooled = grid
        elif mode == "average":
            pooled = nn.functional.avg_pool2d(grid, stride)
        elif mode == "max":
            pooled = nn.functional.max_pool2d(grid, stride)
        elif mode == "bilinear":
            size = [math.ceil(side / stride), math.ceil(side / stride)]
            pooled = nn.functional.interpolate(grid, size=size, mode="bilinear")
        else:
            raise ValueError(f"Unknown mm_spatial_pool_mode {mode!r}; allowed: {', '.join(POOL_MODES)}.")
        return pooled.permute(0, 2, 3, 1).reshape(frames, -1, dim)

    def _encode_with_tower_inputs(self, pixels: torch.Tensor, sizes: list[int], compressor):
        """``encode_images`` plus, per item, what ``compressor`` reads from the tower besides the features (unpooled):
        ``attention`` (F, patches) and ``keys`` (F, patches, head_dim) of the tower's last layer
        (``needs_tower_attention``: VisionZip, FlashVID, HoliTom; recorded by a forward pre-hook that changes nothing),
        ``frame_global`` (F, C) and ``saliency`` (F, patches) from SigLIP's pooling head (``needs_pooling_head``:
        FastVID)."""
        from contextlib import ExitStack

        from llava.compression.visionzip import record_siglip_attention

        model = self.get_model()
        tower = model.get_vision_tower()
        inputs = {}
        with ExitStack() as stack:
            if compressor.needs_tower_attention:
                records = stack.enter_context(record_siglip_attention(tower.vision_tower.vision_model.encoder.layers[-1]))
            patches = tower(pixels)
        if compressor.needs_tower_attention:
            inputs["attention"], inputs["keys"] = records[0]
        if compressor.needs_pooling_head:
            from llava.model.pooling_head import load_pooling_head, run_pooling_head

            head = load_pooling_head(self)
            inputs["frame_global"], inputs["saliency"] = run_pooling_head(
                tower.vision_tower.vision_model.post_layernorm, head, patches)
        projector_dtype = next(model.mm_projector.parameters()).dtype
        features = model.mm_projector(patches.to(projector_dtype))
        per_item = [dict(zip(inputs, values)) for values in zip(*(value.split(sizes) for value in inputs.values()))]
        return features, per_item

    def _pooled_tower_inputs(self, tower_inputs: dict, dtype: torch.dtype) -> dict:
        """The tower inputs of one video on the pooled token grid, pooled exactly like the features (as the public
        adaptations do: ``get_2dPool`` of a one-channel map for scores); ``frame_global`` is per frame already."""
        pooled = {}
        for name, value in tower_inputs.items():
            if name in ("attention", "saliency"):
                pooled[name] = self.get_2dPool(value[..., None].to(dtype))[..., 0]
            elif name == "keys":
                pooled[name] = self.get_2dPool(value.to(dtype))
            else:
                pooled[name] = value
        return pooled

    def _video_tokens(self, features: torch.Tensor, tower_inputs: dict | None = None) -> tuple[torch.Tensor, torch.Tensor, VideoRecord]:
        """Projected frame features (F, patches, D) -> (tokens (M, D), video-token mask (M,), record).
        ``tower_inputs``: what the compressor reads from the tower besides the features (``_encode_with_tower_inputs``)."""
        pooled = self.get_2dPool(features)
        side = math.isqrt(pooled.shape[1])
        position = getattr(self.config, "mm_newline_position", "one_token")
        if position not in NEWLINE_POSITIONS:
            raise ValueError(f"Unknown mm_newline_position {position!r}; allowed: {', '.join(NEWLINE_POSITIONS)}.")
        merge_type = getattr(self.config, "mm_patch_merge_type", "flat")
        # As LLaVA-NeXT: "flat" has no newline tokens; one_token adds its single newline only with "unpad".
        without_newline = merge_type == "flat" or (position == "one_token" and "unpad" not in merge_type)
        newline = None if without_newline else self.get_model().image_newline
        compressor = self.video_compressor()
        if compressor is None:
            selection = None
        else:
            selection = compressor.select(pooled, **self._pooled_tower_inputs(tower_inputs or {}, pooled.dtype))
        record = VideoRecord(pooled.detach(), selection)
        if selection is not None and self.keep_video_positions():
            (tokens, video_mask), record.positions, record.span = assemble_video_tokens_in_place(
                pooled, selection, newline, position, (side, side)
            )
        else:
            tokens, video_mask = assemble_video_tokens(pooled, selection, newline, position, (side, side),
                                                       grid_newlines=getattr(compressor, "grid_newlines", "frame_end"))
        if selection is not None and selection.groups is not None:
            source = video_token_layout(*pooled.shape[:2], selection, position, (side, side),
                                        with_newline=newline is not None, keep_positions=self.keep_video_positions(),
                                        grid_newlines=compressor.grid_newlines)
            record.token_groups = selection.groups_at(source, pooled.shape[0] * pooled.shape[1])
        return tokens, video_mask, record

    def video_compressor(self):
        """The compressor applied to pooled video features before the LM, or None. Overridden when compression is on."""
        return None

    def keep_video_positions(self) -> bool:
        """Whether kept video tokens keep their uncompressed positions (``keep_positions``). Overridden by the
        compression mixin."""
        return False

    def _multimodal_inputs_built(self, mm: MultimodalInputs) -> None:
        """Hook called with every spliced prompt (statistics, tracing: see the compression mixin)."""

    def _image_tokens(self, features: torch.Tensor, image_size) -> torch.Tensor:
        """Projected features of one image (tiles, patches, D) -> (M, D) tokens, LLaVA-NeXT's anyres packing."""
        merge_type = getattr(self.config, "mm_patch_merge_type", "flat")
        newline = self.get_model().image_newline if "unpad" in merge_type else None
        if merge_type == "flat":
            return features.flatten(0, 1)
        if features.shape[0] == 1:
            single = features[0]
            return torch.cat((single, newline[None].to(single))) if newline is not None else single

        aspect = getattr(self.config, "image_aspect_ratio", "square")
        if not aspect.startswith("anyres"):
            raise ValueError(f"An image with {features.shape[0]} tiles needs image_aspect_ratio 'anyres*', got {aspect!r}.")
        if image_size is None:
            raise ValueError("image_sizes is required for anyres images (one (width, height) per image).")
        tower = self.get_vision_tower()
        side = tower.num_patches_per_side
        base, tiles = features[0], features[1:]
        grid_w, grid_h = get_anyres_image_grid_shape(image_size, self.config.image_grid_pinpoints, tower.image_size)
        if grid_w * grid_h != tiles.shape[0]:
            raise ValueError(
                f"The image of size {tuple(image_size)} should have {grid_w}x{grid_h} anyres tiles plus a base image, "
                f"got {tiles.shape[0]} tiles; preprocess it with process_images and the same model config."
            )
        tiles = tiles.view(grid_h, grid_w, side, side, -1)
        if "unpad" not in merge_type:
            return torch.cat((base, tiles.permute(0, 2, 1, 3, 4).flatten(0, 3)))
        canvas = tiles.permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)  # (D, grid_h*side, grid_w*side)
        canvas = unpad_image(canvas, image_size)
        max_tiles = re.fullmatch(r"anyres_max_(\d+)", aspect)
        if max_tiles:
            channels, height, width = canvas.shape
            times = math.sqrt(height * width / (int(max_tiles.group(1)) * side**2))
            if times > 1.1:
                canvas = nn.functional.interpolate(canvas[None], [int(height // times), int(width // times)], mode="bilinear")[0]
        canvas = torch.cat((canvas, newline[:, None, None].expand(*canvas.shape[:-1], 1).to(canvas)), dim=-1)
        return torch.cat((base, canvas.flatten(1, 2).transpose(0, 1)))

    def encode_visual_items(self, images, modalities, image_sizes):
        """One (tokens, video-token mask, VideoRecord or None) per image/video, in the order the placeholders appear."""
        items = _as_item_list(images)
        modalities = _expand_modalities(modalities, len(items))
        tower = self.get_vision_tower()
        _check_pixels(items, modalities, tower.image_size)
        sizes = [item.shape[0] for item in items]
        compressor = self.video_compressor()
        reads_tower = compressor is not None and (compressor.needs_tower_attention or compressor.needs_pooling_head)
        if reads_tower and "video" in modalities:
            features, tower_inputs = self._encode_with_tower_inputs(torch.cat(items), sizes, compressor)
        else:
            features, tower_inputs = self.encode_images(torch.cat(items)), [{}] * len(items)
        features = torch.split(features, sizes)
        results = []
        for index, (feature, modality) in enumerate(zip(features, modalities)):
            if modality == "video":
                results.append(self._video_tokens(feature, tower_inputs[index]))
            else:
                size = image_sizes[index] if image_sizes is not None and index < len(image_sizes) else None
                tokens = self._image_tokens(feature, size)
                results.append((tokens, torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device), None))
        return results

    # -- splicing --------------------------------------------------------------------------------

    def build_multimodal_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor | None,
        images,
        modalities=("image",),
        image_sizes=None,
        padding_side: str = "right",
    ) -> MultimodalInputs:
        """Replace every ``IMAGE_TOKEN_INDEX`` placeholder by its visual tokens; re-pad the batch."""
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        device = input_ids.device
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        labels = torch.full_like(input_ids, IGNORE_INDEX) if labels is None else labels
        placeholders = int((input_ids[attention_mask] == IMAGE_TOKEN_INDEX).sum())
        num_items = 0 if images is None else len(_as_item_list(images))
        if placeholders != num_items:
            raise ValueError(
                f"The prompt has {placeholders} '<image>' placeholder(s) (token {IMAGE_TOKEN_INDEX}) but {num_items} "
                "image(s)/video(s) were given: put one '<image>' in the prompt per image or video "
                "(use tokenizer_image_token to tokenize it)."
            )
        visual = self.encode_visual_items(images, modalities, image_sizes) if num_items else []

        embed = self.get_model().embed_tokens
        rows, row_labels, row_video, row_positions, row_groups = [], [], [], [], []
        item = 0
        for ids, mask, row_label in zip(input_ids, attention_mask, labels):
            ids, row_label = ids[mask], row_label[mask]
            cuts = torch.nonzero(ids == IMAGE_TOKEN_INDEX).flatten().tolist()
            bounds = [-1] + cuts + [ids.shape[0]]
            text = embed(ids.masked_fill(ids == IMAGE_TOKEN_INDEX, 0))
            pieces, piece_labels, piece_video, piece_positions, piece_groups = [], [], [], [], []
            offset = 0  # the position of the next token (the uncompressed count so far with keep_positions)
            groups = 0  # the groups of the row's videos so far
            for i in range(len(bounds) - 1):
                start, stop = bounds[i] + 1, bounds[i + 1]
                pieces.append(text[start:stop])
                piece_labels.append(row_label[start:stop])
                piece_video.append(torch.zeros(stop - start, dtype=torch.bool, device=device))
                piece_positions.append(torch.arange(offset, offset + stop - start, device=device))
                piece_groups.append(torch.full((stop - start,), -1, dtype=torch.long, device=device))
                offset += stop - start
                if i < len(cuts):
                    tokens, video_mask, record = visual[item]
                    item += 1
                    pieces.append(tokens.to(device=device, dtype=text.dtype))
                    piece_labels.append(torch.full((tokens.shape[0],), IGNORE_INDEX, dtype=row_label.dtype, device=device))
                    piece_video.append(video_mask.to(device))
                    video_groups = (record.groups(video_mask) if record is not None
                                    else torch.full_like(video_mask, -1, dtype=torch.long)).to(device)
                    piece_groups.append(torch.where(video_groups >= 0, video_groups + groups, -1))
                    groups += int(video_groups.max()) + 1 if video_groups.numel() else 0  # once per video
                    if record is not None and record.positions is not None:  # keep_positions: uncompressed places
                        piece_positions.append(record.positions.to(device) + offset)
                        offset += record.span
                    else:
                        piece_positions.append(torch.arange(offset, offset + tokens.shape[0], device=device))
                        offset += tokens.shape[0]
            rows.append(torch.cat(pieces))
            row_labels.append(torch.cat(piece_labels))
            row_video.append(torch.cat(piece_video))
            row_positions.append(torch.cat(piece_positions))
            row_groups.append(torch.cat(piece_groups))

        limit = getattr(self.config, "tokenizer_model_max_length", None)
        if limit is not None and max(r.shape[0] for r in rows) > limit:
            logger.warning(
                "A multimodal prompt has %d tokens, more than tokenizer_model_max_length=%d: it is truncated as "
                "LLaVA-NeXT does. Use fewer frames or a smaller image.", max(r.shape[0] for r in rows), limit
            )
            rows, row_labels, row_video, row_positions, row_groups = (
                [x[:limit] for x in seq] for seq in (rows, row_labels, row_video, row_positions, row_groups)
            )
        mm = _pad_rows(rows, row_labels, row_video, row_positions, row_groups, padding_side,
                       sum(item[0].shape[0] for item in visual))
        mm.videos = [record for _, _, record in visual if record is not None]
        self._multimodal_inputs_built(mm)
        return mm

    def prepare_inputs_labels_for_multimodal(
        self, input_ids, position_ids, attention_mask, past_key_values, labels, images, modalities=("image",), image_sizes=None
    ):
        """LLaVA-NeXT's entry point: returns (None, position_ids, attention_mask, past_key_values, inputs_embeds, labels)."""
        if self.get_vision_tower() is None or images is None or input_ids.shape[1] == 1:
            return input_ids, position_ids, attention_mask, past_key_values, None, labels
        side = getattr(self.config, "tokenizer_padding_side", "right")
        mm = self.build_multimodal_inputs(input_ids, attention_mask, labels, images, modalities, image_sizes, side)
        keep = self.keep_video_positions()  # the positions are the prompt's own: always passed, with the mask
        mask_dtype = attention_mask.dtype if attention_mask is not None else torch.long
        return (
            None,
            mm.position_ids if position_ids is not None or keep else None,
            mm.attention_mask.to(mask_dtype) if attention_mask is not None or keep else None,
            past_key_values,
            mm.inputs_embeds,
            mm.labels if labels is not None else None,
        )


def _as_item_list(images) -> list[torch.Tensor]:
    """Images/videos as a list of (P, 3, S, S) tensors (P tiles of an image, or P frames of a video)."""
    if isinstance(images, torch.Tensor):
        if images.ndim == 5:
            return list(images)
        if images.ndim == 4:
            return [image[None] for image in images]
        raise ValueError(f"images as a tensor must be 4D (N, 3, H, W) or 5D (N, P, 3, H, W); got shape {tuple(images.shape)}.")
    items = []
    for index, image in enumerate(images):
        if not isinstance(image, torch.Tensor):
            raise ValueError(f"images[{index}] must be a torch.Tensor, got {type(image).__name__}.")
        items.append(image[None] if image.ndim == 3 else image)
    return items


def _expand_modalities(modalities, count: int) -> list[str]:
    modalities = [modalities] if isinstance(modalities, str) else list(modalities or ["image"])
    if len(modalities) == 1 and count > 1:
        modalities = modalities * count
    if len(modalities) < count:
        raise ValueError(f"{count} images/videos but only {len(modalities)} modalities ({modalities}); give one per item.")
    for modality in modalities:
        if modality not in ("image", "video"):
            raise ValueError(f"Unknown modality {modality!r}; allowed: 'image', 'video'.")
    return modalities[:count]


def _check_pixels(items: list[torch.Tensor], modalities: list[str], image_size: int) -> None:
    """Every item must be model-ready pixel values: float, (P, 3, S, S), at least one frame/tile, finite.

    Integer tensors are raw 0-255 frames, which the model would silently take as pixel values; NaN or inf
    pixels make every logit NaN. Both are a ValueError naming the item and how to preprocess it.
    """
    fixes = {
        "video": 'Preprocess the frames: image_processor.preprocess(frames, return_tensors="pt")["pixel_values"].',
        "image": "Preprocess the images: llava.mm_utils.process_images(images, image_processor, model.config).",
    }
    kinds = ["video" if modality == "video" else "image" for modality in modalities]
    for index, (item, kind) in enumerate(zip(items, kinds)):
        if not item.is_floating_point():
            raise ValueError(
                f"{kind} {index} has dtype {item.dtype}: raw 0-255 pixels, not model-ready pixel values. {fixes[kind]}"
            )
        unit = "frames" if kind == "video" else "tiles"
        if item.ndim != 4 or item.shape[1] != 3 or tuple(item.shape[-2:]) != (image_size, image_size):
            raise ValueError(
                f"{kind} {index} must be a tensor of shape ({unit}, 3, {image_size}, {image_size}); got {tuple(item.shape)}."
            )
        if item.shape[0] == 0:
            raise ValueError(f"{kind} {index} has zero {unit}.")
    if not items:
        return
    # One flag per item, read from the device once for the whole call.
    finite = torch.stack([torch.isfinite(item).all().to(items[0].device) for item in items])
    if not bool(finite.all()):
        index = int((~finite).nonzero()[0])
        raise ValueError(f"{kinds[index]} {index} has NaN or infinite pixel values. {fixes[kinds[index]]}")


def _pad_rows(rows, row_labels, row_video, row_positions, row_groups, padding_side: str,
              visual_count: int) -> MultimodalInputs:
    batch, longest = len(rows), max(r.shape[0] for r in rows)
    first = rows[0]
    embeds = first.new_zeros((batch, longest, first.shape[-1]))
    attention = torch.zeros((batch, longest), dtype=torch.bool, device=first.device)
    positions = torch.zeros((batch, longest), dtype=torch.long, device=first.device)
    labels = torch.full((batch, longest), IGNORE_INDEX, dtype=row_labels[0].dtype, device=first.device)
    video = torch.zeros((batch, longest), dtype=torch.bool, device=first.device)
    groups = torch.full((batch, longest), -1, dtype=torch.long, device=first.device)
    for i, (row, label, vid, position, group) in enumerate(zip(rows, row_labels, row_video, row_positions, row_groups)):
        n = row.shape[0]
        span = slice(longest - n, longest) if padding_side == "left" else slice(0, n)
        embeds[i, span], labels[i, span], video[i, span], positions[i, span] = row, label, vid, position
        groups[i, span] = group
        attention[i, span] = True
    return MultimodalInputs(embeds, attention, positions, labels, video, groups, visual_count)
