"""A tiny offline lmms-eval video task, to smoke-test the plugin and ``eval.sh`` without downloading a dataset.

    python -m llava.eval.smoke_task FOLDER [--videos 2] [--broken 0] [--task llava_smoke_videoqa]

writes, under FOLDER, short synthetic videos (a red square moving over a gradient), the question/answer rows
as local json, the task yaml and its ``utils.py``. Pass FOLDER to lmms-eval as ``--include_path`` (``INCLUDE_PATH``
for eval.sh) and the task name as ``--tasks``. ``--broken N`` makes the last N videos unreadable (cut short, as
by an interrupted download), to see how a run reports them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llava.video import make_sample_video

TASK_NAME = "llava_smoke_videoqa"
QUESTION = "What color is the moving square?"
ANSWER = "red"

TASK_UTILS = '''
def doc_to_visual(doc):
    return [doc["video"]]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"exact_match": float(results[0].strip().lower() == doc["answer"].lower())}
'''

TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
process_results: !function utils.process_results
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  do_sample: false
metric_list:
{metrics}metadata:
  version: 0.0
"""
EXACT_MATCH = "  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"


def task_yaml(task: str, data: Path, max_new_tokens: int, metrics: str = EXACT_MATCH) -> str:
    """The yaml of a generate-until video task over local json rows (``video``, ``question``, ``answer``) whose
    ``utils.py`` defines ``doc_to_visual``, ``doc_to_text`` and ``process_results``; ``metrics``: the
    ``metric_list`` entries."""
    return TASK_YAML.format(task=task, data=data, max_new_tokens=max_new_tokens, metrics=metrics)


def cut_short(video: Path) -> None:
    """Keep the first third of the file: the container's index is lost, so no decoder can open it."""
    data = video.read_bytes()
    video.write_bytes(data[: len(data) // 3])


def make_smoke_task(folder: str | Path, task: str = TASK_NAME, videos: int = 2, broken: int = 0) -> Path:
    """Write the task (several tasks can share one folder) and return the folder, for ``--include_path``."""
    if not 0 <= broken <= videos:
        raise ValueError(f"broken={broken} must be between 0 and videos={videos}.")
    folder = Path(folder).resolve()
    rows = []
    for index in range(videos):
        video = make_sample_video(folder / "videos" / f"{task}-{index}.mp4", num_frames=12 + 4 * index, size=(112, 160))
        if index >= videos - broken:
            cut_short(video)
        rows.append({"id": index, "video": str(video), "question": QUESTION, "answer": ANSWER})
    data = folder / f"{task}.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "utils.py").write_text(TASK_UTILS)
    (folder / f"{task}.yaml").write_text(task_yaml(task, data, max_new_tokens=3))
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="where to write the task (lmms-eval --include_path / eval.sh INCLUDE_PATH)")
    parser.add_argument("--task", default=TASK_NAME, help=f"task name (default {TASK_NAME})")
    parser.add_argument("--videos", type=int, default=2, help="number of samples (default 2)")
    parser.add_argument("--broken", type=int, default=0, help="how many of them get an unreadable video (default 0)")
    args = parser.parse_args(argv)
    folder = make_smoke_task(args.folder, args.task, args.videos, args.broken)
    print(f"Task {args.task} ({args.videos} videos, {args.broken} unreadable) written to {folder}")


if __name__ == "__main__":
    main()
