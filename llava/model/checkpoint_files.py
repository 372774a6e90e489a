"""Checks on a checkpoint folder's files, run before any weight is loaded.

Every error names the file or the weight at fault and says how to fix it, instead of the bare
``JSONDecodeError``, ``SafetensorError`` or "look at the above report" that the libraries underneath give.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError, safe_open

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
REDOWNLOAD = "download the checkpoint again"


def read_json(path: str | Path) -> dict:
    """A JSON file's content; invalid JSON is a ValueError naming the file, line and column."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path} is not valid JSON ({error.msg}: line {error.lineno}, column {error.colno}); "
            f"fix the file or {REDOWNLOAD}."
        ) from None


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the shards its index lists, or ``model.safetensors``.

    Empty when the folder has neither (e.g. ``pytorch_model.bin`` checkpoints, left to transformers).
    """
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no 'weight_map' (weight name -> shard file): {REDOWNLOAD}.")
        shards = [folder / name for name in sorted(set(weight_map.values()))]
        absent = [shard.name for shard in shards if not shard.is_file()]
        if absent:
            raise FileNotFoundError(f"{index} lists shard(s) missing from {folder}: {', '.join(absent)}; {REDOWNLOAD}.")
        return shards
    single = folder / SINGLE_FILE
    return [single] if single.is_file() else []


def stored_shapes(files: list[Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{weight name: (shape, file name)}`` read from the safetensors headers only (no tensor is loaded).

    Opening a file also checks that its size matches its header, so a truncated shard is caught here.
    """
    shapes = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    shapes[name] = (tuple(f.get_slice(name).get_shape()), path.name)
        except (SafetensorError, OSError) as error:
            raise ValueError(f"Weight file {path} cannot be read ({error}): it is truncated or corrupt; {REDOWNLOAD}.") from None
    return shapes


def compare_weights(stored: dict[str, tuple[tuple[int, ...], str]], expected: dict[str, tuple[int, ...]]) -> dict:
    """Missing, unexpected and wrongly shaped weights, in the form of transformers' loading info."""
    mismatched = [
        f"{name} ({file}): stored {list(shape)}, the model expects {list(expected[name])}"
        for name, (shape, file) in stored.items()
        if name in expected and shape != tuple(expected[name])
    ]
    return {
        "missing_keys": sorted(set(expected) - set(stored)),
        "unexpected_keys": sorted(set(stored) - set(expected)),
        "mismatched_keys": sorted(mismatched),
    }


# A Qwen2 tokenizer is either a tokenizers-library file or the vocab + merges pair of the slow tokenizer.
TOKENIZER_FILE_SETS = (("tokenizer.json",), ("vocab.json", "merges.txt"))


def check_tokenizer_files(folder: Path) -> None:
    if any(all((folder / name).is_file() for name in names) for names in TOKENIZER_FILE_SETS):
        return
    raise FileNotFoundError(
        f"{folder} has no tokenizer files: a Qwen2 checkpoint needs tokenizer.json, or vocab.json and merges.txt "
        f"(with tokenizer_config.json); copy them from the original checkpoint or {REDOWNLOAD}."
    )
