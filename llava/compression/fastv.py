"""FastV ("An Image is Worth 1/2 Tokens After Layer 2") for a transformers 5 ``Qwen2Model``, with real token dropping.

Rule (as in the public FastV code, ``pkunlp-icler/FastV``, whose KV-cache ``fastv_forward`` this follows):

- During the PREFILL, the attention of layer K-1 (``layer_outputs[1]`` of the previous layer in the public code,
  i.e. softmax probabilities, not logits) is averaged over heads (``torch.mean(attn, dim=1)``) and its row of the
  LAST prompt token is read at the image positions.
- The ``round(n_img * (1 - R))`` image tokens with the highest attention are kept (``topk(round(len * (1 - r)))``
  in the public code: Python's round, so ties at .5 go to the even number); the others are dropped.
- Layers >= K process only the kept tokens, at their ORIGINAL positions (the public code sets
  ``position_ids = keep_indexs``), with a causal mask over the compact sequence; their KV cache holds only the kept
  tokens, so decoding attends over the shorter cache. Layers < K keep everything.

Differences from the public code, all of them generalisations: each row of a batch has its own image positions
and kept set (the public code reads row 0 and a fixed image span), left padding is handled, the attention of layer
K-1 is computed for the single last query by this module (q . K^T over that layer's keys), never by turning on
``output_attentions`` / eager attention, so every attention backend works; the last prompt token is never
prunable (generate reads its logits).

How it runs: layers K-1.. of ``model.layers`` are switched in place to :class:`FastVDecoderLayer` (same module
objects, same weights), the way :mod:`llava.compression.dycoke_kv` does it.

- Layer K-1 runs unchanged through the model's own attention backend; at a pruned prefill it then computes the last
  query's head-averaged attention and the kept set of every row, and lays out the compact sequence: per row the kept
  positions in their original order, right-aligned (rows that keep fewer tokens get invalid slots at the FRONT, so
  the last prompt token is the last slot of every row).
- Layer K gathers the hidden states (and the RoPE cos/sin) at the kept positions; layers >= K run their own
  attention over the compact sequence with torch's ``scaled_dot_product_attention``: ``is_causal`` when no row
  has an invalid slot (batch 1, or rows with equal counts and no padding), otherwise an explicit causal + validity
  mask. Their K/V (original RoPE positions) go into the model's ``DynamicCache`` as usual, so those cache layers
  are shorter than layers < K.
- At a decoding step the model builds its mask (and ``cache_position``) for layer 0's, i.e. the full, cache
  length. Layer K-1 turns it into the key validity of the compact cache ([kept prefill slots | decoded tokens]), and
  layers >= K attend over their cache with a single-query SDPA (no backend-specific mask format involved).

What ``forward()`` returns with FastV on: the prefill's ``last_hidden_state`` / ``logits`` cover the COMPACT
sequence, shape (batch, W, ...) with W = max over rows of (prefill length - dropped image tokens); slot j of row r
is prefill position ``stats["compact_positions"][r][j]`` (invalid slots, at the front of rows that keep fewer
tokens, hold garbage). The last slot is always the last prompt token, so ``logits[:, -1]`` (what ``generate``
reads, with or without ``logits_to_keep``) is exact. Decoding forwards return (batch, 1, ...) as usual. ``labels``
/ a loss over the prefill would not line up with the compact logits: FastV is an inference method.

Limits: ``generate`` must keep its cache (``use_cache=True``, the default; without a cache only the first forward
would be pruned), a ``DynamicCache`` (full attention), one token per decoding forward (no assisted / speculative
decoding, no chunked prefill), no beam search. Layers >= K record no attention weights (``output_attentions``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicLayer
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

from llava.compression._attention import (
    describe,
    key_validity,
    mean_head_attention,
    rope,
    single_query_attention,
    slots_below,
    switch_class,
)
from llava.compression.dycoke_kv import DyCokeDecoderLayer

__all__ = ["FastVDecoderLayer", "FastVPruning", "install_fastv", "remove_fastv"]


class FastVPruning:
    """Configuration, per-generate state and statistics of FastV.

    ``layer`` is FastV's K (``fastv_k``): the kept set is decided from layer K-1's attention and layers >= K run on the
    kept tokens only. ``ratio`` is R (``fastv_r``), the fraction of image tokens dropped (0 disables FastV).
    Call :meth:`start` with the image-token mask of the prefill before each generation.
    """

    def __init__(self, layer: int, ratio: float):
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ValueError(f"FastV layer must be an int (FastV's K, >= 1), got {layer!r}")
        if layer < 1:
            raise ValueError(f"FastV layer must be >= 1 (the kept set comes from layer K-1's attention), got {layer}")
        if (
            isinstance(ratio, bool)
            or not isinstance(ratio, (int, float))
            or not math.isfinite(ratio)
            or not 0.0 <= ratio < 1.0
        ):
            raise ValueError(f"FastV ratio must be a number in [0, 1), got {ratio!r}")
        self.layer = layer
        self.ratio = float(ratio)
        self._pending: _Layout | None = None  # set by start(), bound to the next prefill
        self._sequence: _Sequence | None = None  # the sequence being run with FastV
        self._image_tokens: list[int] = []
        self._kept_image_tokens: list[int] = []
        self._pruned: _Sequence | None = None  # the last pruned prefill of the generation started by start()

    def __repr__(self) -> str:
        return f"FastVPruning(layer={self.layer}, ratio={self.ratio})"

    def start(self, prunable_mask: torch.Tensor) -> None:
        """Arm FastV for the next generation and reset state and statistics.

        ``prunable_mask`` is a (batch, prefill_length) bool tensor, True at the image-token positions of the prefill
        (padding already applied). The next prefill forward must have exactly that shape. The last position (the
        last prompt token, whose attention ranks the image tokens) is never dropped. A mask without True, a ratio of
        0, or a ratio too small to drop any token leaves the next generation unmodified.
        """
        if not isinstance(prunable_mask, torch.Tensor) or prunable_mask.dtype != torch.bool:
            raise TypeError(f"prunable_mask must be a torch.bool tensor, got {describe(prunable_mask)}")
        if prunable_mask.ndim != 2 or prunable_mask.shape[1] < 1:
            raise ValueError(
                f"prunable_mask must have shape (batch, prefill_length), got {tuple(prunable_mask.shape)}"
            )
        layout = _Layout.from_mask(prunable_mask, self.ratio)
        self._image_tokens = layout.image_counts
        self._kept_image_tokens = layout.keep_counts
        self._pending = layout if layout.drops_any else None
        self._sequence = self._pruned = None

    @property
    def stats(self) -> dict:
        """Statistics of the generation started by the last :meth:`start` (converted from device tensors here).

        ``image_tokens`` and ``kept_image_tokens`` are per row; ``pruned`` says whether a prefill actually ran with
        tokens dropped; ``prefill_tokens`` is the prefill length, ``compact_tokens`` the length W of the sequence
        layers >= K processed (0 when not pruned); ``kept_image_positions`` lists, per row, the prefill positions of
        the kept image tokens, and ``compact_positions`` the prefill position of every compact slot (-1 for the
        invalid slots at the front of rows that keep fewer tokens); ``decode_steps`` counts the decoding steps run
        on the compact cache.
        """
        pruned = self._pruned
        rows = len(self._image_tokens)
        if pruned is None:
            return {
                "image_tokens": list(self._image_tokens),
                "kept_image_tokens": list(self._image_tokens),  # nothing was dropped
                "pruned": False,
                "prefill_tokens": 0,
                "compact_tokens": 0,
                "kept_image_positions": [[] for _ in range(rows)],
                "compact_positions": [[] for _ in range(rows)],
                "decode_steps": 0,
            }
        kept = pruned.kept_image.cpu()
        positions = pruned.index.masked_fill(~pruned.layout.slot_valid, -1).cpu()
        return {
            "image_tokens": list(self._image_tokens),
            "kept_image_tokens": list(self._kept_image_tokens),
            "pruned": True,
            "prefill_tokens": pruned.layout.length,
            "compact_tokens": pruned.layout.width,
            "kept_image_positions": [row.nonzero().flatten().tolist() for row in kept],
            "compact_positions": positions.tolist(),
            "decode_steps": pruned.steps,
        }

    # ---- called by the installed layers -------------------------------------------------------------------

    def _follow_sequence(self, past_key_values: Cache | None, layer_idx: int, hidden_states: torch.Tensor) -> str:
        """Track which sequence the model is running; 'prefill', 'decode' or '' (run unmodified)."""
        batch, query_length = hidden_states.shape[:2]
        cached_length = 0 if past_key_values is None else past_key_values.get_seq_length(layer_idx)
        if cached_length == 0:  # a new sequence: it takes the layout armed by start(), if any
            pending, self._pending = self._pending, None
            self._sequence = None
            if pending is not None:
                self._sequence = _Sequence(pending.bound_to(batch, query_length, hidden_states.device))
                self._sequence.cached = past_key_values is not None
                self._pruned = self._sequence
                return "prefill"
            return ""
        sequence = self._sequence
        if sequence is None or not sequence.cached:
            self._sequence = None
            return ""
        if query_length != 1:
            raise NotImplementedError(
                "FastV handles one decoded token per forward after the prefill; a multi-token forward on a started "
                "sequence (chunked prefill, assisted or speculative decoding) is not supported"
            )
        expected = sequence.layout.length + sequence.steps
        if cached_length != expected:
            raise RuntimeError(
                f"FastV: layer {layer_idx} holds {cached_length} cached tokens but the sequence started with a "
                f"{sequence.layout.length}-token prefill is at decoding step {sequence.steps}; call start() before "
                "each generation"
            )
        return "decode"


@dataclass
class _Layout:
    """Image positions of each prefill row and the compact layout's sizes (host-side counts, known at start)."""

    length: int  # prefill length S
    width: int  # compact length W
    image_counts: list[int]
    keep_counts: list[int]
    uniform_rows: bool  # every row keeps the same number of tokens: no invalid compact slot
    image: torch.Tensor  # (B, S) prunable positions (the last position excluded)
    keep_slot: torch.Tensor  # (B, max keep) which of the topk slots each row keeps
    slot_valid: torch.Tensor  # (B, W) compact slots holding a kept token (right-aligned)
    offset: torch.Tensor  # (B,) invalid slots at the front of each row

    @classmethod
    def from_mask(cls, mask: torch.Tensor, ratio: float) -> _Layout:
        length = mask.shape[1]
        image = mask.clone()
        image[:, -1] = False  # the last prompt token ranks the others: never dropped
        image_counts = image.sum(dim=1).tolist()  # once per generation
        # The public code's count: round(len * (1 - r)).
        keep_counts = [round(count * (1 - ratio)) for count in image_counts]
        row_lengths = [length - count + keep for count, keep in zip(image_counts, keep_counts)]
        width = max(row_lengths)
        device = mask.device
        offset = torch.tensor([width - row for row in row_lengths], device=device)
        return cls(
            length=length,
            width=width,
            image_counts=image_counts,
            keep_counts=keep_counts,
            uniform_rows=len(set(row_lengths)) == 1,
            image=image,
            keep_slot=slots_below(torch.tensor(keep_counts, device=device), max(keep_counts)),
            slot_valid=torch.arange(width, device=device) >= offset[:, None],
            offset=offset,
        )

    @property
    def drops_any(self) -> bool:
        return any(keep < count for count, keep in zip(self.image_counts, self.keep_counts))

    def bound_to(self, batch: int, length: int, device: torch.device) -> _Layout:
        """This layout on the model's device, after checking it describes the prefill (batch, length)."""
        if (batch, length) != (len(self.image_counts), self.length):
            raise ValueError(
                f"FastV was started with a prunable_mask of shape ({len(self.image_counts)}, {self.length}) but the "
                f"prefill has shape ({batch}, {length}); pass the image-token mask of exactly the sequence being "
                "generated (beam search and num_return_sequences > 1 are not supported)"
            )
        tensors = {item.name: getattr(self, item.name) for item in dataclasses.fields(self)}
        return dataclasses.replace(
            self, **{name: value.to(device) for name, value in tensors.items() if isinstance(value, torch.Tensor)}
        )


@dataclass
class _Sequence:
    """One sequence run with FastV: its compact layout (set at the prefill) and decoding progress."""

    layout: _Layout
    cached: bool = False  # the prefill filled a cache (so decoding steps follow)
    phase: str = ""  # what the current forward is for layers >= K: 'prefill' or 'decode'
    index: torch.Tensor | None = None  # (B, W) prefill position of each compact slot
    kept_image: torch.Tensor | None = None  # (B, S) kept image positions (statistics)
    valid: torch.Tensor | None = None  # (B, W) valid compact slots (kept and not padding); None: all valid
    prefill_mask: torch.Tensor | None = None  # (B, 1, W, W) bool; None: plain causal
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None  # cos/sin at the kept positions
    decode_valid: torch.Tensor | None = None  # (B, W + steps) key validity of the current decoding step
    steps: int = 0

    def plan_prefill(self, attention: torch.Tensor, key_valid: torch.Tensor | None, position_embeddings) -> None:
        """Kept set of every row from the last query's head-averaged attention (B, S), and the compact layout."""
        layout = self.layout
        batch, length = layout.image.shape
        scores = attention.masked_fill(~layout.image, float("-inf"))
        top = scores.topk(layout.keep_slot.shape[1], dim=1).indices  # descending: each row's kept slots come first
        kept_image = torch.zeros_like(layout.image).scatter_(1, top, layout.keep_slot)
        keep = ~layout.image | kept_image
        # Slot of every kept position: its rank among the row's kept positions, after the row's invalid slots.
        slot = keep.long().cumsum(dim=1) - 1 + layout.offset[:, None]
        slot = slot.masked_fill(~keep, layout.width)  # dropped positions go to a scratch column
        positions = torch.arange(length, device=keep.device).expand(batch, -1)
        index = positions.new_zeros(batch, layout.width + 1).scatter_(1, slot, positions)[:, : layout.width]
        if key_valid is not None and layout.uniform_rows and bool(key_valid.all()):  # one host read per prefill
            key_valid = None  # e.g. eager's mask without padding: keep the plain causal (fused) path
        valid = layout.slot_valid
        if key_valid is not None:
            valid = valid & key_valid.gather(1, index)
        elif layout.uniform_rows:
            valid = None
        self.index, self.kept_image, self.valid = index, kept_image, valid
        if valid is not None:
            width = layout.width
            causal = torch.ones(width, width, dtype=torch.bool, device=keep.device).tril()
            diagonal = torch.eye(width, dtype=torch.bool, device=keep.device)
            # A query slot that is itself invalid attends to itself only (no fully masked row, no NaN).
            self.prefill_mask = ((causal & valid[:, None, :]) | diagonal)[:, None]
        self.position_embeddings = tuple(_gather_positions(table, index) for table in position_embeddings)
        self.phase = "prefill"

    def plan_decode(self, attention_mask, cache_length: int) -> None:
        """Key validity of layers >= K's compact cache [kept prefill slots | decoded tokens] at this step."""
        layout = self.layout
        full_valid = _validity(attention_mask, layout.image.shape[0], cache_length)
        if full_valid is None and self.valid is None:
            self.decode_valid = None
        else:
            prefill_valid = layout.slot_valid if self.valid is None else self.valid
            if full_valid is None:
                decoded = prefill_valid.new_ones(prefill_valid.shape[0], cache_length - layout.length)
            else:
                decoded = full_valid[:, layout.length :].to(prefill_valid.device)
            self.decode_valid = torch.cat([prefill_valid, decoded], dim=1)
        self.phase = "decode"
        self.steps += 1


class FastVDecoderLayer(Qwen2DecoderLayer):
    """A ``Qwen2DecoderLayer`` that takes part in FastV (installed by switching the class in place).

    Layer K-1 ranks the image tokens at a pruned prefill; layers >= K run on the kept tokens (prefill) and their
    compact cache (decoding). Everything else (FastV not started, no image token, ratio 0) runs the parent's forward.
    """

    fastv: FastVPruning

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        pruning, layer_idx = self.fastv, self.self_attn.layer_idx

        def unmodified():
            return super(FastVDecoderLayer, self).forward(
                hidden_states,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **kwargs,
            )

        if layer_idx == pruning.layer - 1:
            phase = pruning._follow_sequence(past_key_values, layer_idx, hidden_states)
            if phase == "prefill":
                sequence = pruning._sequence
                sequence.phase = ""  # until the plan below exists, layers >= K must not run compact
                output = unmodified()
                self._plan_prefill(sequence, hidden_states, attention_mask, past_key_values, position_embeddings)
                return output
            if phase == "decode":
                pruning._sequence.plan_decode(attention_mask, past_key_values.get_seq_length(layer_idx) + 1)
            return unmodified()
        sequence = pruning._sequence
        if sequence is None or not sequence.phase:
            return unmodified()
        if sequence.phase == "prefill":
            return self._compact_prefill(hidden_states, past_key_values, sequence)
        return self._compact_decoding_step(hidden_states, position_embeddings, past_key_values, sequence)

    def _plan_prefill(self, sequence, hidden_states, attention_mask, past_key_values, position_embeddings) -> None:
        """Layer K-1, after its own forward: the last prompt token's attention over this layer's keys."""
        attention = self.self_attn
        batch, length = hidden_states.shape[:2]
        cos, sin = position_embeddings
        if past_key_values is not None:
            keys = _dynamic_cache_layer(past_key_values, attention.layer_idx).keys  # this prefill's keys, rotated
        else:
            normed = self.input_layernorm(hidden_states)
            keys = attention.k_proj(normed).view(batch, length, -1, attention.head_dim).transpose(1, 2)
            keys = rope(keys, cos, sin)
        last = self.input_layernorm(hidden_states[:, -1:])
        query = attention.q_proj(last).view(batch, 1, -1, attention.head_dim).transpose(1, 2)
        query = rope(query, cos[:, -1:], sin[:, -1:])
        key_valid = _validity(attention_mask, batch, length)
        # Softmax probabilities over all keys averaged over heads, as the public code's mean(attn, dim=1)[-1].
        scores = mean_head_attention(query, keys, key_valid, attention.scaling)
        sequence.plan_prefill(scores, key_valid, position_embeddings)

    def _projections(self, hidden_states, cos, sin):
        attention = self.self_attn
        normed = self.input_layernorm(hidden_states)
        head_shape = (*hidden_states.shape[:2], -1, attention.head_dim)
        query = rope(attention.q_proj(normed).view(head_shape).transpose(1, 2), cos, sin)
        key = rope(attention.k_proj(normed).view(head_shape).transpose(1, 2), cos, sin)
        value = attention.v_proj(normed).view(head_shape).transpose(1, 2)
        return query, key, value

    def _finish(self, residual, attended):
        hidden_states = residual + self.self_attn.o_proj(attended)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))

    def _compact_prefill(self, hidden_states, past_key_values, sequence) -> torch.Tensor:
        attention, layout = self.self_attn, sequence.layout
        device = hidden_states.device
        index = sequence.index.to(device)
        if attention.layer_idx == self.fastv.layer:  # the first pruned layer: keep the kept positions only
            if hidden_states.shape[1] != layout.length:
                raise RuntimeError(
                    f"FastV: layer {attention.layer_idx} got {hidden_states.shape[1]} tokens, the prefill has "
                    f"{layout.length}"
                )
            hidden_states = hidden_states.gather(1, index[..., None].expand(-1, -1, hidden_states.shape[-1]))
        elif hidden_states.shape[1] != layout.width:
            raise RuntimeError(
                f"FastV: layer {attention.layer_idx} got {hidden_states.shape[1]} tokens, the compact prefill has "
                f"{layout.width}"
            )
        cos, sin = (table.to(device) for table in sequence.position_embeddings)
        query, key, value = self._projections(hidden_states, cos, sin)
        if past_key_values is not None:
            if past_key_values.get_seq_length(attention.layer_idx) != 0:
                raise RuntimeError(f"FastV: layer {attention.layer_idx}'s cache is not empty at the prefill")
            key, value = past_key_values.update(key, value, attention.layer_idx)
            _dynamic_cache_layer(past_key_values, attention.layer_idx)  # only a DynamicCache can hold it
        mask = None if sequence.prefill_mask is None else sequence.prefill_mask.to(device)
        attended = _prefill_attention(query, key, value, mask, attention.scaling)
        return self._finish(hidden_states, attended)

    def _compact_decoding_step(self, hidden_states, position_embeddings, past_key_values, sequence) -> torch.Tensor:
        attention, layout = self.self_attn, sequence.layout
        if past_key_values is None or hidden_states.shape[1] != 1:
            raise RuntimeError(f"FastV: layer {attention.layer_idx} got a decoding step without a cache")
        query, key, value = self._projections(hidden_states, *position_embeddings)  # the new token's own position
        keys, values = past_key_values.update(key, value, attention.layer_idx)
        expected = layout.width + sequence.steps
        if keys.shape[2] != expected:
            raise RuntimeError(
                f"FastV: layer {attention.layer_idx} holds {keys.shape[2]} cached tokens, expected {expected} "
                f"(a {layout.width}-token compact prefill and {sequence.steps} decoded tokens)"
            )
        valid = None if sequence.decode_valid is None else sequence.decode_valid.to(hidden_states.device)
        attended = single_query_attention(query, keys, values, valid, attention.scaling)
        return self._finish(hidden_states, attended)


def install_fastv(qwen2_model: torch.nn.Module, pruning: FastVPruning) -> None:
    """Switch layers K-1.. of ``qwen2_model.layers`` to :class:`FastVDecoderLayer` (idempotent).

    The layers are the same module objects afterwards (weights, hooks and device placement untouched).
    """
    if not isinstance(pruning, FastVPruning):
        raise TypeError(f"pruning must be a FastVPruning, got {describe(pruning)}")
    layers = getattr(qwen2_model, "layers", None)
    if layers is None or not hasattr(qwen2_model, "config"):
        raise TypeError(f"expected a Qwen2Model (with .layers and .config), got {type(qwen2_model).__name__}")
    if not 1 <= pruning.layer <= len(layers) - 1:
        raise ValueError(
            f"FastV layer must be in [1, {len(layers) - 1}] for a model with {len(layers)} decoder layers, "
            f"got {pruning.layer}"
        )
    layer_types = getattr(qwen2_model.config, "layer_types", None) or ["full_attention"] * len(layers)
    if any(kind != "full_attention" for kind in layer_types[pruning.layer - 1 :]):
        raise NotImplementedError("FastV does not support sliding-window attention layers")
    for layer in layers:
        if isinstance(layer, DyCokeDecoderLayer):
            raise TypeError("DyCoke KV pruning is installed on this model; remove it before installing FastV")
        if type(layer) not in (Qwen2DecoderLayer, FastVDecoderLayer):
            raise TypeError(f"expected Qwen2DecoderLayer layers, found {type(layer).__name__}")

    remove_fastv(qwen2_model)
    for layer in layers[pruning.layer - 1 :]:
        switch_class(layer, FastVDecoderLayer)
        layer.fastv = pruning
    qwen2_model.fastv_pruning = pruning


def remove_fastv(qwen2_model: torch.nn.Module) -> None:
    """Give every FastV layer of ``qwen2_model.layers`` back its plain ``Qwen2DecoderLayer`` class."""
    for layer in qwen2_model.layers:
        if isinstance(layer, FastVDecoderLayer):
            switch_class(layer, Qwen2DecoderLayer)
            del layer.fastv
    pruning = qwen2_model.__dict__.pop("fastv_pruning", None)
    if pruning is not None:
        pruning._pending = pruning._sequence = None


# ---- helpers ------------------------------------------------------------------------------------------------


def _dynamic_cache_layer(cache: Cache, layer_idx: int) -> DynamicLayer:
    layer = cache.layers[layer_idx] if layer_idx < len(cache.layers) else None
    if not isinstance(layer, DynamicLayer) or layer.is_sliding:
        raise NotImplementedError(
            f"FastV needs a DynamicCache (full attention) to hold shorter caches in layers >= K; got a "
            f"{type(layer).__name__} cache layer"
        )
    return layer


def _validity(attention_mask, batch: int, key_length: int) -> torch.Tensor | None:
    """(batch, key_length) bool: keys the last query may attend, from whatever mask the backend was given."""
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        raise NotImplementedError(f"FastV does not support {type(attention_mask).__name__} attention masks (flex attention)")
    return key_validity(attention_mask, batch, key_length)


def _gather_positions(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """RoPE cos or sin (1 or B, S, D) at the compact slots' positions (B, W) -> (B, W, D)."""
    table = table.expand(index.shape[0], -1, -1)
    return table.gather(1, index[..., None].expand(-1, -1, table.shape[-1]))


def _prefill_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """Causal attention over the compact sequence: (B, heads, W, D) -> (B, W, heads * D).

    Without a mask, SDPA's ``is_causal`` path (flash kernels); grouped-query heads are shared through
    ``enable_gqa`` where the fused kernels accept it (CPU, or half precision on CUDA), else K/V are repeated so
    that SDPA never falls back to its math kernel for want of GQA support.
    """
    batch, heads, length, head_dim = query.shape
    groups = heads // keys.shape[1]
    gqa = groups > 1 and mask is None and (query.device.type == "cpu" or query.dtype in (torch.float16, torch.bfloat16))
    if groups > 1 and not gqa:
        keys = keys.repeat_interleave(groups, dim=1)
        values = values.repeat_interleave(groups, dim=1)
    if mask is None:
        extra = {"enable_gqa": True} if gqa else {}
        attended = F.scaled_dot_product_attention(query, keys, values, is_causal=True, scale=scaling, **extra)
    else:
        attended = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling)
    return attended.transpose(1, 2).reshape(batch, length, heads * head_dim)
