"""What the toy model's colour and direction answers rest on: its held-out answers by shape count, where its LM
looks when it answers, and linear probes on the video tokens its LM receives (after the projector and pooling).

    python scripts/toy_probe.py                # 100 held-out clips per family; probes on 600 one-shape clips

Both families ask about one shape among up to three ("What colour is the {shape}?"), so the model must find the
tokens of the named kind (with one shape there is nothing to bind). The first table splits the held-out accuracy by
the number of shapes in the clip. The second gives, for each attention head of the LM, the share of its attention
at the position that predicts the answer that rests on the video tokens showing the named shape
(``llava.toy.supervision.subject_cells``), against the share of the video tokens they are: training binds one head
(``scripts/train_toy.py``, ``binding_layer``/``binding_head``). The probes ask whether the information is in the
tokens the LM reads. Each is a linear classifier fitted on standardised features of one-shape clips (480 fit,
120 test):

- ``kind``: the shape's kind (square, circle, triangle) from every token of the first frame;
- ``colour``: its colour from the same tokens (a control: a one-shape colour question is answered from them);
- ``direction``: its direction (left, right, up, down, none) from every token of the first and the last frame.
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np
import torch

from llava.toy import TOY_CHECKPOINT, load_toy_model
from llava.toy.drawing import COLOURS, SHAPES
from llava.toy.qa import answer_samples, prompt_ids, video_pixels
from llava.toy.supervision import subject_cells
from llava.toy.videoqa import DIRECTIONS, HELD_OUT_SEED, make_dataset, make_sample

PROBE_SEED = 2_000_003  # sample keys (PROBE_SEED, i, 0): neither the training stream's nor the held-out set's


def accuracy_by_shape_count(model, tokenizer, image_processor, per_family: int) -> dict[tuple[str, int], list[int]]:
    """(family, shapes in the clip) -> [right, asked], for the colour and direction families of the held-out set."""
    samples = make_dataset(HELD_OUT_SEED, per_family, families=("colour", "direction"))
    answers = answer_samples(model, tokenizer, image_processor, samples)
    counts: dict[tuple[str, int], list[int]] = {}
    for sample, answer in zip(samples, answers, strict=True):
        right_asked = counts.setdefault((sample.family, len(sample.shapes)), [0, 0])
        right_asked[0] += answer == sample.answer
        right_asked[1] += 1
    return dict(sorted(counts.items()))


@torch.no_grad()
def attention_on_subject(model, tokenizer, image_processor, per_family: int) -> tuple[np.ndarray, float]:
    """((layers, heads): the mean share of each head's attention, at the position predicting the answer, on the video
    tokens showing the shape the question names; the mean share of the video tokens they are), over the colour and
    direction clips of the held-out set. The LM runs with eager attention here (to return the weights)."""
    samples = make_dataset(HELD_OUT_SEED, per_family, families=("colour", "direction"))
    implementation = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        on_subject, subject_share = [], []
        for sample in samples:
            ids = torch.tensor([prompt_ids(tokenizer, sample.question)])
            mm = model.build_multimodal_inputs(ids, torch.ones_like(ids), None, [video_pixels(image_processor, sample)],
                                               ["video"])
            output = model(inputs_embeds=mm.inputs_embeds, attention_mask=mm.attention_mask.long(),
                           output_attentions=True)
            video_positions = mm.video_token_mask[0].nonzero().flatten()
            grid = math.isqrt(len(video_positions) // len(sample.sampled_indices()))
            shown = video_positions[torch.from_numpy(subject_cells(sample, grid).reshape(-1))]
            on_subject.append([layer[0, :, -1, shown].sum(-1).numpy() for layer in output.attentions])
            subject_share.append(len(shown) / len(video_positions))
    finally:
        model.set_attn_implementation(implementation)
    return np.mean(on_subject, axis=0), float(np.mean(subject_share))


@torch.no_grad()
def collect(model, image_processor, clips: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Features and labels of ``clips`` one-shape direction clips, per probe."""
    features = {"kind": [], "colour": [], "direction": []}  # the probes, in the order they are printed
    labels = {"kind": [], "colour": [], "direction": []}
    key = 0
    while len(labels["kind"]) < clips:
        key += 1
        sample = make_sample("direction", (PROBE_SEED, key, 0))
        if len(sample.shapes) != 1:
            continue
        shape = sample.shapes[0]
        tokens = model.get_2dPool(model.encode_images(video_pixels(image_processor, sample)))  # (F, cells, hidden)
        for name, label in (("kind", SHAPES.index(shape.kind)), ("colour", list(COLOURS).index(shape.colour))):
            features[name].append(tokens[0].reshape(-1).numpy())
            labels[name].append(label)
        features["direction"].append(tokens[[0, -1]].reshape(-1).numpy())
        labels["direction"].append(DIRECTIONS.index(shape.direction))
    return {name: (np.array(features[name]), np.array(labels[name])) for name in features}


def probe_accuracy(features: np.ndarray, labels: np.ndarray, classes: int, test_share: float = 0.2) -> float:
    """Test accuracy of a linear classifier (cross-entropy, Adam, weight decay) on standardised features."""
    torch.manual_seed(0)
    x = torch.tensor(features, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = torch.tensor(labels)
    split = int(len(y) * (1 - test_share))
    linear = torch.nn.Linear(x.shape[1], classes)
    optimizer = torch.optim.Adam(linear.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(500):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(linear(x[:split]), y[:split]).backward()
        optimizer.step()
    return (linear(x[split:]).argmax(1) == y[split:]).float().mean().item()


SOURCES = {"kind": "every token of the first frame", "colour": "every token of the first frame",
           "direction": "every token of the first and last frames"}


def run_probes(model, image_processor, clips: int) -> dict[str, tuple[float, float]]:
    """(test accuracy, chance) of each probe; chance is the most frequent class's share."""
    classes = {"kind": len(SHAPES), "colour": len(COLOURS), "direction": len(DIRECTIONS)}
    results = {}
    for name, (features, labels) in collect(model, image_processor, clips).items():
        chance = np.bincount(labels).max() / len(labels)
        results[name] = (probe_accuracy(features, labels, classes[name]), float(chance))
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(TOY_CHECKPOINT), help="checkpoint folder (default: the toy model)")
    parser.add_argument("--per-family", type=int, default=100,
                        help="held-out clips per family for the first table (default: 100, as the training report)")
    parser.add_argument("--clips", type=int, default=600, help="one-shape clips; 80%% fit, 20%% test (default: 600)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    args = parser.parse_args(argv)
    if args.clips < 10:
        parser.error(f"--clips must be at least 10, got {args.clips}")
    torch.set_num_threads(args.threads)
    tokenizer, model, image_processor = load_toy_model(args.model)
    print("| family | shapes in the clip | right | accuracy |\n|---|---:|---:|---:|")
    for (family, shapes), (right, asked) in accuracy_by_shape_count(model, tokenizer, image_processor,
                                                                    args.per_family).items():
        print(f"| {family} | {shapes} | {right}/{asked} | {right / asked:.0%} |")
    on_subject, subject_share = attention_on_subject(model, tokenizer, image_processor, args.per_family)
    heads = on_subject.shape[1]
    print(f"\nAttention at the answer on the named shape's tokens ({subject_share:.0%} of the video tokens):\n")
    print("| layer | " + " | ".join(f"head {h}" for h in range(heads)) + " |\n|---|" + "---:|" * heads)
    for layer, shares in enumerate(on_subject):
        print(f"| {layer} | " + " | ".join(f"{share:.0%}" for share in shares) + " |")
    print("\n| probe | from | test accuracy | chance |\n|---|---|---:|---:|")
    for name, (accuracy, chance) in run_probes(model, image_processor, args.clips).items():
        print(f"| {name} | {SOURCES[name]} | {accuracy:.0%} | {chance:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
