"""Attention helpers shared by the decoder-layer compressors (:mod:`.dycoke_kv`, :mod:`.fastv`).

They compute what those layers need for ONE query token (the decoding token, or the last prompt token) without
going through a model's attention backend, so they work the same whatever backend the model uses.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from transformers.models.qwen2.modeling_qwen2 import rotate_half

__all__ = [
    "additive_key_mask",
    "describe",
    "key_validity",
    "mean_head_attention",
    "rope",
    "single_query_attention",
    "single_query_attention_with_weights",
    "slots_below",
    "switch_class",
]


def describe(value) -> str:
    """A short description of ``value`` for error messages."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def switch_class(layer: torch.nn.Module, cls: type) -> None:
    """Change ``layer``'s class in place (same module object, weights and hooks)."""
    layer.__class__ = cls
    # accelerate's dispatch hooks (device_map over several devices) call a forward bound when they were attached.
    if hasattr(layer, "_hf_hook") and hasattr(layer, "_old_forward"):
        layer._old_forward = types.MethodType(cls.forward, layer)


def rope(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of (batch, heads, length, head_dim) states, as Qwen2's apply_rotary_pos_emb does it."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return states * cos + rotate_half(states) * sin


def key_validity(attention_mask, batch: int, key_length: int) -> torch.Tensor | None:
    """(batch, key_length) bool: keys the LAST query may attend, from the mask the attention backend was given.

    eager passes a 4D additive float mask, sdpa a 4D bool mask or None, flash attention a 2D padding mask or None.
    None means every key is valid.
    """
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise NotImplementedError(
            f"{type(attention_mask).__name__} attention masks (flex attention) are not supported; use the sdpa, "
            "eager or flash_attention_2 attention implementation"
        )
    if attention_mask.ndim == 2:
        rows = attention_mask[:, -key_length:]
    elif attention_mask.ndim == 4:
        rows = attention_mask[:, 0, -1, :key_length]
    else:
        raise ValueError(f"unexpected attention mask shape {tuple(attention_mask.shape)}")
    if rows.shape[1] != key_length:
        raise ValueError(f"attention mask covers {rows.shape[1]} keys, the cache holds {key_length}")
    if rows.dtype == torch.bool:
        valid = rows
    elif rows.is_floating_point():
        valid = rows > torch.finfo(rows.dtype).min / 2
    else:
        valid = rows != 0
    return valid.expand(batch, -1)


def additive_key_mask(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(batch, key_length) bool -> (batch, 1, 1, key_length) additive mask of ``dtype`` (0 or the dtype's minimum).

    Built once and passed to several :func:`single_query_attention` calls, it spares SDPA a bool-to-float
    conversion per call (and SDPA's CPU kernel runs faster with it than with the bool mask).
    """
    mask = torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill_(~valid, torch.finfo(dtype).min)
    return mask[:, None, None, :]


def _grouped(query: torch.Tensor, key_heads: int) -> torch.Tensor:
    """(batch, heads, 1, head_dim) -> (batch, key_heads, heads // key_heads, head_dim): the query heads that share
    a key/value head become that head's query rows (head h = k * groups + j, as repeat_kv pairs them)."""
    batch, heads, _, head_dim = query.shape
    return query.reshape(batch, key_heads, heads // key_heads, head_dim)


def single_query_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """Attention of one query token: (batch, heads, 1, head_dim) -> (batch, 1, heads * head_dim).

    ``valid`` is None (every key), a (batch, key_length) bool tensor, or an :func:`additive_key_mask`.
    The grouped-query heads run as rows of their key/value head, so K/V are never repeated.
    """
    batch, heads, _, head_dim = query.shape
    mask = valid[:, None, None, :] if valid is not None and valid.dtype == torch.bool else valid
    attended = F.scaled_dot_product_attention(_grouped(query, keys.shape[1]), keys, values, attn_mask=mask, scale=scaling)
    return attended.reshape(batch, 1, heads * head_dim)


def single_query_attention_with_weights(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`single_query_attention` (with ``valid`` None or bool) that also returns its softmax probabilities
    averaged over heads, (batch, key_length) float32.

    The arithmetic is eager attention's (float32 softmax, probabilities cast back to the values' dtype), so the
    keys and values are read once for both results.
    """
    batch, heads, _, head_dim = query.shape
    scores = (torch.matmul(_grouped(query, keys.shape[1]), keys.transpose(2, 3)) * scaling).float()
    if valid is not None:
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probabilities = scores.softmax(dim=-1)
    attended = torch.matmul(probabilities.to(values.dtype), values)
    return attended.reshape(batch, 1, heads * head_dim), probabilities.mean(dim=(1, 2))


def mean_head_attention(
    query: torch.Tensor, keys: torch.Tensor, key_valid: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """Softmax attention of the single query over all keys, averaged over heads: (batch, key_length) float32."""
    scores = (torch.matmul(_grouped(query, keys.shape[1]), keys.transpose(2, 3)) * scaling).float()
    if key_valid is not None:
        scores = scores.masked_fill(~key_valid[:, None, None, :], float("-inf"))
    return scores.softmax(dim=-1).mean(dim=(1, 2))


def slots_below(counts: torch.Tensor, width: int) -> torch.Tensor:
    """(batch, width) bool: slot j of row r is True when j < counts[r]."""
    return torch.arange(width, device=counts.device) < counts[:, None]
