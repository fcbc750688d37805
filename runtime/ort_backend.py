"""ONNX Runtime (CPU) backend: sessions per graph role, buffers bound once with IOBinding.

Weights, tangents and BatchNorm statistics are numpy arrays wrapped as OrtValues *without
copying* (``ortvalue_from_numpy`` shares CPU memory), so the optimizer's in-place numpy updates
are what the next run reads. Outputs go to preallocated arrays, two per (role, batch size):
the pipeline hands a module's output to its neighbour, which reads it during the next tick
while this module writes the other buffer.
"""
from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import onnxruntime as ort

from .artifacts import Artifacts
from .backend import RunResult

ORT_THREADS_DEFAULT = 0  # 0 = ONNX Runtime's own choice (all physical cores)


class OrtModuleRunner:
    xp = np

    def __init__(self, artifacts: Artifacts, index: int, tangents: int, threads: int | None = None) -> None:
        info = artifacts.modules[index]
        self.index, self.is_last, self.info = index, info.is_last, info
        self.num_classes = artifacts.num_classes
        m = tangents
        self.params = {n: artifacts.weights[n].copy() for n in info.param_names}
        self.tangents = {p["name"]: np.zeros((m, *p["shape"]), np.float32) for p in info.params}
        self.scratch = {p["name"]: np.zeros((m, *p["shape"]), np.float32) for p in info.params}
        self.grads = {p["name"]: np.zeros(p["shape"], np.float32) for p in info.params}
        self.buffers = {n: artifacts.weights[n].copy() for n in info.buffer_names}
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = ORT_THREADS_DEFAULT if threads is None else threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.sessions = {role: ort.InferenceSession(artifacts.graph_bytes(index, role), opts,
                                                    providers=["CPUExecutionProvider"])
                         for role in info.graphs}
        self._bindings = {role: self._bind_state(role, s) for role, s in self.sessions.items()}
        self._outputs: dict[tuple[str, int], list[dict[str, tuple[np.ndarray, ort.OrtValue]]]] = {}
        self._flip: dict[tuple[str, int], int] = {}

    def _bind_state(self, role: str, session: ort.InferenceSession) -> ort.IOBinding:
        """Bind the persistent inputs (weights, tangents, statistics) once, sharing memory."""
        b = session.io_binding()
        for i in session.get_inputs():
            kind, _, name = i.name.partition(".")
            src = {"w": self.params, "u": self.tangents, "s": self.buffers}.get(kind)
            if src is not None and name in src:
                b.bind_ortvalue_input(i.name, ort.OrtValue.ortvalue_from_numpy(src[name]))
        return b

    def _out_buffers(self, role: str, n: int) -> dict[str, tuple[np.ndarray, ort.OrtValue]]:
        """This run's output arrays (and their OrtValue views), alternating between two sets."""
        key = (role, n)
        if key not in self._outputs:
            pair = []
            for _ in range(2):
                bufs = {o.name: np.empty([n if isinstance(d, str) else d for d in o.shape], np.float32)
                        for o in self.sessions[role].get_outputs()}
                pair.append({k: (a, ort.OrtValue.ortvalue_from_numpy(a)) for k, a in bufs.items()})
            self._outputs[key], self._flip[key] = pair, 0
        self._flip[key] ^= 1
        return self._outputs[key][self._flip[key]]

    def run(self, role: str, x: np.ndarray, x_dot: np.ndarray | None = None,
            labels: np.ndarray | None = None, ready: Any = None) -> RunResult:
        b = self._bindings[role]
        b.bind_cpu_input("x", np.ascontiguousarray(x, dtype=np.float32))
        if role == "dual":
            b.bind_cpu_input("x_dot", np.ascontiguousarray(x_dot, dtype=np.float32))
        if labels is not None and self.is_last and role != "eval":
            b.bind_cpu_input("labels", np.ascontiguousarray(labels, dtype=np.float32))
        bound = self._out_buffers(role, x.shape[0])
        for name, (_, value) in bound.items():
            b.bind_ortvalue_output(name, value)
        self.sessions[role].run_with_iobinding(b)
        outs = {name: arr for name, (arr, _) in bound.items()}
        for name, arr in outs.items():
            if name.startswith("s_new."):
                np.copyto(self.buffers[name[6:]], arr)
        return RunResult(y=outs.get("y"), y_dot=outs.get("y_dot"), loss=outs.get("loss"),
                         loss_dot=outs.get("loss_dot"), logits=outs.get("logits"))

    def device_context(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def tangent_host(self) -> list[np.ndarray]:
        return list(self.tangents.values())

    def scratch_host(self) -> list[np.ndarray]:
        return list(self.scratch.values())

    def upload_tangents(self) -> None:
        """Host memory is device memory here."""

    def upload_scratch(self) -> None:
        """Host memory is device memory here."""

    def from_host(self, dst: np.ndarray, src: np.ndarray) -> None:
        np.copyto(dst, src)

    def to_host(self, a: Any) -> np.ndarray:
        return np.array(a, copy=True)


class OrtBackend:
    name = "onnxruntime"

    def load_module(self, artifacts: Artifacts, index: int, tangents: int, threads: int | None) -> OrtModuleRunner:
        return OrtModuleRunner(artifacts, index, tangents, threads)
