"""torch backend: runs the exporter's dual programs directly as torch code (CPU or CUDA).

It executes the very rules the ONNX graphs were emitted from (``dual.interpreter.run_module``
with ``TorchOps``), so the scheduler can be checked bit for bit against the reference, and it
is the GPU path that runs where TensorRT is not available. torch is imported only when this
backend is chosen; the rest of the runtime never imports it.

On CUDA each module owns a stream: its runs, tangent uploads and optimizer updates are enqueued
there, a run waits on the event of the run that produced its input (not on the producer's later
work), and the host only synchronises to read the loss. TF32 is switched off so fp32 results stay
comparable with the reference. CUDA-graph capture is not implemented.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from .artifacts import Artifacts
from .backend import RunResult, updated_stats
from .dual.interpreter import GraphSpec, run_module
from .dual.program import module_specs
from .dual.torch_ops import TorchOps


class TorchModuleRunner:
    def __init__(self, artifacts: Artifacts, index: int, tangents: int, device: str = "cpu") -> None:
        import torch

        self.torch, self.xp = torch, torch
        info = artifacts.modules[index]
        self.index, self.is_last, self.dropout, self.activity = index, info.is_last, info.dropout, info.activity
        self.device = torch.device(device)
        self._spec = module_specs(artifacts.manifest)[index]
        self._graph = lambda role: GraphSpec(role, tangents, artifacts.bn_mode, artifacts.tuned_batch)  # noqa: E731
        self._run_module, self._ops = run_module, TorchOps(device=self.device)
        dev = lambda a: torch.from_numpy(np.array(a, dtype=np.float32)).to(self.device)  # noqa: E731
        self.params = {n: dev(artifacts.weights[n]) for n in info.param_names}
        self.buffers = {n: dev(artifacts.weights[n]) for n in info.buffer_names}
        shapes = {p["name"]: (tangents, *p["shape"]) for p in info.params}
        self.tangents = {n: torch.zeros(s, device=self.device) for n, s in shapes.items()}
        self.scratch = {n: torch.zeros(s, device=self.device) for n, s in shapes.items()}
        self.grads = {n: torch.zeros(s[1:], device=self.device) for n, s in shapes.items()}
        on_cpu = self.device.type == "cpu"
        # host staging: on CPU the live tensors' own memory, on a GPU pinned copies
        stage = (lambda t: t.numpy()) if on_cpu else (lambda t: torch.empty_like(t, device="cpu").pin_memory().numpy())
        self._tangent_host = [stage(t) for t in self.tangents.values()]
        self._scratch_host = [stage(t) for t in self.scratch.values()]
        self._on_cpu = on_cpu
        self.stream = None if on_cpu else torch.cuda.Stream(self.device)
        # an upload's event must complete before its pinned host buffer is refilled
        self._uploaded: dict[str, torch.cuda.Event | None] = {"tangents": None, "scratch": None}

    def run(self, role: str, x: Any, x_dot: Any = None, labels: Any = None, ready: Any = None,
            masks: Mapping[str, np.ndarray] | None = None, noise: Mapping[str, np.ndarray] | None = None
            ) -> RunResult:
        torch = self.torch
        with torch.no_grad(), self.device_context():
            if ready is not None:
                assert self.stream is not None  # ready events come only from runs on a CUDA stream
                self.stream.wait_event(ready)
            x = self._as_tensor(x)
            x_dot = None if x_dot is None else self._as_tensor(x_dot)
            labels = None if labels is None else self._as_tensor(labels)
            drop = {k: self._as_tensor(v) for k, v in (masks or {}).items()}
            eps = {k: self._as_tensor(v) for k, v in (noise or {}).items()}
            out = self._run_module(self._ops, self._spec, self._graph(role), self.is_last, x, x_dot,
                                   self.params, self.tangents, self.buffers, labels, drop, eps)
            for stat, v in updated_stats(out):
                self.buffers[stat].copy_(v)
            done = None
            if self.stream is not None:
                done = torch.cuda.Event()
                done.record(self.stream)
        return RunResult.of(out, ready=done)

    def device_context(self) -> Any:
        return contextlib.nullcontext() if self.stream is None else self.torch.cuda.stream(self.stream)

    def _as_tensor(self, a: Any) -> Any:
        if isinstance(a, np.ndarray):
            return self.torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(self.device)
        return a

    def tangent_host(self) -> list[np.ndarray]:
        self._wait_upload("tangents")
        return self._tangent_host

    def scratch_host(self) -> list[np.ndarray]:
        self._wait_upload("scratch")
        return self._scratch_host

    def upload_tangents(self) -> None:
        self._upload("tangents", self.tangents, self._tangent_host)

    def upload_scratch(self) -> None:
        self._upload("scratch", self.scratch, self._scratch_host)

    def _upload(self, kind: str, dst: dict[str, Any], host: list[np.ndarray]) -> None:
        """Asynchronous pinned host → device copy on this module's stream."""
        if self._on_cpu:
            return
        with self.device_context():
            for t, h in zip(dst.values(), host, strict=False):
                t.copy_(self.torch.from_numpy(h), non_blocking=True)
            ev = self.torch.cuda.Event()
            ev.record(self.stream)
        self._uploaded[kind] = ev

    def _wait_upload(self, kind: str) -> None:
        ev = self._uploaded.get(kind)
        if ev is not None:
            ev.synchronize()

    def from_host(self, dst: Any, src: np.ndarray) -> None:
        dst.copy_(self.torch.from_numpy(np.ascontiguousarray(src, dtype=np.float32)))

    def to_host(self, a: Any) -> np.ndarray:
        if not hasattr(a, "detach"):
            return np.array(a, copy=True)
        if self.stream is not None:
            self.stream.synchronize()
        return a.detach().cpu().numpy().copy()


class TorchBackend:
    name = "torch"

    def __init__(self, device: str = "cpu") -> None:
        import torch

        if device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise RuntimeError("the torch-cuda backend needs a CUDA GPU and a CUDA build of torch; "
                                   "`asyncfgd-app doctor` shows what this machine has")
            torch.backends.cuda.matmul.allow_tf32 = False  # fp32 must stay comparable with the reference
            torch.backends.cudnn.allow_tf32 = False
        self.device = device

    def load_module(self, artifacts: Artifacts, index: int, tangents: int, threads: int | None) -> TorchModuleRunner:
        return TorchModuleRunner(artifacts, index, tangents, self.device)
