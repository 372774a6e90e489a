"""Write small random-weight checkpoints in exactly the lmms-lab LLaVA-OneVision / LLaVA-Video format.

The layout is the real one: a flat Qwen2 ``config.json`` with the ``mm_*`` fields, ``model_type: llava``,
``architectures: [LlavaQwenForCausalLM]``; safetensors (optionally sharded, with the index file) under
the original weight names; tied embeddings without ``lm_head.weight``; tokenizer files with Qwen's
chat special tokens; and a local SigLIP folder (published, un-cut config) named by ``mm_vision_tower``.
Tests, the demo and the benchmark build their models with it: no network is ever needed.

From a shell: ``llava-make-checkpoint OUT [--preset tiny|small|llava-video-tiny] [--seed N] [--force]``
(see :func:`main`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Frequent English pieces merged by the tiny byte-level BPE, so prompts do not tokenize byte by byte.
_TINY_MERGE_WORDS = (
    " the", " a", " is", " in", " of", " video", " what", " happen", " describe", " you", " are", " user",
    " assistant", " system", " helpful", " question", " answer", " frame", " image", " color", " move",
)


@dataclass(frozen=True)
class TinySpec:
    """Sizes of a small checkpoint. Field names follow the real configs."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vision_hidden_size: int = 32
    vision_intermediate_size: int = 64
    vision_num_attention_heads: int = 2
    vision_published_layers: int = 3  # the stored tower has one layer less
    image_size: int = 98  # 7x7 patches of 14 -> 4x4 = 16 pooled tokens per frame (ceil, as 27 -> 14)
    patch_size: int = 14
    mm_newline_position: str | None = None  # None = absent from config.json, i.e. "one_token" (LLaVA-OV)
    mm_spatial_pool_mode: str = "bilinear"  # "average" for LLaVA-Video
    tie_word_embeddings: bool = True
    max_grid: int = 3  # anyres pinpoints up to max_grid x max_grid tiles
    image_aspect_ratio: str = "anyres_max_9"
    # Larger than the real 0.02 so that random-weight greedy decoding does not collapse onto one token.
    initializer_range: float = 0.2


PRESETS = {
    "tiny": TinySpec(),
    # Large enough for compression to show in timings on a CPU, small enough to build in seconds.
    "small": TinySpec(
        hidden_size=256, intermediate_size=768, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
        vision_hidden_size=64, vision_intermediate_size=128, vision_num_attention_heads=4, vision_published_layers=4,
        image_size=196,
    ),
    "llava-video-tiny": TinySpec(mm_newline_position="grid", mm_spatial_pool_mode="average"),
}


def build_tiny_tokenizer(extra_words: Sequence[str] = ()):
    """A byte-level BPE tokenizer with Qwen's special tokens (``<|im_start|>``, ``<|im_end|>``, ...).

    Each of ``extra_words`` (after the built-in English pieces, in the given order) becomes one token: merges are
    added so that the word, as BPE pre-tokenizes it (with or without its leading space), is merged whole.
    """
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    to_unicode = bytes_to_unicode()
    vocab = {char: index for index, char in enumerate(to_unicode.values())}
    merges: list[tuple[str, str]] = []
    extra = [word for word in dict.fromkeys(extra_words) if word not in _TINY_MERGE_WORDS]  # in order, no repeats
    for word in (*dict.fromkeys(_TINY_MERGE_WORDS), *extra):
        pieces = ["".join(to_unicode[b] for b in ch.encode()) for ch in word]
        if word in extra:  # first what the merges so far make of it, so that the new ones continue from there
            pieces = _apply_merges(pieces, merges)
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            if merged not in vocab:
                merges.append((pieces[0], pieces[1]))
                vocab[merged] = len(vocab)
            pieces = [merged] + pieces[2:]
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS], special_tokens=True)
    tokenizer.eos_token, tokenizer.pad_token = "<|im_end|>", "<|endoftext|>"
    tokenizer.model_max_length = 32768
    return tokenizer


def _apply_merges(pieces: list[str], merges: list[tuple[str, str]]) -> list[str]:
    """Byte-pair encoding of ``pieces`` with ``merges``: the earliest merge present is applied first, repeatedly."""
    ranks = {pair: rank for rank, pair in enumerate(merges)}
    while len(pieces) > 1:
        rank, index = min((ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(pieces, pieces[1:])))
        if rank == len(ranks):
            return pieces
        pieces = pieces[:index] + [pieces[index] + pieces[index + 1]] + pieces[index + 2 :]
    return pieces


def tiny_config(spec: TinySpec, vocab_size: int, special_ids: dict[str, int]) -> dict:
    """The flat config.json of a LLaVA-OV checkpoint, at the given sizes."""
    size = spec.image_size
    pinpoints = [[size * i, size * j] for i in range(1, spec.max_grid + 1) for j in range(1, spec.max_grid + 1)]
    config = {
        "architectures": ["LlavaQwenForCausalLM"],
        "model_type": "llava",
        "attention_dropout": 0.0,
        "bos_token_id": special_ids["<|endoftext|>"],
        "eos_token_id": special_ids["<|im_end|>"],
        "hidden_act": "silu",
        "initializer_range": spec.initializer_range,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "max_position_embeddings": 32768,
        "max_window_layers": spec.num_hidden_layers,
        "rms_norm_eps": 1e-6,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "sliding_window": 131072,
        "use_sliding_window": False,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "vocab_size": vocab_size,
        "use_cache": True,
        "torch_dtype": "float32",
        "image_aspect_ratio": spec.image_aspect_ratio,
        "image_grid_pinpoints": pinpoints,
        "image_crop_resolution": None,
        "image_split_resolution": None,
        "mm_hidden_size": spec.vision_hidden_size,
        "mm_patch_merge_type": "spatial_unpad",
        "mm_projector_type": "mlp2x_gelu",
        "mm_spatial_pool_mode": spec.mm_spatial_pool_mode,
        "mm_spatial_pool_stride": 2,
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": "vision_tower",
        "tokenizer_model_max_length": 32768,
        "tokenizer_padding_side": "right",
        "use_mm_proj": True,
    }
    if spec.mm_newline_position is not None:
        config["mm_newline_position"] = spec.mm_newline_position
    return config


def pooling_head_weights(spec: TinySpec, seed: int) -> dict[str, torch.Tensor]:
    """Random weights of SigLIP's attention-pooling head (``vision_model.head.*``), the part of the published tower
    that LLaVA checkpoints drop and FastVID reads from the tower's own folder (llava.model.pooling_head)."""
    from transformers import SiglipVisionConfig
    from transformers.models.siglip.modeling_siglip import (
        SiglipMultiheadAttentionPoolingHead,
    )

    with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
        torch.manual_seed(seed + 1)
        head = SiglipMultiheadAttentionPoolingHead(SiglipVisionConfig(**published_vision_config(spec)))
    return {f"vision_model.head.{name}": tensor.contiguous() for name, tensor in head.state_dict().items()}


def published_vision_config(spec: TinySpec) -> dict:
    return {
        "model_type": "siglip_vision_model",
        "hidden_size": spec.vision_hidden_size,
        "intermediate_size": spec.vision_intermediate_size,
        "num_attention_heads": spec.vision_num_attention_heads,
        "num_hidden_layers": spec.vision_published_layers,
        "image_size": spec.image_size,
        "patch_size": spec.patch_size,
        "num_channels": 3,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6,
        "attention_dropout": 0.0,
    }


def preprocessor_config(spec: TinySpec) -> dict:
    return {
        "image_processor_type": "SiglipImageProcessor",
        "do_resize": True,
        "size": {"height": spec.image_size, "width": spec.image_size},
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }


def random_state_dict(config: dict, seed: int) -> dict[str, torch.Tensor]:
    """Random weights under the checkpoint's names, with a scale that keeps activations O(1)."""
    from llava.model.language_model.llava_qwen import (
        LlavaQwenForCausalLM,
        config_from_dict,
    )

    torch.manual_seed(seed)
    llava_config = config_from_dict(config, None)

    model = LlavaQwenForCausalLM(llava_config)
    state = {name: tensor.detach().clone().contiguous() for name, tensor in model.state_dict().items()}
    if config["tie_word_embeddings"]:
        state.pop("lm_head.weight", None)
    return state


def save_sharded(state: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int | None) -> None:
    """``model.safetensors``, or shards plus ``model.safetensors.index.json`` as transformers writes them."""
    if not max_shard_bytes:
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    weight_map = {}
    for index, shard in enumerate(shards, start=1):
        filename = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / filename), metadata={"format": "pt"})
        weight_map.update({name: filename for name in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    with open(folder / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def make_tiny_checkpoint(
    path: str | os.PathLike,
    preset: str | TinySpec = "tiny",
    *,
    seed: int = 0,
    max_shard_bytes: int | None = None,
    tokenizer_words: Sequence[str] = (),
    **overrides,
) -> Path:
    """Write a random-weight LLaVA-OV checkpoint (real on-disk format) to ``path`` and return it.

    ``preset`` is a name from ``PRESETS`` or a ``TinySpec``; ``overrides`` replace spec fields.
    ``tokenizer_words``: words the tokenizer keeps whole (see :func:`build_tiny_tokenizer`).
    The same arguments always give the same weights.
    """
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"Unknown preset {preset!r}; allowed: {', '.join(PRESETS)}.")
        spec = PRESETS[preset]
    else:
        spec = preset
    unknown = set(overrides) - set(asdict(spec))
    if unknown:
        raise ValueError(f"Unknown TinySpec field(s) {sorted(unknown)}; allowed: {sorted(asdict(spec))}.")
    spec = replace(spec, **overrides)

    folder = Path(path)
    (folder / "vision_tower").mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(tokenizer_words)
    tokenizer.save_pretrained(folder)
    special_ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    vocab_size = (len(tokenizer) + 63) // 64 * 64  # padded, like Qwen's 151936 > len(tokenizer)
    config = tiny_config(spec, vocab_size, special_ids)

    with open(folder / "vision_tower" / "config.json", "w") as f:
        json.dump(published_vision_config(spec), f, indent=2)
    with open(folder / "vision_tower" / "preprocessor_config.json", "w") as f:
        json.dump(preprocessor_config(spec), f, indent=2)
    save_file(pooling_head_weights(spec, seed), str(folder / "vision_tower" / "model.safetensors"))
    with open(folder / "config.json", "w") as f:
        json.dump(config, f, indent=2)
    with open(folder / "generation_config.json", "w") as f:
        json.dump(
            {"bos_token_id": special_ids["<|endoftext|>"], "eos_token_id": special_ids["<|im_end|>"],
             "pad_token_id": special_ids["<|endoftext|>"]}, f, indent=2,
        )
    config_for_weights = dict(config, mm_vision_tower=str(folder / "vision_tower"))
    save_sharded(random_state_dict(config_for_weights, seed), folder, max_shard_bytes)
    return folder


def scale_attention_logits(model, scale: float) -> None:
    """Multiply the attention logits of ``model``'s language model by ``scale`` (its q and k projections, weights
    and biases, by ``sqrt(scale)`` each), in place.

    With random weights this sets DyCoke's decoding regime: flatter attention (``scale`` < 1) keeps the active set
    between steps (cos >= 0.9), as real models mostly do; peaked attention (``scale`` > 1) changes it at every step.
    """
    factor = scale**0.5
    with torch.no_grad():
        for layer in model.get_model().layers:
            for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                projection.weight.mul_(factor)
                if projection.bias is not None:
                    projection.bias.mul_(factor)


# ---- the llava-make-checkpoint command --------------------------------------------------------------------------

PRESET_HELP = {
    "tiny": "hidden 64, 4 layers, 16 tokens per frame: builds in a second; what the tests use",
    "small": "hidden 256, 8 layers, 49 tokens per frame (about 25 MB): the CPU benchmark's sizes",
    "llava-video-tiny": "the tiny sizes in the LLaVA-Video layout (newline per row, average pooling)",
}
WEIGHT_FILE_PATTERNS = ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json")


def _checkpoint_parser() -> argparse.ArgumentParser:
    presets = "\n".join(f"  {name:<17} {PRESET_HELP.get(name, '')}" for name in PRESETS)
    parser = argparse.ArgumentParser(
        prog="llava-make-checkpoint",
        description="Write a small random-weight LLaVA-OneVision checkpoint in the real lmms-lab on-disk format,\n"
        "offline. Its answers are noise, but it runs everything a real checkpoint runs: loading,\n"
        "compression, llava-video, the README's Python example, lmms-eval.",
        epilog=f"presets:\n{presets}\n\nexamples:\n"
        "  llava-make-checkpoint ./llava-tiny --preset tiny\n"
        "  llava-video --model ./llava-tiny --compare",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("out", metavar="OUT", help="folder to write (must not exist or be empty, unless --force)")
    parser.add_argument("--preset", default="small", choices=list(PRESETS), metavar="PRESET",
                        help=f"model sizes: {', '.join(PRESETS)} (default: %(default)s; see below)")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed of the weights; the same seed gives the same weights (default: %(default)s)")
    parser.add_argument("--force", action="store_true",
                        help="write into a non-empty OUT, replacing the checkpoint files there")
    return parser


def main(argv=None) -> int:
    """``llava-make-checkpoint OUT [--preset ...] [--seed N] [--force]``: write a checkpoint to OUT."""
    parser = _checkpoint_parser()
    args = parser.parse_args(argv)
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        parser.error(f"OUT {str(out)!r} is a file, not a folder.")
    if out.is_dir() and any(out.iterdir()):
        if not args.force:
            parser.error(f"OUT {str(out)!r} exists and is not empty; choose another folder, or pass --force "
                         "to write the checkpoint into it (its checkpoint files are replaced).")
        # Old weight files must not mix with the new ones (e.g. old shards next to a new single file).
        for pattern in WEIGHT_FILE_PATTERNS:
            for stale in out.glob(pattern):
                stale.unlink()
    print(f"Writing the {args.preset!r} checkpoint (seed {args.seed}) to {out} ...", file=sys.stderr, flush=True)
    make_tiny_checkpoint(out, args.preset, seed=args.seed)
    size_mb = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6
    print(f"Wrote {out} ({size_mb:.1f} MB, random weights: answers are noise).")
    print(f"Use it: llava-video --model {out}  (or pass the folder to load_pretrained_model)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
