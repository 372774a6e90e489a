"""scripts/install.sh, run with a stand-in interpreter: pip commands are recorded instead of run, everything else
runs on this environment. Until the script's ``pip install -e`` step, numpy is missing (as on a fresh machine)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "install.sh"

STAND_IN = """#!/usr/bin/env bash
if [ "$1" = "-m" ] && [ "$2" = "pip" ] || [ "${{1##*/}}" = "lock.py" ]; then
    echo "$*" >> "{log}"
    case " $* " in *" -e "*) touch "{numpy_installed}" ;; esac
    exit 0
fi
if [ ! -e "{numpy_installed}" ]; then
    export PYTHONPATH="{no_numpy}${{PYTHONPATH:+:$PYTHONPATH}}"
fi
exec "{python}" "$@"
"""


LOCK = SCRIPT.parent.parent / "requirements-lock.txt"


def run_install(tmp_path, *options):
    """Run install.sh with the stand-in interpreter; returns (the finished process, the pip/lock calls it made)."""
    no_numpy = tmp_path / "no_numpy"
    (no_numpy / "numpy").mkdir(parents=True)
    (no_numpy / "numpy" / "__init__.py").write_text('raise ModuleNotFoundError("No module named \'numpy\'", name="numpy")\n')
    log = tmp_path / "pip.log"
    stand_in = tmp_path / "python"
    stand_in.write_text(STAND_IN.format(log=log, numpy_installed=tmp_path / "numpy-installed", no_numpy=no_numpy,
                                        python=sys.executable))
    stand_in.chmod(stand_in.stat().st_mode | stat.S_IEXEC)

    env = {name: value for name, value in os.environ.items() if name not in ("TORCH_SPEC", "TORCH_PIP_ARGS")}
    done = subprocess.run(["bash", str(SCRIPT), *options], env=dict(env, PYTHON=str(stand_in)), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done, log.read_text().splitlines()


def test_cpu_install_uses_the_lock_asks_no_torch_before_numpy_and_ends_with_a_summary(tmp_path):
    done, calls = run_install(tmp_path)
    output = done.stdout + done.stderr
    assert "NumPy" not in output  # torch was not imported before numpy was there
    locked_torch = next(line for line in LOCK.read_text().splitlines() if line.startswith("torch=="))
    torch_version = version("torch").split("+")[0]
    assert f"# pinning torch=={torch_version} while installing the rest" in output
    assert calls[0].endswith(f"install -c {LOCK} {locked_torch}")
    assert f" -c {LOCK} -e " in f" {calls[1]} "  # the rest, constrained by the lock
    assert calls[-1].endswith("lock.py --check")  # and checked against it

    summary = done.stdout[done.stdout.index("\nSummary\n"):].splitlines()
    assert len(summary) <= 12, summary
    lines = "\n".join(summary)
    assert "route:         CPU" in lines
    assert "versions:      the versions in requirements-lock.txt" in lines
    assert f"torch:         {version('torch')} (CUDA available:" in lines
    assert f"transformers:  {version('transformers')}" in lines
    assert f"lmms-eval:     {version('lmms-eval')}" in lines
    assert "time:" in lines
    assert summary[-1].startswith("Next: llava-video --compare")


def test_latest_ignores_the_lock(tmp_path):
    done, calls = run_install(tmp_path, "--latest")
    assert calls[0].endswith("install torch==2.13.0")
    assert not any("requirements-lock.txt" in call or "lock.py" in call for call in calls), calls
    assert "versions:      the newest releases within pyproject.toml's ranges" in done.stdout


def test_unknown_options_are_named(tmp_path):
    done = subprocess.run(["bash", str(SCRIPT), "--lates"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "unknown option --lates (use --cpu, --gpu or --latest)" in done.stderr
