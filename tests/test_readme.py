"""The README's Python examples run, offline, exactly as the README says to run them.

The first test runs the README's offline commands (``llava-make-checkpoint ./llava-tiny --preset tiny`` and the
sample video), sets ``MODEL`` and ``VIDEO`` in the example to what they made, and runs the example's code block as
is. The second runs the toy model's example and compares its output with the one the README shows.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
EXAMPLE_SECTION = "## Use a real checkpoint from Python"
TOY_SECTION = "## The toy model: real answers and accuracy offline"


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.M | re.S)


def section(title: str) -> str:
    text = README.read_text()
    start = text.index(title)
    end = text.index("\n## ", start + len(title))
    return text[start:end]


def offline_env() -> dict:
    return dict(os.environ, PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
                HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")  # no network, and the CPU branch of the examples


def set_variable(code: str, name: str, value: str) -> str:
    """``code`` with its one ``NAME = "..."`` line set to ``value``."""
    pattern = re.compile(rf'^{name} = "[^"]*"', re.M)
    assert len(pattern.findall(code)) == 1, f"the README example should set {name} once, on its own line"
    return pattern.sub(f"{name} = {value!r}", code)


def test_readme_python_example_runs_offline(tmp_path):
    text = section(EXAMPLE_SECTION)
    example = code_blocks(text, "python")[0]
    offline = code_blocks(text, "bash")[0]
    assert "llava-make-checkpoint ./llava-tiny" in offline
    env = offline_env()
    for command in offline.splitlines():
        command = command.split("  #")[0].strip()
        if command:
            done = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True,
                                  timeout=300)
            assert done.returncode == 0, f"{command}\n{done.stderr}"
    assert (tmp_path / "llava-tiny" / "config.json").is_file() and (tmp_path / "sample.mp4").is_file()

    code = set_variable(set_variable(example, "MODEL", "./llava-tiny"), "VIDEO", "sample.mp4")
    script = tmp_path / "example.py"
    script.write_text(code)
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    last_line = done.stdout.strip().splitlines()[-1]
    assert re.match(r"dycoke: video tokens 512 -> \d+; KV pruning over \d+ decoding steps", last_line), last_line


def test_readme_toy_example_prints_what_the_readme_shows(tmp_path):
    """The toy model's example runs as is and prints exactly the output the README shows under it."""
    text = section(TOY_SECTION)
    script = tmp_path / "toy_example.py"
    script.write_text(code_blocks(text, "python")[0])
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=offline_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == code_blocks(text, "text")[0].strip()
