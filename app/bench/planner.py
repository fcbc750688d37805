"""`asyncfgd-app plan`: which batch, K and m fit a memory budget, from the memory model and a calibration.

The memory model (memory_model.py, with the dual graphs' liveness) says how a method's bytes scale
with the batch, K and m; a calibration says what the framework adds on this machine. It is a
bench-memory JSON of one model. The model's fixed-size numpy arrays (weights, tangents, optimizer
state: ``Prediction.arrays``) cost exactly their bytes; the rest (activations and their dual
temporaries in ONNX Runtime's arena, boundaries, the batch) carries the framework's overhead, so
per method a least-squares line through the points fits arena = r·rest + c, with arena = working
− arrays and working = peak RSS − the import baseline. A prediction is baseline + arrays + r·rest
+ c. Scope: the CPU with ONNX Runtime; a GPU device profile is not built.

The choice, among the candidates that fit: the largest batch up to ``max_batch`` (a bigger batch
is the cheapest throughput), then asyncfgd (its modules run concurrently) before sync FGD, then
the largest m (lower-variance estimates; the step costs about m passes). Candidates in the lean
memory mode (``train --memory lean``) exist when the calibration measured fgd-lean and
asyncfgd-lean; being slower, they are chosen only when nothing fits in the default mode.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from asyncfgd.app.bench.memory_model import graph_live, predict
from asyncfgd.app.bench.worker import LEAN, runtime_method

PLANNED_METHODS = ("fgd", "asyncfgd")
LEAN_METHODS = tuple(m + LEAN for m in PLANNED_METHODS)  # optional in a calibration


@dataclass
class Calibration:
    """working MB = r·model MB + c per method, and the process baseline (MB), measured on ``model``."""

    model: str
    baseline_mb: float
    lines: dict[str, tuple[float, float]]  # method -> (r, c)
    batches: list[int]

    def peak(self, method: str, model_mb: float, arrays_mb: float) -> float:
        r, c = self.lines[method]
        return self.baseline_mb + arrays_mb + r * (model_mb - arrays_mb) + c


class PlanError(ValueError):
    """The calibration or the request cannot be used; the message says why."""


def calibrate(curve: dict[str, Any], batches: Sequence[int] | None = None) -> Calibration:
    """Fit each method's line through the points of a bench-memory JSON (only ``batches`` if given)."""
    lines, baselines, used = {}, [], set()
    for method in (*PLANNED_METHODS, *LEAN_METHODS):
        points = [p for p in curve["curves"].get(method, []) if batches is None or p["batch"] in batches]
        if method in LEAN_METHODS and len(points) < 2:
            continue
        if len(points) < 2:
            raise PlanError(f"the calibration needs at least two {method} points of bench-memory "
                            f"(got {len(points)}); run `asyncfgd-app bench-memory --json FILE` with fgd and asyncfgd")
        if any("arrays_mb" not in p for p in points):
            raise PlanError("the calibration file predates the arrays' share of the model (arrays_mb); measure it "
                            "again with `asyncfgd-app bench-memory --json FILE`")
        rest = np.array([p["model_mb"] - p["arrays_mb"] for p in points])
        arena = np.array([p["peak_rss_mb"] - p["baseline_rss_mb"] - p["arrays_mb"] for p in points])
        r, c = np.polyfit(rest, arena, 1)
        lines[method] = (float(r), float(c))
        baselines += [p["baseline_rss_mb"] for p in points]
        used |= {p["batch"] for p in points}
    return Calibration(curve.get("model", "?"), float(np.median(baselines)), lines, sorted(used))


def load_curve(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        assert isinstance(data, dict) and "curves" in data
        return data
    except (OSError, ValueError, AssertionError):
        raise PlanError(f"{path} is not a bench-memory JSON (write one with `asyncfgd-app bench-memory --json "
                        f"{path}`)") from None


@dataclass
class Candidate:
    method: str
    modules: int
    tangents: int
    batch: int
    model_mb: float
    arrays_mb: float
    peak_mb: float


def candidates(exports: dict[tuple[int, int], Path], batches: Sequence[int], cal: Calibration) -> list[Candidate]:
    """Every (method, K, m, batch) the exported artifacts allow, with its predicted peak RSS."""
    out = []
    for (modules, m), root in exports.items():
        manifest = json.loads((root / "manifest.json").read_text())
        method = "fgd" if modules == 1 else "asyncfgd"
        for batch in batches:
            pred = predict(manifest, method, batch, live=graph_live(root, manifest, batch))
            model, arrays = pred.total / 2**20, pred.arrays / 2**20
            for variant in (method, method + LEAN):
                if variant in cal.lines:
                    out.append(Candidate(variant, modules, m, batch, model, arrays, cal.peak(variant, model, arrays)))
    return out


def choose(options: list[Candidate], memory_mb: float, max_batch: int) -> tuple[Candidate | None, str]:
    """The planner's pick among the candidates that fit, and why."""
    fits = [c for c in options if c.peak_mb <= memory_mb and c.batch <= max_batch]
    fast = [c for c in fits if runtime_method(c.method)[1] == "fast"]
    lean_only = bool(fits) and not fast
    fits = fast or fits
    if not fits:
        smallest = min(options, key=lambda c: c.peak_mb)
        return None, (f"nothing fits in {memory_mb:.0f} MB: the smallest candidate ({smallest.method}, K = "
                      f"{smallest.modules}, m = {smallest.tangents}, batch {smallest.batch}) needs "
                      f"{smallest.peak_mb:.0f} MB. Try smaller batches (--batches) or a smaller model.")
    best = max(fits, key=lambda c: (c.batch, c.modules > 1, c.tangents))
    why = [f"batch {best.batch} is the largest that fits (at most --max-batch {max_batch})"]
    if lean_only:
        why.insert(0, "nothing fits in the default memory mode; the lean mode (train --memory lean) trades "
                      "speed for memory (docs/performance.md)")
    same = [c for c in fits if c.batch == best.batch]
    if best.modules > 1:
        why.append(f"asyncfgd with K = {best.modules} fits, and its modules run concurrently")
    elif any(c.modules > 1 for c in options if c.batch == best.batch):
        why.append("asyncfgd does not fit at this batch, sync FGD does")
    if best.tangents > min(c.tangents for c in same):
        why.append(f"m = {best.tangents} is the most tangents that fit (lower-variance estimates)")
    return best, "; ".join(why) + f": predicted peak {best.peak_mb:.0f} MB of {memory_mb:.0f} MB."


def check(cal: Calibration, curve: dict[str, Any]) -> list[dict[str, Any]]:
    """Predicted against measured peaks for every FGD point of a bench-memory JSON (another model's, or
    the calibration model's batches that were held out); each point's model bytes are in the JSON."""
    rows = []
    for method in (m for m in (*PLANNED_METHODS, *LEAN_METHODS) if m in cal.lines):
        for p in curve["curves"].get(method, []):
            predicted = cal.peak(method, p["model_mb"], p["arrays_mb"])
            rows.append({"method": method, "batch": p["batch"], "measured_mb": p["peak_rss_mb"],
                         "predicted_mb": predicted, "error": predicted / p["peak_rss_mb"] - 1,
                         "calibrated": curve.get("model") == cal.model and p["batch"] in cal.batches})
    return rows
