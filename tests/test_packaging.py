"""The project installs as a package: `pip install .` gives a `workbench` command and carries its data."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from workbench import presets
from workbench.testing import ROOT

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
# What a build never needs: tests, benchmarks, and what a checkout accumulates when used.
_NEVER_BUILT = shutil.ignore_patterns(
    ".git", "tests", "benchmarks", "runs", "cache", ".cache", "artifacts", "build", "dist",
    "*.egg-info", "__pycache__", ".venv", "venv", ".pytest_cache", ".ruff_cache",
)  # fmt: skip


def NOT_BUILT(folder: str, names: list[str]) -> set[str]:
    """The patterns above anywhere; exported students (student*/) only at the top, not
    workbench/student.py."""
    top = {n for n in names if n.startswith("student")} if Path(folder) == ROOT else set()
    return set(_NEVER_BUILT(folder, names)) | top


def test_setuptools_packages_name_every_package_under_workbench():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    on_disk = {
        ".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "workbench").rglob("__init__.py")
    }
    assert on_disk - listed == set(), "add these packages to pyproject.toml [tool.setuptools] packages"
    assert listed - on_disk == {"workbench._presets"}  # presets/, mapped by package-dir
    assert PYPROJECT["tool"]["setuptools"]["package-dir"]["workbench._presets"] == "presets"


def test_dependencies_are_requirements_txt_and_each_line_parses():
    assert "dependencies" in PYPROJECT["project"]["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["dependencies"] == {"file": ["requirements.txt"]}
    lines = (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines()
    # setuptools drops whole-line comments only; anything else must be a requirement on its own
    reqs = [Requirement(line) for line in lines if line.strip() and not line.strip().startswith("#")]
    names = [r.name for r in reqs]
    assert len(names) == len(set(names)), f"a requirement is listed twice: {names}"
    assert "torch" in names


def test_presets_dir_is_the_checkout_folder_here(monkeypatch):
    monkeypatch.delenv("WORKBENCH_PRESETS_DIR", raising=False)
    assert presets.presets_dir() == ROOT / "presets"
    assert "ssd-1b" in presets.list_presets()


def _run(cmd: list, cwd: Path, **env) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "WORKBENCH_PRESETS_DIR")}
    done = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=full_env | env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_with_command_and_data(tmp_path):
    """Build a wheel from a copy of the checkout, install it (no deps: torch & co. come from the
    system site-packages) and use it from a folder that is not the checkout."""
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=NOT_BUILT)
    wheels = tmp_path / "wheels"
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", wheels, "."], source
    )
    (wheel,) = wheels.glob("*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=True)
    bin_dir = env_dir / ("Scripts" if os.name == "nt" else "bin")
    python = bin_dir / "python"
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", wheel], tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    help_text = _run([bin_dir / "workbench", "--help"], elsewhere).stdout
    assert help_text == _run([python, "-m", "workbench", "--help"], elsewhere).stdout
    assert "units" in help_text and "distill" in help_text

    site = _run([python, "-c", "import workbench; print(workbench.__file__)"], elsewhere).stdout.strip()
    assert Path(site).parent.parent != ROOT, "the installed copy, not the checkout, was imported"
    listed = _run(
        [
            python,
            "-c",
            "from workbench import presets; print(presets.presets_dir()); print(*presets.list_presets())",
        ],
        elsewhere,
    ).stdout.splitlines()
    assert Path(listed[0]) == Path(site).parent / "_presets"
    assert listed[1].split() == sorted(p.stem for p in (ROOT / "presets").glob("*.json"))

    # The toy teacher (assets) and a preset, read from the installed copy.
    plan = _run(
        [bin_dir / "workbench", "plan", "--base", "toy", "--preset", "ssd-1b"], elsewhere, HF_HUB_OFFLINE="1"
    )
    assert "plan 'ssd-1b' on toy" in plan.stdout
    configs = _run(
        [
            python,
            "-c",
            "from workbench.models import CONFIG_DIR; print(*sorted(p.name for p in CONFIG_DIR.iterdir()))",
        ],
        elsewhere,
    )
    assert configs.stdout.split() == sorted(p.name for p in (ROOT / "workbench" / "configs").iterdir())
