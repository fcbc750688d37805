"""Learning-rate and per-module tangent-scale (alpha) schedules, as pure functions of time.

Pure functions of (step | epoch) so that a resumed run, or a pipeline module updating K-k ticks
late, can recompute the value for any step without carrying schedule state.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

LR_KINDS = ("constant", "cosine", "step")
ALPHA_PRESETS = ("uniform", "head-only", "paper", "constant")


def lr_at(kind: str, base_lr: float, step: int, total_steps: int, warmup_steps: int = 0,
          step_size: int | None = None, gamma: float = 0.1) -> float:
    """Learning rate at 0-based ``step``.

    Every kind may start with a linear warm-up, ``base_lr * (step + 1) / warmup_steps``; the kind's
    own schedule then runs on ``step - warmup_steps``: ``constant``; ``cosine`` from base_lr down to
    0 at ``total_steps`` (and 0 after); ``step`` multiplies by ``gamma`` every ``step_size`` steps.
    """
    if kind not in LR_KINDS:
        raise ValueError(f"unknown lr schedule {kind!r}; expected one of {LR_KINDS}")
    if base_lr < 0 or step < 0 or warmup_steps < 0:
        raise ValueError(f"base_lr, step and warmup_steps must be >= 0, got {base_lr}, {step}, {warmup_steps}")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    t = step - warmup_steps
    if kind == "constant":
        return base_lr
    if kind == "cosine":
        if total_steps <= warmup_steps:
            raise ValueError(f"cosine needs total_steps > warmup_steps, got {total_steps} <= {warmup_steps}")
        progress = min(t / (total_steps - warmup_steps), 1.0)
        return 0.5 * base_lr * (1.0 + math.cos(math.pi * progress))
    if step_size is None or step_size <= 0:
        raise ValueError(f"the step schedule needs step_size > 0, got {step_size}")
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    return base_lr * gamma ** (t // step_size)


@dataclass(frozen=True)
class AlphaSchedule:
    """Per-module tangent scale alpha_k(epoch); E[g_k] = alpha_k^2 grad_k L, alpha_k = 0 freezes module k.

    Presets: ``uniform`` (``value`` everywhere); ``head-only`` (1 for the last module, 0 before);
    ``paper`` (AsyncFGD: last module 1; the others 0 for ``warm_epochs``, then a linear ramp to
    ``target`` over ``ramp_epochs``); ``constant`` (explicit ``alphas``, one per module).
    """

    preset: str
    value: float = 1.0
    warm_epochs: float = 10.0
    ramp_epochs: float = 5.0
    target: float = 0.15
    alphas: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.preset not in ALPHA_PRESETS:
            raise ValueError(f"unknown alpha preset {self.preset!r}; expected one of {ALPHA_PRESETS}")
        for name in ("value", "warm_epochs", "ramp_epochs", "target"):
            if getattr(self, name) < 0:
                raise ValueError(f"alpha schedule {name} must be >= 0, got {getattr(self, name)}")
        if (self.preset == "constant") != (self.alphas is not None):
            raise ValueError("alphas (one per module) are required by, and only by, the 'constant' preset")
        if self.alphas is not None:
            object.__setattr__(self, "alphas", tuple(float(a) for a in self.alphas))
            if not self.alphas or min(self.alphas) < 0:
                raise ValueError(f"alphas must be a non-empty list of values >= 0, got {self.alphas}")

    def alpha(self, module: int, num_modules: int, epoch: float) -> float:
        """Tangent scale of ``module`` (0-based) at fractional ``epoch`` (= step / steps_per_epoch)."""
        if not 0 <= module < num_modules:
            raise ValueError(f"module {module} out of range for {num_modules} modules")
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        is_last = module == num_modules - 1
        if self.preset == "uniform":
            return self.value
        if self.preset == "head-only":
            return 1.0 if is_last else 0.0
        if self.preset == "constant":
            assert self.alphas is not None  # __post_init__: the 'constant' preset requires alphas
            if len(self.alphas) != num_modules:
                raise ValueError(f"{len(self.alphas)} alphas given for {num_modules} modules")
            return self.alphas[module]
        if is_last:
            return 1.0
        if epoch < self.warm_epochs:
            return 0.0
        if self.ramp_epochs == 0:
            return self.target
        return self.target * min((epoch - self.warm_epochs) / self.ramp_epochs, 1.0)

    def frozen_prefix(self, num_modules: int, epoch: float) -> int:
        """Number of leading modules with alpha 0 now: the runtime runs them without tangent work."""
        n = 0
        while n < num_modules and self.alpha(n, num_modules, epoch) == 0.0:
            n += 1
        return n

    def to_dict(self) -> dict[str, Any]:
        """Plain (JSON-able) form for the run config."""
        d = asdict(self)
        d["alphas"] = None if self.alphas is None else list(self.alphas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AlphaSchedule:
        """Inverse of ``to_dict``; unknown keys are an error, missing ones take the defaults."""
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown alpha schedule keys {sorted(unknown)}")
        return cls(**d)

