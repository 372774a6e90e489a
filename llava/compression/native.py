"""Video-token compression on transformers' own video LLMs: ``apply_compression(model, compressor=...)``.

Supported: ``LlavaOnevisionForConditionalGeneration``, ``Qwen2VLForConditionalGeneration``,
``Qwen2_5_VLForConditionalGeneration``, ``Qwen3VLForConditionalGeneration`` (and this package's
``LlavaQwenForCausalLM``, whose own settings it sets). After ``apply_compression`` the user calls the stock
``model.generate(**inputs)``; ``remove_compression(model)`` gives the stock model back; ``compressed(model, ...)``
does both around a block.

The same pieces as in the LLaVA-NeXT model, applied through transformers' extension points (no forward is copied):

- before the language model, TTM (DyCoke) or VidCom2 choose each video's tokens per frame. For the Qwen VL models
  a frame is one temporal step of ``video_grid_thw`` (two input frames) and its tokens are the merged patches
  (h * w / merge^2). A forward pre-hook on the language model drops the others from ``inputs_embeds``; kept tokens
  stay in their original order with their original multimodal RoPE positions (computed by the model on the whole
  sequence, before the hook), and decoding continues from the whole prompt's last position, as generate does. For
  LLaVA-OneVision the kept tokens come in the selection's order and the positions are renumbered, exactly as the
  LLaVA-NeXT code (and so this package's model) builds the sequence, unless ``keep_positions=True``: then, as on the
  Qwen models, the kept tokens stay in their original order at their original (1-D) positions and decoding continues
  from the whole prompt's length. The Qwen models always keep the positions (M-RoPE; the setting changes nothing
  there). The video's trailing newline is always kept. A merging method's kept tokens enter the LM with their merged
  values (``TokenSelection.kept_features``); Qwen3-VL's deepstack features stay each kept token's own, as in the public
  FlashVID code. A method that scores tokens with the vision tower's attention (VisionZip, FlashVID, HoliTom) gets it
  from :mod:`.tower_attention`, recorded while ``get_video_features`` runs; so does FastVID on the Qwen models, which
  run the public code's Qwen2.5-VL variant (:mod:`.fastvid_qwen`; LLaVA-OneVision refuses FastVID: no SigLIP head);
- while decoding, DyCoke's KV pruning and FastV run their :mod:`.decoding` state through forward hooks on the
  decoder layers and a cache subclass that the first forward of a generation puts in place of generate's cache
  (generate then keeps using the cache the model returns). The state lives in that cache: nothing of a generation
  stays on the model. Where such a stage shortens the hidden states between layers (FastV and the methods built on
  it, FrameFusion from layer 0 on), Qwen3-VL's deepstack features are added by hooks on its first layers instead of
  by its text model, each to the token at the prompt position it belongs to (see ``_Deepstack``): the same as the
  stock model on the full sequence with the removed tokens hidden.

Images are never compressed. A batch with padding works (each row has its own selection).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers.cache_utils import StaticCache

from llava.compression.decoding import (
    PREFILL,
    CompressionDynamicCache,
    CompressionStaticCache,
    GenerationInputs,
    LayerInputs,
    check_generate_arguments,
    make_generation_cache,
    new_token_budget,
)
from llava.compression.masks import BOOL, KeyMask
from llava.compression.methods import CompressionSetup
from llava.compression.settings import CompressionSettings, settings_from_kwargs
from llava.compression.tower_attention import (
    POOLING_HEAD,
    RECEIVED,
    TowerAttention,
    tower_recorder,
)
from llava.transformers_compat import CACHE_ARG, cache_argument, pop_cache_argument

__all__ = ["SUPPORTED_MODELS", "NativeCompression", "apply_compression", "compressed", "remove_compression"]

_DEFAULT_DECODED_CAPACITY = 128  # decoded tokens planned for with a dynamic cache (more grow the buffers)


@dataclass(frozen=True)
class _Family:
    """What differs between the supported models."""

    keep_positions: bool  # kept tokens keep their original (multimodal) positions; else renumbered (LLaVA-NeXT)
    sorted_order: bool  # kept tokens in their original order; else in the selection's order
    trailing_newline: bool  # each video ends with one newline token, never compressed
    frame_spans: bool  # each temporal step is its own run of video tokens (Qwen3-VL)
    needs_grid: bool  # frames come from video_grid_thw (Qwen2-VL, Qwen2.5-VL)


_QWEN = _Family(keep_positions=True, sorted_order=True, trailing_newline=False, frame_spans=False, needs_grid=True)
SUPPORTED_MODELS = {
    "LlavaOnevisionForConditionalGeneration": _Family(
        keep_positions=False, sorted_order=False, trailing_newline=True, frame_spans=False, needs_grid=False
    ),
    "Qwen2VLForConditionalGeneration": _QWEN,
    "Qwen2_5_VLForConditionalGeneration": _QWEN,
    "Qwen3VLForConditionalGeneration": _Family(
        keep_positions=True, sorted_order=True, trailing_newline=False, frame_spans=True, needs_grid=True
    ),
}
_OWN_MODEL = "LlavaQwenForCausalLM"


# ---- the public functions -------------------------------------------------------------------------------------------


def apply_compression(model, **settings) -> NativeCompression | CompressionSettings:
    """Compress ``model``'s video tokens: ``compressor`` (``dycoke``, ``vidcom2``, ``fastv``, ``none``; or
    ``dycoke=True``) and the method's arguments (``dycoke_k``, ``dycoke_l``, ``dycoke_p``, ``dycoke_public_quirks``,
    ``vidcom2_r``, ``fastv_k``, ``fastv_r``), with the names, defaults and checks of ``load_pretrained_model``.
    Calling it again replaces the settings. Returns the applied :class:`NativeCompression` (for this package's own
    model: its settings)."""
    name = type(model).__name__
    if name == _OWN_MODEL:
        return model.configure_compression(**settings)
    family = SUPPORTED_MODELS.get(name)
    if family is None:
        raise TypeError(
            f"apply_compression does not support {name}; supported: {', '.join([*SUPPORTED_MODELS, _OWN_MODEL])}."
        )
    config = _text_config(model)
    parsed = settings_from_kwargs(settings, num_layers=config.num_hidden_layers)
    handle = NativeCompression(model, family, parsed)  # checks everything before the model changes
    remove_compression(model)
    handle.attach()
    return handle


def remove_compression(model) -> None:
    """Give ``model`` back its stock behaviour (a model without compression is left as it is)."""
    if type(model).__name__ == _OWN_MODEL:
        model.reset_compression()
        return
    handle = model.__dict__.get("llava_compression")
    if handle is not None:
        handle.detach()


@contextmanager
def compressed(model, **settings):
    """``apply_compression`` for the block, then the model's previous state (stock, or the settings it had)."""
    previous = getattr(model, "compression", None) if type(model).__name__ == _OWN_MODEL else None
    previous_handle = model.__dict__.get("llava_compression")
    handle = apply_compression(model, **settings)
    try:
        yield handle
    finally:
        remove_compression(model)
        if previous is not None:
            model.set_compression(previous)
        elif previous_handle is not None:
            previous_handle.attach()


# ---- the applied compression ----------------------------------------------------------------------------------------


class NativeCompression:
    """The compression applied to one transformers model: its settings, the methods built from them and the hooks.

    Holds no per-generation state (that lives in each generation's cache); ``last_stats`` is a plain summary of
    the last prefill's video compression.
    """

    def __init__(self, model, family: _Family, settings: CompressionSettings):
        if settings.keep_positions and not family.keep_positions:  # LLaVA-OneVision: as the Qwen models do
            family = dataclasses.replace(family, keep_positions=True, sorted_order=True)
        self.model, self.family, self.settings = model, family, settings
        setup = CompressionSetup.build(settings)
        rule = getattr(setup.video, "tower_rule", RECEIVED)
        if setup.video is not None and setup.video.needs_pooling_head:
            if hasattr(model.model, "visual") and hasattr(setup.video, "qwen_variant"):
                # The Qwen VL models run the public code's own Qwen2.5-VL FastVID (llava.compression.fastvid_qwen).
                setup = dataclasses.replace(setup, video=setup.video.qwen_variant())
                rule = setup.video.tower_rule
            else:  # LLaVA-OneVision: SigLIP's pooling head, read from the tower's checkpoint (llava.model.pooling_head)
                rule = POOLING_HEAD
        needs_tower = setup.video is not None and (setup.video.needs_tower_attention or setup.video.needs_pooling_head)
        self.tower = tower_recorder(model, settings.compressor, rule) if needs_tower else None  # may refuse the model
        self.encoded: list[TowerAttention] | None = None  # the tower attention of a forward's videos, until used
        self.video_compressor, self.decoder = setup.video, setup.decoder
        self.language_model = model.model.language_model
        self.video_token_id = _video_token_id(model.config)
        # Qwen3-VL adds visual features after its first layers (deepstack): with a decode-time stage, hooks add them
        self.deepstack_layers = len(getattr(getattr(model.config, "vision_config", None), "deepstack_visual_indexes",
                                            None) or [])
        self.handles: list = []
        self.last_stats: dict = {}

    def describe(self) -> dict:
        return self.settings.as_dict()

    def __repr__(self) -> str:
        return f"NativeCompression({type(self.model).__name__}, {self.settings})"

    def attach(self) -> None:
        model = self.model
        self.handles = [
            model.register_forward_pre_hook(self._before_model, with_kwargs=True),
            self.language_model.register_forward_pre_hook(self._before_language_model, with_kwargs=True),
        ]
        for layer in self.language_model.layers:
            self.handles.append(layer.register_forward_pre_hook(_before_decoder_layer, with_kwargs=True))
            self.handles.append(layer.register_forward_hook(_after_decoder_layer, with_kwargs=True))
        for layer in self.language_model.layers[: self.deepstack_layers]:  # after _after_decoder_layer (its steps)
            self.handles.append(layer.register_forward_hook(_add_deepstack, with_kwargs=True))
        if self.family.needs_grid or self.tower is not None:
            _record_video_features(model.model, self)
        if self.tower is not None:  # what a forward's tower recorded is not kept past it
            self.handles.append(model.register_forward_hook(self._forget_encoded, always_call=True))
        stock_generate = model.generate

        @functools.wraps(stock_generate)
        def generate(*args, **kwargs):
            return self._generate(stock_generate, *args, **kwargs)

        model.generate = generate  # on this instance only; detach() takes it away
        model.__dict__["llava_compression"] = self

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.model.model.__dict__.pop("get_video_features", None)
        self.model.__dict__.pop("generate", None)
        self.model.__dict__.pop("llava_compression", None)

    # ---- hooks ---------------------------------------------------------------------------------------------------

    def _forget_encoded(self, module, args, output):
        self.encoded = None

    def _generate(self, stock_generate, *args, **kwargs):
        """``model.generate`` with compression applied: the call gets a cache made for it (dynamic, or static with
        ``cache_implementation="static"``), which the prefill fills with the generation's state; afterwards
        ``last_stats`` says what compression did."""
        if cache_argument(kwargs) is not None:
            raise ValueError(
                "With video-token compression each generate call makes its own cache (it holds the call's state): "
                "leave past_key_values (cache) out (cache_implementation='static' or 'dynamic' chooses its kind)."
            )
        if self.decoder is not None:
            check_generate_arguments(self.decoder, kwargs, self.model.generation_config)
        if kwargs.get("use_cache") is False:
            return stock_generate(*args, **kwargs)
        config = kwargs.get("generation_config") or self.model.generation_config
        implementation = kwargs.pop("cache_implementation", None) or config.cache_implementation
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        prompt = 0 if input_ids is None else input_ids.shape[1]
        budget = new_token_budget(config, kwargs, prompt, counts_prompt=True)
        cache = make_generation_cache(self.model.config, None, implementation, prompt + budget)
        cache.decoded_budget = budget
        self.last_stats = {}
        output = stock_generate(*args, **{CACHE_ARG: cache}, **kwargs)
        state = cache.compression
        if state is not None:
            self.last_stats[self.decoder.stats_key] = state.summary()
        return output

    def _before_model(self, module, args, kwargs):
        """A generation's first forward (its prefill): find the videos and give this generation's cache their
        compaction (a forward outside generate gets a cache of its own; the model returns it)."""
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = cache_argument(kwargs)
        ours = isinstance(cache, (CompressionDynamicCache, CompressionStaticCache))
        if input_ids is None or input_ids.shape[1] == 1 or (ours and getattr(cache, "sequence", None) is not None):
            return None  # a decoding step (or embeddings given directly: nothing to find the videos by)
        if cache is not None and not ours:
            raise NotImplementedError(
                f"With video-token compression, {type(self.model).__name__} runs with the cache it makes for each "
                f"generate call; a {type(cache).__name__} was passed: leave past_key_values (cache) out."
            )
        if cache is not None and _cached_length(cache) != 0:
            return None  # a prompt continued on a filled cache: runs unmodified
        runs = _video_runs(input_ids, self.video_token_id)
        if not runs:
            return None
        grids = self._video_grids(kwargs) if self.family.needs_grid else None
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("video")  # generate encoded the videos already
        tower, self.encoded = getattr(encoded, "llava_tower_attention", None), None  # else this forward encodes them
        if cache is None:
            if self.decoder is not None and kwargs.get("use_cache") is False:
                raise ValueError(f"{self.decoder.name} works on the KV cache: run with use_cache=True")
            cache = CompressionDynamicCache(self.model.config, None)
        cache.sequence = _Sequence(self, _videos(runs, grids, self.family, self.model.config), input_ids.shape)
        cache.sequence.tower = tower
        pop_cache_argument(kwargs)
        kwargs[CACHE_ARG], kwargs["use_cache"] = cache, True
        if args:
            kwargs["input_ids"], args = args[0], args[1:]
        return args, kwargs

    def _video_grids(self, kwargs) -> torch.Tensor:
        grids = kwargs.get("video_grid_thw")
        if grids is None:  # generate encoded the videos before the prefill (transformers >= 5.x): see the wrapper
            video = (kwargs.get("mm_encoder_outputs") or {}).get("video")
            grids = getattr(video, "llava_video_grid_thw", None)
        if grids is None:
            raise ValueError(
                f"{type(self.model).__name__}: the prompt has video tokens but no video_grid_thw reached the model; "
                "pass the processor's video_grid_thw with pixel_values_videos."
            )
        return grids

    def _before_language_model(self, module, args, kwargs):
        cache = cache_argument(kwargs)
        sequence = getattr(cache, "sequence", None)
        if sequence is None:
            return None
        if sequence.phase == PREFILL:
            sequence.compact_prefill(kwargs, cache)
        else:
            sequence.decoding_step(kwargs, cache)
        return args, kwargs


# ---- one generation -------------------------------------------------------------------------------------------------


@dataclass
class _Video:
    """One video of one prompt row: its frames' first columns and the tokens of each frame."""

    row: int
    frame_starts: list[int]
    per_frame: int

    @property
    def frames(self) -> int:
        return len(self.frame_starts)

    @property
    def columns(self) -> list[int]:
        """Its video tokens' columns, frame by frame (the order of the compressor's flattened features)."""
        return [start + j for start in self.frame_starts for j in range(self.per_frame)]


@dataclass
class _Run:
    """A run of consecutive video-placeholder tokens in a row."""

    row: int
    start: int
    length: int


class _Sequence:
    """The compaction of one generation's prompt (lives in its cache as ``cache.sequence``)."""

    def __init__(self, owner: NativeCompression, videos: list[_Video], shape):
        self.owner, self.videos = owner, videos
        self.batch, self.length = shape
        self.phase = PREFILL
        self.valid = self.dropped = self.mask = None
        self.tower = None  # per video, the tower attention (compressors that need it), when generate encoded them
        self.deepstack: _Deepstack | None = None  # Qwen3-VL's features for the layer hooks to add (prefill only)

    def compact_prefill(self, kwargs, cache) -> None:
        """Choose the kept video tokens, then shorten ``inputs_embeds`` and its positions and mask to them."""
        owner, family = self.owner, self.owner.family
        embeds = kwargs["inputs_embeds"]
        padding = _padding_mask(kwargs.get("attention_mask"), self.batch, self.length, embeds.device)
        columns, kept_groups, before, after, merged = self._kept_columns(embeds, padding)
        if merged:  # merging methods: the kept tokens carry their merged values
            embeds = embeds.clone()
            for row, kept_columns, values in merged:
                embeds[row, kept_columns] = values.to(embeds.dtype)
        width = max(len(row) for row in columns)
        index = torch.zeros(self.batch, width, dtype=torch.long, device=embeds.device)
        valid = torch.zeros(self.batch, width, dtype=torch.bool, device=embeds.device)
        groups = torch.full_like(index, -1)
        for row, (cols, kept) in enumerate(zip(columns, kept_groups)):  # right-aligned, like left padding
            index[row, width - len(cols) :] = torch.tensor(cols, device=embeds.device)
            valid[row, width - len(cols) :] = True
            groups[row, width - len(cols) :] = torch.tensor(kept, device=embeds.device)
        video = groups >= 0
        kwargs["inputs_embeds"] = embeds.gather(1, index[..., None].expand(-1, -1, embeds.shape[-1]))
        kwargs["position_ids"] = self._positions(kwargs.get("position_ids"), index, valid)
        kwargs["attention_mask"] = valid.long()
        if kwargs.get("visual_pos_masks") is not None:  # Qwen3-VL's deepstack features follow their tokens
            visual = kwargs["visual_pos_masks"]
            kept_at = torch.zeros_like(visual).scatter_(1, index, valid)
            kwargs["deepstack_visual_embeds"] = [layer[kept_at[visual]] for layer in kwargs["deepstack_visual_embeds"]]
            kwargs["visual_pos_masks"] = visual.gather(1, index) & valid
        self.valid, self.width = valid, width
        self.dropped = (padding.sum(dim=1) - valid.sum(dim=1))[:, None]  # tokens dropped per row
        deltas = getattr(owner.model.model, "rope_deltas", None)
        if family.keep_positions and isinstance(deltas, torch.Tensor):
            # The Qwen models' next position without explicit position ids is (cached tokens + rope_deltas): the
            # cache now holds `dropped` fewer tokens than the prompt. (generate passes positions itself.)
            owner.model.model.rope_deltas = deltas + self.dropped.to(deltas.device)
        capacity = self._decoded_capacity(cache, width)
        self.mask = KeyMask(valid, capacity, BOOL, torch.bool)
        self.step = torch.zeros(1, dtype=torch.long, device=embeds.device)
        owner.last_stats = {
            "compressor": owner.settings.compressor, "videos": len(self.videos),
            "video_tokens_before": before, "video_tokens_after": after,
            # per row: the prompt columns of the kept video tokens, and their positions in the compact cache
            "kept_video_columns": [index[row][video[row]].tolist() for row in range(self.batch)],
            "video_positions": [video[row].nonzero().flatten().tolist() for row in range(self.batch)],
        }
        if owner.decoder is not None:
            cache.attach(owner.decoder.new_state(GenerationInputs(
                prunable=video, attention_mask=valid, decoded_capacity=capacity,
                static_cache=isinstance(cache, StaticCache), num_layers=_text_config(owner.model).num_hidden_layers,
                attn_implementation=owner.model.config._attn_implementation, dtype=embeds.dtype,
                tokens_per_frame=self.videos[0].per_frame if self.videos and owner.video_compressor is None
                and len({video.per_frame for video in self.videos}) == 1 else None,
                video_groups=groups,
            )))
        if cache.compression is not None and kwargs.get("deepstack_visual_embeds") is not None:
            # The decode-time stage may shorten the hidden states between layers, and the text model would index
            # them with the whole prompt's visual_pos_masks: the layer hooks add the features instead (_add_deepstack).
            self.deepstack = _Deepstack(kwargs["visual_pos_masks"], kwargs["deepstack_visual_embeds"])
            kwargs["visual_pos_masks"] = kwargs["deepstack_visual_embeds"] = None
        self.phase = "decode"

    def decoding_step(self, kwargs, cache) -> None:
        """The mask over the compact cache; LLaVA-OneVision's positions shifted by the dropped tokens."""
        self.mask.mark_decoded(self.step)
        self.step.add_(1)
        key_length = cache.layers[0].get_mask_sizes(1)[0]  # a Python int: shapes only
        if key_length > self.mask.capacity:  # a dynamic cache longer than planned
            self.mask.grow(key_length - self.width + _DEFAULT_DECODED_CAPACITY)
        mask = self.mask.view(key_length, all_marked=True)
        kwargs["attention_mask"] = None if mask is None else mask.long()
        positions = kwargs.get("position_ids")
        family = self.owner.family
        if not family.keep_positions and positions is not None:
            kwargs["position_ids"] = positions - self.dropped
        elif family.keep_positions and positions is None and not family.needs_grid:
            # 1-D RoPE without explicit positions (a forward loop outside generate): the uncompressed prompt's next
            # position, as the stock model numbers it (prompt length + steps before this one), not the cache's.
            kwargs["position_ids"] = (self.step - 1 + self.length).expand(self.batch, 1)

    # ---- helpers -------------------------------------------------------------------------------------------------

    def _kept_columns(self, embeds: torch.Tensor, padding: torch.Tensor):
        """Per row: the columns kept, in sequence order, and the quota group of each (``TokenSelection.groups``,
        numbered per row across its videos; -1: not a video token); the video token counts before and after; and
        (row, kept columns, values) of each video whose tokens merge."""
        family, compressor = self.owner.family, self.owner.video_compressor
        columns = [padding[row].nonzero().flatten().tolist() for row in range(self.batch)]
        kept_groups = [[-1] * len(cols) for cols in columns]
        tower = self._tower_attention()
        before = after = 0
        merged = []
        for row in range(self.batch):
            chosen, video_columns, group_of = {}, set(), {}
            for number, video in ((n, video) for n, video in enumerate(self.videos) if video.row == row):
                columns_of_video = video.columns
                features = embeds[row, columns_of_video].reshape(video.frames, video.per_frame, -1)
                kept, groups = columns_of_video, [0] * len(columns_of_video)
                if compressor is not None:
                    scores = {} if tower is None else tower[number].select_inputs()
                    selection = compressor.select(features, **scores)
                    kept = [columns_of_video[i] for i in selection.index.tolist()]
                    groups = selection.groups.tolist() if selection.groups is not None else [0] * len(kept)
                    if selection.values is not None:
                        merged.append((row, kept, selection.kept_features(features)))
                if family.sorted_order:  # each kept token stays where it is
                    chosen.update((column, [column]) for column in kept)
                else:  # the kept tokens, in the selection's order, take the place of the video
                    chosen[columns_of_video[0]] = kept
                video_columns.update(columns_of_video)
                first_group = max(group_of.values(), default=-1) + 1
                group_of.update((column, first_group + group) for column, group in zip(kept, groups))
                before, after = before + len(columns_of_video), after + len(kept)
            row_columns, row_groups = [], []
            for column in columns[row]:
                if column in chosen:
                    row_columns += chosen[column]
                    row_groups += [group_of[kept] for kept in chosen[column]]
                elif column not in video_columns:
                    row_columns.append(column)
                    row_groups.append(-1)
            columns[row], kept_groups[row] = row_columns, row_groups
        return columns, kept_groups, before, after, merged

    def _tower_attention(self):
        """Per video, the tower attention its compressor scores with (None when it needs none)."""
        owner = self.owner
        if owner.tower is None:
            return None
        tower, owner.encoded = self.tower or owner.encoded, None
        if tower is None or len(tower) != len(self.videos):
            raise ValueError(
                f"compressor={owner.settings.compressor!r} needs the vision tower's attention of each video, but "
                f"{0 if tower is None else len(tower)} video(s) of the {len(self.videos)} in the prompt came through "
                f"{type(owner.model).__name__}'s get_video_features with compression applied; pass the pixels "
                "(pixel_values_videos), not precomputed features."
            )
        for video, scores in zip(self.videos, tower):
            if tuple(scores.attention.shape) != (video.frames, video.per_frame):
                raise ValueError(
                    f"the vision tower's attention has shape {tuple(scores.attention.shape)} but the video has "
                    f"{video.frames} frames of {video.per_frame} tokens"
                )
        return tower

    def _positions(self, positions, index: torch.Tensor, valid: torch.Tensor):
        consecutive = (valid.long().cumsum(dim=1) - 1).clamp_min(0)
        family = self.owner.family
        if positions is None and family.keep_positions and not family.needs_grid:
            positions = torch.arange(self.length, device=index.device)[None]  # what the stock model numbers them
        if positions is None or not family.keep_positions:
            return consecutive  # LLaVA-NeXT's sequence: positions follow the compact order
        if positions.ndim == 2:
            return positions.expand(self.batch, -1).gather(1, index).masked_fill(~valid, 0)
        gathered = positions.expand(-1, self.batch, -1).gather(2, index[None].expand(positions.shape[0], -1, -1))
        gathered = gathered.masked_fill(~valid, 0)
        if positions.shape[0] == 4:  # row 0: text positions, only a packing hint for flash attention
            gathered[0] = consecutive
        return gathered

    def _decoded_capacity(self, cache, width: int) -> int:
        if isinstance(cache, StaticCache):
            return _max_cache_len(cache) - width
        return getattr(cache, "decoded_budget", _DEFAULT_DECODED_CAPACITY)


# ---- decoder-layer hooks (the same DecodeState hooks as LlavaQwenDecoderLayer) --------------------------------------


def _before_decoder_layer(module, args, kwargs):
    cache = cache_argument(kwargs)
    state = getattr(cache, "compression", None)
    if state is None:
        return None
    inputs = state.before_layer(module.self_attn.layer_idx, LayerInputs.of_call(args, kwargs), cache)
    return inputs.into_call(args, kwargs)


def _after_decoder_layer(module, args, kwargs, output):
    cache = cache_argument(kwargs)
    state = getattr(cache, "compression", None)
    if state is not None:
        state.after_layer(module, module.self_attn.layer_idx, LayerInputs.of_call(args, kwargs), cache)
    return None


def _add_deepstack(module, args, kwargs, output):
    """After one of Qwen3-VL's first decoder layers: its deepstack features, where the generation's decode-time stage
    says the hidden states hold them (in the prefill; a decoding step finds nothing to add)."""
    cache = cache_argument(kwargs)
    sequence = getattr(cache, "sequence", None)
    deepstack = getattr(sequence, "deepstack", None)
    layer_idx = module.self_attn.layer_idx
    if deepstack is None or layer_idx >= len(deepstack.embeds):
        return None
    output = cache.compression.add_to_output(layer_idx, output, deepstack.features(layer_idx, output))
    if layer_idx == len(deepstack.embeds) - 1:
        sequence.deepstack = None  # the last one: nothing is kept for the decoding steps
    return output


class _Deepstack:
    """Qwen3-VL's deepstack features of one prefill: ``visual_pos_masks`` (B, S) and, per layer, the features of the
    visual positions in order (V, D), as the text model receives them after the compaction before the LM.

    Added by the layer hooks instead of the text model while a decode-time stage runs (the text model would index
    hidden states that the stage shortened with the whole prompt's mask). The rule is the masked full-sequence
    reference's: the stock model, the removed tokens hidden from the later layers, adds layer l's features to every
    visual position after layer l. So every token still in the sequence gets its own feature; a token that others
    merged into (FrameFusion, HoliTom: values averaged into a kept token) is a kept token and gets the kept token's
    own; a merge before layer l + 1 (HoliTom's, before layer K) averages states that already hold layer l's features
    and one inside layer l (FrameFusion's, after its attention) states that do not yet, both as on the full sequence;
    the removed tokens' features would only reach hidden tokens, which nothing reads (the state maps the features to
    its slots: :meth:`llava.compression.decoding.DecodeState.add_to_output`)."""

    def __init__(self, mask: torch.Tensor, embeds: list[torch.Tensor]):
        self.mask, self.embeds = mask, list(embeds)

    def features(self, layer_idx: int, like: torch.Tensor) -> torch.Tensor:
        """(B, S, D): layer ``layer_idx``'s feature at each visual position, zero elsewhere."""
        mask = self.mask.to(like.device)
        features = like.new_zeros(*mask.shape, like.shape[-1])
        features[mask] = self.embeds[layer_idx].to(like.device, like.dtype)
        return features


# ---- model geometry -------------------------------------------------------------------------------------------------


def _record_video_features(vision_model, owner: NativeCompression) -> None:
    """Wrap the model's ``get_video_features`` (on this instance) so that its output carries the videos' grids and,
    for a compressor that needs it, the tower attention (``owner.tower`` records it with hooks that change nothing):
    transformers' generate encodes the videos before the prefill and passes only the features to ``forward``. When
    the forward encodes them itself, ``owner.encoded`` holds the attention until its language model takes it."""
    original = vision_model.get_video_features

    @functools.wraps(original)
    def get_video_features(*args, **kwargs):
        if owner.tower is None:
            output = original(*args, **kwargs)
        else:
            output, owner.encoded = owner.tower(original, args, kwargs)
        grids = kwargs.get("video_grid_thw", args[1] if len(args) > 1 else None)
        if not isinstance(output, (tuple, torch.Tensor)):
            if grids is not None:
                output.llava_video_grid_thw = grids
            output.llava_tower_attention = owner.encoded
        return output

    vision_model.get_video_features = get_video_features


def _video_runs(input_ids: torch.Tensor, video_token_id: int) -> list[_Run]:
    """Each run of video tokens in each row (host reads: once per prefill)."""
    runs = []
    for row, ids in enumerate(input_ids):
        is_video = (ids == video_token_id).tolist()
        column = 0
        while column < len(is_video):
            if is_video[column]:
                end = column
                while end < len(is_video) and is_video[end]:
                    end += 1
                runs.append(_Run(row, column, end - column))
                column = end
            else:
                column += 1
    return runs


def _videos(runs: list[_Run], grids, family: _Family, config) -> list[_Video]:
    """The videos the runs of video tokens hold (Qwen: a frame is one temporal step of the video's grid)."""
    if not family.needs_grid:  # LLaVA-OneVision: frames of a known number of pooled tokens, then one newline
        vision = config.vision_config
        per_frame = math.ceil((vision.image_size // vision.patch_size) / 2) ** 2
        videos = []
        for run in runs:
            frames, rest = divmod(run.length - 1, per_frame)
            if rest or frames < 1:
                raise ValueError(
                    f"A video of {run.length} tokens is not frames x {per_frame} pooled tokens + 1 newline; "
                    "compression expects the processor's video placeholders."
                )
            videos.append(_Video(run.row, [run.start + f * per_frame for f in range(frames)], per_frame))
        return videos
    merge = config.vision_config.spatial_merge_size**2
    videos, queue = [], list(runs)
    for t, h, w in (tuple(int(x) for x in grid) for grid in grids.tolist()):
        per_frame = h * w // merge
        if family.frame_spans:  # Qwen3-VL: one run of tokens per temporal step, with text between them
            steps, queue = queue[:t], queue[t:]
            if len(steps) != t or any(step.length != per_frame for step in steps) or len({s.row for s in steps}) != 1:
                raise ValueError(f"video tokens do not match video_grid_thw {(t, h, w)}: expected {t} runs of {per_frame}")
            videos.append(_Video(steps[0].row, [step.start for step in steps], per_frame))
        else:
            if not queue or queue[0].length != t * per_frame:
                raise ValueError(f"video tokens do not match video_grid_thw {(t, h, w)}: expected {t * per_frame}")
            run = queue.pop(0)
            videos.append(_Video(run.row, [run.start + f * per_frame for f in range(t)], per_frame))
    if queue:
        raise ValueError(f"{len(queue)} run(s) of video tokens have no video_grid_thw entry")
    return videos


def _video_token_id(config) -> int:
    for name in ("video_token_id", "video_token_index"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    raise ValueError(f"{type(config).__name__} names no video token id")


def _text_config(model):
    return model.config.get_text_config(decoder=True)


def _padding_mask(mask, batch: int, length: int, device) -> torch.Tensor:
    """(batch, length) bool: the real tokens of the prefill, from a 2D mask, a 4D mask or a dict of them."""
    if isinstance(mask, dict):
        mask = mask.get("full_attention", next(iter(mask.values())))
    if mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    if mask.ndim == 2:
        return mask[:, -length:].bool()
    last = mask[:, 0, -1, :length]  # the last query sees every real key of its row
    return last if last.dtype == torch.bool else last == 0


def _cached_length(cache) -> int:
    length = cache.get_seq_length()
    return int(length) if isinstance(length, torch.Tensor) else length


def _max_cache_len(cache) -> int:
    return getattr(cache, "max_cache_len", None) or cache.layers[0].max_cache_len
