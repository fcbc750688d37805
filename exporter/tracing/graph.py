"""torch.fx tracing that keeps layers with their own dual rules whole and records source lines."""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.fx as fx
from torch import nn

#: module classes recognised by name (timm's DropPath, torchvision's StochasticDepth): per-sample drop-path
DROP_PATH_CLASSES = ("DropPath", "StochasticDepth")


def is_layer(m: nn.Module, layer_types: tuple[type, ...]) -> bool:
    """Exact types only: a subclass with its own forward (torchvision's LayerNorm2d permutes
    around nn.LayerNorm) is traced through, not taken for its base."""
    return type(m) in layer_types or type(m).__name__ in DROP_PATH_CLASSES


def trace_graph(model: nn.Module, layer_types: tuple[type, ...]) -> fx.GraphModule:
    """The model's fx graph, traced in training mode (so dropout and drop-path appear) with the
    model's own modes restored afterwards. Layers in ``layer_types`` are leaves; so are other
    torch.nn layers (reported unsupported later, by name); user modules are traced through."""

    class Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            if is_layer(m, layer_types):
                return True
            return super().is_leaf_module(m, qualname) and not isinstance(m, (nn.Sequential, nn.ModuleList,
                                                                                nn.ModuleDict))

    modes = {m: m.training for m in model.modules()}
    model.train()
    try:
        tracer = Tracer()
        tracer.record_stack_traces = True
        graph = tracer.trace(model)
    finally:
        for m, training in modes.items():
            m.training = training
    return fx.GraphModule(model, graph)


def source_line(node: fx.Node) -> str:
    """``file:line: code`` of the user's line that made ``node`` (the innermost frame fx recorded
    outside torch itself)."""
    trace: Any = node.meta.get("stack_trace") or ""
    lines = [ln for ln in str(trace).splitlines() if ln.strip()]
    torch_dir = os.path.dirname(torch.__file__)
    for i in range(len(lines) - 1, -1, -1):
        head = lines[i].strip()
        if head.startswith("File ") and torch_dir not in head:
            parts = head.split(", ")
            path = parts[0][len('File "'):].rstrip('"').rsplit("/", 1)[-1]
            line = parts[1].replace("line ", "") if len(parts) > 1 else "?"
            code = lines[i + 1].strip() if i + 1 < len(lines) else ""
            return f"{path}:{line}: {code}"
    return ""
