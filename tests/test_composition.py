"""Any method that works before the LM, followed by DyCoke's KV pruning (``compressor="evs", dycoke_p=0.7``): the
decoding equals the masked rule (tests/references.py MaskedDyCoke) on an eager copy that runs the same pre-LLM
method without pruning, with the dynamic cache, the static cache and compiled decoding."""

from __future__ import annotations

import warnings

import pytest
import torch

from llava.compression.dycoke_kv import DyCokeKV
from llava.compression.settings import (
    composes_with_kv_pruning,
    compressors,
    settings_from_kwargs,
)
from tests.conftest import random_video
from tests.references import (
    MaskedDyCoke,
    cache_variants,
    greedy,
    load,
    prompt,
    scale_attention_logits,
    video_positions,
)

LAYER, RATIO, STEPS = 2, 0.7, 10
PRE_LLM = {
    "evs": {"evs_rate": 0.5},
    "vidcom2": {"vidcom2_r": 0.5},
    "visionzip": {"visionzip_dominant": 6, "visionzip_contextual": 4},
    "fastvid": {"fastvid_retention_ratio": 0.5, "fastvid_dyseg_c": 2, "fastvid_dtm_p": 2},
    "flashvid": {"flashvid_retention_ratio": 0.5, "flashvid_expansion": 1.0, "flashvid_min_segment_num": 2,
                 "flashvid_pruning_layer": 1, "flashvid_llm_retention_ratio": 1.0},  # its own in-LLM stage off
}
VARIANTS = cache_variants()
SEEDS = {"visionzip": 10, "flashvid": 10, "fastvid": 10}  # seeds whose boundary margins are clear (9 has a near-tie for these)


def test_every_pre_llm_method_composes_and_the_others_do_not():
    composable = [name for name in compressors() if composes_with_kv_pruning(name)]
    assert set(PRE_LLM) - {"flashvid"} <= set(composable)  # flashvid by default prunes inside the LLM itself
    flashvid = settings_from_kwargs({"compressor": "flashvid", "flashvid_llm_retention_ratio": 1.0})
    assert "flashvid" not in composable and composes_with_kv_pruning("flashvid", flashvid)
    assert not {"none", "dycoke", "fastv"} & set(composable)  # dycoke has it already; FastV decodes itself


def test_the_pruning_arguments_turn_composition_on_and_a_method_change_turns_it_off():
    settings = settings_from_kwargs({"compressor": "evs", "dycoke_p": 0.5})
    assert settings.kv_pruning and settings.dycoke_p == 0.5
    assert settings_from_kwargs({"evs_rate": 0.8}, settings).kv_pruning  # other arguments keep it
    assert not settings_from_kwargs({"compressor": "vidcom2"}, settings).kv_pruning
    assert settings_from_kwargs({"compressor": "vidcom2", "dycoke_l": 2}, settings).kv_pruning
    with pytest.warns(UserWarning, match="dycoke_p do nothing with compressor='fastv'"):
        assert not settings_from_kwargs({"compressor": "fastv", "dycoke_p": 0.5}).kv_pruning


@pytest.fixture(scope="module")
def models(tiny_checkpoint):
    made = {}

    def get(method: str):
        if method not in made:
            settings = {"compressor": method, **PRE_LLM[method]}
            tokenizer, model = load(tiny_checkpoint, **settings, dycoke_l=LAYER, dycoke_p=RATIO)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the reference runs the same method without pruning
                _, reference = load(tiny_checkpoint, "eager", **settings)
            for m in (model, reference):
                scale_attention_logits(m, 1.0)  # sharp attention: the active set changes from step to step
            made[method] = (tokenizer, model, reference)
        return made[method]

    return get


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("method", PRE_LLM)
def test_composed_decoding_equals_the_masked_reference(models, method, variant):
    tokenizer, model, reference = models(method)
    assert isinstance(model.decode_compressor, DyCokeKV) and reference.decode_compressor is None
    seed = SEEDS.get(method, 9)  # a video whose active-set boundary has clear margins
    ids, video = prompt(tokenizer), random_video(8, model.get_vision_tower().image_size, seed=seed)
    positions = video_positions(reference, ids, video)  # the tokens the pre-LLM method let through
    rule = MaskedDyCoke(reference, positions, LAYER, RATIO)
    try:
        ref_tokens, ref_logits = greedy(reference, tokenizer, ids, [video], STEPS)
    finally:
        rule.remove()
    assert min(rule.margins) > 1e-5  # no near-tie at the active set's boundary
    tokens, logits = greedy(model, tokenizer, ids, [video], STEPS, **VARIANTS[variant])
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)  # sdpa against eager, sharp attention
    stats = model.last_compression_stats
    assert stats["compressor"] == method and stats["video_tokens_after"] == len(positions)
    kv = stats["kv_pruning"]
    assert kv["image_tokens"] == [len(positions)] and kv["active_image_tokens"] == [int(len(positions) * (1 - RATIO))]
    assert kv["recompute_steps"][0] == [step for step, hit in enumerate(rule.recomputed) if hit]
    assert sum(rule.recomputed) > 1  # the set moved: the comparison covers recomputations, not one choice
