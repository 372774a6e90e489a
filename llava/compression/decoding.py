"""The interface of decode-time compressors (DyCoke's KV pruning, FastV) and the caches that carry their state.

A decode-time compressor changes what the language model's decoder layers attend to while a sequence is generated.
It has two parts:

- a :class:`DecodeCompressor`: the method and its arguments (layer, ratio), set on the model, immutable;
- a :class:`DecodeState`: everything one ``generate`` call needs (which tokens are prunable, the active set, the
  compact keys/values, statistics), made for that call by :meth:`DecodeCompressor.new_state` and owned by that
  call's cache (:class:`CompressionDynamicCache` or :class:`CompressionStaticCache`). When ``generate`` returns,
  nothing of it is reachable from the model; two calls or two models never share one.

The model's decoder layers (``LlavaQwenDecoderLayer``) look for a state on the cache they are given: without one
they are the stock ``Qwen2DecoderLayer``. With one, each layer calls :meth:`DecodeState.before_layer` (which may
replace its inputs: the hidden states, the mask, the positions) and :meth:`DecodeState.after_layer` (which may read
the layer's cache, e.g. to decide what later layers see), and the cache routes every key/value update through
:meth:`DecodeState.update_cache` (which may return other keys/values for the attention, e.g. a compact copy).

Decoding steps run with tensors whose shapes are fixed per generation and no host synchronisation, so a step
compiles (``torch.compile(fullgraph=True)``, static cache, CUDA graphs) like the stock model's.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import NamedTuple

import torch
from transformers.cache_utils import DynamicCache, StaticCache

__all__ = [
    "CompressionDynamicCache",
    "CompressionStaticCache",
    "DecodeCompressor",
    "DecodeState",
    "GenerationInputs",
    "LayerInputs",
    "check_generate_arguments",
    "make_generation_cache",
    "new_token_budget",
    "size_static_layer",
]

PREFILL, DECODE = "prefill", "decode"


class LayerInputs(NamedTuple):
    """What a decoder layer receives besides its cache."""

    hidden_states: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    position_embeddings: tuple[torch.Tensor, torch.Tensor]

    @classmethod
    def of_call(cls, args: tuple, kwargs: dict) -> LayerInputs:
        """The inputs of a decoder-layer call ``layer(*args, **kwargs)`` (hidden states first, the rest by name)."""
        hidden_states = args[0] if args else kwargs["hidden_states"]
        return cls(hidden_states, kwargs.get("attention_mask"), kwargs.get("position_ids"), kwargs["position_embeddings"])

    def into_call(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """``args``/``kwargs`` of a decoder-layer call with these inputs in place of the old ones."""
        if args:
            args = (self.hidden_states, *args[1:])
        else:
            kwargs["hidden_states"] = self.hidden_states
        kwargs.update(attention_mask=self.attention_mask, position_ids=self.position_ids,
                      position_embeddings=self.position_embeddings)
        return args, kwargs


@dataclass(frozen=True)
class GenerationInputs:
    """What a decode-time compressor knows of a generation before its prefill."""

    prunable: torch.Tensor  # (batch, prefill_length) bool: the video tokens, in cache positions (padding applied)
    attention_mask: torch.Tensor  # (batch, prefill_length) bool: real tokens (False at padding)
    decoded_capacity: int  # tokens that will be decoded at most (more grow the buffers, eager decoding only)
    static_cache: bool  # the cache is a StaticCache (fixed length, compiled decoding possible)
    num_layers: int
    attn_implementation: str
    dtype: torch.dtype  # of the hidden states
    record: bool = False  # keep per-step records for tracing (DyCoke's active set at every step)
    tokens_per_frame: int | None = None  # video tokens of each frame, frame after frame (None: not known)
    # (batch, prefill_length) int64: the quota group of each video token (TokenSelection.groups, numbered per row
    # across its videos), -1 elsewhere; None: each row's video tokens are one group
    video_groups: torch.Tensor | None = None


class DecodeState:
    """One generation's state of a decode-time compressor; the hooks below are called by the model's decoder
    layers and its cache. The first forward of a generation is its prefill, the others are decoding steps of one
    token each (chunked prefill, assisted and speculative decoding are not supported)."""

    def __init__(self, inputs: GenerationInputs):
        self.inputs = inputs
        self.prefill_length = inputs.prunable.shape[1]
        self.last_layer = inputs.num_layers - 1
        self.phase = PREFILL  # a Python constant for every decoding step, so compiled steps never recompile on it

    # ---- hooks ---------------------------------------------------------------------------------------------------

    def before_layer(self, layer_idx: int, inputs: LayerInputs, cache) -> LayerInputs:
        """Called before decoder layer ``layer_idx`` runs; returns the inputs it should run with."""
        if layer_idx == 0 and self.phase == DECODE:
            if inputs.hidden_states.shape[1] != 1:
                raise NotImplementedError(
                    f"{type(self).__name__}: a decoding forward of {inputs.hidden_states.shape[1]} tokens; only one "
                    "token per forward is supported after the prefill (no chunked prefill, assisted or speculative "
                    "decoding)"
                )
            self.begin_step(cache)
        return self.layer_inputs(layer_idx, inputs, cache)

    def after_layer(self, decoder_layer, layer_idx: int, inputs: LayerInputs, cache) -> None:
        """Called after decoder layer ``layer_idx`` ran with ``inputs``."""
        self.observe(decoder_layer, layer_idx, inputs, cache)
        if layer_idx == self.last_layer and self.phase == PREFILL:
            self.phase = DECODE

    def static_cache_lengths(self, max_cache_len: int) -> list[int] | None:
        """Per layer, the length a static cache of ``max_cache_len`` tokens allocates for this generation (a state
        whose layers hold fewer tokens from the prefill on asks for less); None: ``max_cache_len`` for every layer."""
        return None

    def uncached_prompt_tokens(self, layer_idx: int) -> int:
        """Prompt tokens layer ``layer_idx``'s cache no longer holds (a method that cut it after the prefill): the
        cache still counts them as seen (:meth:`_CompressionCache.get_seq_length`), as the model's positions do."""
        return 0

    def keeps_full_cache(self, layer_idx: int) -> bool:
        """Whether the cache stores this layer's new keys/values (else :meth:`update_cache` keeps them)."""
        return True

    def update_cache(self, layer_idx, key, value, keys, values) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys/values layer ``layer_idx`` attends over. ``key``/``value`` are the new token(s)'; ``keys``/
        ``values`` what the cache returned after storing them (None when :meth:`keeps_full_cache` is False)."""
        return keys, values

    # ---- what subclasses implement -------------------------------------------------------------------------------

    def begin_step(self, cache) -> None:
        """Start a decoding step (called once per decoding forward, before layer 0)."""

    def layer_inputs(self, layer_idx: int, inputs: LayerInputs, cache) -> LayerInputs:
        return inputs

    def observe(self, decoder_layer, layer_idx: int, inputs: LayerInputs, cache) -> None:
        """Read what decoder layer ``layer_idx`` just did."""

    def add_to_output(self, layer_idx: int, output: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Decoder layer ``layer_idx``'s prefill ``output`` with ``features`` (B, S, D), one per prefill position,
        added to what the next layer runs on, each slot getting the feature of the position it holds (a model that adds
        features to the hidden states between layers: Qwen3-VL's deepstack). Called after :meth:`after_layer`. A
        state that shortens the hidden states maps its slots; here they are the prefill's own."""
        return output + features

    def summary(self) -> dict:
        """Statistics of the generation, as plain Python values (read from the device once, at the end)."""
        return {}


class DecodeCompressor(ABC):
    """A decode-time compression method with its arguments; makes a fresh :class:`DecodeState` per generation."""

    name: str
    label: str  # for messages ("FastV")
    stats_key: str  # its entry in ``last_compression_stats`` ("fastv")

    @abstractmethod
    def new_state(self, inputs: GenerationInputs) -> DecodeState | None:
        """The state of one generation, or None when this generation has nothing to compress."""

    def describe(self) -> dict:
        return {"name": self.name}

    def unmodified_summary(self) -> dict:
        """The statistics of a generation it had nothing to do in (no video token): its arguments, nothing pruned."""
        return {**{k: v for k, v in self.describe().items() if k != "name"}, "image_tokens": [], "decode_steps": 0}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.describe().items() if k != "name")
        return f"{type(self).__name__}({args})"


class _CompressionCache:
    """Routes key/value updates through the generation's :class:`DecodeState` (``self.compression``)."""

    compression: DecodeState | None  # None: no decode-time compression in this generation

    def attach(self, compression: DecodeState | None) -> None:
        """Give the cache its generation's state, before the prefill."""
        self.compression = compression

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if self.compression is None:
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        keys = values = None
        if self.compression.keeps_full_cache(layer_idx):
            keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        return self.compression.update_cache(layer_idx, key_states, value_states, keys, values)

    def get_seq_length(self, layer_idx: int = 0):
        """The tokens seen (prompt and decoded), also when the state cut the prompt from this layer's cache: what
        transformers reads to number the next positions."""
        length = super().get_seq_length(layer_idx)
        if self.compression is None:
            return length
        return length + self.compression.uncached_prompt_tokens(layer_idx)


class CompressionDynamicCache(_CompressionCache, DynamicCache):
    """A ``DynamicCache`` carrying one generation's decode-time compression state."""

    def __init__(self, config, compression: DecodeState | None):
        super().__init__(config=config)
        self.attach(compression)


class CompressionStaticCache(_CompressionCache, StaticCache):
    """A ``StaticCache`` carrying one generation's decode-time compression state (compiled decoding works)."""

    def __init__(self, config, max_cache_len: int, compression: DecodeState | None):
        super().__init__(config=config, max_cache_len=max_cache_len)
        self.attach(compression)

    def attach(self, compression: DecodeState | None) -> None:
        """Also sizes each layer as the state asks (its buffers are allocated at the prefill's first update)."""
        super().attach(compression)
        lengths = None if compression is None else compression.static_cache_lengths(self.layers[0].max_cache_len)
        for layer, length in zip(self.layers, lengths or []):
            size_static_layer(layer, length)


def size_static_layer(layer, length: int) -> None:
    """Make a static cache layer hold ``length`` tokens (a state whose layer holds fewer tokens than the prompt);
    before the layer's first update, which allocates its buffers."""
    if layer.is_initialized:
        raise RuntimeError("a static cache layer can be sized only before its prefill")
    layer.max_cache_len = length


def new_token_budget(generation_config, generate_kwargs: dict, prompt_length: int, counts_prompt: bool = False) -> int:
    """How many tokens ``generate`` may produce after a prompt of ``prompt_length`` tokens, by transformers' rules:
    ``max_new_tokens``; else ``max_length`` minus the prompt when ``max_length`` counts it (a prompt of token ids, or
    a ``max_length`` passed to this call), else ``max_length`` (a prompt given as embeddings only)."""
    config = copy.deepcopy(generate_kwargs.get("generation_config") or generation_config)
    config.update(**{k: v for k, v in generate_kwargs.items() if k in ("max_new_tokens", "max_length")})
    if config.max_new_tokens is not None:
        return max(int(config.max_new_tokens), 1)
    if counts_prompt or "max_length" in generate_kwargs:
        return max(int(config.max_length) - prompt_length, 1)
    return max(int(config.max_length), 1)


def check_generate_arguments(decoder: DecodeCompressor, kwargs: dict, generation_config) -> None:
    """A ValueError naming the method for what a decode-time compressor cannot run with: a cache passed in (it makes
    each call's own), ``use_cache=False``, beam search or several sequences per prompt row."""
    from llava.transformers_compat import cache_argument

    name = decoder.label
    config = kwargs.get("generation_config") or generation_config
    if cache_argument(kwargs) is not None:
        raise ValueError(
            f"{name} makes the cache of each generate call (it holds the call's pruning state); do not pass "
            "past_key_values (cache). Choose its kind with cache_implementation='dynamic' or 'static'."
        )
    if kwargs.get("use_cache", config.use_cache) is False:
        raise ValueError(f"{name} works on the KV cache: generate with use_cache=True (the default).")
    for argument, default in (("num_beams", 1), ("num_return_sequences", 1)):
        value = kwargs.get(argument, getattr(config, argument, default) or default)
        if value != 1:
            raise ValueError(f"{name} does not support {argument}={value} (one sequence per prompt row); use 1.")


CACHE_IMPLEMENTATIONS = ("dynamic", "static")


def make_generation_cache(config, compression: DecodeState, cache_implementation: str | None, max_cache_len: int):
    """The cache of one generation: dynamic (default) or static (``max_cache_len`` tokens)."""
    if cache_implementation in (None, "dynamic"):
        return CompressionDynamicCache(config, compression)
    if cache_implementation == "static":
        return CompressionStaticCache(config, max_cache_len, compression)
    raise ValueError(
        f"cache_implementation={cache_implementation!r} is not supported with video-token compression "
        f"(it makes the cache of each generate call); allowed: {', '.join(CACHE_IMPLEMENTATIONS)}."
    )


def mark_static(*tensors: torch.Tensor) -> None:
    """Tell torch.compile these per-generation buffers keep their address (updated in place), as transformers'
    StaticCache does for its own: CUDA graphs then read them where they are instead of copying them."""
    if not torch.compiler.is_compiling():
        for tensor in tensors:
            torch._dynamo.mark_static_address(tensor)
