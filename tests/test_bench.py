"""`asyncfgd-app bench` on a tiny CNN: report schema, table, plot, failing workers, memory model.

No timing thresholds: the numbers are only checked for being there and positive.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from asyncfgd.app.bench import worker as bench_worker
from asyncfgd.app.bench.curve import plot_curve, run_curve
from asyncfgd.app.bench.memory_model import predict, widest_point
from asyncfgd.app.bench.run import (
    BenchConfig,
    format_memory_model,
    format_table,
    run_bench,
    venv_python,
    write_ort_training_base,
    write_plot,
)
from asyncfgd.app.bench.throughput import synthetic_batch
from asyncfgd.app.cli import app
from asyncfgd.exporter.export import export_model
from asyncfgd.exporter.models import build_model, model_spec

TINY = dict(model="cnn", modules=2, batch=4, steps=1, warmup=1, repeats=2, input_shape=(1, 8, 8), timeout_s=300)
PNG = b"\x89PNG\r\n\x1a\n"
ORT_VENV = Path(__file__).resolve().parents[1] / ".venv-ort-training"


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every method; bp-ort points at a venv that does not exist, so its row is an error."""
    tmp = tmp_path_factory.mktemp("bench")
    return run_bench(BenchConfig(**TINY, ort_venv=tmp / "no-venv"), tmp, log=lambda _: None)


def test_report_has_every_method_with_numbers(report):
    assert list(report["methods"]) == list(bench_worker.DEFAULT_METHODS)
    json.dumps(report)  # serialisable as it is
    for name, r in report["methods"].items():
        if name == "bp-ort":
            continue
        assert r["samples_per_s"] > 0 and r["peak_rss_mb"] > 0, (name, r)
        assert r["peak_rss_mb"] >= r["baseline_rss_mb"] > 0
        assert r["predicted_mb"] > 0 and r["measured_over_predicted"] > 0
        assert len(r["rates"]) == TINY["repeats"]
    rate = {name: r["samples_per_s"] for name, r in report["methods"].items()}
    for name in ("forward", "fgd", "asyncfgd", "fgd-torch"):  # each ratio from its own two measurements
        assert report["methods"][name]["vs_bp_torch"] == pytest.approx(rate[name] / rate["bp-torch"])
        assert report["methods"][name]["vs_fgd"] == pytest.approx(rate[name] / rate["fgd"])
    assert set(report["methods"]["fgd"]["threads_tried"]) == {"1", str(report["machine"]["cpus"])}
    assert len(report["methods"]["asyncfgd"]["busy_s"]) == TINY["modules"]


def test_missing_ort_training_venv_is_a_row_not_a_crash(report):
    r = report["methods"]["bp-ort"]
    assert r["samples_per_s"] is None and r["peak_rss_mb"] is None
    assert "--setup-ort-training" in r["error"]


def test_table_and_memory_model_print_every_row(report):
    table = format_table(report)
    for name in bench_worker.DEFAULT_METHODS:
        assert name in table
    assert "not installed" in table
    mem = format_memory_model(report)
    assert "saved activations" in mem and "module boundaries" in mem


def test_plot_is_written(report, tmp_path):
    out = tmp_path / "bench.png"
    write_plot(report, out)
    assert out.read_bytes()[:8] == PNG


def test_lean_rows_run_the_same_methods_in_the_lean_memory_mode(report, tmp_path):
    cfg = BenchConfig(**{**TINY, "repeats": 1}, methods=["fgd-lean", "asyncfgd-lean"])
    lean = run_bench(cfg, tmp_path, log=lambda _: None)["methods"]
    for name in ("fgd", "asyncfgd"):
        row, default = lean[name + "-lean"], report["methods"][name]
        assert row["samples_per_s"] > 0 and row["peak_rss_mb"] >= row["baseline_rss_mb"] > 0
        assert row["predicted_mb"] == pytest.approx(default["predicted_mb"])  # the same model, the same bytes
    assert set(lean["fgd-lean"]["threads_tried"]) == {"1", str(os.cpu_count())}
    assert len(lean["asyncfgd-lean"]["busy_s"]) == TINY["modules"]


def test_failing_worker_is_reported_and_the_rest_still_run(tmp_path):
    cfg = BenchConfig(**{**TINY, "repeats": 1}, methods=["fgd", "forward"], backend="no-such-backend")
    rep = run_bench(cfg, tmp_path, log=lambda _: None)
    assert "unknown backend" in rep["methods"]["fgd"]["error"]
    assert rep["methods"]["forward"]["samples_per_s"] > 0
    assert rep["methods"]["forward"]["vs_fgd"] is None


def test_cli_writes_json_and_png(tmp_path):
    js, png = tmp_path / "b.json", tmp_path / "b.png"
    args = ["bench", "--model", "cnn", "--input-shape", "1,8,8", "--batch", "4", "--steps", "1", "--repeats", "1",
            "--warmup", "0", "--methods", "forward", "--json", str(js), "--plot", str(png)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "forward" in res.output and "peak RSS" in res.output
    data = json.loads(js.read_text())
    assert data["methods"]["forward"]["samples_per_s"] > 0 and data["methods"]["forward"]["peak_rss_mb"] > 0
    assert png.read_bytes()[:8] == PNG


def test_cli_rejects_unknown_method():
    res = CliRunner().invoke(app, ["bench", "--methods", "sgd-magic"])
    assert res.exit_code != 0 and "unknown method" in res.output


# -- the memory model on a hand-checkable MLP ------------------------------------------------------

@pytest.fixture(scope="module")
def mlp_manifests(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict]:
    """16 -> Linear(4) -> ReLU -> Linear(3): 83 weights; K=2 cuts after the ReLU."""
    torch.manual_seed(0)
    model = build_model("mlp", 3, (1, 4, 4), hidden=(4,))
    tmp = tmp_path_factory.mktemp("mlp")
    return {k: export_model(model, tmp / f"k{k}", (1, 4, 4), 3, modules=k, model_spec=model_spec(model),
                            balance_batch=1 << 20)  # balanced by per-sample compute
            for k in (1, 2)}


def test_memory_model_by_hand(mlp_manifests):
    one, two = mlp_manifests[1], mlp_manifests[2]
    w, x = 83 * 4, 16 * 2 * 4  # weights; the input batch (2 samples of 16)
    # backprop: weights, grads, Adam (2x), every layer's output (16 + 4 + 4 + 3) per sample
    assert predict(one, "bp-torch", 2).total == w + x + w + 2 * w + 27 * 2 * 4
    # widest point of the whole MLP: at the first Linear, its input (16) and output (4) are live
    assert widest_point(one["modules"][0]) == 20
    # fgd: weights, tangent, Adam; the widest point with its tangent, 2 samples
    assert predict(one, "fgd", 2).total == w + x + w + 2 * w + 20 * 2 * 2 * 4
    # asyncfgd K=2: module 0 (68 weights) keeps a scratch tangent; one boundary of 4 values, (h, ḣ)
    # double-buffered; both modules' widest points at once (16: module 0's Linear input; 4)
    parts = predict(two, "asyncfgd", 2).parts
    assert parts["scratch (re-created tangents, gradients)"] == 68 * 4
    assert parts["module boundaries (h, ḣ) x2"] == 2 * 4 * 2 * 2 * 4
    assert parts["activations"] == (16 + 4) * 2 * 2 * 4
    assert predict(one, "forward", 2).total == w + x + 20 * 2 * 4


def test_memory_model_rejects_unknown_method(mlp_manifests):
    with pytest.raises(ValueError, match="unknown method"):
        predict(mlp_manifests[1], "magic", 2)


# -- bp-ort ----------------------------------------------------------------------------------------

def test_ort_training_base_is_the_forward_graph_up_to_the_logits(tmp_path):
    src = tmp_path / "art"
    torch.manual_seed(0)
    model = build_model("cnn", 10, (1, 8, 8))
    export_model(model, src, (1, 8, 8), 10, modules=1, model_spec=model_spec(model))
    write_ort_training_base(src, tmp_path / "ort", batch=4)
    base = onnx.load(str(tmp_path / "ort" / bench_worker.ORT_BASE_MODEL))
    trainable = json.loads((tmp_path / "ort" / bench_worker.ORT_META).read_text())["trainable"]
    assert trainable == ["w." + name for name in model.state_dict() if name.endswith(("weight", "bias"))]
    assert set(trainable) < {t.name for t in base.graph.initializer}
    with np.load(tmp_path / "ort" / bench_worker.ORT_BATCH) as batch:  # what every other method trains on
        want = synthetic_batch((1, 8, 8), 10, 4)
        assert np.array_equal(batch["x"], want[0]) and np.array_equal(batch["labels"], want[1])
    onnx.checker.check_model(base, full_check=True)
    assert [i.name for i in base.graph.input] == ["x"] and [o.name for o in base.graph.output] == ["logits"]
    x = np.random.default_rng(0).standard_normal((4, 1, 8, 8)).astype(np.float32)
    (logits,) = ort.InferenceSession(base.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    model.train()  # BatchNorm on batch statistics, as the training-mode graph
    with torch.no_grad():
        np.testing.assert_allclose(logits, model(torch.from_numpy(x)).numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not venv_python(ORT_VENV).exists(),
                    reason="no .venv-ort-training (asyncfgd-app bench --setup-ort-training)")
def test_bp_ort_runs_in_its_venv(tmp_path):
    cfg = BenchConfig(**{**TINY, "repeats": 1}, methods=["bp-ort"], ort_venv=ORT_VENV)
    r = run_bench(cfg, tmp_path, log=lambda _: None)["methods"]["bp-ort"]
    assert r["samples_per_s"] > 0 and r["peak_rss_mb"] > r["baseline_rss_mb"], r


# -- --curve ---------------------------------------------------------------------------------------

def test_curve_stops_each_method_at_its_budget_and_plots(tmp_path):
    curves = run_curve(tmp_path, budget_s=1.0, methods=("fgd",), log=lambda _: None)
    hist = curves["fgd"]
    assert hist and all(h["wall_s"] > 0 and 0 <= h["test_acc"] <= 1 for h in hist)
    assert [h["epoch"] for h in hist] == list(range(1, len(hist) + 1))
    assert len(hist) < 1000 and hist[-1]["wall_s"] >= 1.0  # stopped once the budget was reached
    plot_curve({"fgd": hist, "bp": hist}, tmp_path / "curve.png", "test")
    assert (tmp_path / "curve.png").read_bytes()[:8] == PNG


# -- bench-pipeline / bench-tangents ---------------------------------------------------------------

class _CountingLoop:
    """Stands in for TrainingLoop: 10 ms per step, remembers the step counts it was asked for."""

    batch = 8

    def __init__(self) -> None:
        self.calls: list[int] = []

    def run(self, steps: int) -> tuple[float, list[float]]:
        self.calls.append(steps)
        return 0.01, [0.004, 0.008]


def test_interleaved_stretches_fast_steps_to_the_minimum_time():
    from asyncfgd.app.bench.throughput import interleaved

    loop = _CountingLoop()
    res = interleaved({"a": loop}, steps=2, warmup=3, repeats=2, min_seconds=0.5)
    assert loop.calls == [3, 50, 50]  # warm-up, then ceil(0.5 s / 10 ms) steps per repeat
    assert res["a"].samples_per_s == pytest.approx(800.0) and res["a"].spread == 0.0
    assert interleaved({"a": _CountingLoop()}, steps=2, warmup=1, repeats=1)["a"].busy_s == [0.004, 0.008]


def test_bench_pipeline_and_tangents_cli_print_ratios():
    res = CliRunner().invoke(app, ["bench-pipeline", "--models", "mlp", "--batches", "4", "--steps", "1",
                                   "--seconds", "0", "--repeats", "1", "--warmup", "1"])
    assert res.exit_code == 0, res.output
    row = next(line for line in res.output.splitlines() if line.startswith("mlp"))
    assert "ratio" in row and "efficiency" in row and "cut before layers." in row
    assert row.endswith("tangents stored")  # as train does: the MLP's copies fit the budget
    res = CliRunner().invoke(app, ["bench-tangents", "--tangents", "1,2", "--steps", "1", "--seconds", "0",
                                   "--repeats", "1"])
    assert res.exit_code == 0, res.output
    assert "m =   2" in res.output and "x m=1" in res.output


@pytest.mark.parametrize("args, message", [
    (["bench", "--input-shape", "3,32"], "--input-shape must be 3 comma-separated positive integers"),
    (["bench-tangents", "--tangents", "1,x"], "--tangents must be comma-separated positive integers"),
    (["bench-tangents", "--input-shape", "1,8,0"], "--input-shape must be 3 comma-separated positive integers"),
    (["bench-pipeline", "--batches", "8,"], "--batches must be comma-separated positive integers"),
])
def test_bench_clis_reject_bad_number_lists_with_a_message(args, message):
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2
    assert message in res.output and "Traceback" not in res.output


def test_graph_liveness_counts_intermediates_until_their_last_reader():
    """x -> Relu -> a; a -> Neg -> b; (a, b) -> Mul -> c; c -> Sigmoid -> out. With N = 5 rows of 3:
    at Neg, a and b are live (2 tensors); at Mul, a and b die and c is born (a, b, c: 3); at the
    output node only the output, which is bound to a caller's buffer, so not counted."""
    from onnx import TensorProto, helper

    from asyncfgd.app.bench.memory_model import _live_bytes

    vi = helper.make_tensor_value_info
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["a"], ["b"]),
             helper.make_node("Mul", ["a", "b"], ["c"]), helper.make_node("Sigmoid", ["c"], ["out"])]
    graph = helper.make_graph(nodes, "g", [vi("x", TensorProto.FLOAT, ["N", 3])],
                              [vi("out", TensorProto.FLOAT, ["N", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert _live_bytes(model, 5) == 3 * 5 * 3 * 4


def test_graph_temporaries_are_a_separate_part(mlp_manifests):
    one, two = mlp_manifests[1], mlp_manifests[2]
    plain = predict(one, "fgd", 2)
    # a graph whose widest node holds 100 more bytes than the layer count: the difference is its own part
    widest = plain.parts["activations"]
    more = predict(one, "fgd", 2, live=[widest + 100])
    assert more.parts["dual-rule temporaries (graph liveness)"] == 100
    assert more.total == plain.total + 100 and more.layers_only == plain.total
    # the pipeline adds each module's excess; a graph narrower than the layer count adds nothing
    parts = predict(two, "asyncfgd", 2, live=[0, 10**6]).parts
    assert parts["dual-rule temporaries (graph liveness)"] == 10**6 - 4 * 2 * 2 * 4


def test_memory_curve_slope_is_the_least_squares_line():
    from asyncfgd.app.bench.memory_curve import slope

    points = [{"batch": b, "peak_rss_mb": 100 + 2.5 * b + e} for b, e in ((8, 1.0), (16, -2.0), (32, 1.0))]
    per_sample, intercept = slope(points)
    b = np.array([8, 16, 32.0])
    y = 100 + 2.5 * b + np.array([1.0, -2.0, 1.0])
    A = np.stack([b, np.ones(3)], 1)
    expected = np.linalg.lstsq(A, y, rcond=None)[0]
    assert np.allclose([per_sample, intercept], expected)


def test_bench_memory_cli_writes_points_and_plot(tmp_path):
    js, png = tmp_path / "m.json", tmp_path / "m.png"
    res = CliRunner().invoke(app, ["bench-memory", "--model", "cnn", "--input-shape", "1,8,8", "--batches", "4,16",
                                   "--methods", "fgd", "--plot", str(png), "--json", str(js)])
    assert res.exit_code == 0, res.output
    points = json.loads(js.read_text())["curves"]["fgd"]
    assert [p["batch"] for p in points] == [4, 16]
    assert all(p["peak_rss_mb"] > p["baseline_rss_mb"] > 0 and p["model_mb"] > 0 for p in points)
    assert png.read_bytes()[:8] == PNG and "MB/sample" in res.output
