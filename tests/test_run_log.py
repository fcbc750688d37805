"""`train --log tensorboard|mlflow`: every epoch's scalars in the run logs, once each across resumes; a
missing library or an unknown sink is a clear error before training; a sink failing mid-run does not
stop training; metrics.csv stays as it is."""
from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from asyncfgd.app.cli import app
from asyncfgd.app.training import checkpoint, metrics, run_log
from asyncfgd.app.training.artifact_cache import ExportOptions, export
from asyncfgd.app.training.config import TrainConfig

BATCH = 256  # 6 mini-batches per digits epoch
STEPS_PER_EPOCH = 6
SCALARS = {"loss/train", "loss/test", "accuracy/train", "accuracy/test", "lr", "samples_per_s", "alpha/module0",
           "alpha/module1", "fgd/jvp_rms", "estimate_norm/module0", "estimate_norm/module1"}


@pytest.fixture(scope="module")
def art(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("art") / "mlp"
    export(ExportOptions("mlp", 10, (1, 8, 8), 2, tangents=2, config={"hidden": [16]}), out)
    return out


def _args(art: Path, run_dir: Path, *extra: str) -> list[str]:
    """Two epochs; α of module 0 is 0 in epoch 1 and ramps up in epoch 2 (paper preset)."""
    return ["train", "--artifacts", str(art), "--run-dir", str(run_dir), "--epochs", "2", "--batch-size", str(BATCH),
            "--alpha-preset", "paper", "--alpha-warm-epochs", "1", "--alpha-ramp-epochs", "1", "--seed", "1", *extra]


def _invoke(args: list[str]):
    return CliRunner().invoke(app, args, env={"TQDM_DISABLE": "1"})


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def _tensorboard(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in RUN_DIR/tensorboard as TensorBoard itself reads it (purged events hidden)."""
    pytest.importorskip("tensorboard", reason="the reader, tensorboard, is not installed (it is in the test extra)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / run_log.TENSORBOARD_DIR))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture
def tensorboardx() -> None:
    pytest.importorskip("tensorboardX", reason="tensorboardX is not installed (pip install 'asyncfgd[tensorboard]')")


def test_tensorboard_gets_every_scalar_once_per_epoch(tensorboardx: None, art: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    result = _invoke(_args(art, run_dir, "--log", "tensorboard"))
    assert result.exit_code == 0, result.output
    scalars = _tensorboard(run_dir)
    assert set(scalars) == SCALARS
    assert all([step for step, _ in values] == [1, 2] for tag, values in scalars.items()
               if tag != "estimate_norm/module0"), scalars
    assert [step for step, _ in scalars["estimate_norm/module0"]] == [2]  # α = 0 in epoch 1: no update, no norm
    assert all(v > 0 for _, v in scalars["estimate_norm/module0"] + scalars["estimate_norm/module1"])
    rows = _rows(run_dir)
    for tag, column in (("loss/train", "train_loss"), ("accuracy/test", "test_acc"), ("loss/test", "test_loss")):
        assert [v for _, v in scalars[tag]] == pytest.approx([float(r[column]) for r in rows], abs=2e-6), tag
    lr = TrainConfig(epochs=2).lr_fn(STEPS_PER_EPOCH)  # cosine from 1e-2, at each epoch's last step
    assert [v for _, v in scalars["lr"]] == pytest.approx([lr(STEPS_PER_EPOCH - 1), lr(2 * STEPS_PER_EPOCH - 1)])
    assert [v for _, v in scalars["alpha/module1"]] == [1.0, 1.0]  # the head always learns
    module0 = [v for _, v in scalars["alpha/module0"]]
    assert module0[0] == 0.0 and 0 < module0[1] <= 0.15  # warm-up, then the ramp toward --alpha-target
    assert all(v > 0 for _, v in scalars["fgd/jvp_rms"] + scalars["samples_per_s"])
    with (run_dir / "metrics.csv").open() as f:
        assert next(csv.reader(f)) == list(metrics.COLUMNS)  # metrics.csv as before


def test_logging_changes_nothing_in_the_training(tensorboardx: None, art: Path, tmp_path: Path):
    logged, plain = tmp_path / "logged", tmp_path / "plain"
    assert _invoke(_args(art, logged, "--log", "tensorboard")).exit_code == 0
    assert _invoke(_args(art, plain)).exit_code == 0
    assert not (plain / run_log.TENSORBOARD_DIR).exists()
    a, b = checkpoint.load(logged / checkpoint.FILENAME)[0], checkpoint.load(plain / checkpoint.FILENAME)[0]
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_resume_appends_to_the_same_log_without_duplicate_epochs(tensorboardx: None, art: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    assert _invoke(_args(art, run_dir, "--log", "tensorboard", "--epochs", "1")).exit_code == 0
    after_1 = tmp_path / "after-epoch-1.npz"
    shutil.copy(run_dir / checkpoint.FILENAME, after_1)
    result = _invoke(["train", "--resume", str(run_dir), "--epochs", "2"])  # the saved --log carries over
    assert result.exit_code == 0, result.output
    assert [s for s, _ in _tensorboard(run_dir)["loss/train"]] == [1, 2]
    # killed after logging epoch 2 but before its checkpoint: the resumed run repeats epoch 2
    shutil.copy(after_1, run_dir / checkpoint.FILENAME)
    result = _invoke(["train", "--resume", str(run_dir), "--epochs", "3"])
    assert result.exit_code == 0, result.output
    scalars = _tensorboard(run_dir)
    assert all([step for step, _ in values] == [1, 2, 3] for tag, values in scalars.items()
               if tag != "estimate_norm/module0"), scalars
    assert [step for step, _ in scalars["estimate_norm/module0"]] == [2, 3]
    assert [v for _, v in scalars["loss/train"]] == pytest.approx([float(r["train_loss"]) for r in _rows(run_dir)],
                                                                  abs=2e-6)  # epoch 2 as the resumed run has it
    assert len(list((run_dir / run_log.TENSORBOARD_DIR).glob("events.out.tfevents.*"))) == 3  # one per process


def test_log_may_be_added_on_resume(tensorboardx: None, art: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    assert _invoke(_args(art, run_dir, "--epochs", "1")).exit_code == 0
    result = _invoke(["train", "--resume", str(run_dir), "--epochs", "2", "--log", "tensorboard", "--log-every", "1"])
    assert result.exit_code == 0, result.output
    assert [s for s, _ in _tensorboard(run_dir)["accuracy/test"]] == [2]
    assert json.loads((run_dir / "config.json").read_text())["log"] == ["tensorboard"]


def test_mlflow_run_holds_the_config_and_every_epoch_once(art: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    mlflow = pytest.importorskip("mlflow", reason="mlflow is not installed (optional: pip install 'asyncfgd[mlflow]')")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # what train sets for its file store, undone after
    run_dir = tmp_path / "run"
    assert _invoke(_args(art, run_dir, "--log", "mlflow", "--epochs", "1")).exit_code == 0
    after_1 = tmp_path / "after-epoch-1.npz"
    shutil.copy(run_dir / checkpoint.FILENAME, after_1)
    assert _invoke(["train", "--resume", str(run_dir), "--epochs", "2"]).exit_code == 0
    shutil.copy(after_1, run_dir / checkpoint.FILENAME)  # killed after logging epoch 2, before its checkpoint
    result = _invoke(["train", "--resume", str(run_dir), "--epochs", "3"])
    assert result.exit_code == 0, result.output

    saved = json.loads((run_dir / run_log.MLFLOW_STATE).read_text())
    assert saved["tracking_uri"] == (run_dir / run_log.MLRUNS_DIR).resolve().as_uri()
    client = mlflow.MlflowClient(tracking_uri=saved["tracking_uri"])
    (run,) = client.search_runs([client.get_experiment_by_name(run_log.MLFLOW_EXPERIMENT).experiment_id])
    assert run.info.run_id == saved["run_id"] and run.info.status == "FINISHED"
    assert run.data.params["batch_size"] == str(BATCH) and run.data.params["epochs"] == "1"
    assert run.data.tags["resumed.epochs"] == "3"  # MLflow parameters cannot change
    assert set(run.data.metrics) == SCALARS
    for key in SCALARS:
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2, 3], key
    logged = [m.value for m in client.get_metric_history(run.info.run_id, "accuracy/test")]
    csv_acc = [float(r["test_acc"]) for r in _rows(run_dir)]
    # epoch 2 keeps its first record (the repeat is skipped), which a 2-epoch cosine schedule produced
    assert (logged[0], logged[2]) == pytest.approx((csv_acc[0], csv_acc[2]), abs=2e-6)


def test_missing_tensorboardx_is_a_clear_error_before_training(art: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # `import tensorboardX` raises ImportError
    run_dir = tmp_path / "run"
    result = _invoke(_args(art, run_dir, "--log", "tensorboard"))
    assert result.exit_code == 2 and "Traceback" not in result.output
    text = " ".join(result.output.split())
    assert "pip install 'asyncfgd[tensorboard]'" in text and "tensorboardX" in text
    assert not run_dir.exists()  # nothing started


def test_unknown_sink_is_a_usage_error(art: Path, tmp_path: Path):
    result = _invoke(_args(art, tmp_path / "run", "--log", "tensorboard,wandb"))
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "tensorboard, mlflow" in " ".join(result.output.split())


def test_sink_names_repeat_or_comma_separate():
    assert run_log.parse(None) == [] and run_log.parse(["none"]) == []
    assert run_log.parse(["tensorboard", "MLflow, tensorboard"]) == ["tensorboard", "mlflow"]


def test_a_sink_failing_mid_run_is_dropped_and_training_goes_on(tensorboardx: None, art: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch):
    def full_disk(self, epoch, scalars):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run_log.TensorBoardSink, "write", full_disk)
    run_dir = tmp_path / "run"
    result = _invoke(_args(art, run_dir, "--log", "tensorboard"))
    assert result.exit_code == 0, result.output
    assert result.output.count("warning: run log TensorBoardSink failed") == 1
    assert [int(r["epoch"]) for r in _rows(run_dir)] == [1, 2]
