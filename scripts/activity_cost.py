"""What a local-activity step costs over inference, per module: ORT time of the ``activity`` graph
over the ``forward`` graph, and the draw of its ±1 noise.

Exports the zoo cnn for 28×28 inputs (the mnist-5k run's model) in K modules with the method's
default m, then per module times ``forward`` and ``activity`` interleaved (forward, activity, ...,
so both meet the same load) on one random batch, ONNX Runtime with 1 intra-op thread, and prints
medians and their ratio.

    python scripts/activity_cost.py [--modules 2] [--tangents 4] [--batch 64] [--runs 15]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch

from asyncfgd.exporter.export import export_model
from asyncfgd.exporter.models import build_model, model_spec
from asyncfgd.runtime import contract as c
from asyncfgd.runtime.artifacts import load_artifacts
from asyncfgd.runtime.backend import ModuleRunner
from asyncfgd.runtime.engine import load_runners
from asyncfgd.runtime.perturb import fill_signs


def _times(fns: list[Callable[[], object]], runs: int) -> list[float]:
    """Median ms of each function, called in turn ``runs`` times after one warm-up call each."""
    for f in fns:
        f()
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(runs):
        for i, f in enumerate(fns):
            t = time.perf_counter()
            f()
            samples[i].append(time.perf_counter() - t)
    return [1e3 * statistics.median(s) for s in samples]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modules", type=int, default=2)
    ap.add_argument("--tangents", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    shape = (1, 28, 28)
    torch.manual_seed(0)
    model = build_model("cnn", 10, shape)
    with tempfile.TemporaryDirectory() as out:
        export_model(model, out, shape, 10, modules=args.modules, activity=True, tangents=args.tangents,
                     model_spec=model_spec(model), balance_batch=args.batch)
        runners = load_runners(load_artifacts(out), "onnxruntime", 1)
        rng = np.random.default_rng(0)
        h = rng.standard_normal((args.batch, *shape)).astype(np.float32)
        labels = np.eye(10, dtype=np.float32)[rng.integers(0, 10, args.batch)]
        for r in runners:
            print(_module_row(r, h, labels, args.tangents, args.runs))
            if not r.is_last:
                h = r.run(c.FORWARD, h).y.copy()


def _module_row(r: ModuleRunner, x: np.ndarray, labels: np.ndarray, m: int, runs: int) -> str:
    assert r.activity is not None
    eps = [np.empty((m, len(x), *s.shape), np.float32) for s in r.activity.sites]
    noise = {s.node: e for s, e in zip(r.activity.sites, eps, strict=True)}
    fwd, act, draw = _times([lambda: r.run(c.FORWARD, x, labels=labels if r.is_last else None),
                             lambda: r.run(c.ACTIVITY, x, labels=labels, noise=noise),
                             lambda: fill_signs(eps, 0, 1, r.index)], runs)
    return (f"module {r.index}: forward {fwd:.2f} ms, activity {act:.2f} ms ({act / fwd:.1f}x), "
            f"noise draw {draw:.2f} ms ({sum(e.size for e in eps)} values)")

if __name__ == "__main__":
    main()
