"""The compression methods, registered by importing their modules (one line each), and what a set of settings
builds: one video compressor before the language model and/or one decode-time compressor in its decoder layers.
Any method that works before the LM only can be followed by DyCoke's KV pruning (``compressor="evs",
dycoke_p=0.7``: ``settings.kv_pruning``)."""

from __future__ import annotations

from dataclasses import dataclass

from llava.compression import (  # noqa: F401  (each registers its method)
    dycoke,
    evs,
    fastv,
    fastvid,
    flashvid,
    framefusion,
    holitom,
    prunevid,
    vidcom2,
    visionzip,
)
from llava.compression.base import VideoTokenCompressor
from llava.compression.decoding import DecodeCompressor
from llava.compression.dycoke_kv import DyCokeKV
from llava.compression.registry import Stages, method, register
from llava.compression.settings import CompressionSettings

__all__ = ["CompressionSetup"]


@register("none", summary="no compression: the baseline")
def _baseline(settings) -> Stages:
    return Stages()


@dataclass(frozen=True)
class CompressionSetup:
    """The settings and what is built from them (immutable: a new setup replaces the old one whole)."""

    settings: CompressionSettings
    video: VideoTokenCompressor | None
    decoder: DecodeCompressor | None

    @classmethod
    def build(cls, settings: CompressionSettings) -> CompressionSetup:
        stages = method(settings.compressor).build(settings)
        decoder = stages.decoder
        if settings.kv_pruning and settings.dycoke_p > 0:  # a pre-LLM method, then DyCoke's KV pruning
            decoder = DyCokeKV(settings.dycoke_l, settings.dycoke_p, public_quirks=settings.dycoke_public_quirks)
        return cls(settings, stages.video, decoder)
