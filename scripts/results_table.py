#!/usr/bin/env python
"""Print one markdown table (task x setting, plus wall time per run) from lmms-eval result files.

    python scripts/results_table.py logs/eval            # what eval.sh writes
    python scripts/results_table.py logs/eval --settings baseline,dycoke

Layout read (eval.sh writes it): ``ROOT/<setting>/<task>/`` is one run's lmms-eval ``--output_path``;
lmms-eval 0.7 puts ``<model>/<date>_results.json`` (and, with ``--log_samples``, ``<date>_samples_<task>.jsonl``)
under it, and eval.sh adds ``wall_time_s`` (seconds the whole ``accelerate launch`` took). The setting is the
first folder below ROOT, so any run whose ``--output_path`` is ``ROOT/<setting>/...`` is picked up. Without a
``wall_time_s`` the time shown is lmms-eval's own ``total_evaluation_time_seconds`` (model loading excluded),
marked ``*``. When a task was run more than once in a setting, the newest result file counts.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

WALL_TIME_FILE = "wall_time_s"


@dataclass
class Run:
    setting: str
    task: str
    metrics: dict[str, float]
    seconds: float | None
    from_lmms_eval_timer: bool
    source: Path


def metric_values(task_result: dict) -> dict[str, float]:
    """``{"exact_match": 0.5}`` from ``{"exact_match,none": 0.5, "exact_match_stderr,none": 0.1, "alias": ..}``."""
    values = {}
    for key, value in task_result.items():
        name, _, filter_name = key.partition(",")
        if "_stderr" in name or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        values[name if filter_name in ("", "none") else f"{name} ({filter_name})"] = float(value)
    return values


def wall_time(result_file: Path, setting_dir: Path) -> float | None:
    for folder in result_file.parents:
        if (folder / WALL_TIME_FILE).is_file():
            return float((folder / WALL_TIME_FILE).read_text().strip())
        if folder == setting_dir:
            return None
    return None


def read_runs(root: Path) -> list[Run]:
    latest: dict[tuple[str, str], Run] = {}
    # lmms-eval names the files <date>_results.json; sorting by name puts the newest last.
    for result_file in sorted(root.rglob("*_results.json"), key=lambda p: p.name):
        relative = result_file.relative_to(root)
        if len(relative.parts) < 3:  # ROOT/<model>/<date>_results.json: no setting folder
            print(f"results_table: skipping {result_file}: not under ROOT/<setting>/", file=sys.stderr)
            continue
        setting = relative.parts[0]
        data = json.loads(result_file.read_text())
        seconds = wall_time(result_file, root / setting)
        timer = seconds is None
        if timer and data.get("total_evaluation_time_seconds") is not None:
            seconds = float(data["total_evaluation_time_seconds"])
        for task, task_result in data.get("results", {}).items():
            latest[(setting, task)] = Run(setting, task, metric_values(task_result), seconds, timer, result_file)
    return list(latest.values())


def format_seconds(seconds: float | None, from_timer: bool) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    text = f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
    return text + ("*" if from_timer else "")


def order_settings(runs: list[Run], wanted: list[str] | None) -> list[str]:
    present = sorted({run.setting for run in runs}, key=lambda s: (s != "baseline", s))
    return wanted or present


def render(runs: list[Run], settings: list[str]) -> str:
    by_key = {(run.setting, run.task): run for run in runs}
    tasks = sorted({run.task for run in runs})
    header = ["task", "metric", *settings, *(f"{s} time" for s in settings)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (2 * len(settings))) + "|"]
    for task in tasks:
        task_runs = [by_key.get((setting, task)) for setting in settings]
        metrics = sorted({name for run in task_runs if run for name in run.metrics}) or ["-"]
        times = [format_seconds(run.seconds, run.from_lmms_eval_timer) if run else "-" for run in task_runs]
        for metric in metrics:
            cells = [f"{run.metrics[metric]:.4g}" if run and metric in run.metrics else "-" for run in task_runs]
            lines.append("| " + " | ".join([task, metric, *cells, *times]) + " |")
    table = "\n".join(lines)
    if any(run.from_lmms_eval_timer for run in runs):
        table += "\n\n\\* lmms-eval's own evaluation time (no wall_time_s file; model loading not included)."
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="folder holding <setting>/<task>/ run folders (eval.sh's OUTPUT)")
    parser.add_argument("--settings", help="comma-separated column order, e.g. baseline,dycoke (default: all found)")
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        parser.error(f"{args.root} is not a folder")
    runs = read_runs(args.root)
    if not runs:
        print(f"results_table: no *_results.json under {args.root}/<setting>/", file=sys.stderr)
        return 1
    settings = order_settings(runs, args.settings.split(",") if args.settings else None)
    print(render([run for run in runs if run.setting in settings], settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
