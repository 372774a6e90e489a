"""The toy model's shape: a small LLaVA-OneVision in the lmms-lab on-disk format, written by the project's own
checkpoint maker (random weights) before ``scripts/train_toy.py`` trains it.

A SigLIP-style tower on 64 px frames with 8 px patches (8x8 patches, width 64, 3 layers once the last is cut, as
lmms-lab cuts it), the mlp2x_gelu projector, bilinear 2x2 pooling to 4x4 = 16 tokens per frame, one newline token
after the video, and a 4-layer Qwen2 LM (hidden 128, 4 heads, 2 key/value heads). Initialised with std 0.05 (0.02,
the usual value, left the tower's features too uniform to train in the CPU budget). The tokenizer is the maker's byte-level BPE
with every word of the questions, the answers and the prompt's roles kept whole, so that each answer word is one
token.
"""

from __future__ import annotations

from pathlib import Path

from llava.checkpoint_maker import TinySpec, make_tiny_checkpoint
from llava.toy.videoqa import vocabulary

TOY_SPEC = TinySpec(
    hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    vision_hidden_size=64, vision_intermediate_size=256, vision_num_attention_heads=4, vision_published_layers=4,
    image_size=64, patch_size=8, initializer_range=0.05,
)
PROMPT_WORDS = ("system", "user", "assistant", "You")  # the qwen_1_5 conversation's roles


def toy_tokenizer_words() -> list[str]:
    """The words the toy tokenizer keeps whole: the task's vocabulary, then the prompt's roles."""
    return [*vocabulary(), *PROMPT_WORDS]


def make_untrained_checkpoint(folder: str | Path, seed: int = 0) -> Path:
    """The toy model with its initial random weights (what training starts from)."""
    return make_tiny_checkpoint(folder, TOY_SPEC, seed=seed, tokenizer_words=toy_tokenizer_words())
