"""The programs as `pip install .` gives them to an operator, not as the checkout runs them.

The suite runs from an editable install, which reads every file from the checkout: a file the
packages open at run time but the wheel leaves out (the manifest and the field definitions once
were) breaks only the installed programs. This builds the wheel as pip does (no build isolation,
no network: setuptools comes with the test extras), compares its files with the packages' files,
and runs the console scripts from the unpacked wheel, in a folder outside the checkout.
"""
from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("agent_input", "kibana_assets")
_JUNK = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist", ".*")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The unpacked wheel, built from a copy of the sources (a build/ left in the checkout by an
    earlier `pip install .` would hand the wheel files that the package data no longer names)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md", "manifest.yml"):  # setup.py copies the manifest in
        shutil.copy2(ROOT / name, src / name)
    for package in PACKAGES:
        shutil.copytree(ROOT / package, src / package, ignore=_JUNK)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--wheel-dir", str(tmp / "dist"), str(src)],
        capture_output=True, text=True, timeout=300, cwd=tmp)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (built,) = (tmp / "dist").glob("*.whl")
    site = tmp / "site"
    with zipfile.ZipFile(built) as zf:
        zf.extractall(site)
    return site


def _package_files(base: Path) -> set[str]:
    return {p.relative_to(base).as_posix() for package in PACKAGES for p in (base / package).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}


def test_the_wheel_holds_every_file_of_the_packages(wheel):
    """Whatever lies in a package folder is there to be imported or read at run time."""
    missing = _package_files(ROOT) - _package_files(wheel)
    assert not missing, f"not in the wheel (name them in [tool.setuptools.package-data]): {sorted(missing)}"
    assert (wheel / "agent_input" / "manifest.yml").read_bytes() == (ROOT / "manifest.yml").read_bytes()


def _run(wheel: Path, cwd: Path, script: str, *args: str) -> subprocess.CompletedProcess:
    """A console script of the wheel, as pip's launcher calls it, from `cwd` with only the wheel
    ahead of the test venv's site-packages (which give the dependencies)."""
    entry = configparser.ConfigParser()
    (info,) = wheel.glob("*.dist-info")
    entry.read(info / "entry_points.txt")
    module, _, attr = entry["console_scripts"][script].partition(":")
    code = f"import sys; sys.argv[0] = {script!r}; from {module} import {attr}; sys.exit({attr}())"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "ELASTIC_", "PYTHON"))}
    env["PYTHONPATH"] = str(wheel)
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def test_the_installed_programs_run_outside_the_checkout(wheel, tmp_path):
    where = _run(wheel, tmp_path, "openai-input", "--help")
    assert where.returncode == 0, where.stderr
    probe = subprocess.run(
        [sys.executable, "-c", "import agent_input.config as c, kibana_assets.fields as f; "
         "print(c.MANIFEST_PATH); print(f.FIELDS_DIR)"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(wheel)}, capture_output=True, text=True, timeout=60)
    for line in probe.stdout.split():  # what follows runs the wheel's code, not the checkout's
        assert Path(line).is_relative_to(wheel), probe.stdout + probe.stderr

    version = yaml.safe_load((ROOT / "manifest.yml").read_text())["version"]
    for script in ("openai-input", "openai-assets"):
        proc = _run(wheel, tmp_path, script, "--version")
        assert proc.returncode == 0 and proc.stdout.strip() == f"{script}, version {version}", proc

    datasets = sorted(p.stem for p in (ROOT / "kibana_assets" / "fields").glob("*.yml") if not p.stem.startswith("_"))
    proc = _run(wheel, tmp_path, "openai-assets", "validate")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(rf"^ok  {len(datasets)} datasets,", proc.stdout, re.M), proc.stdout

    proc = _run(wheel, tmp_path, "openai-input", "demo", "--out", "events.ndjson")  # manifest, simulator, engine
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert all(f"\n{ds} " in proc.stdout for ds in datasets), proc.stdout
    assert "exact" in proc.stdout and "DIFFERS" not in proc.stdout and "failed:" not in proc.stdout, proc.stdout
    assert (tmp_path / "events.ndjson").stat().st_size > 0


def test_the_sdist_holds_the_checkout(tmp_path):
    """`python -m build` makes a source distribution too: the tree a packager unpacks to build and
    test from. Setuptools alone puts in it the packages and tests/test_*.py, without conftest.py,
    fake_es.py, the fixtures, the root manifest.yml or the docs the tests read: a suite that fails
    to collect. Every tracked file but the CI and git ones must be in it."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    tracked = [name for name in listed.decode().split("\0") if name and not name.startswith(".")]
    src = tmp_path / "src"
    for name in tracked:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name, follow_symlinks=False)
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))",
         str(tmp_path / "dist")], cwd=src, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with tarfile.open(tmp_path / "dist" / proc.stdout.split()[-1]) as tar:
        top = tar.getnames()[0].split("/")[0]
        held = {name.partition("/")[2] for name in tar.getnames()}
    missing = set(tracked) - held
    assert not missing, f"not in the sdist {top} (MANIFEST.in): {sorted(missing)}"
