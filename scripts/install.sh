#!/usr/bin/env bash
# Install this package with its `eval` (lmms-eval) and `test` extras, editable, into the current Python.
#
#   bash scripts/install.sh            # CPU (default): CPU torch, lmms-eval without torchvision
#   bash scripts/install.sh --gpu      # GPU: the plain route (CUDA torch from the registry), then flash-attn
#   bash scripts/install.sh --latest   # either route, with the newest releases pyproject.toml's ranges allow
#
# By default every package is installed at the version in requirements-lock.txt (the exact set the whole suite
# last passed with; scripts/lock.py makes it): an upstream release cannot break a fresh install. `--latest`
# ignores the lock and takes the newest releases within pyproject.toml's tested ranges.
#
# Why the CPU route is not a plain `pip install -e .[eval,test]`:
#  * lmms-eval requires torchvision. The registry's newest torchvision wants a newer torch, so an unpinned
#    install would replace the CPU torch by a multi-GB CUDA one: torch is pinned to the installed version.
#  * The torchvision that matches is a CUDA build; next to a CPU torch it fails to import
#    ("operator torchvision::nms does not exist"), and transformers then cannot import its model classes.
#    Neither this package nor the paper's lmms-eval tasks use torchvision, so a broken one is removed, and
#    so is timm, which imports torchvision and is itself imported by `accelerate launch`.
# Re-running is safe: every step is idempotent. Environment:
#   PYTHON           interpreter to install into (default: python)
#   TORCH_SPEC       CPU torch to install (default: the lock's torch, torch==2.13.0 with --latest)
#   TORCH_PIP_ARGS   extra pip args for that torch, e.g. "--index-url https://download.pytorch.org/whl/cpu"
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
LOCK="$ROOT/requirements-lock.txt"
MODE=cpu
USE_LOCK=yes
for arg in "$@"; do
    case "$arg" in
        --gpu) MODE=gpu ;;
        --cpu) MODE=cpu ;;
        --latest) USE_LOCK=no ;;
        -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "install.sh: unknown option $arg (use --cpu, --gpu or --latest)" >&2; exit 2 ;;
    esac
done
LOCK_ARGS=()
if [ "$USE_LOCK" = yes ]; then
    if [ ! -f "$LOCK" ]; then
        echo "install.sh: $LOCK is missing (make it with scripts/lock.py, or install with --latest)" >&2
        exit 2
    fi
    LOCK_ARGS=(-c "$LOCK")
    LOCKED_TORCH="$(grep -E '^torch==' "$LOCK" || true)"
fi
TORCH_SPEC="${TORCH_SPEC:-${LOCKED_TORCH:-torch==2.13.0}}"

run() {
    echo "+ $*"
    "$@"
}

START=$SECONDS
FLASH_ATTN="not asked (GPU route only)"
VERSIONS="the newest releases within pyproject.toml's ranges"
if [ "$USE_LOCK" = yes ]; then VERSIONS="the versions in requirements-lock.txt"; fi
echo "Installing llava[eval,test] from $ROOT into $("$PYTHON" -c 'import sys; print(sys.prefix)') ($MODE, $VERSIONS)"

if [ "$MODE" = gpu ]; then
    run "$PYTHON" -m pip install "${LOCK_ARGS[@]}" -e "$ROOT[eval,test]"
    # flash-attn builds against the installed torch, so it cannot use pip's isolated build environment.
    # It is optional: without it the loader falls back to sdpa attention.
    run "$PYTHON" -m pip install packaging ninja wheel setuptools
    if run "$PYTHON" -m pip install --no-build-isolation flash-attn; then
        FLASH_ATTN=installed
    else
        FLASH_ATTN="NOT installed (build failed): attn_implementation=flash_attention_2 falls back to sdpa"
        echo "WARNING: flash-attn did not install; attn_implementation=flash_attention_2 will fall back to sdpa."
    fi
else
    # shellcheck disable=SC2086  # TORCH_PIP_ARGS is a list of words
    run "$PYTHON" -m pip install ${TORCH_PIP_ARGS:-} "${LOCK_ARGS[@]}" "$TORCH_SPEC"
    # Asked of the installed package's metadata, not of torch: importing torch before numpy is installed warns.
    TORCH_VERSION="$("$PYTHON" -c 'from importlib.metadata import version; print(version("torch").split("+")[0])')"
    CONSTRAINTS="$(mktemp)"
    trap 'rm -f "$CONSTRAINTS"' EXIT
    echo "torch==$TORCH_VERSION" > "$CONSTRAINTS"
    echo "# pinning torch==$TORCH_VERSION while installing the rest"
    run "$PYTHON" -m pip install -c "$CONSTRAINTS" "${LOCK_ARGS[@]}" -e "$ROOT[eval,test]"
    if ! "$PYTHON" -c 'import torchvision' > /dev/null 2>&1; then
        echo "# torchvision does not import next to this torch (a CUDA build): removing it and timm"
        run "$PYTHON" -m pip uninstall -y torchvision timm
    fi
fi

echo "# checking the install"
run "$PYTHON" - << 'EOF'
import torch
from transformers import Qwen2ForCausalLM  # noqa: F401  (fails if a broken torchvision is present)
from lmms_eval.models import get_model

for name in ("llava_onevision", "llava_vid"):
    cls = get_model(name)
    assert cls.__module__.startswith("llava.eval"), f"{name} resolves to {cls.__module__}, not this package's plugin"
print(f"OK: torch {torch.__version__} (CUDA: {torch.cuda.is_available()}), lmms-eval models -> llava.eval")
EOF
run "$PYTHON" -c 'from accelerate.commands.accelerate_cli import main'  # what `accelerate launch` imports
if [ "$USE_LOCK" = yes ]; then
    run "$PYTHON" "$ROOT/scripts/lock.py" --check  # every package at its locked version
fi

# A short summary: pip's output above is long.
MODE="$MODE" VERSIONS="$VERSIONS" FLASH_ATTN="$FLASH_ATTN" SECONDS_TAKEN="$((SECONDS - START))" "$PYTHON" - << 'EOF'
import os
from importlib.metadata import PackageNotFoundError, version

import torch


def installed(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


route = {"cpu": "CPU (CPU torch, pinned while the rest installed)", "gpu": "GPU (CUDA torch, then flash-attn)"}
cuda = f"yes, {torch.cuda.device_count()} GPU(s)" if torch.cuda.is_available() else "no"
print()
print("Summary")
print(f"  route:         {route[os.environ['MODE']]}")
print(f"  versions:      {os.environ['VERSIONS']}")
print(f"  torch:         {installed('torch')} (CUDA available: {cuda})")
print(f"  transformers:  {installed('transformers')}")
print(f"  lmms-eval:     {installed('lmms-eval')} (filelock {installed('filelock')})")
print(f"  llava:         {installed('llava')} (editable)")
print(f"  flash-attn:    {os.environ['FLASH_ATTN']}")
print(f"  time:          {os.environ['SECONDS_TAKEN']} s")
print("Next: llava-video --compare      (then the tests: python -m pytest -q)")
EOF
