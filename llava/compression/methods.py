"""The compression methods that a set of settings selects: one video compressor before the language model
(TTM, VidCom2) and one decode-time compressor in its decoder layers (DyCoke's KV pruning, FastV)."""

from __future__ import annotations

from dataclasses import dataclass

from llava.compression.base import VideoTokenCompressor
from llava.compression.decoding import DecodeCompressor
from llava.compression.dycoke_kv import DyCokeKV
from llava.compression.fastv import FastV
from llava.compression.settings import CompressionSettings
from llava.compression.ttm import TemporalTokenMerging
from llava.compression.vidcom2 import VidCom2

__all__ = ["CompressionSetup"]


@dataclass(frozen=True)
class CompressionSetup:
    """The settings and what is built from them (immutable: a new setup replaces the old one whole)."""

    settings: CompressionSettings
    video: VideoTokenCompressor | None
    decoder: DecodeCompressor | None

    @classmethod
    def build(cls, settings: CompressionSettings) -> CompressionSetup:
        video = decoder = None
        if settings.compressor == "dycoke":
            video = TemporalTokenMerging(settings.dycoke_k) if settings.dycoke_k > 0 else None
            if settings.dycoke_p > 0:
                decoder = DyCokeKV(settings.dycoke_l, settings.dycoke_p, public_quirks=settings.dycoke_public_quirks)
        elif settings.compressor == "vidcom2":
            video = VidCom2(settings.vidcom2_r)
        elif settings.compressor == "fastv" and settings.fastv_r > 0:
            decoder = FastV(settings.fastv_k, settings.fastv_r)
        return cls(settings, video, decoder)
