"""Learners: what the training loop trains. The FGD runtime (sync FGD or the AsyncFGD pipeline over
the artifact graphs) or, for comparison, PyTorch autograd on the same model (bp.py)."""
from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from asyncfgd.app.training import checkpoint
from asyncfgd.app.training.config import TrainConfig
from asyncfgd.app.training.freeze import frozen_modules
from asyncfgd.runtime.artifacts import F32, Artifacts, param_numel
from asyncfgd.runtime.engine import load_runners, make_scheduler
from asyncfgd.runtime.scheduler import AlphaFn, Perturbation, Reducer, StepOutcome, evaluate


class Learner(Protocol):
    """What the loop trains: the FGD runtime or the autograd baseline."""

    def feed(self, x: np.ndarray, onehot: np.ndarray) -> list[StepOutcome]:
        """Train on one mini-batch; returns the steps whose loss became known."""
        ...

    def finish(self) -> list[StepOutcome]:
        """Apply every pending update (end of training)."""
        ...

    def before_eval(self) -> None:
        """Make the weights and statistics ready to evaluate and checkpoint (a collective when distributed)."""
        ...

    def evaluate(self, x: np.ndarray) -> np.ndarray | None:
        """Logits with the current weights, BatchNorm on running statistics (None on a distributed rank
        that does not hold them: only rank 0 reports)."""
        ...

    def estimate_norms(self) -> list[float | None]:
        """Per module, the mean norm of the gradient estimates applied since the last call (run logs)."""
        ...

    def alphas(self, step: int) -> list[float]:
        """Each module's α at ``step`` (none for a method without tangents)."""
        ...

    def state(self) -> tuple[checkpoint.Arrays, dict[str, Any]]:
        ...

    def load_state(self, arrays: checkpoint.Arrays, meta: dict[str, Any]) -> None:
        ...

    def close(self) -> None:
        ...


#: with --store-tangents unset, AsyncFGD keeps its delayed tangents when the copies take at most this
STORE_TANGENTS_BUDGET = 64 << 20  # bytes


def store_tangents(cfg: TrainConfig, arts: Artifacts) -> bool:
    """--store-tangents as given, or when unset: keep each delayed module's tangents until its update
    if all the copies fit in STORE_TANGENTS_BUDGET. The weights come out bit-identical either way;
    regenerating costs a second draw per step (the MLP's default run: 10% of its training time),
    storing costs (K − k) copies of module k's m tangents (the MLP's: 2 MB)."""
    if cfg.store_tangents is not None:
        return cfg.store_tangents
    return cfg.method == "asyncfgd" and copies_fit(arts)


def copies_fit(arts: Artifacts) -> bool:
    """Whether AsyncFGD's tangent copies fit in STORE_TANGENTS_BUDGET (the default of storing them)."""
    return stored_tangent_bytes(arts) <= STORE_TANGENTS_BUDGET


def stored_tangent_bytes(arts: Artifacts) -> int:
    """Memory of AsyncFGD's tangent copies: module k (delay K−1−k) keeps K − k steps of m tangents."""
    K = len(arts.modules)
    return sum((K - k) * arts.tangents * F32 * param_numel(mod.raw) for k, mod in enumerate(arts.modules) if k < K - 1)


def perturbation(cfg: TrainConfig, arts: Artifacts) -> Perturbation:
    """The run's tangent stream: its seed and distribution, and whether delayed modules keep their copies."""
    return Perturbation(cfg.seed, cfg.tangent_mode, store_tangents(cfg, arts))


def alpha_fn(arts: Artifacts, cfg: TrainConfig, steps_per_epoch: int) -> AlphaFn:
    """Each module's α by step: the schedule, and 0 for the frozen modules."""
    schedule, K = cfg.alpha_schedule(), len(arts.modules)
    schedule.alpha(K - 1, K, 0.0)  # a wrong number of --alphas fails here, before training
    frozen = frozen_modules(arts.modules, cfg.freeze_until)

    def alpha(module: int, step: int) -> float:
        return 0.0 if module < frozen else schedule.alpha(module, K, step / steps_per_epoch)

    return alpha


class FgdLearner:
    """Sync FGD or AsyncFGD on the runtime (ONNX Runtime or torch backend)."""

    def __init__(self, arts: Artifacts, cfg: TrainConfig, steps_per_epoch: int, reduce: Reducer | None = None) -> None:
        self.runners = load_runners(arts, cfg.backend, cfg.threads or None, cfg.memory)
        alpha = alpha_fn(arts, cfg, steps_per_epoch)
        self.scheduler = make_scheduler(self.runners, cfg.method, cfg.optimizer, cfg.lr_fn(steps_per_epoch), alpha,
                                        perturbation(cfg, arts),
                                        cfg.optimizer_kw(), reduce)
        for opt in self.scheduler.optimizers:
            opt.track_norm = bool(cfg.log)  # one extra pass over each estimate, for the run logs only
        self._alpha, self._modules = alpha, len(self.runners)

    def alphas(self, step: int) -> list[float]:
        return [self._alpha(k, step) for k in range(self._modules)]

    def estimate_norms(self) -> list[float | None]:
        """Each module's mean ‖ĝ‖ (the forward-gradient estimate, before clipping) since the last call
        (None for a module without updates); with ``--log`` only."""
        out: list[float | None] = []
        for opt in self.scheduler.optimizers:
            out.append(opt.norm_sum / opt.norm_steps if opt.norm_steps else None)
            opt.norm_sum, opt.norm_steps = 0.0, 0
        return out

    def feed(self, x: np.ndarray, onehot: np.ndarray) -> list[StepOutcome]:
        return self.scheduler.feed(x, onehot)

    def finish(self) -> list[StepOutcome]:
        return self.scheduler.drain()

    def before_eval(self) -> None:
        self.scheduler.flush()

    def evaluate(self, x: np.ndarray) -> np.ndarray | None:
        self.scheduler.flush()
        return evaluate(self.runners, x)

    def state(self) -> tuple[checkpoint.Arrays, dict[str, Any]]:
        return checkpoint.runtime_state(self.runners, self.scheduler)

    def load_state(self, arrays: checkpoint.Arrays, meta: dict[str, Any]) -> None:
        checkpoint.restore_runtime_state(arrays, meta, self.runners, self.scheduler)

    def close(self) -> None:
        self.scheduler.close()


def make_learner(arts: Artifacts, cfg: TrainConfig, steps_per_epoch: int) -> Learner:
    if cfg.method == "bp":
        from asyncfgd.app.training.bp import BpLearner  # imports torch

        return BpLearner(arts, cfg, steps_per_epoch)
    return FgdLearner(arts, cfg, steps_per_epoch)
