"""Calibrate the splitter's cost model (exporter/split.py) on this machine, in dual multiply-adds.

A pipeline module's step is its dual run plus work per weight that does not shrink with the
batch: drawing the tangent (again at update time in delayed modules) and the update g = d·u +
Adam. ``split.StepCost`` prices the dual run as batch × (dual MACs + ELEMENT_MACS per output
element) and a weight as DRAW_MACS per draw + UPDATE_MACS; this script measures all three.

Method (one ORT intra-op thread, as in an AsyncFGD worker): export a few models as two modules at
fixed cuts, time each module's dual graph (median of runs), and fit seconds = a·MACs + b·elements
+ c by least squares relative to each time (so small modules count as much as large ones); a is
the price of a MAC, b/a is ELEMENT_MACS. Then time ``fill_tangents`` and the runtime's update on
ResNet-18's last module: seconds per weight over a gives DRAW_MACS and UPDATE_MACS.

    python scripts/split_costs.py [--batch 64] [--runs 7]
"""
from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from asyncfgd.app.bench.throughput import synthetic_batch
from asyncfgd.exporter.export import export_model
from asyncfgd.exporter.models import build_model, model_spec
from asyncfgd.runtime import contract as c
from asyncfgd.runtime.artifacts import load_artifacts
from asyncfgd.runtime.backend import ModuleRunner
from asyncfgd.runtime.dual.program import module_specs
from asyncfgd.runtime.engine import load_runners
from asyncfgd.runtime.optim import Adam
from asyncfgd.runtime.perturb import fill_tangents

#: (model, input shape, first layer of module 1): cuts that give modules of different mixes
CASES = (("resnet18", (3, 32, 32), "layer3"), ("resnet18", (3, 32, 32), "layer2"),
         ("cnn", (3, 32, 32), "features.1.0"), ("cnn", (3, 32, 32), "features.0.1"),
         ("mobilenetv2", (3, 32, 32), "features.8"))


def _median_s(fn: Callable[[], object], runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _modules(name: str, shape: tuple[int, int, int], cut: str, batch: int, runs: int,
             out: Path) -> tuple[list[tuple[float, float, float]], list[ModuleRunner]]:
    """Per module (dual-run seconds, dual MACs, output elements) for the batch, and the runners."""
    torch.manual_seed(0)
    model = build_model(name, 10, shape)
    manifest = export_model(model, out, shape, 10, split_at=[cut], model_spec=model_spec(model))
    art = load_artifacts(out)
    runners = load_runners(art, "onnxruntime", threads=1)
    x, labels = synthetic_batch(art.input_shape, art.num_classes, batch)
    y = np.eye(art.num_classes, dtype=np.float32)[labels]
    first = runners[0].run(c.DUAL_FIRST, x)
    runs_of = (lambda: runners[0].run(c.DUAL_FIRST, x), lambda: runners[1].run(c.DUAL, first.y, first.y_dot, y))
    rows = []
    for spec, run in zip(module_specs(manifest), runs_of, strict=False):
        macs = batch * spec.cost
        elements = batch * sum(math.prod(n.shape) for n in spec.nodes)
        rows.append((_median_s(run, runs), macs, elements))
        print(f"{name} cut before {cut}, module {spec.index}: dual run {1e3 * rows[-1][0]:8.1f} ms")
    return rows, runners


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, shape, cut) in enumerate(CASES):
            found, runners = _modules(name, shape, cut, args.batch, args.runs, Path(tmp) / str(i))
            rows += found
            if i == 0:
                last = runners[1]  # ResNet-18's weight-heavy module: the per-weight timings
        times = np.array([r[0] for r in rows])
        design = np.array([[r[1], r[2], 1.0] for r in rows]) / times[:, None]
        (per_mac, per_element, fixed), *_ = np.linalg.lstsq(design, np.ones(len(rows)), rcond=None)
        print(f"fit: {1e12 * per_mac:.1f} ps per dual MAC, {1e9 * per_element:.2f} ns per output element "
              f"= {per_element / per_mac:.0f} MACs (ELEMENT_MACS), {1e3 * fixed:.2f} ms fixed per run; "
              f"predicted / measured per module: {np.round(design @ [per_mac, per_element, fixed], 2).tolist()}")
        hosts = last.tangent_host()
        n = sum(h.size for h in hosts)
        draw = _median_s(lambda: fill_tangents(hosts, 0, 1, 1), args.runs) / n
        opt = Adam(last.params, np, lr=1e-4)

        def update() -> None:
            for name, g in last.grads.items():
                np.multiply(last.tangents[name][0], 0.5, out=g)
            opt.step(last.grads)

        upd = _median_s(update, args.runs) / n
    print(f"gaussian draw {1e9 * draw:.2f} ns/weight = {draw / per_mac:.0f} MACs (DRAW_MACS); "
          f"update (g = d·u, Adam) {1e9 * upd:.2f} ns/weight = {upd / per_mac:.0f} MACs (UPDATE_MACS)")


if __name__ == "__main__":
    main()
