"""A toy video-QA world: synthetic clips of coloured shapes with exact questions and answers
(:mod:`llava.toy.videoqa`), the way a LLaVA model is asked them (:mod:`llava.toy.qa`), and a small LLaVA-OneVision
checkpoint trained on them from scratch (``TOY_CHECKPOINT``, made by ``scripts/train_toy.py``), the built-in model
of ``llava-video``.

``TOY_CHECKPOINT`` is a folder in the lmms-lab on-disk format, loaded like any checkpoint (``load_toy_model`` is
``load_pretrained_model`` with the toy model's settings: CPU, float32, sdpa).
"""

from __future__ import annotations

from pathlib import Path

from llava.toy.videoqa import FAMILIES, Sample, make_dataset, make_sample, write_mp4

TOY_CHECKPOINT = Path(__file__).resolve().parent / "checkpoint"
TOY_EVAL_FILE = "toy_eval.json"  # in TOY_CHECKPOINT: the held-out accuracy measured after training

DEMO_KEY = (7, 4, 0)  # the llava-video demo clip: an "order" clip whose three shapes appear one after another


def load_toy_model(folder: str | Path = TOY_CHECKPOINT):
    """``(tokenizer, model, image_processor)`` of a toy checkpoint folder (default: the shipped one), on the CPU in
    float32 with sdpa attention, in eval mode."""
    from llava.model.builder import load_pretrained_model

    tokenizer, model, image_processor, _ = load_pretrained_model(
        str(folder), None, "llava_qwen", device_map="cpu", torch_dtype="float32", attn_implementation="sdpa")
    return tokenizer, model.eval(), image_processor


def demo_sample() -> Sample:
    """The clip ``llava-video`` generates when no video is given: three shapes appearing one after another, asked
    "List the colours in order of appearance." (each answer word depends on other frames)."""
    return make_sample("order", DEMO_KEY, clip_frames=32, size=128)


__all__ = ["DEMO_KEY", "FAMILIES", "TOY_CHECKPOINT", "TOY_EVAL_FILE", "Sample", "demo_sample", "load_toy_model",
           "make_dataset", "make_sample", "write_mp4"]
