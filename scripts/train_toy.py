"""Train the toy LLaVA-OneVision checkpoint from scratch on synthetic video QA (``llava.toy.videoqa``), on a CPU.

The model is this package's own LLaVA-Qwen2 in the lmms-lab on-disk format (``llava.toy.model``: a small SigLIP-style
tower, the mlp2x_gelu projector, 16 tokens per frame, a 4-layer Qwen2 LM, the task's words kept whole by the
tokenizer), written first with random weights by the checkpoint maker and loaded with ``load_pretrained_model``,
exactly as it is loaded later. Each training clip is drawn on the fly (8 frames sampled as lmms-eval samples them);
the prompt is the ``qwen_1_5`` conversation, and the answers' loss is on the answer tokens (and the end-of-turn token)
only. Three dense auxiliary losses help the model learn from scratch within the CPU budget
(``llava.toy.supervision``; their linear heads are dropped at the end): the kind and the colour of the shape in every
patch the tower sees, and the direction of its motion from the LM's ``motion_layer`` output at every video token.
A fourth binds the question to the video: for the questions that name a shape (colour, direction), one attention
head of the LM (``binding_head`` of layer ``binding_layer``) is asked to rest, at the position that predicts the
answer, on the video tokens that show that shape (the LM is run with eager attention in training to return it).
``--drop-share`` (off by default) makes a share of the training videos reach the LM with random tokens of their later
frames dropped (never a shape's first sight), as compressors shorten videos. Measured with 0.5: the model then
learned every family but direction (25% held-out), so the shipped checkpoint was trained without it.
AdamW (the vision side and the heads at a 4x higher rate), linear warm-up then cosine decay, a fixed number of
steps: the same seed gives the same weights (on the same torch build and thread count).

At the end the weights are saved under their original names, the checkpoint is loaded again with
``load_pretrained_model`` and answers a held-out set (another seed, ``--eval-per-family`` clips of each family,
greedy); the accuracy per family is printed and written to ``toy_eval.json`` in the checkpoint folder.

    python scripts/train_toy.py                       # the full schedule, into llava/toy/checkpoint (about 27 min)
    python scripts/train_toy.py --schedule tiny --out /tmp/toy   # a few dozen steps, for tests (seconds)
    python scripts/train_toy.py --auxiliary-weight 0 --out /tmp/toy   # the answers' loss only
    python scripts/train_toy.py --drop-share 0.5 --out /tmp/toy       # half the videos shortened (not shipped)
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from llava.checkpoint_maker import WEIGHT_FILE_PATTERNS, save_sharded
from llava.compression.base import TokenSelection, VideoTokenCompressor, check_video_features, keep_all
from llava.toy import TOY_CHECKPOINT, TOY_EVAL_FILE, load_toy_model
from llava.toy.drawing import COLOURS, SHAPES
from llava.toy.model import make_untrained_checkpoint
from llava.toy.qa import accuracy_by_family, answer_samples, training_example, video_pixels
from llava.toy.supervision import BACKGROUND, UNKNOWN, cell_targets, subject_cells
from llava.toy.videoqa import DIRECTIONS, FAMILIES, HELD_OUT_SEED, SAMPLED_FRAMES, make_dataset, sample_stream

# Frames per training clip, drawn per clip (8, the evaluation's count, twice as often): as LLaVA models are trained
# on varied frame counts. With a single count the model ties the question to fixed positions and breaks when
# compression shortens the video before the LM (TTM, VidCom2): measured, 2-19% overall after merging at k=0.5-0.7.
TRAINING_FRAME_COUNTS = (2, 3, 4, 5, 6, 7, 8, 8)


@dataclass(frozen=True)
class Schedule:
    steps: int
    batch_size: int
    learning_rate: float
    warmup_steps: int
    eval_per_family: int
    vision_lr_factor: float = 4.0  # the tower and the projector learn this many times faster than the LM
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    auxiliary_weight: float = 1.0  # weight of each dense auxiliary loss (``llava.toy.supervision``); 0: answers only
    motion_layer: int = 2  # the LM layer whose output predicts each video token's motion
    binding_layer: int = 2  # the LM layer (0-based) and head whose attention at the answer is bound to the subject
    binding_head: int = 0
    drop_share: float = 0.0  # share of training videos whose later frames lose random tokens (``token_drop_plan``)
    max_drop_rate: float = 0.8  # such a video's drop rate is uniform in [0, max_drop_rate)


SCHEDULES = {
    "full": Schedule(steps=5000, batch_size=16, learning_rate=5e-4, warmup_steps=100, eval_per_family=100),
    "tiny": Schedule(steps=30, batch_size=4, learning_rate=5e-4, warmup_steps=5, eval_per_family=2),
}


def learning_rate_factor(step: int, schedule: Schedule) -> float:
    """Linear warm-up to 1, then cosine decay to 0 at the last step."""
    if step < schedule.warmup_steps:
        return (step + 1) / schedule.warmup_steps
    progress = (step - schedule.warmup_steps) / max(1, schedule.steps - schedule.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def parameter_groups(model, schedule: Schedule) -> list[dict]:
    """AdamW groups: matrices decay, vectors (norms, biases) do not; the vision side (tower, projector) learns
    ``vision_lr_factor`` times faster: a randomly initialised tower otherwise gets gradients too small to find the
    shapes before the LM settles on guessing the answer's prior."""
    groups = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        vision = "vision_tower" in name or "mm_projector" in name
        key = (vision, parameter.ndim >= 2)
        groups.setdefault(key, []).append(parameter)
    return [{"params": params, "lr": schedule.learning_rate * (schedule.vision_lr_factor if vision else 1.0),
             "weight_decay": schedule.weight_decay if decays else 0.0}
            for (vision, decays), params in sorted(groups.items())]


class AuxiliaryHeads(torch.nn.Module):
    """Linear read-outs used only in training (not saved): the kind and colour of the shape in a patch (from the
    projector's output), and, from the LM's ``motion_layer`` output at a video token, its shape's direction
    (``llava.toy.supervision``)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.kind = torch.nn.Linear(hidden_size, 1 + len(SHAPES))
        self.colour = torch.nn.Linear(hidden_size, 1 + len(COLOURS))
        self.motion = torch.nn.Linear(hidden_size, 1 + len(DIRECTIONS))


DENSE_TARGETS = ("kind", "colour", "motion", "binding")


def pooled_grid(model) -> int:
    """Video tokens per frame side (the cells of ``llava.toy.supervision`` that the LM's tokens stand for)."""
    return math.ceil(model.get_vision_tower().num_patches_per_side / model.config.mm_spatial_pool_stride)


def token_drop_plan(sample, grid: int, rng: np.random.Generator, schedule: Schedule) -> np.ndarray | None:
    """Which of ``sample``'s video tokens (frames * grid * grid, raster order) reach the LM, or None (all do): for
    a ``drop_share`` of the videos, every token of frame 0 and of a shape's first sight (what flash and order
    answers rest on) and, elsewhere, each token with probability 1 - rate, rate uniform in [0, ``max_drop_rate``)."""
    if rng.random() >= schedule.drop_share:
        return None
    targets = cell_targets(sample, grid)
    keep = rng.random(targets.kind.shape) >= rng.uniform(0, schedule.max_drop_rate)
    keep[0] = True
    keep |= (targets.kind != BACKGROUND) & (targets.motion == UNKNOWN)
    return keep.reshape(-1)


class PlannedTokenDrop(VideoTokenCompressor):
    """The training videos' token dropping as a video compressor: each video in turn gets the next plan of
    ``token_drop_plan`` (None: all kept), so the model's own layout code builds the shortened sequence."""

    name = "planned-drop"

    def __init__(self, plans: list[np.ndarray | None]):
        self.plans = list(plans)

    def select(self, features: torch.Tensor) -> TokenSelection:
        frames, cells, _ = check_video_features(features)
        plan = self.plans.pop(0)
        if plan is None:
            return keep_all(frames, cells, features.device)
        keep = torch.from_numpy(plan).to(features.device)
        return TokenSelection(index=keep.nonzero().flatten(), per_frame=keep.reshape(frames, cells).sum(1))


def spliced_inputs(model, batch: dict, plans: list[np.ndarray | None]):
    """The model's ``build_multimodal_inputs`` of ``batch``, each video's tokens dropped as its plan says."""
    def build():
        return model.build_multimodal_inputs(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                             batch["images"], batch["modalities"])

    if all(plan is None for plan in plans):
        return build()
    dropper = PlannedTokenDrop(plans)
    model.video_compressor = lambda: dropper  # on the instance: the compression mixin's hook, for this batch only
    try:
        return build()
    finally:
        del model.video_compressor


def kept_tokens(mm) -> list[np.ndarray]:
    """Per video of the batch, the indices (into its frames * cells tokens) of the tokens the LM received."""
    return [np.arange(video.tokens_before) if video.selection is None else video.selection.index.cpu().numpy()
            for video in mm.videos]


def dense_losses(heads: AuxiliaryHeads, samples, projected: torch.Tensor, grid: int, video_hidden: torch.Tensor,
                 kept: list[np.ndarray]) -> torch.Tensor:
    """The cross-entropy of the kind, colour and motion targets, (3,). Kind and colour are asked of every patch
    of the projector's output ``projected`` (frames of all samples, patches, D), which the pooled tokens average
    (per patch, the tower learns shape kinds several times faster than per pooled token: measured); motion of
    ``video_hidden`` (video tokens, D), the LM's hidden states at the video tokens that reached it (``kept``, per
    sample, of its frames * ``grid`` * ``grid`` cells), sample by sample."""
    cross_entropy = torch.nn.functional.cross_entropy
    patch_grid = math.isqrt(projected.shape[1])
    patch_targets = [cell_targets(sample, patch_grid) for sample in samples]
    kind, colour = (torch.from_numpy(np.concatenate([getattr(t, name).reshape(-1) for t in patch_targets]))
                    for name in ("kind", "colour"))
    motion = torch.from_numpy(np.concatenate([cell_targets(sample, grid).motion.reshape(-1)[index]
                                              for sample, index in zip(samples, kept, strict=True)]))
    patches = projected.reshape(-1, projected.shape[-1])
    return torch.stack((cross_entropy(heads.kind(patches), kind), cross_entropy(heads.colour(patches), colour),
                        cross_entropy(heads.motion(video_hidden), motion, ignore_index=UNKNOWN)))


def binding_loss(samples, attention: torch.Tensor, mm, grid: int, kept: list[np.ndarray]) -> torch.Tensor:
    """The mean over the samples whose question names a shape of -log(the attention mass that ``attention`` (B, S,
    S: one head's weights) puts, at the position predicting the first answer token, on the video tokens showing that
    shape (``subject_cells`` at ``grid``, of the tokens ``kept``, in the order of ``mm.video_token_mask``)). Zero if
    none does."""
    answer_at = (mm.labels != -100).int().argmax(dim=1) - 1  # logits at i predict the label at i + 1
    losses = []
    for row, sample in enumerate(samples):
        if sample.subject is None:
            continue
        video_positions = mm.video_token_mask[row].nonzero().flatten()
        shown = torch.from_numpy(subject_cells(sample, grid).reshape(-1)[kept[row]])
        if shown.any():  # a small shape can lose every cell it touches to a larger neighbour
            mass = attention[row, answer_at[row], video_positions[shown]].sum()
            losses.append(-torch.log(mass.clamp_min(1e-6)))
    return torch.stack(losses).mean() if losses else attention.new_zeros(())


def collate(tokenizer, image_processor, samples) -> dict:
    """A right-padded batch for the model's forward: ids, attention mask, labels (answers only), videos."""
    examples = [training_example(tokenizer, sample.question, sample.answer) for sample in samples]
    longest = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), longest), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, (row_ids, row_labels) in enumerate(examples):
        ids[row, : len(row_ids)] = torch.tensor(row_ids)
        labels[row, : len(row_labels)] = torch.tensor(row_labels)
        mask[row, : len(row_ids)] = 1
    videos = [video_pixels(image_processor, sample) for sample in samples]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "images": videos,
            "modalities": ["video"] * len(samples)}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(folder: Path, schedule: Schedule, seed: int, log_every: int, eval_every: int = 0) -> dict:
    """Write the random-weight checkpoint, train it, save the weights into ``folder``; returns training facts."""
    seed_everything(seed)
    make_untrained_checkpoint(folder, seed)
    tokenizer, model, image_processor = load_toy_model(folder)
    model.train()
    heads = AuxiliaryHeads(model.config.hidden_size)
    groups = parameter_groups(model, schedule)
    projected = []  # the projector's output of the current batch (the auxiliary kind and colour losses read it)
    if schedule.auxiliary_weight:
        model.set_attn_implementation("eager")  # the binding loss reads one head's attention weights
        # At the vision side's rate: the kind head and the tower must find the shapes together.
        groups.append({"params": list(heads.parameters()), "weight_decay": 0.0,
                       "lr": schedule.learning_rate * schedule.vision_lr_factor})
        model.get_model().mm_projector.register_forward_hook(
            lambda module, args, output: projected.__setitem__(slice(None), [output]))
    optimizer = torch.optim.AdamW(groups, lr=schedule.learning_rate, betas=(0.9, 0.98))
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate_factor(step, schedule))
    stream = sample_stream(seed, frame_counts=TRAINING_FRAME_COUNTS)
    drop_rng = np.random.default_rng(seed)
    started = time.perf_counter()
    running = None
    for step in range(schedule.steps):
        samples = [next(stream) for _ in range(schedule.batch_size)]
        answers_loss, dense = training_losses(model, heads, schedule, samples,
                                              collate(tokenizer, image_processor, samples), projected, drop_rng)
        loss = answers_loss + schedule.auxiliary_weight * dense.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, schedule.clip_norm)
        optimizer.step()
        scheduler.step()
        current = np.array([answers_loss.item(), *dense.tolist()])
        running = current if running is None else 0.95 * running + 0.05 * current
        if (step + 1) % log_every == 0 or step + 1 == schedule.steps:
            elapsed = time.perf_counter() - started
            dense_text = "  ".join(f"{name} {value:.3f}" for name, value in zip(DENSE_TARGETS, running[1:]))
            print(f"step {step + 1}/{schedule.steps}  loss {running[0]:.4f}  dense: {dense_text}  "
                  f"lr {scheduler.get_last_lr()[0]:.2e}  {elapsed:.0f} s", flush=True)
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < schedule.steps:
            probe_started = time.perf_counter()
            print("  held-out (20 per family):", format_accuracy(probe(model, tokenizer, image_processor, 20)),
                  flush=True)
            started += time.perf_counter() - probe_started  # progress checks are not training time
    seconds = time.perf_counter() - started
    save_weights(model, folder)
    return {"training_seconds": round(seconds, 1), "final_loss": round(float(running[0]), 4),
            **{f"final_{name}_loss": round(float(value), 4) for name, value in zip(DENSE_TARGETS, running[1:])},
            "parameters": sum(p.numel() for p in model.parameters())}


def training_losses(model, heads, schedule: Schedule, samples, batch: dict, projected: list,
                    rng: np.random.Generator):
    """(the answers' cross-entropy, the auxiliary losses (``DENSE_TARGETS``); zeros when ``auxiliary_weight`` is
    0). The prompt is spliced as the model's own forward splices it (with the videos' tokens dropped as
    ``token_drop_plan`` says), then run through the LM with its hidden states and attention weights."""
    grid = pooled_grid(model)
    mm = spliced_inputs(model, batch, [token_drop_plan(sample, grid, rng, schedule) for sample in samples])
    auxiliary = bool(schedule.auxiliary_weight)
    output = model(inputs_embeds=mm.inputs_embeds, attention_mask=mm.attention_mask.long(), labels=mm.labels,
                   output_hidden_states=auxiliary, output_attentions=auxiliary)
    if not auxiliary:
        return output.loss, torch.zeros(len(DENSE_TARGETS))
    kept = kept_tokens(mm)
    video_hidden = output.hidden_states[schedule.motion_layer][mm.video_token_mask]
    dense = dense_losses(heads, samples, projected[0], grid, video_hidden, kept)
    binding = binding_loss(samples, output.attentions[schedule.binding_layer][:, schedule.binding_head], mm, grid,
                           kept)
    return output.loss, torch.cat((dense, binding[None]))


def probe(model, tokenizer, image_processor, per_family: int) -> dict[str, float]:
    """Held-out accuracy of the model being trained (a progress check, not the reported accuracy)."""
    model.eval()
    samples = make_dataset(HELD_OUT_SEED + 1, per_family)
    answers = answer_samples(model, tokenizer, image_processor, samples)
    accuracy = accuracy_by_family([s.family for s in samples], [s.answer for s in samples], answers)
    model.train()
    return accuracy


def format_accuracy(accuracy: dict[str, float]) -> str:
    return "  ".join(f"{family} {value:.0%}" for family, value in accuracy.items())


def save_weights(model, folder: Path) -> None:
    """The trained weights under the checkpoint's names (tied embeddings: no ``lm_head.weight``), replacing the
    random ones."""
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for pattern in WEIGHT_FILE_PATTERNS:
        for stale in folder.glob(pattern):
            stale.unlink()
    save_sharded(state, folder, None)


def evaluate(folder: Path, per_family: int) -> dict[str, float]:
    """Held-out accuracy per family of the checkpoint as saved (loaded again with ``load_pretrained_model``)."""
    tokenizer, model, image_processor = load_toy_model(folder)
    samples = make_dataset(HELD_OUT_SEED, per_family)
    answers = answer_samples(model, tokenizer, image_processor, samples)
    return accuracy_by_family([s.family for s in samples], [s.answer for s in samples], answers)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schedule", choices=list(SCHEDULES), default="full",
                        help="full: the shipped checkpoint's training; tiny: a few dozen steps (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=TOY_CHECKPOINT,
                        help="checkpoint folder to write (replaced) (default: llava/toy/checkpoint)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the training clips (default: 0)")
    parser.add_argument("--steps", type=int, help="optimizer steps (default: the schedule's)")
    parser.add_argument("--eval-per-family", type=int, help="held-out clips per family (default: the schedule's)")
    parser.add_argument("--learning-rate", type=float, help="peak learning rate (default: the schedule's)")
    parser.add_argument("--vision-lr-factor", type=float,
                        help="vision-side learning-rate factor (default: the schedule's)")
    parser.add_argument("--auxiliary-weight", type=float,
                        help="weight of the dense auxiliary losses, 0 for answers only (default: the schedule's)")
    parser.add_argument("--drop-share", type=float,
                        help="share of training videos that lose random tokens, 0 for whole videos only "
                             "(default: the schedule's)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    parser.add_argument("--log-every", type=int, default=50, help="print the loss every N steps (default: 50)")
    parser.add_argument("--eval-every", type=int, default=0,
                        help="print a small held-out accuracy every N steps (default: never)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    schedule = SCHEDULES[args.schedule]
    if args.steps is not None:
        schedule = replace(schedule, steps=args.steps, warmup_steps=min(schedule.warmup_steps, args.steps))
    if args.learning_rate is not None:
        schedule = replace(schedule, learning_rate=args.learning_rate)
    if args.vision_lr_factor is not None:
        schedule = replace(schedule, vision_lr_factor=args.vision_lr_factor)
    if args.auxiliary_weight is not None:
        schedule = replace(schedule, auxiliary_weight=args.auxiliary_weight)
    if args.drop_share is not None:
        if not 0 <= args.drop_share <= 1:
            raise SystemExit(f"--drop-share must be in [0, 1], got {args.drop_share}")
        schedule = replace(schedule, drop_share=args.drop_share)
    if args.eval_per_family is not None:
        schedule = replace(schedule, eval_per_family=args.eval_per_family)
    torch.set_num_threads(args.threads)
    folder = args.out
    if folder.exists():
        shutil.rmtree(folder)
    print(f"Training the toy model ({args.schedule} schedule, seed {args.seed}, {args.threads} threads) into {folder}",
          flush=True)
    facts = train(folder, schedule, args.seed, args.log_every, args.eval_every)
    accuracy = evaluate(folder, schedule.eval_per_family)
    size_bytes = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    report = {
        "accuracy": accuracy,
        "eval": {"seed": HELD_OUT_SEED, "per_family": schedule.eval_per_family, "sampled_frames": SAMPLED_FRAMES,
                 "decoding": "greedy", "match": "exact after strip"},
        "training": {**facts, "seed": args.seed, "threads": args.threads, "schedule": args.schedule,
                     **asdict(schedule), "torch": torch.__version__},
        "checkpoint_bytes": size_bytes,
    }
    (folder / TOY_EVAL_FILE).write_text(json.dumps(report, indent=2) + "\n")
    print(f"Trained {facts['parameters']:,} parameters in {facts['training_seconds'] / 60:.1f} min; "
          f"checkpoint {size_bytes / 1e6:.1f} MB")
    print("Held-out accuracy (greedy, exact match):")
    for family in FAMILIES:
        print(f"  {family:<10} {accuracy[family]:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
