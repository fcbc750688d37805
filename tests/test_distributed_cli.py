"""`train --distributed data|pipeline` under torchrun (gloo on 127.0.0.1): the pipeline across ranks
against the threaded AsyncFGD, a rank killed with kill -9, and --resume after it. Every launch is
bounded in time and its process group killed on the way out."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from asyncfgd.app.training import checkpoint

TIMEOUT_S = 240
APP = shutil.which("asyncfgd-app")
pytestmark = pytest.mark.skipif(APP is None, reason="the asyncfgd-app console script is not installed")
ENV = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}


def _torchrun(ranks: int, *args: str) -> list[str]:
    assert APP is not None
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
            "--no-python", APP, "train", *args]


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    finally:
        _kill_group(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def _kill_group(proc: subprocess.Popen[str]) -> None:
    """The launcher and every rank it started (they share its session)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    else:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _state(run_dir: Path) -> dict[str, np.ndarray]:
    arrays, _ = checkpoint.load(run_dir / checkpoint.FILENAME)
    return arrays


def _identical(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    different = [k for k in a if not np.array_equal(a[k], b[k])]
    assert not different, different


@pytest.mark.parametrize("modules", [2, 3])
def test_pipeline_across_ranks_is_bit_identical_to_the_threaded_pipeline(tmp_path: Path, modules: int) -> None:
    common = ["--model", "mlp", "--modules", str(modules), "--epochs", "2", "--batch-size", "100", "--seed", "3"]
    ranks = _run(_torchrun(modules, "--distributed", "pipeline", *common, "--run-dir", str(tmp_path / "ranks")))
    assert ranks.returncode == 0, ranks.stdout
    one = _run([APP or "", "train", *common, "--run-dir", str(tmp_path / "one")])
    assert one.returncode == 0, one.stdout
    _identical(_state(tmp_path / "ranks"), _state(tmp_path / "one"))
    # rank 0 alone wrote the run directory, with both epochs' rows
    assert (tmp_path / "ranks" / "metrics.csv").read_text().count("\n") == 3
    assert ranks.stdout.count("test accuracy:") == 1


def _rank_pids(launcher: int) -> dict[int, int]:
    """RANK -> pid of the ranks torchrun started."""
    out = {}
    for pid in map(int, subprocess.run(["pgrep", "-P", str(launcher)], capture_output=True, text=True).stdout.split()):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in env:
            if item.startswith(b"RANK="):
                out[int(item[5:])] = pid
    return out


@pytest.mark.parametrize("mode", ["data", "pipeline"])
def test_a_killed_rank_stops_every_rank_and_resume_is_bit_identical(tmp_path: Path, mode: str) -> None:
    common = ["--distributed", mode, "--model", "cnn", "--epochs", "4", "--batch-size", "32", "--seed", "1",
              "--dist-timeout", "60"]
    whole = _run(_torchrun(2, *common, "--run-dir", str(tmp_path / "whole")))
    assert whole.returncode == 0, whole.stdout

    killed = tmp_path / "killed"
    logs = tmp_path / "logs"
    proc = subprocess.Popen([*_torchrun(2, *common, "--run-dir", str(killed))[:5], f"--log-dir={logs}",
                             "--redirects=3", *_torchrun(2, *common, "--run-dir", str(killed))[5:]],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not (killed / checkpoint.FILENAME).exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # into the next epoch
        victim = _rank_pids(proc.pid)[1]
        os.kill(victim, signal.SIGKILL)
        started = time.monotonic()
        out, _ = proc.communicate(timeout=TIMEOUT_S)
        stopped_in = time.monotonic() - started
    finally:
        _kill_group(proc)
    assert proc.returncode != 0 and stopped_in < 60, out
    assert "rank: 1" in out and "Signal 9" in out, out  # torchrun's report names the killed rank
    rank0 = next(logs.rglob("0/stderr.log")).read_text()
    assert "error: " in rank0 and ("rank 1" in rank0 or "stopped by the launcher" in rank0), rank0
    _, meta = checkpoint.load(killed / checkpoint.FILENAME)
    assert 1 <= meta["position"]["epoch"] < 4, "the kill must land mid-run"

    resumed = _run(_torchrun(2, "--resume", str(killed)))
    assert resumed.returncode == 0, resumed.stdout
    _identical(_state(killed), _state(tmp_path / "whole"))
