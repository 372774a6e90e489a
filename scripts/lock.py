"""Write (or check) requirements-lock.txt: the exact version of every package ``llava[eval,test]`` needs, read off
the current environment.

    python scripts/lock.py            # after the whole suite passed here: write requirements-lock.txt
    python scripts/lock.py --check    # does this environment hold exactly the locked versions? (exit 1 if not)
    python scripts/lock.py --print    # the lock this environment would give, on standard output

The lock is the closure of the project's requirements (its dependencies and the ``eval`` and ``test`` extras,
following each package's own requirements and markers) as installed, one ``name==version`` a line. It is what
``scripts/install.sh`` installs by default (as pip constraints); ``--latest`` ignores it. Packages the CPU install
removes on purpose (torchvision and timm: the registry's builds do not import next to the CPU torch) are not
installed, so not locked; pip picks them by the other pins on the GPU route.

Moving the lock forward (README, "Dependencies, the lock and the canary"): run ``scripts/check_upstream.py``, fix
what it finds, raise the bounds in pyproject.toml, ``bash scripts/install.sh --latest``, run the suite, then this
script.
"""

from __future__ import annotations

import argparse
import platform
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements-lock.txt"
PROJECT, EXTRAS = "llava", ("eval", "test")


def installed_closure(project: str = PROJECT, extras: tuple[str, ...] = EXTRAS) -> tuple[dict[str, str], set[str]]:
    """(name -> installed version, names required but not installed) for everything ``project[extras]`` needs."""
    versions: dict[str, str] = {}
    missing: set[str] = set()
    pending = [(project, set(extras))]
    seen: set[tuple[str, frozenset]] = set()
    while pending:
        name, wanted = pending.pop()
        key = (canonicalize_name(name), frozenset(wanted))
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            missing.add(canonicalize_name(name))
            continue
        if canonicalize_name(name) != PROJECT:
            versions[canonicalize_name(name)] = dist.version
        for line in dist.requires or []:
            requirement = Requirement(line)
            marker = requirement.marker
            if marker is None or any(marker.evaluate({"extra": extra}) for extra in wanted | {""}):
                pending.append((requirement.name, set(requirement.extras)))
    return versions, missing - set(versions)


def public_version(version: str) -> str:
    """``2.13.0+cpu`` -> ``2.13.0``: the local build tag names this machine's build, not the release."""
    return version.split("+")[0]


def lock_text(versions: dict[str, str], missing: set[str]) -> str:
    import torch
    import transformers

    header = [
        "# Exact versions the whole suite passed with (made by scripts/lock.py; do not edit by hand).",
        f"# Python {platform.python_version()} on {sys.platform}/{platform.machine()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}.",
        "# scripts/install.sh installs with these as pip constraints; `--latest` ignores them.",
    ]
    if missing:
        header.append(f"# Required but not installed here (the CPU install removes them): {', '.join(sorted(missing))}")
    return "\n".join(header + [f"{name}=={public_version(versions[name])}" for name in sorted(versions)]) + "\n"


def read_lock(path: Path = LOCK) -> dict[str, str]:
    """name -> version of a lock file."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


def differences(locked: dict[str, str], versions: dict[str, str]) -> list[str]:
    """What this environment has that differs from the lock, one line each."""
    lines = []
    for name in sorted(set(locked) | set(versions)):
        want, have = locked.get(name), versions.get(name)
        have = public_version(have) if have else None
        if want != have:
            lines.append(f"{name}: locked {want or '-'}, installed {have or '-'}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="compare this environment with the lock (exit 1 if it differs)")
    mode.add_argument("--print", action="store_true", help="print the lock of this environment instead of writing it")
    args = parser.parse_args(argv)
    versions, missing = installed_closure()
    if args.check:
        diff = differences(read_lock(), versions)
        for line in diff:
            print(f"lock.py: {line}")
        print(f"lock.py: this environment {'differs from' if diff else 'matches'} {LOCK.name} ({len(versions)} packages)")
        return 1 if diff else 0
    text = lock_text(versions, missing)
    if args.print:
        sys.stdout.write(text)
    else:
        LOCK.write_text(text)
        print(f"lock.py: wrote {LOCK.name} ({len(versions)} packages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
