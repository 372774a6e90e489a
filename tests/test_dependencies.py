"""The lock (scripts/lock.py, requirements-lock.txt), the tested ranges (pyproject.toml) and the upstream canary
(scripts/check_upstream.py)."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
lock = load_script("lock")
canary = load_script("check_upstream")


def project_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return [Requirement(line) for line in project["dependencies"] + extras["eval"] + extras["test"]]


def test_the_lock_pins_every_requirement_within_the_tested_ranges():
    pins = lock.read_lock(ROOT / "requirements-lock.txt")
    for requirement in project_requirements():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not in the lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} vs {requirement}"


def test_transformers_and_lmms_eval_are_bounded_at_the_newest_tested_minor():
    ranges = {canonicalize_name(r.name): r.specifier for r in project_requirements()}
    pins = lock.read_lock(ROOT / "requirements-lock.txt")
    for name in ("transformers", "lmms-eval"):
        upper = [spec for spec in ranges[name] if spec.operator == "<"]
        assert len(upper) == 1, f"{name} needs one upper bound: {ranges[name]}"
        major, minor = (int(part) for part in pins[name].split(".")[:2])
        assert upper[0].version in (f"{major}.{minor + 1}", f"{major + 1}.0"), (name, upper[0], pins[name])
    assert not ranges["filelock"].contains("4.3.0")  # lmms-eval 0.7.3 imports filelock._api, gone in 4.3.0


def test_lock_text_round_trips_and_differences_are_named(tmp_path):
    text = lock.lock_text({"torch": "2.13.0+cpu", "numpy": "2.4.6"}, {"torchvision"})
    path = tmp_path / "lock.txt"
    path.write_text(text)
    assert lock.read_lock(path) == {"numpy": "2.4.6", "torch": "2.13.0"}  # the local build tag is not a release
    assert "torchvision" in text.splitlines()[3]  # named as required but not installed
    assert lock.differences({"numpy": "2.4.6", "torch": "2.13.0"}, {"numpy": "2.4.6", "torch": "2.13.0+cpu"}) == []
    assert lock.differences({"numpy": "2.4.6"}, {"numpy": "2.5.0", "av": "15.1.0"}) == [
        "av: locked -, installed 15.1.0", "numpy: locked 2.4.6, installed 2.5.0"]


def test_the_closure_follows_requirements_extras_and_markers():
    versions, _ = lock.installed_closure("pytest", ())
    assert "pluggy" in versions and "iniconfig" in versions  # pytest's own requirements
    assert "llava" not in lock.installed_closure()[0]  # the project itself is not pinned
    with_eval = lock.installed_closure("llava", ("eval",))[0]
    assert "lmms-eval" in with_eval and "lmms-eval" not in lock.installed_closure("llava", ())[0]


def test_the_canary_reports_the_first_failing_test_and_its_error(tmp_path):
    (tmp_path / "test_sample.py").write_text(
        "def test_passes():\n    pass\n\n"
        "def test_breaks():\n    import filelock._api_gone_for_this_test  # noqa\n"
    )
    result = canary.run_tests(sys.executable, canary.environment(), tmp_path, tests=[str(tmp_path / "test_sample.py")])
    assert not result.passed
    assert result.first_failure.endswith("test_sample.py::test_breaks")
    assert "No module named 'filelock._api_gone_for_this_test'" in result.error
    (tmp_path / "test_sample.py").write_text(
        "import subprocess, sys\n\n"
        "def test_a_subprocess_fails():\n"
        "    done = subprocess.run([sys.executable, '-c', 'import filelock._api_gone'], capture_output=True, text=True)\n"
        "    assert done.returncode == 0, done.stderr\n"
    )
    result = canary.run_tests(sys.executable, canary.environment(), tmp_path, tests=[str(tmp_path / "test_sample.py")])
    assert result.error.startswith("ModuleNotFoundError: No module named 'filelock._api_gone'")  # the cause, not the assert
    (tmp_path / "test_sample.py").write_text("def test_passes():\n    pass\n")
    assert canary.run_tests(sys.executable, canary.environment(), tmp_path,
                            tests=[str(tmp_path / "test_sample.py")]).passed


def test_the_canary_checks_only_what_moved_and_fails_loudly(monkeypatch, capsys):
    locked = lock.read_lock(ROOT / "requirements-lock.txt")
    newest = {"transformers": "99.0.0", "filelock": locked["filelock"]}
    monkeypatch.setattr(canary, "newest_release", lambda name: newest[name])
    checked = []

    def alone(name, version, workdir):
        checked.append((name, version))
        return canary.Result(False, "tests/test_x.py::test_y", "AttributeError: renamed")

    monkeypatch.setattr(canary, "alone", alone)
    assert canary.main(["--only", "transformers,filelock", "--no-together"]) == 1
    out = capsys.readouterr().out
    assert checked == [("transformers", "99.0.0")]  # filelock's newest is the locked one: the locked suite covers it
    assert f"filelock      {locked['filelock']}" in out and "pass (the locked suite)" in out
    assert "FAIL  tests/test_x.py::test_y: AttributeError: renamed" in out
    assert out.rstrip().endswith("canary: SOME NEWEST RELEASES FAIL")


def test_the_canary_names_unknown_dependencies(capsys):
    with pytest.raises(SystemExit):
        canary.main(["--only", "transformer"])
    assert "--only: transformer not watched; watched: transformers" in capsys.readouterr().err
