"""The CPU install's torch step (Makefile): the staged local wheel when pip's find-links has one, else
PyTorch's CPU index, never PyPI's CUDA build. The venv's python is a recording stand-in, so the Makefile's own
recipe runs as written and the test sees which pip commands it issued (no network, no real install)."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _install(tmp_path: Path, local_wheel: bool) -> list[str]:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    log = tmp_path / "calls.log"
    shim = venv / "bin" / "python"
    fail_offline = "" if local_wheel else 'case "$*" in *--no-index*torch==*) exit 1;; esac\n'
    shim.write_text(f'#!/bin/sh\necho "$*" >> {log}\n{fail_offline}exit 0\n')
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    p = subprocess.run(["make", "-C", str(ROOT), "install", f"VENV={venv}"], capture_output=True, text=True,
                       timeout=60, env={**os.environ, "MAKEFLAGS": ""})
    assert p.returncode == 0, p.stdout + p.stderr
    return [ln for ln in log.read_text().splitlines() if "torch==" in ln and "install" in ln]


def test_staged_wheel_is_used_offline_when_present(tmp_path):
    calls = _install(tmp_path, local_wheel=True)
    assert len(calls) == 1 and "--no-index" in calls[0] and "torch==2.13.0" in calls[0]


def test_without_a_staged_wheel_torch_comes_from_the_cpu_index(tmp_path):
    calls = _install(tmp_path, local_wheel=False)
    assert len(calls) == 2 and "--no-index" in calls[0]
    assert "--index-url https://download.pytorch.org/whl/cpu torch==2.13.0" in calls[1]


def test_the_wheel_maps_rl_and_serving_into_rayft(tmp_path):
    """The top-level rl/ and serving/ folders install as rayft.rl and rayft.serving (pyproject's package-dir),
    never as top-level packages of their own names."""
    import shutil
    import sys
    import zipfile

    src = tmp_path / "src"
    src.mkdir()
    for name in ("rayft", "rl", "serving"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    (wheel,) = (tmp_path / "dist").glob("rayft-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"rayft/rl/rollout.py", "rayft/serving/app.py", "rayft/serving/engine.py"} <= names
    assert not any(n.startswith(("rl/", "serving/")) for n in names)
