"""``llava-video``: ask a question about a video, with or without video-token compression.

    llava-video [VIDEO] ["question"] [--model PATH_OR_HUB_ID] [--compressor dycoke|vidcom2|fastv|none]
                [--frames 32] [--compare] [--visualize out.png]

With no ``--model`` it runs the built-in small random-weight checkpoint (its answers are noise: it shows
the pipeline, the token counts and the timings, not understanding). With no VIDEO it uses a generated
sample video.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import torch

COMPRESSORS = ("dycoke", "vidcom2", "fastv", "none")
DEFAULT_QUESTION = "What happens in this video? Describe the moving object."


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="llava-video", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("video", nargs="?", help="video file (default: a generated sample video)")
    parser.add_argument("question", nargs="?", default=DEFAULT_QUESTION)
    parser.add_argument("--model", help="checkpoint folder or hub id (default: the built-in small random-weight model)")
    parser.add_argument("--compressor", default="dycoke", choices=COMPRESSORS)
    parser.add_argument("--frames", type=int, default=32, help="frames sampled uniformly (default 32)")
    parser.add_argument("--compare", action="store_true", help="also run the baseline and print both side by side")
    parser.add_argument("--visualize", metavar="PNG", help="write a picture of the kept tokens to this PNG file")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--attn", default="sdpa", choices=("sdpa", "eager", "flash_attention_2"))
    parser.add_argument("--conv-template", default="qwen_1_5")
    for name, default in (("dycoke-k", 0.7), ("dycoke-l", 3), ("dycoke-p", 0.7), ("vidcom2-r", 0.25)):
        parser.add_argument(f"--{name}", type=type(default), default=default)
    args = parser.parse_args(argv)
    if args.frames < 1:
        parser.error(f"--frames must be >= 1, got {args.frames}")
    if args.visualize:  # fail before the model runs, not after
        if importlib.util.find_spec("matplotlib") is None:
            parser.error("--visualize needs matplotlib: pip install 'llava[viz]' (or pip install matplotlib)")
        if not Path(args.visualize).resolve().parent.is_dir():
            parser.error(f"--visualize: folder {str(Path(args.visualize).resolve().parent)!r} does not exist")
    return args


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load(args):
    from llava.checkpoint_maker import builtin_checkpoint
    from llava.model.builder import load_pretrained_model

    model_path = args.model
    if model_path is None:
        say("No --model given: using the built-in small random-weight checkpoint (its answers are random-weight output).")
        model_path = str(builtin_checkpoint())
    dtype = args.dtype or ("bfloat16" if str(args.device).startswith("cuda") else "float32")
    say(f"Loading model {model_path} on {args.device} ({dtype}, {args.attn}) ...")
    started = time.perf_counter()
    loaded = load_pretrained_model(
        model_path, None, "llava_qwen", device_map=args.device, torch_dtype=dtype, attn_implementation=args.attn
    )
    say(f"Model loaded in {time.perf_counter() - started:.1f} s.")
    return loaded


def read_frames(args, workdir: Path):
    """Decode the sampled frames (before the model loads, so a bad video fails fast)."""
    from llava.video import load_video, make_sample_video

    video = args.video
    if video is None:
        video = str(workdir / "sample.mp4")
        make_sample_video(video)
        say(f"No video given: generated a sample video ({video}).")
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


def compression_args(args, compressor: str) -> dict:
    return {
        "compressor": compressor, "dycoke_k": args.dycoke_k, "dycoke_l": args.dycoke_l, "dycoke_p": args.dycoke_p,
        "vidcom2_r": args.vidcom2_r,
    }


def run_once(model, tokenizer, ids, pixels, args, compressor: str) -> dict:
    from llava.timing import timed_generate

    model.configure_compression(**compression_args(args, compressor))
    say(f"Generating with compressor={compressor} ...")
    # --visualize records the kept tokens for the picture (no host-device sync added while generating).
    recording = model.compression_trace() if args.visualize else contextlib.nullcontext()
    with recording as trace:
        output, timing = timed_generate(
            model, ids.to(model.device), images=[pixels.to(model.device)], modalities=["video"],
            max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
        )
    stats = model.last_compression_stats
    return {
        "compressor": compressor,
        "answer": tokenizer.decode(output[0], skip_special_tokens=True).strip(),
        "visual_tokens": stats["video_tokens_after"],
        "timing": timing,
        "stats": stats,
        "trace": trace,
    }


def format_table(results: list[dict]) -> str:
    header = ["compressor", "visual tokens", "vision ms", "prefill ms", "decode ms/token", "peak memory", "answer"]
    rows = []
    for result in results:
        t = result["timing"]
        memory = f"{t.peak_memory_bytes / 2**20:.0f} MiB" if t.peak_memory_bytes is not None else "n/a (CPU)"
        decode = f"{t.decode_s_per_token * 1e3:.1f}" if t.decode_s_per_token is not None else "n/a"
        answer = result["answer"].replace("\n", " ")
        rows.append([result["compressor"], str(result["visual_tokens"]), f"{t.vision_s * 1e3:.1f}",
                     f"{t.prefill_s * 1e3:.1f}", decode, memory, answer[:60] + ("..." if len(answer) > 60 else "")])
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def main(argv=None) -> int:
    args = parse_args(argv)
    from llava.video import VideoLoadError

    try:
        with tempfile.TemporaryDirectory() as workdir:
            frames, info = read_frames(args, Path(workdir))
        tokenizer, model, image_processor, _ = load(args)
        pixels = image_processor.preprocess(frames, return_tensors="pt")["pixel_values"]
        ids = prompt_ids(tokenizer, args.question, args.conv_template)
        compressors = ["none", args.compressor] if args.compare and args.compressor != "none" else [args.compressor]
        if len(compressors) > 1:  # one untimed short run first, so the first timed method pays no warm-up
            say("Warming up ...")
            model.generate(ids.to(model.device), images=[pixels.to(model.device)], modalities=["video"],
                           max_new_tokens=2, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        results = [run_once(model, tokenizer, ids, pixels, args, c) for c in compressors]
    except (VideoLoadError, FileNotFoundError, OSError, ValueError) as error:
        say(f"error: {error}")
        return 2
    print(f"Question: {args.question}")
    for result in results:
        print(f"Answer ({result['compressor']}): {result['answer']}")
    if args.model is None:
        print("(The built-in model has random weights: its answer is noise. Pass --model for a real checkpoint.)")
    print(format_table(results))
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
