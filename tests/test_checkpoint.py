"""Checkpoint files (atomic writes, clear errors) and the runtime state they carry."""
from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pytest
import torch

from asyncfgd.app.training import checkpoint
from asyncfgd.app.training.data import one_hot
from asyncfgd.exporter.export import export_model
from asyncfgd.exporter.models import build_model, model_spec
from asyncfgd.runtime.artifacts import load_artifacts
from asyncfgd.runtime.engine import load_runners, make_scheduler
from asyncfgd.runtime.scheduler import Perturbation

SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def cnn_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CNN (so BatchNorm statistics are part of the state) in 2 modules."""
    torch.manual_seed(0)
    model = build_model("cnn", 10, SHAPE, channels=[4])
    out = tmp_path_factory.mktemp("art") / "cnn"
    export_model(model, out, SHAPE, 10, modules=2, tangents=2, model_spec=model_spec(model))
    return out


def _pipeline(art_dir: Path, method: str):
    runners = load_runners(load_artifacts(art_dir), "onnxruntime", threads=1)
    sched = make_scheduler(runners, method, "adam", lambda s: 1e-2, lambda k, s: 1.0 if k == 1 else 0.3,
                           Perturbation(seed=5))
    return runners, sched


def _batches(n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [(rng.standard_normal((8, *SHAPE)).astype(np.float32), one_hot(rng.integers(0, 10, 8), 10))
            for _ in range(n)]


def _weights(runners) -> dict[str, np.ndarray]:
    return {n: r.to_host(t) for r in runners for n, t in (*r.params.items(), *r.buffers.items())}


@pytest.mark.parametrize("method", ["asyncfgd", "fgd"])
def test_restored_pipeline_continues_bit_identically(cnn_dir: Path, tmp_path: Path, method: str):
    batches = _batches(10)
    runners, sched = _pipeline(cnn_dir, method)
    for x, y in batches[:4]:
        sched.feed(x, y)
    arrays, meta = checkpoint.runtime_state(runners, sched)
    checkpoint.save(tmp_path / "ck.npz", arrays, checkpoint.stamp({"learner": meta}))
    if method == "asyncfgd":
        assert [f["module"] for f in meta["in_flight"]] == [1]  # the pipeline was not drained
    for x, y in batches[4:]:
        sched.feed(x, y)
    sched.drain()
    sched.close()

    runners2, sched2 = _pipeline(cnn_dir, method)
    arrays2, meta2 = checkpoint.load(tmp_path / "ck.npz")
    checkpoint.restore_runtime_state(arrays2, meta2["learner"], runners2, sched2)
    for x, y in batches[4:]:
        sched2.feed(x, y)
    sched2.drain()
    sched2.close()
    a, b = _weights(runners), _weights(runners2)
    assert a.keys() == b.keys() and any("running_mean" in k for k in a)
    for k in a:
        assert np.array_equal(a[k], b[k]), k


def test_save_replaces_atomically_and_load_roundtrips(tmp_path: Path):
    path = tmp_path / checkpoint.FILENAME
    checkpoint.save(path, {"param/w": np.arange(3, dtype=np.float32)}, checkpoint.stamp({"n": 1}))
    checkpoint.save(path, {"param/w": np.ones(3, np.float32)}, checkpoint.stamp({"n": 2}))
    arrays, meta = checkpoint.load(path)
    assert meta["n"] == 2 and np.array_equal(arrays["param/w"], np.ones(3, np.float32))
    assert checkpoint.model_state(arrays).keys() == {"w"}
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint.FILENAME]


def test_disk_full_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / checkpoint.FILENAME
    checkpoint.save(path, {"param/w": np.zeros(2, np.float32)}, checkpoint.stamp({"n": 1}))

    def full(file, arrays):
        file.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "_write_npz", full)
    with pytest.raises(checkpoint.CheckpointError) as exc:
        checkpoint.save(path, {"param/w": np.ones(2, np.float32)}, checkpoint.stamp({"n": 2}))
    msg = str(exc.value)
    assert "No space left on device" in msg and "previous checkpoint" in msg and "intact" in msg
    assert f"--resume {tmp_path}" in msg
    monkeypatch.undo()
    assert checkpoint.load(path)[1]["n"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint.FILENAME]  # no temp file left behind


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated zip"])
def test_corrupt_or_missing_checkpoint_is_a_clear_error(tmp_path: Path, content: bytes):
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint at"):
        checkpoint.load(tmp_path / checkpoint.FILENAME)
    (tmp_path / checkpoint.FILENAME).write_bytes(content)
    with pytest.raises(checkpoint.CheckpointError, match="corrupt or truncated"):
        checkpoint.load(tmp_path / checkpoint.FILENAME)


def test_restore_rejects_a_checkpoint_of_other_artifacts(cnn_dir: Path):
    runners, sched = _pipeline(cnn_dir, "fgd")
    arrays, meta = checkpoint.runtime_state(runners, sched)
    name = next(iter(runners[0].params))
    arrays[f"param/{name}"] = np.zeros(3, np.float32)
    with pytest.raises(checkpoint.CheckpointError, match=f"tensor {name} is shaped"):
        checkpoint.restore_runtime_state(arrays, meta, runners, sched)
