"""Learning-rate selection as in the paper: short runs over a grid, judged on a validation split.

Each learning rate trains the same configuration for a few epochs on the train set minus a
stratified validation fraction (``TrainConfig.validation``) and is judged by its final validation
accuracy, so the test set never influences the choice. Runs are independent processes (one
thread each) so they can use all cores; a run that diverges just loses.
"""
from __future__ import annotations

import csv
import math
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from asyncfgd.app.plots import pyplot
from asyncfgd.app.training import metrics
from asyncfgd.app.training.config import Diverged, TrainConfig, TrainError
from asyncfgd.app.training.data import load_dataset
from asyncfgd.app.training.freeze import frozen_modules
from asyncfgd.app.training.loop import resolve_artifacts, run_data, train

DEFAULT_LRS = (1e-5, 1e-4, 1e-3, 1e-2)
DEFAULT_EPOCHS = 10
DEFAULT_VALIDATION = 0.2
COLUMNS = ("lr", "val_acc", "val_loss", "train_acc", "train_loss", "epochs", "wall_s", "status", "best", "run_dir")


@dataclass
class SweepResult:
    rows: list[dict[str, Any]]  # one per learning rate, ascending, with COLUMNS
    best: dict[str, Any]  # the winning row
    out: Path


def default_jobs() -> int:
    """The cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _train_quietly(cfg: TrainConfig) -> bool:
    """One run in a worker: True if it finished, False if it diverged."""
    try:
        train(cfg, log=lambda _: None, bars=False)
    except Diverged:
        return False
    return True


def run_many(configs: list[TrainConfig], jobs: int) -> list[bool]:
    """Train every config, ``jobs`` at a time, each in a fresh process (clean timings and peak memory,
    no torch state shared between runs); whether each finished (False: diverged)."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max(1, min(jobs, len(configs))), mp_context=ctx, max_tasks_per_child=1) as pool:
        return list(pool.map(_train_quietly, configs))


def _row(cfg: TrainConfig, finished: bool) -> dict[str, Any]:
    keys = ("val_acc", "val_loss", "train_acc", "train_loss", "wall_s")
    last = metrics.read_csv(Path(cfg.run_dir) / "metrics.csv")[-1] if finished else dict.fromkeys(keys, float("nan"))
    return {"lr": cfg.lr, "epochs": cfg.epochs, "run_dir": cfg.run_dir, "best": 0,
            **{k: last[k] for k in keys}, "status": "ok" if finished else "diverged"}


def pick_best(rows: list[dict[str, Any]]) -> int:
    """Index of the highest validation accuracy (ties: the lower validation loss) among runs that finished."""
    ok = [i for i, r in enumerate(rows) if r["status"] == "ok"]
    if not ok:
        tried = ", ".join(f"{r['lr']:g}" for r in rows)
        raise TrainError(f"every learning rate of the sweep diverged ({tried}); try smaller ones with --lrs, or bound "
                         f"the updates with --clip-norm.")
    return max(ok, key=lambda i: (rows[i]["val_acc"], -rows[i]["val_loss"]))


def _check(base: TrainConfig) -> None:
    """Fail on a configuration error once, before any worker starts; export the model for all of them."""
    data = load_dataset(base.data)
    run_data(base, data)
    frozen_modules(resolve_artifacts(base, data).modules, base.freeze_until)


def sweep(base: TrainConfig, lrs: tuple[float, ...], out: Path, jobs: int,
          log: Callable[[str], None] = print) -> SweepResult:
    """Train ``base`` (its epochs and validation fraction) once per learning rate; write sweep.csv and sweep.png."""
    if base.validation <= 0 or base.epochs < 1:
        raise TrainError(f"a learning-rate sweep trains (--epochs >= 1) and judges on a validation split "
                         f"(--validation > 0); got --epochs {base.epochs} --validation {base.validation}.")
    lrs = tuple(sorted(set(lrs)))
    configs = [replace(base, lr=lr, threads=1, lr_sweep=None, run_dir=str(out / f"lr-{lr:g}")) for lr in lrs]
    if (out / "sweep.csv").exists() or any((Path(c.run_dir) / "metrics.csv").exists() for c in configs):
        raise TrainError(f"{out} already holds a sweep; pick another output directory (or delete it).")
    _check(base)
    out.mkdir(parents=True, exist_ok=True)
    log(f"sweep: {len(lrs)} learning rates x {base.epochs} epochs on {base.validation:.0%} of the train set held "
        f"out, {min(jobs, len(lrs))} at a time, into {out}")
    rows = [_row(c, done) for c, done in zip(configs, run_many(configs, jobs), strict=False)]
    best = pick_best(rows)
    rows[best]["best"] = 1
    write_csv(out / "sweep.csv", rows)
    plot(out / "sweep.png", rows, f"{base.model if not base.artifacts else Path(base.artifacts).name} "
                                  f"{base.method}, {base.epochs} epochs")
    return SweepResult(rows, rows[best], out)


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def table(rows: list[dict[str, Any]]) -> str:
    """The sweep as aligned text, the winner marked."""
    lines = [f"{'lr':>8}  {'val acc':>8}  {'val loss':>8}  {'train acc':>9}  {'time':>7}  status"]
    for r in rows:
        acc = "" if math.isnan(r["val_acc"]) else f"{100 * r['val_acc']:.1f}%"
        loss = "" if math.isnan(r["val_loss"]) else f"{r['val_loss']:.4f}"
        train_acc = "" if math.isnan(r["train_acc"]) else f"{100 * r['train_acc']:.1f}%"
        wall = "" if math.isnan(r["wall_s"]) else f"{r['wall_s']:.1f} s"
        mark = "  <- best" if r["best"] else ""
        lines.append(f"{r['lr']:>8g}  {acc:>8}  {loss:>8}  {train_acc:>9}  {wall:>7}  {r['status']}{mark}")
    return "\n".join(lines)


def plot(path: Path, rows: list[dict[str, Any]], title: str) -> None:
    """Validation accuracy against learning rate (log axis), the winner circled."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.semilogx([r["lr"] for r in rows], [100 * r["val_acc"] for r in rows], marker="o")
    best = next(r for r in rows if r["best"])
    ax.scatter([best["lr"]], [100 * best["val_acc"]], s=160, facecolors="none", edgecolors="C3", label="best")
    ax.set(xlabel="learning rate", ylabel="validation accuracy (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def auto_lr(cfg: TrainConfig, log: Callable[[str], None] = print, lrs: tuple[float, ...] = DEFAULT_LRS,
            jobs: int | None = None) -> TrainConfig:
    """``train --lr auto``: sweep ``cfg`` briefly (into RUN_DIR/lr-sweep), then ``cfg`` with the winner."""
    if cfg.epochs < 1:
        raise TrainError("--lr auto needs training (--epochs >= 1): there is nothing to choose a learning rate for.")
    short = replace(cfg, epochs=min(cfg.epochs, DEFAULT_EPOCHS), validation=cfg.validation or DEFAULT_VALIDATION)
    result = sweep(short, lrs, Path(cfg.run_dir) / "lr-sweep", jobs or default_jobs(), log)
    log(table(result.rows))
    log(f"--lr auto: chose {result.best['lr']:g} (validation accuracy {100 * result.best['val_acc']:.1f}% after "
        f"{short.epochs} epochs)")
    return replace(cfg, lr=result.best["lr"], lr_sweep=str(result.out))
