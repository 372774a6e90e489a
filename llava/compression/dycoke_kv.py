"""DyCoke's dynamic KV-cache pruning at every decoding step (the second half of DyCoke, after TTM).

The rule. At each decoding step, the current query's attention at layer L-1 (softmax over the whole cache,
averaged over heads) read at the video-token positions gives a vector ``a``. At the first decoding step, or when
cos(a, a_prev) < 0.9, the *active* video tokens become the top int(n * (1 - p)) of ``a``; otherwise the previous
active set stays. Layers >= L attend to every non-video token (system prompt, question, newline, decoded tokens)
plus the active video tokens; layers < L attend to everything; the prefill is exact. Pruned tokens stay in the
cache and come back when a later step selects them. Every ``generate`` call starts fresh.

How it runs (per generation, in the cache's :class:`DyCokeKVState`):

- layer L-1, after its stock forward: one query projection of the layer's input and one pass over the layer's
  cached keys give ``a`` (:func:`~llava.compression._attention.mean_head_attention`); the active set is updated on
  the device with ``torch.where`` (no host read), and so is the list of tokens that entered it this step;
- layers >= L attend over a compact copy of their keys/values laid out
  [scratch | non-video prefill | active video | decoded tokens], with fixed shapes per generation. A step copies
  into it only the tokens that entered the active set (none when the set is kept, the common case with real
  models: then the attention reads only the kept keys), plus its own new token. The copies have a fixed count per
  step (int(n * (1 - p))); slots with nothing to copy write the scratch slot from one cache row instead, so a kept
  set costs a few cache-resident writes and no memory traffic. The full cache keeps only the prefill for these
  layers: decoded tokens live in the compact copy, the only place layers >= L read them from.

Fidelity switch, ``public_quirks=True`` (``dycoke_public_quirks``), reproducing the public code's decoding:
its prunable span is one token shorter than the merged video tokens (``image_token_length = size - 1`` in its
llava_arch.py), so it keeps int((M - 1) * (1 - p)) of them and always the last video token; and on a step whose
attention is similar to the previous step's (cos >= 0.9) it attends to the full cache instead of the kept set.
Those steps then run over the full cache with a mask hiding the inactive video tokens.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from llava.compression._attention import layer_query, mean_head_attention, slots_below
from llava.compression.decoding import (
    DECODE,
    PREFILL,
    DecodeCompressor,
    DecodeState,
    GenerationInputs,
    LayerInputs,
    mark_static,
)
from llava.compression.masks import BOOL, KeyMask, mask_kind
from llava.compression.settings import check_setting

__all__ = ["DyCokeKV", "DyCokeKVState", "without_last_video_token"]

# F.cosine_similarity's default eps.
_COSINE_EPS = 1e-8
_SCRATCH = 0  # compact slot 0: where copies with nothing to copy go


class DyCokeKV(DecodeCompressor):
    """DyCoke's KV pruning: decided at layer ``layer - 1`` (DyCoke's L), applied from layer ``layer`` on, keeping
    int(n * (1 - ``ratio``)) of the n video tokens (``ratio`` is DyCoke's p)."""

    name = "dycoke_kv"

    def __init__(self, layer: int = 3, ratio: float = 0.7, threshold: float = 0.9, public_quirks: bool = False):
        self.layer = check_setting("dycoke_l", layer)
        self.ratio = check_setting("dycoke_p", ratio)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            raise ValueError(f"DyCoke KV pruning threshold must be a finite number, got {threshold!r}")
        self.threshold = float(threshold)
        self.public_quirks = check_setting("dycoke_public_quirks", public_quirks)

    def describe(self) -> dict:
        return {"name": self.name, "layer": self.layer, "ratio": self.ratio, "threshold": self.threshold,
                "public_quirks": self.public_quirks}

    def new_state(self, inputs: GenerationInputs) -> DyCokeKVState | None:
        check_setting("dycoke_l", self.layer, inputs.num_layers)
        if self.ratio == 0:
            return None
        prunable = without_last_video_token(inputs.prunable) if self.public_quirks else inputs.prunable
        layout = _VideoLayout.from_mask(prunable, inputs.attention_mask, self.ratio)
        if not any(layout.video_counts):
            return None
        if not all(layout.keep_counts):
            warnings.warn(
                f"dycoke_p={self.ratio} keeps int(n * (1 - p)) = 0 of the n video tokens active "
                f"(n = {min(layout.video_counts)}): layers >= {self.layer} decode without seeing the video. "
                "Use a smaller dycoke_p.",
                stacklevel=4,
            )
        return DyCokeKVState(self, inputs, layout)


def without_last_video_token(prunable: torch.Tensor) -> torch.Tensor:
    """The public code's prunable span: each row's video tokens but the last one."""
    length = prunable.shape[1]
    last = length - 1 - prunable.flip(1).to(torch.uint8).argmax(dim=1)  # each row's last True (any row: argmax 0)
    shortened = prunable.clone()
    shortened[torch.arange(prunable.shape[0], device=prunable.device), last] = False
    return shortened


@dataclass
class _VideoLayout:
    """Where each prefill row's video and other tokens are, padded to common widths (counts read once)."""

    video_counts: list[int]
    keep_counts: list[int]  # int(n * (1 - p)) per row, the public code's rounding
    video_index: torch.Tensor  # (B, N) cache positions of the video tokens, valid where video_valid
    video_valid: torch.Tensor  # (B, N)
    other_index: torch.Tensor  # (B, O) cache positions of the other prefill tokens
    other_valid: torch.Tensor  # (B, O) (padding is an 'other' token, hidden by the attention mask)
    active_valid: torch.Tensor  # (B, K) which of the K active slots each row uses
    has_video: torch.Tensor  # (B,)

    @classmethod
    def from_mask(cls, prunable: torch.Tensor, attention_mask: torch.Tensor, ratio: float) -> _VideoLayout:
        length = prunable.shape[1]
        video_counts = prunable.sum(dim=1).tolist()
        keep_counts = [int(count * (1 - ratio)) for count in video_counts]
        # A stable sort puts each row's video (or other) positions first, in order.
        video_first = torch.sort(prunable.to(torch.uint8), dim=1, descending=True, stable=True).indices
        other_first = torch.sort(prunable.to(torch.uint8), dim=1, stable=True).indices
        counts = torch.tensor(video_counts, device=prunable.device)
        other_width = length - min(video_counts)
        other_index = other_first[:, :other_width]
        return cls(
            video_counts=video_counts,
            keep_counts=keep_counts,
            video_index=video_first[:, : max(video_counts)],
            video_valid=slots_below(counts, max(video_counts)),
            other_index=other_index,
            other_valid=slots_below(length - counts, other_width) & attention_mask.gather(1, other_index),
            active_valid=slots_below(torch.tensor(keep_counts, device=prunable.device), max(keep_counts)),
            has_video=counts > 0,
        )

    @property
    def uniform(self) -> bool:
        return len(set(self.video_counts)) == 1


class DyCokeKVState(DecodeState):
    """DyCoke KV pruning of one generation (see the module docstring)."""

    def __init__(self, method: DyCokeKV, inputs: GenerationInputs, layout: _VideoLayout):
        super().__init__(inputs)
        self.method, self.layout = method, layout
        self.decision_layer, self.first_pruned = method.layer - 1, method.layer
        self.compact = not method.public_quirks
        batch, device = inputs.prunable.shape[0], inputs.prunable.device
        capacity = inputs.decoded_capacity
        self.keep = layout.active_valid.shape[1]
        self.others = layout.other_index.shape[1]
        # Per-step state, updated in place: fixed addresses and shapes for the whole generation.
        self.step = torch.zeros(1, dtype=torch.long, device=device)  # decoding steps started
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # this step's index, from 0
        self.previous_direction = torch.zeros(batch, layout.video_index.shape[1], device=device)  # a_prev / |a_prev|
        self.active = torch.full((batch, self.keep + 1), -1, dtype=torch.long, device=device)  # last column: scratch
        self.recomputed = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.similarity = torch.full((batch, capacity), float("nan"), device=device)
        self.entered = torch.zeros(batch, capacity, dtype=torch.long, device=device)
        self.history = torch.zeros(batch, capacity, self.keep, dtype=torch.long, device=device) if inputs.record else None
        # The decision layer's key validity over the full cache [prefill | decoded].
        self.key_valid = KeyMask(inputs.attention_mask, capacity, BOOL, torch.bool)
        kind = mask_kind(inputs.attn_implementation)
        if self.compact:
            prefix = torch.cat([layout.other_valid, layout.active_valid], dim=1)
            self.pruned_mask = KeyMask(prefix, capacity, kind, inputs.dtype)
        else:  # public quirks: the full cache, inactive video tokens hidden on the steps that recompute the set
            self.pruned_mask = KeyMask(inputs.attention_mask, capacity, kind, inputs.dtype)
            self.pruned_mask.allow_changes()
        self.copies: dict[int, tuple[torch.Tensor, ...]] = {}  # layer -> (compact keys, compact values, full k, full v)
        self.src_rows = self.dst_rows = None  # (B * heads * K,) flat rows of this step's copies
        self.decoded_slot = torch.zeros(1, dtype=torch.long, device=device)  # compact slot of this step's token
        self.key_length = self.prefill_length  # full-cache key length at the current step (a Python int)
        mark_static(self.step, self.slot, self.previous_direction, self.active, self.recomputed, self.similarity,
                    self.entered, self.decoded_slot, self.key_valid.values, self.pruned_mask.values)

    # ---- hooks ---------------------------------------------------------------------------------------------------

    def begin_step(self, cache) -> None:
        self.slot.copy_(self.step)
        self.step.add_(1)
        self.decoded_slot.copy_(self.slot + 1 + self.others + self.keep)
        # The full cache's key length after this step's update: the static cache's fixed size, or the dynamic
        # cache's current length plus this token (Python ints, read from shapes).
        self.key_length = cache.layers[0].get_mask_sizes(1)[0]
        decoded = self.key_length - self.prefill_length
        if decoded > self.recomputed.shape[1]:  # a dynamic cache longer than planned (eager decoding only)
            self._grow(decoded + 256)
        self.key_valid.mark_decoded(self.slot)
        self.pruned_mask.mark_decoded(self.slot)

    def layer_inputs(self, layer_idx: int, inputs: LayerInputs, cache) -> LayerInputs:
        if self.phase != DECODE or layer_idx < self.first_pruned:
            return inputs
        decoded = self.key_length - self.prefill_length
        prefix = self.others + self.keep if self.compact else self.prefill_length
        static = self.inputs.static_cache
        return inputs._replace(attention_mask=self.pruned_mask.view(prefix + decoded, all_marked=not static))

    def observe(self, decoder_layer, layer_idx: int, inputs: LayerInputs, cache) -> None:
        if self.phase == DECODE and layer_idx == self.decision_layer:
            self._decide(decoder_layer, inputs, cache)

    def keeps_full_cache(self, layer_idx: int) -> bool:
        return not (self.compact and self.phase == DECODE and layer_idx >= self.first_pruned)

    def update_cache(self, layer_idx, key, value, keys, values):
        if not self.compact or layer_idx < self.first_pruned:
            return keys, values
        if self.phase == PREFILL:
            self._start_copy(layer_idx, keys, values)
            return keys, values
        compact_keys, compact_values, full_keys, full_values = self.copies[layer_idx]
        head_dim = key.shape[-1]
        for compact, full, new in ((compact_keys, full_keys, key), (compact_values, full_values, value)):
            entering = full.reshape(-1, head_dim).index_select(0, self.src_rows)
            compact.view(-1, head_dim).index_copy_(0, self.dst_rows, entering)
            compact.index_copy_(2, self.decoded_slot, new)
        length = self.others + self.keep + self.key_length - self.prefill_length
        return compact_keys[:, :, 1 : 1 + length], compact_values[:, :, 1 : 1 + length]

    # ---- the decision (layer L-1) --------------------------------------------------------------------------------

    def _decide(self, decoder_layer, inputs: LayerInputs, cache) -> None:
        layout = self.layout
        query = layer_query(decoder_layer, inputs.hidden_states, *inputs.position_embeddings)
        keys = cache.layers[self.decision_layer].keys
        valid = self.key_valid.view(keys.shape[2], all_marked=True)
        attention = mean_head_attention(query, keys, valid, decoder_layer.self_attn.scaling)
        video_attention = attention.gather(1, layout.video_index)
        if not layout.uniform:
            video_attention = video_attention * layout.video_valid
        # cos(a, a_prev) exactly as F.cosine_similarity computes it (a_prev / |a_prev| kept from the last step).
        norm = torch.linalg.vector_norm(video_attention, dim=-1, keepdim=True).clamp_min(_COSINE_EPS)
        direction = video_attention / norm
        similarity = (direction * self.previous_direction).sum(dim=-1)
        first = self.slot == 0
        recompute = (first | (similarity < self.method.threshold)) & layout.has_video
        # As in the public code, a_prev follows every step, not only the steps that recompute.
        self.previous_direction.copy_(direction)
        scores = video_attention if layout.uniform else video_attention.masked_fill(~layout.video_valid, -math.inf)
        candidates = layout.video_index.gather(1, scores.topk(self.keep, dim=1).indices)  # most attended first
        if self.compact:
            entered = self._plan_copies(candidates, recompute)
        else:
            entered = self._hide_inactive(candidates, recompute)
        self.recomputed.index_copy_(1, self.slot, recompute[:, None])
        self.similarity.index_copy_(1, self.slot, torch.where(first, math.nan, similarity)[:, None])
        self.entered.index_copy_(1, self.slot, entered[:, None])
        if self.history is not None:
            self.history.index_copy_(1, self.slot, self.active[:, None, : self.keep])

    def _plan_copies(self, candidates: torch.Tensor, recompute: torch.Tensor) -> torch.Tensor:
        """Update the active set to ``candidates`` in the rows that ``recompute``, keeping in its slot every token
        that stays and giving the slots of the tokens that leave to those that enter; sets this step's copies
        (``src_rows`` -> ``dst_rows``, scratch for unused copies). Returns how many tokens entered, per row."""
        layout, keep = self.layout, self.keep
        held = self.active[:, :keep]
        none = self.prefill_length  # an extra map column for empty slots and unused candidates
        held_index = torch.where(held >= 0, held, none)
        candidate_index = torch.where(layout.active_valid, candidates, none)
        held_map = _membership(held_index, none)
        candidate_map = _membership(candidate_index, none)
        update = layout.active_valid & recompute[:, None]
        entering = update & ~held_map.gather(1, candidate_index)
        leaving = update & ~candidate_map.gather(1, held_index)
        # The i-th entering token takes the i-th leaving slot (both lists have the same length per row).
        enter_order = torch.sort((~entering).to(torch.uint8), dim=1, stable=True).indices
        leave_order = torch.sort((~leaving).to(torch.uint8), dim=1, stable=True).indices
        count = entering.sum(dim=1)
        used = torch.arange(keep, device=count.device) < count[:, None]
        source = torch.where(used, candidates.gather(1, enter_order), 0)  # unused copies read position 0...
        slot = torch.where(used, leave_order, keep)  # ... and land in the active set's scratch column
        self.active.scatter_(1, slot, torch.where(used, source, -1))
        target = torch.where(used, 1 + self.others + leave_order, _SCRATCH)
        self.src_rows.copy_((self.src_offsets + source[:, None, :]).reshape(-1))
        self.dst_rows.copy_((self.dst_offsets + target[:, None, :]).reshape(-1))
        return count

    def _hide_inactive(self, candidates: torch.Tensor, recompute: torch.Tensor) -> torch.Tensor:
        """Public quirks: layers >= L see the full cache, less the video tokens outside this step's top set on the
        steps that recompute it (and everything on the steps that keep it, as the public code does)."""
        layout = self.layout
        previous = self.active[:, : self.keep]
        self.active[:, : self.keep].copy_(torch.where(recompute[:, None], candidates, previous))
        none = self.prefill_length
        active_map = _membership(torch.where(layout.active_valid, self.active[:, : self.keep], none), none)
        video_map = _membership(torch.where(layout.video_valid, layout.video_index, none), none)
        hidden = video_map & ~active_map & recompute[:, None]
        self.pruned_mask.set_prefix(self.inputs.attention_mask & ~hidden[:, :none])
        return torch.where(recompute, layout.active_valid.sum(dim=1), 0)

    # ---- the compact copies (layers >= L) ------------------------------------------------------------------------

    def _start_copy(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """At the prefill: this layer's compact copy, holding the other prefill tokens already."""
        batch, heads, source_length, head_dim = keys.shape
        capacity = 1 + self.others + self.keep + self.recomputed.shape[1]
        if self.src_rows is None:
            offsets = torch.arange(batch * heads, device=keys.device).view(batch, heads, 1)
            self.src_offsets, self.dst_offsets = offsets * source_length, offsets * capacity
            self.src_rows = torch.zeros(batch * heads * self.keep, dtype=torch.long, device=keys.device)
            self.dst_rows = torch.zeros_like(self.src_rows)
            mark_static(self.src_rows, self.dst_rows, self.src_offsets, self.dst_offsets)
        other_rows = (self.src_offsets + self.layout.other_index[:, None, :]).reshape(-1)
        copies = []
        for full in (keys, values):
            compact = full.new_zeros(batch, heads, capacity, head_dim)
            compact[:, :, 1 : 1 + self.others] = full.reshape(-1, head_dim)[other_rows].view(batch, heads, -1, head_dim)
            mark_static(compact)
            copies.append(compact)
        self.copies[layer_idx] = (*copies, keys, values)

    def _grow(self, decoded_capacity: int) -> None:
        """Room for more decoded tokens than planned (a dynamic cache, eager decoding)."""
        self.recomputed = _extended(self.recomputed, 1, decoded_capacity, False)
        self.similarity = _extended(self.similarity, 1, decoded_capacity, math.nan)
        self.entered = _extended(self.entered, 1, decoded_capacity, 0)
        if self.history is not None:
            self.history = _extended(self.history, 1, decoded_capacity, 0)
        self.key_valid.grow(decoded_capacity)
        self.pruned_mask.grow(decoded_capacity)
        if self.copies:
            old_capacity = next(iter(self.copies.values()))[0].shape[2]
            capacity = 1 + self.others + self.keep + decoded_capacity
            for layer_idx, (keys, values, full_keys, full_values) in self.copies.items():
                self.copies[layer_idx] = (
                    _extended(keys, 2, capacity, 0), _extended(values, 2, capacity, 0), full_keys, full_values
                )
            self.dst_offsets = self.dst_offsets // old_capacity * capacity

    # ---- statistics ----------------------------------------------------------------------------------------------

    def summary(self) -> dict:
        """``image_tokens`` and ``active_image_tokens``: video tokens per row (the active count is the same at every step);
        ``decode_steps``; per row: ``recomputations`` (the first step counts), ``recompute_steps``, ``entered``
        (tokens that entered the active set at each step) and ``similarity`` (cos(a, a_prev) per step, NaN first)."""
        steps = int(self.step)
        recomputed = self.recomputed[:, :steps].tolist()
        return {
            "mode": "compact" if self.compact else "public_quirks",
            "layer": self.method.layer,
            "ratio": self.method.ratio,
            "image_tokens": list(self.layout.video_counts),
            "active_image_tokens": list(self.layout.keep_counts),
            "decode_steps": steps,
            "recomputations": [sum(row) for row in recomputed],
            "recompute_steps": [[step for step, hit in enumerate(row) if hit] for row in recomputed],
            "entered": self.entered[:, :steps].tolist(),
            "similarity": self.similarity[:, :steps].tolist(),
        }

    def active_positions(self, row: int = 0) -> list[torch.Tensor]:
        """Cache positions of ``row``'s active video tokens at each decoding step (recorded with ``record``)."""
        if self.history is None:
            return []
        keep = self.layout.keep_counts[row]
        return [positions[:keep].sort().values for positions in self.history[row, : int(self.step)].cpu()]


def _extended(tensor: torch.Tensor, dim: int, size: int, fill) -> torch.Tensor:
    """``tensor`` with dimension ``dim`` extended to ``size`` entries, the new ones ``fill``."""
    shape = list(tensor.shape)
    shape[dim] = size - tensor.shape[dim]
    return torch.cat([tensor, tensor.new_full(shape, fill)], dim=dim)


def _membership(index: torch.Tensor, width: int) -> torch.Tensor:
    """(B, width + 1) bool map of the positions in ``index`` (B, K); column ``width`` collects the 'none' entries
    and is always False."""
    found = torch.zeros(index.shape[0], width + 1, dtype=torch.bool, device=index.device)
    found.scatter_(1, index, True)
    found[:, width] = False
    return found
