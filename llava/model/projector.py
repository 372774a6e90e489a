"""The multimodal projector: vision features (mm_hidden_size) -> LM hidden size.

Stored as ``model.mm_projector.{0,2}.*`` for ``mlp2x_gelu``: an ``nn.Sequential`` whose indices are the
checkpoint's key names.
"""

from __future__ import annotations

import re

from torch import nn


def build_vision_projector(projector_type: str, mm_hidden_size: int, hidden_size: int) -> nn.Module:
    if projector_type == "linear":
        return nn.Linear(mm_hidden_size, hidden_size)
    if projector_type == "identity":
        if mm_hidden_size != hidden_size:
            raise ValueError(f"mm_projector_type 'identity' needs mm_hidden_size == hidden_size, got {mm_hidden_size} and {hidden_size}.")
        return nn.Identity()
    match = re.fullmatch(r"mlp(\d+)x_gelu", projector_type)
    if match:
        depth = int(match.group(1))
        layers: list[nn.Module] = [nn.Linear(mm_hidden_size, hidden_size)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(hidden_size, hidden_size)]
        return nn.Sequential(*layers)
    raise ValueError(f"Unknown mm_projector_type {projector_type!r}; supported: 'linear', 'identity', 'mlpNx_gelu' (e.g. 'mlp2x_gelu').")
