"""Accuracy of each compression method on the toy video-QA model, per question family, against the video tokens
kept: one table (results/toy-accuracy.{json,md}) and one plot (figures/toy-accuracy.png).

    python scripts/accuracy.py                         # the shipped toy model, 100 held-out clips per family
    python scripts/accuracy.py --per-family 4 --methods baseline,dycoke   # a quick look

The clips are the ``llava_toy_videoqa`` lmms-eval task's (``llava.toy.lmms_task``; written into ``--data`` when the
folder has none): each mp4 is decoded with 8 frames sampled as lmms-eval samples them, preprocessed by the
checkpoint's image processor, asked with the ``qwen_1_5`` prompt and answered greedily, as lmms-eval's
``llava_onevision`` wrapper does; so the stock CLI on that task gives the same numbers (README, "The toy model").

Methods (``--methods``, groups of the table; each row one setting):

- ``baseline``: no compression;
- ``dycoke``: TTM merging + KV pruning, the paper's L=3 at k=0.7 with p in {0.5, 0.7, 0.9}, and L=2, k=0.7, p=0.7;
- ``merging``: DyCoke's TTM alone (p=0), k in {0.5, 0.7, 0.9};
- ``kv``: DyCoke's dynamic KV pruning alone (k=0), L=2, p in {0.5, 0.7, 0.9};
- ``fastv``: FastV's one-shot pruning at K=2, R in {0.5, 0.7, 0.9}: the same layers and budgets as ``kv``, so the
  pair isolates dynamic (re-chosen at decoding steps) against one-shot (chosen once at prefill) pruning;
- ``vidcom2``: r in {0.1, 0.25, 0.5};
- ``evs``: EVS (vLLM's efficient video sampling), q in {0.5, 0.75, 0.9} (about 50/25/10% of the video tokens kept),
  and q=0.75 followed by DyCoke's KV pruning (L=2, p=0.7);
- ``visionzip``, ``fastvid``, ``flashvid``, ``prunevid``, ``holitom``, ``framefusion``: each at its setting for about
  50%, 25% and 10% of the video tokens (their budgets are per frame, per merge or per layer, so the token columns
  say what each kept), and the pre-LLM ones (VisionZip, FastVID, FlashVID without its in-LLM stage) at 25% followed
  by DyCoke's KV pruning (L=2, p=0.7). The toy has 4 layers: an in-LLM stage the papers place at layer 10-20 of 28
  runs at layer 1-3 here (the ``*_layer`` / ``*_k`` arguments below).

Every row of a method that compresses before the LM (``dycoke``, ``merging``, ``vidcom2``, ``evs``) is run twice
(``--positions``): with the kept video tokens renumbered (packed together, as the public code does: the default) and
with ``keep_positions=True`` (each kept token at its uncompressed position, in its original order; "(kept
positions)" rows, dashed in the plot).

Token columns (means per clip): ``into LM``, the video tokens that enter the language model; ``attended deep``,
the video tokens that layers >= L (DyCoke) or >= K (FastV) attend to when decoding; ``per layer``, their mean over
all layers (the x axis of the plot). For DyCoke's KV pruning the script also reports the regime its decoding falls
in: the share of decoding steps, after the first, that recompute the active set (cos < 0.9), and the share of the
active set replaced on those steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llava.toy import TOY_CHECKPOINT, load_toy_model
from llava.toy.lmms_task import make_toy_task, read_task_rows
from llava.toy.qa import accuracy_by_family, answer_batch
from llava.toy.videoqa import FAMILIES, HELD_OUT_SEED, SAMPLED_FRAMES

PAPER = {"dycoke_k": 0.7, "dycoke_l": 3}


@dataclass(frozen=True)
class Method:
    group: str
    label: str
    settings: dict = field(hash=False)


def method_grid() -> list[Method]:
    methods = [Method("baseline", "baseline", {"compressor": "none"})]
    for p in (0.5, 0.7, 0.9):
        methods.append(Method("dycoke", f"DyCoke k=0.7 L=3 p={p}", {"compressor": "dycoke", **PAPER, "dycoke_p": p}))
    methods.append(Method("dycoke", "DyCoke k=0.7 L=2 p=0.7",
                          {"compressor": "dycoke", "dycoke_k": 0.7, "dycoke_l": 2, "dycoke_p": 0.7}))
    for k in (0.5, 0.7, 0.9):
        methods.append(Method("merging", f"merging alone k={k}", {"compressor": "dycoke", "dycoke_k": k, "dycoke_p": 0.0}))
    for p in (0.5, 0.7, 0.9):
        methods.append(Method("kv", f"KV pruning alone L=2 p={p}",
                              {"compressor": "dycoke", "dycoke_k": 0.0, "dycoke_l": 2, "dycoke_p": p}))
    for r in (0.5, 0.7, 0.9):
        methods.append(Method("fastv", f"FastV K=2 R={r}", {"compressor": "fastv", "fastv_k": 2, "fastv_r": r}))
    for r in (0.1, 0.25, 0.5):
        methods.append(Method("vidcom2", f"VidCom2 r={r}", {"compressor": "vidcom2", "vidcom2_r": r}))
    for q in (0.5, 0.75, 0.9):
        methods.append(Method("evs", f"EVS q={q}", {"compressor": "evs", "evs_rate": q}))
    methods.append(Method("evs", "EVS q=0.75 + KV L=2 p=0.7",
                          {"compressor": "evs", "evs_rate": 0.75, **KV}))
    methods += compared_methods()
    grid = []
    for m in methods:  # each row of a method before the LM, then the same with the positions kept
        grid.append(m)
        if m.group in PRE_LLM_GROUPS:
            grid.append(Method(m.group, f"{m.label} (kept positions)", {**m.settings, "keep_positions": True}))
    return grid


KV = {"dycoke_l": 2, "dycoke_p": 0.7}  # DyCoke's KV pruning after a pre-LLM method


def compared_methods() -> list[Method]:
    """The methods DyCoke is compared with, at about 50/25/10% of the video tokens (16 per frame on the toy)."""
    methods = []
    for dominant, contextual in ((6, 2), (3, 1), (1, 1)):  # VisionZip's 54:10 split of 8, 4, 2 tokens per frame
        methods.append(Method("visionzip", f"VisionZip {dominant}+{contextual}/frame", {
            "compressor": "visionzip", "visionzip_dominant": dominant, "visionzip_contextual": contextual}))
    for share in SHARES:
        methods.append(Method("fastvid", f"FastVID r={share}", {"compressor": "fastvid", "fastvid_retention_ratio": share}))
    for share in SHARES:  # the published in-LLM pruning (layer 20 of 28, 30% kept) at layer 3 of 4
        methods.append(Method("flashvid", f"FlashVID r={share}", {
            "compressor": "flashvid", "flashvid_retention_ratio": share, "flashvid_pruning_layer": 3}))
    for alpha in (1.0, 0.4, 0.1):  # the merging before the LLM keeps about half; alpha (0.4 published) the rest
        methods.append(Method("prunevid", f"PruneVid alpha={alpha}", {
            "compressor": "prunevid", "prunevid_alpha": alpha, "prunevid_layer": 1}))  # layer 10 of 28 -> 1 of 4
    for share in SHARES:  # the inner merge at layer 2 of 4 (18 of 28), half the video tokens merged away there
        methods.append(Method("holitom", f"HoliTom r={share}", {"compressor": "holitom", "holitom_r": share,
                                                                 "holitom_k": 2}))
    for share in SHARES:
        methods.append(Method("framefusion", f"FrameFusion cost={share}", {
            "compressor": "framefusion", "framefusion_cost": share}))
    methods.append(Method("visionzip", "VisionZip 3+1/frame + KV L=2 p=0.7", {
        "compressor": "visionzip", "visionzip_dominant": 3, "visionzip_contextual": 1, **KV}))
    methods.append(Method("fastvid", "FastVID r=0.25 + KV L=2 p=0.7", {
        "compressor": "fastvid", "fastvid_retention_ratio": 0.25, **KV}))
    methods.append(Method("flashvid", "FlashVID r=0.25 vision only + KV L=2 p=0.7", {
        "compressor": "flashvid", "flashvid_retention_ratio": 0.25, "flashvid_pruning_layer": 3,
        "flashvid_llm_retention_ratio": 1.0, **KV}))
    return methods


SHARES = (0.5, 0.25, 0.1)
MOVEMENT_SETTINGS = {"compressor": "dycoke", "dycoke_k": 0.0, "dycoke_l": 2, "dycoke_p": 0.7}
GROUPS = ("baseline", "dycoke", "merging", "kv", "fastv", "vidcom2", "evs", "visionzip", "fastvid", "flashvid",
          "prunevid", "holitom", "framefusion")
# a method before the LM only: rows with positions kept too
PRE_LLM_GROUPS = ("dycoke", "merging", "vidcom2", "evs", "visionzip", "fastvid")
POSITIONS = ("both", "renumbered", "kept")


def keeps_positions(method: Method) -> bool:
    return bool(method.settings.get("keep_positions"))


def load_videos(rows: list[dict], image_processor, num_frames: int) -> list[torch.Tensor]:
    """Each row's clip decoded as lmms-eval decodes it (``num_frames`` uniform frames) and preprocessed."""
    from llava.video import load_video

    return [image_processor.preprocess(load_video(row["video"], num_frames)[0], return_tensors="pt")["pixel_values"]
            for row in rows]


def token_counts(stats: dict, num_layers: int, rows: int) -> dict:
    """Video tokens per clip: entering the LM, attended by the deep layers when decoding, mean over layers. A
    decode-time stage reports either what each layer sees (``video_tokens_per_layer``: FrameFusion) or the tokens
    kept (or active) from its ``layer`` on (DyCoke's KV pruning, FastV and the methods built on it)."""
    into = stats["video_tokens_after"] / rows
    deep, per_layer = into, into
    for stage in (value for value in stats.values() if isinstance(value, dict)):
        if stage.get("video_tokens_per_layer"):
            layers = [statistics.fmean(row) for row in zip(*stage["video_tokens_per_layer"])]  # mean over rows
            deep, per_layer = layers[-1], statistics.fmean(layers)
        elif stage.get("kept_image_tokens") or stage.get("active_image_tokens"):
            deep = statistics.fmean(stage.get("kept_image_tokens") or stage["active_image_tokens"])
            per_layer = (stage["layer"] * into + (num_layers - stage["layer"]) * deep) / num_layers
    return {"into_lm": into, "attended_deep": deep, "per_layer": per_layer}


def regime(stats: dict, lengths: list[int]) -> dict | None:
    """DyCoke's decoding regime in one batch, counting each row's steps until its answer ended: steps after the
    first, and of those the ones that recomputed the active set, and the tokens that entered the set on them."""
    kv = stats.get("kv_pruning")
    if not kv or not kv.get("decode_steps"):
        return None
    steps = recomputed = entered = 0
    for row, length in enumerate(lengths):
        # Decoding step s produces answer token s + 2 (the prefill produced the first one).
        hits = [s for s in kv["recompute_steps"][row] if 0 < s < length - 1]
        steps += max(0, length - 2)
        recomputed += len(hits)
        entered += sum(kv["entered"][row][s] for s in hits)
    return {"steps": steps, "recomputed": recomputed, "entered": entered,
            "active": statistics.fmean(kv["active_image_tokens"]) if kv["active_image_tokens"] else 0}


def evaluate(model, tokenizer, rows, videos, method: Method, batch_size: int) -> dict:
    model.reset_compression()  # each row its own settings only (keep_positions, like every setting, persists)
    model.configure_compression(**method.settings)
    num_layers = model.config.num_hidden_layers
    answers, counts, regimes = [], [], []
    started = time.perf_counter()
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        got, lengths = answer_batch(model, tokenizer, [row["question"] for row in batch], videos[start : start + len(batch)])
        answers += got
        stats = model.last_compression_stats
        counts.append((len(batch), token_counts(stats, num_layers, len(batch))))
        regimes.append(regime(stats, lengths))
    total = sum(n for n, _ in counts)
    tokens = {key: sum(n * c[key] for n, c in counts) / total for key in counts[0][1]}
    families = [row["family"] for row in rows]
    accuracy = accuracy_by_family(families, [row["answer"] for row in rows], answers)
    accuracy["all"] = statistics.fmean(answer.strip() == row["answer"] for answer, row in zip(answers, rows))
    result = {"group": method.group, "label": method.label, "settings": method.settings, "accuracy": accuracy,
              "tokens": tokens, "seconds": round(time.perf_counter() - started, 1), "answers": answers}
    kept = [r for r in regimes if r is not None]
    if kept:
        steps = sum(r["steps"] for r in kept)
        recomputed = sum(r["recomputed"] for r in kept)
        result["regime"] = {
            "decode_steps_after_first": steps,
            "recompute_share": recomputed / steps if steps else 0.0,
            "replaced_share": (sum(r["entered"] for r in kept) / recomputed / statistics.fmean(r["active"] for r in kept)
                               if recomputed else 0.0),
        }
    return result


def active_set_movement(model, tokenizer, rows, videos, settings: dict) -> dict:
    """Where DyCoke's active set is while the ordered list is answered (KV pruning alone, so that every video token
    is one (frame, patch)): per clip, the mean sampled-frame index of the active tokens at the decoding steps that
    produce the second and the third colour (steps 1 and 3), next to the sampled frames where those colours first
    show. One clip per ``generate`` call: the trace records row 0."""
    from llava.toy.videoqa import make_sample

    model.reset_compression()
    model.configure_compression(**settings)
    second, third, shows_second, shows_third = [], [], [], []
    for row, video in zip(rows, videos):
        if row["family"] != "order":
            continue
        with model.compression_trace() as trace:
            answer_batch(model, tokenizer, [row["question"]], [video])
        if len(trace.active_positions) < 4:
            continue  # the answer ended early
        frames = len(video)
        per_frame = len(trace.video_positions) // frames  # k=0: every frame keeps all its tokens, newline last
        centre = [torch.searchsorted(trace.video_positions, trace.active_positions[step]).div(per_frame, rounding_mode="floor")
                  .float().mean().item() for step in (1, 3)]
        second.append(centre[0])
        third.append(centre[1])
        sample = make_sample("order", tuple(row["key"]))
        sampled = sample.sampled_indices().tolist()
        first_shown = sorted(next(i for i, f in enumerate(sampled) if shape.visible(f)) for shape in sample.shapes)
        shows_second.append(first_shown[1])
        shows_third.append(first_shown[2])
    count = len(second)
    return {
        "settings": settings, "clips": count,
        "active_centre_second_colour": statistics.fmean(second) if count else None,
        "active_centre_third_colour": statistics.fmean(third) if count else None,
        "moves_later_share": sum(b > a for a, b in zip(second, third)) / count if count else None,
        "second_colour_first_shown": statistics.fmean(shows_second) if count else None,
        "third_colour_first_shown": statistics.fmean(shows_third) if count else None,
    }


# ---- output ------------------------------------------------------------------------------------------------------


def markdown_table(results: list[dict]) -> str:
    header = ["method", "into LM", "attended deep", "per layer", *FAMILIES, "all", "recomputes"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for result in results:
        tokens, accuracy = result["tokens"], result["accuracy"]
        recompute = result.get("regime", {}).get("recompute_share")
        cells = [result["label"], f"{tokens['into_lm']:.0f}", f"{tokens['attended_deep']:.0f}", f"{tokens['per_layer']:.0f}",
                 *[f"{accuracy.get(family, float('nan')):.0%}" for family in FAMILIES], f"{accuracy['all']:.1%}",
                 "" if recompute is None else f"{recompute:.0%}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def composed(result: dict) -> bool:
    """A pre-LLM method followed by DyCoke's KV pruning (its own group, DyCoke's arguments given)."""
    return result["group"] not in ("dycoke", "merging", "kv") and "dycoke_p" in result["settings"]


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ["all", *FAMILIES]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5), sharex=True, sharey=True)
    colours = dict(zip(GROUPS, ("black", "tab:red", "tab:orange", "tab:purple", "tab:blue", "tab:green", "tab:brown",
                                "tab:pink", "tab:olive", "tab:cyan", "tab:gray", "gold", "navy")))
    markers = dict(zip(GROUPS, ("*", "o", "s", "D", "^", "v", "P", "X", "<", ">", "h", "p", "d")))
    for ax, panel in zip(axes.flat, panels):
        for group in GROUPS:
            for kept in (False, True):  # renumbered (solid), positions kept (dashed, open markers)
                points = sorted((r["tokens"]["per_layer"], r["accuracy"][panel]) for r in results
                                if r["group"] == group and panel in r["accuracy"] and not composed(r)
                                and bool(r["settings"].get("keep_positions")) == kept)
                if not points:
                    continue
                xs, ys = zip(*points)
                style = ("--" if kept else "-") if len(points) > 1 else "none"
                ax.plot(xs, [y * 100 for y in ys], marker=markers[group], color=colours[group],
                        label=f"{group} (kept positions)" if kept else group, linestyle=style,
                        markerfacecolor="white" if kept else colours[group],
                        markersize=9 if group == "baseline" else 6)
            extra = [r for r in results if r["group"] == group and composed(r) and panel in r["accuracy"]]
            for r in extra:  # a pre-LLM method followed by DyCoke's KV pruning: a point of its own
                kept = bool(r["settings"].get("keep_positions"))
                ax.plot(r["tokens"]["per_layer"], r["accuracy"][panel] * 100, marker=markers[group], linestyle="none",
                        color=colours[group], markeredgecolor="black", markersize=8,
                        markerfacecolor="white" if kept else colours[group],
                        label=f"{group} + KV pruning" + (" (kept positions)" if kept else ""))
        ax.set_title("all families" if panel == "all" else panel)
        ax.grid(alpha=0.3)
        ax.set_ylim(-3, 103)
    for ax in axes[-1]:
        ax.set_xlabel("video tokens per LM layer (mean)")
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy (%)")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 7), frameon=False, fontsize=7)
    fig.suptitle("Toy video QA: accuracy against the video tokens kept (scripts/accuracy.py)")
    fig.tight_layout(rect=(0, 0.09, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(TOY_CHECKPOINT), help="checkpoint folder (default: the toy model)")
    parser.add_argument("--data", default="results/toy-videoqa",
                        help="the llava_toy_videoqa task folder; written when it has no clips (default: %(default)s)")
    parser.add_argument("--per-family", type=int, default=100,
                        help="clips per family when the task is written (default: %(default)s)")
    parser.add_argument("--methods", default=",".join(GROUPS),
                        help=f"comma-separated groups among {', '.join(GROUPS)} (default: all)")
    parser.add_argument("--positions", default="both", choices=POSITIONS,
                        help="rows of the methods before the LM: kept tokens renumbered (the public code's), at "
                             "their uncompressed positions (keep_positions=True), or both (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16, help="questions per generate call (default: 16)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--out", default="results/toy-accuracy.json", help="JSON results (default: %(default)s)")
    parser.add_argument("--figure", default="figures/toy-accuracy.png", help="the plot (default: %(default)s)")
    args = parser.parse_args(argv)
    groups = [g.strip() for g in args.methods.split(",") if g.strip()]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown or not groups:
        parser.error(f"--methods: unknown {', '.join(unknown) or '(none given)'}; allowed: {', '.join(GROUPS)}")
    args.groups = groups
    for name in ("per_family", "batch_size", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    data = Path(args.data)
    if not (data / "videos").is_dir():
        print(f"Writing the llava_toy_videoqa clips ({args.per_family} per family) into {data} ...", flush=True)
        make_toy_task(data, args.per_family, HELD_OUT_SEED)
    rows = read_task_rows(data)
    tokenizer, model, image_processor = load_toy_model(args.model)
    videos = load_videos(rows, image_processor, SAMPLED_FRAMES)
    methods = [m for m in method_grid() if m.group in args.groups
               and (args.positions == "both" or keeps_positions(m) == (args.positions == "kept")
                    or m.group not in PRE_LLM_GROUPS)]
    print(f"{len(rows)} clips from {data}, {len(methods)} settings, model {args.model}", flush=True)
    results = []
    for method in methods:
        result = evaluate(model, tokenizer, rows, videos, method, args.batch_size)
        results.append(result)
        print(f"  {method.label:<45} all {result['accuracy']['all']:.1%}  "
              f"({result['tokens']['per_layer']:.0f} tokens per layer, {result['seconds']:.0f} s)", flush=True)
    movement = None
    if "kv" in args.groups:
        movement = active_set_movement(model, tokenizer, rows, videos, MOVEMENT_SETTINGS)
        if movement["clips"]:
            print(f"Active set while answering the ordered list (KV pruning alone, L=2, p=0.7; {movement['clips']} clips):"
                  f" mean frame {movement['active_centre_second_colour']:.2f} at the second colour, "
                  f"{movement['active_centre_third_colour']:.2f} at the third (later in "
                  f"{movement['moves_later_share']:.0%} of clips); the colours first show at frames "
                  f"{movement['second_colour_first_shown']:.2f} and {movement['third_colour_first_shown']:.2f}.")
    table = markdown_table(results)
    print()
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"model": args.model, "data": str(data), "clips": len(rows), "sampled_frames": SAMPLED_FRAMES,
              "torch": torch.__version__, "results": results, "active_set_movement": movement}
    out.write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text(table + "\n")
    plot(results, Path(args.figure))
    print(f"\nWrote {out}, {out.with_suffix('.md')} and {args.figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
