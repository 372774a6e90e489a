"""The ``llava-video`` command-line tool (``llava.cli``) and its ``--visualize`` picture (``llava.visualize``).

Everything runs on the tiny random-weight checkpoint with a generated video, a few frames and a few new tokens.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from llava import cli
from llava.video import make_sample_video

REPO_ROOT = Path(__file__).resolve().parents[1]
TABLE_COLUMNS = ["compressor", "video tokens", "vision ms", "prefill ms", "decode ms/token", "peak memory", "answer"]
TIME_WITH_RANGE = re.compile(r"^(\d+\.\d) \((\d+\.\d)-(\d+\.\d)\)$")  # "median (min-max)", ms


@pytest.fixture(scope="module")
def sample_video(tmp_path_factory) -> Path:
    return make_sample_video(tmp_path_factory.mktemp("video") / "sample.mp4")


def table_rows(stdout: str) -> dict[str, dict[str, str]]:
    """The ``--compare`` table as {compressor: {column: cell}}; asserts the header."""
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    assert lines, f"no table in the output:\n{stdout}"
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header == TABLE_COLUMNS
    assert set(lines[1]) <= {"|", "-"}, "second table line should be the separator"
    rows = {}
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|", len(TABLE_COLUMNS) - 1)]
        rows[cells[0]] = dict(zip(TABLE_COLUMNS, cells))
    return rows


@pytest.fixture(scope="module")
def compare_run(tiny_checkpoint, sample_video, tmp_path_factory):
    """One in-process ``--compare --visualize`` run, shared by the tests that read its output."""
    from transformers.utils import logging as transformers_logging

    png = tmp_path_factory.mktemp("viz") / "kept.png"
    out, err = io.StringIO(), io.StringIO()  # module scope: no capsys, capture by hand
    bars_before = transformers_logging.is_progress_bar_enabled()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = cli.main([
            str(sample_video), "What moves?", "--model", str(tiny_checkpoint), "--frames", "8",
            "--max-new-tokens", "4", "--compare", "--visualize", str(png),
        ])
    return {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue(), "png": png,
            "warnings": [str(w.message) for w in caught],
            "bars_restored": transformers_logging.is_progress_bar_enabled() == bars_before}


# ---- a normal run ------------------------------------------------------------------------------------------------


def test_compare_prints_answers_and_table(compare_run):
    assert compare_run["code"] == 0, compare_run["stderr"]
    stdout = compare_run["stdout"]
    assert "Question: What moves?" in stdout
    assert re.search(r"^Answer \(none\): ", stdout, re.M)
    assert re.search(r"^Answer \(dycoke\): ", stdout, re.M)
    assert "Expected:" not in stdout  # a given video has no known answer
    rows = table_rows(stdout)
    assert list(rows) == ["none", "dycoke"]
    baseline, dycoke = int(rows["none"]["video tokens"]), int(rows["dycoke"]["video tokens"])
    assert baseline == 8 * 16  # tiny preset: 4x4 pooled tokens per frame, no newline token (flat one_token)
    assert 0 < dycoke < baseline
    for row in rows.values():
        assert row["peak memory"] == "n/a (CPU)"
    assert "video tokens: the video tokens that enter the language model" in stdout
    assert "newline tokens not counted" in stdout


def test_compare_times_several_runs_and_shows_median_and_range(compare_run):
    """--compare defaults to 3 timed runs per method: each time cell is "median (min-max)", with a noise note."""
    rows = table_rows(compare_run["stdout"])
    for row in rows.values():
        for column in ("vision ms", "prefill ms", "decode ms/token"):
            found = TIME_WITH_RANGE.match(row[column])
            assert found, (column, row[column])
            median, low, high = map(float, found.groups())
            assert low <= median <= high
    text = " ".join(compare_run["stdout"].split())  # the notes are wrapped
    assert "median (min-max) of 3 runs after a warm-up" in text
    assert "Timings on a shared machine are noisy" in text
    assert "3 run(s)" in compare_run["stderr"]


def test_each_method_gets_only_its_own_settings(compare_run):
    """No "do nothing with compressor=..." warning: the baseline gets no settings, DyCoke only dycoke_*."""
    assert compare_run["code"] == 0
    assert not [w for w in compare_run["warnings"] if "do nothing with compressor" in w], compare_run["warnings"]
    args = cli.parse_args(["--compressor", "fastv", "--fastv-k", "1"])
    assert args.compression == {"compressor": "fastv", "fastv_k": 1, "fastv_r": 0.5}
    assert cli.compression_settings(args, "none") == {"compressor": "none"}
    assert set(cli.compression_settings(args, "dycoke")) == {
        "compressor", "dycoke_k", "dycoke_l", "dycoke_p", "dycoke_public_quirks"}
    args = cli.parse_args(["--compressor", "vidcom2", "--vidcom2-r", "0.5"])
    assert args.compression == {"compressor": "vidcom2", "vidcom2_r": 0.5}


def test_answers_are_printed_once_on_one_line(compare_run):
    stdout = compare_run["stdout"]
    for compressor in ("none", "dycoke"):
        assert len(re.findall(rf"^Answer \({compressor}\): ", stdout, re.M)) == 1
    assert "\ufffd" not in stdout  # the replacement character is shown escaped
    assert all(char.isprintable() for line in stdout.splitlines() for char in line)
    table = [line for line in stdout.splitlines() if line.startswith("|")]
    assert len({len(line) for line in table}) == 1  # no answer breaks the table's lines
    for row in table_rows(stdout).values():
        assert len(row["answer"]) <= cli.ANSWER_CELL_WIDTH


def test_answer_escaping_and_table_cell():
    answer = "A red\nsquare\tmoves \ufffd\x07| right" + " and on" * 20
    line = cli.one_line(answer)
    assert line.startswith("A red\\nsquare\\tmoves \\ufffd\\x07| right and on")
    assert "\n" not in line and all(char.isprintable() for char in line)
    cell = cli.table_cell(answer, width=26)
    assert len(cell) <= 26 and cell.endswith("...")
    assert cell == "A red\\nsquare\\tmoves ..."  # "\\ufffd" would not fit whole: never cut an escape
    assert cli.table_cell("a|b") == "a\\|b"  # a | would split the table's cell
    assert cli.table_cell("short answer") == "short answer"


def test_fastv_row_is_marked_with_the_footnote(tiny_checkpoint, sample_video, capsys):
    code, out, err = run_main([str(sample_video), "--model", str(tiny_checkpoint), "--frames", "4",
                               "--max-new-tokens", "3", "--compressor", "fastv", "--fastv-k", "2"], capsys)
    assert code == 0, err
    rows = table_rows(out)
    assert rows["fastv"]["video tokens"] == f"{4 * 16}*"  # all enter the LM; half are dropped inside it
    assert ("* FastV drops video tokens inside the LM, from layer K on; the column counts the tokens that enter "
            "it.") in " ".join(out.split())
    assert "Times: one run." in out
    assert "Loading weights" not in err  # transformers' progress bar is silenced


def test_visualize_writes_a_readable_png(compare_run):
    from PIL import Image

    png = compare_run["png"]
    assert f"Wrote {png}" in compare_run["stdout"]
    with Image.open(png) as image:
        assert image.format == "PNG"
        width, height = image.size
        assert width >= 800 and height >= 500
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.std() > 20  # not blank
    colours = np.unique(pixels[::3, ::3].reshape(-1, 3), axis=0)
    assert len(colours) > 100  # frames, overlays and a heatmap, not a flat image


def test_recorder_maps_dycoke_active_set_to_frames(tiny_checkpoint, sample_video, tmp_path):
    """The heatmap's data: per decoding step, the active video tokens of each frame add up to DyCoke's count."""
    from llava.compression.layout import video_token_layout
    from llava.compression.ttm import TemporalTokenMerging
    from llava.model.builder import load_pretrained_model
    from llava.video import load_video
    from llava.visualize import (
        active_fraction_per_frame,
        kept_mask,
        write_visualization,
    )

    tokenizer, model, processor, _ = load_pretrained_model(
        str(tiny_checkpoint), None, "llava_qwen", device_map="cpu", torch_dtype="float32", attn_implementation="sdpa"
    )
    frames, info = load_video(str(sample_video), 6)
    pixels = processor.preprocess(frames, return_tensors="pt")["pixel_values"]
    ids = cli.prompt_ids(tokenizer, "What moves?", "qwen_1_5")
    model.configure_compression(compressor="dycoke", dycoke_k=0.7, dycoke_l=2, dycoke_p=0.5)
    with model.compression_trace() as trace:
        model.generate(ids, images=[pixels], modalities=["video"], max_new_tokens=5, do_sample=False,
                       pad_token_id=tokenizer.pad_token_id)
    assert trace.compressor == "dycoke" and trace.selection_recorded
    assert trace.pooled.shape[:2] == (6, 16)
    # The recorded choice is TTM's choice on the recorded features.
    recomputed = TemporalTokenMerging(0.7).select(trace.pooled)
    assert torch.equal(recomputed.index, trace.selection.index)
    assert "_trace" not in model.__dict__  # tracing ends with the block

    stats = trace.kv_stats
    steps = stats["decode_steps"]
    assert steps == 4 and len(trace.active_positions) == steps
    assert trace.video_positions.numel() == trace.selection.num_kept == stats["image_tokens"][0]
    sources = video_token_layout(6, 16, trace.selection, "one_token", (4, 4), with_newline=False)
    fraction, active, in_prompt = active_fraction_per_frame(trace.active_positions, trace.video_positions, sources, 16, 6)
    assert in_prompt.tolist() == trace.selection.per_frame.tolist()
    assert (active.sum(axis=1) == stats["active_image_tokens"][0]).all()
    assert ((fraction >= 0) & (fraction <= 1)).all()
    assert kept_mask(trace.selection, 6, 16).sum(axis=1).tolist() == in_prompt.tolist()

    # Without any recorded trace the picture is still drawn (features recomputed, KV panel explains why empty).
    png = write_visualization(tmp_path / "fallback.png", frames, model, pixels, [{"compressor": "none"}])
    assert Path(png).stat().st_size > 10_000


# ---- the console entry and the built-in model --------------------------------------------------------------------


def test_module_entry_with_the_toy_model_answers_the_demo_clip(tmp_path):
    """``python -m llava.cli --compare`` with no VIDEO and no --model: the toy model, its demo clip and question,
    the expected answer shown, the baseline answering it right and DyCoke answering in the trained form (three
    colours; on this clip it gets the order wrong, as the README shows)."""
    from llava.toy import demo_sample
    from llava.toy.drawing import COLOURS

    sample = demo_sample()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    completed = subprocess.run(
        [sys.executable, "-m", "llava.cli", "--compare", "--runs", "1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    assert "built-in toy model" in completed.stderr and "generated a toy clip" in completed.stderr
    assert f"Question: {sample.question}\nExpected: {sample.answer}\n" in completed.stdout
    assert f"Answer (none): {sample.answer}\n" in completed.stdout
    colours = "|".join(COLOURS)
    for method in ("none", "dycoke"):  # the answer has the trained form: three colours in a list
        assert re.search(rf"^Answer \({method}\): ({colours}), ({colours}), ({colours})\.$", completed.stdout, re.M)
    assert list(table_rows(completed.stdout)) == ["none", "dycoke"]
    assert "Traceback" not in completed.stderr
    assert "Loading weights" not in completed.stderr  # no progress bar for a small model


def test_progress_bars_are_restored_after_the_load(compare_run):
    assert compare_run["bars_restored"]


# ---- --help ------------------------------------------------------------------------------------------------------


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "``" not in text  # no raw reST markup
    assert text.count("usage:") == 1 and text.count("llava-video [VIDEO]") == 1
    assert "examples:" in text and "llava-video --compare" in text
    parser = cli.build_parser()
    for action in parser._actions:
        assert action.help, f"{action.option_strings or action.dest} has no help text"
        if action.option_strings and action.option_strings[0] not in ("-h", "--help", "--compare", "--visualize",
                                                                       "--model"):
            assert "(default:" in action.help, f"{action.option_strings[0]}: no default shown"
    for option in ("--fastv-k", "--fastv-r", "--dycoke-public-quirks", "--runs"):
        assert option in text
    for option, default in (("--compressor", "dycoke"), ("--max-new-tokens", "32"), ("--dycoke-k", "0.7"),
                            ("--dycoke-l", "3"), ("--dycoke-p", "0.7"), ("--vidcom2-r", "0.25"), ("--fastv-k", "2"),
                            ("--fastv-r", "0.5"), ("--attn", "sdpa"), ("--conv-template", "qwen_1_5")):
        shown = parser._get_formatter()._expand_help(parser._option_string_actions[option])  # as --help prints it
        assert f"(default: {default})" in shown, option


# ---- errors: exit code 2 with a message, never a traceback ---------------------------------------------------------


def run_main(argv, capsys) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as exit_:  # argparse errors
        code = exit_.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def test_missing_video_file(tiny_checkpoint, tmp_path, capsys):
    code, _, err = run_main([str(tmp_path / "nope.mp4"), "--model", str(tiny_checkpoint), "--frames", "4"], capsys)
    assert code == 2
    assert "error: Video file not found" in err and "nope.mp4" in err


def test_corrupt_video_file(tiny_checkpoint, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"this is not a video" * 100)
    code, _, err = run_main([str(corrupt), "--model", str(tiny_checkpoint), "--frames", "4"], capsys)
    assert code == 2
    assert "error: Cannot decode video" in err and "corrupt.mp4" in err


def test_unknown_compressor_lists_the_allowed_ones(capsys):
    code, _, err = run_main(["--compressor", "tome"], capsys)
    assert code == 2
    assert "invalid choice: 'tome'" in err
    for name in cli.COMPRESSORS:
        assert f"'{name}'" in err


@pytest.mark.parametrize("folder", ["missing", "empty"])
def test_missing_model_folder(folder, sample_video, tmp_path, capsys):
    model = tmp_path / folder
    if folder == "empty":
        model.mkdir()
    code, _, err = run_main([str(sample_video), "--model", str(model), "--frames", "4"], capsys)
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("error: ") and str(model) in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--frames", "0"], "--frames must be >= 1"),
        (["--runs", "0"], "--runs must be >= 1"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (["--conv-template", "qwen9"], "--conv-template 'qwen9' is unknown; available:"),
        (["--visualize", "/no/such/folder/out.png"], "does not exist"),
    ],
)
def test_bad_arguments(argv, message, capsys):
    code, _, err = run_main(argv, capsys)
    assert code == 2 and message in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dycoke-p", "1.5"], "argument --dycoke-p: dycoke_p=1.5 is out of range; allowed: [0, 1)"),
        (["--dycoke-k", "-0.1"], "argument --dycoke-k: dycoke_k=-0.1 is out of range; allowed: [0, 1)"),
        (["--dycoke-l", "0"], "argument --dycoke-l: dycoke_l=0 is out of range"),
        (["--compressor", "vidcom2", "--vidcom2-r", "0"], "argument --vidcom2-r: vidcom2_r=0.0 is out of range; "
                                                         "allowed: (0, 1]"),
        (["--compressor", "fastv", "--fastv-r", "1"], "argument --fastv-r: fastv_r=1.0 is out of range"),
        (["--compressor", "fastv", "--fastv-k", "0"], "argument --fastv-k: fastv_k=0 is out of range"),
    ],
)
def test_compression_settings_are_checked_before_anything_loads(argv, message, capsys, monkeypatch):
    """The library's validator, at parse time: no video is decoded and no model is loaded for a bad value."""
    def must_not_run(*args, **kwargs):
        raise AssertionError("the video was decoded or the model loaded before the settings were checked")

    monkeypatch.setattr(cli, "read_frames", must_not_run)
    monkeypatch.setattr(cli, "load", must_not_run)
    code, _, err = run_main(argv, capsys)
    assert code == 2 and message in err, err


def test_layer_settings_are_checked_against_the_model(tiny_checkpoint, sample_video, capsys, monkeypatch):
    from llava.model import builder

    monkeypatch.setattr(builder.LlavaQwenForCausalLM, "from_pretrained", None)  # fails if the weights are read
    code, _, err = run_main([str(sample_video), "--model", str(tiny_checkpoint), "--frames", "2",
                             "--compressor", "fastv", "--fastv-k", "4"], capsys)
    assert code == 2
    assert "error: --fastv-k: fastv_k=4 is out of range; allowed: [1, 3] for this 4-layer model." in err


def test_settings_of_another_method_are_reported_as_ignored(capsys):
    args = cli.parse_args(["--compressor", "dycoke", "--vidcom2-r", "0.5", "--fastv-k", "2"])
    assert args.compression["compressor"] == "dycoke" and "vidcom2_r" not in args.compression
    assert "warning: ignoring --fastv-k, --vidcom2-r: a setting of another method than --compressor dycoke" in (
        capsys.readouterr().err)
