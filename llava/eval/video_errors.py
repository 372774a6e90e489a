"""Videos the stock lmms-eval wrappers cannot read: never answered silently.

The stock wrappers catch any error while reading a sample's video and go on: ``llava_onevision`` answers the
question without the video, ``llava_vid`` answers with the text "Video ... can not load, check the source";
both answers are then scored like any other. With the model arg ``on_video_error=warn`` (the default) that
answer is kept, but each such sample is warned about (task, doc id, file, error), listed in a per-run file
next to lmms-eval's outputs (``video_errors_<model>_<time>.jsonl`` in ``--output_path``: lmms-eval's own
samples file keeps only fixed fields, so it cannot carry a mark) and counted in a summary when generation
ends. With ``on_video_error=fail`` the first unreadable video stops the run with a ``VideoReadError``.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from loguru import logger  # lmms-eval's logger: shown at its --verbosity

POLICIES = ("warn", "fail")


@dataclass
class VideoFailure:
    task: str
    doc_id: int
    video: str
    error: str

    def describe(self) -> str:
        return f"task {self.task}, doc {self.doc_id}: {self.video} ({self.error})"


class VideoReadError(RuntimeError):
    """A sample's video cannot be read and ``on_video_error=fail`` was asked."""


class _StopAtVideoError(BaseException):
    """Carries a failure out of the stock wrapper, whose ``except Exception`` would swallow a normal error."""

    def __init__(self, failure: VideoFailure):
        super().__init__(failure.describe())
        self.failure = failure


def check_policy(model: str, policy: str) -> str:
    if policy not in POLICIES:
        raise ValueError(f"--model {model}: on_video_error={policy!r} is not valid; allowed: {', '.join(POLICIES)}.")
    return policy


def cli_output_path(argv: list[str]) -> Path | None:
    """lmms-eval's ``--output_path`` in this process's command line, if any."""
    for index, arg in enumerate(argv):
        if arg == "--output_path" and index + 1 < len(argv):
            return Path(argv[index + 1])
        if arg.startswith("--output_path="):
            return Path(arg.split("=", 1)[1])
    return None


def report_file(model: str, rank: int, world_size: int, argv: list[str] | None = None) -> Path | None:
    """Where this run lists its unreadable videos: next to lmms-eval's outputs, one file per run and process."""
    output = cli_output_path(sys.argv if argv is None else argv)
    if output is None:
        return None
    process = f"_rank{rank}" if world_size > 1 else ""
    return output / f"video_errors_{model}_{time.strftime('%Y%m%d_%H%M%S')}{process}.jsonl"


class VideoErrorWatch:
    """Knows which sample the stock wrapper is on, and records the videos it fails to read."""

    def __init__(self, model: str, policy: str, fallback: str, report: Path | None = None):
        self.model = model
        self.policy = check_policy(model, policy)
        self.fallback = fallback  # what the stock wrapper does with such a sample, for the messages
        self.report = report
        self.failures: list[VideoFailure] = []
        self._current: tuple[str, int] | None = None  # (task, doc id) of the sample being processed
        self._active = False  # only generate_until is watched

    def follow(self, requests: list) -> list:
        """Copies of ``requests`` whose ``doc_to_visual`` first notes which sample is being processed.

        The stock wrappers call ``doc_to_visual`` once per sample, right before reading its video.
        """
        followed = []
        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, *rest = request.arguments
            noted = self._noting_sample(doc_to_visual, task, doc_id)
            followed.append(dataclasses.replace(request, arguments=(context, gen_kwargs, noted, doc_id, task, *rest)))
        return followed

    @contextmanager
    def reading(self, video):
        """Around one of the stock wrapper's own video reads: a failure is recorded, then re-raised."""
        try:
            yield
        except Exception as error:
            if self._active:
                self.record(_first_path(video), f"{type(error).__name__}: {error}")
            raise

    def record(self, video: str, error: str, sample: tuple[str, int] | None = None) -> None:
        task, doc_id = sample or self._current or ("?", -1)
        failure = VideoFailure(task, doc_id, video, " ".join(error.split()))
        self.failures.append(failure)
        if self.policy == "fail":
            raise _StopAtVideoError(failure)
        logger.warning(
            f"{self.model}: cannot read the video of {failure.describe()}; the sample is {self.fallback} "
            "(on_video_error=warn; pass on_video_error=fail to stop the run instead)."
        )

    @contextmanager
    def watching(self, requests: list, stock_module):
        """One ``generate_until`` call: follow the samples, watch the stock module's ``read_video`` (pyav
        backend), turn a stop into a ``VideoReadError``, then report this call's failures."""
        before = len(self.failures)
        self._active = True
        try:
            with self._watching_function(stock_module, "read_video"):
                yield self.follow(requests)
        except _StopAtVideoError as stop:
            raise VideoReadError(
                f"{self.model}: cannot read the video of {stop.failure.describe()}. The run stops because "
                "on_video_error=fail: fix or replace the file, or pass on_video_error=warn to go on (such samples are "
                f"then {self.fallback}, warned about and counted)."
            ) from None
        finally:
            self._active = False
            self._current = None
        self._report(len(requests), self.failures[before:])

    def _report(self, num_samples: int, failures: list[VideoFailure]) -> None:
        if not failures:
            return
        where = ""
        if self.report is not None:
            self.report.parent.mkdir(parents=True, exist_ok=True)
            with open(self.report, "a", encoding="utf-8") as f:
                for failure in failures:
                    f.write(json.dumps({"model": self.model, **dataclasses.asdict(failure)}) + "\n")
            where = f", listed in {self.report}"
        logger.warning(
            f"{self.model}: {len(failures)} of {num_samples} sample(s) had a video that could not be read; they were "
            f"{self.fallback} and scored as such{where}: " + "; ".join(failure.describe() for failure in failures)
        )

    def _noting_sample(self, doc_to_visual, task: str, doc_id: int):
        def noted(doc):
            self._current = (task, doc_id)
            return doc_to_visual(doc)

        return noted

    @contextmanager
    def _watching_function(self, module, name: str):
        original = getattr(module, name, None)
        if original is None:
            yield
            return

        def watched(video, *args, **kwargs):
            with self.reading(video):
                return original(video, *args, **kwargs)

        setattr(module, name, watched)
        try:
            yield
        finally:
            setattr(module, name, original)


class WatchesVideoErrors:
    """Mixin for a stock lmms-eval wrapper, listed before it: its video reads and answers are watched.

    Subclasses set ``stock_module`` (the stock wrapper's module), ``video_fallback`` (what the stock wrapper
    does with a sample whose video fails) and, if the stock wrapper answers such a sample with a fixed text,
    ``failure_answer`` (a regex with a ``video`` group) to catch failures outside its ``load_video``.
    """

    stock_module = None
    video_fallback = "answered without its video"
    failure_answer: re.Pattern | None = None
    video_errors: VideoErrorWatch

    def watch_video_errors(self, model: str, policy: str) -> None:
        report = report_file(model, getattr(self, "rank", 0), getattr(self, "world_size", 1))
        self.video_errors = VideoErrorWatch(model, policy, self.video_fallback, report)

    def load_video(self, video_path, *args, **kwargs):
        with self.video_errors.reading(video_path):
            return super().load_video(video_path, *args, **kwargs)

    def generate_until(self, requests):
        with self.video_errors.watching(requests, self.stock_module) as followed:
            answers = super().generate_until(followed)
            self._record_failure_answers(requests, answers)
        return answers

    def _record_failure_answers(self, requests: list, answers: list) -> None:
        """Failures the stock wrapper met outside ``load_video`` still show in its fixed answer text."""
        if self.failure_answer is None:
            return
        recorded = {(failure.task, failure.doc_id) for failure in self.video_errors.failures}
        for request, answer in zip(requests, answers):
            sample = (request.task_name, request.doc_id)
            match = self.failure_answer.fullmatch(answer) if isinstance(answer, str) else None
            if match and sample not in recorded:
                self.video_errors.record(match["video"], "the stock wrapper could not load it (see its log)", sample)


def _first_path(video) -> str:
    """The stock wrappers pass a path, or a list holding the path."""
    if isinstance(video, (list, tuple)) and video:
        return str(video[0])
    return str(video)
