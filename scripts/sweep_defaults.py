"""Sweep candidate defaults for `asyncfgd-app train` on digits with the real runtime.

Each configuration is a full `train()` run (export cached, ONNX Runtime backend, per-epoch
evaluation, checkpoints and plots included, as a user would run it); the table gives the final
test accuracy and the wall time of the training call. Run from the repository root:

    python scripts/sweep_defaults.py [--only NAME_SUBSTRING] [--seeds 0,1]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

from asyncfgd.app.data import load_dataset  # noqa: E402
from asyncfgd.app.train import TrainConfig, resolve_artifacts, train  # noqa: E402

BASE = TrainConfig(model="mlp", modules=2, method="asyncfgd", optimizer="adam", lr=1e-2, epochs=50)

CANDIDATES: dict[str, TrainConfig] = {
    # the MLP 64-128-10 of the reference numbers; K=2 puts the 128x10 head alone in module 1
    "mlp uniform a=1": replace(BASE, alpha_preset="uniform"),
    "mlp head-only": replace(BASE, alpha_preset="head-only"),
    "mlp head-only 8 tangents": replace(BASE, alpha_preset="head-only", tangents=8),
    "mlp paper warm10 ramp5 0.15": replace(BASE, alpha_preset="paper"),
    "mlp paper 0.05": replace(BASE, alpha_preset="paper", alpha_target=0.05),
    "mlp paper 8 tangents": replace(BASE, alpha_preset="paper", tangents=8),
    "mlp paper 8 tangents cosine": replace(BASE, alpha_preset="paper", tangents=8, lr_schedule="cosine"),
    "mlp paper 8 tangents cosine 100ep": replace(BASE, alpha_preset="paper", tangents=8, lr_schedule="cosine",
                                                 epochs=100),
    "mlp-512 head-only 8 tangents cosine": replace(BASE, alpha_preset="head-only", tangents=8, lr_schedule="cosine",
                                                   config={"hidden": [512]}),
    "mlp-512 paper 8 tangents cosine": replace(BASE, alpha_preset="paper", tangents=8, lr_schedule="cosine",
                                               config={"hidden": [512]}),
    "mlp paper 8 tangents cosine sgd": replace(BASE, alpha_preset="paper", tangents=8, lr_schedule="cosine",
                                               optimizer="momentum", lr=1e-3),
    "cnn paper 8 tangents cosine": replace(BASE, model="cnn", alpha_preset="paper", tangents=8,
                                           lr_schedule="cosine"),
    "cnn head-only 8 tangents cosine": replace(BASE, model="cnn", alpha_preset="head-only", tangents=8,
                                               lr_schedule="cosine"),
    "mlp fgd (sync) paper 8 tangents cosine": replace(BASE, method="fgd", alpha_preset="paper", tangents=8,
                                                      lr_schedule="cosine"),
    "mlp bp adam": replace(BASE, method="bp"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run only candidates whose name contains this")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds; the table shows each")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg in CANDIDATES.items():
            if args.only not in name:
                continue
            for seed in seeds:
                run = replace(cfg, seed=seed, run_dir=str(Path(tmp) / f"{len(rows)}"))
                resolve_artifacts(run, load_dataset(run.data))  # export first: the timing is the training's
                t0 = time.perf_counter()
                acc = train(run, log=lambda _: None)
                rows.append((name, seed, run.epochs, acc, time.perf_counter() - t0))
                print(f"{name:<42} seed {seed}  {run.epochs:>3} ep  {100 * acc:5.1f}%  {rows[-1][4]:6.1f} s", flush=True)
    print("\n| configuration | seed | epochs | test acc | train time |\n|---|---|---|---|---|")
    for name, seed, epochs, acc, secs in rows:
        print(f"| {name} | {seed} | {epochs} | {100 * acc:.1f}% | {secs:.1f} s |")


if __name__ == "__main__":
    main()
