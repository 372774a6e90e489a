"""The vision tower's attention on transformers' own video LLMs, for the compressors that score video tokens with it
(``needs_tower_attention``: VisionZip, FlashVID, HoliTom).

Such a compressor's ``select(features, attention=(F, N), keys=(F, N, head_dim))`` needs, for every token the language
model sees, the attention it RECEIVES in the vision tower's last used layer (mean over heads and over queries) and
that layer's keys (mean over heads), brought to the LM's tokens the way the features are. A recorder here runs the
model's own ``get_video_features`` with a forward pre-hook on that layer which only reads its input (the tower's
outputs are unchanged) and returns one :class:`TowerAttention` per video, in the order of the videos' features.

* LLaVA-OneVision (SigLIP): the encoder layer whose output the model uses (``vision_feature_layer``), scored by
  :func:`llava.compression.visionzip.siglip_attention_scores`, then pooled per frame with the model's own
  ``apply_pooling`` (bilinear 27x27 -> 14x14): exactly what this package's LLaVA model does
  (``llava_arch._encode_with_tower_inputs`` / ``_video_tokens``).
* Qwen2-VL / Qwen2.5-VL / Qwen3-VL: the rule of the public FlashVID code (github.com/Fanziyang-v/FlashVID at
  1d37422c5afcaa15ee46b5355f5ba798fa93290a, ``flashvid/modeling_qwen2_5_vl.py``:
  ``Qwen2_5_VisionTransformerPretrainedModel_forward`` and ``Qwen2_5_VLVisionAttention_forward``;
  ``flashvid/modeling_qwen3_vl.py``: ``Qwen3VLVisionModel_forward`` and ``Qwen3VLVisionAttention_forward``): the
  LAST vision block, its attention within each temporal step (``cu_seqlens`` per frame: a full-attention block in
  Qwen2.5-VL, whose other blocks attend within windows), on the rotary-embedded queries and keys; softmax, mean over
  heads and over the step's queries; then the mean over the ``spatial_merge_size**2`` patches that the merger turns
  into one LM token; Qwen2.5-VL's window order is undone (``argsort(window_index)``). Keys, which FlashVID does not
  use, follow ModelTC/LightCompress's Qwen2.5-VL VisionZip (commit 9701d035b0aac5df97a2ebaadb30bcf0707616f5,
  ``llmc/compression/token_reduction/visionzip.py``: ``Qwen2_5_VLVisionAttention_forward`` and ``merger_hook``): the
  last block's rotary-embedded keys, mean over the merged patches and over heads. Qwen2-VL has no public version; its
  blocks all attend within each temporal step, like Qwen3-VL's, and the same rule applies.
  (VidCom2's ``qwen`` branch scores its Qwen VisionZip / HoliTom with feature norms, not the tower: not followed.)

FastVID on the Qwen models (``FRAME_QUERY``, :mod:`.fastvid_qwen`) reads another score of the same last block: the
rule of the public FastVID code for Qwen2.5-VL (github.com/LunarShen/FastVID at
a40a109cb8df20e8c2c17c6850f8269717369990, ``fastvid_qwen25vl/lmms-eval/lmms_eval/models/qwenvlutils/
modeling_qwen2_5_vl.py``: ``Qwen2_5_VLVisionFlashAttention2.forward`` and
``Qwen2_5_VisionTransformerPretrainedModel.forward``): per temporal step, the attention of the step's MEAN
rotary-embedded query over the mean of each merged group's rotary-embedded keys (the 2x2 patches that become one LM
token), softmax, mean over heads; then the window order undone. It is defined per temporal step whatever the block's
windows. Qwen2-VL and Qwen3-VL have no public version: the same rule applies to their last block. ``keys`` are the
merged groups' mean keys, mean over heads.

* FastVID on LLaVA-OneVision (``POOLING_HEAD``): the feature layer's output (a forward hook that only reads it)
  through SigLIP's ``post_layernorm`` and attention-pooling head, read from the tower checkpoint
  ``model.config.mm_vision_tower`` names, or the published google/siglip-so400m-patch14-384
  (:mod:`llava.model.pooling_head`, as this package's LLaVA model and the public FastVID code do); the head's
  attention pooled like the features, its output per frame as ``frame_global``.

Departure, on purpose: scores are computed in float32 (FlashVID casts the softmax back to the model dtype before
averaging); in float32 models both agree.
"""

from __future__ import annotations

import importlib
import itertools
from dataclasses import dataclass

import torch

from .visionzip import record_siglip_attention

__all__ = ["FRAME_QUERY", "POOLING_HEAD", "RECEIVED", "TowerAttention", "tower_recorder"]

RECEIVED = "received"  # attention each token receives, mean over heads and queries (VisionZip, FlashVID, HoliTom)
FRAME_QUERY = "frame_query"  # each step's mean query over the merged groups' mean keys (FastVID on Qwen)
POOLING_HEAD = "pooling_head"  # SigLIP's pooling head on the feature layer's output (FastVID on LLaVA-OneVision)


@dataclass(frozen=True)
class TowerAttention:
    """One video's tower attention, per LM token: ``attention`` (F, N) and ``keys`` (F, N, head_dim), float32; with
    the ``POOLING_HEAD`` rule (FastVID), ``attention`` is the head's saliency and ``frame_global`` (F, C) the head's
    output per frame, and ``keys`` is None."""

    attention: torch.Tensor
    keys: torch.Tensor | None
    frame_global: torch.Tensor | None = None

    def select_inputs(self) -> dict:
        """The keyword inputs of the compressor's ``select``."""
        if self.frame_global is not None:
            return {"frame_global": self.frame_global, "saliency": self.attention}
        return {"attention": self.attention, "keys": self.keys}


def tower_recorder(model, method: str, rule: str = RECEIVED):
    """The recorder for ``model`` (a transformers video LLM), or a ValueError naming ``method`` and the model when its
    configuration has no tower attention that the public code defines. ``recorder(get_video_features, args, kwargs)``
    runs the model's ``get_video_features(*args, **kwargs)`` and returns (its output, a TowerAttention per video).
    ``rule`` is the score recorded: ``RECEIVED`` or (Qwen models only) ``FRAME_QUERY``."""
    vision = model.model
    if hasattr(vision, "vision_tower") and hasattr(vision, "apply_pooling") and rule in (RECEIVED, POOLING_HEAD):
        return _OnevisionRecorder(model, method, rule)
    if hasattr(vision, "visual"):
        return _QwenRecorder(model, method, rule)
    raise ValueError(f"compressor={method!r}: {type(model).__name__} has no vision tower this package can read.")


def _first(args, kwargs, position: int, *names):
    if len(args) > position:
        return args[position]
    return next((kwargs[name] for name in names if kwargs.get(name) is not None), None)


# ---- LLaVA-OneVision ------------------------------------------------------------------------------------------------


class _OnevisionRecorder:
    def __init__(self, model, method: str, rule: str = RECEIVED):
        self.model, self.method, self.rule = model, method, rule
        self.layer_index(model.config.vision_feature_layer)  # refused before the model changes
        if rule == POOLING_HEAD:  # read now: a missing head is refused before the model changes
            from llava.model.pooling_head import load_pooling_head

            tower = self.model.model.vision_tower
            load_pooling_head(model, model.config.vision_config, next(tower.parameters()))

    def layer_index(self, feature_layer) -> int:
        """The encoder layer whose output is ``hidden_states[feature_layer]`` (index 0 is the embeddings)."""
        layers = len(self.encoder_layers())
        if isinstance(feature_layer, int) and not isinstance(feature_layer, bool):
            index = feature_layer - 1 if feature_layer >= 0 else layers + feature_layer
            if 0 <= index < layers:
                return index
        raise ValueError(
            f"compressor={self.method!r} scores tokens with the attention of the SigLIP layer whose output "
            f"{type(self.model).__name__} uses; vision_feature_layer={feature_layer!r} names no single encoder layer "
            f"of its {layers}."
        )

    def encoder_layers(self):
        tower = self.model.model.vision_tower
        return getattr(tower, "vision_model", tower).encoder.layers  # transformers 5.4 nests it, 5.23 does not

    def __call__(self, encode, args, kwargs):
        pixels = _first(args, kwargs, 0, "pixel_values_videos", "pixel_values")
        feature_layer = _first(args, kwargs, 1, "vision_feature_layer")
        strategy = _first(args, kwargs, 2, "vision_feature_select_strategy")
        config = self.model.config
        feature_layer = config.vision_feature_layer if feature_layer is None else feature_layer
        strategy = config.vision_feature_select_strategy if strategy is None else strategy
        layer = self.encoder_layers()[self.layer_index(feature_layer)]
        if self.rule == POOLING_HEAD:
            return self.pooling_head(encode, args, kwargs, layer, strategy, pixels)
        with record_siglip_attention(layer) as records:
            output = encode(*args, **kwargs)
        attention, keys = records[-1]
        if strategy == "default":  # the features drop the first token: so do the scores
            attention, keys = attention[:, 1:], keys[:, 1:]
        pool = self.model.model.apply_pooling  # the features' own 2D pooling
        attention, keys = pool(attention[..., None])[..., 0], pool(keys)
        videos, frames = pixels.shape[:2]
        attention = attention.view(videos, frames, -1)
        keys = keys.view(videos, frames, attention.shape[-1], -1)
        return output, [TowerAttention(a, k) for a, k in zip(attention, keys)]

    def pooling_head(self, encode, args, kwargs, layer, strategy, pixels):
        """FastVID's inputs, as this package's LLaVA model makes them (llava.model.pooling_head): the feature layer's
        output (a forward hook that only reads it) through SigLIP's ``post_layernorm`` and pooling head; the head's
        attention over the patches pooled like the features."""
        from llava.model.pooling_head import load_pooling_head, run_pooling_head

        outputs = []
        handle = layer.register_forward_hook(lambda module, inputs, output: outputs.append(
            output[0] if isinstance(output, tuple) else output))
        try:
            output = encode(*args, **kwargs)
        finally:
            handle.remove()
        patches = outputs[-1][:, 1:] if strategy == "default" else outputs[-1]
        tower = self.model.model.vision_tower
        post_layernorm = getattr(tower, "vision_model", tower).post_layernorm
        frame_global, saliency = run_pooling_head(post_layernorm, load_pooling_head(self.model), patches)
        saliency = self.model.model.apply_pooling(saliency[..., None].to(patches.dtype))[..., 0].float()
        videos, frames = pixels.shape[:2]
        saliency, frame_global = saliency.view(videos, frames, -1), frame_global.float().view(videos, frames, -1)
        return output, [TowerAttention(a, None, g) for a, g in zip(saliency, frame_global)]


# ---- Qwen2-VL, Qwen2.5-VL, Qwen3-VL ---------------------------------------------------------------------------------


class _QwenRecorder:
    def __init__(self, model, method: str, rule: str = RECEIVED):
        self.model, self.method, self.rule = model, method, rule
        visual = model.model.visual
        self.block = visual.blocks[-1]
        full = getattr(visual, "fullatt_block_indexes", None)
        self.windowed = full is not None
        if self.windowed and rule == RECEIVED and len(visual.blocks) - 1 not in full:
            raise ValueError(
                f"compressor={method!r}: the public code scores tokens with the last vision block's attention over "
                f"whole frames; the last block of this {type(model).__name__} attends within windows "
                f"(fullatt_block_indexes={list(full)}), which it does not define."
            )
        self.rotary = importlib.import_module(type(self.block.attn).__module__).apply_rotary_pos_emb_vision

    def __call__(self, encode, args, kwargs):
        grids = _first(args, kwargs, 1, "video_grid_thw", "grid_thw")
        records = []

        def hook(module, hook_args, hook_kwargs):
            hidden = hook_args[0] if hook_args else hook_kwargs["hidden_states"]
            cu_seqlens = hook_args[1] if len(hook_args) > 1 else hook_kwargs["cu_seqlens"]
            if self.rule == FRAME_QUERY:
                records.append(self.frame_query_scores(hidden, grids, hook_kwargs["position_embeddings"]))
            else:
                records.append(self.patch_scores(hidden, cu_seqlens, hook_kwargs["position_embeddings"]))

        handle = self.block.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            output = encode(*args, **kwargs)
        finally:
            handle.remove()
        attention, keys = records[-1]
        return output, self.per_video(attention, keys, grids, merged=self.rule == FRAME_QUERY)

    def rotated(self, hidden: torch.Tensor, position_embeddings):
        """The last block's rotary-embedded queries and keys, (S, heads, head_dim) each, float32."""
        attn = self.block.attn
        x = self.block.norm1(hidden)
        queries, keys, _ = attn.qkv(x).reshape(x.shape[0], 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        queries, keys = self.rotary(queries, keys, *position_embeddings)
        return queries.float(), keys.float()

    def frame_query_scores(self, hidden: torch.Tensor, grids: torch.Tensor, position_embeddings):
        """Per merged group, in the tower's order: (the attention of its temporal step's mean query over the step's
        groups' mean keys, softmax, mean over heads; the group's mean key, mean over heads), both float32."""
        unit = self.model.model.visual.spatial_merge_size**2
        scaling = self.block.attn.scaling
        with torch.no_grad():
            queries, keys = self.rotated(hidden, position_embeddings)
            heads, head_dim = keys.shape[1:]
            keys = keys.view(-1, unit, heads, head_dim).mean(dim=1)  # (groups, heads, head_dim)
            attention, start = [], 0
            for t, h, w in grids.tolist():  # a temporal step's patches are contiguous, windows or not
                q = queries[start * unit : (start + t * h * w // unit) * unit].view(t, h * w, heads, head_dim)
                k = keys[start : start + t * h * w // unit].view(t, h * w // unit, heads, head_dim)
                logits = torch.einsum("thd,tghd->thg", q.mean(dim=1), k) * scaling
                attention.append(logits.softmax(dim=-1).mean(dim=1).flatten())
                start += t * h * w // unit
        return torch.cat(attention), keys.mean(dim=1)

    def patch_scores(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor, position_embeddings):
        """Per patch, in the tower's order: (attention received within its segment, mean over heads and queries;
        rotary-embedded keys, mean over heads), both float32."""
        attn = self.block.attn
        with torch.no_grad():
            queries, keys = self.rotated(hidden, position_embeddings)
            queries, keys = queries.transpose(0, 1), keys.transpose(0, 1)  # (heads, S, head_dim)
            length = queries.shape[1]
            received = torch.zeros(length, device=hidden.device)
            bounds = cu_seqlens.tolist()  # one host read per video batch, as the tower itself does
            for start, end in itertools.pairwise(bounds):
                for head in range(attn.num_heads):
                    logits = queries[head, start:end] @ keys[head, start:end].T * attn.scaling
                    received[start:end] += logits.softmax(dim=-1).mean(dim=0)
        return received / attn.num_heads, keys.mean(dim=0)

    def per_video(self, attention: torch.Tensor, keys: torch.Tensor, grids: torch.Tensor,
                  merged: bool = False) -> list[TowerAttention]:
        """Patches (or, ``merged``, merged groups) -> LM tokens (mean over each merged group, the tower's window order
        undone), split per video."""
        visual = self.model.model.visual
        unit = visual.spatial_merge_size**2
        if not merged:
            attention = attention.view(-1, unit).mean(dim=1)
            keys = keys.view(-1, unit, keys.shape[-1]).mean(dim=1)
        if self.windowed:
            order = torch.argsort(_window_index(visual, grids).to(attention.device))
            attention, keys = attention[order], keys[order]
        sizes = (grids.prod(dim=-1) // unit).tolist()
        steps = grids[:, 0].tolist()
        return [TowerAttention(a.view(t, -1), k.view(t, a.numel() // t, -1))
                for t, a, k in zip(steps, attention.split(sizes), keys.split(sizes))]


def _window_index(visual, grids: torch.Tensor) -> torch.Tensor:
    """Qwen2.5-VL's window order of the merged tokens (the tower's own function; older releases had a method)."""
    if hasattr(visual, "get_window_index"):
        return visual.get_window_index(grids)[0]
    from transformers.vision_utils import get_vision_window_index

    return get_vision_window_index(grids, spatial_merge_size=visual.spatial_merge_size,
                                   window_size=visual.window_size, patch_size=visual.patch_size)[0]
