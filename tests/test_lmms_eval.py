"""End to end through the real lmms-eval CLI: this package's plugin, a tiny random checkpoint, a small
offline video task made here, baseline and DyCoke, then the results table.

lmms-eval must be installed (CI installs it with scripts/install.sh): without it these tests fail, never skip.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TASK = "llava_tiny_videoqa"
NUM_SAMPLES = 2
TASK_UTILS = """
def doc_to_visual(doc):
    return [doc["video"]]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"exact_match": float(results[0].strip().lower() == doc["answer"].lower())}
"""


@pytest.fixture(scope="module", autouse=True)
def lmms_eval_installed():
    if importlib.util.find_spec("lmms_eval") is None:
        pytest.fail("lmms-eval is not installed: run `bash scripts/install.sh` (these tests need it).")


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory) -> Path:
    """A task folder for --include_path: local json data (video paths, questions, answers), yaml, utils.py."""
    from llava.video import make_sample_video

    root = tmp_path_factory.mktemp("lmms_task")
    rows = []
    for i in range(NUM_SAMPLES):
        video = make_sample_video(root / "videos" / f"clip{i}.mp4", num_frames=12 + 4 * i, size=(112, 160))
        rows.append({"id": i, "video": str(video), "question": "What color is the moving square?", "answer": "red"})
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    task_dir = root / "tasks"
    task_dir.mkdir()
    (task_dir / "utils.py").write_text(TASK_UTILS)
    (task_dir / f"{TASK}.yaml").write_text(
        f"""task: {TASK}
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
  max_new_tokens: 3
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
"""
    )
    return task_dir


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HOME=str(tmp_path_factory.mktemp("hf_home")),  # dataset cache and accelerate config, isolated
        PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),
        PYTHON=sys.executable,
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def lmms_eval_cli(model: str, model_args: str, task_dir: Path, output: Path, launcher=(sys.executable,)) -> list[str]:
    return [
        *launcher, "-m", "lmms_eval", "--model", model, "--model_args", model_args, "--tasks", TASK,
        "--include_path", str(task_dir), "--batch_size", "1", "--log_samples", "--output_path", str(output),
    ]  # fmt: skip


def run(cmd: list[str], env: dict, timeout: int = 240) -> str:
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(cmd)} exited {done.returncode}:\n{output[-6000:]}"
    return output


def one_file(folder: Path, pattern: str) -> Path:
    found = sorted(folder.rglob(pattern))
    assert len(found) == 1, f"expected one {pattern} under {folder}, found {found}"
    return found[0]


def check_samples(run_dir: Path) -> list[dict]:
    samples = [json.loads(line) for line in one_file(run_dir, f"*_samples_{TASK}.jsonl").read_text().splitlines()]
    assert len(samples) == NUM_SAMPLES
    for sample in samples:
        assert isinstance(sample["filtered_resps"], str)
        assert not sample["filtered_resps"].startswith("Video "), sample  # llava_vid's "can not load" answer
    return samples


def test_plugin_replaces_the_stock_wrappers():
    from lmms_eval.models import get_model

    from llava.eval.llava_onevision import LlavaOneVision
    from llava.eval.llava_vid import LlavaVid

    assert get_model("llava_onevision") is LlavaOneVision
    assert get_model("llava_vid") is LlavaVid


def test_eval_sh_baseline_and_dycoke_through_accelerate_launch(tiny_checkpoint, tiny_task, env, tmp_path):
    """eval.sh: `accelerate launch --num_processes 1 --cpu -m lmms_eval`, both settings, then the table."""
    output = tmp_path / "eval"
    settings = dict(
        MODEL=str(tiny_checkpoint), NUM_GPUS="1", ACCELERATE_ARGS="--cpu", TASKS=TASK, INCLUDE_PATH=str(tiny_task),
        OUTPUT=str(output), EXTRA_MODEL_ARGS="device=cpu,max_frames_num=4", DYCOKE_L="2",
    )  # fmt: skip
    log = run(["bash", "eval.sh"], {**env, **settings}, timeout=300)

    assert "accelerate launch --num_processes=1 --cpu -m lmms_eval" in log
    for setting in ("baseline", "dycoke"):
        run_dir = output / setting / TASK
        one_file(run_dir, "*_results.json")
        check_samples(run_dir)
        assert float((run_dir / "wall_time_s").read_text()) > 0
        run_log = (run_dir / "run.log").read_text()
        assert "in loading video" not in run_log  # the stock wrapper swallows video errors and goes on text-only
        assert ("'compressor': 'dycoke'" in run_log) == (setting == "dycoke")

    table = (output / "results.md").read_text()
    header, _rule, *rows = table.strip().splitlines()
    assert header == "| task | metric | baseline | dycoke | baseline time | dycoke time |"
    (row,) = [r for r in rows if r.startswith(f"| {TASK} |")]
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[1] == "exact_match"
    assert all(cell != "-" for cell in cells), row
    assert table in log  # eval.sh prints it too


def test_python_m_lmms_eval_llava_vid_with_dycoke(tiny_video_checkpoint, tiny_task, env, tmp_path):
    model_args = (
        f"pretrained={tiny_video_checkpoint},conv_template=qwen_1_5,model_name=llava_qwen,device_map=cpu,"
        "max_frames_num=4,dycoke=True,dycoke_l=2"
    )
    log = run(lmms_eval_cli("llava_vid", model_args, tiny_task, tmp_path / "dycoke" / TASK), env)
    assert "'compressor': 'dycoke'" in log
    result = json.loads(one_file(tmp_path / "dycoke", "*_results.json").read_text())
    assert result["results"][TASK]["exact_match,none"] in (0.0, 0.5, 1.0)
    assert "dycoke=True" in result["config"]["model_args"]
    check_samples(tmp_path / "dycoke")

    table = run([sys.executable, "scripts/results_table.py", str(tmp_path)], env)
    assert f"| {TASK} | exact_match |" in table and " dycoke time " in table


def test_unknown_model_arg_is_named_by_the_cli(tiny_checkpoint, tiny_task, env, tmp_path):
    # lmms-eval itself catches the error, prints it and exits 0 (stock behaviour): check the message.
    model_args = f"pretrained={tiny_checkpoint},device=cpu,dycoke=True,foo=1"
    cmd = lmms_eval_cli("llava_onevision", model_args, tiny_task, tmp_path)
    log = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120).stdout
    assert "unknown model arg(s) foo. Valid model args:" in log
    assert "dycoke_k" in log.split("Valid model args:")[1]
    assert not list(tmp_path.rglob("*_results.json"))


@pytest.mark.parametrize(
    "model, bad, message",
    [
        ("llava_onevision", {"dycoke_k": 1.5}, "dycoke_k=1.5 is out of range"),
        ("llava_vid", {"dycoke_p": -0.1}, "dycoke_p=-0.1 is out of range"),
        ("llava_onevision", {"compressor": "zip"}, "compressor='zip'"),
        ("llava_vid", {"use_flash": True}, "unknown model arg(s) use_flash"),
    ],
)
def test_invalid_model_args_fail_before_loading(model, bad, message, tmp_path):
    from lmms_eval.models import get_model

    with pytest.raises(ValueError, match=re.escape(message)):
        get_model(model)(pretrained=str(tmp_path / "never-loaded"), device="cpu", dycoke=True, **bad)


def test_eval_sh_skips_gpt_judged_tasks_without_an_api_key(env, tmp_path):
    done = subprocess.run(
        ["bash", "eval.sh"], env={**env, "TASKS": "activitynetqa,video_dc499", "OUTPUT": str(tmp_path)},
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1
    assert "NOTICE: skipping activitynetqa: it is scored by a GPT judge" in done.stdout
    assert "NOTICE: skipping video_dc499" in done.stdout
    assert "no task left to run" in done.stderr


def test_gpu_runs_keep_the_stock_device_handling(monkeypatch):
    """Data parallel and device_map=auto (72B) stay the stock wrapper's: only compression args are added."""
    from lmms_eval.models.simple.llava_onevision import Llava_OneVision

    from llava.eval.model_args import prepare

    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    model_args = {"pretrained": "lmms-lab/x", "device_map": "auto", "dycoke": True, "dycoke_k": 0.5}
    args = prepare("llava_onevision", Llava_OneVision.__init__, model_args, loader_args=("torch_dtype",))
    assert args.stock == {"pretrained": "lmms-lab/x", "device_map": "auto"}
    assert args.loader == {"dycoke": True, "dycoke_k": 0.5}


def test_cpu_runs_use_the_single_process_branch_and_float32(monkeypatch):
    from lmms_eval.models.simple.llava_vid import LlavaVid

    from llava.eval.model_args import prepare

    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # a GPU being present changes nothing
    args = prepare("llava_vid", LlavaVid.__init__, {"pretrained": "p", "device": "cpu", "model_name": "llava_qwen"},
                   loader_args=("model_name",))  # fmt: skip
    assert args.stock == {"pretrained": "p", "device": "cpu", "device_map": "auto", "torch_dtype": "float32"}
    assert args.loader == {"model_name": "llava_qwen", "device_map": "cpu"}


def test_loader_extras_override_and_restore():
    import types

    from llava.eval.model_args import loader_extras

    def load_pretrained_model(path, base, name, **kwargs):
        return name, kwargs

    module = types.SimpleNamespace(load_pretrained_model=load_pretrained_model)
    with loader_extras(module, device_map="cpu", dycoke=True, model_name="llava_qwen") as calls:
        result = module.load_pretrained_model("p", None, "derived-name", device_map="cuda:0", torch_dtype="float16")
    assert result == ("llava_qwen", {"device_map": "cpu", "torch_dtype": "float16", "dycoke": True})
    assert len(calls) == 1
    assert module.load_pretrained_model is load_pretrained_model
