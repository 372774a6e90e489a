"""Tiny random configs of transformers' own video LLMs and hand-built video inputs (their processors need
torchvision, which this CPU machine cannot have): pixel values, video_grid_thw and the placeholder ids."""

from __future__ import annotations

import math

import torch
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

VOCAB = 256
IMAGE, VIDEO, VISION_START, VISION_END = 250, 251, 252, 253
PAD, EOS = 0, 255
PATCH, TEMPORAL_PATCH, MERGE = 4, 2, 2

_TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD)
_QWEN_VISION = dict(patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL_PATCH, in_channels=3)
_TOKENS = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START,
               vision_end_token_id=VISION_END)


def qwen2_vl(attn: str = "sdpa", seed: int = 0):
    config = Qwen2VLConfig(
        text_config={**_TEXT, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]}},
        vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, **_QWEN_VISION),
        **_TOKENS,
    )
    return _built(Qwen2VLForConditionalGeneration, config, attn, seed)


def qwen2_5_vl(attn: str = "sdpa", seed: int = 0):
    config = Qwen2_5_VLConfig(
        text_config={**_TEXT, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]}},
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           window_size=16, fullatt_block_indexes=[1], tokens_per_second=2, **_QWEN_VISION),
        **_TOKENS,
    )
    return _built(Qwen2_5_VLForConditionalGeneration, config, attn, seed)


def qwen3_vl(attn: str = "sdpa", seed: int = 0):
    rope = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 2, 2], "mrope_interleaved": True}
    config = Qwen3VLConfig(
        text_config={**_TEXT, "head_dim": 16, "rope_parameters": rope},
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           num_position_embeddings=16, deepstack_visual_indexes=[0], **_QWEN_VISION),
        **_TOKENS,
    )
    return _built(Qwen3VLForConditionalGeneration, config, attn, seed)


def llava_onevision(attn: str = "sdpa", seed: int = 0):
    config = LlavaOnevisionConfig(
        text_config={"model_type": "qwen2", **_TEXT},
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=8, vision_use_head=False),
        image_token_index=IMAGE, video_token_index=VIDEO, vision_feature_select_strategy="full", vision_feature_layer=-1,
    )
    return _built(LlavaOnevisionForConditionalGeneration, config, attn, seed)


MODELS = {"qwen2_vl": qwen2_vl, "qwen2_5_vl": qwen2_5_vl, "qwen3_vl": qwen3_vl, "llava_onevision": llava_onevision}


def _built(cls, config, attn: str, seed: int):
    config._attn_implementation = attn
    torch.manual_seed(seed)
    return cls(config).eval()


def video_inputs(name: str, model, questions=((5, 6, 7), ), frames: int = 8, side: int = 16, seed: int = 1) -> dict:
    """Generate inputs for a batch of prompts (one video each, its own random pixels), left-padded:
    text ids, the video's placeholders, then the question ids of each row."""
    generator = torch.Generator().manual_seed(seed)
    rows, pixels, grids, extra = [], [], [], {}
    for question in questions:
        if name == "llava_onevision":
            vision = model.config.vision_config
            per_frame = math.ceil(vision.image_size // vision.patch_size / 2) ** 2
            rows.append([3, 4] + [VIDEO] * (frames * per_frame + 1) + list(question))
            pixels.append(torch.rand(1, frames, 3, vision.image_size, vision.image_size, generator=generator) * 2 - 1)
            continue
        t, h, w = frames // TEMPORAL_PATCH, side // PATCH, side // PATCH
        per_frame = h * w // MERGE**2
        if name == "qwen3_vl":  # one span per temporal step, each after its timestamp text
            video = sum(([9 + step, VISION_START] + [VIDEO] * per_frame + [VISION_END] for step in range(t)), [])
        else:
            video = [VISION_START] + [VIDEO] * (t * per_frame) + [VISION_END]
        rows.append([3, 4] + video + list(question))
        pixels.append(torch.randn(t * h * w, 3 * TEMPORAL_PATCH * PATCH * PATCH, generator=generator))
        grids.append([t, h, w])
    width = max(len(row) for row in rows)
    ids = torch.tensor([[PAD] * (width - len(row)) + row for row in rows])
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    if name == "llava_onevision":
        return dict(input_ids=ids, attention_mask=mask, pixel_values_videos=torch.cat(pixels))
    extra = {"second_per_grid_ts": torch.ones(len(rows))} if name == "qwen2_5_vl" else {}
    return dict(input_ids=ids, attention_mask=mask, pixel_values_videos=torch.cat(pixels),
                video_grid_thw=torch.tensor(grids), mm_token_type_ids=(ids == VIDEO).long() * 2, **extra)


def greedy(model, inputs: dict, steps: int, **kwargs):
    """(new tokens, logits (B, steps, vocab)) of a greedy generate of exactly ``steps`` tokens."""
    output = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                            pad_token_id=PAD, output_logits=True, return_dict_in_generate=True, **kwargs)
    return output.sequences[:, inputs["input_ids"].shape[1]:], torch.stack(output.logits, dim=1)


def row(inputs: dict, index: int) -> dict:
    """Row ``index`` of a batch of video inputs, unpadded."""
    keep = inputs["attention_mask"][index].bool()
    single = {"input_ids": inputs["input_ids"][index][keep][None], "attention_mask": inputs["attention_mask"][index][keep][None]}
    if "video_grid_thw" in inputs:
        grids = inputs["video_grid_thw"]
        sizes = grids.prod(dim=-1).tolist()
        single["pixel_values_videos"] = inputs["pixel_values_videos"].split(sizes)[index]
        single["video_grid_thw"] = grids[index : index + 1]
        single["mm_token_type_ids"] = inputs["mm_token_type_ids"][index][keep][None]
        if "second_per_grid_ts" in inputs:
            single["second_per_grid_ts"] = inputs["second_per_grid_ts"][index : index + 1]
    else:
        single["pixel_values_videos"] = inputs["pixel_values_videos"][index : index + 1]
    return single
