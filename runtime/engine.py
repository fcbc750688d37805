"""Assemble a training pipeline from an artifact directory: backend runners, optimizers, scheduler."""
from __future__ import annotations

from typing import Any

from .artifacts import Artifacts
from .backend import Backend, ModuleRunner
from .host_memory import check_memory_mode
from .optim import make_optimizer
from .scheduler import AlphaFn, AsyncFGD, LocalActivity, LocalFGD, LrFn, Perturbation, Reducer, SyncFGD

LOCAL_METHOD = "local"  # experimental: needs artifacts exported with local heads
ACTIVITY_METHOD = "local-activity"  # local losses, activity perturbation: artifacts exported with activity=True
METHODS = ("fgd", "asyncfgd", LOCAL_METHOD, ACTIVITY_METHOD)
BACKENDS = ("onnxruntime", "torch", "torch-cuda", "tensorrt")


def check_memory(backend: str, memory: str) -> None:
    """``memory`` is ONNX Runtime's memory mode; the other backends manage their device memory themselves."""
    check_memory_mode(memory)
    if backend != "onnxruntime" and memory != "fast":
        raise ValueError(f"memory mode {memory!r} is an ONNX Runtime setting; backend {backend!r} takes only 'fast'")


def make_backend(name: str, memory: str = "fast") -> Backend:
    """Backends are imported on demand so that choosing ONNX Runtime never imports torch.

    ``memory`` is ONNX Runtime's memory mode (host_memory.MEMORY_MODES; ``check_memory``).
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    check_memory(name, memory)
    if name == "onnxruntime":
        from .ort_backend import OrtBackend

        return OrtBackend(memory)
    if name in ("torch", "torch-cuda"):
        from .torch_backend import TorchBackend

        return TorchBackend("cuda" if name == "torch-cuda" else "cpu")
    from .trt.backend import TrtBackend

    return TrtBackend()


def load_runners(artifacts: Artifacts, backend: str = "onnxruntime", threads: int | None = None,
                 memory: str = "fast") -> list[ModuleRunner]:
    b = make_backend(backend, memory)
    return [b.load_module(artifacts, i, artifacts.tangents, threads) for i in range(len(artifacts.modules))]


#: methods whose update is m scalars times seeded tangents: data-parallel ranks exchange only the scalars
SCALAR_METHODS = ("fgd", "asyncfgd")


def make_scheduler(runners: list[ModuleRunner], method: str, optimizer: str, lr: LrFn, alpha: AlphaFn,
                   perturbation: Perturbation, optimizer_kw: dict[str, Any] | None = None,
                   reduce: Reducer | None = None) -> SyncFGD | AsyncFGD:
    """``reduce`` combines each step's (count, loss, d) over data-parallel ranks (distributed.py)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if reduce is not None and method not in SCALAR_METHODS:
        raise ValueError(f"data-parallel training exchanges the m directional derivatives of "
                         f"{' and '.join(SCALAR_METHODS)}; {method}'s update is a gradient estimate of every "
                         "weight, which this mode does not all_reduce: use one process, or --method fgd/asyncfgd")
    opts = [make_optimizer(optimizer, r.params, r.xp, lr=lr(0), **(optimizer_kw or {})) for r in runners]
    if method == "fgd":
        return SyncFGD(runners, opts, alpha, lr, perturbation, reduce)
    if method == "asyncfgd":
        return AsyncFGD(runners, opts, alpha, lr, perturbation, reduce=reduce)
    cls = LocalFGD if method == LOCAL_METHOD else LocalActivity
    return cls(runners, opts, alpha, lr, perturbation)
