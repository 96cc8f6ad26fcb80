"""`scripts/test.sh`'s arguments to pytest: the worker count it adds, and none where the caller
turned pytest-xdist off (pytest refuses an `-n` it no longer knows). Run with a stand-in `dev.sh`
that prints what it was asked to run, so no venv is built or suite started."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _pytest_args(tmp_path: Path, *args: str, cpus: int = 2) -> list[str]:
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    shutil.copy(ROOT / "scripts" / "test.sh", scripts / "test.sh")
    (scripts / "dev.sh").write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    (scripts / "dev.sh").chmod(0o755)
    bin_dir = tmp_path / "bin"  # nproc answering `cpus`
    bin_dir.mkdir()
    (bin_dir / "nproc").write_text(f"#!/bin/sh\necho {cpus}\n")
    (bin_dir / "nproc").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "TMPDIR": str(tmp_path)}
    done = subprocess.run(["bash", str(scripts / "test.sh"), *args], env=env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


@pytest.mark.parametrize("cpus, workers", [(1, "0"), (2, "2"), (8, "4")])
def test_one_worker_per_cpu_at_most_four(tmp_path, cpus, workers):
    assert _pytest_args(tmp_path, "-q", cpus=cpus) == ["python", "-m", "pytest", "-n", workers, "-q"]


@pytest.mark.parametrize("off", [["-p", "no:xdist"], ["-pno:xdist"]])
def test_no_worker_count_when_the_caller_turns_xdist_off(tmp_path, off):
    assert _pytest_args(tmp_path, "-q", *off, "tests/x.py") == ["python", "-m", "pytest", "-q", *off,
                                                              "tests/x.py"]


def test_another_plugin_turned_off_keeps_the_worker_count(tmp_path):
    assert _pytest_args(tmp_path, "-p", "no:cacheprovider")[3:5] == ["-n", "2"]
