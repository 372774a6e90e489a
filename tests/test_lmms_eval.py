"""End to end through the real lmms-eval CLI: this package's plugin, a tiny random checkpoint, a small
offline video task (``llava.eval.smoke_task``), baseline and DyCoke, unreadable videos, then the results table;
and eval.sh's checks before it launches anything.

lmms-eval must be installed (CI installs it with scripts/install.sh): without it these tests fail, never skip.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from llava.eval.smoke_task import TASK_NAME as TASK
from llava.eval.smoke_task import make_smoke_task

REPO = Path(__file__).resolve().parents[1]
BROKEN_TASK = "llava_smoke_broken"  # two samples, the second one's video cut short
NUM_SAMPLES = 2


@pytest.fixture(scope="module", autouse=True)
def lmms_eval_installed():
    if importlib.util.find_spec("lmms_eval") is None:
        pytest.fail("lmms-eval is not installed: run `bash scripts/install.sh` (these tests need it).")


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory) -> Path:
    """A task folder for --include_path: TASK (two readable videos) and BROKEN_TASK (the second unreadable)."""
    folder = tmp_path_factory.mktemp("lmms_task")
    make_smoke_task(folder, TASK, videos=NUM_SAMPLES)
    return make_smoke_task(folder, BROKEN_TASK, videos=NUM_SAMPLES, broken=1)


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


def lmms_eval_cli(
    model: str, model_args: str, task_dir: Path, output: Path, launcher=(sys.executable,), task: str = TASK
) -> list[str]:
    return [
        *launcher, "-m", "lmms_eval", "--model", model, "--model_args", model_args, "--tasks", task,
        "--include_path", str(task_dir), "--batch_size", "1", "--log_samples", "--output_path", str(output),
    ]  # fmt: skip


def run(cmd: list[str], env: dict, timeout: int = 240, cwd: Path = REPO) -> str:
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(cmd)} exited {done.returncode}:\n{output[-6000:]}"
    return output


def one_file(folder: Path, pattern: str) -> Path:
    found = sorted(folder.rglob(pattern))
    assert len(found) == 1, f"expected one {pattern} under {folder}, found {found}"
    return found[0]


def check_samples(run_dir: Path, task: str = TASK) -> list[dict]:
    samples = [json.loads(line) for line in one_file(run_dir, f"*_samples_{task}.jsonl").read_text().splitlines()]
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


def docs_smoke_recipe() -> str:
    """The bash block of docs/evaluation.md's "Smoke test on a CPU" section."""
    docs = (REPO / "docs" / "evaluation.md").read_text()
    section = docs.split("### Smoke test on a CPU", 1)[1]
    return section.split("```bash\n", 1)[1].split("```", 1)[0]


def test_docs_cpu_smoke_recipe_runs_eval_sh(env, tmp_path):
    """The documented recipe, run as written from a scratch folder: eval.sh with relative paths, both settings
    through `accelerate launch --cpu`, then the table."""
    log = run(["bash", "-euo", "pipefail", "-c", docs_smoke_recipe()], {**env, "LLAVA_REPO": str(REPO)}, cwd=tmp_path)

    assert re.search(r"accelerate launch --num_processes=1 --main_process_port=\d+ --cpu -m lmms_eval", log)
    assert f"pretrained={tmp_path / 'ckpt'}," in log  # relative paths resolved against the caller's folder
    output = tmp_path / "logs"
    for setting in ("baseline", "dycoke"):
        run_dir = output / setting / TASK
        one_file(run_dir, "*_results.json")
        check_samples(run_dir)
        assert float((run_dir / "wall_time_s").read_text()) > 0
        run_log = (run_dir / "run.log").read_text()
        assert "cannot read the video" not in run_log
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
    assert "dycoke=True" in result["config"]["model_args"]
    samples = check_samples(tmp_path / "dycoke")
    # The score is the logged answers' score: every sample answered by the model, none dropped.
    matches = [float(sample["filtered_resps"].strip() == sample["target"].strip()) for sample in samples]
    assert result["results"][TASK]["exact_match,none"] == pytest.approx(sum(matches) / len(matches))

    table = run([sys.executable, "scripts/results_table.py", str(tmp_path)], env)
    assert f"| {TASK} | exact_match |" in table and " dycoke time " in table


def broken_video(task_dir: Path) -> Path:
    return task_dir / "videos" / f"{BROKEN_TASK}-1.mp4"


def test_unreadable_video_is_warned_about_listed_and_counted(tiny_checkpoint, tiny_task, env, tmp_path):
    """llava_onevision's stock wrapper answers such a sample without the video: never silently."""
    model_args = f"pretrained={tiny_checkpoint},device=cpu,max_frames_num=4"
    log = run(lmms_eval_cli("llava_onevision", model_args, tiny_task, tmp_path, task=BROKEN_TASK), env)
    video = broken_video(tiny_task)
    assert f"cannot read the video of task {BROKEN_TASK}, doc 1: {video} (" in log
    report = one_file(tmp_path, "video_errors_llava_onevision_*.jsonl")
    assert report.parent == tmp_path  # next to lmms-eval's outputs
    (listed,) = [json.loads(line) for line in report.read_text().splitlines()]
    assert (listed["task"], listed["doc_id"], listed["video"]) == (BROKEN_TASK, 1, str(video))
    assert "1 of 2 sample(s) had a video that could not be read; they were answered without its video" in log
    assert f"listed in {report}" in log
    one_file(tmp_path, "*_results.json")  # the run goes on and is scored
    check_samples(tmp_path, BROKEN_TASK)


def test_unreadable_video_stops_the_run_with_on_video_error_fail(tiny_video_checkpoint, tiny_task, env, tmp_path):
    model_args = f"pretrained={tiny_video_checkpoint},device=cpu,max_frames_num=4,on_video_error=fail"
    cmd = lmms_eval_cli("llava_vid", model_args, tiny_task, tmp_path, task=BROKEN_TASK)
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    log = done.stdout + done.stderr  # lmms-eval prints the error and exits 0 (stock behaviour)
    assert f"llava_vid: cannot read the video of task {BROKEN_TASK}, doc 1: {broken_video(tiny_task)} (" in log
    assert "The run stops because on_video_error=fail" in log
    assert not list(tmp_path.rglob("*_results.json"))


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
        ("llava_onevision", {"on_video_error": "ignore"}, "on_video_error='ignore' is not valid; allowed: warn, fail"),
    ],
)
def test_invalid_model_args_fail_before_loading(model, bad, message, tmp_path):
    from lmms_eval.models import get_model

    with pytest.raises(ValueError, match=re.escape(message)):
        get_model(model)(pretrained=str(tmp_path / "never-loaded"), device="cpu", dycoke=True, **bad)


@pytest.mark.parametrize("model", ["llava_onevision", "llava_vid"])
def test_pretrained_folder_that_does_not_exist_is_named_before_the_stock_wrapper(model, tmp_path, monkeypatch):
    from lmms_eval.models import get_model

    monkeypatch.chdir(tmp_path)
    for pretrained, problem in [
        (str(tmp_path / "no-such-ckpt"), "does not exist"),
        ("ckpt", "does not exist"),  # relative: to the folder lmms-eval runs in
        (str(tmp_path), "has no config.json"),
    ]:
        message = f"--model {model}: pretrained={pretrained}: .*{problem}.* Pass a checkpoint folder"
        with pytest.raises(FileNotFoundError, match=message):
            get_model(model)(pretrained=pretrained, device="cpu")


def test_eval_sh_skips_gpt_judged_tasks_without_an_api_key(env, tmp_path):
    done = subprocess.run(
        ["bash", "eval.sh"], env={**env, "TASKS": "activitynetqa,video_dc499", "OUTPUT": str(tmp_path)},
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1
    assert "NOTICE: skipping activitynetqa: it is scored by a GPT judge" in done.stdout
    assert "NOTICE: skipping video_dc499" in done.stdout
    assert "no task left to run" in done.stderr


FAKE_ACCELERATE = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_ACCELERATE_LOG"
exit 3
"""


def fake_accelerate(tmp_path: Path) -> tuple[dict, Path]:
    """An `accelerate` first on PATH that records its arguments and fails with status 3."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    (bin_dir / "accelerate").write_text(FAKE_ACCELERATE)
    (bin_dir / "accelerate").chmod(0o755)
    launches = tmp_path / "launches.txt"
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_ACCELERATE_LOG": str(launches)}, launches


def eval_sh(env: dict, cwd: Path, **settings) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "eval.sh")], env={**env, **settings}, cwd=cwd, capture_output=True,
                          text=True, timeout=60)  # fmt: skip


def test_eval_sh_without_the_gpus_stops_once_before_launching(env, tmp_path, tiny_checkpoint):
    extra, launches = fake_accelerate(tmp_path)
    done = eval_sh({**env, **extra}, tmp_path, MODEL=str(tiny_checkpoint), TASKS="videomme,nextqa_mc_test",
                   OUTPUT="out", CUDA_VISIBLE_DEVICES="")  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert "NUM_GPUS=8 but" in done.stderr and "sees 0 CUDA GPU(s)" in done.stderr
    assert "NUM_GPUS=1 EXTRA_MODEL_ARGS=device=cpu" in done.stderr  # the fix
    assert not launches.exists()

    done = eval_sh({**env, **extra}, tmp_path, MODEL=str(tiny_checkpoint), TASKS="videomme", NUM_GPUS="2",
                   EXTRA_MODEL_ARGS="device=cpu")  # fmt: skip
    assert done.returncode == 2 and "device=cpu runs in one process: set NUM_GPUS=1 (it is 2)" in done.stderr
    done = eval_sh({**env, **extra}, tmp_path, MODEL="my-ckpt", TASKS="videomme", NUM_GPUS="1",
                   EXTRA_MODEL_ARGS="device=cpu")  # fmt: skip
    assert done.returncode == 2
    assert f"MODEL=my-ckpt does not exist (relative paths are relative to {tmp_path})" in done.stderr
    assert not launches.exists()


def test_eval_sh_resolves_relative_paths_and_keeps_the_launcher_exit_status(env, tmp_path, tiny_checkpoint):
    extra, launches = fake_accelerate(tmp_path)
    (tmp_path / "ckpt").symlink_to(tiny_checkpoint)
    (tmp_path / "tasks").mkdir()
    done = eval_sh({**env, **extra}, tmp_path, MODEL="ckpt", OUTPUT="out", INCLUDE_PATH="tasks", TASKS="t1",
                   NUM_GPUS="1", EXTRA_MODEL_ARGS="device=cpu")  # fmt: skip
    assert done.returncode == 1
    assert "Failed runs:\n  baseline/t1 (exit status 3)\n  dycoke/t1 (exit status 3)" in done.stderr
    baseline, dycoke = launches.read_text().splitlines()
    assert f"pretrained={tmp_path / 'ckpt'}," in baseline
    assert f"--output_path {tmp_path / 'out' / 'baseline' / 't1'}" in baseline
    assert f"--include_path {tmp_path / 'tasks'}" in baseline
    ports = [re.search(r"--main_process_port=(\d+)", line) for line in (baseline, dycoke)]
    assert all(ports), "each run gets its own free port unless ACCELERATE_ARGS names one"


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
    args = prepare("llava_vid", LlavaVid.__init__, {"pretrained": "lmms-lab/p", "device": "cpu", "model_name": "llava_qwen"},
                   loader_args=("model_name",))  # fmt: skip
    assert args.stock == {"pretrained": "lmms-lab/p", "device": "cpu", "device_map": "auto", "torch_dtype": "float32"}
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


# -- on_video_error, without lmms-eval's CLI: a stand-in for a stock wrapper, reading videos as they do -----


class FakeStock:
    """Reads each sample's video like the stock wrappers: errors swallowed, a fallback answer instead."""

    fallback_text = None  # llava_vid-like when set: the answer for a failed video

    def load_video(self, path, frames):
        if "broken" in str(path):
            raise RuntimeError(f"Error reading {path}: moov atom not found")
        return "frames"

    def generate_until(self, requests):
        answers = []
        for _context, _gen_kwargs, doc_to_visual, doc_id, task, _split in [r.args for r in requests]:
            videos = doc_to_visual({"video": f"{task}-{doc_id}"})
            try:
                self.load_video(videos, 4)
                answers.append("red")
            except Exception:
                answers.append(self.fallback_text.format(videos[0]) if self.fallback_text else "text-only answer")
        return answers


def fake_requests(paths: list[str]) -> list:
    from lmms_eval.api.instance import Instance

    return [
        Instance("generate_until", ("Q?", {"max_new_tokens": 3}, lambda doc, p=path: [p], doc_id, "t", "test"), doc_id,
                 metadata={"task": "t", "doc_id": doc_id, "repeats": 1})
        for doc_id, path in enumerate(paths)
    ]  # fmt: skip


def fake_wrapper(policy: str, fallback_text=None, skip_load_video=False):
    import re as regex

    from llava.eval.video_errors import WatchesVideoErrors

    class Wrapper(WatchesVideoErrors, FakeStock):
        stock_module = types.SimpleNamespace(read_video=None)
        video_fallback = "answered with a fallback"
        failure_answer = regex.compile(r"Video (?P<video>.*) can not load") if fallback_text else None

    wrapper = Wrapper()
    wrapper.fallback_text = fallback_text
    if skip_load_video:  # a failure the stock wrapper meets elsewhere, seen only in its answer text
        wrapper.load_video = lambda path, frames: FakeStock.load_video(wrapper, path, frames)
    wrapper.watch_video_errors("fake", policy)
    return wrapper


@pytest.mark.parametrize("fallback_text, skip_load_video", [(None, False), ("Video {} can not load", True)])
def test_on_video_error_warn_keeps_the_answer_and_lists_the_sample(fallback_text, skip_load_video, tmp_path):
    from loguru import logger

    warnings = []
    sink = logger.add(warnings.append, level="WARNING", format="{message}")
    try:
        wrapper = fake_wrapper("warn", fallback_text, skip_load_video)
        wrapper.video_errors.report = tmp_path / "video_errors.jsonl"
        answers = wrapper.generate_until(fake_requests(["a.mp4", "broken.mp4", "c.mp4"]))
    finally:
        logger.remove(sink)
    assert answers[0] == answers[2] == "red" and answers[1] != "red"  # the stock answer is kept
    (listed,) = [json.loads(line) for line in (tmp_path / "video_errors.jsonl").read_text().splitlines()]
    assert (listed["model"], listed["task"], listed["doc_id"], listed["video"]) == ("fake", "t", 1, "broken.mp4")
    assert any("cannot read the video of task t, doc 1: broken.mp4" in w for w in warnings)
    assert any("fake: 1 of 3 sample(s) had a video that could not be read" in w for w in warnings)


def test_report_file_is_next_to_the_outputs():
    from llava.eval.video_errors import report_file

    assert report_file("m", 0, 1, ["lmms_eval", "--tasks", "x"]) is None
    for argv in (["--output_path", "out/run"], ["--output_path=out/run"]):
        path = report_file("m", 2, 4, ["lmms_eval", *argv])
        assert path.parent == Path("out/run") and re.fullmatch(r"video_errors_m_\d{8}_\d{6}_rank2\.jsonl", path.name)


def test_on_video_error_fail_stops_at_the_first_unreadable_video():
    from llava.eval.video_errors import VideoReadError

    wrapper = fake_wrapper("fail")
    requests = fake_requests(["a.mp4", "broken.mp4", "c.mp4"])
    with pytest.raises(VideoReadError, match=r"fake: cannot read the video of task t, doc 1: broken.mp4 \(RuntimeError"):
        wrapper.generate_until(requests)
