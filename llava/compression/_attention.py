"""Attention arithmetic the decode-time compressors need besides the model's own attention.

DyCoke's decision and FastV's ranking read the softmax attention of ONE query (the decoding token, or the last
prompt token) over a layer's cached keys, averaged over heads. The model's attention backend (sdpa, flash) does not
return probabilities, so they are computed here for that single query: one query projection and one pass over the
layer's keys, whatever backend the model uses.
"""

from __future__ import annotations

import torch
from transformers.models.qwen2.modeling_qwen2 import rotate_half

__all__ = ["describe", "layer_query", "mean_head_attention", "rope", "slots_below"]


def describe(value) -> str:
    """A short description of ``value`` for error messages."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def rope(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of (batch, heads, length, head_dim) states, as Qwen2's apply_rotary_pos_emb does it."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return states * cos + rotate_half(states) * sin


def layer_query(decoder_layer, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotated query (batch, heads, length, head_dim) that ``decoder_layer`` computes from its input
    ``hidden_states`` (batch, length, hidden): the same modules the layer's own attention runs (Qwen2 and the Qwen
    VL text models: input norm, q_proj, Qwen3's per-head q_norm, rotary embedding)."""
    attention = decoder_layer.self_attn
    normed = decoder_layer.input_layernorm(hidden_states)
    query = attention.q_proj(normed).view(*hidden_states.shape[:2], -1, attention.head_dim)
    if getattr(attention, "q_norm", None) is not None:
        query = attention.q_norm(query)
    if cos.ndim == 4:  # transformers 5.4's multimodal tables (3, batch, length, head_dim): one section per axis
        sections = attention.config.rope_parameters["mrope_section"] * 2
        cos, sin = (torch.cat([part[i % 3] for i, part in enumerate(t.split(sections, dim=-1))], dim=-1) for t in (cos, sin))
    return rope(query.transpose(1, 2), cos, sin)


def mean_head_attention(
    query: torch.Tensor, keys: torch.Tensor, key_valid: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """Softmax attention of a single query over ``keys``, averaged over heads: (batch, key_length) float32.

    ``query`` (batch, heads, 1, head_dim); ``keys`` (batch, key_heads, key_length, head_dim), shared by groups of
    query heads as in grouped-query attention (never repeated here); ``key_valid`` (batch, key_length) bool or None.
    The arithmetic is eager attention's: scores in the keys' dtype, softmax in float32.
    """
    batch, heads, _, head_dim = query.shape
    grouped = query.reshape(batch, keys.shape[1], heads // keys.shape[1], head_dim)  # head h = k * groups + j
    scores = (torch.matmul(grouped, keys.transpose(2, 3)) * scaling).float()
    if key_valid is not None:
        scores = scores.masked_fill(~key_valid[:, None, None, :], float("-inf"))
    return scores.softmax(dim=-1).mean(dim=(1, 2))


def slots_below(counts: torch.Tensor, width: int) -> torch.Tensor:
    """(batch, width) bool: slot j of row r is True when j < counts[r]."""
    return torch.arange(width, device=counts.device) < counts[:, None]
