"""The PyTorch reference of the local-activity method: the oracle its runtime must match.

Independent of the runtime's activity code (runtime/dual/activity.py) and dual rules: each module
runs the model's own layers (``run_segment``) with a shift δ added at every site, and d_nj comes
from ``torch.func.jvp`` with respect to (δ, the weight-perturbed weights) along (ε_j, u_j). The
weight estimates come from autograd applied to one layer at a time: the vector-Jacobian product
of a site's output with respect to its own layers' weights, with the site's G as the cotangent
(BatchNorm's transpose included), so no hand-written transpose is shared with the runtime. G is
kept where autograd finds the site's value reaching the loss (the support the runtime reads off
the site's readers). A site whose channels a linear reads apart (``channel_reader``) takes each
channel's d from a ``jvp`` along ε on that channel alone, one pass per channel. A cell site
(``cell_shape``) is perturbed along its cell tangents, and each cell's estimate is spread over the
entries where autograd finds each classifier's loss reaching the site.

The method has no delayed updates, so the pipeline equals a sequential loop: module k runs step s
with the weights its own updates up to step s − 1 left, on the output module k − 1 produced for
step s before its own update for s (runtime/scheduler.py ``LocalActivity``).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F

from asyncfgd.runtime import contract as c
from asyncfgd.runtime.dual.activity import (
    WEIGHTS,
    cell_layout,
    cell_shape,
    channel_reader,
    groups,
    loss_groups,
    site_groups,
    support_chain,
)
from asyncfgd.runtime.dual.program import ModuleSpec, Node, stat_names, weight_names
from asyncfgd.runtime.masks import draw_masks, dropout_sites
from asyncfgd.runtime.perturb import fill_signs, fill_tangents

from .reference import ReferenceResult, _make_optimizer, _opt_step
from .reference_modules import set_bn_training
from .tracing.replay import observing, run_segment


def head_forward(aux: list[Node], y: torch.Tensor, weights: dict[str, torch.Tensor],
                 shift: dict[str, torch.Tensor]) -> torch.Tensor:
    """A local head (exporter/local_heads.py) in plain torch: global average pool, flatten, linear."""
    for n in aux:
        if n.op == "global_avgpool":
            y = y.mean(dim=(2, 3), keepdim=True)
        elif n.op == "adaptive_avgpool2d":
            y = F.adaptive_avg_pool2d(y, n.attrs["output_size"])
        elif n.op == "flatten":
            y = y.flatten(1)
        elif n.op == "linear":
            y = F.linear(y, weights[n.params["weight"]], weights.get(n.params.get("bias", "")))
        elif n.op == "conv2d":  # one classifier per channel group: each group's grid, flattened
            w = weights[n.params["weight"]]
            g = n.attrs["groups"]
            feats = y.reshape(len(y), g, 1, -1)
            y = (feats * w.reshape(g, -1, w[0].numel())).sum(-1).reshape(len(y), -1, 1, 1)
            y = y + weights[n.params["bias"]].reshape(1, -1, 1, 1)
        else:
            raise ValueError(f"local heads hold pool, flatten, linear and grouped-conv nodes, not {n.op!r}")
        if n.name in shift:
            y = y + shift[n.name]
    return y


def module_step(model: torch.nn.Module, spec: ModuleSpec, x: torch.Tensor, labels: torch.Tensor,
                weights: dict[str, torch.Tensor], stats: dict[str, torch.Tensor], eps: dict[str, torch.Tensor],
                u: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], bn_train: bool
                ) -> dict[str, torch.Tensor]:
    """One module on one batch: the activity role's outputs by contract name (y for a non-last
    module, loss, sample_dot (m, N), logits, g.<weight>); updates ``stats`` (train-mode BatchNorm)
    as the forward does. ``eps`` are the sites' ε (m, N, ...), ``u`` the weight-perturbed weights'
    tangents (m, ...)."""
    plan = spec.activity
    assert plan is not None
    mod_w = {q: weights[q] for q in weight_names(spec.nodes)}
    sites = [s.node for s in plan.sites]
    m = next(iter(eps.values())).shape[0] if eps else next(iter(u.values())).shape[0]
    wp = list(plan.weight_perturbed)
    heads = loss_groups(spec.aux)

    def losses(deltas: Sequence[torch.Tensor], moved: Sequence[torch.Tensor]) -> torch.Tensor:
        """Each sample's loss per head classifier, (N, groups): a grouped head's logits side by side."""
        shift = dict(zip(sites, deltas, strict=True))
        w = {**weights, **dict(zip(wp, moved, strict=True))}
        y = run_segment(model, spec, x, {q: w[q] for q in mod_w}, None if bn_train else stats, masks, shift)
        z = head_forward(spec.aux, y, w, shift) if spec.aux else y
        z = z.reshape(len(z), heads, -1)
        return F.cross_entropy(z.transpose(1, 2), labels[:, None].expand(-1, heads), reduction="none")

    n = len(x)
    zeros = tuple(torch.zeros(n, *s.shape, dtype=x.dtype) for s in plan.sites)
    cells = {s.node: cell_shape(s, spec.nodes + spec.aux, support_chain(s, spec.nodes + spec.aux))
             for s in plan.sites}
    xi = {}  # a cell site's tangent: one value per cell, signs from ε times the Hadamard rows
    for site in plan.sites:
        if cells[site.node]:
            ch, cw = cells[site.node]
            signs = eps[site.node][0, :, :, ::ch, ::cw]
            shared = site_groups(site, spec.nodes, spec.aux)  # the groups whose cells share one d
            grid = (signs.shape[2], signs.shape[3])
            xi[site.node] = signs * torch.from_numpy(cell_layout(m, signs.shape[1], grid, shared))
    along = {s: xi[s].repeat_interleave(cells[s][0], -2).repeat_interleave(cells[s][1], -1) if s in xi else eps[s]
             for s in sites}
    primals = (zeros, tuple(weights[q] for q in wp))
    no_u = tuple(torch.zeros_like(weights[q]) for q in wp)
    d: dict[str, torch.Tensor] = {}  # by perturbation group: (m, N, heads), each along its own tangents
    for group in groups(plan):
        rows = []
        for j in range(m):
            if group == WEIGHTS:
                tang = (zeros, tuple(u[q][j] for q in wp))
            else:
                tang = (tuple(along[s][j] if s == group else z for s, z in zip(sites, zeros, strict=True)), no_u)
            per, dj = cast(tuple[torch.Tensor, torch.Tensor], torch.func.jvp(losses, primals, tang))
            rows.append(dj)
        d[group] = torch.stack(rows)
    parts: dict[str, torch.Tensor] = {}  # a site read apart by a linear: d from one pass per channel
    for site in plan.sites:
        if channel_reader(site, spec.nodes + spec.aux) is None or cells[site.node]:
            continue
        e = eps[site.node]
        alone = torch.eye(e.shape[2], dtype=e.dtype).reshape(e.shape[2], 1, e.shape[2], *[1] * (e.dim() - 3))
        parts[site.node] = torch.stack([torch.stack([torch.func.jvp(losses, primals, (tuple(
            e[j] * alone[ch] if s == site.node else z for s, z in zip(sites, zeros, strict=True)), no_u))[1][:, 0]
            for ch in range(e.shape[2])], -1) for j in range(m)])  # (m, N, C)
    reach = []  # per head classifier, where each site's value reaches its loss: ∇ ≠ 0 there
    with torch.enable_grad():
        for h in range(heads):
            shifts = tuple(z.clone().requires_grad_() for z in zeros)
            grads = torch.autograd.grad(losses(shifts, primals[1])[:, h].sum(), shifts, allow_unused=True)
            reach.append([torch.ones_like(z) if r is None else (r != 0).to(z.dtype)
                          for r, z in zip(grads, zeros, strict=True)])
    estimates: dict[str, torch.Tensor] = {}
    for i, site in enumerate(plan.sites):
        if site.node in parts:
            g = torch.einsum("jnc,jnc...->nc...", parts[site.node], eps[site.node]) * reach[0][i] / (m * n)
        elif site.node in xi:  # each cell's estimate, shared by the entries through which its loss moves
            ch, cw = cells[site.node]
            g = torch.zeros_like(zeros[i])
            for h in range(heads):
                per_cell = torch.einsum("jn,jn...->n...", d[site.node][..., h], xi[site.node])
                count = F.avg_pool2d(reach[h][i], (ch, cw)).mul(ch * cw).clamp(min=1)
                g += (per_cell / count).repeat_interleave(ch, -2).repeat_interleave(cw, -1) * reach[h][i]
            g /= m * n * heads
        else:
            g = torch.stack([torch.einsum("jn,jn...->n...", d[site.node][..., h], eps[site.node]) * reach[h][i]
                             for h in range(heads)]).sum(0) / (m * n * heads)
        layer_w = [q for name in site.layers for q in spec.node(name).params.values()]
        estimates.update(_vjp(model, spec, x, weights, stats, masks, bn_train, site.node, layer_w, g))
    for q in wp:
        estimates[q] = torch.einsum("j,j...->...", d[WEIGHTS].mean(dim=(1, 2)), u[q]) / m
    d_all = torch.cat([d[group].mean(dim=2) for group in groups(plan)])
    with torch.no_grad():
        y = run_segment(model, spec, x, mod_w, stats or None, masks)
        logits = head_forward(spec.aux, y, weights, {}) if spec.aux else y
    out = {c.LOSS: per.mean(), c.SAMPLE_DOT: d_all, c.LOGITS: logits,
           **{c.grad_output(q): g for q, g in estimates.items()}}
    return out if not spec.aux else {c.Y: y, **out}



def _vjp(model: torch.nn.Module, spec: ModuleSpec, x: torch.Tensor, weights: dict[str, torch.Tensor],
         stats: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], bn_train: bool, site: str,
         layer_w: list[str], g: torch.Tensor) -> dict[str, torch.Tensor]:
    """G pulled back to the weights of the site's own layers by autograd (the layers' inputs fixed)."""
    copies = {q: weights[q].detach().clone().requires_grad_(q in layer_w) for q in weights}
    seen: dict[str, torch.Tensor] = {}
    if any(n.name == site for n in spec.aux):
        y = run_segment(model, spec, x, {q: copies[q] for q in weight_names(spec.nodes)},
                        None if bn_train else stats, masks).detach()
        out = head_forward([n for n in spec.aux if _before(spec.aux, n.name, site)], y, copies, {})
    else:
        def watch(name: str, nodes: list[Node], args: Any, value: Any) -> None:
            if nodes[-1].name == site:
                seen[site] = value

        with observing(watch), torch.enable_grad():
            run_segment(model, spec, x, {q: copies[q] for q in weight_names(spec.nodes)},
                        None if bn_train else stats, masks)
        out = seen[site]
    grads = torch.autograd.grad(out, [copies[q] for q in layer_w], g)
    return dict(zip(layer_w, grads, strict=True))


def _before(nodes: list[Node], name: str, last: str) -> bool:
    names = [n.name for n in nodes]
    return names.index(name) <= names.index(last)


def run_local_activity_reference(model: torch.nn.Module, specs: Sequence[ModuleSpec],
                                 batches: Sequence[tuple[np.ndarray, np.ndarray]], head_weights: dict[str, np.ndarray],
                                 *, seed: int, lr: Callable[[int], float], optimizer: str = "sgd",
                                 optimizer_kw: dict[str, Any] | None = None, tangents: int = 1,
                                 mode: str = "gaussian", bn_mode: str = "train") -> ReferenceResult:
    """Train on ``batches`` ((x, integer labels) pairs) with the local-activity method; ``specs``
    carry the exported plans and heads, ``head_weights`` the heads' initial weights."""
    K, m = len(specs), tangents
    state = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
    state.update({k: torch.from_numpy(np.array(v, np.float32)) for k, v in head_weights.items()})
    params = [{q: state[q] for q in weight_names(s.nodes + s.aux)} for s in specs]
    stats = [{q: state[q] for q in stat_names(s.nodes)} for s in specs]
    bn_train = bn_mode == "train"
    set_bn_training(model, bn_train)
    opts = [_make_optimizer("torch", optimizer, params[k], lr(0), dict(optimizer_kw or {})) for k in range(K)]
    out = ReferenceResult()
    for s, (xb, yb) in enumerate(batches):
        h = torch.from_numpy(np.asarray(xb, np.float32))
        labels = torch.from_numpy(np.asarray(yb)).long()
        n = len(h)
        for k, spec in enumerate(specs):
            plan = spec.activity
            assert plan is not None, "specs need activity plans (export_model(activity=True))"
            host_eps = [np.empty((m, n, *site.shape), np.float32) for site in plan.sites]
            fill_signs(host_eps, seed, s, k)
            host_u = [np.empty((m, *params[k][q].shape), np.float32) for q in plan.weight_perturbed]
            fill_tangents(host_u, seed, s, k, mode)
            eps = {site.node: torch.from_numpy(e) for site, e in zip(plan.sites, host_eps, strict=True)}
            u = {q: torch.from_numpy(t) for q, t in zip(plan.weight_perturbed, host_u, strict=True)}
            masks = {name: torch.from_numpy(v) for name, v in
                     draw_masks(dropout_sites(spec.nodes), seed, s, k, n).items()}
            o = module_step(model, spec, h, labels, params[k], stats[k], eps, u, masks, bn_train)
            _opt_step(opts[k], "torch", params[k], {q: o[c.grad_output(q)] for q in params[k]}, lr(s))
            if k < K - 1:
                h = o[c.Y]
            else:
                out.loss[s], out.loss_dot[s] = float(o[c.LOSS]), o[c.SAMPLE_DOT].mean(dim=1).numpy()
        out.history.append({q: p.clone() for pk in params for q, p in pk.items()})
    out.params = {q: p for pk in params for q, p in pk.items()}
    out.stats = {q: v for sk in stats for q, v in sk.items()}
    return out
