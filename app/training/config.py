"""What determines a run (``TrainConfig``, saved in config.json and every checkpoint), and the
errors a run reports to the user."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asyncfgd.app.training import checkpoint
from asyncfgd.runtime.engine import check_memory
from asyncfgd.runtime.schedules import AlphaSchedule, lr_at


class TrainError(Exception):
    """The run cannot start or continue as configured; the message says what to change."""


class Diverged(TrainError):
    """The loss became NaN/inf (a learning-rate sweep counts this as a lost candidate, not an error)."""


class Interrupted(Exception):
    """Ctrl-C: a checkpoint was saved at the current batch."""

    def __init__(self, run_dir: Path, epoch: int, batch: int) -> None:
        super().__init__(f"interrupted in epoch {epoch + 1} at batch {batch}; a checkpoint was saved in {run_dir}. "
                         f"Continue with `asyncfgd-app train --resume {run_dir}`.")


@dataclass
class TrainConfig:
    """Everything that determines a run (written to ``config.json`` and into every checkpoint).

    The defaults are the winner of scripts/sweep_defaults.py on digits (docs/convergence.md):
    32 tangents per pass and alpha = 1 on both modules, Adam with a cosine decay, 100 epochs.
    """

    artifacts: str | None = None
    model: str = "mlp"
    modules: int = 2
    split: list[str] | None = None
    bn: str = "train"
    weights: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    data: str = "digits"
    method: str = "asyncfgd"
    backend: str = "onnxruntime"
    optimizer: str = "adam"
    lr: float = 1e-2
    lr_schedule: str = "cosine"
    weight_decay: float = 0.0
    clip_norm: float | None = None
    normalize: float | None = None
    epochs: int = 100
    batch_size: int = 64
    alpha_preset: str = "uniform"
    alpha_value: float = 1.0
    alpha_warm_epochs: float = 10.0
    alpha_ramp_epochs: float = 5.0
    alpha_target: float = 0.15
    alphas: list[float] | None = None
    tangents: int = 32
    perturb: dict[str, str] = field(default_factory=dict)  # local-activity: layer -> activity | weight
    tangent_mode: str = "gaussian"
    store_tangents: bool | None = None  # None: store when the copies fit in STORE_TANGENTS_BUDGET
    seed: int = 0
    threads: int = 1
    augment: bool = False
    validation: float = 0.0  # > 0: evaluate on this fraction of the train set, train on the rest
    freeze_until: str | None = None  # modules up to the one holding this layer get alpha 0 (and bp freezes them)
    lr_sweep: str | None = None  # the sweep directory whose winner is ``lr`` (train --lr auto)
    distributed: str | None = None  # under torchrun: "data" (shards of each batch) or "pipeline" (rank k: module k)
    drift_check_every: int = 200  # data-parallel: steps between comparisons of the ranks' weight digests
    run_dir: str = ""
    # how the run is watched and held in memory (no effect on the weights; may change on --resume)
    memory: str = "fast"  # ONNX Runtime's memory mode (runtime/host_memory.py): fast or lean
    log: list[str] = field(default_factory=list)  # run logs besides metrics.csv (--log): tensorboard, mlflow
    log_every: int | None = None  # a console summary line every N epochs; None: max(1, epochs // 10)

    def __post_init__(self) -> None:
        check_memory(self.backend, self.memory)  # every way a config is made: options, resume, replace()

    def alpha_schedule(self) -> AlphaSchedule:
        return AlphaSchedule(self.alpha_preset, self.alpha_value, self.alpha_warm_epochs, self.alpha_ramp_epochs,
                             self.alpha_target, tuple(self.alphas) if self.alphas is not None else None)

    def lr_fn(self, steps_per_epoch: int) -> Callable[[int], float]:
        """Learning rate by step; ``step`` decays 10x at one and two thirds of training."""
        total = max(self.epochs * steps_per_epoch, 1)  # --epochs 0 builds a learner that never steps
        step_size = max(math.ceil(total / 3), 1)
        return lambda s: lr_at(self.lr_schedule, self.lr, s, total, step_size=step_size)

    def optimizer_kw(self) -> dict[str, Any]:
        return {"weight_decay": self.weight_decay, "clip_norm": self.clip_norm, "normalize": self.normalize}

    def summary_every(self) -> int:
        """Epochs between the console's summary lines: --log-every, else about ten lines a run."""
        return self.log_every or max(1, self.epochs // 10)


#: options whose default depends on the method (docs/convergence.md): activity perturbation's estimates
#: are far less noisy than weight perturbation's, so it needs few tangents, and Adam's per-element steps
#: then want a smaller rate (1e-2 made the mnist-5k run oscillate between 70% and 80%)
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {"local-activity": {"tangents": 4, "lr": 3e-3}}


def method_defaults(method: str) -> dict[str, Any]:
    """The options ``method`` defaults differently from TrainConfig (empty for most)."""
    return dict(METHOD_DEFAULTS.get(method, {}))


def saved_config(run_dir: Path) -> TrainConfig:
    """The configuration of the run in ``run_dir``, from its checkpoint (for --resume)."""
    _, meta = checkpoint.load(run_dir / checkpoint.FILENAME)
    return TrainConfig(**meta["config"])
