"""LLaVA on Qwen2: ``LlavaQwenConfig`` / ``LlavaQwenForCausalLM``, registered with transformers' Auto classes."""

from __future__ import annotations

import os
import time

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen2Model
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2PreTrainedModel

from llava.compression.decoding import LayerInputs
from llava.model.compression_mixin import CompressionMixin
from llava.model.llava_arch import LlavaMetaForCausalLM, LlavaMetaModel
from llava.model.vision_tower import published_tower_config
from llava.timing import synchronize
from llava.transformers_compat import CACHE_ARG, cache_argument, pop_cache_argument

SUPPORTED_MODEL_TYPES = ("llava", "llava_qwen")
SUPPORTED_ARCHITECTURES = ("LlavaQwenForCausalLM",)


class LlavaQwenConfig(Qwen2Config):
    """A flat Qwen2 config plus LLaVA's ``mm_*`` fields (kept as plain attributes)."""

    model_type = "llava_qwen"


def config_from_dict(raw: dict, checkpoint_dir: str | os.PathLike | None) -> LlavaQwenConfig:
    """Read a flat LLaVA-Qwen2 config.json (model_type 'llava') as an ``LlavaQwenConfig``."""
    model_type = raw.get("model_type")
    architectures = raw.get("architectures") or []
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"Unsupported model_type {model_type!r}; this package loads {SUPPORTED_MODEL_TYPES} checkpoints.")
    if architectures and not set(architectures) & set(SUPPORTED_ARCHITECTURES):
        raise ValueError(f"Unsupported architectures {architectures}; this package loads {list(SUPPORTED_ARCHITECTURES)}.")
    fields = {k: v for k, v in raw.items() if k not in ("model_type", "transformers_version")}
    if fields.get("rope_scaling") is None:
        fields.pop("rope_scaling", None)  # null in the published configs; transformers 5 warns about the old key
    if "torch_dtype" in fields:
        fields["dtype"] = fields.pop("torch_dtype")
    config = LlavaQwenConfig(**fields)
    if getattr(config, "mm_vision_tower", None):
        config.mm_vision_tower_config = published_tower_config(config.mm_vision_tower, checkpoint_dir)
    return config


class LlavaQwenDecoderLayer(Qwen2DecoderLayer):
    """The stock ``Qwen2DecoderLayer`` with the hook points of decode-time compression (DyCoke's KV pruning, FastV).

    The compression state of a ``generate`` call lives in that call's cache (``cache.compression``, see
    :mod:`llava.compression.decoding`). Without one, this layer runs the stock forward unchanged. With one, the
    state may replace the layer's inputs before it runs (mask, positions, hidden states) and read its cache after.
    """

    def forward(self, *args, **kwargs) -> torch.Tensor:
        cache = cache_argument(kwargs)
        compression = getattr(cache, "compression", None)
        if compression is None:
            return super().forward(*args, **kwargs)
        layer_idx = self.self_attn.layer_idx
        inputs = compression.before_layer(layer_idx, LayerInputs.of_call(args, kwargs), cache)
        args, kwargs = inputs.into_call(args, kwargs)
        output = super().forward(*args, **kwargs)
        compression.after_layer(self, layer_idx, inputs, cache)
        return output


class LlavaQwenModel(LlavaMetaModel, Qwen2Model):
    config_class = LlavaQwenConfig

    def __init__(self, config: LlavaQwenConfig):
        super().__init__(config)
        # Qwen2Model builds stock layers; ours are the same modules with compression hooks (weights are set by the
        # caller's post_init or loaded by from_pretrained, which builds on the meta device).
        self.layers = nn.ModuleList(
            LlavaQwenDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)
        )


class LlavaQwenForCausalLM(CompressionMixin, Qwen2ForCausalLM, LlavaMetaForCausalLM):
    config_class = LlavaQwenConfig
    _no_split_modules = ["LlavaQwenDecoderLayer", "SigLipVisionTower"]
    last_vision_seconds = 0.0  # visual encoding time of the last generate call

    def __init__(self, config: LlavaQwenConfig):
        # Skip Qwen2ForCausalLM.__init__: it would build a plain Qwen2Model only to throw it away.
        Qwen2PreTrainedModel.__init__(self, config)
        self.model = LlavaQwenModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_model(self) -> LlavaQwenModel:
        return self.model

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        images=None,
        image_sizes=None,
        modalities=("image",),
        logits_to_keep=0,
        **kwargs,
    ):
        if inputs_embeds is None and images is not None:
            (input_ids, position_ids, attention_mask, _, inputs_embeds, labels) = self.prepare_inputs_labels_for_multimodal(
                input_ids, position_ids, attention_mask, cache_argument(kwargs), labels, images, modalities, image_sizes
            )
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,  # named, so that generate computes only the last position's logits
            **kwargs,
        )

    @torch.no_grad()
    def generate(self, inputs=None, images=None, image_sizes=None, modalities=("image",), **kwargs):
        """LLaVA-NeXT's generate: ``inputs`` are token ids with ``IMAGE_TOKEN_INDEX`` placeholders.

        The prompt goes in as embeddings, so the returned ids hold only the new tokens (as in LLaVA-NeXT).
        Rows are re-padded on the left, whatever padding the caller used. With ``keep_positions`` the prompt's
        positions are the uncompressed ones (``build_multimodal_inputs``) and decoding continues after them.
        """
        if "inputs_embeds" in kwargs:
            raise NotImplementedError("Pass token ids (with <image> placeholders) and images, not inputs_embeds.")
        input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        if input_ids is None:
            raise ValueError("generate needs the prompt's token ids as `inputs` or `input_ids`.")
        kwargs.pop("position_ids", None)
        started = time.perf_counter()
        mm = self.build_multimodal_inputs(
            input_ids, kwargs.pop("attention_mask", None), None, images, modalities, image_sizes, padding_side="left"
        )
        synchronize(mm.inputs_embeds.device)
        self.last_vision_seconds = time.perf_counter() - started
        cache = self._generation_cache(mm, kwargs)  # holds this call's compression state, if any
        if cache is not None:
            pop_cache_argument(kwargs)
            kwargs[CACHE_ARG] = cache
        if self.keep_video_positions():
            # Each prompt token at its uncompressed position; generate continues each row from its last one + 1.
            kwargs["position_ids"] = mm.position_ids
        output = super().generate(inputs_embeds=mm.inputs_embeds, attention_mask=mm.attention_mask.long(), **kwargs)
        self._generation_done(cache)
        return output



AutoConfig.register("llava_qwen", LlavaQwenConfig)
AutoModelForCausalLM.register(LlavaQwenConfig, LlavaQwenForCausalLM)
