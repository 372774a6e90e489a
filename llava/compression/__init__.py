"""Training-free video-token compression.

Before the language model (on one video's pooled features): :class:`TemporalTokenMerging` (DyCoke's TTM) and
:class:`VidCom2`, behind :class:`VideoTokenCompressor`, laid out by :func:`assemble_video_tokens`.
While decoding (in the decoder layers, with per-generation state in the cache): :class:`DyCokeKV` (DyCoke's
dynamic KV pruning) and :class:`FastV`, behind :class:`DecodeCompressor`. Settings: :mod:`.settings`.
On transformers' own video LLMs (LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL): :func:`apply_compression`.
"""

from .base import KeepAll, TokenSelection, VideoTokenCompressor, keep_all
from .decoding import (
    CompressionDynamicCache,
    CompressionStaticCache,
    DecodeCompressor,
    DecodeState,
    GenerationInputs,
    make_generation_cache,
)
from .dycoke_kv import DyCokeKV
from .fastv import FastV
from .layout import NEWLINE_POSITIONS, VideoTokens, assemble_video_tokens, video_token_layout
from .native import NativeCompression, apply_compression, compressed, remove_compression
from .settings import CompressionSettings, check_setting, settings_from_kwargs
from .ttm import TemporalTokenMerging
from .vidcom2 import VidCom2

__all__ = [
    "CompressionDynamicCache",
    "CompressionSettings",
    "CompressionStaticCache",
    "DecodeCompressor",
    "DecodeState",
    "DyCokeKV",
    "FastV",
    "GenerationInputs",
    "KeepAll",
    "NativeCompression",
    "NEWLINE_POSITIONS",
    "TemporalTokenMerging",
    "TokenSelection",
    "VidCom2",
    "VideoTokenCompressor",
    "VideoTokens",
    "apply_compression",
    "assemble_video_tokens",
    "check_setting",
    "compressed",
    "keep_all",
    "make_generation_cache",
    "remove_compression",
    "settings_from_kwargs",
    "video_token_layout",
]
