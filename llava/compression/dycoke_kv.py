"""DyCoke's dynamic KV-cache pruning at every decoding step (the second half of DyCoke, after TTM).

The rule. At each decoding step, the current query's attention at layer L-1 (softmax over the whole cache,
averaged over heads) read at the video-token positions gives a vector ``a``. At the first decoding step, or when
cos(a, a_prev) < 0.9, the *active* video tokens become the top int(n * (1 - p)) of ``a``; otherwise the previous
active set stays. Layers >= L attend to every non-video token (system prompt, question, newline, decoded tokens)
plus the active video tokens; layers < L attend to everything; the prefill is exact. Pruned tokens stay in the
cache and come back when a later step selects them. Every ``generate`` call starts fresh.

How it runs (per generation, in the cache's :class:`DyCokeKVState`):

- layer L-1, after its stock forward: one query projection of the layer's input and one pass over the layer's
  cached keys give ``a`` (:func:`~llava.compression._attention.mean_head_attention`), with the keys' validity
  always explicit (a static cache's unfilled slots are hidden, as a dynamic cache has none), so every path computes
  the same softmax; the ranking is a stable sort, so equal scores rank in position order on every path (``topk``'s
  order among ties is the kernel's), and the lowest kept and highest dropped scores of each recomputation are logged
  (``boundary_scores``: a near-tie shows). The active set is updated on the device with ``torch.where`` (no host
  read), and so are this step's copies into the active slots;
- layers >= L keep their keys/values in a store of their own laid out
  [scratch | video tokens | non-video prefill | active copies | decoded tokens], with fixed shapes per generation;
  a decoding step attends over the contiguous slots from the non-video prefill on, so it reads only the kept keys.
  A step that recomputes the active set copies the K = int(n * (1 - p)) chosen tokens into the active slots; a
  step that keeps it copies nothing (its K copies read and write the scratch slot: cache-resident, no memory
  traffic). The store replaces the transformers cache layer of these layers, which stays empty: besides the
  active copies, no key or value is held twice.

Fidelity switch, ``public_quirks=True`` (``dycoke_public_quirks``), reproducing the public code's decoding:
its prunable span is one token shorter than the merged video tokens (``image_token_length = size - 1`` in its
llava_arch.py), so it keeps int((M - 1) * (1 - p)) of them and always the last video token; and on a step whose
attention is similar to the previous step's (cos >= 0.9) it attends to the full cache instead of the kept set.
Those steps then run over the full cache with a mask hiding the inactive video tokens. The trace
(``active_positions``) reports what layers >= L attend to: the kept tokens and the last video token on the steps
that recompute, every video token on the others.
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

__all__ = ["DyCokeKV", "DyCokeKVState", "rank_by_score", "without_last_video_token"]

# F.cosine_similarity's default eps.
_COSINE_EPS = 1e-8


class DyCokeKV(DecodeCompressor):
    """DyCoke's KV pruning: decided at layer ``layer - 1`` (DyCoke's L), applied from layer ``layer`` on, keeping
    int(n * (1 - ``ratio``)) of the n video tokens (``ratio`` is DyCoke's p)."""

    name = "dycoke_kv"
    label = "DyCoke KV pruning"
    stats_key = "kv_pruning"

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

    def unmodified_summary(self) -> dict:
        return {"layer": self.layer, "ratio": self.ratio, "image_tokens": [], "active_image_tokens": [],
                "decode_steps": 0, "recomputations": [], "recompute_steps": [], "entered": [], "similarity": []}

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


def rank_by_score(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted scores, their indices) of each row of ``scores``, highest first; equal scores in index order (the
    earlier video token first). A stable sort rather than ``topk``, whose order among equal scores depends on the
    kernel: every path (dynamic or static cache, compiled, a row alone or in a batch) breaks a tie the same way."""
    return scores.sort(dim=1, descending=True, stable=True)


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
    keep: torch.Tensor  # (B,) keep_counts on the device
    has_video: torch.Tensor  # (B,)
    has_boundary: torch.Tensor  # (B,) some video tokens kept and some dropped

    @classmethod
    def from_mask(cls, prunable: torch.Tensor, attention_mask: torch.Tensor, ratio: float) -> _VideoLayout:
        length = prunable.shape[1]
        video_counts = prunable.sum(dim=1).tolist()
        keep_counts = [int(count * (1 - ratio)) for count in video_counts]
        # A stable sort puts each row's video (or other) positions first, in order.
        video_first = torch.sort(prunable.to(torch.uint8), dim=1, descending=True, stable=True).indices
        other_first = torch.sort(prunable.to(torch.uint8), dim=1, stable=True).indices
        counts = torch.tensor(video_counts, device=prunable.device)
        keep = torch.tensor(keep_counts, device=prunable.device)
        other_width = length - min(video_counts)
        other_index = other_first[:, :other_width]
        return cls(
            video_counts=video_counts,
            keep_counts=keep_counts,
            video_index=video_first[:, : max(video_counts)],
            video_valid=slots_below(counts, max(video_counts)),
            other_index=other_index,
            other_valid=slots_below(length - counts, other_width) & attention_mask.gather(1, other_index),
            active_valid=slots_below(keep, max(keep_counts)),
            keep=keep,
            has_video=counts > 0,
            has_boundary=(keep > 0) & (keep < counts),
        )

    @property
    def uniform(self) -> bool:
        return len(set(self.video_counts)) == 1


class DyCokeKVState(DecodeState):
    """DyCoke KV pruning of one generation (see the module docstring).

    Layers >= L keep their keys/values in a store of their own (not in the transformers cache layer), one tensor
    (2 [keys, values], batch, key heads, slots, head_dim) laid out per row as
    ``[scratch | video tokens | other prefill | active copies | decoded]``: a decoding step attends over the
    contiguous slots from ``other`` on. Video tokens are numbered 0..n-1 in prompt order; ``active`` holds the
    numbers of the tokens copied into the active slots.
    """

    def __init__(self, method: DyCokeKV, inputs: GenerationInputs, layout: _VideoLayout):
        super().__init__(inputs)
        self.method, self.layout = method, layout
        self.decision_layer, self.first_pruned = method.layer - 1, method.layer
        self.compact = not method.public_quirks
        batch, device = inputs.prunable.shape[0], inputs.prunable.device
        capacity = inputs.decoded_capacity
        self.videos = layout.video_index.shape[1]  # N, the widest row's video tokens
        self.keep = layout.active_valid.shape[1]  # K
        self.others = layout.other_index.shape[1]  # O
        # Store regions (slot offsets); slot 0 is the scratch slot that unused copies go to.
        self.other_start = 1 + self.videos
        self.active_start = self.other_start + self.others
        self.decoded_start = self.active_start + self.keep
        # Per-step state, updated in place: fixed addresses and shapes for the whole generation.
        self.step = torch.zeros(1, dtype=torch.long, device=device)  # decoding steps started
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # this step's index, from 0
        self.previous_direction = torch.zeros(batch, self.videos, device=device)  # a_prev / |a_prev|
        self.active = torch.full((batch, self.keep), self.videos, dtype=torch.long, device=device)  # N: none yet
        # Per step and row: [recomputed (0/1), cos(a, a_prev) (NaN at the first step), tokens that entered the set,
        # the lowest kept and the highest dropped score (NaN on steps that keep the set)].
        self.log = torch.zeros(batch, capacity, 5, device=device)
        self.history = torch.zeros(batch, capacity, self.keep, dtype=torch.long, device=device) if inputs.record else None
        # The decision layer's key validity over the full cache [prefill | decoded].
        self.key_valid = KeyMask(inputs.attention_mask, capacity, BOOL, torch.bool)
        kind = mask_kind(inputs.attn_implementation)
        tensors = [self.active]
        if self.compact:
            prefix = torch.cat([layout.other_valid, layout.active_valid], dim=1)
            self.pruned_mask = KeyMask(prefix, capacity, kind, inputs.dtype)
            self.stores: dict[int, torch.Tensor] = {}  # layer -> (2, B, heads, slots, head_dim)
            self.store_index = self.row_base = None  # index tensors into the stores, made with the first one
            # This step's copies into the active slots, per row: the slots read and written (scratch: 0).
            self.copy_from = torch.zeros(batch, self.keep, dtype=torch.long, device=device)
            self.copy_to = torch.zeros_like(self.copy_from)
            self.decoded_slot = torch.zeros(1, dtype=torch.long, device=device)  # the store slot of this step's token
            tensors += [self.copy_from, self.copy_to, self.decoded_slot]
        else:  # public quirks: the full cache, inactive video tokens hidden on the steps that recompute the set
            self.pruned_mask = KeyMask(inputs.attention_mask, capacity, kind, inputs.dtype)
            self.pruned_mask.allow_changes()
        self.key_length = self.prefill_length  # full-cache key length at the current step (a Python int)
        mark_static(self.step, self.slot, self.previous_direction, self.log,
                    self.key_valid.values, self.pruned_mask.values, *tensors)

    # ---- hooks ---------------------------------------------------------------------------------------------------

    def begin_step(self, cache) -> None:
        self.slot.copy_(self.step)
        self.step.add_(1)
        # The full cache's key length after this step's update: the static cache's fixed size, or the dynamic
        # cache's current length plus this token (Python ints, read from shapes).
        self.key_length = cache.layers[0].get_mask_sizes(1)[0]
        decoded = self.key_length - self.prefill_length
        if decoded > self.log.shape[1]:  # a dynamic cache longer than planned (eager decoding only)
            self._grow(decoded + 256)
        self.key_valid.mark_decoded(self.slot)
        self.pruned_mask.mark_decoded(self.slot)
        if self.compact:
            self.decoded_slot.copy_(self.slot + self.decoded_start)

    def layer_inputs(self, layer_idx: int, inputs: LayerInputs, cache) -> LayerInputs:
        if layer_idx < self.first_pruned:
            return inputs
        if self.phase == PREFILL:
            mask = inputs.attention_mask
            if self.compact and mask is not None and mask.shape[-1] > self.prefill_length:
                # A static cache's prefill mask spans its whole length; this layer attends over the prefill only.
                return inputs._replace(attention_mask=mask[..., : self.prefill_length])
            return inputs
        decoded = self.key_length - self.prefill_length
        prefix = self.others + self.keep if self.compact else self.prefill_length
        static = self.inputs.static_cache
        return inputs._replace(attention_mask=self.pruned_mask.view(prefix + decoded, all_marked=not static))

    def observe(self, decoder_layer, layer_idx: int, inputs: LayerInputs, cache) -> None:
        if self.phase == DECODE and layer_idx == self.decision_layer:
            self._decide(decoder_layer, inputs, cache)

    def keeps_full_cache(self, layer_idx: int) -> bool:
        return not (self.compact and layer_idx >= self.first_pruned)

    def update_cache(self, layer_idx, key, value, keys, values):
        if not self.compact or layer_idx < self.first_pruned:
            return keys, values
        if self.phase == PREFILL:
            self._start_store(layer_idx, key, value)
            return key, value  # the prefill is exact: it attends over its own keys
        store = self.stores[layer_idx]
        if torch.compiler.is_compiling():  # in place on the store itself: compiled code copies a reshaped view whole
            kv, row, head = self.store_index
            source, target = self.copy_from[:, None, :], self.copy_to[:, None, :]  # (B, 1, K): each row, every head
            store.index_put_((kv, row, head, target), store[kv, row, head, source])
        else:  # whole-row copies: several times faster than element-wise indexing when not compiled
            rows = store.view(-1, store.shape[-1])
            rows.index_copy_(0, self.rows_to, rows.index_select(0, self.rows_from))
        store.index_copy_(3, self.decoded_slot, torch.stack([key, value]))
        length = self.others + self.keep + self.key_length - self.prefill_length
        view = store[:, :, :, self.other_start : self.other_start + length]
        return view[0], view[1]

    # ---- the decision (layer L-1) --------------------------------------------------------------------------------

    def _decide(self, decoder_layer, inputs: LayerInputs, cache) -> None:
        layout = self.layout
        video_attention = self._video_attention(decoder_layer, inputs, cache)
        # cos(a, a_prev) exactly as F.cosine_similarity computes it (a_prev / |a_prev| kept from the last step).
        norm = torch.linalg.vector_norm(video_attention, dim=-1, keepdim=True).clamp_min(_COSINE_EPS)
        direction = video_attention / norm
        similarity = (direction * self.previous_direction).sum(dim=-1)
        first = self.slot == 0
        recompute = (first | (similarity < self.method.threshold)) & layout.has_video
        # As in the public code, a_prev follows every step, not only the steps that recompute.
        self.previous_direction.copy_(direction)
        scores = video_attention if layout.uniform else video_attention.masked_fill(~layout.video_valid, -math.inf)
        ranked, order = rank_by_score(scores)
        candidates = order[:, : self.keep]  # video tokens, most attended first
        if self.compact:
            entered = self._copy_in(candidates, recompute)
        else:
            entered = self._hide_inactive(candidates, recompute)
        record = torch.stack([recompute.float(), torch.where(first, math.nan, similarity), entered.float()], dim=1)
        boundary = self._boundary(ranked).masked_fill(~recompute[:, None], math.nan)
        self.log.index_copy_(1, self.slot, torch.cat([record, boundary], dim=1)[:, None])
        if self.history is not None:
            self.history.index_copy_(1, self.slot, self._active_positions()[:, None])

    def _video_attention(self, decoder_layer, inputs: LayerInputs, cache) -> torch.Tensor:
        """(B, N) the vector ``a``: this step's query at layer L-1 over that layer's whole cache (prefill and decoded
        tokens, this one included), softmax, mean over heads, read at the video tokens (0 at a row's unused slots).

        The key validity is always explicit, so every cache computes the same softmax: a static cache's keys include
        its unfilled slots (zeros, which a softmax would weigh), and a dynamic cache's do not."""
        query = layer_query(decoder_layer, inputs.hidden_states, *inputs.position_embeddings)
        keys = cache.layers[self.decision_layer].keys
        valid = self.key_valid.view(keys.shape[2], all_marked=False)
        attention = mean_head_attention(query, keys, valid, decoder_layer.self_attn.scaling)
        video_attention = attention.gather(1, self.layout.video_index)
        return video_attention if self.layout.uniform else video_attention * self.layout.video_valid

    def _boundary(self, ranked: torch.Tensor) -> torch.Tensor:
        """(B, 2) each row's lowest kept score and highest dropped score (NaN where nothing or everything is kept):
        when the two are within rounding, another path's arithmetic could swap them."""
        keep = self.layout.keep[:, None]
        last_kept = ranked.gather(1, (keep - 1).clamp(min=0))
        first_dropped = ranked.gather(1, keep.clamp(max=self.videos - 1))
        return torch.cat([last_kept, first_dropped], dim=1).masked_fill(~self.layout.has_boundary[:, None], math.nan)

    def _copy_in(self, candidates: torch.Tensor, recompute: torch.Tensor) -> torch.Tensor:
        """Make ``candidates`` (video token numbers) the active set of the rows that ``recompute``: this step copies
        their store rows into the active slots (``copy_from`` -> ``copy_to``); rows that keep their set copy the
        scratch slot onto itself. Returns how many tokens entered the set, per row."""
        update = self.layout.active_valid & recompute[:, None]
        entered = (update & ~self._held(candidates)).sum(dim=1)
        self.active.copy_(torch.where(update, candidates, self.active))
        self.copy_from.copy_(torch.where(update, 1 + candidates, 0))
        self.copy_to.copy_(torch.where(update, self.active_start + torch.arange(self.keep, device=update.device), 0))
        if not torch.compiler.is_compiling():  # the same row numbers serve every layer's store this step
            self.rows_from, self.rows_to = self.rows(self.copy_from), self.rows(self.copy_to)
        return entered

    def _hide_inactive(self, candidates: torch.Tensor, recompute: torch.Tensor) -> torch.Tensor:
        """Public quirks: layers >= L see the full cache, less the video tokens outside this step's top set on the
        steps that recompute it (and everything on the steps that keep it, as the public code does)."""
        layout = self.layout
        update = layout.active_valid & recompute[:, None]
        entered = (update & ~self._held(candidates)).sum(dim=1)
        self.active.copy_(torch.where(update, candidates, self.active))
        visible = self._held(torch.arange(self.videos, device=update.device).expand_as(layout.video_valid))
        hidden = layout.video_valid & ~visible & recompute[:, None]
        mask = self.inputs.attention_mask.clone()
        mask.scatter_(1, layout.video_index, mask.gather(1, layout.video_index) & ~hidden)
        self.pruned_mask.set_prefix(mask)
        return entered

    def _held(self, tokens: torch.Tensor) -> torch.Tensor:
        """Whether each of ``tokens`` (video token numbers, (B, T)) is in the active set."""
        held = torch.zeros(tokens.shape[0], self.videos + 1, dtype=torch.bool, device=tokens.device)
        held.scatter_(1, self.active, True)
        held[:, self.videos] = False
        return held.gather(1, tokens)

    def _active_positions(self) -> torch.Tensor:
        """(B, K) prompt positions of the active video tokens (unused slots: any position)."""
        return self.layout.video_index.gather(1, self.active.clamp(max=self.videos - 1))

    def rows(self, slots: torch.Tensor) -> torch.Tensor:
        """Row numbers in ``store.view(-1, head_dim)`` of per-row store ``slots`` (B, K), for keys and values and
        every head."""
        return (self.row_base + slots[None, :, None, :]).reshape(-1)

    # ---- the stores (layers >= L) --------------------------------------------------------------------------------

    def _start_store(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """At the prefill: this layer's store, holding the video and other prefill tokens (no active copy yet)."""
        batch, heads, length, head_dim = keys.shape
        slots = self.decoded_start + self.log.shape[1]
        if self.row_base is None:
            device = keys.device
            self.store_index = (torch.arange(2, device=device).view(2, 1, 1, 1),
                                torch.arange(batch, device=device).view(1, batch, 1, 1),
                                torch.arange(heads, device=device).view(1, 1, heads, 1))
            self.row_base = torch.arange(2 * batch * heads, device=device).view(2, batch, heads, 1) * slots
            mark_static(*self.store_index, self.row_base)
        layout = self.layout
        sources = torch.cat([torch.zeros_like(layout.other_index[:, :1]), layout.video_index, layout.other_index], 1)
        sources = sources[:, None, :, None].expand(-1, heads, -1, head_dim)
        store = keys.new_zeros(2, batch, heads, slots, head_dim)
        store[0, :, :, : self.active_start] = keys.gather(2, sources)
        store[1, :, :, : self.active_start] = values.gather(2, sources)
        mark_static(store)
        self.stores[layer_idx] = store

    def _grow(self, decoded_capacity: int) -> None:
        """Room for more decoded tokens than planned (a dynamic cache, eager decoding)."""
        self.log = _extended(self.log, 1, decoded_capacity, 0)
        if self.history is not None:
            self.history = _extended(self.history, 1, decoded_capacity, 0)
        self.key_valid.grow(decoded_capacity)
        self.pruned_mask.grow(decoded_capacity)
        if self.compact and self.stores:
            slots, old_slots = self.decoded_start + decoded_capacity, next(iter(self.stores.values())).shape[3]
            self.stores = {layer: _extended(store, 3, slots, 0) for layer, store in self.stores.items()}
            self.row_base = self.row_base // old_slots * slots

    # ---- statistics ----------------------------------------------------------------------------------------------

    def summary(self) -> dict:
        """Per row: ``image_tokens`` (video tokens), ``active_image_tokens`` (those layers >= L attend to on a step
        that recomputes the set: int(n * (1 - p)); with public quirks int((n - 1) * (1 - p)) plus the last video
        token, and every video token on the steps that keep the set), ``scored_image_tokens`` (the span the decision
        ranks: n, or n - 1 with public quirks); ``decode_steps``; per row and step: ``recompute_steps`` and
        ``recomputations`` (the first step counts), ``entered`` (tokens that entered the active set),
        ``similarity`` (cos(a, a_prev), NaN first) and ``boundary_scores`` ([lowest kept, highest dropped] score of
        the steps that recompute, NaNs on the others: a near-tie shows as two close numbers)."""
        steps = int(self.step)
        log = self.log[:, :steps].cpu()
        recomputed = (log[..., 0] > 0).tolist()
        video = self.inputs.prunable.sum(dim=1).tolist()
        attended = self.layout.keep_counts if self.compact else [k + (n > 0) for k, n in zip(self.layout.keep_counts, video)]
        return {
            "mode": "compact" if self.compact else "public_quirks",
            "layer": self.method.layer,
            "ratio": self.method.ratio,
            "image_tokens": video,
            "active_image_tokens": list(attended),
            "scored_image_tokens": list(self.layout.video_counts),
            "decode_steps": steps,
            "recomputations": [sum(row) for row in recomputed],
            "recompute_steps": [[step for step, hit in enumerate(row) if hit] for row in recomputed],
            "entered": log[..., 2].long().tolist(),
            "similarity": log[..., 1].tolist(),
            "boundary_scores": log[..., 3:5].tolist(),
        }

    def active_positions(self, row: int = 0) -> list[torch.Tensor]:
        """Cache positions of the video tokens ``row``'s layers >= L attend to at each decoding step (recorded with
        ``record``): the active set; with public quirks also the last video token, and every video token on the
        steps that keep the set (those steps run over the full cache)."""
        if self.history is None:
            return []
        steps, keep = int(self.step), self.layout.keep_counts[row]
        active = [positions[:keep].sort().values for positions in self.history[row, :steps].cpu()]
        if self.compact:
            return active
        video = self.inputs.prunable[row].nonzero().flatten().cpu()
        recomputed = (self.log[row, :steps, 0] > 0).tolist()
        return [torch.cat([kept, video[-1:]]) if hit else video for kept, hit in zip(active, recomputed)]


def _extended(tensor: torch.Tensor, dim: int, size: int, fill) -> torch.Tensor:
    """``tensor`` with dimension ``dim`` extended to ``size`` entries, the new ones ``fill``."""
    shape = list(tensor.shape)
    shape[dim] = size - tensor.shape[dim]
    return torch.cat([tensor, tensor.new_full(shape, fill)], dim=dim)
