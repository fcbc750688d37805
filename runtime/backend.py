"""The backend contract: what the pipeline scheduler needs from one module on one device.

A backend owns, per pipeline module, the compiled graphs (ONNX Runtime sessions, TensorRT
engines, or torch programs) and the *live* device buffers of that module's weights, weight
tangents and BatchNorm running statistics. The scheduler never copies weights: it fills the
tangent buffers in place, asks the module to run one graph role, and lets the optimizer update
the weight buffers in place with the backend's array namespace ``xp``.

The graph roles and tensor names are the artifact contract's (contract.py, docs/artifacts.md).
Roles that update BatchNorm statistics write them back into the module's buffers.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from . import contract as c
from .dual.program import ActivityPlan
from .masks import DropoutSite


@dataclass
class RunResult:
    """Outputs of one graph run. Arrays live on the backend's device (``xp`` arrays).

    Non-last modules fill ``y`` (and ``y_dot`` for dual roles); the last module fills ``loss``
    (shape ``()`` or ``(m,)`` when several tangents ride in one pass: loss_dot has one entry per
    tangent), ``loss_dot`` and ``logits``.
    """

    y: Any = None
    y_dot: Any = None
    loss: Any = None
    loss_dot: Any = None
    logits: Any = None
    sample_dot: Any = None  # (m, N): the activity role's per-sample derivatives
    #: the activity role's weight-gradient estimates by weight name (usable as the optimizer's scratch)
    grads: dict[str, Any] | None = None
    #: device event marking the outputs complete (CUDA backends); the consumer waits on it
    ready: Any = None

    @staticmethod
    def of(outputs: Mapping[str, Any], ready: Any = None) -> RunResult:
        """The result fields from a graph's outputs by contract name."""
        grads = {w: v for name, v in outputs.items() if (w := c.estimated_weight(name)) is not None}
        return RunResult(**{name: outputs.get(name) for name in c.OUTPUTS}, grads=grads or None, ready=ready)


def updated_stats(outputs: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    """(statistic name, new value) for each BatchNorm statistic a graph run updated."""
    for name, value in outputs.items():
        stat = c.updated_stat(name)
        if stat is not None:
            yield stat, value


class ModuleRunner(Protocol):
    """One pipeline module, resident on one device.

    Tangents are drawn on the host from the seeded generator (so every backend reproduces the
    reference): the scheduler fills ``tangent_host()`` / ``scratch_host()`` and then calls
    ``upload_tangents()`` / ``upload_scratch()``, which are no-ops where host and device memory
    are the same (ONNX Runtime CPU, torch CPU).
    """

    index: int
    is_last: bool
    #: the module's dropout layers (the scheduler draws their masks: runtime/masks.py)
    dropout: list[DropoutSite]
    #: the local-activity method's plan (which sites take noise, which weights tangents), if exported
    activity: ActivityPlan | None
    #: live weight buffers, by weight name (updated in place by the optimizer)
    params: dict[str, Any]
    #: live tangent buffers, by weight name, shape (m, *weight.shape)
    tangents: dict[str, Any]
    #: BatchNorm running statistics, by buffer name
    buffers: dict[str, Any]
    #: the gradient that re-created tangents (``scratch``) combine into
    grads: dict[str, Any]

    # read-only members: a runner may provide them as class attributes or properties
    @property
    def xp(self) -> Any:
        """Array namespace for in-place optimizer math on this module's buffers
        (numpy for ORT-CPU, torch for the torch backend)."""
        ...

    @property
    def scratch(self) -> dict[str, Any]:
        """Tangents re-created for an update, (m, *shape) by weight name."""
        ...

    def tangent_host(self) -> list[np.ndarray]:
        """Host arrays to fill with this module's tangents, in ``params`` order."""
        ...

    def upload_tangents(self) -> None:
        ...

    def scratch_host(self) -> list[np.ndarray]:
        ...

    def upload_scratch(self) -> None:
        ...

    def run(self, role: str, x: Any, x_dot: Any = None, labels: Any = None, ready: Any = None,
            masks: Mapping[str, np.ndarray] | None = None, noise: Mapping[str, np.ndarray] | None = None
            ) -> RunResult:
        """Run one graph role on a batch; ``x``/``x_dot`` come from the previous module, whose
        ``RunResult.ready`` event (if any) is passed as ``ready`` so the device waits for exactly that.
        ``masks`` are the dropout masks (host arrays by node name) the training roles take, ``noise``
        the activity role's ε by site node."""
        ...

    def device_context(self) -> Any:
        """Context in which this module's optimizer math runs (its CUDA stream; a no-op on CPU)."""
        ...

    def from_host(self, dst: Any, src: np.ndarray) -> None:
        """Copy a host array into a live buffer of this module, in place."""
        ...

    def to_host(self, a: Any) -> np.ndarray:
        """Return a host (numpy) copy of a device array."""
        ...


class Backend(Protocol):
    """Loads an artifact directory's modules onto a device."""

    name: str

    def load_module(self, artifacts: Any, index: int, tangents: int, threads: int | None) -> ModuleRunner:
        """Create the runner for module ``index`` of a loaded artifact set."""
        ...
