"""Run one module's program with the dual rules, on any op set (torch eager or the ONNX builder).

``run_module`` is one graph role's whole computation, returned by output name (the artifact
contract, runtime/contract.py); ``run_program`` interprets the layer nodes under it.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from .. import contract as c
from . import activity
from .fusions import conv_bn_from_data, dense_conv_rule, densifies, fold_pairs, pays_to_fold
from .ops import Ops
from .program import BATCH_REF, ModuleSpec, Node, weight_names
from .rules import RULES, RuleContext, cross_entropy, swap_major
from .rules.core import add_opt


@dataclass(frozen=True)
class GraphSpec:
    """What one graph computes: which role, how many tangents, and the BatchNorm mode."""

    role: str
    m: int
    bn_mode: str  # "train" | "frozen"
    batch: int = 64  # the mini-batch size cost-based graph forms are chosen for (rules.RuleContext)

    @property
    def dual(self) -> bool:
        return self.role in c.TANGENT_ROLES

    @property
    def bn_train(self) -> bool:
        return self.bn_mode == "train" and self.role != c.EVAL

    def context(self) -> RuleContext:
        return RuleContext(m=self.m, dual=self.dual, bn_train=self.bn_train, batch=self.batch)


def module_roles(mod: ModuleSpec) -> tuple[str, ...]:
    """The first module's input is data, whose tangent is always zero: it has no ``dual`` role."""
    roles = c.ROLES[1:] if mod.index == 0 else c.ROLES
    roles = (*roles, c.LOCAL) if mod.aux else roles
    return (*roles, c.ACTIVITY) if mod.activity is not None else roles


def graph_weight_names(mod: ModuleSpec, spec: GraphSpec) -> list[str]:
    """Weights a graph takes: the module's, plus its auxiliary head's in the local roles."""
    return weight_names(mod.nodes + (mod.aux if spec.role in (c.LOCAL, c.ACTIVITY) else []))


def graph_tangent_names(mod: ModuleSpec, spec: GraphSpec) -> list[str]:
    """Weights whose tangents a graph takes: all of them, except in the activity role (only the
    weight-perturbed ones)."""
    if not spec.dual:
        return []
    if spec.role == c.ACTIVITY:
        assert mod.activity is not None  # the role exists only with a plan
        return list(mod.activity.weight_perturbed)
    return graph_weight_names(mod, spec)


def run_module(ops: Ops, mod: ModuleSpec, spec: GraphSpec, is_last: bool, x: Any, x_dot: Any,
               params: dict[str, Any], tangents: dict[str, Any], stats: dict[str, Any],
               labels: Any = None, masks: dict[str, Any] | None = None,
               noise: dict[str, Any] | None = None) -> dict[str, Any]:
    """One graph's computation, returned by output name; ``masks`` are the dropout masks by node
    name (the training roles'; without them dropout is the identity, as in ``eval``); ``noise``
    the activity role's ε by site node, (m, N, ...)."""
    if spec.role == c.ACTIVITY:
        return run_activity(ops, mod, spec, is_last, x, params, tangents, stats, labels, masks, noise or {})
    ctx = spec.context()
    y, yd, new_stats = run_program(ops, mod.nodes, mod.input, x, x_dot if spec.role == c.DUAL else None,
                                   params, tangents if spec.dual else {}, stats, ctx,
                                   masks if spec.role in c.MASK_ROLES else None)
    out: dict[str, Any] = {}
    if spec.dual and yd is None:  # a module with no weights and a zero input tangent
        yd = ops.expand_zeros(y, spec.m)
    if spec.role == c.LOCAL:
        z, zd, _ = run_program(ops, mod.aux, mod.output, y, yd, params, tangents, {}, ctx)
        out[c.Y] = y
        out[c.LOSS], per_group = activity.group_losses(ops, z, zd, labels, activity.loss_groups(mod.aux))
        out[c.LOSS_DOT] = ops.mean(per_group, [1, 2], keepdims=False)
        out[c.LOGITS] = z
    elif is_last and spec.role != c.EVAL:
        loss, dloss = cross_entropy(ops, y, yd, labels, spec.dual)
        out[c.LOSS] = loss
        if spec.dual:
            out[c.LOSS_DOT] = dloss
        out[c.LOGITS] = y
    elif is_last:
        out[c.LOGITS] = y
    else:
        out[c.Y] = y
        if spec.dual:
            out[c.Y_DOT] = yd
    if ctx.bn_train:
        out.update({c.stat_output(k): v for k, v in new_stats.items()})
    return out


def run_activity(ops: Ops, mod: ModuleSpec, spec: GraphSpec, is_last: bool, x: Any, params: dict[str, Any],
                 tangents: dict[str, Any], stats: dict[str, Any], labels: Any, masks: dict[str, Any] | None,
                 noise: dict[str, Any]) -> dict[str, Any]:
    """The activity role (runtime/dual/activity.py): one pass in which every perturbation group (the
    weight-perturbed weights, then each site) has m tangent slots of its own, the local loss (the
    head's, or the true loss in the last module) per sample, and every weight's estimate from its
    own group's d, so no group's noise enters another's estimate."""
    plan = mod.activity
    assert plan is not None  # the role exists only with a plan
    m, groups = spec.m, activity.groups(plan)
    ctx = replace(spec.context(), m=m * len(groups))
    slot = {g: i for i, g in enumerate(groups)}
    chains = {s.node: activity.support_chain(s, mod.nodes + mod.aux) for s in plan.sites}
    found = {s.node: activity.cell_shape(s, mod.nodes + mod.aux, chains[s.node]) for s in plan.sites}
    cells = {site: cell for site, cell in found.items() if cell is not None}
    split = {s.node: activity.site_groups(s, mod.nodes, mod.aux) for s in plan.sites}
    # a cell site's noise is one number per cell (ξ), its tangent ξ spread over the cell
    xi = {site: activity.cell_noise(ops, noise[site], cell, m, split[site]) for site, cell in cells.items()}
    # each site's tangent (m, N, ...) -> (N, m, ...) -> its slots of the (N, G·m, ...) tangent, zeros elsewhere;
    # a cell site's enters at its pool (activity.PooledTangent)
    inject: dict[str, Any] = {}
    for s in plan.sites:
        slots = activity.in_slots(ops, swap_major(ops, xi.get(s.node, noise[s.node]), m, to_samples=True),
                                  slot[s.node], len(groups), axis=1)
        pool = activity.cell_pool(s, mod.nodes + mod.aux, chains[s.node]) if s.node in cells else None
        if pool is None:
            inject[s.node] = slots
        else:
            inject[pool.name] = activity.PooledTangent(slots, tuple(chains[s.node]))
    u = {q: activity.in_slots(ops, tangents[q], slot[activity.WEIGHTS], len(groups)) for q in plan.weight_perturbed}
    wanted = {n for s in plan.sites for layer in s.layers for n in (layer, *mod.node(layer).inputs)}
    wanted |= {n.name for chain in chains.values() for n in chain}
    readers_apart = {s.node: activity.channel_reader(s, mod.nodes + mod.aux) for s in plan.sites
                     if split[s.node] == 1 and s.node not in cells}
    apart = {site: lin for site, lin in readers_apart.items() if lin is not None}
    wanted |= {lin.inputs[0] for lin in apart.values()}
    values: dict[str, Any] = {}
    dots: dict[str, Any] = {}
    y, yd, new_stats = run_program(ops, mod.nodes, mod.input, x, None, params, u, stats, ctx,
                                   masks, inject, values, wanted, dots)
    out: dict[str, Any] = {}
    if mod.aux:
        out[c.Y] = y
        z, zd, _ = run_program(ops, mod.aux, mod.output, y, yd, params, u, {}, ctx, None, inject, values, wanted,
                               dots)
    else:
        assert is_last, "a non-last module needs a local head for the activity role"
        z, zd = y, yd
    out[c.LOSS], per_group = activity.group_losses(ops, z, zd, labels, activity.loss_groups(mod.aux))
    d = ops.mean(per_group, [2], keepdims=False)  # (G·m, N): each sample's whole local loss
    out[c.SAMPLE_DOT], out[c.LOGITS] = d, z
    by_name = {n.name: n for n in mod.nodes + mod.aux}
    for site in plan.sites:
        lin = apart.get(site.node)
        if lin is not None:
            xd = ops.slice(dots[lin.inputs[0]], 1, slot[site.node] * m, (slot[site.node] + 1) * m, 1)
            channels = site.shape[0]
            own = activity.channel_d(ops, xd, params[lin.params["weight"]], z, labels, channels)
            g = activity.site_gradient(ops, own, noise[site.node], m, channels, mean_of_groups=False)
        else:
            own = activity.group_d(ops, per_group if split[site.node] > 1 else d, slot[site.node], m)
            g = activity.site_gradient(ops, own, xi.get(site.node, noise[site.node]), m, split[site.node])
        support = activity.site_support(ops, chains[site.node], values[site.node], values)
        if site.node in cells:
            g = activity.cell_gradient(ops, g, support, cells[site.node], chains[site.node])
        elif support is not None:
            g = ops.mul(g, support)
        for q, est in activity.site_estimates(ops, site, by_name, g, values, params, stats, ctx).items():
            out[c.grad_output(q)] = est
    for q in plan.weight_perturbed:
        out[c.grad_output(q)] = activity.weight_estimate(ops, activity.group_d(ops, d, slot[activity.WEIGHTS], m),
                                                         tangents[q], m)
    if ctx.bn_train:
        out.update({c.stat_output(k): v for k, v in new_stats.items()})
    return out



def run_program(ops: Ops, nodes: list[Node], input_name: str, x: Any, x_dot: Any, params: dict[str, Any],
                tangents: dict[str, Any], stats: dict[str, Any], ctx: RuleContext,
                masks: dict[str, Any] | None = None, inject: dict[str, Any] | None = None,
                values: dict[str, Any] | None = None, wanted: set[str] | None = None,
                dots: dict[str, Any] | None = None) -> tuple[Any, Any, dict[str, Any]]:
    """Interpret ``nodes`` on (x, ẋ): returns (y, ẏ, updated BN statistics by qualified name).

    ``x_dot`` and ẏ are (m, N, ...), the artifact contract's layout; the rules work on (N, m, ...)
    (rules/core.py), one transpose each way when m > 1. ``tangents`` maps weight names to (m, *shape)
    tangents; a missing entry or ``x_dot=None`` means a zero tangent, whose work the rules skip.
    Where a fusion pays (fusions.py), it runs instead of the reference rules: a conv fed by a zero
    tangent and read only by a BatchNorm as one folded pair, a conv's W∗ẋ as one dense GEMM.
    """
    env: dict[str, tuple[Any, Any]] = {input_name: (x, swap_major(ops, x_dot, ctx.m, to_samples=True)),
                                       BATCH_REF: (x, None)}
    new_stats: dict[str, Any] = {}
    bn_of = fold_pairs(nodes)
    done: set[str] = set()
    for node in nodes:
        if node.name in done:
            continue
        xs = [env[i][0] for i in node.inputs]
        xds = [env[i][1] for i in node.inputs]
        p, u, s = _bind(node, params, tangents, stats)
        if masks and node.name in masks:
            s = {"mask": masks[node.name]}
        bn = bn_of.get(node.name)
        if bn is not None and xds[0] is None and u.get("weight") is not None and pays_to_fold(ctx):
            y, yd, upd = conv_bn_from_data(ops, node, bn, xs[0], p, u, *_bind(bn, params, tangents, stats), ctx)
            node = bn
            done.add(bn.name)
        elif node.op == "conv2d" and ctx.dual and densifies(ops, node, xs[0], xds[0], p, ctx):
            y, yd, upd = dense_conv_rule(ops, node, xs[0], xds[0], p, u, ctx)
        else:
            y, yd, upd = RULES[node.op](ops, node, xs, xds, p, u, s, ctx)
        if inject and node.name in inject:
            extra = inject[node.name]
            yd = add_opt(ops, yd, extra.at(ops, xs[0]) if isinstance(extra, activity.PooledTangent) else extra)
        env[node.name] = (y, yd)
        new_stats.update({node.buffers[role]: v for role, v in upd.items()})
    if values is not None and wanted:
        values.update({k: v[0] for k, v in env.items() if k in wanted})
        if dots is not None:
            dots.update({k: v[1] for k, v in env.items() if k in wanted})
    y, yd = env[nodes[-1].name]
    return y, swap_major(ops, yd, ctx.m, to_samples=False), new_stats


def _bind(node: Node, params: dict[str, Any], tangents: dict[str, Any],
          stats: dict[str, Any]) -> tuple[dict, dict, dict]:
    """A node's weights, weight tangents (None where zero) and statistics by local role."""
    return ({role: params[q] for role, q in node.params.items()},
            {role: tangents.get(q) for role, q in node.params.items()},
            {role: stats[q] for role, q in node.buffers.items()})
