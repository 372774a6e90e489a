"""The compression methods, registered by importing their modules (one line each), and what a set of settings
builds: one video compressor before the language model and/or one decode-time compressor in its decoder layers."""

from __future__ import annotations

from dataclasses import dataclass

from llava.compression import dycoke, evs, fastv, vidcom2  # noqa: F401  (each registers its method)
from llava.compression.base import VideoTokenCompressor
from llava.compression.decoding import DecodeCompressor
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
        return cls(settings, stages.video, stages.decoder)
