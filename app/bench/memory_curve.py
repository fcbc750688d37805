"""`asyncfgd-app bench-memory`: peak memory against batch size for each method, with its slope.

Every (method, batch) is one bench worker (a fresh process: its VmHWM is that run's peak) doing
one warm-up and one timed step; the artifacts are exported once, split for the middle batch, so
only the batch changes along a curve. A least-squares line through each method's peaks gives its
MB per sample (what one more sample costs) and intercept (what the method holds whatever the
batch); the memory model's prediction (with the dual graphs' liveness, and its fixed-size numpy
arrays apart) is recorded beside each peak.
"""
from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from asyncfgd.app.bench.memory_model import graph_live, predict
from asyncfgd.app.bench.run import BenchConfig, export_artifacts, run_worker, worker_cmd
from asyncfgd.app.bench.worker import runtime_method

CURVE_METHODS = ("bp-torch", "fgd", "asyncfgd")


def run_memory_curve(cfg: BenchConfig, batches: Sequence[int], root: Path,
                     log: Callable[[str], None] = print) -> dict[str, list[dict[str, Any]]]:
    """Per method, one point per batch: peak RSS, baseline and the model's bytes (MB)."""
    middle = sorted(batches)[len(batches) // 2]
    dirs = export_artifacts(replace(cfg, batch=middle), root)
    manifests = {k: _manifest(d) for k, d in dirs.items()}
    curves: dict[str, list[dict[str, Any]]] = {m: [] for m in cfg.methods}
    for method in cfg.methods:
        k, base = cfg.modules if cfg.pipelined(method) else 1, runtime_method(method)[0]
        for batch in batches:
            log(f"  {method}, batch {batch} ...")
            point = replace(cfg, batch=batch, steps=1, repeats=1, warmup=max(1, k))
            threads = 1 if cfg.pipelined(method) else cfg.threads
            r = run_worker(worker_cmd(sys.executable, method, dirs[k], point, threads), cfg.timeout_s)
            live = graph_live(dirs[k], manifests[k], batch) if base in ("fgd", "asyncfgd") else None
            model = predict(manifests[k], base, batch, live=live)
            curves[method].append({"batch": batch, "peak_rss_mb": r["peak_rss_mb"],
                                   "baseline_rss_mb": r["baseline_rss_mb"], "model_mb": model.total / 2**20,
                                   "arrays_mb": model.arrays / 2**20})
    return curves


def _manifest(directory: Path) -> dict[str, Any]:
    return dict(json.loads((directory / "manifest.json").read_text()))


def slope(points: list[dict[str, Any]]) -> tuple[float, float]:
    """(MB per sample, intercept MB) of the least-squares line through (batch, peak RSS)."""
    b = np.array([p["batch"] for p in points], dtype=np.float64)
    y = np.array([p["peak_rss_mb"] for p in points], dtype=np.float64)
    per_sample, intercept = np.polyfit(b, y, 1)
    return float(per_sample), float(intercept)


def format_curve(curves: dict[str, list[dict[str, Any]]]) -> str:
    batches = [p["batch"] for p in next(iter(curves.values()))]
    lines = [f"{'method':13} " + " ".join(f"{b:>7}" for b in batches) + f" {'MB/sample':>10} {'intercept':>9}"]
    for method, points in curves.items():
        per_sample, intercept = slope(points)
        lines.append(f"{method:13} " + " ".join(f"{p['peak_rss_mb']:7.0f}" for p in points)
                     + f" {per_sample:10.2f} {intercept:9.0f}")
    lines.append("peak RSS in MB per batch size; the slope and intercept of a least-squares line through them")
    return "\n".join(lines)


def plot_memory_curve(curves: dict[str, list[dict[str, Any]]], path: Path, title: str) -> None:
    from asyncfgd.app.plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, points in curves.items():
        b = [p["batch"] for p in points]
        per_sample, intercept = slope(points)
        line = ax.plot(b, [p["peak_rss_mb"] for p in points], marker="o",
                       label=f"{method}: {per_sample:.1f} MB/sample")[0]
        ax.plot(b, [intercept + per_sample * x for x in b], linestyle=":", color=line.get_color())
    ax.set(xlabel="batch size", ylabel="peak RSS (MB)", title=title)
    ax.set_xscale("log", base=2)
    ax.set_xticks(b, [str(x) for x in b])
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
