"""Training-free video-token compression: the shared interface, DyCoke TTM, VidCom2, token layout."""

from .base import KeepAll, TokenSelection, VideoTokenCompressor, keep_all
from .layout import NEWLINE_POSITIONS, VideoTokens, assemble_video_tokens, video_token_layout
from .ttm import TemporalTokenMerging
from .vidcom2 import VidCom2

__all__ = [
    "KeepAll",
    "NEWLINE_POSITIONS",
    "TemporalTokenMerging",
    "TokenSelection",
    "VidCom2",
    "VideoTokenCompressor",
    "VideoTokens",
    "assemble_video_tokens",
    "keep_all",
    "video_token_layout",
]
