"""Timing and memory of one ``generate`` call: visual encoding, prefill (time to first token), decode steps.

Used by the command-line tool and the benchmark. ``GenerationTimer`` is a transformers streamer: generate
calls ``put`` once with the prompt and once per new token, which gives a timestamp per token. A streamer
copies each token to the host, so it is for measurement, not for the default path. The intervals between
consecutive tokens are the decoding steps (``GenerationTiming.step_seconds``; their median is robust to a step
disturbed by something else running on the machine).
"""

from __future__ import annotations

import itertools
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers.generation.streamers import BaseStreamer


def synchronize(device: torch.device | str | None = None) -> None:
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


class GenerationTimer(BaseStreamer):
    """Timestamps every token generate emits (the prompt's ``put`` is skipped)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.token_times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True  # the first put is the prompt (empty when generate got embeddings)
            return
        self.token_times.append(time.perf_counter())

    def end(self) -> None:
        pass


@dataclass
class GenerationTiming:
    """Seconds, and bytes of peak accelerator memory (None on CPU)."""

    vision_s: float
    time_to_first_token_s: float
    decode_s_per_token: float | None
    total_s: float
    new_tokens: int
    peak_memory_bytes: int | None = None
    step_seconds: list[float] = field(default_factory=list)  # intervals between consecutive new tokens
    extra: dict = field(default_factory=dict)

    @property
    def median_step_s(self) -> float | None:
        """Median decoding step: the median interval between consecutive tokens (None with fewer than 2 tokens)."""
        return statistics.median(self.step_seconds) if self.step_seconds else None

    @property
    def prefill_s(self) -> float:
        """Time to first token minus visual encoding: the LM prefill (plus the first sampling step)."""
        return max(self.time_to_first_token_s - self.vision_s, 0.0)


@contextmanager
def peak_memory(device: torch.device | str):
    """Yields a dict that holds ``peak_bytes`` after the block (CUDA only; None elsewhere)."""
    record: dict = {"peak_bytes": None}
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    yield record
    if cuda:
        torch.cuda.synchronize()
        record["peak_bytes"] = torch.cuda.max_memory_allocated()


def timed_generate(model, input_ids, **generate_kwargs) -> tuple[torch.Tensor, GenerationTiming]:
    """Run ``model.generate`` and return its output with a ``GenerationTiming``."""
    device = model.device
    with peak_memory(device) as memory:
        synchronize(device)
        timer = GenerationTimer()
        output = model.generate(input_ids, streamer=timer, **generate_kwargs)
        synchronize(device)
        end = time.perf_counter()
    times = timer.token_times
    first = (times[0] if times else end) - timer.start
    decode = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None
    timing = GenerationTiming(
        vision_s=model.last_vision_seconds,
        time_to_first_token_s=first,
        decode_s_per_token=decode,
        total_s=end - timer.start,
        new_tokens=len(times),
        peak_memory_bytes=memory["peak_bytes"],
        step_seconds=[later - earlier for earlier, later in itertools.pairwise(times)],
    )
    return output, timing
