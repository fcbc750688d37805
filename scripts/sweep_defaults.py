"""Sweep candidate defaults for `asyncfgd-app train` on digits with the real runtime.

Every configuration is a full `train()` run as a user would start it (ONNX Runtime backend,
per-epoch evaluation, checkpoints, metrics and plot), over several seeds (a seed changes the
initial weights, the data order and the tangents). The export is done before the clock starts,
so the time is the training's; `asyncfgd-app train` adds the export (a few seconds, once per
configuration thanks to the cache) and the interpreter start. Run from the repository root:

    python scripts/sweep_defaults.py [--only SUBSTRING] [--seeds 0,1,2]

and it prints a Markdown table: test accuracy (mean, min..max over seeds) and mean time.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

from asyncfgd.app.training.config import TrainConfig
from asyncfgd.app.training.data import load_dataset  # noqa: E402
from asyncfgd.app.training.loop import resolve_artifacts, train  # noqa: E402

MLP = TrainConfig(model="mlp", modules=2, method="asyncfgd", optimizer="adam", lr=1e-2, lr_schedule="cosine",
                  alpha_preset="uniform", tangents=8, epochs=50, threads=1)
CNN = replace(MLP, model="cnn")
PAPER = {"alpha_preset": "paper", "alpha_warm_epochs": 10.0, "alpha_ramp_epochs": 5.0, "alpha_target": 0.15}

CANDIDATES: dict[str, TrainConfig] = {
    # MLP 64-128-10 (K=2: the 64x128 layer, 8.3k of its 9.6k weights, is module 0; the head is module 1)
    "mlp uniform, 1 tangent, constant lr": replace(MLP, tangents=1, lr_schedule="constant"),
    "mlp uniform, 8 tangents": MLP,
    "mlp head-only, 8 tangents": replace(MLP, alpha_preset="head-only"),
    "mlp paper (warm 10, ramp 5, 0.15), 8 tangents": replace(MLP, **PAPER),
    "mlp paper (warm 5, ramp 5, 1.0), 8 tangents": replace(MLP, **{**PAPER, "alpha_warm_epochs": 5.0,
                                                                   "alpha_target": 1.0}),
    "mlp uniform, 8 tangents, momentum-SGD lr 1e-3": replace(MLP, optimizer="momentum", lr=1e-3),
    "mlp paper (10, 5, 0.15), 8 tangents, momentum-SGD lr 1e-3": replace(MLP, optimizer="momentum", lr=1e-3,
                                                                         **PAPER),
    "mlp uniform, 16 tangents": replace(MLP, tangents=16),
    "mlp uniform, 16 tangents, 100 epochs": replace(MLP, tangents=16, epochs=100),
    "mlp uniform, 32 tangents, 100 epochs": replace(MLP, tangents=32, epochs=100),
    "mlp uniform, 16 tangents, 100 epochs, sync fgd": replace(MLP, tangents=16, epochs=100, method="fgd"),
    "mlp bp, 100 epochs": replace(MLP, epochs=100, method="bp"),
    # CNN 16-32 conv + BN (module 0: the first conv, 176 weights; module 1: conv 2 and the head)
    "cnn uniform, 8 tangents": CNN,
    "cnn head-only, 8 tangents": replace(CNN, alpha_preset="head-only"),
    "cnn paper (warm 10, ramp 5, 0.15), 8 tangents": replace(CNN, **PAPER),
    "cnn uniform, 8 tangents, constant lr": replace(CNN, lr_schedule="constant"),
    "cnn uniform, 16 tangents, 100 epochs": replace(CNN, tangents=16, epochs=100),
    "cnn bp, 100 epochs": replace(CNN, epochs=100, method="bp"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run only candidates whose name contains this")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    data = load_dataset("digits")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg in CANDIDATES.items():
            if args.only not in name:
                continue
            accs, secs = [], []
            for seed in seeds:
                run = replace(cfg, seed=seed, run_dir=str(Path(tmp) / f"{len(rows)}-{seed}"))
                resolve_artifacts(run, data)
                t0 = time.perf_counter()
                accs.append(100 * train(run, log=lambda _: None))
                secs.append(time.perf_counter() - t0)
            rows.append((name, cfg.epochs, accs, statistics.mean(secs)))
            print(f"{name:<48} {' '.join(f'{a:5.1f}' for a in accs)}  {rows[-1][3]:5.1f} s  "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)
    print(f"\n| configuration | epochs | test acc, mean (min..max) over seeds {args.seeds} | time |\n|---|---|---|---|")
    for name, epochs, accs, sec in rows:
        print(f"| {name} | {epochs} | {statistics.mean(accs):.1f}% ({min(accs):.1f}..{max(accs):.1f}) | {sec:.1f} s |")


if __name__ == "__main__":
    main()
