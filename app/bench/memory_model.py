"""Analytic memory of each training method, from an artifact manifest's program shapes.

The bench prints these bytes next to the measured peaks (minus the measured import baseline),
with the measured/predicted ratio, so that a user can predict a bigger model or batch from a
small measurement: the ratio carries what the model leaves out (framework temporaries, arena
rounding), the formulas carry how memory scales.

- backprop: weights + gradients + optimizer state + every layer's output for the whole batch
  (what autograd saves for the backward pass) + the input batch;
- forward: weights + the widest point of one forward pass + the input batch;
- fgd (sync): weights + m tangents + optimizer state + the widest point of ONE module's dual
  pass (every live value and its m tangents) + the module boundaries + the input batch;
- asyncfgd: the same, but all K modules run at once (their widest points add up), each module
  boundary holds a double-buffered (h, ḣ) pair, and every module but the last holds m
  re-created tangents (``scratch``, which also holds its gradient: runtime/ort_backend.py).

"Widest point" is a liveness count over the program: at each layer, the values computed
earlier and still to be read (residual skips included) plus the layer's output. A module's
input and output are not counted there; they are the boundary buffers.

The program counts a layer's value and its m tangents, not what the dual rules compute on the way
(a train-mode BatchNorm's centred input and its tangent's terms, a max-pool's window slices). With
the artifacts at hand, ``graph_live`` adds that part from the dual graphs themselves: the same
liveness count over the ONNX nodes in their emitted order (the order ONNX Runtime runs them in,
``PRIORITY_BASED``), graph inputs and outputs excluded. It is a separate part ("dual-rule
temporaries"), so the bench can report the ratio under the layer-only formula too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from asyncfgd.runtime import contract as c
from asyncfgd.runtime.artifacts import F32, param_numel

OPTIMIZER_STATES = {"sgd": 0, "momentum": 1, "adam": 2}
KINDS = {"forward": "forward", "bp-torch": "backprop", "bp-ort": "backprop", "fgd-torch": "fgd", "fgd": "fgd",
         "asyncfgd": "asyncfgd"}


@dataclass
class Prediction:
    """Bytes by component; ``total`` is what the method must hold at its peak."""

    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def arrays(self) -> int:
        """The bytes the runtime holds in numpy arrays of fixed size (weights, tangents, optimizer state,
        re-created tangents); the rest (activations, their temporaries, boundaries, input) is what ONNX
        Runtime's arena and the batch hold, the part whose overhead a calibration measures."""
        return sum(v for k, v in self.parts.items() if k in ARRAY_PARTS)

    @property
    def layers_only(self) -> int:
        """The total under the formula without the graphs' temporaries."""
        return self.total - self.parts.get(TEMPORARIES, 0)

    def mb(self) -> dict[str, float]:
        return {k: v / 2**20 for k, v in self.parts.items()}


def _numel(shape: list[int]) -> int:
    return math.prod(int(d) for d in shape)


def widest_point(module: dict[str, Any]) -> int:
    """Elements per sample live at the module's widest layer (its input and output excluded)."""
    nodes = module["program"]
    last_use = {v: i for i, n in enumerate(nodes) for v in n["inputs"]}
    output = nodes[-1]["name"]
    peak = 0
    for i, node in enumerate(nodes):
        live = [n for n in nodes[:i] if last_use.get(n["name"], -1) >= i and n["name"] != output]
        out = 0 if node["name"] == output else _numel(node["shape"])
        peak = max(peak, out + sum(_numel(n["shape"]) for n in live))
    return peak


TEMPORARIES = "dual-rule temporaries (graph liveness)"
ARRAY_PARTS = ("weights", "tangents", "optimizer state", "scratch (re-created tangents, gradients)", "gradients")


def graph_live(root: Path, manifest: dict[str, Any], batch: int) -> list[int]:
    """Per module, the bytes live at the widest node of the dual graph the FGD schedulers run (module 0's
    ``dual_first``, the others' ``dual``) for ``batch`` samples."""
    out = []
    for k, mod in enumerate(manifest["modules"]):
        graphs = mod["graphs"]
        role = c.DUAL_FIRST if k == 0 and c.DUAL_FIRST in graphs else c.DUAL
        out.append(_live_bytes(onnx.load(root / graphs[role]["file"]), batch) if role in graphs else 0)
    return out


def _live_bytes(model: onnx.ModelProto, batch: int) -> int:
    for value in model.graph.input:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_value = batch
    model = onnx.shape_inference.infer_shapes(model)
    size = {}
    for v in (*model.graph.value_info, *model.graph.output):
        dims = [d.dim_value for d in v.type.tensor_type.shape.dim]
        if all(d > 0 for d in dims):
            size[v.name] = math.prod(dims) * F32
    outputs = {o.name for o in model.graph.output}
    last = {t: i for i, node in enumerate(model.graph.node) for t in node.input}
    live: dict[str, int] = {}
    peak = 0
    for i, node in enumerate(model.graph.node):
        live.update({t: size.get(t, 0) for t in node.output if t not in outputs})
        peak = max(peak, sum(live.values()))
        for t in node.input:
            if last.get(t) == i:
                live.pop(t, None)
    return peak


def saved_activations(modules: list[dict[str, Any]]) -> int:
    """Elements per sample of every layer's output (the tensors backprop keeps until backward)."""
    return sum(_numel(n["shape"]) for m in modules for n in m["program"])


def predict(manifest: dict[str, Any], method: str, batch: int, optimizer: str = "adam",
            live: list[int] | None = None) -> Prediction:
    """Bytes ``method`` must hold for one training step on ``batch`` samples of this split; ``live``
    (``graph_live``) adds the dual rules' temporaries for the FGD methods."""
    if method not in KINDS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(KINDS)}")
    modules, m = manifest["modules"], int(manifest["tangents"])
    weights = sum(param_numel(mod) for mod in modules) * F32
    state = OPTIMIZER_STATES[optimizer] * weights
    parts = {"weights": weights, "input batch": _numel(modules[0]["in_shape"]) * batch * F32}
    kind = KINDS[method]
    if kind == "forward":
        parts["activations"] = max(widest_point(mod) for mod in modules) * batch * F32
        return Prediction(parts)
    if kind == "backprop":
        parts.update({"gradients": weights, "optimizer state": state,
                      "saved activations": saved_activations(modules) * batch * F32})
        return Prediction(parts)
    dual = (1 + m) * batch * F32  # bytes per element of a value and its m tangents
    widest = [widest_point(mod) * dual for mod in modules]
    parts.update({
        "tangents": m * weights,
        "optimizer state": state,
        "scratch (re-created tangents, gradients)": sum(m * param_numel(mod) for mod in modules[:-1]) * F32,
        "module boundaries (h, ḣ) x2": sum(2 * _numel(mod["out_shape"]) for mod in modules[:-1]) * dual,
        "activations": sum(widest) if kind == "asyncfgd" else max(widest),
    })
    if live is not None:
        graph = [max(w, g) for w, g in zip(widest, live, strict=True)]
        parts[TEMPORARIES] = (sum(graph) if kind == "asyncfgd" else max(graph)) - parts["activations"]
    return Prediction(parts)
