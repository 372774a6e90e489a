"""Why the toy model misses two question families: its held-out answers by shape count, and linear probes on the
video tokens its language model receives (after the projector and pooling).

    python scripts/toy_probe.py                # 100 held-out clips per family; probes on 600 one-shape clips

The shipped toy model misses the colour and direction families (README, "The toy model"). The first table splits
its held-out accuracy on them by the number of shapes in the clip (one shape: nothing to bind the question's shape
to). The probes ask whether the information is in the tokens the LM reads, and the LM does not use it, or is not
there. Each is a linear classifier fitted on standardised features of one-shape clips (480 fit, 120 test):

- ``kind``: the shape's kind (square, circle, triangle) from every token of the first frame;
- ``colour``: its colour from the same tokens (a control: the model does answer colour questions);
- ``direction``: its direction (left, right, up, down, none) from every token of the first and the last frame.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from llava.toy import TOY_CHECKPOINT, load_toy_model
from llava.toy.drawing import COLOURS, SHAPES
from llava.toy.qa import answer_samples, video_pixels
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
    print("\n| probe | from | test accuracy | chance |\n|---|---|---:|---:|")
    for name, (accuracy, chance) in run_probes(model, image_processor, args.clips).items():
        print(f"| {name} | {SOURCES[name]} | {accuracy:.0%} | {chance:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
