"""Small process helpers (LLaVA-NeXT's ``rank0_print``)."""

from __future__ import annotations

from typing import Any


def is_rank0() -> bool:
    """True outside distributed runs, else only on global rank 0."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def rank0_print(*args: Any) -> None:
    """``print`` on rank 0 only (every process prints when not distributed)."""
    if is_rank0():
        print(*args)
