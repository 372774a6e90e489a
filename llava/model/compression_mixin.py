"""Video-token compression plugged into the LLaVA model, behind one switch: ``compressor``.

- ``dycoke``: temporal token merging (TTM) on pooled video features before the LM, then dynamic KV-cache
  pruning at every decoding step (a decoder-layer subclass installed into the LM while it is on).
- ``vidcom2``: VidCom2 frame-adaptive token selection before the LM.
- ``fastv``: FastV, the baseline the DyCoke paper compares with: at layer K of the prefill, the video tokens
  least attended by the last prompt token are dropped for all later layers and for decoding.
- ``none``: the baseline.

The arguments are attributes of the model, settable between ``generate`` calls (``model.dycoke_p = 0.5``),
each set re-validated. After ``generate`` the model tells what compression did (``last_compression_stats``)
and logs one info line per call.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from llava.compression.base import TokenSelection
from llava.compression.dycoke_kv import DyCokeKVPruning, install_dycoke_kv_pruning, remove_dycoke_kv_pruning
from llava.compression.fastv import FastVPruning, install_fastv, remove_fastv
from llava.compression.settings import CompressionSettings, settings_from_kwargs
from llava.compression.ttm import TemporalTokenMerging
from llava.compression.vidcom2 import VidCom2

logger = logging.getLogger("llava.compression")


@dataclass
class CompressionTrace:
    """What one ``generate`` call did to its first video (filled inside ``model.compression_trace()``)."""

    compressor: str
    pooled: torch.Tensor | None = None  # (F, N, D) pooled features the compressor saw
    selection: TokenSelection | None = None  # the compressor's choice (None: everything kept)
    selection_recorded: bool = False  # True once the architecture reported the video
    video_positions: torch.Tensor | None = None  # (V,) prompt (= KV cache) positions of the video tokens, row 0
    active_positions: list[torch.Tensor] = field(default_factory=list)  # per decoding step: (K,) positions, row 0
    kv_stats: dict | None = None  # last_compression_stats["kv_pruning"] after the call
    kv_settings: dict = field(default_factory=dict)  # layer L, ratio p, threshold of the KV pruning
    video_token_mask: torch.Tensor | None = None  # (S,) row 0 of the spliced prompt's video-token mask


class CompressionMixin:
    """Mixed into ``LlavaQwenForCausalLM``; uses its ``model`` (the Qwen2 LM) and ``config``."""

    def configure_compression(self, **kwargs) -> CompressionSettings:
        """Change compression arguments (``dycoke=True``, ``compressor="vidcom2"``, ``dycoke_p=0.5`` ...)."""
        current = self.__dict__.get("_compression") or CompressionSettings()
        settings = settings_from_kwargs(kwargs, current).validate(self.config.num_hidden_layers)
        compressor = _build_video_compressor(settings)
        self.__dict__["_compression"] = settings
        self.__dict__["_video_compressor"] = compressor
        language_model = self.get_model()
        # The decoder-layer pieces are exclusive: take both out, then install the one these settings use.
        remove_dycoke_kv_pruning(language_model)
        remove_fastv(language_model)
        pruning = DyCokeKVPruning(settings.dycoke_l, settings.dycoke_p) if settings.dycoke and settings.dycoke_p > 0 else None
        fastv = FastVPruning(settings.fastv_k, settings.fastv_r) if settings.compressor == "fastv" and settings.fastv_r > 0 else None
        if pruning is not None:
            install_dycoke_kv_pruning(language_model, pruning)
        if fastv is not None:
            install_fastv(language_model, fastv)
        self.__dict__["_kv_pruning"] = pruning
        self.__dict__["_fastv"] = fastv
        self.__dict__["_stats"] = _empty_stats(settings)
        return settings

    @property
    def compression(self) -> CompressionSettings:
        return self.__dict__.get("_compression") or self.configure_compression()

    def video_compressor(self):
        self.compression  # noqa: B018 - makes sure the defaults are configured
        return self.__dict__.get("_video_compressor")

    @property
    def last_compression_stats(self) -> dict:
        """What compression did in the last ``generate`` (or forward) call."""
        stats = dict(self.__dict__.get("_stats") or _empty_stats(self.compression))
        pruning = self.__dict__.get("_kv_pruning")
        if pruning is not None:
            stats["kv_pruning"] = pruning.stats
        fastv = self.__dict__.get("_fastv")
        if fastv is not None:
            stats["fastv"] = fastv.stats
        return stats

    @contextmanager
    def compression_trace(self):
        """Record, for the ``generate`` calls inside the block, the first video's pooled features and
        selection, its positions in the prompt and DyCoke's active set at every decoding step (no host
        synchronisation while generating: tensors stay where they are until the block ends)."""
        trace = CompressionTrace(self.compression.compressor)
        pruning = self.__dict__.get("_kv_pruning")
        if pruning is not None:
            trace.kv_settings = {"layer": pruning.layer, "ratio": pruning.ratio, "threshold": pruning.threshold}
            pruning.record_active = True
        self.__dict__["_trace"] = trace
        try:
            yield trace
        finally:
            self.__dict__.pop("_trace", None)
            if pruning is not None:
                pruning.record_active = False
                trace.active_positions = pruning.active_positions(0)
            if trace.video_token_mask is not None:
                trace.video_positions = trace.video_token_mask.nonzero().flatten()
            trace.kv_stats = self.last_compression_stats.get("kv_pruning")

    # -- hooks called by the architecture ----------------------------------------------------------

    def _record_video_compression(self, pooled: torch.Tensor, selection) -> None:
        frames, per_frame = pooled.shape[:2]
        trace = self.__dict__.get("_trace")
        if trace is not None and not trace.selection_recorded:
            trace.pooled, trace.selection, trace.selection_recorded = pooled.detach(), selection, True
        stats = self.__dict__.setdefault("_stats", _empty_stats(self.compression))
        stats["videos"] += 1
        stats["video_tokens_before"] += frames * per_frame
        stats["video_tokens_after"] += frames * per_frame if selection is None else int(selection.index.numel())
        expected = self.compression.dycoke_num_tokens_per_frame
        if self.compression.dycoke and expected is not None and expected != per_frame:
            warnings.warn(
                f"dycoke_num_tokens_per_frame={expected} but the pooled video has {per_frame} tokens per frame; "
                f"using {per_frame} (derived from the input).",
                stacklevel=2,
            )

    def _begin_compression(self, mm) -> None:
        """Called by ``generate`` with the spliced prompt, before prefill."""
        for decoder_side in (self.__dict__.get("_kv_pruning"), self.__dict__.get("_fastv")):
            if decoder_side is not None:
                decoder_side.start(mm.video_token_mask)
        trace = self.__dict__.get("_trace")
        if trace is not None and trace.video_token_mask is None:
            trace.video_token_mask = mm.video_token_mask[0].clone()
        start = self.compression.image_token_start_index
        if self.compression.dycoke and start is not None and bool(mm.video_token_mask.any()):
            first = _first_video_position(mm)
            if first != start:
                warnings.warn(
                    f"image_token_start_index={start} but the video tokens start at {first} in this prompt; "
                    f"using {first} (derived from where the <image> placeholder sits).",
                    stacklevel=2,
                )

    def _reset_compression_stats(self) -> None:
        self.__dict__["_stats"] = _empty_stats(self.compression)

    def _log_compression(self) -> None:
        if self.compression.compressor == "none":
            return
        stats = self.last_compression_stats
        line = (
            f"{self.compression.compressor}: video tokens {stats['video_tokens_before']} -> {stats['video_tokens_after']}"
        )
        kv = stats.get("kv_pruning")
        if kv and kv.get("decode_steps"):
            line += (
                f"; KV pruning over {kv['decode_steps']} decoding steps: active image tokens {kv['active_image_tokens']} "
                f"of {kv['image_tokens']} per row, active set recomputed {kv['recomputations']} times"
            )
        fastv = stats.get("fastv")
        if fastv:
            line += f"; FastV kept {fastv['kept_image_tokens']} of {fastv['image_tokens']} video tokens per row from layer {self.compression.fastv_k}"
        logger.info(line)


def _build_video_compressor(settings: CompressionSettings):
    if settings.compressor == "dycoke" and settings.dycoke_k > 0:
        return TemporalTokenMerging(settings.dycoke_k)
    if settings.compressor == "vidcom2":
        return VidCom2(settings.vidcom2_r)
    return None


def _empty_stats(settings: CompressionSettings) -> dict:
    return {"compressor": settings.compressor, "videos": 0, "video_tokens_before": 0, "video_tokens_after": 0}


def _first_video_position(mm) -> int:
    """Index of the first video token in the first row, counted from the row's first real token."""
    row_mask = mm.video_token_mask[0]
    padding = int((~mm.attention_mask[0]).long().cumprod(0).sum())  # left padding length
    return int(row_mask.long().argmax()) - padding


# Model attributes that read and write the compression settings, e.g. ``model.dycoke_k = 0.5``.
def _setting_property(name: str):
    def getter(self):
        value = getattr(self.compression, name) if name != "dycoke" else self.compression.dycoke
        return value

    def setter(self, value):
        self.configure_compression(**{name: value})

    return property(getter, setter, doc=f"Compression argument ``{name}`` (validated on set).")


for _name in ("dycoke", "compressor", "dycoke_k", "dycoke_l", "dycoke_p", "dycoke_num_tokens_per_frame",
              "image_token_start_index", "vidcom2_r", "fastv_k", "fastv_r"):
    setattr(CompressionMixin, _name, _setting_property(_name))
