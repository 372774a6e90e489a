"""VidCom2 and FastV inside the LLaVA model, and switching between compressors on one loaded model."""

from __future__ import annotations

import pytest
import torch

from llava.compression.dycoke_kv import DyCokeKV
from llava.compression.fastv import FastV
from llava.compression.ttm import TemporalTokenMerging
from llava.compression.vidcom2 import VidCom2
from llava.model.language_model.llava_qwen import LlavaQwenDecoderLayer
from tests.conftest import random_video
from tests.test_conformance import prompt_ids

GENERATE = dict(max_new_tokens=6, do_sample=False, eos_token_id=None)


def run(model, tokenizer, video):
    return model.generate(prompt_ids(tokenizer, "What is moving?"), images=[video], modalities=["video"], **GENERATE)


def test_vidcom2_keeps_its_budget_in_the_model(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    video = random_video(8, model.get_vision_tower().image_size, seed=30)
    model.configure_compression(compressor="vidcom2", vidcom2_r=0.4)  # not the default (0.25): it must reach VidCom2
    run(model, tokenizer, video)
    stats = model.last_compression_stats
    # The same selection computed directly on the pooled features the model sees.
    pooled = model.get_2dPool(model.encode_images(video))
    assert stats["video_tokens_after"] == VidCom2(0.4).select(pooled).num_kept != VidCom2(0.25).select(pooled).num_kept
    assert stats["video_tokens_after"] < stats["video_tokens_before"] == pooled.shape[0] * pooled.shape[1]


def first_logits(model, tokenizer, video, steps=3):
    output = model.generate(prompt_ids(tokenizer, "What is moving?"), images=[video], modalities=["video"],
                            output_logits=True, return_dict_in_generate=True, **{**GENERATE, "max_new_tokens": steps})
    return torch.stack(output.logits, 1)


def test_fastv_prunes_in_prefill_and_reports_it(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    video = random_video(8, model.get_vision_tower().image_size, seed=31)
    baseline = first_logits(model, tokenizer, video)
    model.configure_compression(compressor="fastv", fastv_k=1, fastv_r=0.5)  # K=1, not the default
    pruned = first_logits(model, tokenizer, video)
    fastv = model.last_compression_stats["fastv"]
    images = model.last_compression_stats["video_tokens_before"]
    assert fastv["layer"] == 1 and fastv["image_tokens"] == [images]
    assert fastv["kept_image_tokens"] == [round(images * (1 - 0.5))]  # FastV's public code rounds
    assert fastv["compact_tokens"] == fastv["prefill_tokens"] - (images - fastv["kept_image_tokens"][0])
    # The prefill itself is pruned: already the first token's logits differ from the baseline's.
    assert (pruned[:, 0] - baseline[:, 0]).abs().max() > 1e-3


def test_fastv_ratio_zero_is_the_baseline(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    video = random_video(6, model.get_vision_tower().image_size, seed=32)
    baseline = first_logits(model, tokenizer, video)
    model.configure_compression(compressor="fastv", fastv_r=0.0)
    assert model.decode_compressor is None
    assert torch.equal(first_logits(model, tokenizer, video), baseline)


def test_switching_compressors_keeps_the_layers_and_changes_the_methods(model_and_tokenizer):
    model, _ = model_and_tokenizer
    layers = list(model.get_model().layers)
    expected = {"fastv": (FastV, None), "dycoke": (DyCokeKV, TemporalTokenMerging), "vidcom2": (None, VidCom2),
                "none": (None, None)}
    for compressor, (decoder, video) in expected.items():
        model.configure_compression(compressor=compressor)
        assert list(model.get_model().layers) == layers  # the same layer objects, never switched
        assert all(type(layer) is LlavaQwenDecoderLayer for layer in layers)
        assert type(model.decode_compressor) is (decoder or type(None)), compressor
        assert type(model.video_compressor()) is (video or type(None)), compressor


@pytest.mark.parametrize("name,value,allowed", [("fastv_k", 0, r"\[1, 3\]"), ("fastv_r", 1.0, r"\[0, 1\)"),
                                                ("vidcom2_r", 0.0, r"\(0, 1\]")])
def test_invalid_method_arguments(model_and_tokenizer, name, value, allowed):
    model, _ = model_and_tokenizer
    with pytest.raises(ValueError, match=f"{name}.*{allowed}"):
        model.configure_compression(**{name: value})
