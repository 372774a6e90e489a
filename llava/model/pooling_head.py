"""SigLIP's attention-pooling head, for compressors that read it (FastVID).

LLaVA-OneVision / LLaVA-Video checkpoints keep SigLIP's ``post_layernorm`` but not its pooling head (a learned probe
that attends over the patches: ``vision_model.head.*``). The public FastVID code
(LunarShen/FastVID, ``SigLipVisionAbstract`` in ``llava/model/multimodal_encoder/siglip_encoder.py``) loads the head
from the vision tower's own checkpoint, the one ``mm_vision_tower`` names (``google/siglip-so400m-patch14-384``), and
runs ``post_layernorm`` and the head on the tower's output patches. The same is done here: the head is read from the
folder ``mm_vision_tower`` points to (relative to the checkpoint, or absolute), else from the hub (its cache, or a
download where the hub is reachable), once per model, and kept outside the model's parameters (saving the model
writes what it loaded, nothing more).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import SiglipVisionConfig
from transformers.models.siglip.modeling_siglip import (
    SiglipMultiheadAttentionPoolingHead,
)

from llava.model.vision_tower import resolve_tower_folder

__all__ = ["PUBLISHED_TOWER", "load_pooling_head", "run_pooling_head"]

HEAD_KEY = "vision_model.head."  # in a SiglipModel or SiglipVisionModel checkpoint


PUBLISHED_TOWER = "google/siglip-so400m-patch14-384"  # the tower of every LLaVA-OneVision / LLaVA-Video


def load_pooling_head(model, tower_config=None, parameters=None) -> SiglipMultiheadAttentionPoolingHead:
    """The pooling head of ``model``'s vision tower checkpoint (cached on the model), on the tower's device and dtype.
    The checkpoint is the one ``model.config.mm_vision_tower`` names (this package's LLaVA models; transformers'
    LlavaOnevision has no such field: set it to a local SigLIP folder, else the published tower is read).
    ``tower_config`` / ``parameters``: the tower's config and a parameter of it (default: ``model.get_vision_tower()``'s).
    A ValueError says where it looked when the head cannot be read."""
    cached = model.__dict__.get("_siglip_pooling_head")
    if cached is not None:
        return cached
    config = model.config
    name = getattr(config, "mm_vision_tower", None) or (PUBLISHED_TOWER if tower_config is not None else None)
    if tower_config is None:
        tower = model.get_vision_tower()
        tower_config, parameters = tower.config, next(tower.parameters())
    head_config = SiglipVisionConfig(**{key: getattr(tower_config, key) for key in (
        "hidden_size", "intermediate_size", "num_attention_heads", "hidden_act", "layer_norm_eps")})
    head = SiglipMultiheadAttentionPoolingHead(head_config)
    weights = _head_weights(name, getattr(config, "_name_or_path", None))
    missing = sorted(set(head.state_dict()) - set(weights))
    if missing:
        raise ValueError(
            f"The vision tower checkpoint mm_vision_tower={name!r} has no complete SigLIP pooling head "
            f"({HEAD_KEY}*: missing {', '.join(missing)}); compressor='fastvid' reads the head's attention."
        )
    head.load_state_dict(weights)
    head = head.to(device=parameters.device, dtype=parameters.dtype).eval().requires_grad_(False)
    model.__dict__["_siglip_pooling_head"] = head
    return head


def run_pooling_head(post_layernorm: torch.nn.Module, head: SiglipMultiheadAttentionPoolingHead,
                     patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``post_layernorm`` then the head on the tower's output ``patches`` (F, P, C): (each frame's pooled feature
    (F, C), the probe's attention over the patches averaged over heads (F, P)), as the public FastVID code reads
    them (``SigLipVisionAbstract.forward``: the head returns the pooled output and ``nn.MultiheadAttention``'s
    head-averaged weights)."""
    with torch.no_grad():
        hidden = post_layernorm(patches)
        probe = head.probe.expand(hidden.shape[0], -1, -1)
        pooled, attention = head.attention(probe, hidden, hidden, need_weights=True, average_attn_weights=True)
        pooled = pooled + head.mlp(head.layernorm(pooled))
    return pooled[:, 0], attention[:, 0]


def _head_weights(name: str | None, checkpoint_dir: str | None) -> dict[str, torch.Tensor]:
    """The ``vision_model.head.*`` tensors of the tower checkpoint ``name`` (local folder, else the hub)."""
    if not name:
        raise ValueError("compressor='fastvid' needs SigLIP's pooling head, but the config names no mm_vision_tower.")
    folder = resolve_tower_folder(name, checkpoint_dir)
    if folder is None and "/" not in name:
        raise ValueError(
            f"compressor='fastvid' reads SigLIP's pooling head from the vision tower's checkpoint, but "
            f"mm_vision_tower={name!r} is no folder (looked relative to {checkpoint_dir!r} and to the working "
            "directory) and no hub id (owner/name)."
        )
    files = _local_files(folder) if folder is not None else _hub_files(name)
    weights = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118  (safe_open is not a dict)
                if HEAD_KEY in key:
                    weights[key.split(HEAD_KEY, 1)[1]] = handle.get_tensor(key)
    return weights


def _local_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(
            f"compressor='fastvid' reads SigLIP's pooling head from the vision tower's checkpoint, as the public FastVID "
            f"code does; the folder mm_vision_tower points to ({folder}) has no *.safetensors weights. LLaVA "
            "checkpoints do not include the head: put the tower's published weights (e.g. "
            "google/siglip-so400m-patch14-384's model.safetensors) in that folder."
        )
    return files


def _hub_files(name: str) -> list[Path]:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError

    try:
        try:
            index = json.loads(Path(hf_hub_download(name, "model.safetensors.index.json")).read_text())
            shards = sorted({file for key, file in index["weight_map"].items() if HEAD_KEY in key})
            return [Path(hf_hub_download(name, shard)) for shard in shards]
        except EntryNotFoundError:  # a single-file checkpoint has no index
            return [Path(hf_hub_download(name, "model.safetensors"))]
    except (OSError, EntryNotFoundError, HFValidationError) as error:
        raise ValueError(
            f"compressor='fastvid' reads SigLIP's pooling head from the vision tower's checkpoint "
            f"mm_vision_tower={name!r} (LLaVA checkpoints do not include it), as the public FastVID code does, and "
            f"could not get it: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}. Make the "
            "hub reachable once (it is cached), or point mm_vision_tower at a local folder with the tower's weights."
        ) from None
