"""Video-token compression plugged into the LLaVA model, behind one switch: ``compressor``.

- ``dycoke``: temporal token merging (TTM) on pooled video features before the LM, then DyCoke's dynamic KV-cache
  pruning at every decoding step;
- ``vidcom2``: VidCom2 frame-adaptive token selection before the LM;
- ``fastv``: FastV, the baseline the DyCoke paper compares with: at layer K of the prefill, the video tokens least
  attended by the last prompt token are dropped for all later layers and for decoding;
- ``none``: the baseline.

``keep_positions=True`` (any pre-LLM method) keeps each kept video token at its uncompressed position instead of
packing the kept tokens together (see :meth:`CompressionMixin.keep_video_positions`).

The arguments are attributes of the model, settable between ``generate`` calls (``model.dycoke_p = 0.5``): a
change is validated and everything it needs is built before anything changes, so a rejected value leaves the model
as it was. The model holds only the settings and the method objects built from them (immutable); what one
``generate`` call needs lives in that call's cache (see :mod:`llava.compression.decoding`). After the call the model
keeps a plain summary of what compression did (``last_compression_stats``, ``compression_summary()``).
"""

from __future__ import annotations

import copy
import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from llava.compression.base import TokenSelection, VideoTokenCompressor
from llava.compression.decoding import (
    DecodeCompressor,
    GenerationInputs,
    check_generate_arguments,
    make_generation_cache,
    new_token_budget,
)
from llava.compression.dycoke_kv import DyCokeKV
from llava.compression.methods import CompressionSetup
from llava.compression.settings import (
    CompressionSettings,
    check_setting,
    layer_arguments,
    setting_names,
    settings_from_kwargs,
)

logger = logging.getLogger("llava.compression")


@dataclass
class CompressionTrace:
    """What one ``generate`` call did to its first video (filled inside ``model.compression_trace()``)."""

    compressor: str
    pooled: torch.Tensor | None = None  # (F, N, D) pooled features the compressor saw
    selection: TokenSelection | None = None  # the compressor's choice (None: everything kept)
    selection_recorded: bool = False  # True once the model reported the video
    video_positions: torch.Tensor | None = None  # (V,) prompt (= KV cache) positions of the video tokens, row 0
    active_positions: list[torch.Tensor] = field(default_factory=list)  # per decoding step: (K,) positions, row 0
    kv_stats: dict | None = None  # last_compression_stats["kv_pruning"] after the call
    kv_settings: dict = field(default_factory=dict)  # layer L, ratio p, threshold of the KV pruning


class CompressionMixin:
    """Mixed into ``LlavaQwenForCausalLM``; uses its ``config`` and ``generation_config``."""

    # ---- settings ------------------------------------------------------------------------------------------------

    def configure_compression(self, **kwargs) -> CompressionSettings:
        """Change compression arguments (``dycoke=True``, ``compressor="vidcom2"``, ``dycoke_p=0.5`` ...)."""
        return self.set_compression(settings_from_kwargs(kwargs, self.compression, self.config.num_hidden_layers))

    def set_compression(self, settings: CompressionSettings) -> CompressionSettings:
        """Use ``settings`` (from :func:`~llava.compression.settings.settings_from_kwargs`): everything is built
        and checked before the model changes, so a rejected setting leaves it as it was."""
        for name in layer_arguments(settings):  # settings made without this model's layer count
            check_setting(name, getattr(settings, name), self.config.num_hidden_layers)
        setup = CompressionSetup.build(settings)
        if setup.video is not None and setup.video.needs_pooling_head:  # read once now: a missing head fails here
            from llava.model.pooling_head import load_pooling_head

            load_pooling_head(self)
        self.__dict__["_compression_setup"] = setup
        return settings

    def reset_compression(self) -> CompressionSettings:
        """Back to the defaults: no compression, every method's arguments at their default values."""
        return self.set_compression(CompressionSettings())

    @property
    def _setup(self) -> CompressionSetup:
        setup = self.__dict__.get("_compression_setup")
        if setup is None:
            setup = self.__dict__["_compression_setup"] = CompressionSetup.build(CompressionSettings())
        return setup

    @property
    def compression(self) -> CompressionSettings:
        return self._setup.settings

    def video_compressor(self) -> VideoTokenCompressor | None:
        return self._setup.video

    def keep_video_positions(self) -> bool:
        """``keep_positions``: the video tokens the pre-LLM method keeps stay at their uncompressed positions (and in
        their original order); the text after a video and decoding continue at the uncompressed length. Nothing
        changes without a pre-LLM method (``none``, ``fastv``, DyCoke with ``dycoke_k=0``)."""
        return self.compression.keep_positions and self._setup.video is not None

    @property
    def decode_compressor(self) -> DecodeCompressor | None:
        """DyCoke's KV pruning or FastV, as configured (None: decoding runs unmodified)."""
        return self._setup.decoder

    # ---- what the last call did ----------------------------------------------------------------------------------

    @property
    def last_compression_stats(self) -> dict:
        """What compression did in the last ``generate`` (or multimodal forward) call: plain Python values."""
        stats = self.__dict__.get("_last_compression_stats") or _video_stats(self.compression, [])
        return copy.deepcopy(stats)

    def compression_summary(self) -> str:
        """One line saying what compression did in the last call (what the info log prints)."""
        stats = self.last_compression_stats
        line = f"{stats['compressor']}: video tokens {stats['video_tokens_before']} -> {stats['video_tokens_after']}"
        kv = stats.get("kv_pruning")
        if kv and kv.get("decode_steps"):
            line += (
                f"; KV pruning over {kv['decode_steps']} decoding steps: active video tokens "
                f"{kv['active_image_tokens']} of {kv['image_tokens']} per row, active set recomputed "
                f"{kv['recomputations']} times"
            )
        fastv = stats.get("fastv")
        if fastv and fastv.get("pruned"):
            line += (
                f"; FastV kept {fastv['kept_image_tokens']} of {fastv['image_tokens']} video tokens per row from "
                f"layer {fastv['layer']}"
            )
        return line

    @contextmanager
    def compression_trace(self):
        """Record, for the ``generate`` calls inside the block, the first video's pooled features and selection,
        its positions in the prompt and DyCoke's active set at every decoding step (kept on the device while
        generating: no host synchronisation is added)."""
        trace = CompressionTrace(self.compression.compressor)
        decoder = self.decode_compressor
        if isinstance(decoder, DyCokeKV):
            trace.kv_settings = {"layer": decoder.layer, "ratio": decoder.ratio, "threshold": decoder.threshold}
        self.__dict__["_trace"] = trace
        try:
            yield trace
        finally:
            self.__dict__.pop("_trace", None)

    # ---- called by the architecture and by generate --------------------------------------------------------------

    def _multimodal_inputs_built(self, mm) -> None:
        """Every spliced prompt: the video statistics of this call, the trace's first video, compatibility checks."""
        self.__dict__["_last_compression_stats"] = _video_stats(self.compression, mm.videos)
        trace = self.__dict__.get("_trace")
        if trace is not None and not trace.selection_recorded and mm.videos:
            trace.pooled, trace.selection, trace.selection_recorded = mm.videos[0].pooled, mm.videos[0].selection, True
            trace.video_positions = mm.video_token_mask[0].nonzero().flatten()
        self._check_compatibility_arguments(mm)

    def _generation_cache(self, mm, generate_kwargs: dict):
        """The cache of a ``generate`` call that decode-time compression needs, holding that call's state
        (None: generate builds its own cache). Pops the cache arguments it handles from ``generate_kwargs``."""
        decoder = self.decode_compressor
        if decoder is None:
            return None
        check_generate_arguments(decoder, generate_kwargs, self.generation_config)
        implementation = generate_kwargs.pop("cache_implementation", None) or self.generation_config.cache_implementation
        prefill_length = mm.inputs_embeds.shape[1]
        new_tokens = new_token_budget(self.generation_config, generate_kwargs, prefill_length)
        inputs = GenerationInputs(
            prunable=mm.video_token_mask,
            attention_mask=mm.attention_mask,
            decoded_capacity=new_tokens,
            static_cache=implementation == "static",
            num_layers=self.config.num_hidden_layers,
            attn_implementation=self.config._attn_implementation,
            dtype=mm.inputs_embeds.dtype,
            record=self.__dict__.get("_trace") is not None,
            tokens_per_frame=mm.videos[0].pooled.shape[1] if mm.videos and all(
                video.selection is None for video in mm.videos) else None,
            video_groups=mm.video_groups,
        )
        state = decoder.new_state(inputs)
        if state is None:
            return None
        return make_generation_cache(self.config, state, implementation, prefill_length + new_tokens)

    def _generation_done(self, cache) -> None:
        """After ``generate``: the decode-time statistics, the trace's active sets, one info log line."""
        state = getattr(cache, "compression", None)
        stats = self.__dict__.get("_last_compression_stats") or _video_stats(self.compression, [])
        decoder = self.decode_compressor
        if decoder is not None:
            key = decoder.stats_key
            stats[key] = state.summary() if state is not None else decoder.unmodified_summary()
            trace = self.__dict__.get("_trace")
            if trace is not None and isinstance(decoder, DyCokeKV):
                trace.kv_stats = stats[key]
                if state is not None and not trace.active_positions:
                    trace.active_positions = state.active_positions(0)
        self.__dict__["_last_compression_stats"] = stats
        if self.compression.compressor != "none":
            logger.info(self.compression_summary())

    def _check_compatibility_arguments(self, mm) -> None:
        """``dycoke_num_tokens_per_frame`` and ``image_token_start_index`` are derived from the input; a given value
        that disagrees is warned about, never used."""
        settings = self.compression
        if not settings.dycoke:
            return
        expected = settings.dycoke_num_tokens_per_frame
        for video in mm.videos:
            per_frame = video.pooled.shape[1]
            if expected is not None and expected != per_frame:
                warnings.warn(
                    f"dycoke_num_tokens_per_frame={expected} but the pooled video has {per_frame} tokens per frame; "
                    f"using {per_frame} (derived from the input).",
                    stacklevel=4,
                )
        start = settings.image_token_start_index
        if start is not None and mm.videos:
            first = _first_video_position(mm)
            if first is not None and first != start:
                warnings.warn(
                    f"image_token_start_index={start} but the video tokens start at {first} in this prompt; "
                    f"using {first} (derived from where the <image> placeholder sits).",
                    stacklevel=4,
                )


def _video_stats(settings: CompressionSettings, videos) -> dict:
    return {
        "compressor": settings.compressor,
        "videos": len(videos),
        "video_tokens_before": sum(video.tokens_before for video in videos),
        "video_tokens_after": sum(video.tokens_after for video in videos),
    }


def _first_video_position(mm) -> int | None:
    """Index of the first video token in the first row, counted from the row's first real token."""
    row_mask = mm.video_token_mask[0]
    if not bool(row_mask.any()):
        return None
    padding = int((~mm.attention_mask[0]).long().cumprod(0).sum())  # left padding length
    return int(row_mask.long().argmax()) - padding


# Model attributes that read and write the compression settings, e.g. ``model.dycoke_k = 0.5``.
def _setting_property(name: str):
    def getter(self):
        return getattr(self.compression, name)

    def setter(self, value):
        self.configure_compression(**{name: value})

    return property(getter, setter, doc=f"Compression argument ``{name}`` (validated on set).")


for _name in setting_names():
    setattr(CompressionMixin, _name, _setting_property(_name))
