"""FastV ("An Image is Worth 1/2 Tokens After Layer 2"), the baseline the DyCoke paper compares with.

Rule (as in the public FastV code, ``pkunlp-icler/FastV``, whose KV-cache ``fastv_forward`` this follows):

- during the PREFILL, layer K-1's attention (softmax probabilities) is averaged over heads and its row of the LAST
  prompt token is read at the video-token positions;
- the ``round(n * (1 - R))`` video tokens with the highest attention are kept (the public code's
  ``topk(round(len * (1 - r)))``: Python's round), the others dropped;
- layers >= K process only the kept tokens, at their ORIGINAL positions (the public code sets ``position_ids =
  keep_indexs``), causally; their KV cache holds only the kept tokens, so decoding attends over the shorter cache.
  Layers < K keep everything.

Generalisations of the public code: each row of a batch has its own kept set (it reads row 0 and a fixed image
span), left padding works, every attention backend works (the ranking attention is computed for the single last
query, never by switching the model to eager attention), the last prompt token is never dropped (generate reads
its logits), and a static cache with compiled decoding works (layers >= K simply hold fewer tokens: their static
buffers are allocated at the compact length W plus the new tokens, ``static_cache_lengths``).

How it runs (per generation, in the cache's :class:`FastVState`): after layer K-1's stock prefill forward, the last
query's attention ranks the video tokens and the compact layout is made: per row the kept positions in order,
right-aligned (rows that keep fewer tokens get invalid slots at the FRONT, like left padding, so the last prompt
token is the last slot of every row). Layer K's input is gathered at those positions, and layers >= K run their
stock forward on it with the kept positions' rotary embeddings and a causal mask over the compact sequence. At
decoding steps layers >= K get the mask of their shorter cache. The prefill's logits therefore cover the compact
sequence (the last one, the one generate reads, is exact): FastV is an inference method.
"""

from __future__ import annotations

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
from llava.compression.masks import KeyMask, causal_prefill_mask, mask_kind
from llava.compression.registry import Argument, Stages, register
from llava.compression.settings import check_setting

__all__ = ["CompactLayout", "FastV", "FastVState", "prunable_positions"]


class FastV(DecodeCompressor):
    """FastV: ranked at layer ``layer - 1`` (FastV's K), ``ratio`` (R) of the video tokens dropped from layer K on."""

    name = "fastv"
    label = "FastV"
    stats_key = "fastv"

    def __init__(self, layer: int = 2, ratio: float = 0.5):
        self.layer = check_setting("fastv_k", layer)
        self.ratio = check_setting("fastv_r", ratio)

    def describe(self) -> dict:
        return {"name": self.name, "layer": self.layer, "ratio": self.ratio}

    def unmodified_summary(self) -> dict:
        return {"layer": self.layer, "ratio": self.ratio, "image_tokens": [], "kept_image_tokens": [],
                "pruned": False, "decode_steps": 0}

    # What a method built on FastV's mechanics changes: its argument names (for messages), how n * (1 - ratio)
    # becomes a count, and its state (the ranking in ``choose_kept``, a merge in ``compact``).
    layer_argument, ratio_argument = "fastv_k", "fastv_r"
    keep_rounding = staticmethod(round)  # the public FastV code's topk(round(n * (1 - r)))

    @property
    def layer_setting(self) -> int:
        """The value of ``layer_argument`` (FastV's is K, the first layer that runs without the dropped tokens)."""
        return self.layer

    @property
    def ratio_setting(self) -> float:
        """The value of ``ratio_argument`` (FastV's is the share dropped)."""
        return self.ratio

    def state_type(self) -> type[FastVState]:
        return FastVState

    def new_state(self, inputs: GenerationInputs) -> FastVState | None:
        check_setting(self.layer_argument, self.layer_setting, inputs.num_layers)
        layout = self.compact_layout(inputs)
        if not layout.drops_any:
            return None
        if not all(keep for keep, count in zip(layout.keep_counts, layout.video_counts) if count):
            warnings.warn(
                f"{self.label}: {self.ratio_argument}={self.ratio_setting} keeps 0 of the n video tokens "
                f"(n = {min(c for c in layout.video_counts if c)}): layers >= {self.layer} never see the video. "
                f"Keep more with {self.ratio_argument}.",
                stacklevel=4,
            )
        return self.state_type()(self, inputs, layout)

    def compact_layout(self, inputs: GenerationInputs) -> CompactLayout:
        """How many video tokens each row keeps, and the compact layout that follows. FastV: ``keep_rounding(n *
        (1 - ratio))`` of a row's n video tokens."""
        return CompactLayout.from_mask(inputs.prunable, self.ratio, self.keep_rounding)


@dataclass
class CompactLayout:
    """Video positions of each prefill row and the compact layout's sizes (counts read once, before the prefill)."""

    width: int  # compact length W
    video_counts: list[int]
    keep_counts: list[int]
    prunable: torch.Tensor  # (B, S) video positions that may be dropped (the last position never)
    keep_slot: torch.Tensor  # (B, max keep) which of the top-k slots each row keeps
    slot_valid: torch.Tensor  # (B, W) compact slots holding a kept token (right-aligned)
    offset: torch.Tensor  # (B,) invalid slots at the front of each row

    @classmethod
    def from_mask(cls, video: torch.Tensor, ratio: float, rounding=round) -> CompactLayout:
        """``rounding`` turns n * (1 - ratio) into a count: Python's round for FastV (the public code's)."""
        prunable = prunable_positions(video)
        video_counts = prunable.sum(dim=1).tolist()
        return cls.from_counts(prunable, video_counts, [rounding(count * (1 - ratio)) for count in video_counts])

    @classmethod
    def from_counts(cls, prunable: torch.Tensor, video_counts: list[int], keep_counts: list[int],
                    **fields) -> CompactLayout:
        """The layout of rows keeping ``keep_counts`` of their ``video_counts`` ``prunable`` positions
        (``prunable_positions``); ``fields``: a subclass's own."""
        length, device = prunable.shape[1], prunable.device
        row_lengths = [length - count + keep for count, keep in zip(video_counts, keep_counts)]
        width = max(row_lengths)
        offset = torch.tensor([width - row for row in row_lengths], device=device)
        return cls(
            width=width,
            video_counts=video_counts,
            keep_counts=keep_counts,
            prunable=prunable,
            keep_slot=slots_below(torch.tensor(keep_counts, device=device), max(keep_counts)),
            slot_valid=torch.arange(width, device=device) >= offset[:, None],
            offset=offset,
            **fields,
        )

    @property
    def drops_any(self) -> bool:
        return any(keep < count for count, keep in zip(self.video_counts, self.keep_counts))


def prunable_positions(video: torch.Tensor) -> torch.Tensor:
    """(B, S) bool: the video positions that may be dropped: all but the last prompt position, which ranks the
    others (generate reads its logits)."""
    prunable = video.clone()
    prunable[:, -1] = False
    return prunable


class FastVState(DecodeState):
    """FastV for one generation (see the module docstring)."""

    def __init__(self, method: FastV, inputs: GenerationInputs, layout: CompactLayout):
        super().__init__(inputs)
        self.method, self.layout = method, layout
        self.ranking_layer, self.first_pruned = method.layer - 1, method.layer
        self.kind = mask_kind(inputs.attn_implementation)
        device = inputs.prunable.device
        self.step = torch.zeros(1, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.index = None  # (B, W) prefill position of each compact slot
        self.kept_video = None  # (B, S) kept video positions
        self.compact_inputs: dict | None = None  # what layers >= K run the prefill with
        self.decode_mask: KeyMask | None = None

    # ---- hooks ---------------------------------------------------------------------------------------------------

    def begin_step(self, cache) -> None:
        self.slot.copy_(self.step)
        self.step.add_(1)
        prompt_slots = self.layout.width if self.holds_compact_cache(0) else self.prefill_length
        decoded = cache.layers[0].get_mask_sizes(1)[0] - prompt_slots  # a Python int, from shapes
        if self.layout.width + decoded > self.decode_mask.capacity:  # a dynamic cache longer than planned
            self.decode_mask.grow(decoded + 256)
        self.decode_mask.mark_decoded(self.slot)

    def observe(self, decoder_layer, layer_idx: int, inputs: LayerInputs, cache) -> None:
        if self.phase == PREFILL and layer_idx == self.ranking_layer:
            self._plan(decoder_layer, inputs, cache)

    def holds_compact_cache(self, layer_idx: int) -> bool:
        """Whether layer ``layer_idx``'s cache holds the compact prompt (W slots) after the prefill: FastV's layers
        >= K. A method that also cuts the other layers' cache says so here."""
        return layer_idx >= self.first_pruned

    def static_cache_lengths(self, max_cache_len: int) -> list[int]:
        """Layers >= K run the prefill on the W compact slots: their buffers hold W + the decoded tokens."""
        compact = max_cache_len - (self.prefill_length - self.layout.width)
        return [compact if layer >= self.first_pruned else max_cache_len for layer in range(self.inputs.num_layers)]

    def uncached_prompt_tokens(self, layer_idx: int) -> int:
        if self.index is None or not self.holds_compact_cache(layer_idx):
            return 0
        return self.prefill_length - self.layout.width

    def layer_inputs(self, layer_idx: int, inputs: LayerInputs, cache) -> LayerInputs:
        if self.phase == DECODE:  # a compact cache: its mask
            if not self.holds_compact_cache(layer_idx):
                return inputs
            key_length = cache.layers[layer_idx].get_mask_sizes(1)[0]
            return inputs._replace(attention_mask=self.decode_mask.view(key_length, all_marked=not self.inputs.static_cache))
        if layer_idx < self.first_pruned:
            return inputs
        plan = self.compact_inputs
        hidden_states = inputs.hidden_states
        if layer_idx == self.first_pruned:  # the first pruned layer: keep the kept positions only
            hidden_states = self.compact(hidden_states)
        if "mask" not in plan:  # made once, for every layer >= K (their caches all hold W tokens)
            key_length = cache.layers[layer_idx].get_mask_sizes(self.layout.width)[0]
            plain = plan["plain_causal"] and inputs.attention_mask is None
            plan["mask"] = None if plain else causal_prefill_mask(self.valid, key_length, self.kind, self.inputs.dtype)
        return LayerInputs(hidden_states, plan["mask"], plan["position_ids"], plan["position_embeddings"])

    def add_to_output(self, layer_idx: int, output: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Layer K-1's output is still the whole prompt (``compact`` merges or drops after the features are added, as
        on the full sequence); layers >= K hold the compact slots, at the prefill positions ``index``."""
        if layer_idx >= self.first_pruned:
            features = features.gather(1, self.index[..., None].expand(-1, -1, features.shape[-1]))
        return output + features

    # ---- the ranking (layer K-1, prefill) ------------------------------------------------------------------------

    def choose_kept(self, decoder_layer, inputs: LayerInputs, cache) -> torch.Tensor:
        """(B, S) bool: the video positions each row keeps, ``layout.keep_counts[r]`` of row r, chosen after layer
        K-1's prefill forward (``inputs`` are that layer's). FastV: the most attended by the last prompt token.
        A method that ranks otherwise overrides this."""
        length = self.prefill_length
        cos, sin = inputs.position_embeddings
        query = layer_query(decoder_layer, inputs.hidden_states[:, -1:], cos[..., -1:, :], sin[..., -1:, :])
        keys = cache.layers[self.ranking_layer].keys[:, :, :length]  # this prefill's keys (rotated)
        attention = mean_head_attention(query, keys, self.inputs.attention_mask, decoder_layer.self_attn.scaling)
        return self.top_video(attention)

    def top_video(self, scores: torch.Tensor) -> torch.Tensor:
        """(B, S) bool: the top ``keep_counts[r]`` video positions of row r by ``scores`` (B, S)."""
        layout = self.layout
        scores = scores.masked_fill(~layout.prunable, float("-inf"))
        top = scores.topk(layout.keep_slot.shape[1], dim=1).indices  # descending, so valid slots come first
        return torch.zeros_like(layout.prunable).scatter_(1, top, layout.keep_slot)

    def compact(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Layer K's input (B, W, D) from layer K-1's output (B, S, D): the kept positions, in order. A method that
        merges the dropped tokens into the kept ones (values averaged) overrides this."""
        return hidden_states.gather(1, self.index[..., None].expand(-1, -1, hidden_states.shape[-1]))

    def _plan(self, decoder_layer, inputs: LayerInputs, cache) -> None:
        layout, length = self.layout, self.prefill_length
        batch = inputs.hidden_states.shape[0]
        cos, sin = inputs.position_embeddings
        kept_video = self.choose_kept(decoder_layer, inputs, cache)
        keep = ~layout.prunable | kept_video
        # Slot of every kept position: its rank among the row's kept positions, after the row's invalid slots.
        slot = (keep.long().cumsum(dim=1) - 1 + layout.offset[:, None]).masked_fill(~keep, layout.width)
        positions = torch.arange(length, device=keep.device).expand(batch, -1)
        index = positions.new_zeros(batch, layout.width + 1).scatter_(1, slot, positions)[:, : layout.width]
        valid = layout.slot_valid & self.inputs.attention_mask.gather(1, index)
        self.index, self.kept_video, self.valid = index, kept_video, valid
        position_ids = inputs.position_ids if inputs.position_ids is not None else positions
        self.compact_inputs = {
            # a plain causal mask (None) serves rows without invalid slots: read once per generation
            "plain_causal": bool(valid.all()),
            "position_ids": position_ids.expand(batch, -1).gather(1, index),
            "position_embeddings": tuple(_gather_positions(table, index) for table in (cos, sin)),
        }
        capacity = length - layout.width + self.inputs.decoded_capacity  # a static cache's length - W
        self.decode_mask = KeyMask(valid, capacity, self.kind, self.inputs.dtype)
        mark_static(self.step, self.slot, self.decode_mask.values)

    # ---- statistics ----------------------------------------------------------------------------------------------

    def summary(self) -> dict:
        """``image_tokens`` and ``kept_image_tokens``: video tokens per row; ``prefill_tokens`` (S) and ``compact_tokens`` (W, the
        length layers >= K processed); ``kept_video_positions`` per row; ``compact_positions``, the prefill position
        of every compact slot (-1 for the invalid slots at the front of rows that keep fewer tokens);
        ``decode_steps``."""
        layout = self.layout
        ran = self.index is not None
        return {
            "layer": self.method.layer,
            "ratio": self.method.ratio,
            "image_tokens": list(layout.video_counts),
            "kept_image_tokens": list(layout.keep_counts),
            "pruned": ran,
            "prefill_tokens": self.prefill_length,
            "compact_tokens": layout.width if ran else 0,
            "kept_video_positions": [row.nonzero().flatten().tolist() for row in self.kept_video.cpu()] if ran else [],
            "compact_positions": self.index.masked_fill(~layout.slot_valid, -1).tolist() if ran else [],
            "decode_steps": int(self.step),
        }


def _gather_positions(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """RoPE cos or sin (1 or B, S, D), or (3, 1 or B, S, D) for multimodal RoPE, at the compact slots' positions
    (B, W) -> (B, W, D) or (3, B, W, D)."""
    *lead, _, length, dim = table.shape
    table = table.expand(*lead, index.shape[0], length, dim)
    return table.gather(-2, index[..., None].expand(*lead, -1, -1, dim))


@register(
    "fastv",
    Argument("fastv_k", 2, "layer", "layer from which video tokens are dropped"),
    Argument("fastv_r", 0.5, "[0, 1)", "share of video tokens dropped at layer K; 0 turns FastV off"),
    summary="FastV: the video tokens least attended by the last prompt token are dropped from layer K on",
    examples=({"fastv_k": 2, "fastv_r": 0.5}, {"fastv_k": 1, "fastv_r": 0.9}),
)
def build(settings) -> Stages:
    return Stages(decoder=FastV(settings.fastv_k, settings.fastv_r) if settings.fastv_r > 0 else None)
