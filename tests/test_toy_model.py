"""The trained toy model: its training script (a tiny schedule here; the full one made the shipped checkpoint), the
shipped checkpoint (size, loading, the accuracy it reached, real answers), ``scripts/accuracy.py`` and the
``llava_toy_videoqa`` lmms-eval task, which must give the same answers and numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llava.toy import TOY_CHECKPOINT, TOY_EVAL_FILE, load_toy_model
from llava.toy.lmms_task import TASK_NAME, make_toy_task, read_task_rows
from llava.toy.qa import accuracy_by_family, answer_samples
from llava.toy.videoqa import FAMILIES, SAMPLED_FRAMES, make_dataset
from tests.conftest import load_script
from tests.test_lmms_eval import env, lmms_eval_cli, one_file, run  # noqa: F401  (env is a fixture)

REPO = Path(__file__).resolve().parents[1]
# Uniform guessing among each family's answer forms: 6 colours, 5 directions, 3 counts, 6 * 5 * 4 ordered lists.
CHANCE = {"colour": 1 / 6, "direction": 1 / 5, "count": 1 / 3, "flash": 1 / 6, "order": 1 / 120}
# Issue 13's held-out targets for the shipped checkpoint: >= 90% on every family but the ordered list (>= 70%).
TARGETS = {"colour": 0.9, "direction": 0.9, "count": 0.9, "flash": 0.9, "order": 0.7}


@pytest.fixture(scope="module")
def toy():
    tokenizer, model, image_processor = load_toy_model()
    return tokenizer, model, image_processor


# ---- the training script ---------------------------------------------------------------------------------------


def train_tiny(out: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "scripts/train_toy.py", "--schedule", "tiny", "--out", str(out), "--threads", "1"]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_training_script_tiny_schedule_is_reproducible_and_loadable(tmp_path):
    first, second = train_tiny(tmp_path / "a"), train_tiny(tmp_path / "b")
    assert first.returncode == 0 and second.returncode == 0, first.stderr[-3000:] + second.stderr[-3000:]
    assert "Held-out accuracy" in first.stdout and "loss" in first.stdout
    assert all(f"{target} " in first.stdout for target in ("kind", "colour", "motion", "binding"))  # auxiliary losses
    from safetensors.torch import load_file

    weights_a, weights_b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[name], weights_b[name]) for name in weights_a)  # same seed, same weights
    report = json.loads((tmp_path / "a" / TOY_EVAL_FILE).read_text())
    assert set(report["accuracy"]) == set(FAMILIES) and report["training"]["steps"] == 30
    # Trained, not the random initial weights: the maker's weights under the same seed differ.
    from llava.toy.model import TOY_SPEC, make_untrained_checkpoint

    make_untrained_checkpoint(tmp_path / "init", seed=0)
    initial = load_file(tmp_path / "init" / "model.safetensors")
    assert initial.keys() == weights_a.keys()
    assert any(not torch.equal(initial[name], weights_a[name]) for name in initial)
    tokenizer, model, _ = load_toy_model(tmp_path / "a")
    assert model.config.num_hidden_layers == TOY_SPEC.num_hidden_layers


# ---- the shipped checkpoint ------------------------------------------------------------------------------------


def test_shipped_checkpoint_is_small_and_its_report_is_complete():
    size = sum(f.stat().st_size for f in TOY_CHECKPOINT.rglob("*") if f.is_file())
    assert size <= 30e6
    report = json.loads((TOY_CHECKPOINT / TOY_EVAL_FILE).read_text())
    assert set(report["accuracy"]) == set(FAMILIES)
    assert report["eval"]["per_family"] >= 100
    assert report["training"]["training_seconds"] <= 30 * 60 and report["training"]["threads"] <= 2
    assert report["training"]["schedule"] == "full" and report["training"]["seed"] == 0


def test_shipped_checkpoint_meets_the_accuracy_targets_on_the_held_out_set(toy):
    """The report's accuracy (100 held-out clips per family) meets the targets, and is what the shipped weights
    answer: recomputed here on the first 10 clips of each family of the same held-out set."""
    report = json.loads((TOY_CHECKPOINT / TOY_EVAL_FILE).read_text())
    for family, target in TARGETS.items():
        assert report["accuracy"][family] >= target, (family, report["accuracy"])
    tokenizer, model, image_processor = toy
    samples = make_dataset(report["eval"]["seed"], 10)
    answers = answer_samples(model, tokenizer, image_processor, samples)
    matched = accuracy_by_family([s.family for s in samples], [s.answer for s in samples], answers)
    for family, target in TARGETS.items():
        assert matched[family] >= target - 0.1, (family, matched)


def test_shipped_checkpoint_answers_from_the_video(toy):
    """Held-out clips the training report did not use (another seed): every family is answered well above chance
    (uniform guessing among the answer forms), and far better with the clip asked about than with another
    clip of the same family (each video moved to the next question): the answers come from the video."""
    tokenizer, model, image_processor = toy
    per_family = 12
    samples = make_dataset(424242, per_family)
    families, expected = [s.family for s in samples], [s.answer for s in samples]
    matched = accuracy_by_family(families, expected, answer_samples(model, tokenizer, image_processor, samples))
    for family in FAMILIES:
        assert matched[family] >= max(1.5 * CHANCE[family], TARGETS[family] - 0.2), (family, matched)

    from llava.toy.qa import answer_batch, video_pixels

    videos = [video_pixels(image_processor, s) for s in samples]
    moved = [videos[(i // per_family) * per_family + (i + 1) % per_family] for i in range(len(samples))]
    answers = []
    for start in range(0, len(samples), 16):
        answers += answer_batch(model, tokenizer, [s.question for s in samples[start : start + 16]],
                                moved[start : start + 16])[0]
    mismatched = accuracy_by_family(families, expected, answers)
    gain = sum(matched[family] - mismatched[family] for family in FAMILIES)
    assert gain >= 0.15 * len(FAMILIES), (matched, mismatched)


# ---- accuracy.py and the lmms-eval task ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_task(tmp_path_factory) -> Path:
    return make_toy_task(tmp_path_factory.mktemp("toy_task"), per_family=2)


def test_task_rows_hold_the_held_out_clips(toy_task):
    rows = read_task_rows(toy_task)
    assert [row["family"] for row in rows] == [f for f in FAMILIES for _ in range(2)]
    assert all(Path(row["video"]).is_file() for row in rows)
    assert (toy_task / f"{TASK_NAME}.yaml").is_file() and (toy_task / "utils.py").is_file()
    with pytest.raises(FileNotFoundError, match="write the task first"):
        read_task_rows(toy_task / "missing")


@pytest.mark.parametrize(
    "method, group, model_args",
    [("baseline", "baseline", ""), ("DyCoke k=0.7 L=3 p=0.7", "dycoke", ",dycoke=True,dycoke_k=0.7,dycoke_l=3,dycoke_p=0.7")],
)
def test_accuracy_script_and_stock_lmms_eval_give_the_same_answers(toy_task, env, tmp_path, method, group, model_args):
    out = tmp_path / "accuracy.json"
    run([sys.executable, "scripts/accuracy.py", "--data", str(toy_task), "--methods", group, "--out", str(out),
         "--figure", str(tmp_path / "accuracy.png"), "--threads", "1"], env, timeout=300)
    result = next(r for r in json.loads(out.read_text())["results"] if r["label"] == method)
    assert (tmp_path / "accuracy.png").stat().st_size > 10_000 and out.with_suffix(".md").is_file()

    args = (f"pretrained={TOY_CHECKPOINT},conv_template=qwen_1_5,model_name=llava_qwen,device=cpu,"
            f"max_frames_num={SAMPLED_FRAMES}{model_args}")
    run(lmms_eval_cli("llava_onevision", args, toy_task, tmp_path / "lmms", task=TASK_NAME), env, timeout=300)
    metrics = json.loads(one_file(tmp_path / "lmms", "*_results.json").read_text())["results"][TASK_NAME]
    logged = [json.loads(line) for line in one_file(tmp_path / "lmms", f"*_samples_{TASK_NAME}.jsonl").read_text().splitlines()]
    answers = {sample["doc_id"]: sample["filtered_resps"] for sample in logged}
    assert [answers[i].strip() for i in range(len(answers))] == result["answers"]
    for family in FAMILIES:
        assert metrics[f"{family},none"] == pytest.approx(result["accuracy"][family])
    assert metrics["accuracy,none"] == pytest.approx(result["accuracy"]["all"])


def test_probe_script_control_probe_is_near_perfect(toy):
    """scripts/toy_probe.py (the README's account of the colour and direction answers): its control probe, the
    shape's colour from the first frame's tokens, is near perfect on held-out clips, so features and labels line up
    and the probe can find what the tokens hold."""
    toy_probe = load_script("toy_probe")
    tokenizer, model, image_processor = toy
    results = toy_probe.run_probes(model, image_processor, clips=400)
    assert list(results) == ["kind", "colour", "direction"]
    accuracy, chance = results["colour"]
    assert accuracy >= 0.9 > chance
    counts = toy_probe.accuracy_by_shape_count(model, tokenizer, image_processor, per_family=6)
    assert sum(asked for _, asked in counts.values()) == 12 and {family for family, _ in counts} == {"colour", "direction"}


def test_the_trained_binding_head_rests_on_the_named_shape(toy):
    """The head that training binds (train_toy's ``binding_layer``/``binding_head``) puts most of its attention at
    the answer on the tokens of the shape the question names, several times their share of the video tokens and
    more than any other head; the model is left with its own attention implementation."""
    schedule = load_script("train_toy").SCHEDULES["full"]
    tokenizer, model, image_processor = toy
    on_subject, subject_share = load_script("toy_probe").attention_on_subject(model, tokenizer, image_processor, 8)
    assert on_subject.shape == (model.config.num_hidden_layers, model.config.num_attention_heads)
    assert model.config._attn_implementation == "sdpa"
    bound = on_subject[schedule.binding_layer, schedule.binding_head]
    assert bound >= 0.5 and bound >= 3 * subject_share, (on_subject, subject_share)
    assert bound == on_subject.max()
    assert 0.0 < subject_share < 0.5
