"""The ``llava-video`` command: ask a question about a video, with or without video-token compression.

``llava-video --help`` shows every option. The steps: check the options (compression settings with the library's
own validator, before anything is loaded), decode the sampled frames (a bad video fails fast), load the model,
generate with each method (``--compare``: the baseline too; ``--runs`` timed runs each after a warm-up), print the
answers and a table of token counts and timings.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

from llava.compression.registry import METHODS
from llava.compression.settings import (
    CompressionSettings,
    check_setting,
    compressors,
    layer_arguments,
    method_arguments,
    settings_from_kwargs,
)

COMPRESSORS = tuple(name for name in compressors() if name != "none") + ("none",)
DEFAULT_QUESTION = "What happens in this video? Describe the moving object."  # for a VIDEO given without one
DEFAULT_RUNS_WITH_COMPARE = 3
DEFAULT_FRAMES = 32  # lmms-eval's llava_onevision default (max_frames_num)
TOY_FRAMES = 8  # llava.toy.videoqa.SAMPLED_FRAMES (not imported here: --help stays fast)
ANSWER_CELL_WIDTH = 40  # characters of the answer shown in the table (the full answer is printed above it)

# The compression settings the command has an option for (every registered method's, but the compatibility
# arguments the input decides); each option is the setting's name with dashes.
COMPRESSION_OPTIONS = tuple(argument.name for method in COMPRESSORS for argument in METHODS[method].arguments
                            if argument.option)
LAYER_OPTIONS = layer_arguments()  # their upper bound is the model's layer count, known once it is found

DESCRIPTION = """\
Ask a question about a video, with or without video-token compression (DyCoke, VidCom2,
FastV), and print the answer, the number of video tokens that enter the language model,
and the timings.

With no --model it runs the built-in toy model: a small LLaVA-OneVision trained here on
synthetic clips of coloured shapes (llava.toy), which answers questions about such clips
("List the colours in order of appearance.", "Which colour flashes?", ...). With no
VIDEO it generates such a clip, asks its question and shows the expected answer."""

EPILOG = """\
examples:
  llava-video --compare
      toy model, generated clip: the baseline next to DyCoke, with the expected answer
  llava-video clip.mp4 "What is the person holding?" --model lmms-lab/llava-onevision-qwen2-7b-ov
      a real checkpoint (downloaded once), DyCoke with its default settings
  llava-video clip.mp4 --compressor vidcom2 --vidcom2-r 0.25 --compare --runs 5 --visualize kept.png
      VidCom2 against the baseline, 5 timed runs each, and a picture of the kept tokens
  llava-video --compressor evs --compare --keep-positions
      the baseline, EVS (kept tokens renumbered) and EVS with the kept tokens at their own positions

A small local checkpoint to try things offline: llava-make-checkpoint ./llava-tiny --preset tiny"""


def option_name(setting: str) -> str:
    """``dycoke_p`` -> ``--dycoke-p``."""
    return "--" + setting.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llava-video",
        usage="%(prog)s [VIDEO] [QUESTION] [options]",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(prog, max_help_position=30),
    )
    parser.add_argument("video", nargs="?", metavar="VIDEO",
                        help="video file (default: a generated toy clip, asked its own question)")
    parser.add_argument("question", nargs="?", metavar="QUESTION",
                        help=f"the question, quoted (default: the toy clip's question; with a VIDEO, "
                             f"{DEFAULT_QUESTION!r})")

    run = parser.add_argument_group("model and run")
    run.add_argument("--model", metavar="PATH_OR_HUB_ID",
                     help="checkpoint folder or hub id (default: the built-in toy model, llava.toy.TOY_CHECKPOINT)")
    run.add_argument("--compressor", default="dycoke", choices=COMPRESSORS,
                     help="video-token compression to run (default: %(default)s)")
    run.add_argument("--compare", action="store_true",
                     help="also run the baseline (no compression) and print both side by side")
    run.add_argument("--runs", type=int, metavar="N",
                     help=f"timed runs per method after a warm-up; the table shows their median and range "
                          f"(default: {DEFAULT_RUNS_WITH_COMPARE} with --compare, else 1)")
    run.add_argument("--frames", type=int, metavar="N",
                     help=f"frames sampled uniformly from the video (default: {TOY_FRAMES} for the toy model, "
                          f"which was trained with {TOY_FRAMES}; else {DEFAULT_FRAMES})")
    run.add_argument("--max-new-tokens", type=int, default=32, metavar="N",
                     help="longest answer, in tokens (default: %(default)s)")
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                     help="torch device: cpu, cuda, cuda:1, ... (default: cuda when available, else cpu; "
                          "here: %(default)s)")
    run.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                     help="weight and activation type (default: bfloat16 on CUDA, float32 on CPU)")
    run.add_argument("--attn", default="sdpa", choices=("sdpa", "eager", "flash_attention_2"),
                     help="attention implementation; flash_attention_2 needs CUDA and flash-attn, else sdpa is "
                          "used (default: %(default)s)")
    run.add_argument("--conv-template", default="qwen_1_5", metavar="NAME",
                     help="conversation template of the prompt, from llava.conversation (default: %(default)s)")
    run.add_argument("--visualize", metavar="PNG",
                     help="write a picture of the sampled frames and the tokens each method keeps to this file")

    compression = parser.add_argument_group(
        "compression settings",
        "Only the selected --compressor's own settings are used. Each is checked before anything is\n"
        "loaded; the layer settings again against the model's layer count once it is found.")
    for name in COMPRESSORS:
        for argument in METHODS[name].arguments:
            if argument.option:
                add_compression_option(compression, METHODS[name].label, argument)
    compression.add_argument(
        "--keep-positions", action="store_true",
        help="any method that compresses before the LM (DyCoke's merging, VidCom2, EVS): the kept video tokens keep "
             "their uncompressed positions and order, and decoding continues at the uncompressed length (default: "
             "off, renumbered as the public methods do); with --compare the method also runs without it")
    return parser


def add_compression_option(group, label: str, argument) -> None:
    """The option of one method argument, e.g. ``--dycoke-p P``, its help text from the registry."""
    help_text = f"{label}: {argument.help}"
    if argument.kind == "flag":
        group.add_argument(option_name(argument.name), action="store_const", const=True,
                           help=f"{help_text} (default: {'on' if argument.default else 'off'})")
        return
    group.add_argument(option_name(argument.name), type=float if argument.kind == "number" else int,
                       metavar=argument.name.split("_", 1)[1].upper(),
                       help=f"{help_text}; {argument.allowed} (default: {argument.default})")


def parse_args(argv=None) -> argparse.Namespace:
    """The options, checked: an invalid value is a usage error (exit code 2) that names the option."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("frames", "max_new_tokens", "runs"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"{option_name(name)} must be >= 1, got {value}")
    if args.runs is None:
        args.runs = DEFAULT_RUNS_WITH_COMPARE if args.compare else 1
    if args.frames is None:
        args.frames = TOY_FRAMES if args.model is None else DEFAULT_FRAMES
    if args.video is not None and args.question is None:
        args.question = DEFAULT_QUESTION
    args.expected = None  # the toy clip's answer, when the command generates the clip

    from llava.conversation import conv_templates

    if args.conv_template not in conv_templates:
        parser.error(f"--conv-template {args.conv_template!r} is unknown; available: {', '.join(sorted(conv_templates))}")

    # Each given compression setting through the library's validator (the layer count is not known yet).
    for name in COMPRESSION_OPTIONS:
        value = getattr(args, name)
        if value is not None:
            try:
                check_setting(name, value)
            except ValueError as error:
                parser.error(f"argument {option_name(name)}: {error}")
    ignored = [option_name(name) for name in COMPRESSION_OPTIONS
               if getattr(args, name) is not None and name not in method_arguments(args.compressor)]
    if ignored:
        say(f"warning: ignoring {', '.join(ignored)}: a setting of another method than --compressor "
            f"{args.compressor}.")
    args.compression = compression_settings(args, args.compressor)
    try:  # the settings the model will get, built as the library builds them
        settings = settings_from_kwargs(args.compression)
    except ValueError as error:
        parser.error(str(error))
    if args.keep_positions and METHODS[args.compressor].build(settings).video is None:
        say(f"warning: ignoring --keep-positions: --compressor {args.compressor} compresses nothing before the "
            "language model, so every token keeps its position anyway.")
        args.keep_positions = False
        args.compression.pop("keep_positions", None)

    if args.visualize:  # fail before the model runs, not after
        if importlib.util.find_spec("matplotlib") is None:
            parser.error("--visualize needs matplotlib: pip install 'llava[viz]' (or pip install matplotlib)")
        if not Path(args.visualize).resolve().parent.is_dir():
            parser.error(f"--visualize: folder {str(Path(args.visualize).resolve().parent)!r} does not exist")
    return args


def compression_settings(args, compressor: str, keep_positions: bool | None = None) -> dict:
    """The keyword arguments of ``configure_compression`` for ``compressor``: its own settings only (an option not
    given takes the library default), and ``keep_positions=True`` when asked (``keep_positions``, default
    ``--keep-positions``; never for the baseline)."""
    defaults = CompressionSettings()
    settings = {"compressor": compressor}
    for name in method_arguments(compressor):
        if name in COMPRESSION_OPTIONS:
            given = getattr(args, name)
            settings[name] = getattr(defaults, name) if given is None else given
    keep = getattr(args, "keep_positions", False) if keep_positions is None else keep_positions
    if keep and compressor != "none":
        settings["keep_positions"] = True
    return settings


def planned_runs(args) -> list[tuple[str, bool]]:
    """(compressor, keep_positions) of each method the command runs: with --compare the baseline first, and with
    --keep-positions too the method with its positions renumbered next to it with them kept."""
    keep = bool(args.keep_positions) and args.compressor != "none"
    runs = [(args.compressor, keep)]
    if args.compare and args.compressor != "none":
        runs = [("none", False)] + ([(args.compressor, False)] if keep else []) + runs
    return runs


def run_label(compressor: str, keep_positions: bool) -> str:
    return f"{compressor} (kept positions)" if keep_positions else compressor


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def transformers_progress_bars_off():
    """Silence transformers' progress bars (its "Loading weights" bar) inside the block; restore them after."""
    from transformers.utils import logging as transformers_logging

    was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            transformers_logging.enable_progress_bar()


def check_layer_options(args, folder: Path) -> None:
    """``--dycoke-l`` / ``--fastv-k`` against the checkpoint's layer count (read from its config.json)."""
    from llava.model.checkpoint_files import read_json

    num_layers = read_json(folder / "config.json").get("num_hidden_layers")
    if num_layers is None:
        return  # the loader reports a config without it
    for name in LAYER_OPTIONS:
        if name in args.compression:
            try:
                check_setting(name, args.compression[name], num_layers)
            except ValueError as error:
                raise ValueError(f"{option_name(name)}: {error}") from None


def load(args):
    from llava.model.builder import load_pretrained_model, resolve_checkpoint
    from llava.toy import TOY_CHECKPOINT

    model_path = args.model
    if model_path is None:
        say("No --model given: using the built-in toy model (trained on synthetic clips of coloured shapes).")
        model_path = str(TOY_CHECKPOINT)
    folder = resolve_checkpoint(model_path)  # a hub id is downloaded here, with the hub's progress bars
    check_layer_options(args, folder)
    dtype = args.dtype or ("bfloat16" if str(args.device).startswith("cuda") else "float32")
    say(f"Loading model {model_path} on {args.device} ({dtype}, {args.attn}) ...")
    started = time.perf_counter()
    with transformers_progress_bars_off():
        loaded = load_pretrained_model(
            str(folder), None, "llava_qwen", device_map=args.device, torch_dtype=dtype, attn_implementation=args.attn
        )
    say(f"Model loaded in {time.perf_counter() - started:.1f} s.")
    return loaded


def read_frames(args, workdir: Path):
    """Decode the sampled frames (before the model loads, so a bad video fails fast). With no VIDEO: write the toy
    demo clip, and take its question (unless one was given) and expected answer."""
    from llava.video import load_video

    video = args.video
    if video is None:
        from llava.toy import demo_sample, write_mp4

        sample = demo_sample()
        video = str(write_mp4(sample, workdir / "toy-clip.mp4"))
        if args.question is None:
            args.question, args.expected = sample.question, sample.answer
        say(f"No video given: generated a toy clip ({sample.num_frames} frames, {sample.size}x{sample.size} px, "
            f"{len(sample.shapes)} shapes).")
    say(f"Decoding {args.frames} frames from {video} ...")
    frames, info = load_video(video, args.frames)
    say(f"Read {info.num_frames} frames of {info.total_frames} ({info.duration:.1f} s of video).")
    return frames, info


def prompt_ids(tokenizer, question: str, template: str) -> torch.Tensor:
    from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
    from llava.conversation import conv_templates
    from llava.mm_utils import tokenizer_image_token

    if template not in conv_templates:
        raise ValueError(f"Unknown conversation template {template!r}; available: {', '.join(sorted(conv_templates))}.")
    conv = conv_templates[template].copy()
    conv.append_message(conv.roles[0], f"{DEFAULT_IMAGE_TOKEN}\n{question}")
    conv.append_message(conv.roles[1], None)
    return tokenizer_image_token(conv.get_prompt(), tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")[None]


def generate_kwargs(model, tokenizer, pixels, max_new_tokens: int) -> dict:
    """The keyword arguments of ``model.generate`` besides the prompt ids: the video, greedy decoding."""
    return {"images": [pixels.to(model.device)], "modalities": ["video"], "max_new_tokens": max_new_tokens,
            "do_sample": False, "pad_token_id": tokenizer.pad_token_id}


def warm_up(model, tokenizer, ids, pixels, args, runs) -> None:
    """One short untimed run per method, so that no timed run pays a first call's one-time costs."""
    say("Warming up (one short untimed run per method) ...")
    for compressor, keep in runs:
        model.configure_compression(**compression_settings(args, compressor, keep))
        model.generate(ids.to(model.device), **generate_kwargs(model, tokenizer, pixels, max_new_tokens=2))


def measure(model, tokenizer, ids, pixels, args, compressor: str, keep_positions: bool | None = None) -> dict:
    """``args.runs`` timed generations with ``compressor``: the answer, the token count and every run's timing."""
    from llava.timing import timed_generate

    settings = compression_settings(args, compressor, keep_positions)
    model.configure_compression(**settings)
    details = ", ".join(f"{name}={value}" for name, value in settings.items() if name != "compressor")
    say(f"Generating with compressor={compressor}{f' ({details})' if details else ''}, {args.runs} run(s) ...")
    timings, trace = [], None
    for _ in range(args.runs):
        # --visualize records the kept tokens for the picture (no host-device sync added while generating).
        recording = model.compression_trace() if args.visualize else contextlib.nullcontext()
        with recording as recorded:
            output, timing = timed_generate(model, ids.to(model.device),
                                            **generate_kwargs(model, tokenizer, pixels, args.max_new_tokens))
        timings.append(timing)
        trace = recorded  # the last run's (all runs decode the same tokens)
    stats = model.last_compression_stats
    return {
        "compressor": compressor,
        "label": run_label(compressor, bool(settings.get("keep_positions"))),
        "answer": tokenizer.decode(output[0], skip_special_tokens=True).strip(),  # greedy: the same in every run
        "video_tokens": stats["video_tokens_after"],
        "timings": timings,
        "stats": stats,
        "trace": trace,
    }


# ---- printing ----------------------------------------------------------------------------------------------------


def escape_char(char: str) -> str:
    """``char``, or its Python escape (``\\n``, ``\\x07``, ``\\ufffd``) when it is not printable or is U+FFFD, the
    replacement character a tokenizer emits for bytes that do not decode."""
    if char.isprintable() and char != "\ufffd":
        return char
    return char.encode("unicode_escape").decode("ascii")


def one_line(text: str) -> str:
    """``text`` on one line, every non-printable character escaped."""
    return "".join(escape_char(char) for char in text)


def table_cell(text: str, width: int = ANSWER_CELL_WIDTH) -> str:
    """``text`` escaped for one table cell (``|`` too), shortened to ``width`` characters with "..."."""
    pieces = [r"\|" if char == "|" else escape_char(char) for char in text]
    if sum(map(len, pieces)) <= width:
        return "".join(pieces)
    cell = ""
    for piece in pieces:  # whole escapes only: never cut one in half
        if len(cell) + len(piece) > width - 3:
            break
        cell += piece
    return cell + "..."


def milliseconds(values: list[float | None]) -> str:
    """The median of ``values`` (seconds) in ms, with the range (min-max) when there are several: "58.4 (55.1-60.2)"."""
    values = [v * 1e3 for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def format_table(results: list[dict]) -> str:
    header = ["compressor", "video tokens", "vision ms", "prefill ms", "decode ms/token", "peak memory", "answer"]
    rows = []
    for result in results:
        timings = result["timings"]
        peaks = [t.peak_memory_bytes for t in timings if t.peak_memory_bytes is not None]
        memory = f"{max(peaks) / 2**20:.0f} MiB" if peaks else "n/a (CPU)"
        tokens = str(result["video_tokens"]) + ("*" if result["compressor"] == "fastv" else "")
        rows.append([
            result.get("label", result["compressor"]), tokens,
            milliseconds([t.vision_s for t in timings]),
            milliseconds([t.prefill_s for t in timings]),
            milliseconds([t.median_step_s for t in timings]),
            memory, table_cell(result["answer"]),
        ])
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def table_notes(results: list[dict], runs: int) -> list[str]:
    notes = [
        ("video tokens: the video tokens that enter the language model after compression (newline tokens "
         "not counted)."),
        "decode ms/token: the median interval between consecutive new tokens of a run.",
    ]
    if any(result.get("label", "").endswith("(kept positions)") for result in results):
        notes.append("(kept positions): --keep-positions, the kept video tokens at their uncompressed positions "
                     "(RoPE) and in their original order; without it they are packed together and renumbered.")
    if any(result["compressor"] == "fastv" for result in results):
        notes.append("* FastV drops video tokens inside the LM, from layer K on; the column counts the tokens "
                     "that enter it.")
    if runs > 1:
        notes.append(f"Times: median (min-max) of {runs} runs after a warm-up. Timings on a shared machine are noisy "
                     "(single runs vary several-fold): compare medians, and add --runs when the ranges overlap.")
    else:
        notes.append("Times: one run. Timings on a shared machine are noisy (single runs vary several-fold): use "
                     f"--runs {DEFAULT_RUNS_WITH_COMPARE} or more to compare methods.")
    return [textwrap.fill(note, width=110, subsequent_indent="  ") for note in notes]


def main(argv=None) -> int:
    args = parse_args(argv)
    from llava.video import VideoLoadError

    try:
        with tempfile.TemporaryDirectory() as workdir:
            frames, info = read_frames(args, Path(workdir))
        tokenizer, model, image_processor, _ = load(args)
        pixels = image_processor.preprocess(frames, return_tensors="pt")["pixel_values"]
        ids = prompt_ids(tokenizer, args.question, args.conv_template)
        runs = planned_runs(args)
        if len(runs) > 1 or args.runs > 1:
            warm_up(model, tokenizer, ids, pixels, args, runs)
        results = [measure(model, tokenizer, ids, pixels, args, c, keep) for c, keep in runs]
    except (VideoLoadError, FileNotFoundError, OSError, ValueError) as error:
        say(f"error: {error}")
        return 2
    print(f"Question: {one_line(args.question)}")
    if args.expected:
        print(f"Expected: {args.expected}")
    for result in results:
        print(f"Answer ({result.get('label', result['compressor'])}): {one_line(result['answer'])}")
    print()
    print(format_table(results))
    for note in table_notes(results, args.runs):
        print(note)
    if args.visualize:
        from llava.visualize import write_visualization

        try:
            write_visualization(args.visualize, frames, model, pixels, results, frame_times=info.frame_times)
        except OSError as error:
            say(f"error: cannot write {args.visualize}: {error}")
            return 2
        print(f"Wrote {args.visualize}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
