"""DyCoke inside the LLaVA model: arguments, TTM token counts, equivalences with the baseline, state, batches."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.test_ttm import EXPECTED_PRUNED
from llava.model.builder import load_pretrained_model
from tests.conftest import random_video
from tests.test_conformance import prompt_ids

GENERATE = dict(max_new_tokens=8, do_sample=False, eos_token_id=None)


def pooled_tokens_per_frame(model) -> int:
    return math.ceil(model.get_vision_tower().num_patches_per_side / 2) ** 2


def run(model, tokenizer, video, question="What is moving?", **kwargs):
    ids = prompt_ids(tokenizer, question)
    return model.generate(ids, images=[video], modalities=["video"], **{**GENERATE, **kwargs})


@pytest.mark.parametrize("frames", [1, 2, 3, 5, 7])
def test_ttm_token_count_follows_the_pairing_rule(model_and_tokenizer, frames):
    model, tokenizer = model_and_tokenizer
    model.configure_compression(dycoke=True, dycoke_k=0.7, dycoke_p=0.0)
    run(model, tokenizer, random_video(frames, model.get_vision_tower().image_size, seed=frames), max_new_tokens=1)
    per_frame = pooled_tokens_per_frame(model)
    kept = int((1 - 0.7) * per_frame)
    pruned = len(EXPECTED_PRUNED[frames])  # written from the pairing rule in tests/test_ttm.py
    stats = model.last_compression_stats
    assert stats["video_tokens_before"] == frames * per_frame
    assert stats["video_tokens_after"] == frames * per_frame - pruned * (per_frame - kept)
    assert stats["compressor"] == "dycoke"


def test_k0_p0_is_the_baseline_token_for_token(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    video = random_video(8, model.get_vision_tower().image_size, seed=11)
    baseline = run(model, tokenizer, video, max_new_tokens=12)
    model.configure_compression(dycoke=True, dycoke_k=0.0, dycoke_p=0.0)
    assert torch.equal(run(model, tokenizer, video, max_new_tokens=12), baseline)
    assert "kv_pruning" not in model.last_compression_stats


def test_kv_pruning_leaves_the_prefill_exact_and_changes_decoding(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    video = random_video(8, model.get_vision_tower().image_size, seed=12)
    ids = prompt_ids(tokenizer, "What is moving?")

    def logits():
        output = model.generate(ids, images=[video], modalities=["video"], output_logits=True,
                                return_dict_in_generate=True, **GENERATE)
        return torch.stack(output.logits, 1)

    baseline = logits()
    model.configure_compression(dycoke=True, dycoke_k=0.0, dycoke_l=2, dycoke_p=0.7)  # no merging: pruning only
    pruned = logits()
    assert torch.equal(pruned[:, 0], baseline[:, 0])  # the first token comes from the exact prefill
    assert (pruned[:, 1:] - baseline[:, 1:]).abs().amax(dim=-1).min() > 1e-4  # every decoding step is pruned
    kv = model.last_compression_stats["kv_pruning"]
    images = 8 * pooled_tokens_per_frame(model)
    assert kv["image_tokens"] == [images]
    assert kv["decode_steps"] == GENERATE["max_new_tokens"] - 1
    assert kv["active_image_tokens"] == [int(images * (1 - 0.7))]


def test_no_state_leaks_between_generate_calls(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    size = model.get_vision_tower().image_size
    model.configure_compression(dycoke=True, dycoke_l=2)
    video, other = random_video(8, size, seed=13), random_video(6, size, seed=14)
    first = run(model, tokenizer, video)
    first_stats = model.last_compression_stats
    run(model, tokenizer, other, question="Something else entirely?")
    assert torch.equal(run(model, tokenizer, video), first)
    # json: the first step's similarity is NaN (no previous step), and NaN != NaN under ==
    assert json.dumps(model.last_compression_stats, sort_keys=True) == json.dumps(first_stats, sort_keys=True)


def test_batch_of_two_equals_two_single_runs(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    size = model.get_vision_tower().image_size
    model.configure_compression(dycoke=True, dycoke_l=2)
    videos = [random_video(8, size, seed=15), random_video(5, size, seed=16)]
    prompts = [prompt_ids(tokenizer, "What is moving?")[0], prompt_ids(tokenizer, "Describe every frame of it.")[0]]
    singles = [model.generate(p[None], images=[v], modalities=["video"], **GENERATE)[0] for p, v in zip(prompts, videos)]
    width = max(len(p) for p in prompts)
    batch = torch.full((2, width), tokenizer.pad_token_id)
    mask = torch.zeros((2, width), dtype=torch.long)
    for row, p in enumerate(prompts):
        batch[row, width - len(p):] = p
        mask[row, width - len(p):] = 1
    together = model.generate(batch, attention_mask=mask, images=videos, modalities=["video"], **GENERATE)
    assert torch.equal(together[0], singles[0])
    assert torch.equal(together[1], singles[1])


def test_settings_are_attributes_validated_on_set(model_and_tokenizer):
    model, _ = model_and_tokenizer
    model.dycoke = True
    model.dycoke_p = 0.5
    assert (model.dycoke, model.compressor, model.dycoke_p) == (True, "dycoke", 0.5)
    for name, value, allowed in [("dycoke_k", 1.0, r"\[0, 1\)"), ("dycoke_p", -0.1, r"\[0, 1\)"),
                                 ("dycoke_l", 0, r"\[1, 3\]"), ("dycoke_l", 4, r"\[1, 3\]"), ("compressor", "zip", "dycoke")]:
        with pytest.raises(ValueError, match=f"{name}.*{allowed}"):
            setattr(model, name, value)
    assert model.dycoke_p == 0.5  # a rejected value leaves the settings as they were
    model.dycoke = False
    assert model.compressor == "none"


def test_compatibility_arguments_are_checked_against_the_input(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    model.configure_compression(dycoke=True, dycoke_num_tokens_per_frame=196, image_token_start_index=3)
    video = random_video(4, model.get_vision_tower().image_size, seed=17)
    with pytest.warns(UserWarning) as caught:
        run(model, tokenizer, video, max_new_tokens=2)
    messages = " ".join(str(w.message) for w in caught)
    assert f"has {pooled_tokens_per_frame(model)} tokens per frame" in messages
    ids = prompt_ids(tokenizer, "What is moving?")[0]
    assert f"start at {int((ids == -200).nonzero())}" in messages


def test_images_are_never_merged(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    size = model.get_vision_tower().image_size
    image = random_video(1, size, seed=18)
    ids = prompt_ids(tokenizer, "What is this?")
    baseline = model.build_multimodal_inputs(ids, None, None, [image], ["image"], [(size, size)]).inputs_embeds
    model.configure_compression(dycoke=True)
    merged = model.build_multimodal_inputs(ids, None, None, [image], ["image"], [(size, size)]).inputs_embeds
    assert torch.equal(baseline, merged)
    assert model.last_compression_stats["videos"] == 0


def test_llava_video_grid_layout_keeps_row_newlines(tiny_video_checkpoint):
    tokenizer, model, _, _ = load_pretrained_model(
        str(tiny_video_checkpoint), None, "llava_qwen", device_map="cpu", torch_dtype="float32",
        attn_implementation="sdpa", dycoke=True, dycoke_p=0.0,
    )
    side = model.get_vision_tower().num_patches_per_side // 2  # average pooling floors
    frames = 4
    video = random_video(frames, model.get_vision_tower().image_size, seed=19)
    tokens, mask, record = model.encode_visual_items([video], ["video"], None)[0]
    kept = record.tokens_after
    assert int(mask.sum()) == kept < frames * side * side
    assert tokens.shape[0] == kept + frames * side  # every frame keeps its h row newlines
    newline = model.get_model().image_newline
    assert torch.equal(tokens[~mask], newline.expand(frames * side, -1))


def test_sdpa_and_eager_prune_alike(tiny_checkpoint):
    """The two mask formats' backends make the same pruning decisions and give the same tokens."""
    outputs, decisions = [], []
    for attn in ("sdpa", "eager"):
        tokenizer, model, _, _ = load_pretrained_model(
            str(tiny_checkpoint), None, "llava_qwen", device_map="cpu", torch_dtype="float32",
            attn_implementation=attn, dycoke=True, dycoke_l=2,
        )
        outputs.append(run(model, tokenizer, random_video(8, model.get_vision_tower().image_size, seed=20)))
        kv = model.last_compression_stats["kv_pruning"]
        decisions.append((kv["recompute_steps"], kv["entered"]))
    assert torch.equal(outputs[0], outputs[1])
    assert decisions[0] == decisions[1]
    assert decisions[0][0][0] and sum(decisions[0][1][0]) > 0  # pruning ran: a set was chosen and filled
