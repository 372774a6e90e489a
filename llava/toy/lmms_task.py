"""The ``llava_toy_videoqa`` lmms-eval task: the toy model's held-out clips as mp4 files, scored by exact match,
with the accuracy of each question family as its own metric.

    python -m llava.toy.lmms_task FOLDER [--per-family 100] [--seed 1000003]

writes, under FOLDER, the held-out clips of :func:`llava.toy.videoqa.make_dataset` as mp4 files, their rows as local
json (``video``, ``question``, ``answer``, ``family``), the task yaml and its ``utils.py``. Run it with the stock CLI::

    python -m lmms_eval --model llava_onevision \\
        --model_args pretrained=$(python -c "import llava.toy as t; print(t.TOY_CHECKPOINT)"),conv_template=qwen_1_5,model_name=llava_qwen,max_frames_num=8,device=cpu \\
        --tasks llava_toy_videoqa --include_path FOLDER --batch_size 1

``scripts/accuracy.py`` reads the same folder (the same decoded frames, the same prompt): both give the same numbers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llava.eval.smoke_task import task_yaml
from llava.toy.qa import MAX_NEW_TOKENS
from llava.toy.videoqa import FAMILIES, HELD_OUT_SEED, make_dataset, write_mp4

TASK_NAME = "llava_toy_videoqa"
DATA_FILE = f"{TASK_NAME}.jsonl"

TASK_UTILS = '''"""Written by llava.toy.lmms_task: exact-match scoring, and one accuracy per question family."""

FAMILIES = {families!r}


def doc_to_visual(doc):
    return [doc["video"]]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    correct = float(results[0].strip() == doc["answer"])
    scored = {{"family": doc["family"], "correct": correct}}
    return {{"accuracy": correct, **{{family: scored for family in FAMILIES}}}}


def _family_accuracy(family):
    def aggregate(items):
        scores = [item["correct"] for item in items if item["family"] == family]
        return sum(scores) / len(scores) if scores else float("nan")

    return aggregate


{aggregations}
'''

def read_task_rows(folder: str | Path) -> list[dict]:
    """The rows a task folder holds (as written by :func:`make_toy_task`), in order."""
    data = Path(folder) / DATA_FILE
    if not data.is_file():
        raise FileNotFoundError(f"{data} not found: write the task first (python -m llava.toy.lmms_task {folder}).")
    return [json.loads(line) for line in data.read_text().splitlines() if line.strip()]


def make_toy_task(folder: str | Path, per_family: int = 100, seed: int = HELD_OUT_SEED) -> Path:
    """Write the task (clips, rows, yaml, utils) into ``folder`` and return it (absolute), for ``--include_path``."""
    if per_family < 1:
        raise ValueError(f"per_family must be >= 1, got {per_family}.")
    folder = Path(folder).resolve()
    rows = []
    for index, sample in enumerate(make_dataset(seed, per_family)):
        video = write_mp4(sample, folder / "videos" / f"{index:05d}-{sample.family}.mp4")
        rows.append({"id": index, "family": sample.family, "video": str(video), "question": sample.question,
                     "answer": sample.answer, "key": list(sample.key)})
    (folder / DATA_FILE).write_text("".join(json.dumps(row) + "\n" for row in rows))
    aggregations = "\n".join(f"{family}_accuracy = _family_accuracy({family!r})" for family in FAMILIES)
    (folder / "utils.py").write_text(TASK_UTILS.format(families=FAMILIES, aggregations=aggregations))
    metrics = "  - metric: accuracy\n    aggregation: mean\n    higher_is_better: true\n" + "".join(
        f"  - metric: {family}\n    aggregation: !function utils.{family}_accuracy\n    higher_is_better: true\n"
        for family in FAMILIES)
    (folder / f"{TASK_NAME}.yaml").write_text(task_yaml(TASK_NAME, folder / DATA_FILE, MAX_NEW_TOKENS, metrics))
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="where to write the task (lmms-eval --include_path)")
    parser.add_argument("--per-family", type=int, default=100, help="clips per question family (default: 100)")
    parser.add_argument("--seed", type=int, default=HELD_OUT_SEED, help=f"the clips' seed (default: {HELD_OUT_SEED})")
    args = parser.parse_args(argv)
    folder = make_toy_task(args.folder, args.per_family, args.seed)
    print(f"Task {TASK_NAME} ({args.per_family} clips x {len(FAMILIES)} families) written to {folder}")


if __name__ == "__main__":
    main()
