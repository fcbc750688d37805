"""The lean memory mode: ONNX Runtime without arena or buffer reuse, glibc handing freed blocks back.

The mode must change where bytes live and nothing else: weights after training are bit-identical
to the default mode's. The glibc setting is checked in fresh processes (it is process-wide), against
a control that shows the test can fail.
"""
from __future__ import annotations

import ctypes.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from asyncfgd.app.training.data import one_hot
from asyncfgd.exporter.export import export_model
from asyncfgd.exporter.models import build_model, model_spec
from asyncfgd.runtime import ort_backend
from asyncfgd.runtime.artifacts import load_artifacts
from asyncfgd.runtime.engine import load_runners, make_backend, make_scheduler
from asyncfgd.runtime.scheduler import Perturbation

SHAPE = (3, 8, 8)
GLIBC = sys.platform.startswith("linux") and ctypes.util.find_library("c") is not None

#: frees a 4 MiB block (an unpinned glibc then raises its mmap threshold above 4 MiB), allocates the
#: same size again and prints how many bytes of resident memory freeing that second block gave back
CHILD = """
import sys
import numpy as np
from asyncfgd.runtime.host_memory import pin_mmap_threshold
if sys.argv[1] == "pin":
    assert pin_mmap_threshold()
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
a = np.ones(1 << 19)
del a
b = np.ones(1 << 19)
before = rss()
del b
print(before - rss())
"""


def _returned_bytes(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, timeout=60, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's; elsewhere the lean mode only changes ONNX Runtime")
def test_pinned_threshold_returns_freed_blocks_to_the_os():
    assert _returned_bytes("pin") >= 4 << 20
    assert _returned_bytes("default") < 1 << 20  # glibc's moving threshold keeps the block resident


@pytest.fixture(scope="module")
def cnn_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CNN with BatchNorm and a residual-free conv stack, 2 modules, 2 tangents per pass."""
    torch.manual_seed(0)
    model = build_model("cnn", 10, SHAPE, channels=[8, 8])
    out = tmp_path_factory.mktemp("art") / "cnn"
    export_model(model, out, SHAPE, 10, modules=2, tangents=2, model_spec=model_spec(model))
    return out


def _train(art_dir: Path, method: str, memory: str) -> dict[str, np.ndarray]:
    runners = load_runners(load_artifacts(art_dir), "onnxruntime", threads=1, memory=memory)
    sched = make_scheduler(runners, method, "adam", lambda s: 1e-2, lambda k, s: 1.0, Perturbation(seed=3))
    rng = np.random.default_rng(0)
    for _ in range(5):
        sched.feed(rng.standard_normal((16, *SHAPE)).astype(np.float32), one_hot(rng.integers(0, 10, 16), 10))
    sched.drain()
    sched.close()
    opts = [s.get_session_options() for r in runners for s in r.sessions.values()]
    assert opts and all(o.enable_cpu_mem_arena == o.enable_mem_reuse == (memory == "fast") for o in opts)
    return {n: r.to_host(t) for r in runners for n, t in (*r.params.items(), *r.buffers.items())}


@pytest.mark.parametrize("method", ["fgd", "asyncfgd"])
def test_lean_mode_trains_bit_identically(cnn_dir: Path, method: str, monkeypatch: pytest.MonkeyPatch):
    pinned: list[bool] = []
    monkeypatch.setattr(ort_backend, "pin_mmap_threshold", lambda: pinned.append(True) or True)  # process-wide
    fast, lean = _train(cnn_dir, method, "fast"), _train(cnn_dir, method, "lean")
    assert pinned == [True]
    start = load_artifacts(cnn_dir).weights
    assert any(not np.array_equal(fast[k], start[k]) for k in start)  # it trained
    assert fast.keys() == lean.keys() and any("running_mean" in k for k in fast)
    for k in fast:
        assert np.array_equal(fast[k], lean[k]), k


def test_memory_mode_errors_name_the_choices():
    with pytest.raises(ValueError, match="choose one of fast, lean"):
        make_backend("onnxruntime", "tiny")
    with pytest.raises(ValueError, match="ONNX Runtime setting; backend 'torch'"):
        make_backend("torch", "lean")


def test_lean_mode_says_so_where_the_c_library_is_not_glibc(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(ort_backend, "pin_mmap_threshold", lambda: False)
    with pytest.warns(RuntimeWarning, match="not glibc"):
        backend = ort_backend.OrtBackend("lean")
    assert backend.memory == "lean"
