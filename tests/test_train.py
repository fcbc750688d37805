"""`asyncfgd-app train` / `save-torch`: outputs, exact resume after SIGKILL and Ctrl-C, bad inputs, defaults."""
from __future__ import annotations

import csv
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from asyncfgd.app.cli import app
from asyncfgd.app.training import artifact_cache, checkpoint, learners, metrics
from asyncfgd.app.training.artifact_cache import ExportOptions, cached_artifacts, export, source_digest
from asyncfgd.app.training.config import TrainConfig
from asyncfgd.app.training.data import BatchStream, load_dataset
from asyncfgd.exporter.models import build_model
from asyncfgd.runtime import ort_backend
from asyncfgd.runtime.artifacts import load_artifacts
from asyncfgd.runtime.engine import load_runners
from asyncfgd.runtime.scheduler import evaluate

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 3
BATCH = 128  # 12 mini-batches per digits epoch
STEPS_PER_EPOCH = 12


def _opts(**kw) -> ExportOptions:
    return ExportOptions(**{"model": "mlp", "num_classes": 10, "input_shape": (1, 8, 8), "modules": 2,
                            "tangents": 2, "config": {"hidden": [16]}, **kw})


@pytest.fixture(scope="module")
def art(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("art") / "mlp"
    export(_opts(), out)
    return out


def _args(art: Path, run_dir: Path, *extra: str) -> list[str]:
    """A tiny AsyncFGD run: head only in epoch 1, the first module joins in epoch 2 (roles change)."""
    return ["train", "--artifacts", str(art), "--run-dir", str(run_dir), "--epochs", str(EPOCHS),
            "--batch-size", str(BATCH), "--alpha-preset", "paper", "--alpha-warm-epochs", "1",
            "--alpha-ramp-epochs", "1", "--seed", "3", *extra]


def _invoke(args: list[str]):
    return CliRunner().invoke(app, args, env={"TQDM_DISABLE": "1"})


def _state(run_dir: Path) -> dict[str, np.ndarray]:
    return checkpoint.load(run_dir / checkpoint.FILENAME)[0]


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def _assert_same_run(a: Path, b: Path) -> None:
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys() and any(k.startswith("optim/") for k in sa)
    for k in sa:
        assert np.array_equal(sa[k], sb[k]), k
    drop = ("samples_per_s", "wall_s", "peak_rss_mb")
    assert [{k: v for k, v in r.items() if k not in drop} for r in _rows(a)] == \
        [{k: v for k, v in r.items() if k not in drop} for r in _rows(b)]


@pytest.fixture(scope="module")
def uninterrupted(art: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "straight"
    result = _invoke(_args(art, run_dir))
    assert result.exit_code == 0, result.output
    return run_dir


def test_run_writes_config_metrics_plot_and_prints_accuracy(uninterrupted: Path):
    with (uninterrupted / "metrics.csv").open() as f:
        assert next(csv.reader(f)) == list(metrics.COLUMNS)
    rows = _rows(uninterrupted)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert all(0 <= float(r["test_acc"]) <= 1 and float(r["peak_rss_mb"]) > 0 for r in rows)
    assert (uninterrupted / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((uninterrupted / "config.json").read_text())
    assert config["method"] == "asyncfgd" and config["num_modules"] == 2 and config["steps_per_epoch"] == 12
    assert config["model_spec"]["config"] == {"hidden": [16]}


def test_tangent_copies_are_kept_when_they_fit_the_budget(art: Path, uninterrupted: Path,
                                                          monkeypatch: pytest.MonkeyPatch):
    """Unset --store-tangents: AsyncFGD keeps module 0's tangents (delay 1: 2 steps of m = 2 tangents
    of its 64·16 + 16 weights) when they fit STORE_TANGENTS_BUDGET; explicit flags and sync FGD win."""
    arts = load_artifacts(art)
    size = 2 * 2 * 4 * (64 * 16 + 16)
    assert learners.stored_tangent_bytes(arts) == size
    cfg = TrainConfig()
    assert cfg.store_tangents is None and learners.store_tangents(cfg, arts)
    assert json.loads((uninterrupted / "config.json").read_text())["store_tangents"] is True
    assert not learners.store_tangents(TrainConfig(method="fgd"), arts)
    assert not learners.store_tangents(TrainConfig(store_tangents=False), arts)
    monkeypatch.setattr(learners, "STORE_TANGENTS_BUDGET", size - 1)
    assert not learners.store_tangents(cfg, arts)
    assert learners.store_tangents(TrainConfig(store_tangents=True), arts)


def test_final_line_reports_test_accuracy(art: Path, tmp_path: Path):
    result = _invoke(_args(art, tmp_path / "r", "--epochs", "1"))
    assert result.exit_code == 0, result.output
    last = result.output.strip().splitlines()[-1]
    assert re.fullmatch(r"test accuracy: \d{1,3}\.\d%", last)
    assert float(last[15:-1]) == pytest.approx(100 * float(_rows(tmp_path / "r")[-1]["test_acc"]), abs=0.05)


KILL_EPOCHS = 8  # the killed run is long enough (~45 steps an epoch) to be killed well before its end


@pytest.fixture(scope="module")
def dropout_art(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The MLP with p = 0.5 dropout between its layers: masks drawn per step must resume exactly too."""
    from asyncfgd.exporter.export import export_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Dropout(0.5),
                                torch.nn.Linear(16, 10))
    out = tmp_path_factory.mktemp("art") / "dropout"
    export_model(model, out, (1, 8, 8), 10, modules=2, tangents=2)
    return out


@pytest.fixture(scope="module")
def activity_art(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The MLP with local-activity graphs (a head on module 0, activity noise as inputs)."""
    out = tmp_path_factory.mktemp("art") / "activity"
    export(_opts(activity=True), out)
    return out


@pytest.fixture(scope="module")
def activity_cnn_art(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cnn with local-activity graphs: block 1's conv takes cell tangents, block 2's channel passes."""
    out = tmp_path_factory.mktemp("art") / "activity-cnn"
    export(_opts(model="cnn", config={"channels": [4, 8]}, activity=True), out)
    return out


@pytest.mark.parametrize(("artifacts", "method"), [("art", "asyncfgd"), ("dropout_art", "asyncfgd"),
                                                   ("activity_art", "local-activity"),
                                                   ("activity_cnn_art", "local-activity")])
def test_sigkill_mid_run_then_resume_is_bit_identical(artifacts: str, method: str, request: pytest.FixtureRequest,
                                                      tmp_path: Path):
    """kill -9 from outside as soon as the first checkpoint exists; the resumed run must repeat the
    uninterrupted one bit for bit (with and without dropout, and with the local-activity method, whose
    activity noise is drawn per step from the seed)."""
    art = request.getfixturevalue(artifacts)
    args = lambda d: [*_args(art, d), "--epochs", str(KILL_EPOCHS), "--batch-size", "32",  # noqa: E731
                      "--method", method]
    straight = tmp_path / "straight"
    assert _invoke(args(straight)).exit_code == 0
    run_dir = tmp_path / "killed"
    # a real process, without torch: the device-side path (ONNX Runtime) must not import it
    code = "import sys; sys.modules['torch'] = None; from asyncfgd.app.cli import main; main()"
    proc = subprocess.Popen([sys.executable, "-c", code, *args(run_dir)], env={**os.environ, "TQDM_DISABLE": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / checkpoint.FILENAME).exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        proc.kill()
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, err  # killed, not finished or failed
    arrays, meta = checkpoint.load(run_dir / checkpoint.FILENAME)
    assert 1 <= len(meta["history"]) < KILL_EPOCHS, meta["history"]  # after a checkpoint, before the end
    assert any(k.startswith("flight/") for k in arrays)  # the in-flight mini-batches were saved, not drained

    result = _invoke(["train", "--resume", str(run_dir)])
    assert result.exit_code == 0, result.output
    _assert_same_run(run_dir, straight)


def _ctrl_c_at_step(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """SIGINT to this process as the learner is fed its ``step``-th mini-batch (1-based)."""
    feed, calls = learners.FgdLearner.feed, []

    def feed_then_ctrl_c(self, x, y):
        calls.append(1)
        if len(calls) == step:
            os.kill(os.getpid(), signal.SIGINT)  # handled between mini-batches: save and exit 130
        return feed(self, x, y)

    monkeypatch.setattr(learners.FgdLearner, "feed", feed_then_ctrl_c)


def test_ctrl_c_saves_mid_epoch_and_resume_is_bit_identical(art: Path, uninterrupted: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch):
    run_dir = tmp_path / "interrupted"
    _ctrl_c_at_step(monkeypatch, STEPS_PER_EPOCH + 3)
    result = _invoke(_args(art, run_dir))
    assert result.exit_code == 130
    assert f"asyncfgd-app train --resume {run_dir}" in result.output and "Traceback" not in result.output
    assert checkpoint.load(run_dir / checkpoint.FILENAME)[1]["position"] == {"epoch": 1, "batch": 3}
    monkeypatch.undo()

    result = _invoke(["train", "--resume", str(run_dir)])
    assert result.exit_code == 0, result.output
    _assert_same_run(run_dir, uninterrupted)


def test_memory_mode_may_change_on_resume_and_changes_no_number(art: Path, uninterrupted: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch):
    """Ctrl-C a --memory lean run mid-epoch, resume it with --memory fast: the uninterrupted default run."""
    run_dir = tmp_path / "lean"
    _ctrl_c_at_step(monkeypatch, STEPS_PER_EPOCH + 5)
    monkeypatch.setattr(ort_backend, "pin_mmap_threshold", lambda: True)  # process-wide; tested in test_host_memory
    assert _invoke(_args(art, run_dir, "--memory", "lean")).exit_code == 130
    assert json.loads((run_dir / "config.json").read_text())["memory"] == "lean"
    monkeypatch.undo()
    result = _invoke(["train", "--resume", str(run_dir), "--memory", "fast"])
    assert result.exit_code == 0, result.output
    _assert_same_run(run_dir, uninterrupted)


def test_memory_mode_is_refused_for_other_backends(art: Path, tmp_path: Path):
    result = _invoke(_args(art, tmp_path / "r", "--memory", "lean", "--backend", "torch"))
    assert result.exit_code == 2 and "ONNX Runtime setting" in result.output and "Traceback" not in result.output


def test_resume_refuses_changed_settings(uninterrupted: Path):
    result = _invoke(["train", "--resume", str(uninterrupted), "--lr", "0.5"])
    assert result.exit_code == 2 and "remove --lr" in result.output


def test_bp_baseline_trains_and_resumes_exactly(art: Path, tmp_path: Path):
    args = ["--method", "bp", "--lr-schedule", "constant"]  # cosine would depend on --epochs
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert _invoke(_args(art, straight, *args, "--epochs", "2")).exit_code == 0
    assert float(_rows(straight)[-1]["test_acc"]) > 0.8
    assert _invoke(_args(art, split, *args, "--epochs", "1")).exit_code == 0
    result = _invoke(["train", "--resume", str(split), "--epochs", "2"])
    assert result.exit_code == 0, result.output
    _assert_same_run(split, straight)


def test_save_torch_matches_the_runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A CNN (BatchNorm statistics included) exported on the fly, trained, saved for PyTorch."""
    monkeypatch.setenv("ASYNCFGD_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    result = _invoke(["train", "--model", "cnn", "--config", "channels=[4]", "--tangents", "2", "--epochs", "2",
                      "--run-dir", str(run_dir)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "model.pth"
    result = _invoke(["save-torch", str(run_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output

    model = build_model("cnn", 10, (1, 8, 8), channels=[4])
    model.load_state_dict(torch.load(out, weights_only=True))  # strict: every name matches
    model.eval()
    data = load_dataset("digits")
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(data.test.images)).numpy()

    config = json.loads((run_dir / "config.json").read_text())
    runners = load_runners(load_artifacts(config["artifacts_dir"]), "onnxruntime", threads=1)
    saved = checkpoint.model_state(_state(run_dir))
    for r in runners:
        for name, buf in (*r.params.items(), *r.buffers.items()):
            r.from_host(buf, saved[name])
    runtime_logits = evaluate(runners, data.test.images)
    np.testing.assert_allclose(torch_logits, runtime_logits, rtol=1e-4, atol=1e-4)
    acc = metrics.correct(torch_logits, data.test.labels) / len(data.test)
    assert acc == pytest.approx(float(_rows(run_dir)[-1]["test_acc"]), abs=1e-6)


# --------------------------------------------------------------------------- bad input


def _no_traceback(result) -> str:
    assert result.exit_code != 0 and "Traceback" not in result.output
    return " ".join(result.output.split())


def test_artifacts_that_do_not_fit_the_data(art: Path, tmp_path: Path):
    from PIL import Image

    for c in range(3):
        (tmp_path / "imgs" / f"class{c}").mkdir(parents=True)
        for i in range(5):
            Image.fromarray(np.full((16, 16), 40 * c + i, np.uint8)).save(tmp_path / "imgs" / f"class{c}" / f"{i}.png")
    result = _invoke(_args(art, tmp_path / "r", "--data", f"imagefolder:{tmp_path / 'imgs'}:16"))
    msg = _no_traceback(result)
    assert "do not fit dataset imagefolder" in msg and "input shape (1, 8, 8) vs (1, 16, 16)" in msg
    assert "10 classes vs 3" in msg and "--num-classes 3 --input-shape 1,16,16" in msg
    assert not (tmp_path / "r" / checkpoint.FILENAME).exists()


def test_dataset_in_the_wrong_format(art: Path, tmp_path: Path):
    (tmp_path / "notcifar").mkdir()
    msg = _no_traceback(_invoke(_args(art, tmp_path / "r", "--data", f"cifar10:{tmp_path / 'notcifar'}")))
    assert "CIFAR-10 not found" in msg and "an empty directory" in msg


def test_unknown_option_value(art: Path, tmp_path: Path):
    msg = _no_traceback(_invoke(_args(art, tmp_path / "r", "--optimizer", "rmsprop")))
    assert "rmsprop" in msg and "sgd" in msg


@pytest.mark.parametrize("victim,expected", [("module1.dual.onnx", "does not match its checksum"),
                                             ("weights.npz", "corrupt or truncated")])
def test_corrupt_artifacts_on_resume_keep_the_checkpoint(art: Path, tmp_path: Path, victim: str, expected: str):
    own = tmp_path / "art"
    shutil.copytree(art, own)
    run_dir = tmp_path / "r"
    assert _invoke(_args(own, run_dir, "--epochs", "1")).exit_code == 0
    before = _state(run_dir)
    data = (own / victim).read_bytes()
    (own / victim).write_bytes(data[: len(data) // 2])
    msg = _no_traceback(_invoke(["train", "--resume", str(run_dir), "--epochs", "2"]))
    assert expected in msg and "asyncfgd-app export" in msg
    after = _state(run_dir)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(art: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch):
    epoch = BatchStream.epoch

    def poisoned(self, e, start=0):
        for x, y in epoch(self, e, start):
            yield (np.full_like(x, np.nan) if e == 1 else x), y

    monkeypatch.setattr(BatchStream, "epoch", poisoned)
    run_dir = tmp_path / "r"
    msg = _no_traceback(_invoke(_args(art, run_dir)))
    assert "training diverged" in msg and "non-finite loss" in msg
    assert "after epoch 1" in msg and "--lr 0.001" in msg and "10x" in msg and "--clip-norm" in msg
    arrays, meta = checkpoint.load(run_dir / checkpoint.FILENAME)
    assert len(meta["history"]) == 1 and all(np.isfinite(v).all() for k, v in arrays.items() if k.startswith("param/"))


def test_disk_full_on_checkpoint_keeps_the_previous_one(art: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    write, calls = checkpoint._write_npz, []

    def full_on_second(file, arrays):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        write(file, arrays)

    monkeypatch.setattr(checkpoint, "_write_npz", full_on_second)
    run_dir = tmp_path / "r"
    msg = _no_traceback(_invoke(_args(art, run_dir)))
    assert "No space left on device" in msg and "is intact" in msg and f"--resume {run_dir}" in msg
    assert checkpoint.load(run_dir / checkpoint.FILENAME)[1]["position"] == {"epoch": 1, "batch": 0}


def test_artifacts_exclude_export_options(art: Path, tmp_path: Path):
    msg = _no_traceback(_invoke(_args(art, tmp_path / "r", "--tangents", "4")))
    assert "remove --tangents" in msg


# --------------------------------------------------------------------------- export cache


def test_export_cache_reuses_valid_entries_and_repairs_broken_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("ASYNCFGD_CACHE", str(tmp_path))
    first = cached_artifacts(_opts())
    assert first.parent == tmp_path and load_artifacts(first).tangents == 2
    assert _opts().key() != _opts(tangents=4).key() and _opts().key() != _opts(seed=1).key()
    mtime = (first / "manifest.json").stat().st_mtime_ns
    assert cached_artifacts(_opts()) == first and (first / "manifest.json").stat().st_mtime_ns == mtime
    (first / "module0.eval.onnx").write_bytes(b"garbage")
    assert cached_artifacts(_opts()) == first and (first / "manifest.json").stat().st_mtime_ns != mtime
    assert [p.name for p in tmp_path.iterdir()] == [first.name]


def test_export_cache_key_follows_the_graph_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An edit to the exporter or runtime re-exports even where the version number stays (editable
    installs): the key holds a digest of their source, which any byte of any file changes."""
    code = tmp_path / "code"
    (code / "sub").mkdir(parents=True)
    (code / "a.py").write_text("x = 1\n")
    (code / "sub" / "b.py").write_text("y = 2\n")
    before = source_digest([code])
    (code / "sub" / "b.py").write_text("y = 3\n")
    assert source_digest([code]) != before
    key = _opts().key()
    monkeypatch.setattr(artifact_cache, "graph_code_digest", lambda: "edited")
    assert _opts().key() != key


# --------------------------------------------------------------------------- defaults


def test_defaults_in_help_config_and_readme_agree():
    """The README's defaults table is the documentation of the no-options run: it must be true."""
    text = (ROOT / "README.md").read_text()
    table = text[text.index("<!-- defaults -->"):text.index("<!-- /defaults -->")]
    documented = dict(re.findall(r"^\| `--([\w-]+)` \| `([^`]*)` \|", table, flags=re.M))
    assert len(documented) >= 12
    command = next(c for c in typer.main.get_command(app).commands.values() if c.name == "train")
    params = {p.name: p for p in command.params}
    config = TrainConfig()
    names = {f.name for f in fields(config)}
    for option, value in documented.items():
        name = option.replace("-", "_")
        assert name in names and name in params, option
        default = params[name].default
        assert default == getattr(config, name), option
        assert str(default) == value or (isinstance(default, float) and float(value) == default), option
