"""The PyTorch reference of sync FGD and AsyncFGD: the oracle the runtime must match.

Written for obviousness, not speed: ticks are simulated explicitly, every tangent is kept in a
dict until its update, (y, ẏ) come from ``torch.func.jvp`` over the model's own layers and the
optimizer is ``torch.optim``. Tangents come from the runtime's seeded generator (numpy), so
both sides see the same ε. Two switches let a test isolate the scheduler:
``dual="rules"`` uses the exporter's dual rules (the torch backend's code) instead of jvp, and
``optimizer_impl="runtime"`` uses the runtime's optimizer on torch tensors; with both, the
runtime's torch backend must agree bit for bit.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F

from asyncfgd.runtime import contract as c
from asyncfgd.runtime.backend import updated_stats
from asyncfgd.runtime.dual.interpreter import GraphSpec, run_module
from asyncfgd.runtime.dual.program import ModuleSpec, stat_names, weight_names
from asyncfgd.runtime.dual.torch_ops import TorchOps
from asyncfgd.runtime.masks import draw_masks, dropout_sites
from asyncfgd.runtime.optim import make_optimizer
from asyncfgd.runtime.perturb import fill_tangents

from .reference_modules import jvp_module, segment_fn, set_bn_training


@dataclass
class ReferenceResult:
    loss: dict[int, float] = field(default_factory=dict)  # by step
    loss_dot: dict[int, np.ndarray] = field(default_factory=dict)  # by step, (m,)
    # by step: Σ_i |g_i·u_i| over every weight (g: autograd gradient through the weights each module
    # actually used for that step), the size of the terms whose sum is loss_dot; loss_dot's float32
    # error is judged relative to it because the sum cancels (jvp mode only)
    loss_dot_scale: dict[int, float] = field(default_factory=dict)
    tangent_shapes: tuple = ()  # per module, the weight shapes (to re-create tangents)
    params: dict[str, torch.Tensor] = field(default_factory=dict)  # final weights
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # final BN statistics
    history: list[dict[str, torch.Tensor]] = field(default_factory=list)  # weights after each tick/step


def _make_optimizer(impl: str, name: str, params: dict[str, torch.Tensor], lr: float, kw: dict[str, Any]) -> Any:
    if not params:
        return None  # a module without weights (e.g. a lone pooling layer) never updates
    if impl == "runtime":
        return make_optimizer(name, params, torch, lr=lr, **kw)
    tensors = list(params.values())
    if name == "adam":
        return torch.optim.Adam(tensors, lr=lr, foreach=False, **kw)
    momentum = kw.pop("momentum", 0.9 if name == "momentum" else 0.0)
    return torch.optim.SGD(tensors, lr=lr, momentum=momentum, foreach=False, **kw)


def _opt_step(opt: Any, impl: str, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], lr: float) -> None:
    if impl == "runtime":
        opt.step(grads, lr)
        return
    for group in opt.param_groups:
        group["lr"] = lr
    for name, p in params.items():
        p.grad = grads[name]
    opt.step()


def run_reference(model: torch.nn.Module, specs: Sequence[ModuleSpec], batches: Sequence[tuple[np.ndarray, np.ndarray]],
                  *, method: str, seed: int, alpha: Callable[[int, int], float], lr: Callable[[int], float],
                  optimizer: str = "sgd", optimizer_kw: dict[str, Any] | None = None, tangents: int = 1,
                  mode: str = "gaussian", bn_mode: str = "train", dual: str = "jvp",
                  optimizer_impl: str = "torch", num_classes: int = 10, tuned_batch: int = 64) -> ReferenceResult:
    """Train on ``batches`` ((x, integer labels) pairs) with sync FGD (``method="fgd"``) or AsyncFGD.

    ``dual="rules"`` runs the exporter's dual functions, with the graph forms chosen for ``tuned_batch``
    (the artifacts' ``tuned_batch``, so that both sides run the same forms)."""
    K, m = len(specs), tangents
    state = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
    params = [{q: state[q] for q in weight_names(s.nodes)} for s in specs]
    stats = [{q: state[q] for q in stat_names(s.nodes)} for s in specs]
    set_bn_training(model, bn_mode == "train")
    opts = [_make_optimizer(optimizer_impl, optimizer, params[k], lr(0), dict(optimizer_kw or {})) for k in range(K)]
    kept: dict[tuple[int, int], dict[str, torch.Tensor]] = {}  # (module, step) -> tangents (m, *shape)
    out = ReferenceResult(tangent_shapes=tuple(tuple(tuple(p.shape) for p in pk.values()) for pk in params))

    def tangents_for(k: int, s: int) -> dict[str, torch.Tensor]:
        host = [np.zeros((m, *params[k][q].shape), np.float32) for q in params[k]]
        fill_tangents(host, seed, s, k, mode, alpha(k, s))
        return {q: torch.from_numpy(h) for q, h in zip(params[k], host, strict=False)}

    used: dict[int, list[dict[str, torch.Tensor]]] = {}  # step -> autograd copies of the weights used

    def forward(k: int, s: int, x: torch.Tensor, xds: list[torch.Tensor] | None, y_int: torch.Tensor):
        """Module k on step s: returns (output, per-tangent output tangents or None, loss, dloss).

        In jvp mode ``x`` also carries an autograd graph back through the weights the earlier
        modules used for this step, so the last module can measure Σ|g_i·u_i| exactly.
        """
        upstream = xds is not None
        perturbed = alpha(k, s) > 0
        u = tangents_for(k, s) if (upstream or perturbed) else None
        if u is not None:
            kept[(k, s)] = u
        last = k == K - 1
        drops = {n: torch.from_numpy(v) for n, v in draw_masks(dropout_sites(specs[k].nodes), seed, s, k,
                                                                len(x)).items()}
        if dual == "rules":
            role = c.DUAL if upstream else (c.DUAL_FIRST if perturbed else c.FORWARD)
            onehot = F.one_hot(y_int, num_classes).float()
            xd = torch.stack(xds) if xds is not None else None  # i.e. if upstream
            with torch.no_grad():
                o = run_module(TorchOps(), specs[k], GraphSpec(role, m, bn_mode, tuned_batch), last, x, xd,
                               params[k], u or {}, stats[k], onehot, drops)
            for stat, v in updated_stats(o):
                stats[k][stat].copy_(v)
            if last:
                d = None if c.LOSS_DOT not in o else o[c.LOSS_DOT].numpy().copy()
                return o[c.LOGITS], None, float(o[c.LOSS]), d
            return o[c.Y], (list(o[c.Y_DOT]) if c.Y_DOT in o else None), None, None
        # torch.func.jvp over the model's own layers, one tangent direction at a time
        x_ag = getattr(x, "_ag", None)
        x = x.detach()
        if u is None:
            with torch.no_grad():
                y, _ = jvp_module(model, specs[k], x, None, params[k],
                                  {q: torch.zeros_like(p) for q, p in params[k].items()}, stats[k], drops)
            yds = None
        else:
            yds = []
            for j in range(m):
                bufs = stats[k] if j == 0 else {q: v.clone() for q, v in stats[k].items()}
                y, yd = jvp_module(model, specs[k], x, xds[j] if xds is not None else None, params[k],
                                   {q: t[j] for q, t in u.items()}, bufs, drops)
                yds.append(yd)
        copies = {q: p.detach().clone().requires_grad_() for q, p in params[k].items()}
        used.setdefault(s, []).append(copies)
        y_ag = segment_fn(model, specs[k], drops)(x if x_ag is None else x_ag, copies,
                                           None if bn_mode == "train" else stats[k])
        y = y.detach()
        if not last:
            # torch.Tensor takes Python attributes at runtime, but its stub declares none
            y._ag = y_ag  # type: ignore[attr-defined]
            return y, yds, None, None
        loss = float(F.cross_entropy(y, y_int))
        d = None if yds is None else np.array(
            [float(torch.func.jvp(lambda z: F.cross_entropy(z, y_int), (y,), (yd,))[1]) for yd in yds], np.float32)
        if yds is not None:
            weights = list(enumerate(used.pop(s)))
            flat = [t for _, ws in weights for t in ws.values()]
            grads = torch.autograd.grad(F.cross_entropy(y_ag, y_int), flat, allow_unused=True)
            gi = iter(grads)
            terms = [0.0] * m
            for kk, ws in weights:
                u_k = kept.get((kk, s))
                for q in ws:
                    g = next(gi)
                    if g is not None and u_k is not None:
                        for j in range(m):
                            terms[j] += float((g * u_k[q][j]).abs().sum())
            out.loss_dot_scale[s] = max(terms)
        return y, None, loss, d

    def update(s: int, d: np.ndarray) -> None:
        for k in range(K):
            u = kept.pop((k, s), None)
            if u is None or alpha(k, s) <= 0 or not params[k]:
                continue
            # a sum of m >= 1 tensors is a tensor (sum's annotation allows its start value 0)
            grads = {q: cast(torch.Tensor, sum(t[j] * (float(d[j]) / m) for j in range(m))) for q, t in u.items()}
            _opt_step(opts[k], optimizer_impl, params[k], grads, lr(s))

    data = [(torch.from_numpy(np.asarray(x, np.float32)), torch.from_numpy(np.asarray(y)).long()) for x, y in batches]
    if method == "fgd":
        for s, (x, y_int) in enumerate(data):
            h, hd = x, None
            for k in range(K):
                h, hd, loss, d = forward(k, s, h, hd, y_int)
            out.loss[s] = loss
            if d is not None:
                out.loss_dot[s] = d
                update(s, d)
            out.history.append({q: p.clone() for pk in params for q, p in pk.items()})
    elif method == "asyncfgd":
        slots: list[tuple | None] = [None] * K  # slots[k]: (step, h, hd, labels) waiting for module k
        for t in range(len(data) + K - 1):
            if t < len(data):
                slots[0] = (t, data[t][0], None, data[t][1])
            produced: list[tuple | None] = [None] * K
            for k in range(K):  # all modules of the tick use the weights as they were before it
                if (slot := slots[k]) is not None:
                    s, h, hd, y_int = slot
                    produced[k] = (s, *forward(k, s, h, hd, y_int), y_int)
            slots = [None] * K
            for k in range(K - 1):
                if (done := produced[k]) is not None:
                    s, h, hd, _, _, y_int = done
                    slots[k + 1] = (s, h, hd, y_int)
            if (final := produced[K - 1]) is not None:
                s, _, _, loss, d, _ = final
                out.loss[s] = loss
                if d is not None:
                    out.loss_dot[s] = d
                    update(s, d)
            out.history.append({q: p.clone() for pk in params for q, p in pk.items()})
    else:
        raise ValueError(f"method must be 'fgd' or 'asyncfgd', got {method!r}")
    out.params = {q: p for pk in params for q, p in pk.items()}
    out.stats = {q: v for sk in stats for q, v in sk.items()}
    return out
