"""Benchmark baseline vs DyCoke vs VidCom2 on the same video, in one process.

    python scripts/benchmark.py                                   # --config cpu-small, sdpa (CPU, 2-3 min)
    python scripts/benchmark.py --attn sdpa eager                 # cpu-small with both backends (~10 min on 2 cores)
    python scripts/benchmark.py --config ov-7b                    # CUDA: real LLaVA-OV-7B sizes, random bf16 weights
    python scripts/benchmark.py --config ov-0.5b --runs 5 --methods baseline,dycoke,dycoke-ttm

For every attention backend (``--attn``; default ``sdpa eager`` on CUDA configs, ``sdpa`` on CPU configs, where
eager attention is several times slower than sdpa's fused kernel and would triple the run time) and method
(``--methods``) it measures, as the median of ``--runs`` runs after ``--warmup`` warm-up runs:

- vision ms: ``build_multimodal_inputs`` (tower, projector, pooling, compression, splicing into the prompt);
- prefill ms: the LM forward over the spliced prompt embeddings (batch 1, logits for the last token only);
- TTFT ms: time to the first token of ``model.generate`` (vision + prefill + first sampling step);
- decode ms/step at batch 1 and batch 8: a manual greedy loop of ``--decode-steps`` steps over a ``DynamicCache``
  after the prefill. ``model._begin_compression(mm)`` is called before the prefill, exactly as ``generate`` does,
  so DyCoke's KV pruning runs in the loop. Batch 8 is the same prompt 8 times, prefilled once per method (set-up,
  not timed; always with sdpa, since an eager batch-8 prefill of a 6k-token prompt needs over 50 GB for its score
  matrices at 7B); its loop then runs ``--warmup`` + ``--runs`` windows of ``--decode-steps`` steps, and the
  median of the measured windows is reported;
- e2e ms: ``model.generate`` for a short and a long answer (16 and 128 tokens; ``min_new_tokens ==
  max_new_tokens``, so EOS cannot end it early);
- peak memory during the long ``generate``: on CUDA ``torch.cuda.max_memory_allocated`` (weights included);
  on CPU the peak resident-set increase over the RSS before the call (weights excluded; Linux only, else n/a);
- prefill TFLOP/s = (2 * P * T + 2 * n_layers * T^2 * n_heads * head_dim) / prefill time, where P counts the
  decoder-layer parameters (embeddings and lm_head excluded: prefill computes logits for one token), T is the
  spliced prompt length, and the attention term is causal QK^T plus AV (half of the full T x T products);
- decode GB/s = (bytes of decoder-layer and lm_head weights + bytes of the K/V entries attention reads, at the
  mean context length of the loop) / step time. With DyCoke's KV pruning, layers >= L read the non-image
  keys plus the int(n_img * (1 - p)) active image keys. Copies the cache makes (``torch.cat``) are not counted.

Configs: ``cpu-tiny`` (tests), ``cpu-small`` (CPU default: the checkpoint maker's 'small' preset, saved and
loaded with ``load_pretrained_model``), ``ov-0.5b`` and ``ov-7b`` (CUDA only: the real LLaVA-OneVision-Qwen2
sizes with SigLIP so400m, built with random weights directly on the GPU; no downloads, no files).

Writes ``--out`` (JSON, default ``results/benchmark-<config>.json``) and ``figures/benchmark-<config>-latency.png``
and ``-memory.png``; prints one markdown table per backend and whether the ov-7b targets are met.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import re
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch

try:
    import llava  # noqa: F401
except ImportError:  # run from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llava.checkpoint_maker import TinySpec, make_tiny_checkpoint, tiny_config
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
}
DEFAULT_METHODS = ("baseline", "dycoke", "vidcom2", "fastv")
ATTENTION_BACKENDS = ("sdpa", "eager")
DECODE_BATCH = 8

# The JSON keys of one method's row, in table order.
COLUMNS = (
    "visual_tokens", "vision_ms", "prefill_ms", "ttft_ms", "decode_ms_b1", "decode_ms_b8", "e2e_short_ms",
    "e2e_long_ms", "peak_memory_mib", "prefill_tflops", "decode_gbs", "ttft_ratio", "e2e_short_ratio",
    "e2e_long_ratio", "memory_ratio",
)
TIMED_KEYS = ("vision_ms", "prefill_ms", "ttft_ms", "decode_ms_b1", "e2e_short_ms", "e2e_long_ms", "peak_memory_mib")

QUESTION = (
    "Which of the following best describes what happens in the video?\n"
    "A. A red ball rolls across the table and falls off the edge.\n"
    "B. A person picks up a cup and drinks from it.\n"
    "C. A dog runs through a park chasing a frisbee.\n"
    "D. Nothing moves; the camera slowly pans to the left.\n"
    "Answer with the option's letter from the given choices directly."
)


# ---- configurations ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark setting: the model, the input size and the default run lengths."""

    description: str
    spec: TinySpec
    real_sizes: bool  # True: random weights built on the device; False: a saved-and-loaded checkpoint
    vocab_size: int | None = None  # real sizes only (checkpoints take theirs from the tokenizer)
    frames: int = 32
    runs: int = 3
    decode_steps: int = 32
    short_tokens: int = 16
    long_tokens: int = 128
    attn: tuple[str, ...] = ATTENTION_BACKENDS


def _real_spec(**sizes) -> TinySpec:
    so400m = {"vision_hidden_size": 1152, "vision_intermediate_size": 4304, "vision_num_attention_heads": 16,
              "vision_published_layers": 27, "image_size": 384, "patch_size": 14}
    return TinySpec(**so400m, **sizes, max_grid=6, initializer_range=0.02)


CONFIGS = {
    "cpu-tiny": BenchConfig(
        "the 'tiny' preset (hidden 64, 4 layers), 8 frames of 98px: 16 tokens per frame",
        TinySpec(), real_sizes=False, frames=8, runs=1, decode_steps=4, short_tokens=4, long_tokens=8,
        attn=("sdpa",),
    ),
    "cpu-small": BenchConfig(
        "the 'small' preset (hidden 256, 8 layers, SigLIP 64-wide), 32 frames of 196px: 49 tokens per frame",
        TinySpec(hidden_size=256, intermediate_size=768, num_hidden_layers=8, num_attention_heads=8,
                 num_key_value_heads=2, vision_hidden_size=64, vision_intermediate_size=128,
                 vision_num_attention_heads=4, vision_published_layers=4, image_size=196),
        real_sizes=False, runs=3, decode_steps=16, attn=("sdpa",),
    ),
    "ov-0.5b": BenchConfig(
        "LLaVA-OneVision-Qwen2-0.5B sizes (hidden 896, 24 layers, tied), SigLIP so400m, 32 frames: 196 tokens per frame",
        _real_spec(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                   num_key_value_heads=2, tie_word_embeddings=True),
        real_sizes=True, vocab_size=151936,
    ),
    "ov-7b": BenchConfig(
        "LLaVA-OneVision-Qwen2-7B sizes (hidden 3584, 28 layers), SigLIP so400m, 32 frames: 196 tokens per frame",
        _real_spec(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                   num_key_value_heads=4, tie_word_embeddings=False),
        real_sizes=True, vocab_size=152064,
    ),
}

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
                        help="attention backends of the LM (default: sdpa eager on CUDA configs, sdpa on CPU configs)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma-separated, from {', '.join(METHODS)} (default: %(default)s)")
    parser.add_argument("--runs", type=int, help="measured runs per method (default: the config's)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up runs before measuring (default 1)")
    parser.add_argument("--frames", type=int, help="video frames (default: the config's, 32 for all but cpu-tiny)")
    parser.add_argument("--decode-steps", type=int, help="steps of the manual decode loops (default: the config's)")
    parser.add_argument("--short-tokens", type=int, help="length of the short generate (default 16)")
    parser.add_argument("--long-tokens", type=int, help="length of the long generate (default 128)")
    parser.add_argument("--device", help="default: cuda for ov-* configs, cpu otherwise")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="JSON results (default: results/benchmark-<config>.json)")
    parser.add_argument("--figures-dir", default="figures", help="where the PNG figures go (default: figures)")
    parser.add_argument("--from-json", metavar="JSON",
                        help="measure nothing: print the tables and draw the figures of an earlier run's JSON")
    args = parser.parse_args(argv)
    if not args.from_json:
        resolve_defaults(parser, args)
    return args


def resolve_defaults(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fill the config-dependent defaults and reject impossible combinations with a clear message."""
    config = CONFIGS[args.config]
    for name in ("runs", "frames", "decode_steps", "short_tokens", "long_tokens"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(config, name))
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or not args.methods:
        parser.error(f"unknown method(s) {unknown or args.methods}; choose from {', '.join(METHODS)}")
    args.attn = list(dict.fromkeys(args.attn or config.attn))
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
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    args.out = args.out or f"results/benchmark-{args.config}.json"


# ---- model and input -----------------------------------------------------------------------------------------


@dataclass
class Bench:
    """The model under test and its one input (prompt ids with the placeholder, and the video's pixels)."""

    model: torch.nn.Module
    prompt_ids: torch.Tensor  # (1, L) with IMAGE_TOKEN_INDEX at the placeholder
    video: torch.Tensor  # (frames, 3, S, S)
    pad_token_id: int
    facts: ModelFacts


@dataclass(frozen=True)
class ModelFacts:
    """Sizes that the FLOP and byte formulas need."""

    layer_params: int  # decoder layers only
    layer_bytes: int
    head_bytes: int  # lm_head weight, read once per decode step
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    element_bytes: int

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

    folder = make_tiny_checkpoint(workdir / "checkpoint", config.spec, seed=seed)
    tokenizer, model, _, _ = load_pretrained_model(
        str(folder), None, "llava_qwen", device_map=device, torch_dtype=dtype, attn_implementation=attn
    )
    return model, tokenizer


def random_real_size_model(config: BenchConfig, attn: str, device: str, dtype: torch.dtype, seed: int):
    """``LlavaQwenForCausalLM`` at the real sizes, random weights initialised directly on the device."""
    from llava.model.language_model.llava_qwen import LlavaQwenForCausalLM, config_from_dict

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


# ---- timing primitives ---------------------------------------------------------------------------------------


class Stopwatch:
    """Wall time of a block, with the device synchronised on both ends."""

    def __init__(self, device):
        self.device = device
        self.seconds = 0.0

    def __enter__(self):
        synchronize(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        synchronize(self.device)
        self.seconds = time.perf_counter() - self._start


@contextmanager
def attention_backend(model, name: str):
    """Run a block with another attention backend (the LM reads it from the config at every forward)."""
    previous = model.config._attn_implementation
    model.config._attn_implementation = name
    try:
        yield
    finally:
        model.config._attn_implementation = previous


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


def memory_metric(device: str) -> str:
    if torch.device(device).type == "cuda":
        return "peak CUDA memory allocated during the long generate (torch.cuda.max_memory_allocated, weights included)"
    return "peak RSS increase during the long generate over the RSS before it (CPU; weights excluded)"


# ---- one measurement -----------------------------------------------------------------------------------------


def multimodal_inputs(bench: Bench):
    """The spliced prompt (vision tower, projector, pooling, compression), timed."""
    model = bench.model
    model._reset_compression_stats()
    with Stopwatch(model.device) as watch:
        mm = model.build_multimodal_inputs(
            bench.prompt_ids, None, None, [bench.video], ["video"], None, padding_side="left"
        )
    return mm, watch.seconds


def repeated_rows(mm, batch: int):
    """The same prompt ``batch`` times."""
    repeat = lambda t: t.expand(batch, *t.shape[1:]).contiguous()
    return replace(
        mm,
        inputs_embeds=repeat(mm.inputs_embeds),
        attention_mask=repeat(mm.attention_mask),
        position_ids=repeat(mm.position_ids),
        labels=repeat(mm.labels),
        video_token_mask=repeat(mm.video_token_mask),
        visual_token_count=mm.visual_token_count * batch,
    )


@torch.no_grad()
def prefill(model, mm):
    """Start compression for this sequence (as generate does), then the LM forward over the embeddings."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    model._begin_compression(mm)
    mask = mm.attention_mask.long()
    with Stopwatch(model.device) as watch:
        output = model(inputs_embeds=mm.inputs_embeds, attention_mask=mask, past_key_values=cache,
                       use_cache=True, logits_to_keep=1)
    return GreedyDecoder(model, cache, output.logits, mask), watch.seconds


class GreedyDecoder:
    """Greedy decoding over a prefilled ``DynamicCache``, one forward per token, as generate's loop does it."""

    def __init__(self, model, cache, logits: torch.Tensor, mask: torch.Tensor):
        self.model, self.cache, self.mask = model, cache, mask
        self.token = logits[:, -1:].argmax(-1)

    @torch.no_grad()
    def seconds_per_step(self, steps: int) -> float:
        with Stopwatch(self.model.device) as watch:
            for _ in range(steps):
                self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
                output = self.model(input_ids=self.token, attention_mask=self.mask, past_key_values=self.cache,
                                    use_cache=True)
                self.token = output.logits[:, -1:].argmax(-1)
        return watch.seconds / steps


def timed_answer(bench: Bench, new_tokens: int, device: str):
    """``generate`` with a forced answer length; returns its GenerationTiming and peak memory bytes (or None)."""
    measure_rss = torch.device(device).type != "cuda"
    with (rss_peak_increase() if measure_rss else _nothing()) as rss:
        output, timing = timed_generate(
            bench.model, bench.prompt_ids, images=[bench.video], modalities=["video"], do_sample=False,
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=bench.pad_token_id,
        )
    if output.shape[1] != new_tokens:
        print(f"warning: generate returned {output.shape[1]} tokens, {new_tokens} were forced", file=sys.stderr)
    peak = rss["bytes"] if measure_rss else timing.peak_memory_bytes
    return timing, peak


@contextmanager
def _nothing():
    yield {}


def measure_once(bench: Bench, args, long_answer: bool = True) -> dict:
    """The batch-1 measurements of one method, once: raw numbers (ms, MiB, token counts)."""
    model = bench.model
    mm, vision_s = multimodal_inputs(bench)
    decoder, prefill_s = prefill(model, mm)
    decode_s = decoder.seconds_per_step(args.decode_steps)
    kv_stats = model.last_compression_stats.get("kv_pruning")
    del decoder
    short, _ = timed_answer(bench, args.short_tokens, args.device)
    row = {
        "prompt_tokens": int(mm.inputs_embeds.shape[1]),
        "visual_tokens": int(mm.visual_token_count),
        "video_tokens": int(mm.video_token_mask.sum()),
        "vision_ms": vision_s * 1e3,
        "prefill_ms": prefill_s * 1e3,
        "ttft_ms": short.time_to_first_token_s * 1e3,
        "decode_ms_b1": decode_s * 1e3,
        "e2e_short_ms": short.total_s * 1e3,
        "kv_recomputations_b1": _first_row(kv_stats, "recomputations"),
        "kv_active_image_tokens": _first_row(kv_stats, "active_image_tokens"),
    }
    if long_answer:
        long, peak = timed_answer(bench, args.long_tokens, args.device)
        row["e2e_long_ms"] = long.total_s * 1e3
        row["peak_memory_mib"] = peak / 2**20 if peak is not None else None
    return row


def batched_decode_ms(bench: Bench, args) -> list[float]:
    """ms/step at batch 8 (the prompt 8 times), one value per measured window of ``decode_steps`` steps.

    One prefill serves every window (a batch-8 prefill is the costly part): ``warmup`` windows are discarded,
    then ``runs`` windows are measured. The prefill is set-up only and always runs with sdpa (see the docstring).
    """
    mm, _ = multimodal_inputs(bench)
    with attention_backend(bench.model, "sdpa"):
        decoder, _ = prefill(bench.model, repeated_rows(mm, DECODE_BATCH))
    windows = [decoder.seconds_per_step(args.decode_steps) * 1e3 for _ in range(args.warmup + args.runs)]
    return windows[args.warmup :]


def _first_row(stats: dict | None, key: str):
    if not stats or not stats.get(key):
        return None
    return stats[key][0]


# ---- runs, medians and derived numbers -----------------------------------------------------------------------


def benchmark_backend(bench: Bench, attn: str, args) -> dict:
    """Warm-up, ``args.runs`` interleaved batch-1 runs of every method, then batch 8; returns {method: row}."""
    model = bench.model
    model.set_attn_implementation(attn)
    for _ in range(args.warmup):
        for method in args.methods:
            model.configure_compression(**METHODS[method])
            measure_once(bench, args, long_answer=False)  # the long answer only repeats decode steps
    runs: dict[str, list[dict]] = {method: [] for method in args.methods}
    for run in range(args.runs):
        for method in args.methods:
            model.configure_compression(**METHODS[method])
            runs[method].append(measure_once(bench, args))
            say(f"  {attn} run {run + 1}/{args.runs} {method}: " + _short_summary(runs[method][-1]))
    rows = {}
    for method in args.methods:
        model.configure_compression(**METHODS[method])
        windows = batched_decode_ms(bench, args)
        say(f"  {attn} batch {DECODE_BATCH} {method}: decode ms/step " + ", ".join(f"{w:.1f}" for w in windows))
        rows[method] = summarize(runs[method], windows, METHODS[method], bench.facts, args)
    model.configure_compression(compressor="none")
    add_ratios(rows)
    return rows


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _short_summary(row: dict) -> str:
    return ", ".join(f"{k} {row[k]:.1f}" for k in ("vision_ms", "prefill_ms", "ttft_ms", "decode_ms_b1", "e2e_long_ms"))


def summarize(runs: list[dict], batched_windows: list[float], settings: dict, facts: ModelFacts, args) -> dict:
    """Medians of the timed numbers plus the derived throughputs."""
    first = runs[0]
    row = {key: _median(run.get(key) for run in runs) for key in TIMED_KEYS}
    row["decode_ms_b8"] = _median(batched_windows)
    for key in ("prompt_tokens", "visual_tokens", "video_tokens", "kv_recomputations_b1", "kv_active_image_tokens"):
        row[key] = first[key]
    row["prefill_tflops"] = prefill_flops(facts, row["prompt_tokens"]) / (row["prefill_ms"] * 1e-3) / 1e12
    shape = (row["prompt_tokens"], row["video_tokens"])
    b1 = decode_bytes_per_step(facts, settings, *shape, decoded_before=0, steps=args.decode_steps, batch=1)
    b8 = decode_bytes_per_step(facts, settings, *shape, decoded_before=args.warmup * args.decode_steps,
                               steps=args.runs * args.decode_steps, batch=DECODE_BATCH)
    row["decode_gbs"] = row["decode_gbs_b1"] = b1 / (row["decode_ms_b1"] * 1e-3) / 1e9
    row["decode_gbs_b8"] = b8 / (row["decode_ms_b8"] * 1e-3) / 1e9
    row["runs"] = runs
    row["decode_ms_b8_windows"] = batched_windows
    return row


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def prefill_flops(facts: ModelFacts, tokens: int) -> float:
    """2 * P * T for the matmuls of the decoder layers + causal attention 2 * layers * T^2 * heads * head_dim."""
    attention = 2 * facts.num_layers * tokens**2 * facts.num_heads * facts.head_dim
    return 2 * facts.layer_params * tokens + attention


def decode_bytes_per_step(facts: ModelFacts, settings: dict, prompt_tokens: int, video_tokens: int, *,
                          decoded_before: int, steps: int, batch: int) -> float:
    """Weights (decoder layers + lm_head) + the K/V entries the attention reads, at the loop's mean context."""
    context = prompt_tokens + decoded_before + (steps + 1) / 2
    layers_full, layers_pruned, pruned = facts.num_layers, 0, 0
    if settings.get("compressor") == "dycoke" and settings.get("dycoke_p", 0) > 0:
        layers_full = settings["dycoke_l"]
        layers_pruned = facts.num_layers - layers_full
        pruned = video_tokens - int(video_tokens * (1 - settings["dycoke_p"]))
    token_layers = layers_full * context + layers_pruned * (context - pruned)
    kv_bytes = 2 * facts.num_kv_heads * facts.head_dim * facts.element_bytes * token_layers * batch
    return facts.layer_bytes + facts.head_bytes + kv_bytes


def add_ratios(rows: dict) -> None:
    base = rows.get("baseline")
    pairs = (("ttft_ratio", "ttft_ms"), ("e2e_short_ratio", "e2e_short_ms"), ("e2e_long_ratio", "e2e_long_ms"),
             ("memory_ratio", "peak_memory_mib"))
    for row in rows.values():
        for ratio, key in pairs:
            ok = base is not None and row[key] is not None and base[key]
            row[ratio] = row[key] / base[key] if ok else None


# ---- targets -------------------------------------------------------------------------------------------------


def target_lines(config_name: str, results: dict) -> list[str]:
    """DyCoke's targets on ov-7b CUDA: TTFT <= 0.6x, decode b1 not slower and b8 faster, memory <= 0.72x (eager)."""
    lines = []
    scope = "" if config_name == "ov-7b" else f" (targets are set for ov-7b on CUDA; {config_name} shown for reference)"
    for attn, rows in results.items():
        base, dycoke = rows.get("baseline"), rows.get("dycoke")
        if base is None or dycoke is None:
            lines.append(f"{attn}: targets need the baseline and dycoke methods; not evaluated")
            continue
        checks = [
            ("TTFT", dycoke["ttft_ratio"], "<= 0.60x baseline", lambda r: r <= 0.6),
            ("decode step b1", _ratio(dycoke, base, "decode_ms_b1"), "<= 1.00x baseline (not slower)", lambda r: r <= 1.0),
            ("decode step b8", _ratio(dycoke, base, "decode_ms_b8"), "< 1.00x baseline (faster)", lambda r: r < 1.0),
        ]
        if attn == "eager":
            checks.append(("peak memory", dycoke["memory_ratio"], "<= 0.72x baseline", lambda r: r <= 0.72))
        ttm = rows.get("dycoke-ttm")
        if ttm is not None:  # the KV pruning's own effect: DyCoke vs its token merging alone
            checks.append(("decode step b1 vs dycoke-ttm", _ratio(dycoke, ttm, "decode_ms_b1"), "<= 1.00x", lambda r: r <= 1.0))
            checks.append(("decode step b8 vs dycoke-ttm", _ratio(dycoke, ttm, "decode_ms_b8"), "< 1.00x", lambda r: r < 1.0))
        for name, ratio, wanted, passes in checks:
            verdict = "n/a" if ratio is None else ("target met" if passes(ratio) else "target not met")
            shown = "n/a" if ratio is None else f"{ratio:.2f}x"
            lines.append(f"{attn}: DyCoke {name} {shown} (want {wanted}): {verdict}{scope}")
    return lines


def _ratio(row: dict, reference: dict, key: str) -> float | None:
    if row[key] is None or not reference[key]:
        return None
    return row[key] / reference[key]


# ---- output --------------------------------------------------------------------------------------------------


def markdown_table(rows: dict, short_tokens: int, long_tokens: int) -> str:
    header = ["method", "visual tokens", "vision ms", "prefill ms", "TTFT ms", "decode ms/step b1",
              "decode ms/step b8", f"e2e {short_tokens} tok ms", f"e2e {long_tokens} tok ms",
              "peak memory MiB", "prefill TFLOP/s", "decode GB/s", "TTFT x", f"e2e {short_tokens} x",
              f"e2e {long_tokens} x", "memory x"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for method, row in rows.items():
        cells = [method, str(row["visual_tokens"])]
        cells += [_fmt(row[key], 1) for key in ("vision_ms", "prefill_ms", "ttft_ms", "decode_ms_b1", "decode_ms_b8",
                                               "e2e_short_ms", "e2e_long_ms", "peak_memory_mib")]
        cells += [_fmt(row["prefill_tflops"], 3), _fmt(row["decode_gbs"], 2)]
        cells += [_fmt(row[key], 2, "x") for key in ("ttft_ratio", "e2e_short_ratio", "e2e_long_ratio", "memory_ratio")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value, digits: int, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{suffix}"


def write_figures(report: dict, folder: Path) -> list[str]:
    """Bar charts per method (one bar per attention backend): latency, and peak memory."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("warning: matplotlib is not installed (pip install matplotlib): no figures written", file=sys.stderr)
        return []
    folder.mkdir(parents=True, exist_ok=True)
    name, results = report["config"], report["results"]
    latency_panels = [("ttft_ms", "time to first token (ms)"), ("decode_ms_b1", "decode ms/step, batch 1"),
                      ("decode_ms_b8", "decode ms/step, batch 8"),
                      ("e2e_long_ms", f"generate {report['long_tokens']} tokens (ms)")]
    memory_panels = [("peak_memory_mib", "peak memory (MiB)"), ("visual_tokens", "visual tokens")]
    paths = []
    for suffix, panels in (("latency", latency_panels), ("memory", memory_panels)):
        figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
        for axis, (key, title) in zip(axes[0], panels):
            _grouped_bars(axis, results, key, title)
        figure.suptitle(f"{name} ({report['device']}, {report['dtype']}, {report['frames']} frames)")
        figure.tight_layout()
        path = folder / f"benchmark-{name}-{suffix}.png"
        figure.savefig(path, dpi=120)
        plt.close(figure)
        paths.append(str(path))
    return paths


def _grouped_bars(axis, results: dict, key: str, title: str) -> None:
    backends = list(results)
    methods = list(next(iter(results.values())))
    width = 0.8 / max(len(backends), 1)
    for index, attn in enumerate(backends):
        values = [results[attn][m][key] or 0 for m in methods]
        positions = [i + (index - (len(backends) - 1) / 2) * width for i in range(len(methods))]
        axis.bar(positions, values, width, label=attn)
    axis.set_xticks(range(len(methods)), methods)
    axis.set_title(title, fontsize=10)
    axis.legend(fontsize=8)


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
    if args.threads:
        torch.set_num_threads(args.threads)
    config = CONFIGS[args.config]
    say(f"Building {args.config}: {config.description} ({args.device}, {args.dtype}) ...")
    with tempfile.TemporaryDirectory() as workdir:
        bench = build_bench(args, Path(workdir))
        results = {}
        for attn in args.attn:
            say(f"Measuring with attn={attn} ...")
            results[attn] = benchmark_backend(bench, attn, args)
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
        "short_tokens": args.short_tokens,
        "long_tokens": args.long_tokens,
        "methods": {method: METHODS[method] for method in args.methods},
        "columns": list(COLUMNS),
        "memory_metric": memory_metric(args.device),
        "formulas": {
            "prefill_tflops": "(2*P*T + 2*n_layers*T^2*n_heads*head_dim) / prefill_s / 1e12; P = decoder-layer "
                              "parameters, T = spliced prompt tokens (causal attention: QK^T + AV over half of T x T)",
            "decode_gbs": "(decoder-layer + lm_head weight bytes + K/V bytes attended at the loop's mean context, "
                          "times batch for K/V) / step_s / 1e9; DyCoke layers >= L read non-image + active image keys",
        },
        "model": vars(bench.facts),
        "environment": environment(args),
        "results": results,
    }


def print_report(report: dict) -> None:
    for attn, rows in report["results"].items():
        print(f"\n### {report['config']}, attn={attn} ({report['device']}, {report['dtype']}, {report['frames']} frames, "
              f"median of {report['runs']} runs)\n")
        print(markdown_table(rows, report["short_tokens"], report["long_tokens"]))
    print(f"\nPeak memory: {report['memory_metric']}.")
    print(f"Prefill TFLOP/s: {report['formulas']['prefill_tflops']}.")
    print(f"Decode GB/s (batch 1): {report['formulas']['decode_gbs']}.")
    print()
    for line in report["targets"]:
        print(line)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_json:  # e.g. a CUDA run's JSON, drawn on a machine that has matplotlib
        report = json.loads(Path(args.from_json).read_text())
        report["figures"] = write_figures(report, Path(args.figures_dir))
        print_report(report)
        print("\nWrote " + ", ".join(report["figures"]))
        return 0
    report = run_benchmark(args)
    report["targets"] = target_lines(args.config, report["results"])
    report["figures"] = write_figures(report, Path(args.figures_dir))
    write_json(report, Path(args.out))
    print_report(report)
    print(f"\nWrote {args.out}" + "".join(f", {p}" for p in report["figures"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
