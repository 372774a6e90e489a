"""FrameFusion ("FrameFusion: Combining Similarity and Importance for Video Token Reduction", ICCV 2025).

Rule, transcribed from the public code (``thu-nics/FrameFusion`` at commit fbec1d2e6bd383361c2c87ca13e73f80a8c1a9e9:
``framefusion/main.py``, ``FrameFusion.forward``, ``compute_similarity_and_token_index_by_patch``,
``merge_tokens_and_get_mask`` and ``_compute_pruning_ratio``; called by ``framefusion/models/qwen2/modeling_qwen2.py``,
``Qwen2DecoderLayer_merge_then_prune_by_cost_forward``), during the prefill only:

- Each video token has a patch (its place in its frame). Its *similarity* is the cosine (dot / (|a| |b|), no eps)
  between its hidden state and that of the previous still-present token of the same patch (the same place in an
  earlier frame); the first token of a patch has none (-2). With ``n`` video tokens present and
  ``cap = pruning_ratio(sparsities, cost)``, a *merging step*: if the share of tokens with similarity >=
  ``similarity_lower_bound`` is below ``cap``, those tokens merge, the share is appended to the row's sparsities,
  and merging ends when it is below ``ratio_lower_bound``; otherwise the ``int(cap * n)`` most similar tokens merge
  and both merging and pruning end (the cost is reached). A merged token joins the run's first unmerged token of its
  patch, whose hidden state becomes the plain mean of the run (values averaged); the merged tokens leave the sequence.
- The first merging step runs on the input embeddings, before layer 0; while merging goes on, one more runs after
  each layer's attention, on the residual stream before the layer's MLP (layer input + attention output). After the
  step that ends merging (without reaching the cost), the next one, after the next layer's attention, *prunes*: the
  ``round(n * (1 - pruning_ratio(sparsities, cost)))`` video tokens most attended by the last prompt token (the
  layer's softmax attention, averaged over heads) stay, the others leave.
- ``pruning_ratio``: with the sparsities s_1..s_m of the steps so far, survival S_i = prod_{j<=i} (1 - s_j), the
  share left to spend is L * cost - sum_i S_i over the L - m remaining layers: 1 - left / ((L - m) * S_m), or 0
  where that is negative.
- Tokens keep their original positions (the public code indexes the rotary tables); decoding attends to what each
  layer cached.

How it runs here (the decoder layers are hooked at their boundaries only, never patched): after a layer's stock
prefill forward that a merging step follows, its attention output is computed once more from its cache (every
backend; :func:`scaled_dot_product_attention` over the current layout), the step runs on the residual stream, and
the layer's MLP runs on what is left; that result is the next layer's input (the stock forward's MLP output is not
used: one more attention and MLP per merging layer, in the prefill). A pruning step alone needs no recomputation
(the MLP is per token, so it prunes the layer's output), only the last prompt token's attention in that layer.

Departures, and why:

- ``_compute_pruning_ratio`` assumes 28 layers (``num_layers=28``, the 7B models it was published with); here L is
  the model's own number of layers. Where the public code raises "The cost is too small" (the merging steps spent
  more than the cost), the ratio is 1 here: the remaining video tokens are pruned.
- Similarities are computed in float32. Each row of a padded batch has its own steps (the public code handles one
  row and one video). The public LLaVA-Video adapter counts each grid row's newline as a patch; here newlines are not
  video tokens and are never merged. A row's video tokens are taken as one run of frames of ``tokens_per_frame``.
- Layer 0 runs on the full sequence with the tokens merged before it hidden by the mask (its cache keeps the
  prompt's length, so decoding positions and masks stay the stock ones); from the step after layer 0's attention
  on, the sequence is compacted at each step, every row right-aligned (invalid slots at the front, like left
  padding), each kept token at its original position. Each layer's decoding mask is a :class:`KeyMask` over its
  cache, updated in place: decoding steps read nothing back to the host and compile.

Qwen3-VL adds its deepstack features to the visual tokens' hidden states after each of its first layers; here they
reach each token still in the sequence at its own prompt position (a token that others merged into gets its own),
which is what the stock model does on the full sequence with the removed tokens hidden
(:meth:`FrameFusionState.add_to_output`, called by :mod:`llava.compression.native`'s layer hooks).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llava.compression._attention import layer_query, mean_head_attention
from llava.compression.decoding import (
    PREFILL,
    DecodeCompressor,
    DecodeState,
    GenerationInputs,
    LayerInputs,
    mark_static,
    size_static_layer,
)
from llava.compression.fastv import _gather_positions
from llava.compression.masks import KeyMask, causal_prefill_mask, mask_kind
from llava.compression.registry import Argument, Stages, register
from llava.compression.settings import check_setting

__all__ = ["FrameFusion", "FrameFusionState", "MergeStep", "merge_step", "pruning_ratio", "similarity_by_patch"]

NO_PREDECESSOR = -2.0  # the public code's IGNORE_TOKEN: a token with no earlier token of its patch


# ---- the rule, on one row ------------------------------------------------------------------------------------------


def pruning_ratio(sparsities: list[float], cost: float, num_layers: int) -> float:
    """The share of the tokens left that the remaining layers must drop to spend ``cost`` (public
    ``_compute_pruning_ratio``, with the model's layers and 1 where the public code raises)."""
    survival, spent = 1.0, 0.0
    for sparsity in sparsities:
        survival *= 1 - sparsity
        spent += survival
    left = num_layers * cost - spent
    if left < 0:
        return 1.0
    ratio = left / ((num_layers - len(sparsities)) * survival)
    return 0.0 if ratio > 1 else 1 - ratio


def similarity_by_patch(hidden: torch.Tensor, patch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, similarity): the video tokens sorted by patch, then time (the public ``token_index_by_patch``), and
    each one's cosine similarity with the token before it in that order (-2 where that token is of another patch,
    and for the first). ``hidden`` (n, D) and ``patch`` (n,) in time order."""
    order = torch.sort(patch, stable=True).indices
    states, patches = hidden[order].float(), patch[order]
    cosine = (states[1:] * states[:-1]).sum(-1) / (states[1:].norm(dim=-1) * states[:-1].norm(dim=-1))
    cosine = cosine.masked_fill(patches[1:] != patches[:-1], NO_PREDECESSOR)
    return order, torch.cat([cosine.new_full((1,), NO_PREDECESSOR), cosine])


@dataclass
class MergeStep:
    """What one merging step does to a row's video tokens (in time order)."""

    merged: torch.Tensor  # (n,) bool: the tokens that leave the sequence
    hidden: torch.Tensor  # (n, D): the hidden states after the step (the runs' first tokens hold the means)
    share: float  # the share of tokens at or above the similarity bound
    capped: bool  # the share reached the cap: the int(cap * n) most similar tokens merged, and FrameFusion is done


def merge_step(hidden: torch.Tensor, patch: torch.Tensor, cap: float, similarity_lower_bound: float) -> MergeStep:
    """One merging step on a row's video tokens ``hidden`` (n, D) of patches ``patch`` (n,), in time order."""
    count = patch.shape[0]
    order, similarity = similarity_by_patch(hidden, patch)
    chosen = similarity >= similarity_lower_bound
    share = int(chosen.sum()) / count
    capped = share >= cap
    if capped:
        chosen = torch.zeros_like(chosen)
        chosen[similarity.topk(int(cap * count)).indices] = True
    # A chosen token joins the closest unchosen token before it in patch order: its run's first token, same patch.
    slots = torch.arange(count, device=hidden.device)
    root = torch.where(chosen, 0, slots).cummax(dim=0).values
    states = hidden[order]
    sums = torch.zeros_like(states).index_add_(0, root, states)
    members = torch.bincount(root, minlength=count)
    averaged = torch.where((members > 1)[:, None], sums / members[:, None].to(states.dtype), states)
    merged, result = torch.empty_like(chosen), torch.empty_like(hidden)
    merged[order], result[order] = chosen, averaged
    return MergeStep(merged, result, share, capped)


@dataclass
class RowSteps:
    """One row's progress through FrameFusion's steps (the public code's ``sparsity_list``, ``finish_merging``,
    ``finish_pruning``), and what each step did."""

    sparsities: list[float] = field(default_factory=list)
    merging_done: bool = False
    pruning_done: bool = False
    merge_layers: list[int] = field(default_factory=list)  # the merging steps (0: before layer 0, l+1: after l)
    prune_layer: int | None = None  # the pruning step (l + 1: after layer l's attention)
    merged: int = 0
    pruned: int = 0


# ---- the method -----------------------------------------------------------------------------------------------------


class FrameFusion(DecodeCompressor):
    """FrameFusion: similar tokens of consecutive frames merged in the first layers, then the least attended pruned,
    for a computation ``cost`` (a share of the full model's)."""

    name = "framefusion"
    label = "FrameFusion"
    stats_key = "framefusion"

    def __init__(self, cost: float = 0.3, similarity_lower_bound: float = 0.6, ratio_lower_bound: float = 0.1):
        self.cost = check_setting("framefusion_cost", cost)
        self.similarity_lower_bound = check_setting("framefusion_similarity_lower_bound", similarity_lower_bound)
        self.ratio_lower_bound = check_setting("framefusion_ratio_lower_bound", ratio_lower_bound)

    def describe(self) -> dict:
        return {"name": self.name, "cost": self.cost, "similarity_lower_bound": self.similarity_lower_bound,
                "ratio_lower_bound": self.ratio_lower_bound}

    def unmodified_summary(self) -> dict:
        return {**{k: v for k, v in self.describe().items() if k != "name"}, "image_tokens": [],
                "kept_image_tokens": [], "decode_steps": 0}

    def new_state(self, inputs: GenerationInputs) -> FrameFusionState | None:
        video = inputs.prunable.clone()
        video[:, -1] = False  # the last prompt token ranks the others: never a video token to drop
        counts = video.sum(dim=1).tolist()
        if not any(counts):
            return None
        per_frame = inputs.tokens_per_frame
        if not per_frame:
            raise ValueError(
                "framefusion needs the video tokens per frame (to compare each token with the same patch of the "
                "previous frame), and this model's inputs do not say it (several video sizes in one batch, or video "
                "tokens already selected by another method)."
            )
        uneven = [(row, count) for row, count in enumerate(counts) if count % per_frame]
        if uneven:
            row, count = uneven[0]
            raise ValueError(f"framefusion: row {row} has {count} video tokens, not whole frames of {per_frame}.")
        patch = ((video.long().cumsum(dim=1) - 1) % per_frame).masked_fill(~video, -1)
        return FrameFusionState(self, inputs, video, patch)


@dataclass(eq=False)
class _Layout:
    """The sequence some layers process: per row, the prefill position of each slot and whether it holds a token."""

    index: torch.Tensor  # (B, W) prefill positions
    valid: torch.Tensor  # (B, W) bool
    compact: bool  # False: the prefill's own slots (index = arange), with hidden tokens
    inputs: dict = field(default_factory=dict)  # the prefill's mask and positions for its layers (made once)
    decode_mask: KeyMask | None = None

    @property
    def width(self) -> int:
        return self.index.shape[1]


class FrameFusionState(DecodeState):
    """FrameFusion for one generation (see the module docstring)."""

    def __init__(self, method: FrameFusion, inputs: GenerationInputs, video: torch.Tensor, patch: torch.Tensor):
        super().__init__(inputs)
        self.method, self.video, self.patch = method, video, patch
        self.kind = mask_kind(inputs.attn_implementation)
        self.video_counts = video.sum(dim=1).tolist()
        self.rows = [RowSteps(merging_done=not n, pruning_done=not n) for n in self.video_counts]
        device = video.device
        positions = torch.arange(self.prefill_length, device=device).expand(video.shape[0], -1)
        self.original = _Layout(positions, inputs.attention_mask.bool(), compact=False)
        self.current = self.original
        self.layouts: list[_Layout] = []  # the layout of each layer, in order
        self.tables: tuple | None = None  # layer 0's position ids and rotary tables (prefill positions)
        self.attention: torch.Tensor | None = None  # (B, W) the last prompt token's attention, for pruning
        self.decoded_layouts: list[_Layout] = []  # the layouts whose decoding masks begin_step updates
        self.pending: torch.Tensor | None = None  # the next layer's input, made after this layer's attention
        self.step = torch.zeros(1, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)

    # ---- hooks ---------------------------------------------------------------------------------------------------

    def layer_inputs(self, layer_idx: int, inputs: LayerInputs, cache) -> LayerInputs:
        if self.phase != PREFILL:
            layout = self.layouts[layer_idx]
            if layout is self.original:
                return inputs
            key_length = cache.layers[layer_idx].get_mask_sizes(1)[0]
            mask = layout.decode_mask.view(key_length, all_marked=not self.inputs.static_cache)
            return inputs._replace(attention_mask=mask)
        if layer_idx == 0:
            positions = inputs.position_ids if inputs.position_ids is not None else self.original.index
            self.tables = (positions, *inputs.position_embeddings)
        hidden_states = inputs.hidden_states
        if self.pending is not None:  # the step after the previous layer's attention made this layer's input
            hidden_states, self.pending = self.pending, None
        elif self._holes_before(layer_idx) or not all(row.pruning_done for row in self.rows):
            hidden_states = self._step(layer_idx, hidden_states)  # before layer 0, or pruning only: on the input
        self.layouts.append(self.current)
        if self.current is self.original:
            return inputs
        if self.inputs.static_cache:  # this layer caches the current layout's slots and the decoded tokens
            size_static_layer(cache.layers[layer_idx], self.current.width + self.inputs.decoded_capacity)
        return LayerInputs(hidden_states, *self._prefill_inputs(layer_idx, inputs, cache))

    def observe(self, decoder_layer, layer_idx: int, inputs: LayerInputs, cache) -> None:
        if self.phase != PREFILL:
            return
        if layer_idx == self.last_layer:
            self._plan_decoding()
            return
        if any(row.merging_done and not row.pruning_done for row in self.rows):
            self.attention = self._last_token_attention(decoder_layer, layer_idx, inputs, cache)
        if not all(row.merging_done for row in self.rows):  # a merging step follows this layer's attention
            self.pending = self._step_after_attention(decoder_layer, layer_idx, inputs, cache)

    def add_to_output(self, layer_idx: int, output: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """After a merging step that follows this layer's attention, the next layer runs on that step's states, in
        the layout after it (the features of its kept tokens, merged ones included, are their own); otherwise on the
        output, in this layer's layout."""
        if self.pending is not None:
            self.pending = self.pending + _gather(features, self.current.index)
            return output
        return output + _gather(features, self.layouts[layer_idx].index)

    def begin_step(self, cache) -> None:
        self.slot.copy_(self.step)
        self.step.add_(1)
        decoded = cache.layers[0].get_mask_sizes(1)[0] - self.prefill_length  # layer 0 caches the whole prompt
        for layout in self.decoded_layouts:
            if layout.width + decoded > layout.decode_mask.capacity:  # a dynamic cache longer than planned
                layout.decode_mask.grow(decoded + 256)
            layout.decode_mask.mark_decoded(self.slot)

    # ---- the steps (prefill) -------------------------------------------------------------------------------------

    def _step_after_attention(self, decoder_layer, layer_idx: int, inputs: LayerInputs, cache) -> torch.Tensor:
        """The output layer ``layer_idx`` has when the steps run between its attention and its MLP, as in the
        public code: its attention's output again (from its cache), the steps on the residual stream, then its MLP on
        what is left. (The stock forward's MLP output is not used.)"""
        residual = inputs.hidden_states + self._attention_output(decoder_layer, layer_idx, inputs, cache)
        residual = self._step(layer_idx + 1, residual)
        return residual + decoder_layer.mlp(decoder_layer.post_attention_layernorm(residual))

    def _attention_output(self, decoder_layer, layer_idx: int, inputs: LayerInputs, cache) -> torch.Tensor:
        """(B, W, D): the output of layer ``layer_idx``'s attention block in this prefill, from its cached keys and
        values (causal over the current layout's valid slots; an invalid slot attends to itself)."""
        attention, states = decoder_layer.self_attn, inputs.hidden_states
        width = states.shape[1]
        query = layer_query(decoder_layer, states, *inputs.position_embeddings)
        layer = cache.layers[layer_idx]
        slots = torch.arange(width, device=states.device)
        causal, itself = slots[None, :] <= slots[:, None], slots[None, :] == slots[:, None]
        allowed = causal & self.current.valid[:, None, :] | itself
        groups = query.shape[1] // layer.keys.shape[1]  # grouped-query attention, as the layer's repeat_kv
        keys, values = (cached[:, :, :width].repeat_interleave(groups, dim=1) for cached in (layer.keys, layer.values))
        output = torch.nn.functional.scaled_dot_product_attention(
            query, keys, values, attn_mask=allowed[:, None], scale=attention.scaling
        )
        return attention.o_proj(output.transpose(1, 2).reshape(*states.shape[:2], -1))

    def _step(self, index: int, hidden_states: torch.Tensor) -> torch.Tensor:
        """Run each row's step ``index`` (0: before layer 0; l + 1: after layer l's attention) on the hidden
        states (B, W, D) of the current layout; make the layout the next layers run on, and return the states in it."""
        layout = self.current
        video = self.video.gather(1, layout.index) & layout.valid
        patch = self.patch.gather(1, layout.index)
        leaving = torch.zeros_like(video)
        hidden_states = hidden_states.clone()
        for row, steps in enumerate(self.rows):
            if steps.pruning_done:
                continue
            slots = video[row].nonzero().flatten()
            if steps.merging_done:
                gone = self._prune(steps, self.attention[row, slots])
                steps.prune_layer, steps.pruned = index, int(gone.sum())
            else:
                result = self._merge(steps, hidden_states[row, slots], patch[row, slots])
                hidden_states[row, slots] = result.hidden
                gone = result.merged
                steps.merge_layers.append(index)
                steps.merged += int(gone.sum())
            leaving[row, slots[gone]] = True
        if self._holes_before(index) or bool(leaving.any()):
            self.current = self._next_layout(layout, layout.valid & ~leaving, compact=index > 0)
            if self.current.compact:
                hidden_states = _gather(hidden_states, self._slots_in(layout, self.current))
        return hidden_states

    def _holes_before(self, index: int) -> bool:
        """Whether the tokens merged before layer 0 (hidden there, in place) are still in the sequence at step
        ``index``."""
        return index > 0 and not self.current.compact and self.current is not self.original

    def _merge(self, steps: RowSteps, hidden: torch.Tensor, patch: torch.Tensor) -> MergeStep:
        method = self.method
        cap = pruning_ratio(steps.sparsities, method.cost, self.inputs.num_layers)
        result = merge_step(hidden, patch, cap, method.similarity_lower_bound)
        if result.capped:
            steps.merging_done = steps.pruning_done = True
        else:
            steps.sparsities.append(result.share)
            steps.merging_done = result.share < method.ratio_lower_bound
        return result

    def _prune(self, steps: RowSteps, attention: torch.Tensor) -> torch.Tensor:
        """(n,) bool: the row's video tokens that pruning drops (all but the most attended)."""
        ratio = pruning_ratio(steps.sparsities, self.method.cost, self.inputs.num_layers)
        keep = round(attention.shape[0] * (1 - ratio))
        gone = torch.ones(attention.shape[0], dtype=torch.bool, device=attention.device)
        gone[attention.topk(keep).indices] = False
        steps.pruning_done = True
        return gone

    def _last_token_attention(self, decoder_layer, layer_idx: int, inputs: LayerInputs, cache) -> torch.Tensor:
        """(B, W) the last prompt token's softmax attention in layer ``layer_idx``, averaged over heads."""
        cos, sin = inputs.position_embeddings
        query = layer_query(decoder_layer, inputs.hidden_states[:, -1:], cos[..., -1:, :], sin[..., -1:, :])
        width = inputs.hidden_states.shape[1]
        keys = cache.layers[layer_idx].keys[:, :, :width]
        return mean_head_attention(query, keys, self.current.valid, decoder_layer.self_attn.scaling)

    # ---- layouts -------------------------------------------------------------------------------------------------

    def _next_layout(self, layout: _Layout, keep: torch.Tensor, compact: bool) -> _Layout:
        """The layout of the tokens ``keep`` (B, W) of ``layout``: the same slots with the others hidden (layer 0),
        or the kept tokens only, in order, right-aligned."""
        if not compact:
            return _Layout(layout.index, keep, compact=False)
        counts = keep.sum(dim=1)
        width = int(counts.max())
        offset = width - counts
        slot = (keep.long().cumsum(dim=1) - 1 + offset[:, None]).masked_fill(~keep, width)
        index = layout.index.new_zeros(keep.shape[0], width + 1).scatter_(1, slot, layout.index)[:, :width]
        valid = torch.arange(width, device=keep.device) >= offset[:, None]
        return _Layout(index, valid, compact=True)

    @staticmethod
    def _slots_in(old: _Layout, new: _Layout) -> torch.Tensor:
        """(B, W_new): where each slot of ``new`` is in ``old`` (a compact layout's index increases along each row's
        valid slots; the others' slots are the prefill positions)."""
        if not old.compact:
            return new.index
        return torch.searchsorted(old.index.masked_fill(~old.valid, -1).contiguous(), new.index.contiguous())

    def _prefill_inputs(self, layer_idx: int, inputs: LayerInputs, cache) -> tuple:
        """(mask, position ids, rotary tables) of the current layout's layers in the prefill (made once)."""
        layout, made = self.current, self.current.inputs
        if not made:
            key_length = cache.layers[layer_idx].get_mask_sizes(layout.width)[0]
            plain = bool(layout.valid.all()) and inputs.attention_mask is None
            dtype = self.inputs.dtype
            made["mask"] = None if plain else causal_prefill_mask(layout.valid, key_length, self.kind, dtype)
            positions, cos, sin = self.tables
            made["position_ids"] = _gather_ids(positions, layout.index)
            made["position_embeddings"] = tuple(_gather_positions(table, layout.index) for table in (cos, sin))
        return made["mask"], made["position_ids"], made["position_embeddings"]

    def _plan_decoding(self) -> None:
        """A decoding mask for each layout the layers use, other than the prompt's own."""
        distinct = {id(layout): layout for layout in self.layouts if layout is not self.original}
        self.decoded_layouts = list(distinct.values())
        for layout in self.decoded_layouts:
            capacity = self.prefill_length - layout.width + self.inputs.decoded_capacity  # static: cache length - W
            layout.decode_mask = KeyMask(layout.valid, capacity, self.kind, self.inputs.dtype)
            layout.inputs.clear()
        self.attention = self.tables = None
        mark_static(self.step, self.slot, *(layout.decode_mask.values for layout in self.decoded_layouts))

    # ---- statistics ----------------------------------------------------------------------------------------------

    def summary(self) -> dict:
        """Per row: ``image_tokens`` (video tokens of the prompt), ``kept_image_tokens`` (those the last layer
        sees), ``merged`` and ``pruned`` counts, ``sparsities`` (each merging step's share), ``merge_layers`` and
        ``prune_layer`` (the steps: 0 before layer 0, l + 1 after layer l's attention); ``video_tokens_per_layer``
        (what each layer's attention sees) per row;
        ``layer_widths`` (the sequence length each layer processed); ``decode_steps``."""
        per_layer = [(self.video.gather(1, layout.index) & layout.valid).sum(dim=1).tolist() for layout in self.layouts]
        rows = range(len(self.rows))
        return {
            **{k: v for k, v in self.method.describe().items() if k != "name"},
            "image_tokens": list(self.video_counts),
            "kept_image_tokens": [per_layer[-1][row] for row in rows] if per_layer else list(self.video_counts),
            "merged": [steps.merged for steps in self.rows],
            "pruned": [steps.pruned for steps in self.rows],
            "sparsities": [list(steps.sparsities) for steps in self.rows],
            "merge_layers": [list(steps.merge_layers) for steps in self.rows],
            "prune_layer": [steps.prune_layer for steps in self.rows],
            "video_tokens_per_layer": [[counts[row] for counts in per_layer] for row in rows],
            "layer_widths": [layout.width for layout in self.layouts],
            "decode_steps": int(self.step),
        }


def _gather(states: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, W, D) states at the slots ``index`` (B, W)."""
    return states.gather(1, index[..., None].expand(-1, -1, states.shape[-1]))


def _gather_ids(positions: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Position ids (1 or B, S), or (axes, 1 or B, S) for multimodal RoPE, at the prefill positions ``index``."""
    if positions.ndim == 2:
        return positions.expand(index.shape[0], -1).gather(1, index)
    axes = positions.shape[0]
    return positions.expand(axes, index.shape[0], -1).gather(2, index[None].expand(axes, -1, -1))


@register(
    "framefusion",
    Argument("framefusion_cost", 0.3, "(0, 1]", "computation spent, as a share of the full model's (token-layers): "
             "caps the merging and sets the pruning ratio"),
    Argument("framefusion_similarity_lower_bound", 0.6, "[-1, 1]",
             "cosine similarity with the same patch of the previous frame from which a token merges"),
    Argument("framefusion_ratio_lower_bound", 0.1, "[0, 1]",
             "merging stops after a layer that merges less than this share of the video tokens"),
    summary="FrameFusion: video tokens similar to the same patch of the previous frame merged in the first layers, "
            "then the least attended pruned, for a computation cost",
    examples=({"framefusion_cost": 0.5}, {"framefusion_cost": 0.3, "framefusion_similarity_lower_bound": 0.9}),
)
def build(settings) -> Stages:
    return Stages(decoder=FrameFusion(settings.framefusion_cost, settings.framefusion_similarity_lower_bound,
                                      settings.framefusion_ratio_lower_bound))
