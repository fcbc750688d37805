"""Throughput measurements shared by the bench commands: steady-state training steps per second.

Timings on these machines are noisy, so every number that is compared is measured in the same
run, interleaved (A, B, A, B, ...), and reported as a median with its spread.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from asyncfgd.runtime.artifacts import load_artifacts
from asyncfgd.runtime.engine import load_runners, make_scheduler
from asyncfgd.runtime.scheduler import Perturbation


def synthetic_batch(shape: tuple[int, ...], classes: int, batch: int) -> tuple[Any, Any]:
    """The inputs every method sees: seeded normal images and integer labels."""
    rng = np.random.default_rng(0)
    return rng.standard_normal((batch, *shape)).astype(np.float32), rng.integers(0, classes, batch)


@dataclass
class Throughput:
    samples_per_s: float  # median over repeats
    spread: float  # (max − min) / 2 over repeats, samples/s
    busy_s: list[float] | None = None  # AsyncFGD: per-module busy time per step (median repeat)


class TrainingLoop:
    """A scheduler on synthetic data, ready to time: same inputs for every method."""

    def __init__(self, artifacts_dir: str | Path, method: str, batch: int, threads: int | None,
                 optimizer: str = "adam", backend: str = "onnxruntime", store_tangents: bool = False,
                 memory: str = "fast") -> None:
        art = load_artifacts(artifacts_dir)
        self.runners = load_runners(art, backend, threads=threads, memory=memory)
        self.sch = make_scheduler(self.runners, method, optimizer, lambda s: 1e-4, lambda k, s: 1.0,
                                  Perturbation(seed=0, store_tangents=store_tangents))
        self.x, labels = synthetic_batch(art.input_shape, art.num_classes, batch)
        self.y = np.eye(art.num_classes, dtype=np.float32)[labels]
        self.batch = batch

    def run(self, steps: int) -> tuple[float, list[float] | None]:
        """Seconds per step over ``steps`` steady-state steps (the pipeline stays full)."""
        busy0 = list(getattr(self.sch, "busy_s", [])) or None
        t0 = time.perf_counter()
        for _ in range(steps):
            self.sch.feed(self.x, self.y)
        self.sch.flush()
        per_step = (time.perf_counter() - t0) / steps
        busy = None
        if busy0 is not None:
            busy = [(b - a) / steps for a, b in zip(busy0, self.sch.busy_s, strict=False)]
        return per_step, busy

    def close(self) -> None:
        self.sch.drain()
        self.sch.close()


def interleaved(loops: dict[str, TrainingLoop], steps: int, warmup: int, repeats: int,
                min_seconds: float = 0.0) -> dict[str, Throughput]:
    """Time each loop ``repeats`` times, interleaved, after ``warmup`` untimed steps each.

    A repeat runs at least ``steps`` steps and at least ``min_seconds`` (judged from the warm-up's
    pace), so millisecond steps are not timed over windows that a single scheduler hiccup swamps.
    """
    count = {}
    for name, loop in loops.items():
        per_step, _ = loop.run(max(warmup, 1))
        count[name] = max(steps, math.ceil(min_seconds / max(per_step, 1e-9)))
    per: dict[str, list[tuple[float, Any]]] = {k: [] for k in loops}
    for _ in range(repeats):
        for name, loop in loops.items():
            per[name].append(loop.run(count[name]))
    out = {}
    for name, runs in per.items():
        rates = [loops[name].batch / t for t, _ in runs]
        med = statistics.median(rates)
        busy = min(runs, key=lambda r: abs(loops[name].batch / r[0] - med))[1]
        out[name] = Throughput(med, (max(rates) - min(rates)) / 2, busy)
    return out
