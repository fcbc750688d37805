"""TensorRT backend: one engine per graph role, live weights in GPU memory, one stream per module.

EXPERIMENTAL (see the package docstring). Written for an NVIDIA Jetson AGX Orin (JetPack 6.1+, TensorRT 10, pycuda)
against the TensorRT 10 Python API and pycuda documentation. IT HAS NEVER BEEN EXECUTED: neither TensorRT nor pycuda
could be installed, and no GPU was available, where it was written. Only its import without
TensorRT and its BackendUnavailable path are tested. Treat the first run on a device as its first test.

Design, per module:
- weights, tangents, scratch tangents, gradients and BatchNorm statistics are pycuda GPUArrays
  allocated once; engines read them in place (addresses bound with ``set_tensor_address``);
- inputs/outputs are allocated once per (role, batch size); outputs rotate through a ring of
  ``output_ring`` sets so a neighbour can read one while the next is written;
- all work is enqueued on the module's own stream. Reads of another module's outputs and
  rewrites of buffers a neighbour reads are ordered on the device with CUDA events (a
  process-wide hazard table), so the scheduler needs no host synchronisation;
- host data (tangents drawn by the runtime's numpy RNG into pinned mirrors, host batches) is
  copied with ``memcpy_htod_async``.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .. import contract as c
from ..artifacts import Artifacts, ModuleInfo, load_artifacts
from ..backend import RunResult, updated_stats
from .build import build_engines
from .env import BackendUnavailable, ensure_context, load_trt, trt_logger

__all__ = ["BackendUnavailable", "GpuArrayXp", "TrtBackend", "TrtModuleRunner"]



class TrtBackend:
    """Loads artifact modules as TensorRT engines (built or reused from the engine cache)."""

    name = "tensorrt"

    def __init__(self, fp16: bool = False, max_batch: int = 64, opt_batch: int | None = None,
                 workspace_mb: int = 1024, output_ring: int = 2):
        self.fp16, self.max_batch, self.opt_batch = fp16, max_batch, opt_batch
        self.workspace_mb, self.output_ring = workspace_mb, output_ring

    def load_module(self, artifacts: Artifacts | str | os.PathLike, index: int, tangents: int,
                    threads: int | None) -> TrtModuleRunner:
        """Build/reuse this module's engines and upload its weights. ``threads`` is unused:
        TensorRT work runs on the GPU."""
        trt, cuda = load_trt()
        ensure_context(cuda)
        if not isinstance(artifacts, Artifacts):
            artifacts = load_artifacts(artifacts)
        if tangents != artifacts.tangents:
            raise ValueError(f"engines take m={artifacts.tangents} tangents (fixed at export), not {tangents}")
        engines = build_engines(artifacts.root, fp16=self.fp16, workspace_mb=self.workspace_mb,
                                max_batch=self.max_batch, opt_batch=self.opt_batch, modules=[index])
        return TrtModuleRunner(trt, cuda, artifacts.modules[index], {role: p for (_, role), p in engines.items()},
                               artifacts.weights, tangents, self.output_ring)


class _Hazards:
    """Cross-stream ordering of device buffers, shared by all modules of the process.

    A module's output is read by its neighbour on another stream and later rewritten by its
    producer (the output ring wraps). Recording which run last wrote and which runs read each
    buffer lets every run wait, on the device, for exactly what it depends on: read-after-write
    and write-after-read. Streams never wait on the host.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._writer: dict[int, Any] = {}
        self._readers: dict[int, list[Any]] = {}

    def wait(self, stream: Any, reads: list[int], writes: list[int]) -> None:
        with self._lock:
            events = [self._writer.get(p) for p in reads]
            events += [e for p in writes for e in self._readers.pop(p, [])]
        for ev in events:
            if ev is not None:
                stream.wait_for_event(ev)

    def record(self, event: Any, reads: list[int], writes: list[int]) -> None:
        with self._lock:
            for p in writes:
                self._writer[p] = event
            for p in reads:
                self._readers.setdefault(p, []).append(event)


_HAZARDS = _Hazards()


class _Staging:
    """A pinned host buffer plus the event marking its last async copy as finished."""

    def __init__(self, cuda: Any, shape: tuple[int, ...], dtype: np.dtype):
        self.host = cuda.pagelocked_empty(shape, dtype)
        self.done = cuda.Event()


class TrtModuleRunner:
    """ModuleRunner on TensorRT: see the module docstring for the buffer and stream design."""

    def __init__(self, trt: Any, cuda: Any, info: ModuleInfo, engine_paths: Mapping[str, Path],
                 initial: Mapping[str, np.ndarray], tangents: int, output_ring: int = 2):
        from pycuda import gpuarray  # noqa: PLC0415 - device-only dependency

        self._cuda, self._ring = cuda, output_ring
        self.index, self.is_last, self.dropout, self.activity = info.index, info.is_last, info.dropout, info.activity
        self.stream = cuda.Stream()
        #: numpy-like namespace over GPUArrays for the runtime's optimizer and update math
        self.xp = GpuArrayXp(self.stream)
        self._runtime = trt.Runtime(trt_logger(trt))
        # engines stay referenced: their execution contexts must not outlive them
        self._engines = {role: self._runtime.deserialize_cuda_engine(Path(p).read_bytes())
                         for role, p in engine_paths.items()}
        self._contexts = {role: e.create_execution_context() for role, e in self._engines.items()}
        self._io = {role: _io_table(trt, e) for role, e in self._engines.items()}
        self._staging: dict[tuple[int, tuple[int, ...], str], _Staging] = {}
        self._slots: dict[tuple[str, int], dict[str, Any]] = {}
        self.params = {p["name"]: gpuarray.empty(tuple(p["shape"]), np.float32) for p in info.params}
        self.buffers = {b["name"]: gpuarray.empty(tuple(b["shape"]), np.float32) for b in info.buffers}
        for name, buf in {**self.params, **self.buffers}.items():
            self.from_host(buf, initial[name])
        self.tangents = {n: gpuarray.zeros((tangents, *w.shape), np.float32) for n, w in self.params.items()}
        #: a second tangent set, for re-created tangents of an earlier step (scheduler)
        self.scratch = {n: gpuarray.zeros_like(u) for n, u in self.tangents.items()}
        self.grads = {n: gpuarray.zeros_like(w) for n, w in self.params.items()}
        # pinned host mirrors that the runtime's numpy RNG fills, and their last upload's event
        self._host = {kind: [cuda.pagelocked_empty(u.shape, np.float32) for u in self.tangents.values()]
                      for kind in ("tangents", "scratch")}
        self._uploaded = {kind: cuda.Event() for kind in self._host}

    # --- protocol -------------------------------------------------------------------------

    def run(self, role: str, x: Any, x_dot: Any = None, labels: Any = None, ready: Any = None,
            masks: Mapping[str, np.ndarray] | None = None, noise: Mapping[str, np.ndarray] | None = None
            ) -> RunResult:
        """Enqueue one graph on this module's stream; results are device arrays (not synced)."""
        ensure_context(self._cuda)
        if role not in self._contexts:
            raise ValueError(f"module {self.index} has no '{role}' engine; built: {sorted(self._contexts)}")
        ctx, io = self._contexts[role], self._io[role]
        batch = int(x.shape[0])
        slot = self._next_slot(role, batch)
        feeds = {c.X: x, c.X_DOT: x_dot, c.LABELS: labels, **{c.mask_input(k): v for k, v in (masks or {}).items()},
                 **{c.noise_input(k): v for k, v in (noise or {}).items()}}
        reads = []  # device buffers from other modules that this run reads
        for name, (is_input, dtype) in io.items():
            if not is_input:
                continue
            arr = self._device_input(name, feeds, slot, dtype)
            if name in feeds and arr is feeds[name]:
                reads.append(int(arr.gpudata))
            if not ctx.set_input_shape(name, tuple(arr.shape)):
                raise ValueError(f"input '{name}' shape {tuple(arr.shape)} is outside the '{role}' engine's "
                                 "profile; rebuild with `asyncfgd-app build --max-batch`")
            ctx.set_tensor_address(name, int(arr.gpudata))
        outputs = self._outputs(role, batch, slot)
        writes = [int(a.gpudata) for a in outputs.values()]
        _HAZARDS.wait(self.stream, reads, writes)
        for name, arr in outputs.items():
            ctx.set_tensor_address(name, int(arr.gpudata))
        if not ctx.execute_async_v3(self.stream.handle):
            raise RuntimeError(f"TensorRT failed to enqueue module {self.index} '{role}'")
        _HAZARDS.record(self._record_event(), reads, writes)
        for stat, arr in updated_stats(outputs):
            self._cuda.memcpy_dtod_async(self.buffers[stat].gpudata, arr.gpudata, arr.nbytes, self.stream)
        return RunResult.of(outputs)

    def from_host(self, dst: Any, src: np.ndarray) -> None:
        """Async host->device copy through a pinned buffer reused for ``dst``."""
        ensure_context(self._cuda)
        if tuple(src.shape) != tuple(dst.shape):
            raise ValueError(f"shape {tuple(src.shape)} does not match device buffer {tuple(dst.shape)}")
        key = (int(dst.gpudata), tuple(dst.shape), dst.dtype.str)  # a freed address can be reused
        st = self._staging.get(key)
        if st is None:
            st = self._staging[key] = _Staging(self._cuda, tuple(dst.shape), dst.dtype)
        st.done.synchronize()  # the previous copy out of this pinned buffer has finished
        np.copyto(st.host, src, casting="same_kind")
        self._cuda.memcpy_htod_async(dst.gpudata, st.host, self.stream)
        st.done.record(self.stream)

    def to_host(self, a: Any) -> np.ndarray:
        """Copy after this module's queued work; synchronises the module's stream."""
        ensure_context(self._cuda)
        out = a.get_async(stream=self.stream)
        self.stream.synchronize()
        return out

    # --- host-generated tangents (the scheduler fills the pinned mirrors, then uploads) -----

    def tangent_host(self) -> list[np.ndarray]:
        """Pinned host mirrors of ``tangents``, safe to overwrite (the last upload finished)."""
        self._uploaded["tangents"].synchronize()
        return self._host["tangents"]

    def scratch_host(self) -> list[np.ndarray]:
        """Pinned host mirrors of ``scratch``, safe to overwrite."""
        self._uploaded["scratch"].synchronize()
        return self._host["scratch"]

    def upload_tangents(self) -> None:
        """memcpy_htod_async the host tangents into the live tangent buffers."""
        self._upload("tangents", self.tangents)

    def upload_scratch(self) -> None:
        """memcpy_htod_async the host scratch tangents into ``scratch``."""
        self._upload("scratch", self.scratch)

    def _upload(self, kind: str, dev: Mapping[str, Any]) -> None:
        ensure_context(self._cuda)
        for d, h in zip(dev.values(), self._host[kind], strict=True):
            self._cuda.memcpy_htod_async(d.gpudata, h, self.stream)
        self._uploaded[kind].record(self.stream)

    # --- device-side scheduling -----------------------------------------------------------

    def device_context(self) -> Any:
        """GPUArray math runs on the legacy default stream, which orders itself after this module's
        stream work (correct, but not overlapped with other modules; never measured)."""
        import contextlib

        return contextlib.nullcontext()

    def _record_event(self) -> Any:
        """An event that completes when everything enqueued so far on this module has run."""
        ev = self._cuda.Event(self._cuda.event_flags.DISABLE_TIMING)
        ev.record(self.stream)
        return ev

    # --- buffers --------------------------------------------------------------------------

    def _next_slot(self, role: str, batch: int) -> dict[str | tuple[str, str], Any]:
        """Rotate to the next of ``output_ring`` buffer sets for (role, batch)."""
        ring = self._slots.setdefault((role, batch), {"sets": [{} for _ in range(self._ring)], "next": 0})
        slot = ring["sets"][ring["next"]]
        ring["next"] = (ring["next"] + 1) % self._ring
        return slot

    def _device_input(self, name: str, feeds: dict[str, Any], slot: dict[str | tuple[str, str], Any],
                      dtype: np.dtype) -> Any:
        if name in feeds or name.startswith(c.MASK):
            arr = feeds.get(name)
            if arr is None:
                raise ValueError(f"this graph needs '{name}'")
            if isinstance(arr, np.ndarray):  # host data: stage into this slot's input buffer
                dev = slot.get(name)
                if dev is None or dev.shape != arr.shape:
                    dev = slot[name] = self.xp.empty(arr.shape, dtype)
                self.from_host(dev, arr)
                arr = dev
        else:
            prefix, key = c.split_input(name)
            arr = {c.WEIGHT: self.params, c.TANGENT: self.tangents, c.STAT: self.buffers}[prefix][key]
        if arr.dtype != dtype:
            raise TypeError(f"input '{name}' is {arr.dtype}, the engine expects {dtype}")
        return arr

    def _outputs(self, role: str, batch: int, slot: dict[str | tuple[str, str], Any]) -> dict[str, Any]:
        """This slot's output buffers, allocated on first use from the engine's inferred shapes."""
        ctx = self._contexts[role]
        out = {}
        for name, (is_input, dtype) in self._io[role].items():
            if is_input:
                continue
            if ("out", name) not in slot:
                shape = tuple(ctx.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise RuntimeError(f"'{role}' output '{name}' shape {shape} unresolved at batch {batch}")
                slot[("out", name)] = self.xp.empty(shape, dtype)
            out[name] = slot[("out", name)]
        return out


class GpuArrayXp:
    """The slice of numpy's API that ``runtime.optim`` and the scheduler's update use, over
    pycuda GPUArrays, with kernels enqueued on the module's stream. In-place operators
    (``+=``, ``*=``) are pycuda's own and run on the legacy default stream, which orders them
    with the module's (blocking) stream."""

    def __init__(self, stream: Any):
        from pycuda import gpuarray  # noqa: PLC0415

        self._ga, self._stream = gpuarray, stream
        self._kernels: dict[str, Any] = {}  # key -> compiled pycuda ElementwiseKernel
        self.empty, self.empty_like, self.zeros_like = gpuarray.empty, gpuarray.empty_like, gpuarray.zeros_like

    def multiply(self, a: Any, b: Any, out: Any) -> Any:
        return self._binary("*", a, b, out)

    def add(self, a: Any, b: Any, out: Any) -> Any:
        return self._binary("+", a, b, out)

    def subtract(self, a: Any, b: Any, out: Any) -> Any:
        return self._binary("-", a, b, out)

    def divide(self, a: Any, b: Any, out: Any) -> Any:
        return self._binary("/", a, b, out)

    def sqrt(self, a: Any, out: Any) -> Any:
        self._kernel("sqrt", "float *z, const float *x", "z[i] = sqrtf(x[i])")(out, a, stream=self._stream)
        return out

    def sum(self, a: Any) -> np.ndarray:
        """Host scalar (callers take ``float()`` of it)."""
        return self._ga.sum(a, stream=self._stream).get()

    def asarray(self, a: Any) -> Any:
        return a if self._is_array(a) else self._ga.to_gpu(np.ascontiguousarray(a, np.float32))

    def _is_array(self, a: Any) -> bool:
        return isinstance(a, self._ga.GPUArray)

    def _binary(self, op: str, a: Any, b: Any, out: Any) -> Any:
        """out = a op b, for b a GPUArray of a's shape or a scalar."""
        if self._is_array(b):
            kernel = self._kernel(op + "aa", "float *z, const float *x, const float *y", f"z[i] = x[i] {op} y[i]")
        else:
            kernel = self._kernel(op + "as", "float *z, const float *x, float y", f"z[i] = x[i] {op} y")
            b = np.float32(b)
        kernel(out, a, b, stream=self._stream)
        return out

    def _kernel(self, key: str, args: str, body: str) -> Any:
        if key not in self._kernels:
            from pycuda.elementwise import ElementwiseKernel  # noqa: PLC0415

            self._kernels[key] = ElementwiseKernel(args, body, f"asyncfgd_xp_{len(self._kernels)}")
        return self._kernels[key]


def _io_table(trt: Any, engine: Any) -> dict[str, tuple[bool, np.dtype]]:
    """name -> (is_input, numpy dtype) for every I/O tensor of an engine."""
    table = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        table[name] = (engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT,
                       np.dtype(trt.nptype(engine.get_tensor_dtype(name))))
    return table
