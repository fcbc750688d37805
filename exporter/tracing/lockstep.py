"""Run a traced graph at two batch sizes side by side: what changes with the batch is per sample.

A tensor whose first axis is 2 in one run and 3 in the other, the rest equal, is per sample
(batched); one that does not depend on the input at all is weight-derived. A tensor computed
from the input that is neither has mixed the samples (e.g. a reshape that merges the batch
into another axis) and cannot be expressed per sample: the tracer reports it. Numbers that
differ between the runs (``x.size(0)``) depend on the batch size; ``BatchSized`` keeps both.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

BATCHES = (2, 3)


def run_lockstep(gm: fx.GraphModule, input_shape: tuple[int, ...]) -> dict[str, tuple[Any, Any]]:
    """Every node's value at both batch sizes (eval mode, no gradient, modes restored)."""
    modes = {m: m.training for m in gm.modules()}
    gm.eval()
    dtype = next((p.dtype for p in gm.parameters()), torch.float32)
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn((b, *input_shape), generator=gen).to(dtype) for b in BATCHES]
    out: dict[str, tuple[Any, Any]] = {}
    try:
        with torch.no_grad():
            runs = [_Recorder(gm) for _ in BATCHES]
            for r, x in zip(runs, inputs, strict=True):
                r.run(x)
            for name in runs[0].values:
                out[name] = (runs[0].values[name], runs[1].values[name])
    finally:
        for m, training in modes.items():
            m.training = training
    return out


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.values[n.name] = out
        return out


def is_batched(a: Any, b: Any) -> bool:
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() >= 1 and b.dim() == a.dim()
            and (a.shape[0], b.shape[0]) == BATCHES and a.shape[1:] == b.shape[1:])


def same(a: Any, b: Any) -> bool:
    """Whether a non-tensor value is the same at both batch sizes."""
    try:
        return bool(a == b)
    except Exception:  # values without a plain equality (e.g. containers of tensors)
        return False


def at_batch(a: Any, b: Any, n: int) -> Any:
    """A batch-dependent number (or tuple of numbers) at batch ``n``, from its values at 2 and 3."""
    if isinstance(a, (tuple, list)):
        vals = [at_batch(x, y, n) for x, y in zip(a, b, strict=True)]
        return torch.Size(vals) if isinstance(a, torch.Size) else type(a)(vals)
    if isinstance(a, (int, float)) and not isinstance(a, bool) and a != b:
        return type(a)(a + (n - BATCHES[0]) * (b - a))
    return a
