"""scripts/benchmark.py on the tiny config: every method and column is reported, compression shows in the tokens."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"


def load_script():
    spec = importlib.util.spec_from_file_location("benchmark_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script is executed
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return load_script()


@pytest.fixture(scope="module")
def report(script, tmp_path_factory):
    folder = tmp_path_factory.mktemp("benchmark")
    out = folder / "benchmark-cpu-tiny.json"
    # eager only, to stay quick: it also covers the sdpa switch for the batch-8 prefill.
    argv = ["--config", "cpu-tiny", "--attn", "eager", "--warmup", "0", "--runs", "1",
            "--out", str(out), "--figures-dir", str(folder / "figures")]
    threads = torch.get_num_threads()
    try:  # one thread: on a busy machine several threads per op spin against each other
        assert script.main([*argv, "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    return json.loads(out.read_text())


def test_every_method_and_column_is_reported(script, report):
    assert set(report["results"]) == {"eager"}
    for attn, rows in report["results"].items():
        assert list(rows) == ["baseline", "dycoke", "vidcom2", "fastv"], attn
        for method, row in rows.items():
            missing = [column for column in script.COLUMNS if column not in row]
            assert not missing, f"{attn}/{method} lacks {missing}"
            for column in script.COLUMNS:
                if column != "peak_memory_mib" and not column.endswith("ratio"):
                    assert row[column] is not None and row[column] >= 0, f"{attn}/{method}/{column}"
        assert rows["baseline"]["ttft_ratio"] == pytest.approx(1.0)


def test_compression_shows_in_the_visual_tokens(report):
    for attn, rows in report["results"].items():
        base, dycoke, vidcom2 = rows["baseline"], rows["dycoke"], rows["vidcom2"]
        assert dycoke["visual_tokens"] < base["visual_tokens"], attn
        # VidCom2 keeps about r = 0.25 of the video tokens: per-frame budgets round, at most 1 token per frame.
        assert abs(vidcom2["video_tokens"] - 0.25 * base["video_tokens"]) <= report["frames"], attn
        # DyCoke's KV pruning ran in the manual decode loop: it kept int(n * (1 - p)) image tokens active.
        assert dycoke["kv_active_image_tokens"] == int(dycoke["video_tokens"] * (1 - 0.7))


def test_figures_and_targets(report):
    assert len(report["figures"]) == 2
    for path in report["figures"]:
        assert Path(path).is_file() and Path(path).stat().st_size > 0
    assert any("target" in line for line in report["targets"])


def test_real_sizes_need_cuda(script, monkeypatch, capsys):
    monkeypatch.setattr(script.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        script.parse_args(["--config", "ov-7b"])
    assert "no CUDA device" in capsys.readouterr().err


def test_synthetic_prompt_has_the_qwen_layout(script):
    ids = script.synthetic_prompt(152064, seed=0)[0].tolist()
    assert ids.count(script.IMAGE_TOKEN_INDEX) == 1
    assert ids[0] == script.QWEN_IDS["<|im_start|>"] and ids[-2] == script.QWEN_IDS["assistant"]
