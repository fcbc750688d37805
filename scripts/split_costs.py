"""Calibrate the splitter's cost model: per-weight work per step in dual multiply-add equivalents.

A pipeline module's step is its dual run (∝ batch × dual FLOPs) plus work per weight that does not
shrink with the batch: drawing the tangent (again at update time in delayed modules) and the
update g = d·u + Adam. ``exporter/split.py`` balances modules with both; its constants
``DRAW_MACS`` / ``UPDATE_MACS`` are this script's output on the development machine.

Method (one ORT intra-op thread, as in an AsyncFGD worker): export ResNet-18 (CIFAR) as K=2, time
each module's dual graph at the given batch (median of runs) to get seconds per dual multiply-add,
time ``fill_tangents`` and the runtime's update on the same module's buffers to get seconds per
weight, and print their ratio.

    python scripts/split_costs.py [--batch 64] [--runs 7]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from asyncfgd.app.bench_worker import synthetic_batch
from asyncfgd.exporter.export import export_model
from asyncfgd.exporter.models import build_model, model_spec
from asyncfgd.runtime.artifacts import load_artifacts
from asyncfgd.runtime.engine import load_runners
from asyncfgd.runtime.optim import Adam
from asyncfgd.runtime.perturb import fill_tangents


def _median_s(fn: Callable[[], object], runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = build_model("resnet18", 10, (3, 32, 32))
    with tempfile.TemporaryDirectory() as tmp:
        export_model(model, Path(tmp), (3, 32, 32), 10, modules=2, model_spec=model_spec(model))
        art = load_artifacts(tmp)
        runners = load_runners(art, "onnxruntime", threads=1)
        x, labels = synthetic_batch(art.input_shape, art.num_classes, args.batch)
        y = np.eye(art.num_classes, dtype=np.float32)[labels]
        first = runners[0].run("dual_first", x)
        mac_s = []
        for r, mod, run in ((runners[0], art.modules[0], lambda: runners[0].run("dual_first", x)),
                            (runners[1], art.modules[1], lambda: runners[1].run("dual", first.y, first.y_dot, y))):
            t = _median_s(run, args.runs)
            mac_s.append(t / (args.batch * mod.cost_flops))
            print(f"module {mod.index}: dual run {1e3 * t:7.1f} ms = {1e12 * mac_s[-1]:.1f} ps per dual MAC")
        per_mac = statistics.mean(mac_s)
        r = runners[1]
        hosts = r.tangent_host()
        n = sum(h.size for h in hosts)
        draw = _median_s(lambda: fill_tangents(hosts, 0, 1, 1), args.runs) / n
        opt = Adam(r.params, np, lr=1e-4)

        def update() -> None:
            for name, g in r.grads.items():
                np.multiply(r.tangents[name][0], 0.5, out=g)
            opt.step(r.grads)

        upd = _median_s(update, args.runs) / n
    print(f"gaussian draw {1e9 * draw:.2f} ns/weight = {draw / per_mac:.0f} MACs; "
          f"update (g = d·u, Adam) {1e9 * upd:.2f} ns/weight = {upd / per_mac:.0f} MACs")


if __name__ == "__main__":
    main()
