"""Attention masks for the layers whose keys a decode-time compressor changes, in the model's backend format.

A layer pruned by DyCoke or FastV attends over other keys than the model's mask describes (a compact copy, a
shorter cache), so it gets its own mask. transformers' backends take the mask in two shapes: ``eager`` and
``sdpa`` an additive float mask (batch, 1, queries, keys) (0 = attend, the dtype's minimum = hidden), the flash
backends a 2D padding mask (batch, keys). ``None`` means every key is valid (and, for several queries, causal).

:class:`KeyMask` is the mask of the decoding steps, allocated once per generation and updated in place (a static
address, as compiled decoding with CUDA graphs needs), so a decoding step builds no mask.
"""

from __future__ import annotations

import torch

__all__ = ["KeyMask", "causal_prefill_mask", "mask_kind"]

ADDITIVE, PADDING, BOOL = "additive", "padding", "bool"


def mask_kind(implementation: str) -> str:
    """The mask format of a transformers attention implementation (``config._attn_implementation``)."""
    if implementation in ("eager", "sdpa"):
        return ADDITIVE
    if "flash_attention" in implementation:
        return PADDING
    raise NotImplementedError(
        f"attn_implementation={implementation!r} is not supported by DyCoke KV pruning or FastV; use 'sdpa', "
        "'eager' or 'flash_attention_2'"
    )


class KeyMask:
    """Which keys the decoding query may attend, for keys laid out as [prefix | decoded tokens].

    The prefix part (``prefix_valid``, (batch, X) bool) is fixed per generation (or replaced in place with
    :meth:`set_prefix`); decoded slots start hidden and each decoding step marks its own with :meth:`mark_decoded`.
    ``kind`` is :func:`mask_kind`'s, or ``"bool"`` for a plain (batch, keys) bool validity.
    """

    def __init__(self, prefix_valid: torch.Tensor, decoded_capacity: int, kind: str, dtype: torch.dtype):
        self.kind, self.prefix_length = kind, prefix_valid.shape[1]
        if kind == ADDITIVE:
            self.valid_value, self.hidden_value = 0.0, torch.finfo(dtype).min
            self.values = torch.full(
                (prefix_valid.shape[0], self.prefix_length + decoded_capacity), self.hidden_value, dtype=dtype,
                device=prefix_valid.device,
            )
        else:
            self.valid_value, self.hidden_value = True, False
            self.values = prefix_valid.new_zeros(prefix_valid.shape[0], self.prefix_length + decoded_capacity)
        self.set_prefix(prefix_valid)
        # Whether a view of filled slots only can be None (every key valid): read once, when the mask is made.
        self.prefix_all_valid = bool(prefix_valid.all())
        self.fixed_prefix = True

    @property
    def capacity(self) -> int:
        return self.values.shape[1]

    def set_prefix(self, valid: torch.Tensor) -> None:
        """Replace the prefix validity in place (``valid``: (batch, X) bool)."""
        prefix = self.values[:, : self.prefix_length]
        if self.kind == ADDITIVE:  # in place, in the mask's dtype (a float64 minimum does not fit a float32 where)
            prefix.fill_(self.hidden_value).masked_fill_(valid, self.valid_value)
        else:
            prefix.copy_(valid)

    def allow_changes(self) -> None:
        """The prefix will change between steps: never answer 'every key valid' with None."""
        self.fixed_prefix = False

    def mark_decoded(self, step: torch.Tensor) -> None:
        """Decoded slot ``step`` ((1,) long tensor, counted from 0) becomes valid."""
        self.values.index_fill_(1, step + self.prefix_length, self.valid_value)

    def grow(self, decoded_capacity: int) -> None:
        """Room for at least ``decoded_capacity`` decoded tokens (eager decoding with a dynamic cache only)."""
        if self.prefix_length + decoded_capacity <= self.capacity:
            return
        grown = self.values.new_full((self.values.shape[0], self.prefix_length + decoded_capacity), self.hidden_value)
        grown[:, : self.capacity] = self.values
        self.values = grown

    def view(self, key_length: int, all_marked: bool) -> torch.Tensor | None:
        """The mask over the first ``key_length`` keys, in the backend format. ``all_marked``: every decoded slot
        below ``key_length`` has been marked (a dynamic cache's length), so a fully valid mask is None."""
        if all_marked and self.fixed_prefix and self.prefix_all_valid:
            return None
        values = self.values[:, :key_length]
        return values[:, None, None, :] if self.kind == ADDITIVE else values


def causal_prefill_mask(valid: torch.Tensor, key_length: int, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """The mask of a prefill over ``valid.shape[1]`` queries whose keys are the same tokens, at cache slots
    [0, W): causal, hiding invalid slots (``valid``: (batch, W) bool) and every key slot >= W.

    A query slot that is itself invalid attends to itself only, so no row is fully hidden (no NaN)."""
    batch, width = valid.shape
    device = valid.device
    keys = torch.arange(key_length, device=device)
    causal = keys[None, :] <= torch.arange(width, device=device)[:, None]  # (W, key_length)
    key_valid = torch.zeros(batch, key_length, dtype=torch.bool, device=device)
    key_valid[:, :width] = valid
    if kind == PADDING:
        return key_valid
    allowed = (causal & key_valid[:, None, :]) | (keys[None, :] == torch.arange(width, device=device)[:, None])
    additive = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
    return additive[:, None]
