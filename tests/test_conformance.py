"""The project's proof that real checkpoints behave: same random weights, same logits as transformers'
own ``LlavaOnevisionForConditionalGeneration`` (the weights are converted to its format here)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

from llava.constants import IMAGE_TOKEN_INDEX
from tests.conftest import random_video
from tests.references import transformers_onevision

# float32 on CPU: both models run the same operations in the same order and agree bit for bit (measured: max
# abs difference 0.0 on every position, 1 and 2 threads, transformers 5.4 and 5.23). The tolerance leaves room
# for a different summation order (other kernels or thread counts): a few float32 ulps of logits of size ~7.
LOGIT_TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}


@pytest.fixture(scope="module")
def oracle(tiny_checkpoint, loaded_tiny):
    """transformers' LLaVA-OneVision with our tiny checkpoint's weights; placeholder id = an unused vocab id."""
    return transformers_onevision(tiny_checkpoint, loaded_tiny[1])


def assert_same_logits(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Every position's logits agree within LOGIT_TOLERANCE (a failure names the position)."""
    assert ours.shape == theirs.shape, f"logits of shape {tuple(ours.shape)} vs {tuple(theirs.shape)}"
    for position in range(theirs.shape[1]):
        torch.testing.assert_close(
            ours[:, position], theirs[:, position], **LOGIT_TOLERANCE, msg=lambda m, at=position: f"position {at}: {m}"
        )


def prompt_ids(tokenizer, question: str, with_image: bool = True) -> torch.Tensor:
    from llava.conversation import conv_templates
    from llava.mm_utils import tokenizer_image_token

    conv = conv_templates["qwen_1_5"].copy()
    conv.append_message(conv.roles[0], ("<image>\n" if with_image else "") + question)
    conv.append_message(conv.roles[1], None)
    return tokenizer_image_token(conv.get_prompt(), tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")[None]


def expand_placeholder(ids: torch.Tensor, count: int, placeholder: int) -> torch.Tensor:
    """transformers' format: one placeholder token per visual token."""
    at = int((ids[0] == IMAGE_TOKEN_INDEX).nonzero())
    return torch.cat([ids[:, :at], torch.full((1, count), placeholder), ids[:, at + 1:]], dim=1)


def our_logits(model, ids, images, modalities, image_sizes=None):
    with torch.no_grad():
        return model(input_ids=ids, images=images, modalities=modalities, image_sizes=image_sizes).logits


def test_video_logits_match_transformers(loaded_tiny, oracle):
    tokenizer, model, _, _ = loaded_tiny
    reference, placeholder = oracle
    size = model.get_vision_tower().image_size
    video = random_video(8, size, seed=1)
    ids = prompt_ids(tokenizer, "What happens in the video?")
    ours = our_logits(model, ids, [video], ["video"])

    pooled_side = math.ceil(model.get_vision_tower().num_patches_per_side / 2)
    count = 8 * pooled_side**2 + 1  # frames x pooled tokens + one newline (one_token)
    assert ours.shape[1] == ids.shape[1] - 1 + count
    with torch.no_grad():
        theirs = reference(input_ids=expand_placeholder(ids, count, placeholder), pixel_values_videos=video[None]).logits
    assert_same_logits(ours, theirs)


def test_anyres_image_logits_match_transformers(loaded_tiny, oracle):
    tokenizer, model, _, _ = loaded_tiny
    reference, placeholder = oracle
    size = model.get_vision_tower().image_size
    width, height = 3 * size - 20, size + 30  # wide, non-square: exercises tiling, unpadding and row newlines
    tiles = image_size_to_num_patches((height, width), reference.config.image_grid_pinpoints, size)
    assert tiles > 2
    pixels = random_video(tiles, size, seed=2)
    ids = prompt_ids(tokenizer, "Describe the image.")
    ours = our_logits(model, ids, [pixels], ["image"], image_sizes=[(width, height)])
    count = ours.shape[1] - (ids.shape[1] - 1)
    with torch.no_grad():
        theirs = reference(
            input_ids=expand_placeholder(ids, count, placeholder),
            pixel_values=pixels[None],
            image_sizes=torch.tensor([[height, width]]),
        ).logits
    assert_same_logits(ours, theirs)


def test_text_only_logits_match_transformers(loaded_tiny, oracle):
    tokenizer, model, _, _ = loaded_tiny
    reference, _ = oracle
    ids = prompt_ids(tokenizer, "Hello, who are you?", with_image=False)
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        theirs = reference(input_ids=ids).logits
    assert_same_logits(ours, theirs)


def test_greedy_generate_matches_transformers(loaded_tiny, oracle):
    tokenizer, model, _, _ = loaded_tiny
    reference, placeholder = oracle
    size = model.get_vision_tower().image_size
    video = random_video(8, size, seed=3)
    ids = prompt_ids(tokenizer, "What is the color of the moving square?")
    ours = model.generate(ids, images=[video], modalities=["video"], max_new_tokens=10, do_sample=False, eos_token_id=None)
    count = 8 * math.ceil(model.get_vision_tower().num_patches_per_side / 2) ** 2 + 1
    expanded = expand_placeholder(ids, count, placeholder)
    theirs = reference.generate(
        input_ids=expanded, pixel_values_videos=video[None], max_new_tokens=10, do_sample=False, eos_token_id=None
    )[:, expanded.shape[1]:]
    assert ours.shape == (1, 10)
    assert torch.equal(ours, theirs)
