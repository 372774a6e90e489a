"""The ``llava-make-checkpoint`` console script (``llava.checkpoint_maker.main``)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llava.checkpoint_maker import PRESETS, main


def console_script(name: str) -> str:
    """The installed console script ``name`` (it is in the interpreter's bin folder after ``pip install -e .``)."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        pytest.fail(f"console script {name!r} is not installed: run `pip install -e . --no-deps`")
    return found


def test_console_script_writes_a_loadable_checkpoint(tmp_path):
    from llava.model.builder import load_pretrained_model

    out = tmp_path / "ckpt"
    completed = subprocess.run([console_script("llava-make-checkpoint"), str(out), "--preset", "tiny", "--seed", "3"],
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    assert f"Wrote {out}" in completed.stdout and f"llava-video --model {out}" in completed.stdout
    tokenizer, model, _, _ = load_pretrained_model(str(out), None, "llava_qwen", device_map="cpu",
                                                   torch_dtype="float32", attn_implementation="sdpa")
    assert model.config.hidden_size == PRESETS["tiny"].hidden_size


def test_same_seed_same_weights(tmp_path):
    for name in ("a", "b"):
        assert main([str(tmp_path / name), "--preset", "tiny", "--seed", "5"]) == 0
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_non_empty_out_needs_force(tmp_path, capsys):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_:
        main([str(out), "--preset", "tiny"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "exists and is not empty" in err and "--force" in err
    assert not (out / "config.json").exists()  # nothing written

    # --force: written into it; stale weight files of an older checkpoint are removed, other files kept.
    (out / "model-00001-of-00002.safetensors").write_bytes(b"old shard")
    assert main([str(out), "--preset", "tiny", "--force"]) == 0
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert not (out / "model-00001-of-00002.safetensors").exists()
    assert (out / "notes.txt").read_text() == "mine"


def test_out_is_a_file(tmp_path, capsys):
    out = tmp_path / "file"
    out.write_text("x")
    with pytest.raises(SystemExit):
        main([str(out)])
    assert "is a file, not a folder" in capsys.readouterr().err


def test_unknown_preset_lists_the_presets(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "x"), "--preset", "huge"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'huge'" in err
    for name in PRESETS:
        assert name in err
    assert not (tmp_path / "x").exists()
