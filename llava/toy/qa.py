"""Asking a LLaVA model the synthetic clips' questions, as ``llava-video`` and lmms-eval's ``llava_onevision`` ask:
the ``qwen_1_5`` conversation with the ``<image>`` placeholder, tokenized by ``tokenizer_image_token``, frames sampled
uniformly and preprocessed by the checkpoint's image processor, greedy ``model.generate``.

Used by ``scripts/train_toy.py`` (training examples, held-out accuracy), the tests and ``llava-video``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch

from llava.constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.toy.videoqa import Sample

TEMPLATE = "qwen_1_5"
MAX_NEW_TOKENS = 12  # the longest answer ("magenta, yellow, white.") is 7 tokens with the toy tokenizer


def prompt_ids(tokenizer, question: str) -> list[int]:
    """The prompt's token ids up to the assistant's turn, ``IMAGE_TOKEN_INDEX`` where the video goes."""
    from llava.conversation import conv_templates
    from llava.mm_utils import tokenizer_image_token

    conv = conv_templates[TEMPLATE].copy()
    conv.append_message(conv.roles[0], f"{DEFAULT_IMAGE_TOKEN}\n{question}")
    conv.append_message(conv.roles[1], None)
    return tokenizer_image_token(conv.get_prompt(), tokenizer, IMAGE_TOKEN_INDEX)


def training_example(tokenizer, question: str, answer: str) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)``: the prompt, then the answer and the end-of-turn token; only those are labelled."""
    prompt = prompt_ids(tokenizer, question)
    target = tokenizer(answer).input_ids + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    return prompt + target, [IGNORE_INDEX] * len(prompt) + target


def video_pixels(image_processor, sample: Sample, num_frames: int | None = None) -> torch.Tensor:
    """The model's input for ``sample``: ``num_frames`` frames (default: the sample's ``sampled_frames``) sampled
    uniformly, preprocessed, (F, 3, S, S)."""
    return image_processor.preprocess(sample.sampled(num_frames), return_tensors="pt")["pixel_values"]


def is_correct(answer: str, expected: str) -> bool:
    return answer.strip() == expected


def batch_prompts(tokenizer, questions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of the questions' prompts, right-padded (the model re-pads on the left)."""
    prompts = [prompt_ids(tokenizer, question) for question in questions]
    longest = max(map(len, prompts))
    ids = torch.full((len(prompts), longest), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = torch.tensor(prompt)
        mask[row, : len(prompt)] = 1
    return ids, mask


@torch.no_grad()
def answer_batch(
    model, tokenizer, questions: Sequence[str], videos: Sequence[torch.Tensor], *,
    max_new_tokens: int = MAX_NEW_TOKENS, **generate_kwargs,
) -> tuple[list[str], list[int]]:
    """One greedy ``generate`` call for the questions and their videos (preprocessed, (F, 3, S, S) each): the
    answers (decoded, stripped) and each answer's length in generated tokens (up to and with the end-of-turn
    token). ``generate_kwargs`` go to ``model.generate``."""
    ids, mask = batch_prompts(tokenizer, questions)
    output = model.generate(
        ids.to(model.device), attention_mask=mask.to(model.device),
        images=[video.to(model.device, model.dtype) for video in videos], modalities=["video"] * len(videos),
        do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **generate_kwargs,
    )
    ends = {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id, tokenizer.pad_token_id}
    lengths = [next((i + 1 for i, token in enumerate(row) if token in ends), len(row)) for row in output.tolist()]
    answers = [text.strip() for text in tokenizer.batch_decode(output, skip_special_tokens=True)]
    return answers, lengths


def answer_samples(
    model, tokenizer, image_processor, samples: Sequence[Sample], *, num_frames: int | None = None,
    batch_size: int = 16, **generate_kwargs,
) -> list[str]:
    """The model's answer to each sample's question (greedy), from the sample's own frames; ``batch_size`` prompts
    per ``generate`` call. ``generate_kwargs`` go to :func:`answer_batch`."""
    answers = []
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        videos = [video_pixels(image_processor, sample, num_frames) for sample in batch]
        answers += answer_batch(model, tokenizer, [sample.question for sample in batch], videos, **generate_kwargs)[0]
    return answers


def accuracy_by_family(families: Sequence[str], expected: Sequence[str], answers: Sequence[str]) -> dict[str, float]:
    """Exact-match accuracy (answer stripped) of each family present, in order of first appearance; ``families``,
    ``expected`` and ``answers`` hold one entry per question."""
    right, total = defaultdict(int), defaultdict(int)
    for family, target, answer in zip(families, expected, answers, strict=True):
        total[family] += 1
        right[family] += is_correct(answer, target)
    return {family: right[family] / total[family] for family in total}
