"""The SigLIP vision tower of LLaVA-OneVision / LLaVA-Video.

The checkpoints store the tower under ``model.vision_tower.vision_tower.vision_model.*`` with the
published SigLIP's last encoder layer already removed and without the pooling head. Features are
the last hidden state of the remaining stack, taken *before* ``post_layernorm`` (the layer norm's
weights are stored, so the module exists, but it is never applied).

transformers' ``SiglipVisionModel`` lays its keys out differently from one minor version to the next,
so the tower is assembled here from transformers' SigLIP building blocks under the exact names the
checkpoints use.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from transformers import SiglipVisionConfig
from transformers.models.siglip.modeling_siglip import SiglipEncoder, SiglipVisionEmbeddings

from llava.model.checkpoint_files import read_json

# google/siglip-so400m-patch14-384 as published (vision part). Known here so that loading a LLaVA
# checkpoint, which already contains the tower's weights, never needs the hub.
SO400M_PATCH14_384 = dict(
    hidden_size=1152,
    intermediate_size=4304,
    num_attention_heads=16,
    num_hidden_layers=27,
    image_size=384,
    patch_size=14,
    num_channels=3,
    hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6,
    attention_dropout=0.0,
)
KNOWN_TOWERS = {"google/siglip-so400m-patch14-384": SO400M_PATCH14_384}


def _vision_fields(config_dict: dict) -> dict:
    """Accept either a SiglipVisionConfig dict or a full SiglipConfig dict (with ``vision_config``)."""
    if "vision_config" in config_dict and isinstance(config_dict["vision_config"], dict):
        config_dict = config_dict["vision_config"]
    keep = set(SO400M_PATCH14_384)
    return {k: v for k, v in config_dict.items() if k in keep}


def resolve_tower_folder(name: str, checkpoint_dir: str | os.PathLike | None) -> Path | None:
    """The local folder ``mm_vision_tower`` points to (absolute, or relative to the checkpoint), if any."""
    candidates = [Path(name)]
    if checkpoint_dir is not None and not os.path.isabs(name):
        candidates.insert(0, Path(checkpoint_dir) / name)
    for folder in candidates:
        if (folder / "config.json").is_file():
            return folder.resolve()
    return None


def published_tower_config(name: str, checkpoint_dir: str | os.PathLike | None = None) -> dict:
    """The *published* (un-cut) SigLIP vision config named by ``mm_vision_tower``.

    Looks, in order, for a local folder with a ``config.json`` and for a tower known offline.
    """
    folder = resolve_tower_folder(name, checkpoint_dir)
    if folder is not None:
        return _vision_fields(read_json(folder / "config.json"))
    key = name.rstrip("/")
    if key in KNOWN_TOWERS:
        return dict(KNOWN_TOWERS[key])
    known = ", ".join(sorted(KNOWN_TOWERS))
    raise ValueError(
        f"Unknown vision tower {name!r}: it is neither a folder with a config.json "
        f"(absolute or relative to {checkpoint_dir!s}) nor a tower known offline ({known})."
    )


def llava_tower_config(published: dict) -> SiglipVisionConfig:
    """The config of the tower as LLaVA uses it: last encoder layer removed, no pooling head."""
    fields = dict(published)
    fields["num_hidden_layers"] = int(fields["num_hidden_layers"]) - 1
    if fields["num_hidden_layers"] < 1:
        raise ValueError(f"The vision tower needs at least 2 encoder layers, got {published['num_hidden_layers']}.")
    config = SiglipVisionConfig(**fields, vision_use_head=False)
    # sdpa is exact, runs everywhere and uses fused kernels on CUDA; the LM's backend choice is separate.
    config._attn_implementation = "sdpa"
    return config


class SiglipVisionBody(nn.Module):
    """Embeddings, encoder and (stored but unused) post layer norm, under the checkpoint's names."""

    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.embeddings = SiglipVisionEmbeddings(config)
        self.encoder = SiglipEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # The position embedding is added from its weight directly rather than through the module's
        # non-persistent ``position_ids`` buffer, which a meta-device (from_pretrained) load leaves unset.
        patches = self.embeddings.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        hidden = patches + self.embeddings.position_embedding.weight[None]
        return self.encoder(inputs_embeds=hidden).last_hidden_state


class _SiglipVisionModule(nn.Module):
    """Holds ``vision_model`` so that weight names read ``vision_tower.vision_model.*``."""

    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.vision_model = SiglipVisionBody(config)


class SigLipVisionTower(nn.Module):
    """``model.vision_tower``: pixel values (N, 3, S, S) -> patch features (N, (S/p)^2, hidden)."""

    def __init__(self, config: SiglipVisionConfig, image_processor=None):
        super().__init__()
        self.config = config
        self.vision_tower = _SiglipVisionModule(config)
        self.image_processor = image_processor
        self.is_loaded = True  # LLaVA-NeXT's builder asks; the weights come with the checkpoint.

    @property
    def image_size(self) -> int:
        return int(self.config.image_size)

    @property
    def num_patches_per_side(self) -> int:
        return self.image_size // int(self.config.patch_size)

    @property
    def num_patches(self) -> int:
        return self.num_patches_per_side**2

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_tower.vision_model.embeddings.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.vision_tower.vision_model.embeddings.patch_embedding.weight.device

    def load_model(self, device_map=None):  # LLaVA-NeXT API; nothing to do, weights are in the checkpoint
        return None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != (self.image_size,) * 2:
            raise ValueError(
                f"The vision tower takes pixel values of shape (N, 3, {self.image_size}, {self.image_size}); "
                f"got {tuple(images.shape)}. Preprocess frames with the model's image processor."
            )
        # Inputs arrive in whatever dtype the caller used (lmms-eval sends float16); the tower computes in its own.
        return self.vision_tower.vision_model(images.to(device=self.device, dtype=self.dtype))
