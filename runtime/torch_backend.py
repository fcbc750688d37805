"""torch backend: runs the exporter's dual programs directly as torch code (CPU or CUDA).

It executes the very rules the ONNX graphs were emitted from (``exporter.graphs.run_module``
with ``TorchOps``), so the scheduler can be checked bit for bit against the reference, and it
is the GPU path that runs where TensorRT is not available. torch is imported only when this
backend is chosen; the rest of the runtime never imports it.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .artifacts import Artifacts
from .backend import RunResult


class TorchModuleRunner:
    def __init__(self, artifacts: Artifacts, index: int, tangents: int, device: str = "cpu") -> None:
        import torch

        from asyncfgd.exporter.export import module_specs
        from asyncfgd.exporter.graphs import GraphSpec, run_module
        from asyncfgd.exporter.ops import TorchOps

        self.torch, self.xp = torch, torch
        info = artifacts.modules[index]
        self.index, self.is_last = index, info.is_last
        self.device = torch.device(device)
        self._spec = module_specs(artifacts.manifest)[index]
        self._graph = lambda role: GraphSpec(role, tangents, artifacts.bn_mode)  # noqa: E731
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

    def run(self, role: str, x: Any, x_dot: Any = None, labels: Any = None) -> RunResult:
        torch = self.torch
        with torch.no_grad():
            x = self._as_tensor(x)
            x_dot = None if x_dot is None else self._as_tensor(x_dot)
            labels = None if labels is None else self._as_tensor(labels)
            out = self._run_module(self._ops, self._spec, self._graph(role), self.is_last, x, x_dot,
                                   self.params, self.tangents, self.buffers, labels)
            for name, v in out.items():
                if name.startswith("s_new."):
                    self.buffers[name[6:]].copy_(v)
        return RunResult(y=out.get("y"), y_dot=out.get("y_dot"), loss=out.get("loss"),
                         loss_dot=out.get("loss_dot"), logits=out.get("logits"))

    def _as_tensor(self, a: Any) -> Any:
        if isinstance(a, np.ndarray):
            return self.torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(self.device)
        return a

    def tangent_host(self) -> list[np.ndarray]:
        return self._tangent_host

    def scratch_host(self) -> list[np.ndarray]:
        return self._scratch_host

    def upload_tangents(self) -> None:
        if not self._on_cpu:
            for t, h in zip(self.tangents.values(), self._tangent_host):
                t.copy_(self.torch.from_numpy(h), non_blocking=True)

    def upload_scratch(self) -> None:
        if not self._on_cpu:
            for t, h in zip(self.scratch.values(), self._scratch_host):
                t.copy_(self.torch.from_numpy(h), non_blocking=True)

    def from_host(self, dst: Any, src: np.ndarray) -> None:
        dst.copy_(self.torch.from_numpy(np.ascontiguousarray(src, dtype=np.float32)))

    def to_host(self, a: Any) -> np.ndarray:
        return a.detach().cpu().numpy().copy() if hasattr(a, "detach") else np.array(a, copy=True)


class TorchBackend:
    name = "torch"

    def __init__(self, device: str = "cpu") -> None:
        self.device = device

    def load_module(self, artifacts: Artifacts, index: int, tangents: int, threads: int | None) -> TorchModuleRunner:
        return TorchModuleRunner(artifacts, index, tangents, self.device)
