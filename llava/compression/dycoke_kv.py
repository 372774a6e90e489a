"""DyCoke dynamic KV pruning for the decoding steps of a transformers 5 ``Qwen2Model``.

At every decoding step the current query's attention at layer L-1 (softmax over the whole cache, averaged over
heads, read at the image positions) gives a vector ``a``. On the first decoding step of a sequence, or when
cos(a, a_prev) < threshold, the *active* image positions become the top int(n_img * (1 - ratio)) of ``a``;
otherwise the previous active set stays. Layers >= L then attend to every non-image key plus the active image
keys; layers < L attend to everything; prefill is exact. Pruned keys stay in the cache and can come back.

How it runs: layers L-1.. of ``model.layers`` are switched in place to :class:`DyCokeDecoderLayer` (same module
objects, same weights). At a pruned decoding step they compute their single-query attention themselves (torch's
``scaled_dot_product_attention`` with the query heads grouped by key/value head), whatever backend the model uses,
so the path never depends on a backend accepting an arbitrary mask:

- layer L-1 attends over its whole cache with eager attention's arithmetic (float32 softmax), which yields the
  probabilities of the decision along with the layer's output: no second query projection, no second pass over
  the keys;
- on a step that recomputes the active set, layers >= L attend over their whole cache with an additive key mask
  hiding the inactive image tokens (one mask per step, shared by the layers): about the cost of an unpruned
  step, and nothing is copied;
- on a step that keeps the active set, layers >= L attend over a compact copy of their keys/values laid out
  [non-image prefill | active image | decoded] (:class:`_CompactKV`), brought up to date lazily: built on the
  first such step, its active part re-gathered only when the set changed since it was filled, the decoded tokens
  it lacks copied from the cache. With a stable set (the common case with real models) that is a one-token append
  per step, and the attention reads only the kept keys. When the keys/values this skips are small
  (``DyCokeKVPruning.compact_min_bytes``, 1 MiB per layer by default) the bookkeeping costs more than it saves,
  and those steps take the masked full-cache path instead (same result; no copy is ever made).

Per decoding step there is exactly one host read (whether any row recomputed its active set; none on the first
step); there is none per layer.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, DynamicLayer
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

from llava.compression._attention import (
    additive_key_mask,
    describe,
    key_validity,
    single_query_attention,
    single_query_attention_with_weights,
    slots_below,
    switch_class,
)

__all__ = ["DyCokeDecoderLayer", "DyCokeKVPruning", "install_dycoke_kv_pruning", "remove_dycoke_kv_pruning"]

# Decoded tokens appended to a compact copy (or a mask buffer) between reallocations.
_COMPACT_GROWTH = 256
# F.cosine_similarity's default eps.
_COSINE_EPS = 1e-8
# See DyCokeKVPruning.compact_min_bytes.
_COMPACT_MIN_BYTES = 1 << 20


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
        # Steps that keep the active set attend over a compact copy of layers >= L's keys/values when that skips
        # at least this many bytes of keys/values per layer, else over the full cache with a mask (the same
        # result). Below it (short prompts, small models, batch 1) the copy's bookkeeping costs more than the
        # attention it saves; 1 MiB is where the two break even on a CPU (scripts/bench_decode_step.py).
        self.compact_min_bytes = _COMPACT_MIN_BYTES
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
            raise TypeError(f"prunable_mask must be a torch.bool tensor, got {describe(prunable_mask)}")
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
                layout = pending.bound_to(batch, query_length, hidden_states.device)
                self._sequence = _SequenceState.started(layout, hidden_states.dtype)
            return False
        if self._sequence is None:
            return False
        if query_length != 1:
            raise NotImplementedError(
                "DyCoke KV pruning handles one decoded token per forward; a multi-token forward on a started "
                "sequence (chunked prefill, assisted or speculative decoding) is not supported"
            )
        return True

    def _decide(self, attention: torch.Tensor, key_valid: torch.Tensor | None, keys: torch.Tensor) -> None:
        """Layer L-1 of a decoding step: from its query's head-averaged attention (batch, cache_length), choose the
        active image positions and plan layers >= L (``keys``: layer L-1's cache, for its sizes and dtype)."""
        sequence, layout = self._sequence, self._sequence.layout
        cache_length = attention.shape[1]
        if cache_length != layout.prefill_length + sequence.steps + 1:
            raise RuntimeError(
                f"DyCoke KV pruning: layer {self.layer - 1} holds {cache_length} cached tokens but the sequence "
                f"started with a {layout.prefill_length}-token prefill is at decoding step {sequence.steps}; "
                "call start() before each generation"
            )
        if layout.image_span is not None:  # one image span shared by every row: a view
            image_attention = attention[:, layout.image_span[0] : layout.image_span[1]]
        else:
            image_attention = attention.gather(1, layout.image_index)
            if not layout.uniform_rows:
                image_attention = image_attention * layout.image_valid
        # cos(a, a_prev) exactly as F.cosine_similarity computes it, a_prev / |a_prev| kept from the previous step.
        norm = torch.linalg.vector_norm(image_attention, dim=-1, keepdim=True).clamp_min_(_COSINE_EPS)
        direction = image_attention / norm
        first_step = sequence.previous_direction is None
        if first_step:
            recompute = layout.has_image
            similarity = sequence.no_similarity
        else:
            similarity = (direction * sequence.previous_direction).sum(dim=-1)
            recompute = similarity < self.threshold
            if not layout.all_rows_have_images:
                recompute &= layout.has_image
        # As in the public code, a_prev follows every step, not only the steps that recompute.
        sequence.previous_direction = direction
        # The one host read of the step (none at the first): layers >= L attend over their full cache with a mask
        # (the set changed) or over their compact copy (it did not).
        # (The public code attends to the full cache on the steps that keep the active set: a bug, not kept.)
        recomputed = first_step or bool(recompute.any())
        if recomputed:
            sequence.select_active(image_attention, recompute, first_step)
        if sequence.use_compact is None:
            batch, heads, _, head_dim = keys.shape
            skipped = layout.prefill_length - layout.other_index.shape[1] - layout.active_valid.shape[1]
            skipped_bytes = 2 * batch * heads * head_dim * keys.element_size() * skipped
            sequence.use_compact = skipped_bytes >= self.compact_min_bytes
        sequence.plan_step(cache_length, key_valid, recomputed, keys.dtype)
        self._recomputed.append(recompute)
        self._similarity.append(similarity)
        if self.record_active:
            self._active_history.append(sequence.active)  # a new tensor only when the set changed: no copy


@dataclass
class _ImageLayout:
    """Where the image and non-image tokens of each prefill row are, padded to a common width."""

    prefill_length: int
    image_counts: list[int]
    keep_counts: list[int]
    image_span: tuple[int, int] | None  # (start, end) when every row's image tokens are exactly that range
    image_index: torch.Tensor  # (B, N_max) cache positions of image tokens, valid where image_valid
    image_valid: torch.Tensor  # (B, N_max)
    other_index: torch.Tensor  # (B, O_max) cache positions of non-image prefill tokens
    other_valid: torch.Tensor  # (B, O_max)
    active_valid: torch.Tensor  # (B, K_max) which of the K_max active slots each row uses
    has_image: torch.Tensor  # (B,)
    image_mask: torch.Tensor  # (B, prefill_length) bool: the image positions

    @classmethod
    def from_mask(cls, mask: torch.Tensor, ratio: float) -> _ImageLayout:
        batch, length = mask.shape
        image_counts = mask.sum(dim=1).tolist()  # host reads: once per generation
        # The public code's count: int(len * (1 - p)).
        keep_counts = [int(count * (1 - ratio)) for count in image_counts]
        # A stable sort puts each row's image (or non-image) positions first, in order.
        image_first = torch.sort(mask.to(torch.uint8), dim=1, descending=True, stable=True).indices
        other_first = torch.sort(mask.to(torch.uint8), dim=1, stable=True).indices
        image_width, other_width, keep_width = max(image_counts), length - min(image_counts), max(keep_counts)
        image_span = None
        if image_width and len(set(image_counts)) == 1:
            starts, ends = image_first[:, 0].tolist(), image_first[:, image_width - 1].tolist()
            if len(set(starts)) == 1 and len(set(ends)) == 1 and ends[0] - starts[0] == image_width - 1:
                image_span = (starts[0], ends[0] + 1)
        device = mask.device
        return cls(
            prefill_length=length,
            image_counts=image_counts,
            keep_counts=keep_counts,
            image_span=image_span,
            image_index=image_first[:, :image_width],
            image_valid=slots_below(torch.tensor(image_counts, device=device), image_width),
            other_index=other_first[:, :other_width],
            other_valid=slots_below(length - torch.tensor(image_counts, device=device), other_width),
            active_valid=slots_below(torch.tensor(keep_counts, device=device), keep_width),
            has_image=torch.tensor(image_counts, device=device) > 0,
            image_mask=mask,
        )

    @property
    def uniform_rows(self) -> bool:
        """All rows have the same counts, so no padded slot exists in the compact layout."""
        return len(set(self.image_counts)) == 1

    @property
    def all_rows_have_images(self) -> bool:
        return all(self.image_counts)

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


class _MaskBuffer:
    """An additive key mask (batch, capacity): its first columns are reset from ``base`` (and then edited by its
    owner), the other columns (decoded tokens) stay 0, and the mask of a step is a view of its first columns, so
    nothing is concatenated per step."""

    def __init__(self, base: torch.Tensor):
        self.base = base
        self.values = base.new_zeros(base.shape[0], _aligned(base.shape[1] + _COMPACT_GROWTH))
        self.values[:, : base.shape[1]] = base

    def reset(self) -> torch.Tensor:
        """The first columns, set back to ``base``: a view to edit in place."""
        head = self.values[:, : self.base.shape[1]]
        head.copy_(self.base)
        return head

    def view(self, length: int) -> torch.Tensor:
        """(batch, 1, 1, length) view of the mask."""
        if length > self.values.shape[1]:
            grown = self.values.new_zeros(self.values.shape[0], _aligned(length + _COMPACT_GROWTH))
            grown[:, : self.values.shape[1]] = self.values
            self.values = grown
        return self.values[:, None, None, :length]


@dataclass
class _StepPlan:
    """What layers >= L do at the current decoding step (shared by all of them)."""

    cache_length: int
    compact: bool  # attend over the compact copy (the active set was kept), else over the full cache
    mask: torch.Tensor | None  # additive key mask of what is attended (full cache or compact layout); None: all
    version: int  # the active set the compact copy must hold
    sequence: _SequenceState
    # Tensors made once per step (per device, for models split over devices) by the first layer needing them.
    _made: dict[tuple[str, torch.device], torch.Tensor] = field(default_factory=dict)

    def mask_on(self, device: torch.device) -> torch.Tensor | None:
        if self.mask is None or self.mask.device == device:
            return self.mask
        mask = self._made.get(("mask", device))
        if mask is None:
            mask = self._made["mask", device] = self.mask.to(device)
        return mask

    def last_slot(self, slot: int, device: torch.device) -> torch.Tensor:
        """(1,) index of the compact slot receiving this step's token (made on the device: no host-to-device
        copy)."""
        index = self._made.get(("last_slot", device))
        if index is None:
            index = self._made["last_slot", device] = torch.full((1,), slot, dtype=torch.long, device=device)
        return index

    def rows(self, part: str, keys: torch.Tensor) -> torch.Tensor:
        """Flat cache rows (see :func:`_flat_rows`) of the 'other' or 'active' compact part."""
        rows = self._made.get((part, keys.device))
        if rows is None:
            positions = self.sequence.layout.other_index if part == "other" else self.sequence.gather_order()
            rows = self._made[part, keys.device] = _flat_rows(positions.to(keys.device), keys)
        return rows


@dataclass
class _SequenceState:
    layout: _ImageLayout
    steps: int = 0
    previous_direction: torch.Tensor | None = None  # a_prev / |a_prev|
    active: torch.Tensor | None = None  # (B, K_max) cache positions of the active image tokens, most attended first
    version: int = 0  # bumped whenever the active set is recomputed
    use_compact: bool | None = None  # whether steps that keep the set use the compact copy (set at the first step)
    plan: _StepPlan | None = None
    compact: dict[int, _CompactKV] = field(default_factory=dict)
    _rope: tuple | None = None  # the step's (cos, sin) and what rope_tables made of them
    full_mask: _MaskBuffer | None = None  # over the full cache: inactive image positions hidden
    compact_mask: _MaskBuffer | None = None  # over the compact layout: its unused slots hidden (uneven rows only)
    no_similarity: torch.Tensor | None = None  # (B,) NaN: the first step's cos(a, a_prev)

    @classmethod
    def started(cls, layout: _ImageLayout, dtype: torch.dtype) -> _SequenceState:
        """The state of a sequence at its prefill, with what its first decoding step needs made in advance."""
        return cls(
            layout,
            full_mask=_MaskBuffer(additive_key_mask(~layout.image_mask, dtype)[:, 0, 0]),
            no_similarity=torch.full(layout.has_image.shape, float("nan"), device=layout.has_image.device),
        )

    def rope_tables(self, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin with its first half negated), shaped for (batch, heads, 1, head_dim) states: made by the first
        layer of a step, reused by the others (the model passes every layer the same cos/sin tensors)."""
        cached = self._rope
        if cached is None or cached[0] is not cos or cached[1] is not sin:
            half = sin.shape[-1] // 2
            signed_sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
            cached = self._rope = (cos, sin, cos.unsqueeze(1), signed_sin.unsqueeze(1))
        return cached[2], cached[3]

    def select_active(self, image_attention: torch.Tensor, recompute: torch.Tensor, first_step: bool) -> None:
        layout = self.layout
        scores = image_attention
        if not layout.uniform_rows:  # (with even rows every slot is valid)
            scores = scores.masked_fill(~layout.image_valid, float("-inf"))
        top = scores.topk(layout.active_valid.shape[1], dim=1).indices  # descending, so valid slots come first
        candidate = layout.image_index.gather(1, top)
        if first_step or candidate.shape[0] == 1:  # (with one row, recomputed means that row recomputed)
            self.active = candidate
        else:
            self.active = torch.where(recompute[:, None], candidate, self.active)
        self.version += 1

    def gather_order(self) -> torch.Tensor:
        """The active positions in ascending order within each row's valid slots (unused slots stay last): the
        same keys, gathered with better memory locality than in attention order."""
        if self.layout.uniform_rows:
            return self.active.sort(dim=1).values
        valid = self.layout.active_valid
        order = self.active.masked_fill(~valid, torch.iinfo(self.active.dtype).max).argsort(dim=1)
        return self.active.gather(1, order)

    def plan_step(self, cache_length: int, key_valid: torch.Tensor | None, recomputed: bool, dtype) -> None:
        layout = self.layout
        if recomputed:
            # Full cache: everything visible but the image positions outside the active set.
            if self.full_mask.values.dtype != dtype:  # (made at the prefill from the hidden states' dtype)
                self.full_mask = _MaskBuffer(additive_key_mask(~layout.image_mask, dtype)[:, 0, 0])
            head = self.full_mask.reset()
            if layout.uniform_rows:
                head.scatter_(1, self.active, 0.0)
            else:  # unused active slots write back what they point at (an unselected image or a non-image token)
                unused = head.gather(1, self.active)
                head.scatter_(1, self.active, unused.masked_fill(layout.active_valid, 0.0))
        compact = self.use_compact and not recomputed
        if not compact:
            mask = self.full_mask.view(cache_length)
            if key_valid is not None:  # padding, or any key the model's own mask hides
                mask = mask.masked_fill(~key_valid[:, None, None, :], torch.finfo(dtype).min)
        elif key_valid is not None:
            # Compact layout per row: [non-image prefill | active image | decoded tokens], unused slots hidden.
            other_valid = layout.other_valid & key_valid.gather(1, layout.other_index)
            valid = torch.cat([other_valid, layout.active_valid, key_valid[:, layout.prefill_length :]], dim=1)
            mask = additive_key_mask(valid, dtype)
        elif layout.uniform_rows:
            mask = None
        else:
            if self.compact_mask is None:
                valid = torch.cat([layout.other_valid, layout.active_valid], dim=1)
                self.compact_mask = _MaskBuffer(additive_key_mask(valid, dtype)[:, 0, 0])
            prefix = layout.other_valid.shape[1] + layout.active_valid.shape[1]
            mask = self.compact_mask.view(prefix + cache_length - layout.prefill_length)
        self.plan = _StepPlan(cache_length, compact, mask, self.version, self)
        self.steps += 1


class _CompactKV:
    """One layer's keys/values at the compact layout's positions, with room to append decoded tokens.

    Brought up to date lazily by :meth:`sync`, so steps that attend over the full cache cost it nothing.
    """

    def __init__(self, layout: _ImageLayout):
        self.prefill_length = layout.prefill_length
        self.other_width = layout.other_index.shape[1]
        self.prefix = self.other_width + layout.active_valid.shape[1]
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.version = -1  # the active set held (none yet)
        self.decoded = 0  # decoded tokens held

    def sync(self, plan: _StepPlan, key, value, all_keys: torch.Tensor, all_values: torch.Tensor):
        """This step's compact keys/values: fill what is missing or stale from the full cache (``key`` and
        ``value`` are this step's token, the last of ``all_keys`` and ``all_values``)."""
        decoded = plan.cache_length - self.prefill_length
        length = self.prefix + decoded
        if self.keys is None:
            self.keys, self.values = _with_room(all_keys, length), _with_room(all_values, length)
            self._put_rows(all_keys, all_values, plan.rows("other", all_keys), 0)
        elif length > self.keys.shape[2]:
            kept = self.prefix + self.decoded
            self.keys = _with_room(self.keys, length, copy=kept)
            self.values = _with_room(self.values, length, copy=kept)
        if self.version != plan.version:
            self._put_rows(all_keys, all_values, plan.rows("active", all_keys), self.other_width)
            self.version = plan.version
        if self.decoded == decoded - 1:  # only this step's token is missing (the previous step was compact too)
            slot = plan.last_slot(self.prefix + self.decoded, key.device)
            self.keys.index_copy_(2, slot, key)
            self.values.index_copy_(2, slot, value)
        elif self.decoded < decoded:
            start, source = self.prefix + self.decoded, self.prefill_length + self.decoded
            self.keys[:, :, start:length] = all_keys[:, :, source:]
            self.values[:, :, start:length] = all_values[:, :, source:]
        self.decoded = decoded
        return self.keys[:, :, :length], self.values[:, :, :length]

    def _put_rows(self, all_keys, all_values, rows: torch.Tensor, start: int) -> None:
        batch, heads, _, head_dim = all_keys.shape
        width = rows.numel() // (batch * heads)
        for source, target in ((all_keys, self.keys), (all_values, self.values)):
            picked = source.reshape(-1, head_dim).index_select(0, rows)
            target[:, :, start : start + width] = picked.view(batch, heads, width, head_dim)


class DyCokeDecoderLayer(Qwen2DecoderLayer):
    """A ``Qwen2DecoderLayer`` that takes part in DyCoke KV pruning (installed by switching the class in place).

    At a pruned decoding step, layer L-1 decides the active image tokens from its own attention and layers >= L
    attend to the non-image and active image tokens. Everything else (prefill, no cache, pruning not started) runs
    the parent's forward unchanged.
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
        if past_key_values is not None:
            if layer_idx == pruning.layer - 1:
                if pruning._follow_sequence(past_key_values.get_seq_length(layer_idx), hidden_states):
                    return self._deciding_step(hidden_states, attention_mask, position_embeddings, past_key_values)
            else:
                sequence = pruning._sequence
                if sequence is not None and sequence.plan is not None and hidden_states.shape[1] == 1:
                    return self._pruned_step(hidden_states, position_embeddings, past_key_values, sequence)
        return super().forward(
            hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )

    def _cached_states(self, hidden_states, position_embeddings, past_key_values, sequence):
        """This token's rotated query, key and value, and this layer's cached keys/values (the token's appended)."""
        attention = self.self_attn
        normed = self.input_layernorm(hidden_states)
        head_shape = (*hidden_states.shape[:2], -1, attention.head_dim)
        query = attention.q_proj(normed).view(head_shape).transpose(1, 2)
        key = attention.k_proj(normed).view(head_shape).transpose(1, 2)
        value = attention.v_proj(normed).view(head_shape).transpose(1, 2)
        cos, signed_sin = sequence.rope_tables(*position_embeddings)
        half = attention.head_dim // 2
        # apply_rotary_pos_emb's x * cos + rotate_half(x) * sin, bit for bit, in half the operations.
        query = query * cos + query.roll(half, dims=-1) * signed_sin
        key = key * cos + key.roll(half, dims=-1) * signed_sin
        # The full cache keeps every token: pruned image keys can become active again later.
        all_keys, all_values = past_key_values.update(key, value, attention.layer_idx)
        return query, key, value, all_keys, all_values

    def _finish(self, residual: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        hidden_states = residual + self.self_attn.o_proj(attended)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))

    def _deciding_step(self, hidden_states, attention_mask, position_embeddings, past_key_values) -> torch.Tensor:
        """Layer L-1: attention over everything, whose probabilities also take the step's decision."""
        attention = self.self_attn
        _dynamic_cache_layer(past_key_values, attention.layer_idx)
        sequence = self.dycoke._sequence
        query, _, _, all_keys, all_values = self._cached_states(
            hidden_states, position_embeddings, past_key_values, sequence
        )
        key_valid = key_validity(attention_mask, all_keys.shape[0], all_keys.shape[2])
        attended, probabilities = single_query_attention_with_weights(
            query, all_keys, all_values, key_valid, attention.scaling
        )
        self.dycoke._decide(probabilities, key_valid, all_keys)
        return self._finish(hidden_states, attended)

    def _pruned_step(self, hidden_states, position_embeddings, past_key_values, sequence) -> torch.Tensor:
        """Layers >= L: attention over the non-image and active image keys."""
        attention, plan = self.self_attn, sequence.plan
        query, key, value, all_keys, all_values = self._cached_states(
            hidden_states, position_embeddings, past_key_values, sequence
        )
        if all_keys.shape[2] != plan.cache_length:
            raise RuntimeError(
                f"DyCoke KV pruning: layer {attention.layer_idx} holds {all_keys.shape[2]} cached tokens, the "
                f"decision of this step was taken for {plan.cache_length}"
            )
        if plan.compact:
            compact = sequence.compact.get(attention.layer_idx)
            if compact is None:
                compact = sequence.compact[attention.layer_idx] = _CompactKV(sequence.layout)
            keys, values = compact.sync(plan, key, value, all_keys, all_values)
        else:
            keys, values = all_keys, all_values
        attended = single_query_attention(query, keys, values, plan.mask_on(query.device), attention.scaling)
        return self._finish(hidden_states, attended)


def install_dycoke_kv_pruning(qwen2_model: torch.nn.Module, pruning: DyCokeKVPruning) -> None:
    """Switch layers L-1.. of ``qwen2_model.layers`` to :class:`DyCokeDecoderLayer` (idempotent).

    The layers are the same module objects afterwards (weights, hooks and device placement untouched).
    """
    if not isinstance(pruning, DyCokeKVPruning):
        raise TypeError(f"pruning must be a DyCokeKVPruning, got {describe(pruning)}")
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
        switch_class(layer, DyCokeDecoderLayer)
        layer.dycoke = pruning
    qwen2_model.dycoke_kv_pruning = pruning


def remove_dycoke_kv_pruning(qwen2_model: torch.nn.Module) -> None:
    """Give every DyCoke layer of ``qwen2_model.layers`` back its plain ``Qwen2DecoderLayer`` class."""
    for layer in qwen2_model.layers:
        if isinstance(layer, DyCokeDecoderLayer):
            switch_class(layer, Qwen2DecoderLayer)
            del layer.dycoke
    pruning = qwen2_model.__dict__.pop("dycoke_kv_pruning", None)
    if pruning is not None:
        pruning._pending = pruning._sequence = None


# ---- helpers ------------------------------------------------------------------------------------------------


def _dynamic_cache_layer(cache: Cache, layer_idx: int) -> DynamicLayer:
    layer = cache.layers[layer_idx] if layer_idx < len(cache.layers) else None
    if not isinstance(layer, DynamicLayer) or layer.is_sliding:
        raise NotImplementedError(
            f"DyCoke KV pruning needs a DynamicCache (full attention); got a {type(layer).__name__} cache layer"
        )
    return layer


def _aligned(columns: int) -> int:
    """``columns`` rounded up to a multiple of 16: a mask whose rows start at such strides is used in place by
    SDPA's memory-efficient CUDA kernel (it copies a misaligned one at every call)."""
    return -(-columns // 16) * 16


def _with_room(states: torch.Tensor, length: int, copy: int = 0) -> torch.Tensor:
    """A (batch, heads, length + growth, head_dim) buffer holding states[:, :, :copy]."""
    batch, heads, _, head_dim = states.shape
    buffer = states.new_empty(batch, heads, length + _COMPACT_GROWTH, head_dim)
    if copy:
        buffer[:, :, :copy] = states[:, :, :copy]
    return buffer


def _flat_rows(positions: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """Row numbers in cache.reshape(-1, head_dim) of (batch, position) pairs, for every head: (B * heads * W,).

    Selecting whole rows with index_select is several times faster than an element-wise torch.gather.
    """
    batch, heads, length, _ = cache.shape
    head_offsets = torch.arange(batch * heads, device=positions.device).view(batch, heads, 1) * length
    return (head_offsets + positions[:, None, :]).reshape(-1)
