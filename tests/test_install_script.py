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
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then
    echo "$*" >> "{log}"
    case " $* " in *" -e "*) touch "{numpy_installed}" ;; esac
    exit 0
fi
if [ ! -e "{numpy_installed}" ]; then
    export PYTHONPATH="{no_numpy}${{PYTHONPATH:+:$PYTHONPATH}}"
fi
exec "{python}" "$@"
"""


def test_cpu_install_asks_no_torch_before_numpy_and_ends_with_a_summary(tmp_path):
    no_numpy = tmp_path / "no_numpy"
    (no_numpy / "numpy").mkdir(parents=True)
    (no_numpy / "numpy" / "__init__.py").write_text('raise ModuleNotFoundError("No module named \'numpy\'", name="numpy")\n')
    log = tmp_path / "pip.log"
    stand_in = tmp_path / "python"
    stand_in.write_text(STAND_IN.format(log=log, numpy_installed=tmp_path / "numpy-installed", no_numpy=no_numpy,
                                        python=sys.executable))
    stand_in.chmod(stand_in.stat().st_mode | stat.S_IEXEC)

    env = {name: value for name, value in os.environ.items() if name not in ("TORCH_SPEC", "TORCH_PIP_ARGS")}
    done = subprocess.run(["bash", str(SCRIPT)], env=dict(env, PYTHON=str(stand_in)), capture_output=True, text=True,
                          timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "NumPy" not in output  # torch was not imported before numpy was there
    torch_version = version("torch").split("+")[0]
    assert f"# pinning torch=={torch_version} while installing the rest" in output
    pip_calls = log.read_text().splitlines()
    assert pip_calls[0].endswith("install torch==2.13.0") and " -e " in f" {pip_calls[1]} "

    summary = done.stdout[done.stdout.index("\nSummary\n"):].splitlines()
    assert len(summary) <= 12, summary
    lines = "\n".join(summary)
    assert "route:         CPU" in lines
    assert f"torch:         {version('torch')} (CUDA available:" in lines
    assert f"transformers:  {version('transformers')}" in lines
    assert f"lmms-eval:     {version('lmms-eval')}" in lines
    assert "time:" in lines
    assert summary[-1].startswith("Next: llava-video --compare")
