"""ONNX Runtime (CPU) backend: sessions per graph role, buffers bound once with IOBinding.

Weights, tangents and BatchNorm statistics are numpy arrays wrapped as OrtValues *without
copying* (``ortvalue_from_numpy`` shares CPU memory), so the optimizer's in-place numpy updates
are what the next run reads. Outputs go to preallocated arrays, two per (role, batch size):
the pipeline hands a module's output to its neighbour, which reads it during the next tick
while this module writes the other buffer.

A module's weights, its tangents and its re-created tangents each live in one contiguous buffer
(``buffers.flat_views``), so the draw and the update are one numpy call per module, not per tensor.

Memory (measured on ResNet-18, batch 64, docs/performance.md):
- sessions are created on a role's first run, so a training run never builds eval sessions and
  their thread pools, and evaluation-only use builds no dual ones;
- two memory modes (``host_memory.MEMORY_MODES``): the default keeps ONNX Runtime's arena, ``lean`` trades
  speed for a resident set close to the live tensors;
- no layout optimisations (``ORT_ENABLE_EXTENDED``): the NCHWc layout copies cost memory, not speed;
- ``PRIORITY_BASED`` execution order and no memory patterns: with ORT's default order (branches
  run far ahead of their consumers) and a memory pattern (one block reserved for the first run's
  intermediates), the whole ResNet-18 dual graph took ~1.4 GB, 13x the 112 MB its tensors need
  alive at once in the emitted order; with both changed ~170 MB, at the same speed;
- the gradient has no buffer of its own: ``grads`` are views of the tangents an update reads, and
  the scheduler forms g = Σ_j d_j·u_j / m in place (it reads u_0 before writing g, u_j for j ≥ 1
  never). Modules with a delay re-create their tangents into ``scratch``, so g lives in
  ``scratch[·][0]``. The last module has delay 0 in both schedulers: its update always reads the
  live tangents, which are refilled before they are read again, so g lives in ``tangents[·][0]``
  and its ``scratch`` is only allocated if something asks for it (75% of ResNet-18's weights sit
  in the last of 4 modules).
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnxruntime as ort

from . import contract as c
from .artifacts import Artifacts
from .backend import RunResult, updated_stats
from .buffers import flat_views
from .host_memory import check_memory_mode, pin_mmap_threshold

ORT_THREADS_DEFAULT = 0  # 0 = ONNX Runtime's own choice (all physical cores)


def session_options(threads: int | None, memory: str = "fast") -> ort.SessionOptions:
    """Options for every session: ``threads`` intra-op threads, the memory settings above.

    Buffer reuse is off in ``lean`` too: ONNX Runtime keeps a dead tensor's buffer from its last use
    until a later tensor of the same size takes it over, and on ResNet-50 those waiting buffers
    held more than the allocator's own overhead.
    """
    check_memory_mode(memory)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = ORT_THREADS_DEFAULT if threads is None else threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    opts.enable_mem_pattern = False
    # no layout optimisations (ENABLE_ALL's NCHWc conversion inserts reordered copies of the widest
    # activations: +122 MB on ResNet-18 at 224/batch 16, at the same speed; docs/performance.md)
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    if memory == "lean":
        opts.enable_cpu_mem_arena = False
        opts.enable_mem_reuse = False
    return opts


class OrtModuleRunner:
    xp = np

    def __init__(self, artifacts: Artifacts, index: int, tangents: int, threads: int | None = None,
                 memory: str = "fast") -> None:
        info = artifacts.modules[index]
        self.index, self.is_last, self.info = index, info.is_last, info
        self.dropout, self.activity = info.dropout, info.activity
        self.num_classes = artifacts.num_classes
        m = tangents
        self.params = dict(zip(info.param_names, flat_views([artifacts.weights[n].shape for n in info.param_names]),
                               strict=False))
        for n, w in self.params.items():
            w[...] = artifacts.weights[n]
        self._tangent_shapes = {p["name"]: (m, *p["shape"]) for p in info.params}
        self.tangents = dict(zip(self._tangent_shapes, flat_views(list(self._tangent_shapes.values())), strict=False))
        self._scratch: dict[str, np.ndarray] | None = None
        self._estimates: dict[str, tuple[np.ndarray, ort.OrtValue]] | None = None  # activity role's g outputs
        self.grads = {n: u[0] for n, u in (self.tangents if self.is_last else self.scratch).items()}
        self.buffers = {n: artifacts.weights[n].copy() for n in info.buffer_names}
        self._opts = session_options(threads, memory)
        self._graphs = {role: artifacts.graph_bytes(index, role) for role in info.graphs}  # checked now, built on use
        self.sessions: dict[str, ort.InferenceSession] = {}
        self._bindings: dict[str, ort.IOBinding] = {}
        self._outputs: dict[tuple[str, int], list[dict[str, tuple[np.ndarray, ort.OrtValue]]]] = {}
        self._flip: dict[tuple[str, int], int] = {}

    @property
    def scratch(self) -> dict[str, np.ndarray]:
        if self._scratch is None:
            self._scratch = dict(zip(self._tangent_shapes, flat_views(list(self._tangent_shapes.values())),
                                     strict=False))
        return self._scratch

    def _session(self, role: str) -> ort.InferenceSession:
        if role not in self.sessions:
            if role not in self._graphs:
                raise ValueError(f"module {self.index} has no '{role}' graph (it has: {', '.join(self._graphs)})")
            s = ort.InferenceSession(self._graphs[role], self._opts, providers=["CPUExecutionProvider"])
            self._bindings[role] = self._bind_state(s)
            self.sessions[role] = s
        return self.sessions[role]

    def _bind_state(self, session: ort.InferenceSession) -> ort.IOBinding:
        """Bind the persistent inputs (weights, tangents, statistics) once, sharing memory."""
        b = session.io_binding()
        for i in session.get_inputs():
            kind, name = c.split_input(i.name)
            src = {c.WEIGHT: self.params, c.TANGENT: self.tangents, c.STAT: self.buffers}.get(kind)
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
                        for o in self.sessions[role].get_outputs() if c.estimated_weight(o.name) is None}
                pair.append({k: (a, ort.OrtValue.ortvalue_from_numpy(a)) for k, a in bufs.items()})
            self._outputs[key], self._flip[key] = pair, 0
        self._flip[key] ^= 1
        return self._outputs[key][self._flip[key]]

    def run(self, role: str, x: np.ndarray, x_dot: np.ndarray | None = None,
            labels: np.ndarray | None = None, ready: Any = None,
            masks: Mapping[str, np.ndarray] | None = None, noise: Mapping[str, np.ndarray] | None = None
            ) -> RunResult:
        session = self._session(role)
        b = self._bindings[role]
        b.bind_cpu_input(c.X, np.ascontiguousarray(x, dtype=np.float32))
        if role == c.DUAL:
            b.bind_cpu_input(c.X_DOT, np.ascontiguousarray(x_dot, dtype=np.float32))
        if labels is not None and role != c.EVAL and (self.is_last or role in (c.LOCAL, c.ACTIVITY)):
            b.bind_cpu_input(c.LABELS, np.ascontiguousarray(labels, dtype=np.float32))
        if role in c.MASK_ROLES:
            for name, mask in (masks or {}).items():
                b.bind_cpu_input(c.mask_input(name), mask)
        for name, eps in (noise or {}).items():
            b.bind_cpu_input(c.noise_input(name), eps)
        bound = self._out_buffers(role, x.shape[0])
        if role == c.ACTIVITY:
            bound = {**bound, **self._estimate_outputs()}
        for name, (_, value) in bound.items():
            b.bind_ortvalue_output(name, value)
        session.run_with_iobinding(b)
        outs = {name: arr for name, (arr, _) in bound.items()}
        for stat, arr in updated_stats(outs):
            np.copyto(self.buffers[stat], arr)
        return RunResult.of(outs)

    def _estimate_outputs(self) -> dict[str, tuple[np.ndarray, ort.OrtValue]]:
        """The activity role writes its weight estimates into one buffer laid out like the weights,
        so the optimizer updates the whole module in one pass (optim.py)."""
        if self._estimates is None:
            views = flat_views([w.shape for w in self.params.values()])
            self._estimates = {c.grad_output(k): (a, ort.OrtValue.ortvalue_from_numpy(a))
                               for k, a in zip(self.params, views, strict=False)}
        return self._estimates

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

    def __init__(self, memory: str = "fast") -> None:
        check_memory_mode(memory)
        self.memory = memory
        if memory == "lean" and not pin_mmap_threshold():
            warnings.warn("--memory lean: the C library is not glibc, so freed blocks stay with its allocator; "
                          "only ONNX Runtime's arena and buffer reuse are turned off", RuntimeWarning, stacklevel=2)

    def load_module(self, artifacts: Artifacts, index: int, tangents: int, threads: int | None) -> OrtModuleRunner:
        return OrtModuleRunner(artifacts, index, tangents, threads, self.memory)
