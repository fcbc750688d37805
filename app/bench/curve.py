"""`asyncfgd-app bench --curve`: test accuracy against wall-clock time and epochs, bp vs fgd vs asyncfgd.

Each method trains the `asyncfgd-app train` defaults (model, dataset, optimizer, schedules, number
of epochs) through ``training.loop.train`` in a process of its own until it finishes or uses up the
wall-clock budget; then it gets Ctrl-C: the training loop stops between mini-batches and
checkpoints, and the per-epoch history it saved (test accuracy, wall time) is what gets plotted.
The budget is training time as the loop records it (``wall_s`` of the last finished epoch), so
start-up (imports, export) is not charged to a method; only completed epochs count.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from asyncfgd.app.plots import pyplot

CURVE_METHODS = ("bp", "fgd", "asyncfgd")
POLL_S = 1.0
STARTUP_ALLOWANCE_S = 120.0  # imports and export before the first epoch starts the clock


def _train(method: str, run_dir: str) -> None:
    """Child process: train with the defaults (until done or interrupted)."""
    sys.stdout = sys.stderr = open(os.devnull, "w")  # the loop's progress bars
    from asyncfgd.app.training.config import Interrupted, TrainConfig
    from asyncfgd.app.training.loop import train

    try:
        train(TrainConfig(method=method, run_dir=run_dir), log=lambda _: None)
    except (Interrupted, KeyboardInterrupt):  # the budget's end; KeyboardInterrupt if still starting up
        pass


def history(run_dir: Path) -> list[dict[str, Any]]:
    from asyncfgd.app.training import checkpoint

    path = run_dir / checkpoint.FILENAME
    return checkpoint.load(path)[1]["history"] if path.exists() else []


def run_curve(root: Path, budget_s: float, methods: tuple[str, ...] = CURVE_METHODS,
              log: Callable[[str], None] = print) -> dict[str, list[dict[str, Any]]]:
    """Per method, the epoch history reached within ``budget_s`` seconds of its own process."""
    ctx = multiprocessing.get_context("spawn")  # a clean process: no torch or threads inherited
    out = {}
    for method in methods:
        log(f"training {method} for {budget_s:.0f} s ...")
        proc = ctx.Process(target=_train, args=(method, str(root / method)))
        proc.start()
        deadline = time.monotonic() + budget_s + STARTUP_ALLOWANCE_S
        while proc.is_alive() and time.monotonic() < deadline:
            proc.join(POLL_S)
            done = history(root / method)
            if done and done[-1]["wall_s"] >= budget_s:
                break
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGINT)
            proc.join()
        out[method] = history(root / method)
        last = out[method][-1] if out[method] else None
        log(f"{method}: {len(out[method])} epochs" + (f", test acc {last['test_acc']:.1%}" if last else ""))
    return out


def plot_curve(curves: dict[str, list[dict[str, Any]]], path: Path, title: str) -> None:
    """Two panels: test accuracy against wall-clock seconds and against epochs."""
    plt = pyplot()
    fig, (by_time, by_epoch) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for method, hist in curves.items():
        acc = [h["test_acc"] for h in hist]
        by_time.plot([h["wall_s"] for h in hist], acc, label=method)
        by_epoch.plot([h["epoch"] for h in hist], acc, label=method)
    by_time.set_xlabel("wall-clock time (s)")
    by_epoch.set_xlabel("epoch")
    by_time.set_ylabel("test accuracy")
    for ax in (by_time, by_epoch):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
