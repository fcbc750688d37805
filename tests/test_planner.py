"""The planner's calibration, choice and check (app/bench/planner.py) on hand-made bench-memory data."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from asyncfgd.app.bench.planner import Calibration, Candidate, PlanError, calibrate, check, choose
from asyncfgd.app.cli import app


def _curve(model: str = "net") -> dict:
    """Arrays of 40 MB cost their bytes; the rest of the model (60 + 3b) costs 1.2x + 10 (fgd) or
    1.1x + 30 (asyncfgd) in the arena; baseline 50 MB."""
    pts = {"fgd": (1.2, 10.0), "asyncfgd": (1.1, 30.0)}
    return {"model": model, "curves": {
        method: [{"batch": b, "model_mb": 100.0 + 3 * b, "arrays_mb": 40.0, "baseline_rss_mb": 50.0,
                  "peak_rss_mb": 50.0 + 40.0 + r * (60.0 + 3 * b) + c} for b in (8, 16, 32)]
        for method, (r, c) in pts.items()}}


def test_calibration_fits_each_methods_line_and_predicts_peaks():
    cal = calibrate(_curve())
    assert cal.baseline_mb == 50.0 and cal.batches == [8, 16, 32]
    assert cal.lines["fgd"] == pytest.approx((1.2, 10.0)) and cal.lines["asyncfgd"] == pytest.approx((1.1, 30.0))
    assert cal.peak("fgd", 200.0, 40.0) == pytest.approx(50 + 40 + 1.2 * 160 + 10)
    # only the named batches: two points still fit the line exactly
    assert calibrate(_curve(), [8, 32]).batches == [8, 32]
    with pytest.raises(PlanError, match="at least two fgd points"):
        calibrate(_curve(), [8])
    old = _curve()
    del old["curves"]["fgd"][0]["arrays_mb"]
    with pytest.raises(PlanError, match="arrays_mb"):
        calibrate(old)


def test_check_marks_calibration_points_and_measures_the_error():
    cal = calibrate(_curve("net"), [8, 32])
    rows = check(cal, _curve("net"))
    assert [r["calibrated"] for r in rows if r["method"] == "fgd"] == [True, False, True]
    assert max(abs(r["error"]) for r in rows) < 1e-9  # the data lie on the lines
    other = _curve("other")
    other["curves"]["fgd"][0]["peak_rss_mb"] *= 1.1  # measured 10% above the line
    first = check(cal, other)[0]
    assert not first["calibrated"] and first["error"] == pytest.approx(1 / 1.1 - 1)


def _cand(method: str, k: int, m: int, batch: int, peak: float) -> Candidate:
    return Candidate(method, k, m, batch, peak / 2, peak / 4, peak)


def test_choice_prefers_batch_then_pipeline_then_tangents():
    options = [_cand("fgd", 1, 1, 32, 300), _cand("asyncfgd", 2, 1, 32, 380), _cand("asyncfgd", 2, 4, 32, 450),
               _cand("fgd", 1, 1, 64, 520), _cand("asyncfgd", 2, 1, 16, 200)]
    best, why = choose(options, memory_mb=400, max_batch=64)
    assert best is not None and (best.method, best.tangents, best.batch) == ("asyncfgd", 1, 32)
    assert "batch 32 is the largest that fits" in why and "asyncfgd" in why
    best, why = choose(options, memory_mb=460, max_batch=64)
    assert best is not None and best.tangents == 4 and "m = 4" in why
    best, why = choose(options, memory_mb=340, max_batch=64)
    assert best is not None and best.method == "fgd" and "asyncfgd does not fit" in why
    best, why = choose(options, memory_mb=100, max_batch=64)
    assert best is None and "nothing fits in 100 MB" in why and "200 MB" in why


def test_lean_candidates_are_optional_and_chosen_only_when_nothing_else_fits():
    curve = _curve()
    assert set(calibrate(curve).lines) == {"fgd", "asyncfgd"}  # a calibration without lean points still works
    curve["curves"]["fgd-lean"] = [dict(p, peak_rss_mb=p["peak_rss_mb"] - 20) for p in curve["curves"]["fgd"]]
    cal = calibrate(curve)
    assert cal.lines["fgd-lean"] == pytest.approx((1.2, -10.0)) and "asyncfgd-lean" not in cal.lines
    assert {r["method"] for r in check(cal, curve)} == {"fgd", "asyncfgd", "fgd-lean"}
    options = [_cand("fgd", 1, 1, 32, 300), _cand("fgd-lean", 1, 1, 32, 280), _cand("fgd-lean", 1, 1, 64, 390)]
    best, why = choose(options, memory_mb=400, max_batch=64)
    assert best is not None and best.method == "fgd" and best.batch == 32 and "lean" not in why
    best, why = choose(options, memory_mb=290, max_batch=64)
    assert best is not None and best.method == "fgd-lean" and "train --memory lean" in why


def test_plan_cli_chooses_within_the_budget(tmp_path: Path):
    """A cnn on 1x8x8 inputs against a calibration where the arena holds exactly the model's bytes: the
    plan's predicted peaks are baseline + the model's bytes, and the chosen candidate is one that fits."""
    torch.manual_seed(0)
    cal = tmp_path / "cal.json"
    points = [{"batch": b, "model_mb": float(b), "arrays_mb": 0.0, "baseline_rss_mb": 60.0, "peak_rss_mb": 60.0 + b}
              for b in (8, 64)]
    curve = {"model": "cnn", "curves": {"fgd": points, "asyncfgd": points}}
    cal.write_text(json.dumps(curve))
    res = CliRunner().invoke(app, ["plan", "--calibration", str(cal), "--memory", "61", "--model", "cnn",
                                   "--input-shape", "1,8,8", "--batches", "8,64", "--tangents", "1"])
    assert res.exit_code == 0, res.output
    assert "chosen:" in res.output and "predicted peak" in res.output
    lean = [dict(p, peak_rss_mb=p["peak_rss_mb"] - 2) for p in points]
    cal.write_text(json.dumps({"model": "cnn", "curves": {**curve["curves"], "fgd-lean": lean}}))
    res = CliRunner().invoke(app, ["plan", "--calibration", str(cal), "--memory", "59", "--model", "cnn",
                                   "--input-shape", "1,8,8", "--batches", "8,64", "--tangents", "1"])
    assert res.exit_code == 0, res.output
    assert "chosen: fgd-lean" in res.output and res.output.rstrip().endswith("--memory lean")
    res = CliRunner().invoke(app, ["plan", "--calibration", str(cal), "--memory", "10", "--model", "cnn",
                                   "--input-shape", "1,8,8", "--batches", "8", "--tangents", "1"])
    assert res.exit_code != 0 and "nothing fits" in res.output


def test_calibration_file_must_be_bench_memory_json(tmp_path: Path):
    bad = tmp_path / "x.json"
    bad.write_text("[1, 2]")
    res = CliRunner().invoke(app, ["plan", "--calibration", str(bad), "--memory", "100"])
    assert res.exit_code != 0 and "not a bench-memory JSON" in res.output
    assert isinstance(calibrate(_curve()), Calibration)
