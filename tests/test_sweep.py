"""`asyncfgd-app sweep`, `train --lr auto` and `train --validation`: the paper's learning-rate selection."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from asyncfgd.app.cli import app
from asyncfgd.app.training import sweep as sweep_mod
from asyncfgd.app.training.artifact_cache import ExportOptions, export
from asyncfgd.app.training.config import TrainConfig, TrainError
from asyncfgd.app.training.data import load_dataset
from asyncfgd.app.training.loop import run_data

TINY = ["--batch-size", "128", "--epochs", "1"]  # 12 mini-batches per digits epoch


@pytest.fixture(scope="module")
def art(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny MLP (64-16-10, K = 2, 2 tangents)."""
    out = tmp_path_factory.mktemp("art") / "mlp"
    export(ExportOptions("mlp", 10, (1, 8, 8), modules=2, tangents=2, config={"hidden": [16]}), out)
    return out


def _invoke(args: list[str]):
    return CliRunner().invoke(app, args, env={"TQDM_DISABLE": "1"})


def _csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open() as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def test_sweep_writes_csv_plot_and_picks_the_best_validation_accuracy(art: Path, tmp_path: Path):
    out = tmp_path / "sweep"
    result = _invoke(["sweep", "--artifacts", str(art), "--lrs", "1e-2,1e-4", "--jobs", "2", "--out", str(out),
                      *TINY])
    assert result.exit_code == 0, result.output
    header, rows = _csv(out / "sweep.csv")
    assert header == list(sweep_mod.COLUMNS)
    assert [float(r["lr"]) for r in rows] == [1e-4, 1e-2]  # ascending
    assert all(r["status"] == "ok" and r["epochs"] == "1" for r in rows)
    best = max(rows, key=lambda r: (float(r["val_acc"]), -float(r["val_loss"])))
    assert [r["best"] for r in rows].count("1") == 1 and best["best"] == "1"
    assert f"best learning rate: {float(best['lr']):g}" in result.output
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for r in rows:  # each candidate is a real run, evaluated on the validation split
        run_header, run_rows = _csv(Path(r["run_dir"]) / "metrics.csv")
        assert "val_acc" in run_header and "test_acc" not in run_header
        assert float(run_rows[-1]["val_acc"]) == float(r["val_acc"])
        config = json.loads((Path(r["run_dir"]) / "config.json").read_text())
        assert config["lr"] == float(r["lr"]) and config["threads"] == 1 and config["validation"] == 0.2


def test_pick_best_ignores_diverged_runs_and_fails_when_all_diverged():
    nan = float("nan")
    rows = [{"lr": 1e-3, "val_acc": 0.5, "val_loss": 1.0, "status": "ok"},
            {"lr": 1e-2, "val_acc": 0.7, "val_loss": 0.9, "status": "ok"},
            {"lr": 1e-2, "val_acc": 0.7, "val_loss": 0.8, "status": "ok"},
            {"lr": 1e-1, "val_acc": nan, "val_loss": nan, "status": "diverged"}]
    assert sweep_mod.pick_best(rows) == 2  # equal accuracy: the lower validation loss wins
    with pytest.raises(TrainError, match="every learning rate of the sweep diverged"):
        sweep_mod.pick_best([rows[-1]])


def test_sweep_needs_a_validation_split(art: Path, tmp_path: Path):
    result = _invoke(["sweep", "--artifacts", str(art), "--validation", "0", "--out", str(tmp_path / "s"), *TINY])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "--validation > 0" in " ".join(result.output.split())


def test_validation_split_is_disjoint_from_the_training_data():
    data = load_dataset("digits")
    rd = run_data(TrainConfig(validation=0.25, seed=4), data)
    assert rd.eval_name == "val" and len(rd.train) + len(rd.eval) == len(data.train)
    trained = {x.tobytes() for x in rd.train.images}
    held = {x.tobytes() for x in rd.eval.images}
    everything = {x.tobytes() for x in data.train.images}
    assert len(everything) == len(data.train)  # no duplicate images, so bytes identify samples
    assert not trained & held and trained | held == everything
    assert not held & {x.tobytes() for x in data.test.images}  # carved from train, not the test set
    assert np.bincount(rd.eval.labels, minlength=10).min() >= 30  # stratified: every class held out
    plain = run_data(TrainConfig(), data)
    assert plain.eval_name == "test" and plain.train is data.train and plain.eval is data.test


def test_a_validation_run_trains_on_the_rest_and_labels_its_metrics(art: Path, tmp_path: Path):
    run_dir = tmp_path / "r"
    result = _invoke(["train", "--artifacts", str(art), "--validation", "0.25", "--run-dir", str(run_dir), *TINY])
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1].startswith("validation accuracy: ")
    config = json.loads((run_dir / "config.json").read_text())
    assert config["dataset"]["evaluated_on"] == "validation"
    assert config["dataset"]["train"] + config["dataset"]["val"] == 1438 and config["steps_per_epoch"] == 9
    header, _ = _csv(run_dir / "metrics.csv")
    assert header[3:5] == ["val_loss", "val_acc"]


def test_train_lr_auto_sweeps_first_and_records_the_choice(art: Path, tmp_path: Path):
    run_dir = tmp_path / "auto"
    result = _invoke(["train", "--artifacts", str(art), "--lr", "auto", "--run-dir", str(run_dir), *TINY])
    assert result.exit_code == 0, result.output
    _, rows = _csv(run_dir / "lr-sweep" / "sweep.csv")
    assert [float(r["lr"]) for r in rows] == list(sweep_mod.DEFAULT_LRS)
    chosen = float(next(r for r in rows if r["best"] == "1")["lr"])
    config = json.loads((run_dir / "config.json").read_text())
    assert config["lr"] == chosen and config["lr_sweep"] == str(run_dir / "lr-sweep")
    assert config["validation"] == 0.0  # the final run trains on all of train and reports the test set
    assert f"--lr auto: chose {chosen:g}" in result.output
    assert result.output.strip().splitlines()[-1].startswith("test accuracy: ")


def test_lr_must_be_a_number_or_auto(art: Path, tmp_path: Path):
    result = _invoke(["train", "--artifacts", str(art), "--lr", "fast", "--run-dir", str(tmp_path / "r")])
    assert result.exit_code == 2 and "'auto'" in result.output and not (tmp_path / "r").exists()


def test_nan_rows_print_as_blanks():
    nan = float("nan")
    text = sweep_mod.table([{"lr": 0.1, "val_acc": nan, "val_loss": nan, "train_acc": nan, "wall_s": nan,
                             "status": "diverged", "best": 0}])
    assert "nan" not in text and "diverged" in text
