"""Benchmark baseline, DyCoke, DyCoke's merging alone, VidCom2 and FastV on the same video, in one process,
with eager decoding and with compiled decoding, in the two regimes of DyCoke's active set.

    python scripts/benchmark.py --config cpu-small --threads 1            # CPU: every method, mode and regime (17 methods: about 30 min)
    python scripts/benchmark.py --config cpu-small --modes eager --regimes kept --runs 1   # a quick look
    python scripts/benchmark.py --config ov-7b                            # CUDA: real LLaVA-OV-7B sizes, random bf16 weights
    python scripts/benchmark.py --config ov-0.5b --methods baseline,dycoke,dycoke-ttm

What is compared, every combination measured in the same process:

- methods (``--methods``): ``baseline``, ``dycoke`` (TTM k=0.7 + KV pruning L=3, p=0.7), ``dycoke-ttm`` (DyCoke's
  merging alone, p=0: isolates what the KV pruning does to a decoding step), ``vidcom2`` (r=0.25), ``fastv``
  (K=2, R=0.5), and (METHODS below) ``keep_positions`` variants, EVS, VisionZip, FastVID, FlashVID, PruneVid,
  HoliTom, FrameFusion and pre-LLM methods followed by DyCoke's KV pruning (``-kv``). FastVID needs SigLIP's pooling
  head from the tower's checkpoint: the CUDA configs, built without files, cannot run it;
- decoding modes (``--modes``): ``eager`` (``generate`` with its dynamic cache, no compilation) and ``compiled``
  (``cache_implementation="static"`` + a ``CompileConfig(fullgraph=True, dynamic=False)`` with
  ``--compile-backend``: inductor measures real speed, ``eager`` only checks that decoding compiles (quick checks,
  tests). Mode: transformers' default, "reduce-overhead" = CUDA graphs on CUDA. ``dynamic=False``: every shape
  (batch, cache length) gets its own specialised graph, so no method runs with a graph specialised for another's;
  all of them are compiled during the warm-up, and the script checks that nothing compiles while measuring);
- regimes of DyCoke's active set (``--regimes``), set by scaling the LM's attention logits
  (``llava.checkpoint_maker.scale_attention_logits``; q/k weights restored exactly afterwards): ``kept`` (the set
  chosen at the first decoding step stays: what real models mostly do) and ``changing`` (it is recomputed at every
  step: DyCoke's least favourable regime). With random weights the regime depends on the weights' scale: the CPU
  configs (initializer_range 0.2) change the set at every step as they are and keep it with logits x0.05; the real
  sizes (init 0.02) keep it as they are and change it with logits x64. The regime is the same model for every
  method (the baseline's weights are scaled too). The active-set recomputations DyCoke actually made are printed
  and stored, so the regime is shown, not assumed;
- attention backends (``--attn``; default ``sdpa`` on CPU, ``sdpa flash_attention_2`` on CUDA; flash attention is
  skipped with a note when ``flash-attn`` is not installed).

Measured per (backend, regime, mode, method), as the median of ``--runs`` runs after ``--warmup`` warm-up runs
(methods interleaved run by run; compiled mode always warms up at least once: compilation is never timed), each
run being three ``generate`` calls with forced answer lengths (``min_new_tokens == max_new_tokens``):

1. batch 1, ``--short-tokens`` (16) tokens: vision ms (``build_multimodal_inputs``: tower, projector, pooling,
   compression, splicing), TTFT ms (time to the first token), prefill ms (TTFT - vision: the LM prefill and the
   first sampling step), e2e 16-token ms (the whole call);
2. batch 1, ``--long-tokens`` (128) tokens: e2e 128-token ms; decode ms/step at batch 1 = the median interval
   between consecutive tokens (timestamps from a streamer, ``llava.timing``); peak memory (on CUDA
   ``torch.cuda.max_memory_allocated``, weights included; on CPU the peak RSS increase over the call, weights
   excluded, Linux only); DyCoke's recomputations of the active set;
3. batch 8 (the same prompt and video 8 times), ``--decode-steps`` + 1 tokens: decode ms/step at batch 8 = the
   median interval between consecutive tokens.

Derived: prefill TFLOP/s = (2 * P * T + 2 * n_layers * T^2 * n_heads * head_dim) / prefill time (P: decoder-layer
parameters, T: spliced prompt length, causal attention = half the T x T products); decode GB/s = (decoder-layer and
lm_head weight bytes + bytes of the K/V entries attended, at the mean context of the answer, times the batch) /
step time, where layers from DyCoke's L (FastV's K) on attend to the non-video tokens plus the active (kept) video
tokens; the weight-read floor of a decoding step = weight bytes read per step (decoder layers + lm_head) / the
device's copy bandwidth, measured here by timing large device-to-device copies (read + write bytes / time).

Targets, printed with met / not met (each is evaluated for every config; where it is set for another config the
line says so, and it is shown for reference):

- cpu-small, kept set: compiled DyCoke decode step <= 1.00x the compiled baseline's at batch 1 and <= 0.80x at
  batch 8; DyCoke's decode step <= its merging alone's (dycoke-ttm), batch 1 and 8, eager and compiled;
- ov-0.5b / ov-7b (CUDA, kept set): DyCoke TTFT <= 0.55x the baseline's (eager mode); compiled DyCoke decode step
  at batch 1 <= 1.3x the weight-read floor; a 128-token answer with compiled DyCoke >= 2x faster end to end than
  with the eager baseline.

Configs: ``cpu-tiny`` (tests), ``cpu-small`` (CPU default: the checkpoint maker's 'small' preset, saved and
loaded with ``load_pretrained_model``), ``ov-0.5b`` and ``ov-7b`` (CUDA only: the real LLaVA-OneVision-Qwen2
sizes with SigLIP so400m, built with random weights directly on the GPU; no downloads, no files).

Writes ``--out`` (JSON, default ``results/benchmark-<config>.json``) and ``figures/benchmark-<config>-latency.png``
and ``-memory.png``; prints a prefill table per backend, a decoding table per (backend, mode) with a column per
regime, the observed regimes and the targets.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

try:
    import llava  # noqa: F401
except ImportError:  # run from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llava.checkpoint_maker import (
    TinySpec,
    make_tiny_checkpoint,
    scale_attention_logits,
    tiny_config,
)
from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from llava.timing import synchronize, timed_generate

# ---- what is compared ----------------------------------------------------------------------------------------

METHODS = {
    "baseline": {"compressor": "none"},
    "dycoke": {"compressor": "dycoke", "dycoke_k": 0.7, "dycoke_l": 3, "dycoke_p": 0.7},
    # DyCoke's token merging alone (no KV pruning): isolates what the pruning does to a decode step.
    "dycoke-ttm": {"compressor": "dycoke", "dycoke_k": 0.7, "dycoke_l": 3, "dycoke_p": 0.0},
    "vidcom2": {"compressor": "vidcom2", "vidcom2_r": 0.25},
    "fastv": {"compressor": "fastv", "fastv_k": 2, "fastv_r": 0.5},
    # keep_positions: the same methods with the kept video tokens at their uncompressed positions (its cost).
    "dycoke-kept": {"compressor": "dycoke", "dycoke_k": 0.7, "dycoke_l": 3, "dycoke_p": 0.7, "keep_positions": True},
    "dycoke-ttm-kept": {"compressor": "dycoke", "dycoke_k": 0.7, "dycoke_l": 3, "dycoke_p": 0.0, "keep_positions": True},
    "evs": {"compressor": "evs", "evs_rate": 0.75},
    # EVS followed by DyCoke's KV pruning (composition): against "evs", what the pruning does to a decode step.
    "evs-kv": {"compressor": "evs", "evs_rate": 0.75, "dycoke_l": 3, "dycoke_p": 0.7},
    # The methods DyCoke is compared with, each at about 25% of the video tokens (VisionZip: 12 of 49 per frame). Their
    # in-LLM layers are the papers' (10, 18 and 20 of 28) at the same depth of the model measured (3, 5, 6 of 8).
    "visionzip": {"compressor": "visionzip", "visionzip_dominant": 10, "visionzip_contextual": 2},
    "fastvid": {"compressor": "fastvid", "fastvid_retention_ratio": 0.25},
    "fastvid-kv": {"compressor": "fastvid", "fastvid_retention_ratio": 0.25, "dycoke_l": 3, "dycoke_p": 0.7},
    "flashvid": {"compressor": "flashvid", "flashvid_retention_ratio": 0.25, "flashvid_pruning_layer": 20 / 28},
    "prunevid": {"compressor": "prunevid", "prunevid_layer": 10 / 28},
    "holitom": {"compressor": "holitom", "holitom_r": 0.25, "holitom_k": 18 / 28},
    "framefusion": {"compressor": "framefusion", "framefusion_cost": 0.3},
}
DEPTH_ARGUMENTS = ("flashvid_pruning_layer", "prunevid_layer", "holitom_k")  # given above as a share of the depth


def method_settings(method: str, num_layers: int) -> dict:
    """``METHODS[method]`` for a model of ``num_layers`` layers: a depth share becomes a layer in [1, layers - 1]."""
    settings = dict(METHODS[method])
    for name in DEPTH_ARGUMENTS:
        if name in settings:
            settings[name] = min(max(round(settings[name] * num_layers), 1), num_layers - 1)
    return settings
DEFAULT_METHODS = tuple(METHODS)
ATTENTION_BACKENDS = ("sdpa", "eager", "flash_attention_2")
MODES = ("eager", "compiled")
MODE_TITLES = {"eager": "eager decoding (dynamic cache)", "compiled": "compiled decoding (static cache + torch.compile)"}
REGIMES = ("kept", "changing")
REGIME_TITLES = {"kept": "kept set", "changing": "changing set"}
BATCHES = (1, 8)
DECODE_BATCH = BATCHES[-1]
COMPILE_BACKENDS = ("inductor", "eager")
SDPA_GQA_ENV = "TRANSFORMERS_SDPA_FORCE_GQA"

# The numbers every (backend, mode, regime, method) row holds (the tests check each one).
MEASURED_KEYS = (
    "vision_ms", "prefill_ms", "ttft_ms", "decode_ms_b1", "decode_ms_b8", "e2e_short_ms", "e2e_long_ms",
)
DERIVED_KEYS = ("prefill_tflops", "decode_gbs_b1", "decode_gbs_b8")
TOKEN_KEYS = ("prompt_tokens", "visual_tokens", "video_tokens")
RATIO_KEYS = {  # ratio to the baseline of the same (backend, mode, regime)
    "ttft_ratio": "ttft_ms", "decode_b1_ratio": "decode_ms_b1", "decode_b8_ratio": "decode_ms_b8",
    "e2e_short_ratio": "e2e_short_ms", "e2e_long_ratio": "e2e_long_ms", "memory_ratio": "peak_memory_mib",
}

QUESTION = (
    "Which of the following best describes what happens in the video?\n"
    "A. A red ball rolls across the table and falls off the edge.\n"
    "B. A person picks up a cup and drinks from it.\n"
    "C. A dog runs through a park chasing a frisbee.\n"
    "D. Nothing moves; the camera slowly pans to the left.\n"
    "Answer with the option's letter from the given choices directly."
)


# ---- configurations ------------------------------------------------------------------------------------------

# Scale of the LM's attention logits per regime (see the docstring). initializer_range 0.2 (the checkpoint maker's
# presets): the weights as they are change the active set at every step; x0.05 keeps it for a whole 128-token answer
# (x0.1 keeps it over 16 steps but recomputes it 6-8 times in 127 on cpu-small). 0.02 (real sizes): the weights as
# they are keep it, x64 (q and k x8 each) changes it at every step.
PRESET_REGIMES = (("kept", 0.05), ("changing", 1.0))
REAL_SIZE_REGIMES = (("kept", 1.0), ("changing", 64.0))


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark setting: the model, the input size and the default run lengths."""

    description: str
    spec: TinySpec
    real_sizes: bool  # True: random weights built on the device; False: a saved-and-loaded checkpoint
    vocab_size: int | None = None  # real sizes only (checkpoints take theirs from the tokenizer)
    frames: int = 32
    runs: int = 3
    decode_steps: int = 16  # decoding steps of the batch-8 answer
    short_tokens: int = 16
    long_tokens: int = 128
    attn: tuple[str, ...] = ("sdpa",)
    regime_scales: tuple[tuple[str, float], ...] = PRESET_REGIMES

    def scale(self, regime: str) -> float:
        return dict(self.regime_scales)[regime]


def _real_spec(**sizes) -> TinySpec:
    so400m = {"vision_hidden_size": 1152, "vision_intermediate_size": 4304, "vision_num_attention_heads": 16,
              "vision_published_layers": 27, "image_size": 384, "patch_size": 14}
    return TinySpec(**so400m, **sizes, max_grid=6, initializer_range=0.02)


CONFIGS = {
    "cpu-tiny": BenchConfig(
        "the 'tiny' preset (hidden 64, 4 layers), 8 frames of 98px: 16 tokens per frame",
        TinySpec(), real_sizes=False, frames=8, runs=1, decode_steps=4, short_tokens=4, long_tokens=8,
    ),
    "cpu-small": BenchConfig(
        "the 'small' preset (hidden 256, 8 layers, SigLIP 64-wide), 32 frames of 196px: 49 tokens per frame",
        TinySpec(hidden_size=256, intermediate_size=768, num_hidden_layers=8, num_attention_heads=8,
                 num_key_value_heads=2, vision_hidden_size=64, vision_intermediate_size=128,
                 vision_num_attention_heads=4, vision_published_layers=4, image_size=196),
        real_sizes=False, runs=3,
    ),
    "ov-0.5b": BenchConfig(
        "LLaVA-OneVision-Qwen2-0.5B sizes (hidden 896, 24 layers, tied), SigLIP so400m, 32 frames: 196 tokens per frame",
        _real_spec(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                   num_key_value_heads=2, tie_word_embeddings=True),
        real_sizes=True, vocab_size=151936, decode_steps=32, attn=("sdpa", "flash_attention_2"),
        regime_scales=REAL_SIZE_REGIMES,
    ),
    "ov-7b": BenchConfig(
        "LLaVA-OneVision-Qwen2-7B sizes (hidden 3584, 28 layers), SigLIP so400m, 32 frames: 196 tokens per frame",
        _real_spec(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                   num_key_value_heads=4, tie_word_embeddings=False),
        real_sizes=True, vocab_size=152064, decode_steps=32, attn=("sdpa", "flash_attention_2"),
        regime_scales=REAL_SIZE_REGIMES,
    ),
}
CPU_TARGET_CONFIGS = ("cpu-small",)
CUDA_TARGET_CONFIGS = ("ov-0.5b", "ov-7b")

# Qwen2's chat tokens and a few frequent ones, for prompts built without a tokenizer.
QWEN_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "\n": 198,
            "system": 8948, "user": 872, "assistant": 77091}
SYNTHETIC_QUESTION_TOKENS = 64  # about what Qwen's tokenizer makes of QUESTION


# ---- command line --------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="benchmark.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="cpu-small", choices=sorted(CONFIGS))
    parser.add_argument("--attn", nargs="+", choices=ATTENTION_BACKENDS,
                        help="attention backends of the LM (default: sdpa on CPU configs, sdpa flash_attention_2 on "
                             "CUDA configs)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma-separated, from {', '.join(METHODS)} (default: all)")
    parser.add_argument("--modes", default=",".join(MODES),
                        help="comma-separated decoding modes: eager (dynamic cache), compiled (static cache + "
                             "torch.compile) (default: %(default)s)")
    parser.add_argument("--regimes", default=",".join(REGIMES),
                        help="comma-separated regimes of DyCoke's active set: kept, changing (default: %(default)s)")
    parser.add_argument("--compile-backend", default="inductor", choices=COMPILE_BACKENDS,
                        help="torch.compile backend of the compiled mode: inductor (real speed) or eager (graph "
                             "capture only: quick checks and tests) (default: %(default)s)")
    parser.add_argument("--sdpa-gqa", action="store_true",
                        help="let sdpa handle grouped-query attention itself on masked calls too "
                             "(TRANSFORMERS_SDPA_FORCE_GQA=1). By default transformers does so only without a mask, "
                             "and on every masked call (a static cache's decoding steps, DyCoke's and FastV's masks) "
                             "first copies K/V once per query head (repeat_kv). On CUDA sdpa may then pick a slower "
                             "kernel.")
    parser.add_argument("--runs", type=int, help="measured runs per method (default: the config's)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="warm-up runs before measuring (default 1; compiled mode always warms up at least once)")
    parser.add_argument("--frames", type=int, help="video frames (default: the config's, 32 for all but cpu-tiny)")
    parser.add_argument("--decode-steps", type=int,
                        help="decoding steps of the batch-8 answer (default: the config's, 16 on CPU, 32 on CUDA)")
    parser.add_argument("--short-tokens", type=int, help="length of the short answer (default 16)")
    parser.add_argument("--long-tokens", type=int, help="length of the long answer (default 128)")
    parser.add_argument("--device", help="default: cuda for ov-* configs, cpu otherwise")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="JSON results (default: results/benchmark-<config>.json)")
    parser.add_argument("--figures-dir", default="figures", help="where the PNG figures go (default: figures)")
    parser.add_argument("--from-json", metavar="JSON",
                        help="measure nothing: print the tables and targets and draw the figures of an earlier "
                             "run's JSON")
    args = parser.parse_args(argv)
    if not args.from_json:
        resolve_defaults(parser, args)
    return args


def _choices(parser, option: str, text: str, allowed) -> list[str]:
    values = list(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
    unknown = [v for v in values if v not in allowed]
    if unknown or not values:
        parser.error(f"{option}: unknown or no value(s) {unknown or text!r}; choose from {', '.join(allowed)}")
    return values


def resolve_defaults(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fill the config-dependent defaults and reject impossible combinations with a clear message."""
    config = CONFIGS[args.config]
    for name in ("runs", "frames", "decode_steps", "short_tokens", "long_tokens"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(config, name))
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.long_tokens < 2:
        parser.error("--long-tokens must be >= 2: the batch-1 decode step is measured between its tokens")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    args.methods = _choices(parser, "--methods", args.methods, METHODS)
    args.modes = _choices(parser, "--modes", args.modes, MODES)
    args.regimes = _choices(parser, "--regimes", args.regimes, REGIMES)
    args.device = args.device or ("cuda" if config.real_sizes else "cpu")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(
            f"--config {args.config} runs on CUDA but no CUDA device is available here "
            f"(torch {torch.__version__}, torch.cuda.is_available() is False). "
            "Run it on a GPU machine, or use --config cpu-small on CPU."
        )
    if config.real_sizes and device.type != "cuda":
        parser.error(f"--config {args.config} builds the real model sizes and needs a CUDA device, got --device {args.device}.")
    args.notes = []
    args.attn = list(dict.fromkeys(args.attn or config.attn))
    if "flash_attention_2" in args.attn:
        reason = flash_attention_missing(device)
        if reason:
            args.attn.remove("flash_attention_2")
            args.notes.append(f"flash_attention_2 skipped: {reason}")
    if not args.attn:
        parser.error("no attention backend left to measure: " + "; ".join(args.notes))
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    args.out = args.out or f"results/benchmark-{args.config}.json"


def flash_attention_missing(device: torch.device) -> str | None:
    """Why flash_attention_2 cannot run here (None: it can)."""
    if device.type != "cuda":
        return f"it needs a CUDA device, this run is on {device.type}"
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():
        return "the flash-attn package is not installed (pip install flash-attn --no-build-isolation)"
    return None


# ---- model and input -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFacts:
    """Sizes that the FLOP and byte formulas need."""

    layer_params: int  # decoder layers only
    layer_bytes: int
    head_bytes: int  # lm_head weight, read once per decode step (the embedding when tied)
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    element_bytes: int

    @property
    def weight_bytes_per_step(self) -> int:
        """Weights a decoding step reads: the decoder layers and lm_head (an embedding row is negligible)."""
        return self.layer_bytes + self.head_bytes

    @classmethod
    def of(cls, model) -> ModelFacts:
        config, layers = model.config, model.get_model().layers
        weight = model.lm_head.weight
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            layer_params=sum(p.numel() for p in layers.parameters()),
            layer_bytes=sum(p.numel() * p.element_size() for p in layers.parameters()),
            head_bytes=weight.numel() * weight.element_size(),
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=head_dim,
            element_bytes=weight.element_size(),
        )


@dataclass
class Bench:
    """The model under test and its one input (prompt ids with the placeholder, and the video's pixels)."""

    model: torch.nn.Module
    prompt_ids: torch.Tensor  # (1, L) with IMAGE_TOKEN_INDEX at the placeholder
    video: torch.Tensor  # (frames, 3, S, S)
    pad_token_id: int
    facts: ModelFacts


def build_bench(args, workdir: Path) -> Bench:
    config = CONFIGS[args.config]
    dtype = getattr(torch, args.dtype)
    if config.real_sizes:
        model = random_real_size_model(config, args.attn[0], args.device, dtype, args.seed)
        prompt = synthetic_prompt(model.config.vocab_size, args.seed)
        pad = QWEN_IDS["<|endoftext|>"]
    else:
        model, tokenizer = loaded_checkpoint_model(config, args.attn[0], args.device, args.dtype, args.seed, workdir)
        prompt = rendered_prompt(tokenizer)
        pad = tokenizer.pad_token_id
    size = model.get_vision_tower().image_size
    generator = torch.Generator().manual_seed(args.seed)
    video = torch.rand(args.frames, 3, size, size, generator=generator) * 2 - 1  # preprocessed range [-1, 1]
    return Bench(model, prompt.to(args.device), video.to(args.device, dtype), pad, ModelFacts.of(model))


def loaded_checkpoint_model(config: BenchConfig, attn: str, device: str, dtype: str, seed: int, workdir: Path):
    """Write a random checkpoint in the real format and load it as users do."""
    from llava.model.builder import load_pretrained_model
    from llava.model.pooling_head import load_pooling_head

    folder = make_tiny_checkpoint(workdir / "checkpoint", config.spec, seed=seed)
    tokenizer, model, _, _ = load_pretrained_model(
        str(folder), None, "llava_qwen", device_map=device, torch_dtype=dtype, attn_implementation=attn
    )
    load_pooling_head(model)  # FastVID's, read from the tower folder before the folder is removed
    return model, tokenizer


def random_real_size_model(config: BenchConfig, attn: str, device: str, dtype: torch.dtype, seed: int):
    """``LlavaQwenForCausalLM`` at the real sizes, random weights initialised directly on the device."""
    from llava.model.language_model.llava_qwen import (
        LlavaQwenForCausalLM,
        config_from_dict,
    )

    special = {name: QWEN_IDS[name] for name in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")}
    raw = tiny_config(config.spec, config.vocab_size, special)
    raw.update(mm_vision_tower="google/siglip-so400m-patch14-384", torch_dtype=str(dtype).removeprefix("torch."))
    llava_config = config_from_dict(raw, None)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlavaQwenForCausalLM._from_config(llava_config, dtype=dtype, attn_implementation=attn)
    model.eval()
    # The model's own init leaves image_newline uninitialised (torch.empty) when built this way; give it the
    # random init every other weight has, so no garbage (inf / NaN) flows through the benchmark.
    newline = model.get_model().image_newline
    with torch.no_grad():
        newline.normal_(std=llava_config.hidden_size**-0.5)
    model.generation_config.pad_token_id = QWEN_IDS["<|endoftext|>"]
    return model


def rendered_prompt(tokenizer) -> torch.Tensor:
    """The qwen_1_5 chat prompt with the video placeholder and a Video-MME-style question."""
    from llava.conversation import conv_templates
    from llava.mm_utils import tokenizer_image_token

    conv = conv_templates["qwen_1_5"].copy()
    conv.append_message(conv.roles[0], f"{DEFAULT_IMAGE_TOKEN}\n{QUESTION}")
    conv.append_message(conv.roles[1], None)
    return tokenizer_image_token(conv.get_prompt(), tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")[None]


def synthetic_prompt(vocab_size: int, seed: int) -> torch.Tensor:
    """The qwen_1_5 prompt's layout in Qwen2 ids, with random in-vocabulary ids for the words."""
    generator = torch.Generator().manual_seed(seed)
    words = lambda n: torch.randint(0, QWEN_IDS["<|endoftext|>"], (n,), generator=generator).tolist()
    start, end, newline = QWEN_IDS["<|im_start|>"], QWEN_IDS["<|im_end|>"], QWEN_IDS["\n"]
    ids = (
        [start, QWEN_IDS["system"], newline] + words(6) + [end, newline]  # system\nYou are a helpful assistant.
        + [start, QWEN_IDS["user"], newline, IMAGE_TOKEN_INDEX, newline] + words(SYNTHETIC_QUESTION_TOKENS)
        + [end, newline, start, QWEN_IDS["assistant"], newline]
    )
    if max(ids) >= vocab_size:
        raise ValueError(f"the synthetic prompt needs Qwen2's vocabulary (>= {max(ids) + 1} ids), got {vocab_size}")
    return torch.tensor(ids)[None]



# ---- timing helpers ------------------------------------------------------------------------------------------


def _proc_status_kib(field_name: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field_name}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


@contextmanager
def rss_peak_increase():
    """Yields a dict whose ``bytes`` is the peak RSS increase over the block (Linux), or None if unmeasurable.

    Freed heap memory is returned to the OS first (malloc_trim) and the kernel's high-water mark is reset
    (``/proc/self/clear_refs``), so the peak is the block's own.
    """
    record: dict = {"bytes": None}
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        before = _proc_status_kib("VmRSS")
    except OSError:
        before = None
    yield record
    peak = _proc_status_kib("VmHWM")
    if before is not None and peak is not None:
        record["bytes"] = max(peak - before, 0) * 1024




@contextmanager
def _nothing():
    yield {}


def memory_metric(device: str) -> str:
    if torch.device(device).type == "cuda":
        return "peak CUDA memory allocated during the long answer (torch.cuda.max_memory_allocated, weights included)"
    return "peak RSS increase during the long answer over the RSS before it (CPU; weights excluded)"


# ---- regimes, decoding modes, bandwidth ----------------------------------------------------------------------


@contextmanager
def attention_regime(model, scale: float):
    """Run a block with the LM's attention logits multiplied by ``scale``; the q/k weights are restored exactly
    (in place: compiled graphs keep reading the same tensors)."""
    if scale == 1.0:
        yield
        return
    saved = [
        (parameter, parameter.detach().clone())
        for layer in model.get_model().layers
        for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj)
        for parameter in (projection.weight, projection.bias)
        if parameter is not None
    ]
    scale_attention_logits(model, scale)
    try:
        yield
    finally:
        with torch.no_grad():
            for parameter, original in saved:
                parameter.copy_(original)


def compile_config(backend: str):
    """Compiled decoding for ``generate``: full graph, one specialised graph per shape, on every device."""
    from transformers import CompileConfig

    mode = {"mode": "default"} if backend == "eager" else {}  # the eager backend takes no inductor mode
    config = CompileConfig(fullgraph=True, dynamic=False, backend=backend, **mode)
    config._compile_all_devices = True  # transformers compiles on CPU only when asked this way
    return config


def mode_kwargs(mode: str, compiled) -> dict:
    """``generate`` arguments of a decoding mode."""
    if mode == "eager":
        return {}
    return {"cache_implementation": "static", "compile_config": compiled}


def allow_recompilations() -> None:
    """Every method x shape x attention backend is its own graph of the same forward: far more than dynamo's
    default limit of 8 per function, past which it would silently fall back to eager decoding."""
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, 1024)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4096)


def own_static_cache_size(model) -> None:
    """Let the next ``generate`` size its static cache for its own prompt and answer.

    transformers sizes a new static cache to the longest one any earlier call of the model used
    (``_previous_max_cache_length``, to avoid recompiling): in one process measuring several methods, every later
    method without a cache of its own (baseline, dycoke-ttm, vidcom2) would decode over the longest prompt seen so far
    (masked), reading K/V it does not have. Forgetting it gives each call the cache a process of its own would use
    (DyCoke and FastV always make their own, sized to the call)."""
    model.__dict__.pop("_previous_max_cache_length", None)


def compiled_graphs() -> int:
    """Graphs torch.compile has produced in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def copy_bandwidth(device: str, nbytes: int | None = None, repeats: int = 7) -> dict:
    """Device memory bandwidth from large device-to-device copies: (bytes read + bytes written) / time, median."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    nbytes = nbytes or (2**30 if cuda else 2**28)
    inner = 4 if cuda else 1  # copies per timed window (a 1 GiB copy takes well under a millisecond on a GPU)
    source = torch.ones(nbytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)  # warm-up (first touch of the pages)
    seconds = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(inner):
            target.copy_(source)
        synchronize(device)
        seconds.append((time.perf_counter() - start) / inner)
    del source, target
    best = statistics.median(seconds)
    return {"copy_gbs": 2 * nbytes / best / 1e9, "buffer_bytes": nbytes, "copies": repeats * inner,
            "metric": "device-to-device copy of a buffer, (bytes read + bytes written) / time, median"}


# ---- one measurement -----------------------------------------------------------------------------------------


@torch.no_grad()
def token_counts(bench: Bench) -> dict:
    """Prompt length and visual tokens that the model's current compressor lets into the LM (untimed)."""
    mm = bench.model.build_multimodal_inputs(
        bench.prompt_ids, None, None, [bench.video], ["video"], None, padding_side="left"
    )
    return {"prompt_tokens": int(mm.inputs_embeds.shape[1]), "visual_tokens": int(mm.visual_token_count),
            "video_tokens": int(mm.video_token_mask.sum())}


def timed_answer(bench: Bench, new_tokens: int, batch: int, kwargs: dict, measure_memory: bool = False):
    """``generate`` with a forced answer length at ``batch`` (the prompt and video repeated); returns its
    GenerationTiming, the peak memory in bytes (or None) and the decode-time compression statistics."""
    model = bench.model
    own_static_cache_size(model)
    measure_rss = measure_memory and bench.prompt_ids.device.type != "cuda"
    with (rss_peak_increase() if measure_rss else _nothing()) as rss:
        output, timing = timed_generate(
            model, bench.prompt_ids.expand(batch, -1), images=[bench.video] * batch, modalities=["video"] * batch,
            do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=bench.pad_token_id,
            **kwargs,
        )
    if output.shape[1] != new_tokens:
        say(f"warning: generate returned {output.shape[1]} tokens, {new_tokens} were forced")
    peak = rss["bytes"] if measure_rss else (timing.peak_memory_bytes if measure_memory else None)
    return timing, peak, decode_stats(model.last_compression_stats)


def decode_stats(stats: dict) -> dict | None:
    """What the decode-time compressor did in the last call (row 0 for the counts; DyCoke's recomputations and
    tokens that entered the active set after the first step, per row), or None without one."""
    kv, fastv = stats.get("kv_pruning"), stats.get("fastv")
    if kv and kv.get("decode_steps"):
        return {"kind": "dycoke_kv", "layer": kv["layer"], "image_tokens": kv["image_tokens"][0],
                "attended_image_tokens": kv["active_image_tokens"][0], "decode_steps": kv["decode_steps"],
                "recomputations": kv["recomputations"], "entered_after_first_step": [sum(r[1:]) for r in kv["entered"]]}
    if fastv and fastv.get("pruned"):
        return {"kind": "fastv", "layer": fastv["layer"], "image_tokens": fastv["image_tokens"][0],
                "attended_image_tokens": fastv["kept_image_tokens"][0], "decode_steps": fastv["decode_steps"]}
    return None


def measure_once(bench: Bench, kwargs: dict, args) -> dict:
    """One run of one method in one mode: the short and long answers at batch 1 and the batch-8 answer."""
    short, _, _ = timed_answer(bench, args.short_tokens, 1, kwargs)
    long, peak, stats_b1 = timed_answer(bench, args.long_tokens, 1, kwargs, measure_memory=True)
    batched, _, stats_b8 = timed_answer(bench, args.decode_steps + 1, DECODE_BATCH, kwargs)
    milliseconds = lambda seconds: None if seconds is None else seconds * 1e3
    return {
        "vision_ms": short.vision_s * 1e3,
        "ttft_ms": short.time_to_first_token_s * 1e3,
        "prefill_ms": short.prefill_s * 1e3,
        "e2e_short_ms": short.total_s * 1e3,
        "e2e_long_ms": long.total_s * 1e3,
        "decode_ms_b1": milliseconds(long.median_step_s),
        "decode_ms_b8": milliseconds(batched.median_step_s),
        "peak_memory_mib": peak / 2**20 if peak is not None else None,
        "decode_stats_b1": stats_b1,
        "decode_stats_b8": stats_b8,
    }


# ---- runs, medians and derived numbers -----------------------------------------------------------------------


def benchmark_block(bench: Bench, mode: str, args, compiled, counts: dict) -> tuple[dict, dict]:
    """Warm-up, then ``args.runs`` interleaved runs of every method in one decoding mode (the backend and regime
    are already set); returns ({method: row}, compilation facts)."""
    model = bench.model
    kwargs = mode_kwargs(mode, compiled)
    warmups = max(args.warmup, 1) if mode == "compiled" else args.warmup
    warmup_s = {method: 0.0 for method in args.methods}
    graphs_start = compiled_graphs()
    for _ in range(warmups):
        for method in args.methods:
            model.configure_compression(**method_settings(method, model.config.num_hidden_layers))
            start = time.perf_counter()
            measure_once(bench, kwargs, args)
            warmup_s[method] += time.perf_counter() - start
    graphs_warm = compiled_graphs()
    runs: dict[str, list[dict]] = {method: [] for method in args.methods}
    for run in range(args.runs):
        for method in args.methods:
            model.configure_compression(**method_settings(method, model.config.num_hidden_layers))
            runs[method].append(measure_once(bench, kwargs, args))
            say(f"    run {run + 1}/{args.runs} {method}: " + _short_summary(runs[method][-1]))
    graphs_end = compiled_graphs()
    model.reset_compression()
    rows = {method: summarize(runs[method], counts[method], bench.facts, args) for method in args.methods}
    add_ratios(rows)
    info = {"warmup_runs": warmups, "warmup_s": warmup_s, "graphs_compiled_in_warmup": graphs_warm - graphs_start,
            "graphs_compiled_while_measuring": graphs_end - graphs_warm}
    if info["graphs_compiled_while_measuring"]:
        say(f"warning: {info['graphs_compiled_while_measuring']} graph(s) compiled while measuring ({mode}): the "
            "measured runs include compilation")
    return rows, info


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _short_summary(run: dict) -> str:
    keys = ("ttft_ms", "decode_ms_b1", "decode_ms_b8", "e2e_long_ms")
    text = ", ".join(f"{k} {_fmt(run[k], 1)}" for k in keys)
    stats = run["decode_stats_b1"]
    if stats and stats["kind"] == "dycoke_kv":
        text += f", active set recomputed {stats['recomputations'][0]}/{stats['decode_steps']}"
    return text


def summarize(runs: list[dict], counts: dict, facts: ModelFacts, args) -> dict:
    """Medians of the timed numbers, the token counts and the derived throughputs of one method."""
    row = {key: _median(run[key] for run in runs) for key in (*MEASURED_KEYS, "peak_memory_mib")}
    row.update(counts)
    first = runs[0]
    row["decode_stats_b1"], row["decode_stats_b8"] = first["decode_stats_b1"], first["decode_stats_b8"]
    kv = first["decode_stats_b1"] if first["decode_stats_b1"] and first["decode_stats_b1"]["kind"] == "dycoke_kv" else None
    row["kv_recomputations_b1"] = kv["recomputations"][0] if kv else None
    row["kv_active_image_tokens"] = kv["attended_image_tokens"] if kv else None
    row["prefill_tflops"] = _per_second(prefill_flops(facts, row["prompt_tokens"]), row["prefill_ms"], 1e12)
    for batch, new_tokens in ((1, args.long_tokens), (DECODE_BATCH, args.decode_steps + 1)):
        moved = decode_bytes_per_step(facts, row["prompt_tokens"], row[f"decode_stats_b{batch}"], new_tokens, batch)
        row[f"decode_gbs_b{batch}"] = _per_second(moved, row[f"decode_ms_b{batch}"], 1e9)
    row["runs"] = runs
    return row


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _per_second(amount: float, milliseconds: float | None, unit: float) -> float | None:
    return amount / (milliseconds * 1e-3) / unit if milliseconds else None


def prefill_flops(facts: ModelFacts, tokens: int) -> float:
    """2 * P * T for the matmuls of the decoder layers + causal attention 2 * layers * T^2 * heads * head_dim."""
    attention = 2 * facts.num_layers * tokens**2 * facts.num_heads * facts.head_dim
    return 2 * facts.layer_params * tokens + attention


def decode_bytes_per_step(facts: ModelFacts, prompt_tokens: int, stats: dict | None, new_tokens: int,
                          batch: int) -> float:
    """Weights (decoder layers + lm_head) + the K/V entries the attention reads at the answer's mean context; from
    DyCoke's layer L (FastV's K) on, the video tokens that are not attended (inactive, dropped) are not read."""
    context = prompt_tokens + new_tokens / 2
    layers_full, layers_reduced, skipped = facts.num_layers, 0, 0
    if stats:
        layers_full = stats["layer"]
        layers_reduced = facts.num_layers - layers_full
        skipped = stats["image_tokens"] - stats["attended_image_tokens"]
    token_layers = layers_full * context + layers_reduced * (context - skipped)
    kv_bytes = 2 * facts.num_kv_heads * facts.head_dim * facts.element_bytes * token_layers * batch
    return facts.weight_bytes_per_step + kv_bytes


def add_ratios(rows: dict) -> None:
    base = rows.get("baseline")
    for row in rows.values():
        for ratio, key in RATIO_KEYS.items():
            ok = base is not None and row.get(key) is not None and base.get(key)
            row[ratio] = row[key] / base[key] if ok else None


# ---- targets -------------------------------------------------------------------------------------------------


def target_specs(long_tokens: int) -> list[dict]:
    """The issue's targets: what is divided by what, the comparison, and the configs each is set for.
    ``num`` / ``den`` are (mode, regime, method, key) of a result row, or "floor" (the weight-read floor, ms)."""
    specs = []
    for batch, threshold in ((1, 1.0), (DECODE_BATCH, 0.8)):
        key = f"decode_ms_b{batch}"
        specs.append({
            "id": f"compiled-dycoke-vs-baseline-b{batch}", "set_for": CPU_TARGET_CONFIGS,
            "text": f"compiled DyCoke decode step / compiled baseline's, batch {batch}, kept set",
            "num": ("compiled", "kept", "dycoke", key), "den": ("compiled", "kept", "baseline", key),
            "op": "<=", "threshold": threshold,
        })
    for mode in MODES:
        for batch in BATCHES:
            key = f"decode_ms_b{batch}"
            specs.append({
                "id": f"{mode}-dycoke-vs-ttm-b{batch}", "set_for": CPU_TARGET_CONFIGS,
                "text": f"{mode} DyCoke decode step / merging alone's (dycoke-ttm), batch {batch}, kept set",
                "num": (mode, "kept", "dycoke", key), "den": (mode, "kept", "dycoke-ttm", key),
                "op": "<=", "threshold": 1.0,
            })
    specs += [
        {"id": "ttft-dycoke-vs-baseline", "set_for": CUDA_TARGET_CONFIGS,
         "text": "DyCoke time to first token / baseline's (eager mode, kept set)",
         "num": ("eager", "kept", "dycoke", "ttft_ms"), "den": ("eager", "kept", "baseline", "ttft_ms"),
         "op": "<=", "threshold": 0.55},
        {"id": "compiled-dycoke-b1-vs-floor", "set_for": CUDA_TARGET_CONFIGS,
         "text": "compiled DyCoke decode step, batch 1, kept set / weight-read floor",
         "num": ("compiled", "kept", "dycoke", "decode_ms_b1"), "den": "floor", "op": "<=", "threshold": 1.3},
        {"id": "e2e-long-speedup", "set_for": CUDA_TARGET_CONFIGS,
         "text": f"{long_tokens}-token answer, eager baseline / compiled DyCoke (kept set): speed-up",
         "num": ("eager", "kept", "baseline", "e2e_long_ms"), "den": ("compiled", "kept", "dycoke", "e2e_long_ms"),
         "op": ">=", "threshold": 2.0},
    ]
    return specs


def lookup(by_mode: dict, ref) -> float | None:
    mode, regime, method, key = ref
    return by_mode.get(mode, {}).get(regime, {}).get(method, {}).get(key)


def evaluate_targets(report: dict) -> list[dict]:
    """Every target for every attention backend, computed from the report's numbers (n/a where not measured)."""
    floor_ms = report["floor"]["floor_ms"]
    targets = []
    for attn, by_mode in report["results"].items():
        for spec in target_specs(report["long_tokens"]):
            num = lookup(by_mode, spec["num"])
            den = floor_ms if spec["den"] == "floor" else lookup(by_mode, spec["den"])
            value = num / den if num is not None and den else None
            met = None if value is None else (value <= spec["threshold"] if spec["op"] == "<=" else value >= spec["threshold"])
            applies = report["config"] in spec["set_for"]
            target = {**spec, "attn": attn, "num_ms": num, "den_ms": den, "value": value, "met": met, "applies": applies}
            target["line"] = target_line(target)
            targets.append(target)
    return targets


def target_line(target: dict) -> str:
    wanted = f"want {target['op']} {target['threshold']:.2f}x"
    if target["value"] is None:
        missing = [" ".join(ref[:3]) for ref in (target["num"], target["den"]) if ref != "floor"]
        verdict = f"n/a: not measured ({wanted}; needs {' and '.join(missing)})"
        return f"{target['attn']}: {target['text']}: {verdict}"
    line = (f"{target['attn']}: {target['text']}: {target['value']:.2f}x ({target['num_ms']:.2f} / "
            f"{target['den_ms']:.2f} ms; {wanted}) -> {'met' if target['met'] else 'not met'}")
    if not target["applies"]:
        line += f" [target set for {', '.join(target['set_for'])}; shown for reference]"
    return line


def regime_lines(report: dict) -> list[str]:
    """What DyCoke's active set did in each regime: recomputations / decoding steps, observed."""
    lines = []
    for attn, by_mode in report["results"].items():
        for regime, facts in report["regimes"].items():
            parts, as_intended = [], True
            for mode, by_regime in by_mode.items():
                row = by_regime.get(regime, {}).get("dycoke")
                if row is None:
                    continue
                b1, b8 = row["decode_stats_b1"], row["decode_stats_b8"]
                for stats in (b1, b8):
                    wanted = 1 if regime == "kept" else stats["decode_steps"]
                    as_intended &= all(count == wanted for count in stats["recomputations"])
                b8_counts = sorted(set(b8["recomputations"]))
                parts.append(
                    f"{mode}: {b1['recomputations'][0]}/{b1['decode_steps']} steps at batch 1 "
                    f"({b1['entered_after_first_step'][0]} tokens entered the set after the first step), "
                    f"{' or '.join(map(str, b8_counts))}/{b8['decode_steps']} at batch {DECODE_BATCH}"
                )
            head = f"{attn}, {REGIME_TITLES[regime]} (attention logits x{facts['attention_logit_scale']:g}): "
            if not parts:
                lines.append(head + "dycoke not measured, regime not observed")
                continue
            verdict = "as intended" if as_intended else "NOT the intended regime"
            lines.append(head + "DyCoke recomputed its active set " + "; ".join(parts) + f" ({verdict})")
    return lines


# ---- output --------------------------------------------------------------------------------------------------


def _fmt(value, digits: int, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{suffix}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def _label(method: str, methods: dict) -> str:
    settings = {k: v for k, v in methods[method].items() if k != "compressor"}
    short = {"dycoke_k": "k", "dycoke_l": "L", "dycoke_p": "p", "vidcom2_r": "r", "fastv_k": "K", "fastv_r": "R"}
    args = ", ".join(f"{short.get(k, k)}={v:g}" for k, v in settings.items())
    return f"{method} ({args})" if args else method


def prefill_table(report: dict, attn: str) -> tuple[str, str]:
    """Visual tokens, vision, prefill, TTFT: one row per method (eager mode and kept set when measured)."""
    by_mode = report["results"][attn]
    mode = "eager" if "eager" in by_mode else next(iter(by_mode))
    regime = "kept" if "kept" in by_mode[mode] else next(iter(by_mode[mode]))
    rows = []
    for method, row in by_mode[mode][regime].items():
        star = "*" if method == "fastv" else ""
        rows.append([_label(method, report["methods"]), f"{row['visual_tokens']}{star}", _fmt(row["vision_ms"], 1),
                     _fmt(row["prefill_ms"], 1), _fmt(row["ttft_ms"], 1), _fmt(row["ttft_ratio"], 2, "x"),
                     _fmt(row["prefill_tflops"], 3)])
    header = ["method", "visual tokens", "vision ms", "prefill ms", "TTFT ms", "TTFT x", "prefill TFLOP/s"]
    return f"{MODE_TITLES[mode]}, {REGIME_TITLES[regime]}", _table(header, rows)


def decode_table(report: dict, attn: str, mode: str) -> str:
    """Decode steps and end-to-end answers of one (backend, mode): one row per method, a column per regime."""
    by_regime = report["results"][attn][mode]
    regimes = list(by_regime)
    first = regimes[0]
    short, long = report["short_tokens"], report["long_tokens"]
    columns = [(f"b1 ms/step {r}", r, "decode_ms_b1", 2) for r in regimes]
    columns += [(f"b{DECODE_BATCH} ms/step {r}", r, "decode_ms_b8", 2) for r in regimes]
    columns += [(f"e2e {short} tok ms {r}", r, "e2e_short_ms", 1) for r in regimes]
    columns += [(f"e2e {long} tok ms {r}", r, "e2e_long_ms", 1) for r in regimes]
    columns += [(f"peak MiB {first}", first, "peak_memory_mib", 1), (f"GB/s b1 {first}", first, "decode_gbs_b1", 2),
                (f"GB/s b{DECODE_BATCH} {first}", first, "decode_gbs_b8", 2)]
    compiled = mode == "compiled" and report.get("compilation")
    header = ["method", *(name for name, *_ in columns)] + (["warm-up s"] if compiled else [])
    rows = []
    for method in by_regime[first]:
        cells = [method]
        cells += [_fmt(by_regime[r].get(method, {}).get(key), digits) for _, r, key, digits in columns]
        if compiled:
            cells.append(_fmt(report["compilation"][attn][mode][first]["warmup_s"].get(method), 1))
        rows.append(cells)
    return _table(header, rows)


def print_report(report: dict) -> None:
    env = report["environment"]
    compile_ = report["compile"]
    print(f"\n## {report['config']}: {report['description']}\n")
    print(f"{report['device']} ({env['device_name']}), {report['dtype']}, torch {env['torch']}, transformers "
          f"{env['transformers']}, {env['cpu_threads']} CPU thread(s); median of {report['runs']} run(s) after "
          f"{report['warmup']} warm-up run(s) (compiled: at least 1); compiled decoding: torch.compile backend="
          f"{compile_['backend']}, mode={compile_['mode']}, fullgraph, dynamic=False, static cache; sdpa on masked "
          f"calls: {'native GQA (' + SDPA_GQA_ENV + '=1)' if report.get('sdpa_force_gqa') else 'K/V repeated per head (transformers default)'}.")
    for note in report.get("notes", []):
        print(f"Note: {note}.")
    for attn in report["results"]:
        title, table = prefill_table(report, attn)
        print(f"\n### attn={attn}: prefill, batch 1 ({title})\n")
        print(table)
        if "fastv" in report["methods"]:
            print("\n\\* FastV drops video tokens inside the LM, from layer K on; the column counts the tokens that "
                  "enter it.")
        for mode in report["results"][attn]:
            print(f"\n### attn={attn}: {MODE_TITLES[mode]}\n")
            print(decode_table(report, attn, mode))
    floor = report["floor"]
    print(f"\nWeight-read floor of a decoding step: {floor['weight_bytes'] / 1e6:.1f} MB of weights (decoder layers + "
          f"lm_head) / {floor['copy_gbs']:.1f} GB/s measured copy bandwidth ({floor['buffer_bytes'] // 2**20} MiB "
          f"device-to-device copies, read + write) = {floor['floor_ms']:.3f} ms.")
    print(f"Peak memory: {report['memory_metric']}. Decode ms/step: median interval between consecutive tokens "
          f"(batch 1: the {report['long_tokens']}-token answer; batch {DECODE_BATCH}: {report['decode_steps']} "
          f"decoding steps). Prefill ms = TTFT - vision ms.")
    print(f"Prefill TFLOP/s: {report['formulas']['prefill_tflops']}. GB/s: {report['formulas']['decode_gbs']}.")
    print("\nRegimes (observed):")
    for line in regime_lines(report):
        print(f"- {line}")
    print("\nTargets:")
    for target in report["targets"]:
        print(f"- {target['line']}")
    compiled_late = [f"{attn}/{mode}/{regime}" for attn, by_mode in report.get("compilation", {}).items()
                     for mode, by_regime in by_mode.items() for regime, info in by_regime.items()
                     if info["graphs_compiled_while_measuring"]]
    if compiled_late:
        print(f"\nWarning: graphs were compiled while measuring in {', '.join(compiled_late)}.")
    if report.get("wall_s") is not None:
        print(f"\nMeasured in {report['wall_s'] / 60:.1f} min.")


FIGURE_COLUMNS = 3  # panels per row
FASTV_COUNT_NOTE = ("* FastV drops video tokens inside the LM, from layer K on; the panel counts the tokens that "
                    "enter it.")


def figure_panels(report: dict) -> dict[str, list[tuple[str, str, str]]]:
    """Per figure (``latency``, ``memory``): its panels as (result key, regime, title), those measured only."""
    panels = {
        "latency": [("ttft_ms", "kept", "time to first token (ms)"),
                    ("decode_ms_b1", "kept", "decode ms/step, batch 1, kept set"),
                    ("decode_ms_b8", "kept", f"decode ms/step, batch {DECODE_BATCH}, kept set"),
                    ("decode_ms_b8", "changing", f"decode ms/step, batch {DECODE_BATCH}, changing set"),
                    ("e2e_long_ms", "kept", f"{report['long_tokens']}-token answer (ms), kept set")],
        "memory": [("peak_memory_mib", "kept", "peak memory (MiB), kept set"),
                   ("visual_tokens", "kept", "visual tokens entering the LM*")],
    }
    measured = {regime for by_mode in report["results"].values() for by_regime in by_mode.values()
                for regime in by_regime}
    return {name: [panel for panel in rows if panel[1] in measured] for name, rows in panels.items()}


def draw_figure(report: dict, panels: list[tuple[str, str, str]]):
    """One figure: a panel per (key, regime) with a group of bars per method and a bar per (backend, decoding mode),
    each bar labelled with its value and its ratio to the baseline's; one legend for the whole figure."""
    import matplotlib.pyplot as plt

    columns = min(len(panels), FIGURE_COLUMNS)
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.9 * rows + 0.9), squeeze=False)
    for axis, (key, regime, title) in zip(axes.flat, panels):
        _grouped_bars(axis, report["results"], key, regime, title)
    for axis in list(axes.flat)[len(panels):]:
        axis.set_visible(False)
    # Title, then the one legend under it, then the panels (positions in inches from the top, as fractions).
    height = figure.get_figheight()
    figure.suptitle(f"{report['config']} ({report['device']}, {report['dtype']}, {report['frames']} frames, median "
                    f"of {report['runs']} runs)\non each bar: its value and its ratio to the baseline with the same "
                    "decoding", fontsize=11, y=1 - 0.1 / height, va="top")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="upper center", ncol=len(labels), bbox_to_anchor=(0.5, 1 - 0.58 / height),
                  frameon=False, fontsize=9)
    note = FASTV_COUNT_NOTE if any(panel[0] == "visual_tokens" for panel in panels) else None
    if note:
        figure.text(0.01, 0.01, note, fontsize=8, va="bottom")
    figure.tight_layout(rect=(0, 0.3 / height if note else 0, 1, 1 - 0.55 / height))
    return figure


def write_figures(report: dict, folder: Path) -> list[str]:
    """``benchmark-<config>-latency.png`` and ``-memory.png`` in ``folder`` (see :func:`draw_figure`)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("warning: matplotlib is not installed (pip install matplotlib): no figures written", file=sys.stderr)
        return []
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for suffix, panels in figure_panels(report).items():
        figure = draw_figure(report, panels)
        path = folder / f"benchmark-{report['config']}-{suffix}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        paths.append(str(path))
    return paths


def _bar_label(value: float, baseline: float | None) -> str:
    """The value (3 significant digits, or its integer part), and under it the ratio to the baseline's value."""
    text = f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"
    return f"{text}\n{value / baseline:.2f}x" if baseline else text


def _grouped_bars(axis, results: dict, key: str, regime: str, title: str) -> None:
    series = [(f"{attn}, {mode} decoding", by_regime.get(regime, {})) for attn, by_mode in results.items()
              for mode, by_regime in by_mode.items()]
    methods = list(dict.fromkeys(m for _, rows in series for m in rows))
    width = 0.8 / max(len(series), 1)
    for index, (label, rows) in enumerate(series):
        values = [(rows.get(m, {}).get(key) or 0) for m in methods]
        baseline = rows.get("baseline", {}).get(key)
        positions = [i + (index - (len(series) - 1) / 2) * width for i in range(len(methods))]
        bars = axis.bar(positions, values, width, label=label)
        axis.bar_label(bars, [_bar_label(v, baseline) if v else "" for v in values], fontsize=7, padding=2)
    axis.set_xticks(range(len(methods)), methods, rotation=25, ha="right", rotation_mode="anchor", fontsize=8.5)
    axis.margins(y=0.2)  # room for the labels above the highest bar
    axis.set_title(title, fontsize=9.5)
    axis.spines[["top", "right"]].set_visible(False)


def environment(args) -> dict:
    import transformers

    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "device_name": name, "cpu_threads": torch.get_num_threads()}


def _cpu_name() -> str:
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    except OSError:
        match = None
    return match.group(1).strip() if match else (platform.processor() or platform.machine())


def write_json(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2, default=str)


# ---- main ----------------------------------------------------------------------------------------------------


def run_benchmark(args) -> dict:
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = CONFIGS[args.config]
    compiled = None
    if "compiled" in args.modes:
        allow_recompilations()
        compiled = compile_config(args.compile_backend)
    if args.sdpa_gqa:
        os.environ[SDPA_GQA_ENV] = "1"  # read by transformers at every sdpa call (and when compiling one)
    for note in args.notes:
        say(f"Note: {note}")
    say(f"Building {args.config}: {config.description} ({args.device}, {args.dtype}) ...")
    with tempfile.TemporaryDirectory() as workdir:
        bench = build_bench(args, Path(workdir))
    bandwidth = copy_bandwidth(args.device)
    model = bench.model
    results: dict = {}
    compilation: dict = {}
    for attn in args.attn:
        model.set_attn_implementation(attn)
        counts = {}
        for method in args.methods:
            model.configure_compression(**method_settings(method, model.config.num_hidden_layers))
            counts[method] = token_counts(bench)
        for regime in args.regimes:
            with attention_regime(model, config.scale(regime)):
                for mode in args.modes:
                    say(f"Measuring attn={attn}, {REGIME_TITLES[regime]} (logits x{config.scale(regime):g}), "
                        f"{MODE_TITLES[mode]} ...")
                    rows, info = benchmark_block(bench, mode, args, compiled, counts)
                    results.setdefault(attn, {}).setdefault(mode, {})[regime] = rows
                    compilation.setdefault(attn, {}).setdefault(mode, {})[regime] = info
    model.reset_compression()
    facts = bench.facts
    return {
        "config": args.config,
        "description": config.description,
        "device": args.device,
        "dtype": args.dtype,
        "frames": args.frames,
        "runs": args.runs,
        "warmup": args.warmup,
        "decode_steps": args.decode_steps,
        "decode_batch": DECODE_BATCH,
        "batches": list(BATCHES),
        "short_tokens": args.short_tokens,
        "long_tokens": args.long_tokens,
        "methods": {method: method_settings(method, model.config.num_hidden_layers) for method in args.methods},
        "modes": list(args.modes),
        "regimes": {regime: {"attention_logit_scale": config.scale(regime)} for regime in args.regimes},
        "attn": list(args.attn),
        "compile": {"backend": args.compile_backend, "mode": compiled.mode if compiled else None,
                    "fullgraph": True, "dynamic": False, "cache_implementation": "static"},
        "notes": list(args.notes),
        "sdpa_force_gqa": os.environ.get(SDPA_GQA_ENV, "0") == "1",
        "memory_metric": memory_metric(args.device),
        "formulas": {
            "prefill_tflops": "(2*P*T + 2*n_layers*T^2*n_heads*head_dim) / prefill_s / 1e12; P = decoder-layer "
                              "parameters, T = spliced prompt tokens (causal attention: QK^T + AV over half of T x T)",
            "decode_gbs": "(decoder-layer + lm_head weight bytes + K/V bytes attended at the answer's mean context, "
                          "times batch for K/V) / step_s / 1e9; from DyCoke's L (FastV's K) on, only the non-video "
                          "and active (kept) video keys are counted",
            "floor_ms": "(decoder-layer + lm_head weight bytes) / measured copy bandwidth",
        },
        "model": {**vars(facts), "weight_bytes_per_step": facts.weight_bytes_per_step},
        "floor": {**bandwidth, "weight_bytes": facts.weight_bytes_per_step,
                  "floor_ms": facts.weight_bytes_per_step / (bandwidth["copy_gbs"] * 1e9) * 1e3},
        "environment": environment(args),
        "results": results,
        "compilation": compilation,
        "wall_s": time.perf_counter() - started,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_json:  # e.g. a CUDA run's JSON, drawn on a machine that has matplotlib
        report = json.loads(Path(args.from_json).read_text())
        report["targets"] = evaluate_targets(report)
        report["figures"] = write_figures(report, Path(args.figures_dir))
        print_report(report)
        print("\nWrote " + ", ".join(report["figures"]))
        return 0
    report = run_benchmark(args)
    report["targets"] = evaluate_targets(report)
    report["figures"] = write_figures(report, Path(args.figures_dir))
    write_json(report, Path(args.out))
    print_report(report)
    print(f"\nWrote {args.out}" + "".join(f", {p}" for p in report["figures"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
