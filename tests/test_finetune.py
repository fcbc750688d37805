"""Fine-tuning: `--freeze-until` (FGD and bp), `--epochs 0`, and `pretrain` -> `train --weights`."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from asyncfgd.app.cli import app
from asyncfgd.app.training import checkpoint
from asyncfgd.app.training.artifact_cache import ExportOptions, export
from asyncfgd.app.training.freeze import FreezeError, frozen_modules
from asyncfgd.app.training.learners import FgdLearner
from asyncfgd.exporter.models import build_model, load_weights
from asyncfgd.runtime.artifacts import load_artifacts


@pytest.fixture(scope="module")
def art(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MLP 64-16-16-10 in K = 3 modules, one Linear each (flatten, linear | relu, linear | relu, head), 2 tangents."""
    out = tmp_path_factory.mktemp("art") / "mlp"
    export(ExportOptions("mlp", 10, (1, 8, 8), modules=3, tangents=2, config={"hidden": [16, 16]},
                         split=("layers.2", "layers.4")), out)
    return out


def _invoke(args: list[str]):
    return CliRunner().invoke(app, args, env={"TQDM_DISABLE": "1"})


def _flat(result) -> str:
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    return " ".join(result.output.split())


@pytest.mark.parametrize("preset", [["--alpha-preset", "uniform"], ["--alpha-preset", "constant", "--alphas", "1,1,1"],
                                    ["--alpha-preset", "paper", "--alpha-warm-epochs", "0"]])
@pytest.mark.parametrize("method", ["fgd", "asyncfgd"])
def test_freeze_until_keeps_the_prefix_bit_identical_on_the_forward_graph(art: Path, preset: list[str],
                                                                         method: str, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch):
    """Whatever alpha preset: modules 0 and 1 (up to layers.3) run `forward` only and never change."""
    roles: dict[int, set[str]] = {}
    real_init = FgdLearner.__init__

    def spying_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        for k, runner in enumerate(self.runners):
            def run(role, *a, _real=runner.run, _k=k, **kw):
                roles.setdefault(_k, set()).add(role)
                return _real(role, *a, **kw)
            runner.run = run

    monkeypatch.setattr(FgdLearner, "__init__", spying_init)
    run_dir = tmp_path / "r"
    result = _invoke(["train", "--artifacts", str(art), "--method", method, "--freeze-until", "layers.3",
                      "--epochs", "2", "--batch-size", "128", "--lr", "0.05", "--run-dir", str(run_dir), *preset])
    assert result.exit_code == 0, result.output
    assert roles[0] == {"forward", "eval"} and roles[1] == {"forward", "eval"}
    assert roles[2] == {"dual_first", "eval"}
    initial = load_artifacts(art).weights
    trained = checkpoint.model_state(checkpoint.load(run_dir / checkpoint.FILENAME)[0])
    for name in ("layers.1.weight", "layers.1.bias", "layers.3.weight", "layers.3.bias"):
        assert np.array_equal(trained[name], initial[name]), name
    assert not np.array_equal(trained["layers.5.weight"], initial["layers.5.weight"])
    config = json.loads((run_dir / "config.json").read_text())
    assert config["freeze_until"] == "layers.3" and config["frozen_modules"] == 2


def test_bp_freeze_until_trains_only_the_rest(art: Path, tmp_path: Path):
    run_dir = tmp_path / "bp"
    result = _invoke(["train", "--artifacts", str(art), "--method", "bp", "--freeze-until", "layers.1",
                      "--epochs", "1", "--batch-size", "128", "--run-dir", str(run_dir)])
    assert result.exit_code == 0, result.output
    initial = load_artifacts(art).weights
    trained = checkpoint.model_state(checkpoint.load(run_dir / checkpoint.FILENAME)[0])
    assert np.array_equal(trained["layers.1.weight"], initial["layers.1.weight"])
    for name in ("layers.3.weight", "layers.5.weight"):
        assert not np.array_equal(trained[name], initial[name]), name


def test_a_block_name_freezes_the_module_holding_its_last_layer(art: Path):
    modules = load_artifacts(art).modules
    assert [frozen_modules(modules, n) for n in (None, "layers.0", "layers.1", "layers.2")] == [0, 1, 1, 2]
    with pytest.raises(FreezeError, match="would freeze every module"):
        frozen_modules(modules, "layers")  # the block prefix of every layer, head included


def test_unknown_layer_lists_the_module_boundaries(art: Path, tmp_path: Path):
    msg = _flat(_invoke(["train", "--artifacts", str(art), "--freeze-until", "features.9", "--epochs", "1",
                         "--run-dir", str(tmp_path / "r")]))
    assert "--freeze-until 'features.9': the model has no layer of that name" in msg
    assert "module 0: layers.0 .. layers.1; module 1: layers.2 .. layers.3; module 2: layers.4 .. layers.5" in msg
    assert not (tmp_path / "r").exists()


def test_freezing_the_head_suggests_a_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("ASYNCFGD_CACHE", str(tmp_path / "cache"))
    msg = _flat(_invoke(["train", "--model", "cnn", "--config", "channels=[4,4]", "--tangents", "1",
                         "--freeze-until", "features.1", "--epochs", "1", "--run-dir", str(tmp_path / "r")]))
    assert "would freeze every module" in msg and "--split flatten" in msg


def test_a_frozen_module_that_holds_more_layers_is_reported(art: Path, tmp_path: Path):
    result = _invoke(["train", "--artifacts", str(art), "--freeze-until", "layers.2", "--epochs", "1",
                      "--batch-size", "128", "--run-dir", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert "module 1 also holds layers.3 .. layers.3 after layers.2" in result.output


def test_pretrain_then_evaluate_on_the_runtime_gives_the_same_accuracy(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch):
    """`pretrain` (torch) -> state_dict -> `train --weights --epochs 0` (export + ONNX Runtime evaluation)."""
    monkeypatch.setenv("ASYNCFGD_CACHE", str(tmp_path / "cache"))
    pth, pre_dir, eval_dir = tmp_path / "pre.pth", tmp_path / "pre", tmp_path / "eval"
    result = _invoke(["pretrain", "--out", str(pth), "--epochs", "2", "--batch-size", "128", "--config",
                      "channels=[4,8]", "--run-dir", str(pre_dir)])
    assert result.exit_code == 0, result.output
    assert json.loads((pre_dir / "config.json").read_text())["method"] == "bp"

    model = build_model("cnn", 10, (1, 8, 8), channels=[4, 8])
    assert load_weights(model, pth, 10) == []  # every tensor, the head included, loads
    assert torch.equal(model.state_dict()["features.0.1.running_mean"],
                       torch.load(pth, weights_only=True)["features.0.1.running_mean"])

    result = _invoke(["train", "--model", "cnn", "--config", "channels=[4,8]", "--weights", str(pth),
                      "--data", "digits-transfer-pretrain", "--epochs", "0", "--run-dir", str(eval_dir)])
    assert result.exit_code == 0, result.output
    with (pre_dir / "metrics.csv").open() as f:
        torch_acc = float(list(csv.DictReader(f))[-1]["test_acc"])
    with (eval_dir / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and rows[0]["epoch"] == "0" and rows[0]["train_acc"] == "nan"
    assert float(rows[0]["test_acc"]) == pytest.approx(torch_acc, abs=1e-6)
    assert not (eval_dir / checkpoint.FILENAME).exists()  # nothing was trained

