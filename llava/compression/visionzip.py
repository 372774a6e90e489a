"""VisionZip (CVPR 2025) on video: per frame, dominant tokens by the tower's attention plus merged contextual tokens.

The official code (github.com/dvlab-research/VisionZip, ``visionzip/clip_encoder.py``,
``CLIPVisionTower_VisionZip.forward``) handles CLIP towers only: it ranks the patches by the [CLS] token's
attention in the second-to-last layer and merges the rest by the similarity of that layer's keys. SigLIP has no
[CLS] token. The LLaVA-OneVision / LLaVA-Video adaptation followed here is the public one of HoliTom
(github.com/cokeshao/HoliTom, ``visionzip/llava_arch.py``,
``LlavaMetaForCausalLM_visionzip.prepare_inputs_labels_for_multimodal`` and the ``WRAPPER=visionzip`` branches of
``LLaVA-NeXT/llava/model/multimodal_encoder/siglip_encoder.py``):

* the score of a patch is the attention it RECEIVES in the tower's last kept encoder layer (the one whose output
  is the features), averaged over heads and over all 729 queries; the similarity metric is that layer's keys
  averaged over heads, (729, head_dim);
* all 729 patches go through the projector; features, scores and keys are then pooled per frame with the model's
  own 2D pooling (bilinear to 14x14 for OV, average to 13x13 for LLaVA-Video), and VisionZip runs on the POOLED
  tokens of each frame (the frames are its batch). So the kept tokens are pooled tokens, after projector and pooling.

:func:`siglip_attention_scores` computes the score and keys from an encoder layer's input without touching the
tower's outputs; :func:`record_siglip_attention` collects them during a forward pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from .base import TokenSelection, VideoTokenCompressor, check_video_features
from .registry import Argument, Stages, register

__all__ = ["VISIONZIP_ARGUMENTS", "VisionZip", "record_siglip_attention", "siglip_attention_scores"]

VISIONZIP_ARGUMENTS = (
    Argument("visionzip_dominant", 42, "[0, inf)", "dominant tokens kept per frame (highest attention)", integer=True),
    Argument("visionzip_contextual", 8, "[0, inf)", "contextual tokens per frame (the other tokens merged into them)",
             integer=True),
)
_ARGUMENTS = {argument.name: argument for argument in VISIONZIP_ARGUMENTS}


class VisionZip(VideoTokenCompressor):
    """VisionZip per frame: ``dominant + contextual`` tokens of each frame's N (at most N).

    * Dominant: the ``dominant`` tokens with the highest ``attention`` (ties: lower index), with their own features.
    * Contextual: of the other N - dominant tokens (in spatial order), every ``step``-th one is a target, the first
      ``contextual`` of positions 0, step, 2 * step, ... with ``step = max(1, (N - dominant) // contextual)``; every
      remaining token joins the target whose normalised ``keys`` are most similar (ties: the first target). A target's
      value is its own feature PLUS the mean of the tokens that joined it (the public code's rule; just its feature
      when none joined). It sits at the target's position.

    Order inside a frame, as the public code for ``one_token`` / ``frame`` layouts: the dominant tokens in spatial
    order, then the contextual tokens in spatial order (the public ``grid`` path sorts all by position, as
    :func:`~llava.compression.layout.assemble_video_tokens` does for grid). Frames in time order.

    ``select`` needs, for the N pooled tokens of each frame (see the module docstring and
    :func:`siglip_attention_scores`):

    * ``attention`` (F, N): the attention each patch receives in the tower's last kept layer, mean over heads and
      queries, pooled like the features;
    * ``keys`` (F, N, head_dim): that layer's keys, mean over heads, pooled like the features.

    Defaults: 42 + 8 = 50 tokens per frame, the adaptation's default (``SPATIAL_TOKENS=50``,
    ``DOMINANT_RATIO=54/64``: ``dominant = int(50 * 54 / 64)``). Counts are capped per frame: ``dominant`` at N and
    ``contextual`` at N - dominant (the public code fails when they do not fit); ``contextual = 0`` keeps the
    dominant tokens only. Similarities and merges are computed in float32; values come in the features' dtype.
    """

    name = "visionzip"
    needs_tower_attention = True

    def __init__(self, dominant: int = 42, contextual: int = 8) -> None:
        self.dominant = _ARGUMENTS["visionzip_dominant"].check(dominant)
        self.contextual = _ARGUMENTS["visionzip_contextual"].check(contextual)
        if self.dominant + self.contextual == 0:
            raise ValueError(
                "visionzip_dominant=0 and visionzip_contextual=0 keep nothing; allowed: a sum of at least 1."
            )

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "dominant": self.dominant, "contextual": self.contextual}

    def counts(self, tokens_per_frame: int) -> tuple[int, int]:
        """(dominant, contextual) tokens kept in a frame of ``tokens_per_frame`` tokens."""
        dominant = min(self.dominant, tokens_per_frame)
        return dominant, min(self.contextual, tokens_per_frame - dominant)

    def select(self, features: torch.Tensor, grid_hw: tuple[int, int] | None = None, *,
               attention: torch.Tensor | None = None, keys: torch.Tensor | None = None,
               **inputs: Any) -> TokenSelection:
        num_frames, tokens_per_frame, dim = check_video_features(features)
        if grid_hw is not None and (len(grid_hw) != 2 or int(grid_hw[0]) * int(grid_hw[1]) != tokens_per_frame):
            raise ValueError(
                f"grid_hw {grid_hw!r} does not give the {tokens_per_frame} tokens per frame of the features"
            )
        if not isinstance(attention, torch.Tensor) or tuple(attention.shape) != (num_frames, tokens_per_frame):
            raise ValueError(
                f"VisionZip needs attention=: the attention each pooled token receives in the tower's last layer, "
                f"shape ({num_frames}, {tokens_per_frame}); got {_shape(attention)}"
            )
        if not isinstance(keys, torch.Tensor) or keys.dim() != 3 or keys.shape[:2] != (num_frames, tokens_per_frame):
            raise ValueError(
                f"VisionZip needs keys=: the tower's last-layer keys (mean over heads) of each pooled token, "
                f"shape ({num_frames}, {tokens_per_frame}, head_dim); got {_shape(keys)}"
            )
        dominant, contextual = self.counts(tokens_per_frame)
        device = features.device
        frame_offset = torch.arange(num_frames, device=device)[:, None] * tokens_per_frame

        top = attention.float().argsort(dim=-1, descending=True, stable=True)[:, :dominant]
        is_dominant = torch.zeros(num_frames, tokens_per_frame, dtype=torch.bool, device=device)
        is_dominant.scatter_(1, top, True)
        # Row-major nonzero: spatial order inside each frame.
        dominant_pos = is_dominant.nonzero()[:, 1].view(num_frames, dominant)
        if contextual == 0:
            index = (dominant_pos + frame_offset).flatten()
            return TokenSelection(index=index, per_frame=_per_frame(num_frames, dominant, device))

        rest_pos = (~is_dominant).nonzero()[:, 1].view(num_frames, tokens_per_frame - dominant)
        step = max(1, (tokens_per_frame - dominant) // contextual)
        is_target = torch.zeros(tokens_per_frame - dominant, dtype=torch.bool, device=device)
        is_target[torch.arange(0, tokens_per_frame - dominant, step, device=device)[:contextual]] = True
        target_pos, other_pos = rest_pos[:, is_target], rest_pos[:, ~is_target]

        x = features.float()
        metric = F.normalize(keys.float(), dim=-1, eps=0.0)  # eps=0: plain k / ||k||, as the public code
        similarity = _rows(metric, other_pos) @ _rows(metric, target_pos).transpose(1, 2)  # (F, others, targets)
        joins = similarity.argmax(dim=-1)  # (F, others)
        sums = torch.zeros(num_frames, contextual, dim, device=device).scatter_add_(
            1, joins[..., None].expand(-1, -1, dim), _rows(x, other_pos))
        sizes = torch.zeros(num_frames, contextual, device=device).scatter_add_(
            1, joins, torch.ones_like(joins, dtype=x.dtype))
        contextual_values = _rows(x, target_pos) + sums / sizes.clamp(min=1)[..., None]

        index = (torch.cat([dominant_pos, target_pos], dim=1) + frame_offset).flatten()
        values = torch.cat([_rows(x, dominant_pos), contextual_values], dim=1).reshape(-1, dim).to(features.dtype)
        per_frame = _per_frame(num_frames, dominant + contextual, device)
        return TokenSelection(index=index, per_frame=per_frame, values=values)


def siglip_attention_scores(layer: torch.nn.Module, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VisionZip (and FlashVID) scores of a transformers ``SiglipEncoderLayer`` for its input ``hidden_states``.

    Recomputes the layer's self-attention probabilities with its own ``layer_norm1``, ``q_proj`` and ``k_proj``
    (the projections in the layer's dtype, the scores and softmax in float32), one head at a time, and returns,
    all float32:

    * attention (B, S): the probability each token receives, mean over heads and over the S queries, i.e. eager
      attention's ``attn_weights.mean(1).mean(1)`` (no attention mask: SigLIP's vision tower has none);
    * keys (B, S, head_dim): the layer's keys, mean over heads.

    Nothing is written to the layer; its output is unchanged. For LLaVA-OV / LLaVA-Video use the tower's last kept
    layer (``vision_tower.vision_tower.vision_model.encoder.layers[-1]``) and its input (the hidden state before
    it), then pool both per frame with the model's ``get_2dPool`` (scores as a (F, 729, 1) map) before ``select``.
    """
    attention_module = layer.self_attn
    heads, head_dim = attention_module.num_heads, attention_module.head_dim
    with torch.no_grad():
        x = layer.layer_norm1(hidden_states)
        batch, length, _ = x.shape
        queries = attention_module.q_proj(x).view(batch, length, heads, head_dim).float()
        keys = attention_module.k_proj(x).view(batch, length, heads, head_dim).float()
        received = torch.zeros(batch, length, device=x.device)
        for h in range(heads):
            logits = queries[:, :, h] @ keys[:, :, h].transpose(1, 2) * attention_module.scale
            received += logits.softmax(dim=-1).mean(dim=1)
    return received / heads, keys.mean(dim=2)


@contextmanager
def record_siglip_attention(layer: torch.nn.Module) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """While active, every forward of ``layer`` appends ``siglip_attention_scores(layer, its input)`` to the yielded
    list. A forward pre-hook that returns nothing, removed on exit: the tower's outputs are unchanged."""
    records: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(module, args, kwargs):
        hidden_states = args[0] if args else kwargs["hidden_states"]
        records.append(siglip_attention_scores(module, hidden_states))

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield records
    finally:
        handle.remove()


def _rows(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x[f, positions[f]] for every frame f: (F, P, C) from (F, N, C) and (F, P)."""
    return x.gather(1, positions[..., None].expand(-1, -1, x.shape[-1]))


def _per_frame(num_frames: int, count: int, device: torch.device) -> torch.Tensor:
    return torch.full((num_frames,), count, dtype=torch.long, device=device)


def _shape(value: Any) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(type(value).__name__)


@register(
    "visionzip",
    *VISIONZIP_ARGUMENTS,
    summary="VisionZip: per frame, the tokens the vision tower attends to most plus merged contextual tokens",
    examples=({"visionzip_dominant": 2, "visionzip_contextual": 1}, {"visionzip_dominant": 1, "visionzip_contextual": 1}),
)
def build(settings) -> Stages:
    return Stages(video=VisionZip(settings.visionzip_dominant, settings.visionzip_contextual))
