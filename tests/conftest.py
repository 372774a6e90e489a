"""Shared fixtures: small random checkpoints in the real on-disk format, written once per test session."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from llava.checkpoint_maker import make_tiny_checkpoint

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str):
    """A script of scripts/ (``name`` without .py) imported as a module, to test its functions."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script is executed
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", autouse=True)
def fresh_compile_caches():
    """Each test module compiles from scratch: torch.compile's per-code-object cache (8 entries) is shared by every
    model in the process, so modules that compile several models would otherwise fail by the order they run in."""
    torch._dynamo.reset()
    yield


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """LLaVA-OV layout (one_token newline, bilinear pooling, tied embeddings), sharded safetensors."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "llava-ov-tiny", "tiny", seed=0, max_shard_bytes=200_000)


@pytest.fixture(scope="session")
def tiny_video_checkpoint(tmp_path_factory):
    """LLaVA-Video layout (grid newlines, average pooling)."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "llava-video-tiny", "llava-video-tiny", seed=1)


@pytest.fixture(scope="session")
def loaded_tiny(tiny_checkpoint):
    from llava.model.builder import load_pretrained_model

    return load_pretrained_model(
        str(tiny_checkpoint), None, "llava_qwen", device_map="cpu", torch_dtype="float32", attn_implementation="sdpa"
    )


@pytest.fixture
def model_and_tokenizer(loaded_tiny):
    """The session's tiny LLaVA model without compression, reset again after the test."""
    tokenizer, model, _, _ = loaded_tiny
    model.reset_compression()
    yield model, tokenizer
    model.reset_compression()


def random_video(frames: int, size: int, seed: int = 0) -> torch.Tensor:
    """Preprocessed-looking pixel values (frames, 3, size, size) in [-1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(frames, 3, size, size, generator=generator) * 2 - 1
