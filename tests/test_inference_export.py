"""`asyncfgd-app export-inference` (issue 19): a trained run as one ONNX graph, built without torch."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from asyncfgd.app.cli import app
from asyncfgd.app.training import metrics
from asyncfgd.app.training.data import load_dataset
from asyncfgd.exporter.models import build_model
from asyncfgd.exporter.trt_check import check_trt_compat

ZOO = {"mlp": "hidden=[16]", "cnn": "channels=[4,8]", "resnet18": "width=4", "mobilenetv2": "width_mult=0.25"}


def _invoke(args: list[str]):
    return CliRunner().invoke(app, args, env={"TQDM_DISABLE": "1"})


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """One short training run per zoo model on the embedded digits (BatchNorm in train mode)."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ASYNCFGD_CACHE", str(root / "cache"))
        for name, config in ZOO.items():
            run = root / name
            result = _invoke(["train", "--model", name, "--config", config, "--epochs", "2", "--tangents", "1",
                              "--batch-size", "64", "--run-dir", str(run), "--seed", "1"])
            assert result.exit_code == 0, result.output
            out[name] = run
        yield out


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name", sorted(ZOO))
def test_exported_model_is_the_trained_network(name, runs, tmp_path):
    """Logits equal the trained weights run through PyTorch (save-torch + the zoo model in eval mode)
    to 1e-5 relative; test accuracy equals the run's last test accuracy; TensorRT check clean."""
    run = runs[name]
    result = _invoke(["export-inference", str(run), "--out", str(tmp_path / "m.onnx"), "--softmax"])
    assert result.exit_code == 0, result.output
    assert "TensorRT check: clean" in result.output
    assert _invoke(["save-torch", str(run), "--out", str(tmp_path / "m.pth")]).exit_code == 0
    data = load_dataset("digits")
    model = build_model(name, 10, (1, 8, 8), **_parse(ZOO[name]))
    model.load_state_dict(torch.load(tmp_path / "m.pth"))
    x = data.test.images[:64]
    with torch.no_grad():
        want = model.eval()(torch.from_numpy(x)).numpy()
    logits, probs = _session(tmp_path / "m.onnx").run(None, {"x": x})
    assert np.abs(logits - want).max() <= 1e-5 * np.abs(want).max()
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    last = metrics.read_csv(run / "metrics.csv")[-1]["test_acc"]
    shown = float(re.search(r"test accuracy \(\d+ samples\): ([\d.]+)% in float32", result.output).group(1))
    assert abs(shown - 100 * last) < 0.01, (shown, last)
    graph = onnx.load(tmp_path / "m.onnx")
    assert [i.name for i in graph.graph.input] == ["x"] and len(graph.graph.initializer) > 0
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a dynamic batch
    assert not [i for i in check_trt_compat(graph) if i.severity == "error"]


def _parse(config: str) -> dict:
    key, value = config.split("=")
    return {key: eval(value)}  # noqa: S307 - the test's own literals


def test_fp16_reports_a_small_accuracy_change(runs, tmp_path):
    result = _invoke(["export-inference", str(runs["cnn"]), "--out", str(tmp_path / "h.onnx"), "--fp16"])
    assert result.exit_code == 0, result.output
    change = float(re.search(r"change ([+-][\d.]+) points", result.output).group(1))
    assert abs(change) <= 0.5
    graph = onnx.load(tmp_path / "h.onnx")
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.graph.initializer)
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # the interface stays float32


def test_export_runs_without_torch(runs, tmp_path):
    """On a device without torch: a subprocess in which importing torch fails."""
    code = "import sys; sys.modules['torch'] = None; from asyncfgd.app.cli import main; main()"
    out = tmp_path / "nt.onnx"
    proc = subprocess.run([sys.executable, "-c", code, "export-inference", str(runs["resnet18"]), "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "TQDM_DISABLE": "1"})
    assert proc.returncode == 0, proc.stderr
    x = load_dataset("digits").test.images[:8]
    assert _session(out).run(None, {"x": x})[0].shape == (8, 10)


def test_bad_run_directory_is_a_clear_error(tmp_path):
    result = _invoke(["export-inference", str(tmp_path), "--out", str(tmp_path / "m.onnx")])
    assert result.exit_code == 2 and "no config.json" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("name", ["vit_tiny", "efficientnet_b0", "densenet_block_net"])
def test_any_traced_model_exports_for_inference(name, tmp_path):
    """Fixtures with attention, drop-path, squeeze-excite and dropout (off at inference), via the
    Python API: the graph computes the model in eval mode."""
    from architectures import FIXTURES

    from asyncfgd.exporter.export import export_model
    from asyncfgd.exporter.inference import export_inference

    make, shape = FIXTURES[name]
    model = make()
    export_model(model, tmp_path / "art", shape, 10, modules=2)
    export_inference(tmp_path / "art", tmp_path / "m.onnx")
    x = np.random.default_rng(0).standard_normal((5, *shape)).astype(np.float32)
    with torch.no_grad():
        want = model.eval()(torch.from_numpy(x)).numpy()
    got = _session(tmp_path / "m.onnx").run(None, {"x": x})[0]
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
