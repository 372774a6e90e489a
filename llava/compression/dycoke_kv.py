"""DyCoke dynamic KV pruning for the decoding steps of a transformers 5 ``Qwen2Model``.

At every decoding step the current query's attention at layer L-1 (softmax over the whole cache, averaged over
heads, read at the image positions) gives a vector ``a``. On the first decoding step of a sequence, or when
cos(a, a_prev) < threshold, the *active* image positions become the top int(n_img * (1 - ratio)) of ``a``;
otherwise the previous active set stays. Layers >= L then attend to every non-image key plus the active image
keys; layers < L attend to everything; prefill is exact. Pruned keys stay in the cache and can come back.

How it runs: layers L-1.. of ``model.layers`` are switched in place to :class:`DyCokeDecoderLayer` (same module
objects, same weights). Layer L-1 runs unchanged through the model's own attention backend and afterwards
computes the decision for its single query (q.K^T over that layer's cache). Every layer >= L keeps a compact
copy of the keys/values it attends to, laid out [non-image prefill | active image | decoded] (:class:`_CompactKV`):
built on the first decoding step, its active-image part re-gathered only on the steps that recompute the active
set, and the new token appended at every step. Layers >= L attend over that copy with torch's
``scaled_dot_product_attention``, whatever backend the model uses, so the path never depends on a backend
accepting an arbitrary mask. Per decoding step there is exactly one host read (whether any row recomputed its
active set); there is none per layer.
"""

from __future__ import annotations

import dataclasses
import math
import types
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicLayer
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, rotate_half

__all__ = ["DyCokeDecoderLayer", "DyCokeKVPruning", "install_dycoke_kv_pruning", "remove_dycoke_kv_pruning"]

# Decoded tokens appended to a compact copy between reallocations.
_COMPACT_GROWTH = 256


class DyCokeKVPruning:
    """Configuration, per-generate state and statistics of DyCoke's dynamic KV pruning.

    ``layer`` is DyCoke's L (``dycoke_l``): the decision is taken from layer L-1's attention and layers >= L are
    pruned. ``ratio`` is ``dycoke_p``, the fraction of image tokens hidden from layers >= L (0 disables pruning).
    Call :meth:`start` with the image-token mask of the prefill before each generation.
    """

    def __init__(self, layer: int, ratio: float, threshold: float = 0.9):
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ValueError(f"DyCoke KV pruning layer must be an int (DyCoke's L, >= 1), got {layer!r}")
        if layer < 1:
            raise ValueError(f"DyCoke KV pruning layer must be >= 1 (the decision uses layer L-1), got {layer}")
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
            raise ValueError(f"DyCoke KV pruning ratio must be a number in [0, 1), got {ratio!r}")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            raise ValueError(f"DyCoke KV pruning threshold must be a finite number, got {threshold!r}")
        self.layer = layer
        self.ratio = float(ratio)
        self.threshold = float(threshold)
        self._pending: _ImageLayout | None = None  # set by start(), bound to the next prefill
        self._sequence: _SequenceState | None = None  # the sequence being decoded with pruning
        self._image_tokens: list[int] = []
        self._active_image_tokens: list[int] = []
        self._recomputed: list[torch.Tensor] = []  # (B,) bool per decoding step, kept on device
        self._similarity: list[torch.Tensor] = []  # (B,) float per decoding step, kept on device
        self.record_active = False  # when True, keep each step's active set (for tracing / pictures)
        self._active_history: list[torch.Tensor] = []  # (B, K_max) active cache positions per decoding step

    def __repr__(self) -> str:
        return f"DyCokeKVPruning(layer={self.layer}, ratio={self.ratio}, threshold={self.threshold})"

    def start(self, prunable_mask: torch.Tensor) -> None:
        """Arm pruning for the next generation and reset state and statistics.

        ``prunable_mask`` is a (batch, prefill_length) bool tensor, True at the image-token positions of the
        prefill in cache coordinates (padding already applied). The next prefill forward must have exactly that
        shape. A mask without True (or ``ratio == 0``) leaves the next generation unmodified.
        """
        if not isinstance(prunable_mask, torch.Tensor) or prunable_mask.dtype != torch.bool:
            raise TypeError(f"prunable_mask must be a torch.bool tensor, got {_describe(prunable_mask)}")
        if prunable_mask.ndim != 2:
            raise ValueError(f"prunable_mask must have shape (batch, prefill_length), got {tuple(prunable_mask.shape)}")
        # Everything is reset here (the public code keeps a_prev across generate calls: a leak, not kept).
        layout = _ImageLayout.from_mask(prunable_mask, self.ratio)
        self._image_tokens = layout.image_counts
        self._active_image_tokens = layout.keep_counts if self.ratio > 0 else list(layout.image_counts)
        self._pending = layout if self.ratio > 0 and any(layout.image_counts) else None
        self._sequence = None
        self._recomputed, self._similarity, self._active_history = [], [], []

    @property
    def stats(self) -> dict:
        """Statistics of the generation started by the last :meth:`start` (converted from device tensors here).

        ``image_tokens`` and ``active_image_tokens`` are per row (the active count is the same at every pruned
        decoding step); ``decode_steps`` counts the decoding steps run with pruning; ``recomputations`` is per
        row (the first decoding step counts); ``recompute_steps`` lists, per row, the decoding steps at which the
        active set was recomputed; ``similarity`` holds, per row, cos(a, a_prev) of every step (NaN at step 0).
        """
        rows = len(self._image_tokens)
        flags = torch.stack(self._recomputed).T.tolist() if self._recomputed else [[] for _ in range(rows)]
        similarity = torch.stack(self._similarity).T.tolist() if self._similarity else [[] for _ in range(rows)]
        return {
            "image_tokens": list(self._image_tokens),
            "active_image_tokens": list(self._active_image_tokens),
            "decode_steps": len(self._recomputed),
            "recomputations": [sum(row) for row in flags],
            "recompute_steps": [[step for step, hit in enumerate(row) if hit] for row in flags],
            "similarity": similarity,
        }

    def active_positions(self, row: int = 0) -> list[torch.Tensor]:
        """Cache positions of ``row``'s active image tokens at each decoding step (recorded while
        ``record_active`` is True), most attended first; tensors stay on the model's device."""
        keep = self._active_image_tokens[row] if row < len(self._active_image_tokens) else 0
        return [step[row, :keep] for step in self._active_history]

    # ---- called by the installed layers -------------------------------------------------------------------

    def _follow_sequence(self, cached_length: int, hidden_states: torch.Tensor) -> bool:
        """Track which sequence the model is running; True when this forward is a decoding step to prune."""
        batch, query_length = hidden_states.shape[:2]
        if cached_length == 0:  # prefill of a new sequence: it takes the layout armed by start(), if any
            pending, self._pending = self._pending, None
            self._sequence = None
            if pending is not None:
                self._sequence = _SequenceState(pending.bound_to(batch, query_length, hidden_states.device))
            return False
        if self._sequence is None:
            return False
        if query_length != 1:
            raise NotImplementedError(
                "DyCoke KV pruning handles one decoded token per forward; a multi-token forward on a started "
                "sequence (chunked prefill, assisted or speculative decoding) is not supported"
            )
        return True

    def _decide(self, query: torch.Tensor, keys: torch.Tensor, key_valid: torch.Tensor | None, scaling: float):
        """Layer L-1 of a decoding step: choose the active image positions and plan layers >= L."""
        sequence, layout = self._sequence, self._sequence.layout
        cache_length = keys.shape[2]
        if cache_length != layout.prefill_length + sequence.steps + 1:
            raise RuntimeError(
                f"DyCoke KV pruning: layer {self.layer - 1} holds {cache_length} cached tokens but the sequence "
                f"started with a {layout.prefill_length}-token prefill is at decoding step {sequence.steps}; "
                "call start() before each generation"
            )
        attention = _mean_head_attention(query, keys, key_valid, scaling)
        image_attention = attention.gather(1, layout.image_index) * layout.image_valid
        first_step = sequence.previous_attention is None
        if first_step:
            recompute = layout.has_image
            similarity = torch.full_like(recompute, float("nan"), dtype=torch.float32)
        else:
            similarity = F.cosine_similarity(image_attention, sequence.previous_attention, dim=-1)
            recompute = (similarity < self.threshold) & layout.has_image
        # As in the public code, a_prev follows every step, not only the steps that recompute.
        sequence.previous_attention = image_attention
        # The one host read of the step: layers >= L re-gather the active part of their compact copy or not.
        # (The public code attends to the full cache on the steps that keep the active set: a bug, not kept.)
        recomputed = first_step or bool(recompute.any())
        if recomputed:
            sequence.select_active(image_attention, recompute)
        sequence.plan_step(keys, key_valid, recomputed)
        self._recomputed.append(recompute)
        self._similarity.append(similarity.float())
        if self.record_active:
            self._active_history.append(sequence.active)  # a new tensor only when the set changed: no copy


@dataclass
class _ImageLayout:
    """Where the image and non-image tokens of each prefill row are, padded to a common width."""

    prefill_length: int
    image_counts: list[int]
    keep_counts: list[int]
    image_index: torch.Tensor  # (B, N_max) cache positions of image tokens, valid where image_valid
    image_valid: torch.Tensor  # (B, N_max)
    other_index: torch.Tensor  # (B, O_max) cache positions of non-image prefill tokens
    other_valid: torch.Tensor  # (B, O_max)
    active_valid: torch.Tensor  # (B, K_max) which of the K_max active slots each row uses
    has_image: torch.Tensor  # (B,)

    @classmethod
    def from_mask(cls, mask: torch.Tensor, ratio: float) -> _ImageLayout:
        batch, length = mask.shape
        image_counts = mask.sum(dim=1).tolist()  # once per generation
        # The public code's count: int(len * (1 - p)).
        keep_counts = [int(count * (1 - ratio)) for count in image_counts]
        # A stable sort puts each row's image (or non-image) positions first, in order.
        image_first = torch.sort(mask.to(torch.uint8), dim=1, descending=True, stable=True).indices
        other_first = torch.sort(mask.to(torch.uint8), dim=1, stable=True).indices
        image_width, other_width, keep_width = max(image_counts), length - min(image_counts), max(keep_counts)
        device = mask.device
        return cls(
            prefill_length=length,
            image_counts=image_counts,
            keep_counts=keep_counts,
            image_index=image_first[:, :image_width],
            image_valid=_slots_below(torch.tensor(image_counts, device=device), image_width),
            other_index=other_first[:, :other_width],
            other_valid=_slots_below(length - torch.tensor(image_counts, device=device), other_width),
            active_valid=_slots_below(torch.tensor(keep_counts, device=device), keep_width),
            has_image=torch.tensor(image_counts, device=device) > 0,
        )

    @property
    def uniform_rows(self) -> bool:
        """All rows have the same counts, so no padded slot exists in the compact layout."""
        return len(set(self.image_counts)) == 1

    def bound_to(self, batch: int, length: int, device: torch.device) -> _ImageLayout:
        """This layout on the model's device, after checking it describes the prefill (batch, length)."""
        if (batch, length) != (len(self.image_counts), self.prefill_length):
            raise ValueError(
                f"DyCoke KV pruning was started with a prunable_mask of shape "
                f"({len(self.image_counts)}, {self.prefill_length}) but the prefill has shape ({batch}, {length}); "
                "pass the image-token mask of exactly the sequence being generated (beam search and "
                "num_return_sequences > 1 are not supported)"
            )
        tensors = {item.name: getattr(self, item.name) for item in dataclasses.fields(self)}
        return dataclasses.replace(
            self, **{name: value.to(device) for name, value in tensors.items() if isinstance(value, torch.Tensor)}
        )


@dataclass
class _StepPlan:
    """What layers >= L do at the current decoding step (shared by all of them)."""

    cache_length: int
    other_rows: torch.Tensor | None  # first step only: flat cache rows of the non-image prefill tokens
    active_rows: torch.Tensor | None  # steps that recompute: flat cache rows of the active image tokens
    valid: torch.Tensor | None  # (B, length) key-padding mask of the compact layout, None when all are valid
    length: int  # compact keys after this step


@dataclass
class _SequenceState:
    layout: _ImageLayout
    steps: int = 0
    previous_attention: torch.Tensor | None = None
    active: torch.Tensor | None = None  # (B, K_max) cache positions of the active image tokens
    plan: _StepPlan | None = None
    compact: dict[int, _CompactKV] = field(default_factory=dict)

    def select_active(self, image_attention: torch.Tensor, recompute: torch.Tensor) -> None:
        layout = self.layout
        scores = image_attention.masked_fill(~layout.image_valid, float("-inf"))
        top = scores.topk(layout.active_valid.shape[1], dim=1).indices  # descending, so valid slots come first
        candidate = layout.image_index.gather(1, top)
        self.active = candidate if self.active is None else torch.where(recompute[:, None], candidate, self.active)

    def plan_step(self, keys: torch.Tensor, key_valid: torch.Tensor | None, recomputed: bool) -> None:
        """Compact layout per row: [non-image prefill | active image | decoded tokens], padded slots masked."""
        layout, cache_length = self.layout, keys.shape[2]
        other_width, active_width = layout.other_index.shape[1], layout.active_valid.shape[1]
        decoded = cache_length - layout.prefill_length
        valid = None
        if key_valid is not None:
            other_valid = layout.other_valid & key_valid.gather(1, layout.other_index)
            valid = torch.cat([other_valid, layout.active_valid, key_valid[:, layout.prefill_length :]], dim=1)
        elif not layout.uniform_rows:
            decoded_valid = layout.active_valid.new_ones(layout.active_valid.shape[0], decoded)
            valid = torch.cat([layout.other_valid, layout.active_valid, decoded_valid], dim=1)
        self.plan = _StepPlan(
            cache_length=cache_length,
            other_rows=_flat_rows(layout.other_index, keys) if self.steps == 0 else None,
            active_rows=_flat_rows(self.active, keys) if recomputed else None,
            valid=valid,
            length=other_width + active_width + decoded,
        )
        self.steps += 1


class _CompactKV:
    """One layer's keys/values at the compact layout's positions, with room to append decoded tokens."""

    def __init__(self, other_width: int, active_width: int):
        self.other_width = other_width
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.length = other_width + active_width

    def update(self, plan: _StepPlan, all_keys, all_values, key, value) -> tuple[torch.Tensor, torch.Tensor]:
        """Bring the copy to this step's layout: fill what the plan re-selects, append the new token."""
        if plan.other_rows is not None:
            self.keys = _with_room(all_keys, self.length)
            self.values = _with_room(all_values, self.length)
            self._put_rows(all_keys, all_values, plan.other_rows, 0)
        if plan.active_rows is not None:
            self._put_rows(all_keys, all_values, plan.active_rows, self.other_width)
        if self.length == self.keys.shape[2]:
            self.keys = _with_room(self.keys, self.length, copy=True)
            self.values = _with_room(self.values, self.length, copy=True)
        self.keys[:, :, self.length] = key[:, :, 0]
        self.values[:, :, self.length] = value[:, :, 0]
        self.length += 1
        return self.keys[:, :, : self.length], self.values[:, :, : self.length]

    def _put_rows(self, all_keys, all_values, rows: torch.Tensor, start: int) -> None:
        batch, heads, _, head_dim = all_keys.shape
        width = rows.numel() // (batch * heads)
        for source, target in ((all_keys, self.keys), (all_values, self.values)):
            picked = source.reshape(-1, head_dim).index_select(0, rows)
            target[:, :, start : start + width] = picked.view(batch, heads, width, head_dim)


class DyCokeDecoderLayer(Qwen2DecoderLayer):
    """A ``Qwen2DecoderLayer`` that takes part in DyCoke KV pruning (installed by switching the class in place).

    Layer L-1 decides the active image tokens at each decoding step; layers >= L attend over the compact copy.
    Everything else (prefill, no cache, pruning not started) runs the parent's forward unchanged.
    """

    dycoke: DyCokeKVPruning

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
        pruning, layer_idx = self.dycoke, self.self_attn.layer_idx

        def unmodified():
            return super(DyCokeDecoderLayer, self).forward(
                hidden_states,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **kwargs,
            )

        if past_key_values is None:
            return unmodified()
        if layer_idx == pruning.layer - 1:
            decoding = pruning._follow_sequence(past_key_values.get_seq_length(layer_idx), hidden_states)
            output = unmodified()
            if decoding:
                keys = _dynamic_cache_layer(past_key_values, layer_idx).keys
                key_valid = _key_validity(attention_mask, keys.shape[0], keys.shape[2])
                query = self._rotated_query(hidden_states, position_embeddings)
                pruning._decide(query, keys, key_valid, self.self_attn.scaling)
            return output
        sequence = pruning._sequence
        if sequence is None or sequence.plan is None or hidden_states.shape[1] != 1:
            return unmodified()
        return self._pruned_decoding_step(hidden_states, position_embeddings, past_key_values, sequence)

    def _rotated_query(self, hidden_states: torch.Tensor, position_embeddings) -> torch.Tensor:
        attention = self.self_attn
        normed = self.input_layernorm(hidden_states)
        query = attention.q_proj(normed).view(*hidden_states.shape[:2], -1, attention.head_dim).transpose(1, 2)
        return _rope(query, *position_embeddings)

    def _pruned_decoding_step(self, hidden_states, position_embeddings, past_key_values, sequence) -> torch.Tensor:
        attention, plan = self.self_attn, sequence.plan
        residual = hidden_states
        normed = self.input_layernorm(hidden_states)
        head_shape = (*hidden_states.shape[:2], -1, attention.head_dim)
        query = _rope(attention.q_proj(normed).view(head_shape).transpose(1, 2), *position_embeddings)
        key = _rope(attention.k_proj(normed).view(head_shape).transpose(1, 2), *position_embeddings)
        value = attention.v_proj(normed).view(head_shape).transpose(1, 2)
        # The full cache keeps every token: pruned image keys can become active again later.
        all_keys, all_values = past_key_values.update(key, value, attention.layer_idx)

        if all_keys.shape[2] != plan.cache_length:
            raise RuntimeError(
                f"DyCoke KV pruning: layer {attention.layer_idx} holds {all_keys.shape[2]} cached tokens, the "
                f"decision of this step was taken for {plan.cache_length}"
            )
        compact = sequence.compact.get(attention.layer_idx)
        if compact is None and plan.other_rows is None:
            raise RuntimeError(f"DyCoke KV pruning: layer {attention.layer_idx} missed the first decoding step")
        if compact is None:
            layout = sequence.layout
            compact = _CompactKV(layout.other_index.shape[1], layout.active_valid.shape[1])
            sequence.compact[attention.layer_idx] = compact
        compact_keys, compact_values = compact.update(plan, all_keys, all_values, key, value)
        if compact.length != plan.length:
            raise RuntimeError(
                f"DyCoke KV pruning: layer {attention.layer_idx} has {compact.length} compact keys, expected "
                f"{plan.length}; a decoding step skipped this layer"
            )
        attended = _single_query_attention(query, compact_keys, compact_values, plan.valid, attention.scaling)
        hidden_states = residual + attention.o_proj(attended)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


def install_dycoke_kv_pruning(qwen2_model: torch.nn.Module, pruning: DyCokeKVPruning) -> None:
    """Switch layers L-1.. of ``qwen2_model.layers`` to :class:`DyCokeDecoderLayer` (idempotent).

    The layers are the same module objects afterwards (weights, hooks and device placement untouched).
    """
    if not isinstance(pruning, DyCokeKVPruning):
        raise TypeError(f"pruning must be a DyCokeKVPruning, got {_describe(pruning)}")
    layers = getattr(qwen2_model, "layers", None)
    if layers is None or not hasattr(qwen2_model, "config"):
        raise TypeError(f"expected a Qwen2Model (with .layers and .config), got {type(qwen2_model).__name__}")
    if not 1 <= pruning.layer <= len(layers) - 1:
        raise ValueError(
            f"DyCoke KV pruning layer must be in [1, {len(layers) - 1}] for a model with {len(layers)} decoder "
            f"layers, got {pruning.layer}"
        )
    layer_types = getattr(qwen2_model.config, "layer_types", None) or ["full_attention"] * len(layers)
    if any(kind != "full_attention" for kind in layer_types[pruning.layer - 1 :]):
        raise NotImplementedError("DyCoke KV pruning does not support sliding-window attention layers")
    for layer in layers:
        if type(layer) not in (Qwen2DecoderLayer, DyCokeDecoderLayer):
            raise TypeError(f"expected Qwen2DecoderLayer layers, found {type(layer).__name__}")

    remove_dycoke_kv_pruning(qwen2_model)
    for layer in layers[pruning.layer - 1 :]:
        _switch_class(layer, DyCokeDecoderLayer)
        layer.dycoke = pruning
    qwen2_model.dycoke_kv_pruning = pruning


def remove_dycoke_kv_pruning(qwen2_model: torch.nn.Module) -> None:
    """Give every DyCoke layer of ``qwen2_model.layers`` back its plain ``Qwen2DecoderLayer`` class."""
    for layer in qwen2_model.layers:
        if isinstance(layer, DyCokeDecoderLayer):
            _switch_class(layer, Qwen2DecoderLayer)
            del layer.dycoke
    pruning = qwen2_model.__dict__.pop("dycoke_kv_pruning", None)
    if pruning is not None:
        pruning._pending = pruning._sequence = None


# ---- helpers ------------------------------------------------------------------------------------------------


def _switch_class(layer: torch.nn.Module, cls: type) -> None:
    layer.__class__ = cls
    # accelerate's dispatch hooks (device_map over several devices) call a forward bound when they were attached.
    if hasattr(layer, "_hf_hook") and hasattr(layer, "_old_forward"):
        layer._old_forward = types.MethodType(cls.forward, layer)


def _dynamic_cache_layer(cache: Cache, layer_idx: int) -> DynamicLayer:
    layer = cache.layers[layer_idx]
    if not isinstance(layer, DynamicLayer) or layer.is_sliding:
        raise NotImplementedError(
            f"DyCoke KV pruning needs a DynamicCache (full attention); got a {type(layer).__name__} cache layer"
        )
    return layer


def _rope(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of (batch, heads, length, head_dim) states, as Qwen2's apply_rotary_pos_emb does it."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return states * cos + rotate_half(states) * sin


def _key_validity(attention_mask, batch: int, key_length: int) -> torch.Tensor | None:
    """(batch, key_length) bool: keys the single query may attend, from the mask the backend was given.

    eager passes a 4D additive float mask, sdpa a 4D bool mask or None, flash attention a 2D padding mask or None.
    """
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise NotImplementedError(
            f"DyCoke KV pruning does not support {type(attention_mask).__name__} attention masks (flex attention)"
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


def _mean_head_attention(
    query: torch.Tensor, keys: torch.Tensor, key_valid: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """Softmax attention of the single query over all keys, averaged over heads: (batch, key_length) float32."""
    batch, heads, _, head_dim = query.shape
    grouped = query.reshape(batch, keys.shape[1], heads // keys.shape[1], head_dim)
    scores = (torch.matmul(grouped, keys.transpose(2, 3)) * scaling).float()
    if key_valid is not None:
        scores = scores.masked_fill(~key_valid[:, None, None, :], float("-inf"))
    return scores.softmax(dim=-1).mean(dim=(1, 2))


def _single_query_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """Attention of one query token: (batch, heads, 1, head_dim) -> (batch, 1, heads * head_dim).

    The query heads that share a key/value head become that head's query rows, so K/V are never repeated.
    """
    batch, heads, _, head_dim = query.shape
    grouped = query.reshape(batch, keys.shape[1], heads // keys.shape[1], head_dim)
    mask = None if valid is None else valid[:, None, None, :]
    attended = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask, scale=scaling)
    return attended.reshape(batch, 1, heads * head_dim)


def _slots_below(counts: torch.Tensor, width: int) -> torch.Tensor:
    return torch.arange(width, device=counts.device) < counts[:, None]


def _with_room(states: torch.Tensor, length: int, copy: bool = False) -> torch.Tensor:
    """A (batch, heads, length + growth, head_dim) buffer, holding states[:, :, :length] if copy."""
    batch, heads, _, head_dim = states.shape
    buffer = states.new_empty(batch, heads, length + _COMPACT_GROWTH, head_dim)
    if copy:
        buffer[:, :, :length] = states[:, :, :length]
    return buffer


def _flat_rows(positions: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """Row numbers in cache.reshape(-1, head_dim) of (batch, position) pairs, for every head: (B * heads * W,).

    Selecting whole rows with index_select is several times faster than an element-wise torch.gather.
    """
    batch, heads, length, _ = cache.shape
    head_offsets = torch.arange(batch * heads, device=positions.device).view(batch, heads, 1) * length
    return (head_offsets + positions[:, None, :]).reshape(-1)


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__
