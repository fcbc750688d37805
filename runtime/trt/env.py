"""Lazy access to TensorRT + pycuda, shared by the engine builder and the TensorRT backend.

Neither package can be installed off a Jetson/CUDA machine, so nothing imports them at module
import time: callers ask :func:`load_trt` at the moment they need them and get one
:class:`BackendUnavailable` naming everything that is missing and how to get it.
NOTE: the TensorRT code paths were written against the TensorRT 10 and pycuda documentation
and have never been executed (no GPU or TensorRT was available where they were written).
"""
from __future__ import annotations

import threading
from types import ModuleType
from typing import Any

MIN_TRT_MAJOR = 10
_local = threading.local()
_logger: list[Any] = []  # the process-wide TensorRT logger, created on first use


class BackendUnavailable(RuntimeError):
    """A backend cannot run on this machine; the message says what is missing and the fix."""


def unavailable_message(missing: list[str]) -> str:
    """One paragraph: what is missing, where the explanation is, how a Jetson gets it."""
    what = "; ".join(missing)
    return (
        f"The TensorRT backend cannot run here: {what}. It needs TensorRT {MIN_TRT_MAJOR}.x Python "
        "bindings, pycuda and a visible NVIDIA GPU. Run `asyncfgd-app doctor` to see what this "
        "machine has and the fix for each missing piece. On a Jetson AGX Orin with JetPack 6.1 or "
        "later, `./jetson_setup.sh` (repository root) creates a virtual environment that sees the "
        "system TensorRT and installs pycuda against the JetPack CUDA. The onnxruntime-cpu backend "
        "works without any of this."
    )


def load_trt() -> tuple[ModuleType, ModuleType]:
    """Import ``tensorrt`` and ``pycuda.driver``, initialise CUDA, or raise BackendUnavailable."""
    missing: list[str] = []
    try:
        import tensorrt as trt  # noqa: PLC0415 - optional, device-only dependency
        major = int(str(trt.__version__).split(".")[0])
        if major < MIN_TRT_MAJOR:
            missing.append(f"TensorRT {trt.__version__} is too old (JetPack 6.0 ships 8.6; 6.1+ ships 10.x)")
    except Exception as e:  # a stub or broken wheel raises at import, not only ImportError
        missing.append(f"the `tensorrt` Python package does not import ({type(e).__name__}: {e})")
    try:
        import pycuda.driver as cuda  # noqa: PLC0415
        cuda.init()
        if cuda.Device.count() == 0:
            missing.append("no CUDA GPU is visible")
    except Exception as e:
        missing.append(f"`pycuda` does not import or cannot initialise CUDA ({type(e).__name__}: {e})")
    if missing:
        raise BackendUnavailable(unavailable_message(missing))
    return trt, cuda


def ensure_context(cuda: ModuleType) -> None:
    """Make the device's *primary* CUDA context current on this thread.

    TensorRT uses the CUDA runtime, which works in the primary context; pycuda allocations must
    live in that same context for their pointers to be valid TensorRT bindings. Scheduler
    threads each need it pushed once.
    """
    if getattr(_local, "pushed", False):
        return
    ctx = cuda.Device(0).retain_primary_context()
    ctx.push()
    _local.pushed = True
    _local.ctx = ctx  # keep the retained context alive as long as the thread uses it


def trt_logger(trt: ModuleType) -> Any:
    """One logger for every builder and runtime: TensorRT warns when they are given different ones."""
    if not _logger:
        _logger.append(trt.Logger(trt.Logger.WARNING))
    return _logger[0]
