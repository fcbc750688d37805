"""jetson_setup.sh: syntax, shellcheck, and its checks on this (non-Jetson) machine.

Contract under test: ``--dry-run`` prints every step and exits 0 on any machine, reporting
what a real run would stop at; a real run stops, non-zero, at the first unsupported piece.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "jetson_setup.sh"
STEPS = [f"==> {i}." for i in range(1, 9)]
ON_JETSON = Path("/etc/nv_tegra_release").exists()


def _run(*args, tmp_path, **env):
    overrides = ("TORCH_WHEEL", "ASYNCFGD_TEGRA_RELEASE", "ASYNCFGD_ARCH")
    full_env = {k: v for k, v in os.environ.items() if k not in overrides}
    full_env.update(env)
    return subprocess.run(["bash", str(SCRIPT), "--venv", str(tmp_path / "venv"), *args],
                          capture_output=True, text=True, env=full_env, timeout=60)


def _release(tmp_path, text):
    path = tmp_path / "nv_tegra_release"
    path.write_text(text)
    return str(path)


def test_bash_syntax():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="shellcheck not on PATH (apt-get install shellcheck)")
def test_shellcheck_is_clean():
    result = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_help():
    result = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--dry-run" in result.stdout and "TORCH_WHEEL" in result.stdout


def test_unknown_option_is_rejected(tmp_path):
    result = _run("--bogus", tmp_path=tmp_path)
    assert result.returncode == 2 and "unknown option" in result.stderr


@pytest.mark.skipif(ON_JETSON, reason="this is a Jetson")
def test_dry_run_here_prints_every_step_and_says_not_a_jetson(tmp_path):
    result = _run("--dry-run", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert all(step in out for step in STEPS)
    assert "not a Jetson" in out and "A real run on this machine would stop at" in out
    assert "-m venv --system-site-packages" in out
    assert "pip install pycuda" in out and "CUDA_ROOT=" in out
    assert "import tensorrt" in out and "asyncfgd-app doctor" in out and "pip install -e" in out
    assert "TORCH_WHEEL is not set" in out
    assert not (tmp_path / "venv").exists()


@pytest.mark.skipif(ON_JETSON, reason="this is a Jetson")
def test_real_run_here_stops_before_changing_anything(tmp_path):
    result = _run(tmp_path=tmp_path)
    assert result.returncode != 0
    assert "not a Jetson" in result.stderr
    assert "==> 3." not in result.stdout and not (tmp_path / "venv").exists()


def test_jetpack_61_passes_the_platform_check(tmp_path):
    rel = _release(tmp_path, "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64\n")
    result = _run("--dry-run", tmp_path=tmp_path, ASYNCFGD_TEGRA_RELEASE=rel, ASYNCFGD_ARCH="aarch64",
                  TORCH_WHEEL="/wheels/torch-2.5.0a0-cp310-cp310-linux_aarch64.whl")
    assert result.returncode == 0
    assert "L4T R36.4" in result.stdout and "not a Jetson" not in result.stdout
    assert "pip install /wheels/torch-2.5.0a0-cp310-cp310-linux_aarch64.whl" in result.stdout


@pytest.mark.parametrize("release, message", [
    ("# R36 (release), REVISION: 3.0, GCID: 36923193, BOARD: generic, EABI: aarch64\n",
     "JetPack 6.0, which ships TensorRT 8.6"),
    ("# R35 (release), REVISION: 5.0, GCID: 35550185, BOARD: t186ref, EABI: aarch64\n", "not JetPack 6"),
    ("hello\n", "cannot read an L4T release"),
])
def test_unsupported_releases_are_named(tmp_path, release, message):
    rel = _release(tmp_path, release)
    dry = _run("--dry-run", tmp_path=tmp_path, ASYNCFGD_TEGRA_RELEASE=rel, ASYNCFGD_ARCH="aarch64")
    assert dry.returncode == 0 and message in dry.stdout
    real = _run(tmp_path=tmp_path, ASYNCFGD_TEGRA_RELEASE=rel, ASYNCFGD_ARCH="aarch64")
    assert real.returncode == 1 and message in real.stderr and not (tmp_path / "venv").exists()
