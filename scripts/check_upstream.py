"""The upstream canary: would the newest releases of our dependencies break this package? Prints one line per
dependency (locked version, newest release, pass/fail, the first failing test and its error).

    python scripts/check_upstream.py                  # every watched dependency; exit 1 if any line fails
    python scripts/check_upstream.py --only transformers,filelock
    python scripts/check_upstream.py --no-together    # skip the fresh environment (install.sh --latest, newest)

How. For each watched dependency whose newest release is not the locked one, that release alone is laid over this
(locked) environment, in a throwaway folder put first on PYTHONPATH (``pip install --no-deps --target``), and the
canary tests run there: the line says what that one release breaks. Then, unless ``--no-together``, a throwaway
virtual environment gets ``scripts/install.sh --latest`` (what a new user's install resolves today, within
pyproject.toml's ranges: line "fresh install") and the tests run there; then every newest release on top, ignoring
the upper bounds (a new minor of transformers is exactly what the canary is for), and the tests run once more: line
"all newest together". A release that needs a new package of its own fails alone (named in its error) and shows in
that line.

The canary tests are the model, compression and lmms-eval tests (``CANARY_TESTS``). torch is not moved: its newest
release on the registry is a multi-GB CUDA build. .ci/run runs this after the locked suite and the floor tests and
reports a failure loudly without failing CI. README: "Dependencies, the lock and the canary".
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lock import LOCK, ROOT, read_lock  # noqa: E402
from packaging.utils import canonicalize_name  # noqa: E402

WATCHED = ("transformers", "tokenizers", "huggingface-hub", "accelerate", "kernels", "safetensors", "lmms-eval",
           "datasets", "filelock", "numpy", "av", "decord", "einops", "pillow")
# The model and compression tests, and the stock lmms-eval CLI end to end (eval.sh, baseline and DyCoke; llava_vid
# with DyCoke) plus the native wrappers: an explicit, smaller set than the suite, so CI stays short.
CANARY_TESTS = ("tests/test_transformers_compat.py", "tests/test_conformance.py", "tests/test_dycoke_kv.py",
                "tests/test_fastv.py", "tests/test_dycoke_model.py", "tests/test_compressors_model.py",
                "tests/test_ttm.py", "tests/test_vidcom2.py", "tests/test_layout.py",
                "tests/test_builder.py", "tests/test_native_models.py", "tests/test_lmms_eval_native.py",
                "tests/test_lmms_eval.py::test_docs_cpu_smoke_recipe_runs_eval_sh",
                "tests/test_lmms_eval.py::test_python_m_lmms_eval_llava_vid_with_dycoke")
# An error line: "SomeError: ...", "SomeException: ..." or lmms-eval's "Error during evaluation: ...".
CAUSE = re.compile(r"\b(?:[A-Z]\w*(?:Error|Exception)|Error during \w+): .*")


@dataclass
class Result:
    """The outcome of one canary run."""

    passed: bool
    first_failure: str = ""  # test id
    error: str = ""  # its error, one line

    def describe(self) -> str:
        if self.passed:
            return "pass"
        return f"FAIL  {self.first_failure}: {self.error}" if self.first_failure else f"FAIL  {self.error}"


def newest_release(name: str, python: str = sys.executable) -> str:
    """The newest release of ``name`` on the package registry (what pip would install, with no constraint)."""
    done = subprocess.run(
        [python, "-m", "pip", "install", "--dry-run", "--quiet", "--no-deps", "--ignore-installed", "--report", "-",
         name], capture_output=True, text=True, timeout=300,
    )
    if done.returncode != 0:
        raise RuntimeError(f"pip could not resolve {name}: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout)["install"][0]["metadata"]["version"]


def run_tests(python: str, env: dict, workdir: Path, tests=CANARY_TESTS, timeout: int = 1800) -> Result:
    """Run ``tests`` with ``python``; the first failure (in test order) from pytest's JUnit report."""
    report = workdir / f"junit-{time.monotonic_ns()}.xml"
    command = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *tests]
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Result(False, error=f"timed out after {timeout} s")
    if done.returncode == 0:
        return Result(True)
    return first_failure(report, done.stdout + done.stderr)


def first_failure(report: Path, output: str) -> Result:
    """The first failed or erroring test of a JUnit report (or the run's last output line when there is none)."""
    if report.exists():
        for case in ET.parse(report).getroot().iter("testcase"):
            for problem in list(case.findall("failure")) + list(case.findall("error")):
                test = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
                return Result(False, test, root_cause(problem.text or "") or one_line(problem.get("message") or ""))
    lines = [line for line in output.splitlines() if line.strip()]
    return Result(False, error=one_line(lines[-1] if lines else "no output"))


def root_cause(text: str) -> str:
    """The first error a failure's text names besides the test's own assertion (e.g. the ModuleNotFoundError that a
    subprocess printed), or "" when there is none."""
    for line in text.splitlines():
        match = CAUSE.search(line)
        if match and not match.group(0).startswith("AssertionError"):
            return one_line(match.group(0))
    return ""


def one_line(text: str, width: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def environment(**extra) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


def alone(name: str, version: str, workdir: Path) -> Result:
    """The canary tests in this environment with only ``name==version`` laid over it."""
    overlay = workdir / f"overlay-{name}"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(overlay),
                           f"{name}=={version}"], capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        return Result(False, error=f"pip install {name}=={version} failed: {one_line(done.stderr)}")
    path = os.pathsep.join(filter(None, [str(overlay), os.environ.get("PYTHONPATH")]))
    return run_tests(sys.executable, environment(PYTHONPATH=path), workdir)


def fresh_environment(newest: dict[str, str], workdir: Path) -> list[tuple[str, Result]]:
    """The canary tests in a fresh virtual environment: first as ``scripts/install.sh --latest`` leaves it (what a
    new user's install resolves today, within pyproject.toml's ranges), then with every newest release of
    ``newest`` on top, ignoring the upper bounds."""
    venv = workdir / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    env = environment(PYTHON=python)
    env.pop("PYTHONPATH", None)
    install = ["bash", str(ROOT / "scripts" / "install.sh"), "--latest"]
    upgrade = [python, "-m", "pip", "install", "--quiet", f"torch=={read_lock()['torch']}",
               *(f"{name}=={version}" for name, version in sorted(newest.items()))]
    results = []
    for label, step in (("fresh install (--latest)", install), ("all newest together", upgrade)):
        done = subprocess.run(step, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            error = f"{' '.join(step[:4])} ... failed: {root_cause(done.stderr) or one_line(done.stderr or done.stdout)}"
            return results + [(label, Result(False, error=error))]
        # The newest releases may bring back the CUDA torchvision that the CPU install removes.
        subprocess.run([python, "-m", "pip", "uninstall", "-y", "--quiet", "torchvision", "timm"], env=env,
                       capture_output=True, timeout=300)
        results.append((label, run_tests(python, env, workdir)))
        if label == "fresh install (--latest)" and not any(_beyond_install(python, newest)):
            break  # the fresh install already has every newest release: nothing more to try
    return results


def _beyond_install(python: str, newest: dict[str, str]):
    """For each newest release, whether the fresh install holds another version (yields booleans)."""
    done = subprocess.run([python, "-m", "pip", "list", "--format=json"], capture_output=True, text=True, timeout=300)
    installed = {canonicalize_name(item["name"]): item["version"] for item in json.loads(done.stdout or "[]")}
    for name, version in newest.items():
        yield installed.get(canonicalize_name(name)) != version


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated dependencies to check (default: all watched)")
    parser.add_argument("--no-together", action="store_true",
                        help="skip the fresh environment (install.sh --latest, then every newest release)")
    parser.add_argument("--keep", action="store_true", help="keep the throwaway folder (its path is printed)")
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(WATCHED)
    unknown = [name for name in names if name not in WATCHED]
    if unknown:
        parser.error(f"--only: {', '.join(unknown)} not watched; watched: {', '.join(WATCHED)}")
    locked = read_lock()
    workdir = Path(tempfile.mkdtemp(prefix="llava-canary-"))
    started = time.monotonic()
    rows, newest, failed = [], {}, False
    try:
        for name in names:
            latest = newest_release(name)
            if latest == locked.get(name):
                rows.append((name, locked[name], latest, "pass (the locked suite)"))
                continue
            newest[name] = latest
            result = alone(name, latest, workdir)
            failed |= not result.passed
            rows.append((name, locked.get(name, "-"), latest, result.describe()))
            print(f"canary: {name} {latest}: {result.describe()}", flush=True)
        if not args.no_together:
            for label, result in fresh_environment(newest, workdir):
                failed |= not result.passed
                rows.append((label, "", "fresh venv", result.describe()))
    finally:
        if args.keep:
            print(f"canary: throwaway folder kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print_table(rows, time.monotonic() - started)
    return 1 if failed else 0


def print_table(rows, seconds: float) -> None:
    widths = [max(len(str(row[i])) for row in rows + [("dependency", "locked", "newest", "")]) for i in range(3)]
    print(f"\nUpstream canary ({LOCK.name} vs the newest releases; {seconds:.0f} s)")
    print(f"{'dependency':<{widths[0]}}  {'locked':<{widths[1]}}  {'newest':<{widths[2]}}  result")
    for name, locked, latest, result in rows:
        print(f"{name:<{widths[0]}}  {locked:<{widths[1]}}  {latest:<{widths[2]}}  {result}")
    verdict = "all pass" if all(row[3].startswith("pass") for row in rows) else "SOME NEWEST RELEASES FAIL"
    print(f"canary: {verdict}")


if __name__ == "__main__":
    sys.exit(main())
