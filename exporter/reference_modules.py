"""Each pipeline module as a function of the model's *own* nn.Module layers (the oracle side).

Validation and the reference trainer must not share the dual rules they check, so a module
here runs the real torch layers (nn.Conv2d, nn.BatchNorm2d, ...) via ``functional_call`` and
gets tangents from ``torch.func.jvp``.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
from torch.func import functional_call

from asyncfgd.runtime.dual.program import ModuleSpec

#: f(x, params, buffers) of one module; buffers None: BatchNorm on batch statistics, none updated
SegmentFn = Callable[[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor] | None], torch.Tensor]


def segment_fn(model: torch.nn.Module, mod: ModuleSpec) -> SegmentFn:
    """f(x, params, buffers) for one module, using the model's layers with substituted tensors.

    ``buffers`` are BatchNorm statistics; in train mode the layers update them in place, as
    PyTorch does, so pass clones when the originals must survive.
    """
    layers = dict(model.named_modules())

    def run(x: torch.Tensor, params: dict[str, torch.Tensor],
            buffers: dict[str, torch.Tensor] | None) -> torch.Tensor:
        env = {mod.input: x}
        for node in mod.nodes:
            args = [env[i] for i in node.inputs]
            if node.op == "add":
                out = args[0] + args[1]
            elif node.name in layers:
                layer = layers[node.name]
                local = {r: params[q] for r, q in node.params.items()}
                if node.op == "batchnorm2d":
                    # the layer's own kernel, minus its num_batches_tracked counter (an integer
                    # momentum-less BN would need; torch.func cannot mutate captured tensors).
                    # buffers=None: train mode without touching running statistics.
                    stats: tuple[torch.Tensor | None, torch.Tensor | None] = (
                        (None, None) if buffers is None else (buffers[node.buffers["running_mean"]],
                                                              buffers[node.buffers["running_var"]]))
                    out = torch.nn.functional.batch_norm(args[0], *stats, local.get("weight"), local.get("bias"),
                                                         layer.training, layer.momentum, layer.eps)
                else:
                    out = functional_call(layer, local, (args[0],)) if local else layer(args[0])
            else:  # functional flatten
                out = torch.flatten(args[0], 1)
            env[node.name] = out
        return env[mod.output]

    return run


def jvp_module(model: torch.nn.Module, mod: ModuleSpec, x: torch.Tensor, x_dot: torch.Tensor | None,
               params: dict[str, torch.Tensor], tangents: dict[str, torch.Tensor],
               buffers: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, ẏ) of one module by torch.func.jvp over (x, weights) for one tangent direction."""
    f = segment_fn(model, mod)
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


