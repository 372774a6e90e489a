"""Decode-step time of a Qwen2 decoder with and without DyCoke's dynamic KV pruning, on random weights.

    python scripts/bench_decode_step.py                                  # both geometries, batch 1 and 8, CPU
    python scripts/bench_decode_step.py --geometry small --batch 1 --reps 61
    python scripts/bench_decode_step.py --device cuda --dtype bfloat16 --path auto masked compact

For each geometry, batch size and regime it times single decoding steps of ``Qwen2Model`` (no lm_head) over a
``DynamicCache`` that holds a LLaVA-shaped prompt ([system | image tokens | question]), with pruning off ("full")
and with :mod:`llava.compression.dycoke_kv` installed, interleaved repetition by repetition. The regimes:

- ``recompute``: threshold 2.0, so the active set is recomputed at every step (what random weights do);
- ``reuse``: threshold -1.0, so the active set chosen at the first step is kept at every later step (what real
  models mostly do).

``--path`` picks how steps that keep the active set attend: ``auto`` (the module's default, by size), ``masked``
(full cache with a mask) or ``compact`` (the compact copy); several values are measured side by side.

The prompt's K/V are random (the prefill is not what is measured, and a 7B-sized prefill would take minutes on a
CPU); the pruning state is bound to that prompt the way a prefill forward binds it. Every repetition restarts from
the prompt-only cache, so all variants decode the same positions. Reported per variant: the first decoding step
(it always chooses the active set) and the later steps (median over steps, then median and minimum over
repetitions), and the median over repetitions of the paired ratio pruned / full of the later steps. On a noisy
machine, trust the paired ratio with many repetitions.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache, Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2Model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llava.compression.dycoke_kv import DyCokeKVPruning, install_dycoke_kv_pruning, remove_dycoke_kv_pruning  # noqa: E402

GEOMETRIES = {
    # cpu-small's language model: hidden 256, 8 layers, 8 heads / 2 KV heads; ~800 image tokens after TTM;
    # dycoke_l = 3 (the default): layers 0-1 plain, 2 decides, 3-7 pruned.
    "small": dict(
        config=dict(hidden_size=256, intermediate_size=768, num_hidden_layers=8, num_attention_heads=8,
                    num_key_value_heads=2),
        layer=3, system=14, images=800, question=70,
    ),
    # A slice of LLaVA-OV-7B's language model: hidden 3584, MLP 18944, 28 heads / 4 KV heads x 128; 3 layers
    # (layer 0 decides, 1-2 pruned); ~4000 image tokens after TTM.
    "7b-slice": dict(
        config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=3, num_attention_heads=28,
                    num_key_value_heads=4),
        layer=1, system=14, images=4000, question=70,
    ),
}
REGIMES = {"recompute": 2.0, "reuse": -1.0}
PATHS = {"auto": None, "masked": math.inf, "compact": 0}


def build(geometry: dict, device: str, dtype: torch.dtype, seed: int = 0) -> Qwen2Model:
    config = Qwen2Config(vocab_size=1024, max_position_embeddings=32768, **geometry["config"])
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return Qwen2Model(config).to(device=device, dtype=dtype).eval()


def prompt_cache(model: Qwen2Model, geometry: dict, batch: int, seed: int = 0):
    """Random K/V for the prompt in every layer, and the image-token mask of the prompt."""
    config, parameter = model.config, next(model.parameters())
    length = geometry["system"] + geometry["images"] + geometry["question"]
    head_dim = config.hidden_size // config.num_attention_heads
    generator = torch.Generator().manual_seed(seed)
    states = [
        tuple(
            torch.randn(batch, config.num_key_value_heads, length, head_dim, generator=generator).to(parameter)
            for _ in "kv"
        )
        for _ in range(config.num_hidden_layers)
    ]
    prunable = torch.zeros(batch, length, dtype=torch.bool)
    prunable[:, geometry["system"] : geometry["system"] + geometry["images"]] = True
    return states, prunable


def fresh_cache(model: Qwen2Model, states) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    for index, (keys, values) in enumerate(states):
        cache.update(keys, values, index)
    return cache


def bind_prefill(pruning: DyCokeKVPruning, prunable: torch.Tensor, parameter: torch.Tensor) -> None:
    """What the prefill forward does to the pruning state, without running a prefill."""
    pruning.start(prunable)
    probe = torch.empty(*prunable.shape, 1, device=parameter.device, dtype=parameter.dtype)
    pruning._follow_sequence(0, probe)  # the decision layer's call at a prefill (cached length 0)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def decode(model: Qwen2Model, cache: DynamicCache, batch: int, steps: int, prompt_length: int) -> list[float]:
    """Seconds of each of ``steps`` decoding steps (2D all-ones mask grown each step, as generate does)."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(1)
    mask = torch.ones(batch, prompt_length, dtype=torch.long, device=device)
    times = []
    for _ in range(steps):
        mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        token = torch.randint(0, model.config.vocab_size, (batch, 1), generator=generator).to(device)
        _synchronize(device)
        start = time.perf_counter()
        model(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True)
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def measure(model, geometry, batch: int, regime: str, paths: list[str], reps: int, steps: int, ratio: float) -> dict:
    parameter = next(model.parameters())
    states, prunable = prompt_cache(model, geometry, batch)
    length = prunable.shape[1]
    variants = ["full", *paths]
    runs = {variant: [] for variant in variants}
    for rep in range(reps + 1):  # the first repetition warms up and is dropped
        shift = rep % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            pruning = None
            if variant != "full":
                pruning = DyCokeKVPruning(geometry["layer"], ratio, threshold=REGIMES[regime])
                if PATHS[variant] is not None:
                    pruning.compact_min_bytes = PATHS[variant]
                install_dycoke_kv_pruning(model, pruning)
                bind_prefill(pruning, prunable, parameter)
            try:
                times = decode(model, fresh_cache(model, states), batch, steps, length)
            finally:
                remove_dycoke_kv_pruning(model)
            if pruning is not None:
                recomputes = pruning.stats["recomputations"][0]
                assert recomputes == (steps if regime == "recompute" else 1), (regime, recomputes)
            if rep:
                runs[variant].append(times)
    result = {}
    for variant, reps_times in runs.items():
        later = [statistics.median(times[1:]) for times in reps_times]
        result[variant] = {
            "first_ms": 1e3 * statistics.median(times[0] for times in reps_times),
            "later_ms": 1e3 * statistics.median(later),
            "later_min_ms": 1e3 * min(later),
            # Paired: each repetition's window against the full window run next to it.
            "ratio": statistics.median(
                statistics.median(times[1:]) / statistics.median(full[1:])
                for times, full in zip(reps_times, runs["full"])
            ),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--geometry", nargs="+", default=list(GEOMETRIES), choices=list(GEOMETRIES))
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--regime", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    parser.add_argument("--path", nargs="+", default=["auto"], choices=list(PATHS))
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--steps", type=int, default=6, help="decoding steps per repetition (the first is reported apart)")
    parser.add_argument("--ratio", type=float, default=0.7, help="dycoke_p")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    print(f"torch {torch.__version__}, {args.device} {args.dtype}, {args.threads} thread(s), p={args.ratio}, "
          f"{args.reps} reps x {args.steps} steps")
    print("ms per decoding step: first step | later steps: median (min) over repetitions | pruned/full: median "
          "paired ratio of the later steps")
    print("| geometry | batch | regime | variant | first | later (min) | pruned/full |")
    print("|---|---|---|---|---|---|---|")
    for name in args.geometry:
        geometry = GEOMETRIES[name]
        model = build(geometry, args.device, dtype)
        for batch in args.batch:
            for regime in args.regime:
                result = measure(model, geometry, batch, regime, args.path, args.reps, args.steps, args.ratio)
                for variant, r in result.items():
                    label = "full" if variant == "full" else f"pruned ({variant})"
                    ratio = "" if variant == "full" else f"{r['ratio']:.3f}"
                    print(f"| {name} | {batch} | {regime} | {label} | {r['first_ms']:.2f} "
                          f"| {r['later_ms']:.2f} ({r['later_min_ms']:.2f}) | {ratio} |", flush=True)
        del model


if __name__ == "__main__":
    main()
