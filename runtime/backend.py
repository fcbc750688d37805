"""The backend contract: what the pipeline scheduler needs from one module on one device.

A backend owns, per pipeline module, the compiled graphs (ONNX Runtime sessions, TensorRT
engines, or torch programs) and the *live* device buffers of that module's weights, weight
tangents and BatchNorm running statistics. The scheduler never copies weights: it fills the
tangent buffers in place, asks the module to run one graph role, and lets the optimizer update
the weight buffers in place with the backend's array namespace ``xp``.

Graph roles (see docs/artifacts.md):
- ``dual``        (x, x_dot, weights, tangents[, labels]) -> (y, y_dot) | (loss, loss_dot, logits)
- ``dual_first``  same without x_dot: the input tangent is zero (first perturbed module)
- ``forward``     training-mode primal only (frozen modules): (x, weights[, labels]) -> y | (loss, logits)
- ``eval``        inference-mode primal (BatchNorm uses running statistics) -> y | logits
Roles that update BatchNorm statistics write them back into the module's buffers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

ROLES = ("dual", "dual_first", "forward", "eval")


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
    #: device event marking the outputs complete (CUDA backends); the consumer waits on it
    ready: Any = None


class ModuleRunner(Protocol):
    """One pipeline module, resident on one device.

    Tangents are drawn on the host from the seeded generator (so every backend reproduces the
    reference): the scheduler fills ``tangent_host()`` / ``scratch_host()`` and then calls
    ``upload_tangents()`` / ``upload_scratch()``, which are no-ops where host and device memory
    are the same (ONNX Runtime CPU, torch CPU).
    """

    index: int
    is_last: bool
    #: array namespace for in-place optimizer math on this module's buffers
    #: (numpy for ORT-CPU, torch for the torch backend)
    xp: Any
    #: live weight buffers, by weight name (updated in place by the optimizer)
    params: dict[str, Any]
    #: live tangent buffers, by weight name, shape (m, *weight.shape)
    tangents: dict[str, Any]
    #: BatchNorm running statistics, by buffer name
    buffers: dict[str, Any]
    #: tangents re-created for an update (m, *shape), and the gradient they combine into
    scratch: dict[str, Any]
    grads: dict[str, Any]

    def tangent_host(self) -> list[np.ndarray]:
        """Host arrays to fill with this module's tangents, in ``params`` order."""
        ...

    def upload_tangents(self) -> None:
        ...

    def scratch_host(self) -> list[np.ndarray]:
        ...

    def upload_scratch(self) -> None:
        ...

    def run(self, role: str, x: Any, x_dot: Any = None, labels: Any = None, ready: Any = None) -> RunResult:
        """Run one graph role on a batch; ``x``/``x_dot`` come from the previous module, whose
        ``RunResult.ready`` event (if any) is passed as ``ready`` so the device waits for exactly that."""
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
