"""Each pipeline module as a function of the model's *own* nn.Module layers (the oracle side).

Validation and the reference trainer must not share the dual rules they check, so a module
here runs the model's own operations (the real torch layers via ``functional_call``, torch
functions, tensor methods: tracing/replay.py) and gets tangents from ``torch.func.jvp``.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch

from asyncfgd.runtime.dual.program import ModuleSpec

from .tracing.replay import run_segment

#: f(x, params, buffers) of one module; buffers None: BatchNorm on batch statistics, none updated
SegmentFn = Callable[[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor] | None], torch.Tensor]


def segment_fn(model: torch.nn.Module, mod: ModuleSpec, masks: dict[str, torch.Tensor] | None = None) -> SegmentFn:
    """f(x, params, buffers) for one module: the model's own operations with substituted tensors
    (tracing/replay.py). ``buffers`` are BatchNorm statistics; in train mode the layers update
    them in place, as PyTorch does, so pass clones when the originals must survive. ``masks`` are
    the dropout masks by node name (none: dropout is the identity)."""

    def run(x: torch.Tensor, params: dict[str, torch.Tensor],
            buffers: dict[str, torch.Tensor] | None) -> torch.Tensor:
        return run_segment(model, mod, x, params, buffers, masks)

    return run


def jvp_module(model: torch.nn.Module, mod: ModuleSpec, x: torch.Tensor, x_dot: torch.Tensor | None,
               params: dict[str, torch.Tensor], tangents: dict[str, torch.Tensor],
               buffers: dict[str, torch.Tensor], masks: dict[str, torch.Tensor] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, ẏ) of one module by torch.func.jvp over (x, weights) for one tangent direction."""
    f = segment_fn(model, mod, masks)
    names = list(params)
    train_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules())

    def g(xx: torch.Tensor, *ws: torch.Tensor) -> torch.Tensor:
        return f(xx, dict(zip(names, ws, strict=False)), None if train_bn else buffers)

    xd = torch.zeros_like(x) if x_dot is None else x_dot
    # without has_aux, jvp returns (output, jvp_out); its annotation also allows the has_aux triple
    y, y_dot = cast(tuple[torch.Tensor, torch.Tensor],
                    torch.func.jvp(g, (x, *params.values()), (xd, *(tangents[n] for n in names))))
    if train_bn and buffers:
        # torch.func cannot mutate running statistics inside jvp: update them in a plain pass
        with torch.no_grad():
            f(x, params, buffers)
    return y, y_dot


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss every last module ends with (mean over the batch), from integer labels."""
    return torch.nn.functional.cross_entropy(logits, labels)


def set_bn_training(model: torch.nn.Module, train: bool) -> None:
    """BatchNorm mode of the whole model: train = batch statistics, else running statistics."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.train(train)


