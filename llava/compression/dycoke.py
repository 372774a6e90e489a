"""DyCoke (CVPR 2025) as one method: temporal token merging before the language model (:mod:`.ttm`), then dynamic
KV-cache pruning at every decoding step (:mod:`.dycoke_kv`). ``dycoke_k = 0`` turns merging off and
``dycoke_p = 0`` pruning; with both 0 the output is the baseline's, token for token."""

from __future__ import annotations

from .dycoke_kv import DyCokeKV
from .registry import Argument, Stages, register
from .ttm import TemporalTokenMerging


@register(
    "dycoke",
    Argument("dycoke_k", 0.7, "[0, 1)", "share of video tokens temporal merging removes; 0 turns merging off"),
    Argument("dycoke_l", 3, "layer", "KV pruning is decided at layer L-1 and applied from layer L on"),
    Argument("dycoke_p", 0.7, "[0, 1)",
             "share of the video tokens' keys/values left out of attention at each decoding step; 0 turns pruning off"),
    Argument("dycoke_num_tokens_per_frame", None, "[0, inf)",
             "accepted for compatibility; derived from the input (a disagreeing value is warned about)",
             integer=True, optional=True, option=False),
    Argument("image_token_start_index", None, "[0, inf)",
             "accepted for compatibility; derived from where the image placeholder sits in the prompt", integer=True,
             optional=True, option=False),
    Argument("dycoke_public_quirks", False, "flag",
             "decode exactly as the public DyCoke code does (its two differences, see the README's notes on fidelity)"),
    summary="DyCoke: temporal token merging before the LM, then dynamic KV-cache pruning while decoding",
    examples=({"dycoke_k": 0.5, "dycoke_l": 2, "dycoke_p": 0.5}, {"dycoke_k": 0.9, "dycoke_l": 1, "dycoke_p": 0.9}),
    aliases={"dycoke_num_image_per_frame": "dycoke_num_tokens_per_frame"},  # the DyCoke README's name
)
def build(settings) -> Stages:
    video = TemporalTokenMerging(settings.dycoke_k) if settings.dycoke_k > 0 else None
    decoder = None
    if settings.dycoke_p > 0:
        decoder = DyCokeKV(settings.dycoke_l, settings.dycoke_p, public_quirks=settings.dycoke_public_quirks)
    return Stages(video, decoder)
