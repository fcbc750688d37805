"""Activity perturbation with local losses: where the noise goes and how estimates are formed.

After Ren et al. 2023 ("Scaling Forward Gradient With Local Losses") and Fournier et al. 2023
(LocalFG-A). Instead of perturbing a layer's weights W, perturb its pre-activation z = W x with
ε_nj (sample n, tangent j) and take sample n's own directional derivative d_nj = ∇_{z_n} ℓ_n · ε_nj
of its local loss ℓ_n. Then

    G_n = (1/(m·N)) Σ_j d_nj · ε_nj        estimates ∇_{z_n} of the batch-mean loss, and
    ĝ_W = Σ_n G_n x_nᵀ                     (a conv: the matching correlation, ``conv_correlation``)

is unbiased for ∇_W when the ε are independent with E[ε εᵀ] = I. Its noise scales with the
activations a sample has at the site (divided by the batch, over which the noise averages),
not with the layer's weights.

Sites (``Site``): a linear layer's output; a conv's output; and, for a conv read only
by a BatchNorm, the BatchNorm's output: ℓ_n then depends on sample n's perturbed value alone
even in train mode, and the estimate reaches γ, β and the conv through BatchNorm's closed-form
transpose (its batch coupling included exactly). A site is unbiased only if nothing after it
in the module couples samples, so a layer followed by a train-mode BatchNorm later in its module
is weight-perturbed instead.

**Support masks.** Entries of G where ∇_z ℓ_n is zero by the site's readers (a ReLU's inactive
side, the non-maxima of a tiled max-pool window) carry noise and no signal; ``site_support`` marks
the entries that can reach the loss and G is multiplied by it. Any superset of the true support
keeps the estimate unbiased (E[d ε_p] = ∇_p ℓ = 0 off it), so ties in a window may all be kept.

``plan`` chooses per layer (``perturbation_rule``): activity where the site draws fewer numbers
per sample (activations, or cells), divided by the batch, than the layer has weights; weight perturbation
otherwise (and for every layer with no site form: norms alone, embeddings).

**Channel-group losses.** A local head may hold one classifier per channel group of the module's
output (exporter/local_heads.py), each with its own loss; the local loss is their mean. A site
whose channels reach the head only through channelwise layers (activations, BatchNorm, pooling)
moves only its own group's loss, so its G takes each group's d from that group alone
(``site_gradient`` with ``groups``): its noise spans one group's activations, not all of them.
Other sites take the mean over the groups, the derivative of the whole local loss.

**Cell tangents.** A site read only through a flat-sided activation, a tiled max-pool and a head's
grid pooling has a local gradient that is constant over each grid cell's support: per sample and
d, one number per cell. It is perturbed along cell-constant tangents (``cell_noise``: Hadamard rows
times random signs, so E[ξξᵀ] = I, and exact when m is a multiple of the Hadamard order), each
cell's estimate shared by the cell's support (``cell_gradient``); the tangent enters at the pool
(``PooledTangent``).

**Channel passes at a linear.** A feature-map site whose channels stay apart up to the linear that
makes the logits (channelwise layers, then a flatten: the cnn's last block and its true loss) has
the same freedom with one loss: a tangent pass per channel (ε on that channel alone) is an
unbiased forward gradient for that channel's part of G, with noise from that channel's activations
only. The passes need no extra work: up to the linear they are the joint pass, read channel by
channel, and at the linear each channel's share of the tangent sum is kept apart (``channel_d``).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .program import ActivityPlan, Node, Site, readers
from .rules.core import RuleContext
from .rules.layers import bn_primal, channel_mean, conv_correlation
from .rules.loss import cross_entropy, residual

PERTURB_CHOICES = ("activity", "weight")
#: the perturbation group of the weight-perturbed weights (the others are named by their site node)
WEIGHTS = "@weights"


class PlanError(ValueError):
    """A requested perturbation the module cannot have (names the layer and why)."""


def candidate_sites(nodes: list[Node], bn_train: bool) -> list[Site]:
    """Every layer of ``nodes`` that can be activity-perturbed without bias, as a site."""
    reads = readers(nodes)
    index = {n.name: i for i, n in enumerate(nodes)}
    later_bn = {n.name for n in nodes if bn_train and n.op == "batchnorm2d"}
    sites = []
    for n in nodes:
        if not n.params:
            continue
        if n.op == "linear":
            site = Site(n.name, [n.name], list(n.shape))
        elif n.op == "conv2d":
            users = reads.get(n.name, [])
            if len(users) == 1 and users[0].op == "batchnorm2d" and "weight" in users[0].params:
                site = Site(users[0].name, [n.name, users[0].name], list(users[0].shape))
            else:
                site = Site(n.name, [n.name], list(n.shape))
        else:
            continue
        at = index[site.node]
        if any(index[b] > at for b in later_bn):
            continue  # a train-mode BatchNorm after the site couples the samples: d would be biased
        sites.append(site)
    return sites


def layer_weights(nodes: list[Node], site: Site) -> int:
    by_name = {n.name: n for n in nodes}
    return sum(by_name[layer].weights for layer in site.layers)


def perturbation_rule(noise: int, weights: int, batch: int) -> str:
    """Activity where a site's noise per sample / batch < the layer's weights, else weight.

    Weight perturbation's relative variance grows with the weights P it perturbs together
    ((P + 2)/m for Gaussian u); activity perturbation's with the numbers D drawn per sample at the
    site (its activations; a cell site's cells), averaged over the batch's N independent samples
    (≈ D/(m·N) when per-sample gradients agree).
    """
    return "activity" if noise / batch < weights else "weight"


def noise_size(site: Site, nodes: list[Node]) -> int:
    """The numbers drawn per sample at a site: one per cell at a cell site, else one per activation."""
    cells = cell_shape(site, nodes, support_chain(site, nodes))
    return math.prod(site.shape) // (cells[0] * cells[1] if cells else 1)


def plan(nodes: list[Node], aux: list[Node], batch: int, bn_train: bool,
         choose: Mapping[str, str] | None = None) -> ActivityPlan:
    """A module's perturbation plan; ``choose`` maps layer names to ``activity``/``weight`` and
    overrides the rule for them (a layer not in the module is ignored, so one map serves all modules)."""
    choose = dict(choose or {})
    for layer, how in choose.items():
        if how not in PERTURB_CHOICES:
            raise PlanError(f"perturbation for {layer!r} must be one of {PERTURB_CHOICES}, got {how!r}")
    everything = nodes + aux
    sites = {s.layers[0]: s for s in candidate_sites(everything, bn_train)}
    by_name = {n.name: n for n in everything}
    chosen: list[Site] = []
    for layer, how in choose.items():
        if how == "activity" and layer in by_name and layer not in sites and not any(
                layer in s.layers for s in sites.values()):
            n = by_name[layer]
            why = ("it has no weights" if not n.params else
                   "a train-mode BatchNorm after it in its module couples the samples" if n.op in ("linear", "conv2d")
                   else f"{n.op} layers have no activity form (linear and conv2d do)")
            raise PlanError(f"layer {layer!r} cannot be activity-perturbed: {why}")
    for site in sites.values():
        given = [choose[layer] for layer in site.layers if layer in choose]
        how = given[0] if given else perturbation_rule(noise_size(site, everything), layer_weights(everything, site),
                                                       batch)
        if how == "activity":
            chosen.append(site)
    covered = {layer for s in chosen for layer in s.layers}
    weight_perturbed = [q for n in everything if n.name not in covered for q in n.params.values()]
    return ActivityPlan(chosen, list(dict.fromkeys(weight_perturbed)))


def groups(plan: ActivityPlan) -> list[str]:
    """The perturbation groups in tangent-slot order: the weight-perturbed weights (if any), then
    each site. Group i owns tangent slots [i·m, (i+1)·m) of the pass and its own d."""
    return ([WEIGHTS] if plan.weight_perturbed else []) + [s.node for s in plan.sites]


def in_slots(ops: Any, t: Any, group: int, count: int, axis: int = 0) -> Any:
    """A group's tangents (m along ``axis``) placed in its slots among ``count`` groups, zeros elsewhere."""
    if count == 1:
        return t
    zero = ops.mul(t, ops.const(0.0))
    return ops.concat([zero] * group + [t] + [zero] * (count - group - 1), axis)


def group_d(ops: Any, d: Any, group: int, m: int) -> Any:
    """Rows [group·m, (group+1)·m) of the pass's (G·m, N) per-sample derivatives."""
    return ops.slice(d, 0, group * m, (group + 1) * m, 1)


def site_gradient(ops: Any, d: Any, eps: Any, m: int, groups: int = 1, mean_of_groups: bool = True) -> Any:
    """G = Σ_j d_nj·ε_nj / (m·N): the estimate of ∇ of the batch-mean loss at the site, (N, ...).
    ``d`` is (m, N), ``eps`` (m, N, ...) (the artifact contract's layout). With ``groups`` > 1, ``d``
    is (m, N, groups), each group's own derivative, and ε's channels split into that many groups:
    group c's part of G is Σ_j d_ncj·ε_nj / (m·N·groups) when the local loss is the mean of the
    groups' losses (a grouped head), Σ_j d_ncj·ε_nj / (m·N) when the d are parts of one loss's
    derivative (``channel_d``, ``mean_of_groups`` False)."""
    shape = ops.shape(eps)
    if groups == 1:
        dd = ops.reshape(d, [m, -1, *([1] * (len(shape) - 2))])
        total = ops.sum(ops.mul(dd, eps), [0], keepdims=False)
    else:
        dd = ops.reshape(d, [m, -1, groups, 1])
        split = ops.reshape(eps, [m, -1, groups, math.prod(shape[2:]) // groups])
        total = ops.reshape(ops.sum(ops.mul(dd, split), [0], keepdims=False), [-1, *shape[2:]])
    share = groups if mean_of_groups else 1
    return ops.div(total, ops.mul(ops.batch_count(total, 1), ops.const(float(m * share))))


def loss_groups(aux: list[Node]) -> int:
    """How many classifiers, each with its own loss, a local head holds (1 without a grouped head)."""
    fc = [n for n in aux if n.op == "conv2d"]
    return fc[0].attrs["groups"] if fc else 1


#: layers that keep channels apart: a site read only through them reaches one head group per channel
_CHANNELWISE = {"relu", "relu6", "hardtanh", "leaky_relu", "gelu", "silu", "sigmoid", "tanh", "batchnorm2d",
                "maxpool2d", "avgpool2d", "adaptive_avgpool2d", "global_avgpool", "dropout"}


def site_groups(site: Site, nodes: list[Node], aux: list[Node]) -> int:
    """The head groups a site's channels split into: the head's when every path from the site to
    the grouped head is channelwise (or the site is the head), else 1 (its d is the whole loss's)."""
    groups = loss_groups(aux)
    if groups == 1:
        return 1
    fc = next(n for n in aux if n.op == "conv2d")
    if site.node == fc.name:
        return groups
    end = _past_channelwise(site.node, readers(nodes + aux))
    return groups if end is not None and end.name == fc.name else 1


def _past_channelwise(name: str, reads: Mapping[str, list[Node]]) -> Node | None:
    """The first layer after ``name`` that is not channelwise, where one chain of sole readers leads
    there; None where the path branches or ends first."""
    while True:
        users = reads.get(name, [])
        if len(users) != 1:
            return None
        if users[0].op not in _CHANNELWISE:
            return users[0]
        name = users[0].name


def channel_reader(site: Site, nodes: list[Node]) -> Node | None:
    """The linear that makes the logits, when it reads the feature-map site's channels apart: every
    path from the site reaches it through channelwise layers and then a flatten; else None."""
    if len(site.shape) != 3:
        return None
    reads = readers(nodes)
    flat = _past_channelwise(site.node, reads)
    if flat is None or flat.op not in ("flatten", "reshape") or len(flat.shape) != 1:
        return None  # a flatten (row-major) holds channel c's entries as one block
    after, last = reads.get(flat.name, []), nodes[-1]
    return last if len(after) == 1 and after[0].name == last.name and last.op == "linear" else None


def channel_d(ops: Any, xd: Any, weight: Any, z: Any, onehot: Any, channels: int) -> Any:
    """Each channel's own d, (m, N, channels), for a site read apart by a linear (``channel_reader``).

    Up to the linear, a tangent on one channel stays in that channel, so a pass per channel would
    give ż_c = W_c·ẋ_c at the logits, and d_c the loss's derivative along it; Σ_c d_c is the joint
    pass's d. The joint pass already holds every ẋ_c: the linear's tangent sum is split by the
    channel each input came from, and each share dotted with the loss's residual softmax(z) − Y.
    ``xd`` is the linear's input tangent along the site's own slots in the rules' layout
    (N, m, C·hw), ``weight`` the linear's (K, C·hw), ``z`` the logits (N, K)."""
    _, m, f = ops.shape(xd)
    k, hw = ops.shape(weight)[0], f // channels
    per_channel = ops.reshape(ops.transpose(ops.reshape(xd, [-1, m, channels, hw]), [2, 0, 1, 3]),
                              [channels, -1, hw])  # (C, N·m, hw)
    w = ops.transpose(ops.reshape(weight, [k, channels, hw]), [1, 2, 0])  # (C, hw, K)
    parts = ops.reshape(ops.matmul(per_channel, w), [channels, -1, m, k])  # (C, N, m, K)
    d = ops.sum(ops.mul(parts, ops.reshape(residual(ops, z, onehot), [1, -1, 1, k])), [3], keepdims=False)
    return ops.transpose(d, [2, 1, 0])  # (C, N, m) -> (m, N, C)


def group_losses(ops: Any, z: Any, zd: Any, onehot: Any, groups: int) -> tuple[Any, Any]:
    """The local loss (mean over samples and head groups) and each sample's and group's own
    derivative along each tangent, (m, N, groups); ``z`` holds the groups' logits side by side."""
    if groups > 1:
        k = ops.shape(onehot)[1]
        onehot = ops.reshape(ops.concat([ops.reshape(onehot, [-1, 1, k])] * groups, 1), [-1, k])
        z, zd = ops.reshape(z, [-1, k]), ops.reshape(zd, [ops.shape(zd)[0], -1, k])
    loss, d = cross_entropy(ops, z, zd, onehot, True, per_sample=True)
    return loss, ops.reshape(d, [ops.shape(d)[0], -1, groups])


#: piecewise-linear activations with flat parts: op -> the (lo, hi) bounds of their sloped part
_SLOPED = {"relu": lambda a: (0.0, None), "relu6": lambda a: (0.0, 6.0),
           "hardtanh": lambda a: (a["min"], a["max"])}


def support_chain(site: Site, nodes: list[Node]) -> list[Node]:
    """The site's sole-reader chain that ``site_support`` reads: a flat-sided activation, then
    optionally a max-pool whose windows tile its input; empty when the site has neither."""
    reads = readers(nodes)
    chain: list[Node] = []
    users = reads.get(site.node, [])
    if len(users) == 1 and users[0].op in _SLOPED:
        chain.append(users[0])
        after = reads.get(users[0].name, [])
        if len(after) == 1 and after[0].op == "maxpool2d" and _tiles(after[0], users[0].shape):
            chain.append(after[0])
    return chain


def _tiles(pool: Node, in_shape: list[int]) -> bool:
    """The pool's windows cover its input exactly once (so y upsampled lines up with the input)."""
    a = pool.attrs
    kh, kw = a["kernel"]
    return (list(a["stride"]) == [kh, kw] and list(a["padding"]) == [0, 0] and list(a["dilation"]) == [1, 1]
            and [pool.shape[1] * kh, pool.shape[2] * kw] == list(in_shape[1:]))


def site_support(ops: Any, chain: list[Node], z: Any, values: Mapping[str, Any]) -> Any | None:
    """1 where the site's value z (N, ...) can move the loss through ``chain``, else 0; None: everywhere.

    The activation's sloped part, times, under a tiled max-pool, the window maxima (x == upsampled
    y: ties all kept, a superset of the first maximum the pool's derivative picks)."""
    if not chain:
        return None
    act = chain[0]
    support = ops.step_mask(z, *_SLOPED[act.op](act.attrs))
    if len(chain) == 2:
        kh, kw = chain[1].attrs["kernel"]
        peaks = ops.eq_mask(values[act.name], ops.upsample(values[chain[1].name], kh, kw))
        support = ops.mul(support, peaks)
    return support


def cell_pool(site: Site, nodes: list[Node], chain: list[Node]) -> Node | None:
    """What makes a cell site: an average pool that alone reads the site after ``chain``
    (``support_chain``) and whose grid divides the map, so every supported entry of a cell
    reaches the head with the same weight; None for other sites."""
    last = chain[-1] if chain else None
    users = readers(nodes).get(last.name if last else site.node, [])
    if len(site.shape) != 3 or len(users) != 1 or users[0].op not in ("adaptive_avgpool2d", "global_avgpool"):
        return None
    h, w = (last.shape if last else site.shape)[1:]
    gh, gw = users[0].shape[1:]
    return None if h % gh or w % gw else users[0]


def cell_shape(site: Site, nodes: list[Node], chain: list[Node]) -> tuple[int, int] | None:
    """A cell site's cells at the site, (rows, cols); None for other sites."""
    pool = cell_pool(site, nodes, chain)
    if pool is None:
        return None
    h, w = (chain[-1].shape if chain else site.shape)[1:]
    gh, gw = pool.shape[1:]
    kh, kw = chain[1].attrs["kernel"] if len(chain) == 2 else (1, 1)
    return h // gh * kh, w // gw * kw


@dataclass(frozen=True)
class PooledTangent:
    """A cell site's tangent as its pool's output sees it, added there instead of at the site.

    Carried through the activation, the max-pool and the pool, U(ξ) arrives as ξ times the share
    of the pool's inputs in each cell through which the site moves (the activation's sloped part
    at the window maxima; the pool's input alone tells it), so the pass needs no full-size tangent
    from the site to the head: a speed form (the oracle carries U(ξ) itself)."""

    xi: Any  # (N, G·m, C, rows, cols): the rules' layout, in the site's slots
    chain: tuple[Node, ...]

    def at(self, ops: Any, x: Any) -> Any:
        """The tangent to add to the pool's output, given the pool's input x (N, C, H, W)."""
        if not self.chain:
            return self.xi
        *_, c, h, w = ops.shape(x)
        gh, gw = ops.shape(self.xi)[-2:]
        act = self.chain[0]
        moving = ops.step_mask(x, *_SLOPED[act.op](act.attrs))
        share = ops.div(cell_sum(ops, moving, (h // gh, w // gw)), ops.const(float(h // gh * (w // gw))))
        return ops.mul(self.xi, ops.reshape(share, [-1, 1, c, gh, gw]))


def cell_sum(ops: Any, t: Any, cells: tuple[int, int]) -> Any:
    """Sums of ``t``'s (…, N, C, H, W) entries over each (rows × cols) cell: (…, N, C, H/rows, W/cols)."""
    *lead, c, h, w = ops.shape(t)
    ch, cw = cells
    lead[-1] = -1  # the batch
    split = ops.reshape(t, [*lead, c, h // ch, ch, w // cw, cw])
    n = len(lead) + 1
    return ops.sum(split, [n + 1, n + 3], keepdims=False)


def cell_directions(m: int, cells: int) -> np.ndarray:
    """(m, cells) of ±1: rows j mod P of the P × P Sylvester-Hadamard matrix (P the least power of
    two ≥ ``cells``), its first ``cells`` columns. The columns are orthogonal over every P rows."""
    h = np.ones((1, 1), np.float32)
    while len(h) < cells:
        h = np.block([[h, h], [h, -h]])
    return h[np.arange(m) % len(h), :cells]


def cell_noise(ops: Any, eps: Any, cells: tuple[int, int], m: int, groups: int) -> Any:
    """ξ_j = σ ⊙ ``cell_directions``_j, (m, N, C, rows, cols): the signs σ are ε's first tangent at
    each cell's first entry; the directions run over the cells that share one d (a group's
    channels' cells, ``groups`` as in ``site_gradient``). E[ξ_j ξ_jᵀ] = I for any m (the signs are
    independent across cells); with m a multiple of P, Σ_j ξ_j ξ_jᵀ = m·I exactly, so the estimate
    of a gradient that lies in the cells' span carries no noise at all."""
    *_, c, h, w = ops.shape(eps)
    grid = (h // cells[0], w // cells[1])
    signs = ops.strided_hw(ops.slice(eps, 0, 0, 1, 1), (0, 0), cells, grid)  # (1, N, C, rows, cols)
    return ops.mul(signs, ops.const(cell_layout(m, c, grid, groups)))


def cell_layout(m: int, channels: int, grid: tuple[int, int], groups: int) -> np.ndarray:
    """``cell_directions`` over each group's (channels / groups) × rows × cols cells, the same for
    every group: (m, 1, C, rows, cols)."""
    per_group = channels // groups
    dirs = cell_directions(m, per_group * grid[0] * grid[1]).reshape(m, 1, per_group, *grid)
    return np.tile(dirs, (1, 1, groups, 1, 1))


def cell_gradient(ops: Any, c_hat: Any, support: Any | None, cells: tuple[int, int], chain: list[Node]) -> Any:
    """G from the cells' estimates (N, C, rows, cols), spread over each cell's support.

    Every supported entry of a cell moves the loss alike, so each takes the cell's estimate over
    the number of max-pool windows through which the cell moves it. Tied maxima of a window share
    their window's part (the pool passes one tangent per window: a cell tangent cannot tell them
    apart; their input patches are alike where the map is flat, where ties happen)."""
    ch, cw = cells
    if support is None:
        return ops.upsample(ops.div(c_hat, ops.const(float(ch * cw))), ch, cw)
    if len(chain) == 2:
        kh, kw = chain[1].attrs["kernel"]
        per_window = ops.mul(ops.avgpool(support, [kh, kw], [kh, kw], [0, 0], False, True),
                             ops.const(float(kh * kw)))
        support = ops.div(support, ops.clip(ops.upsample(per_window, kh, kw), 1.0, float(kh * kw)))
    count = ops.clip(cell_sum(ops, support, cells), 1.0, float(ch * cw))
    return ops.mul(ops.upsample(ops.div(c_hat, count), ch, cw), support)


def weight_estimate(ops: Any, d: Any, u: Any, m: int) -> Any:
    """ĝ = Σ_j d̄_j·u_j / m with d̄_j = mean_n d_nj: weight perturbation inside the same pass."""
    shape = list(ops.shape(u)[1:])
    dbar = ops.reshape(ops.mean(d, [1], keepdims=False), [1, m])
    flat = ops.matmul(dbar, ops.reshape(u, [m, -1]))
    return ops.reshape(ops.div(flat, ops.const(float(m))), shape)


def site_estimates(ops: Any, site: Site, nodes: Mapping[str, Node], g: Any, values: Mapping[str, Any],
                   params: Mapping[str, Any], stats: Mapping[str, Any], ctx: RuleContext) -> dict[str, Any]:
    """Weight estimates (by qualified name) of the layers a site covers, from its G."""
    out: dict[str, Any] = {}
    first = nodes[site.layers[0]]
    if first.op == "linear":
        x = values[first.inputs[0]]
        f_in, f_out = ops.shape(x)[-1], ops.shape(g)[-1]
        rows_g, rows_x = ops.reshape(g, [-1, f_out]), ops.reshape(x, [-1, f_in])
        out[first.params["weight"]] = ops.matmul(ops.transpose(rows_g, [1, 0]), rows_x)
        if "bias" in first.params:
            out[first.params["bias"]] = ops.sum(rows_g, [0], keepdims=False)
        return out
    if len(site.layers) == 2:
        bn = nodes[site.layers[1]]
        g = _bn_transpose(ops, bn, values[first.name], g, params, stats, ctx, out)
    x = values[first.inputs[0]]
    if "pads" in first.attrs:
        x = ops.pad(x, first.attrs["pads"], 0.0)
    w = params[first.params["weight"]]
    out[first.params["weight"]] = conv_correlation(ops, x, g, first.attrs, tuple(ops.shape(w)[2:]),
                                                   first.attrs["groups"])
    if "bias" in first.params:
        out[first.params["bias"]] = _channel_sum(ops, g)
    return out


def _channel_sum(ops: Any, t: Any) -> Any:
    return ops.reshape(ops.sum(ops.sum(t, [-2, -1]), [0]), [ops.shape(t)[1]])


def _bn_transpose(ops: Any, bn: Node, z: Any, g: Any, params: Mapping[str, Any], stats: Mapping[str, Any],
                  ctx: RuleContext, out: dict[str, Any]) -> Any:
    """BatchNorm's estimates (γ, β) from G at its output, and G carried back to its input z.

    With x̂ = (z − μ)·r: ĝ_γ = Σ G·x̂, ĝ_β = Σ G. Train mode (μ, r from the batch):
    G_z = r·(G_x̂ − mean(G_x̂) − x̂·mean(G_x̂·x̂)) with G_x̂ = γ·G; frozen: G_z = γ·r·G.
    """
    p = {role: params[q] for role, q in bn.params.items()}
    s = {role: stats[q] for role, q in bn.buffers.items()}
    _, _, base, a, r, mu = bn_primal(ops, bn, z, p, s, ctx)
    xhat = ops.mul(base, r) if ctx.bn_train else ops.mul(ops.sub(base, mu), r)
    if "weight" in bn.params:
        out[bn.params["weight"]] = _channel_sum(ops, ops.mul(g, xhat))
    if "bias" in bn.params:
        out[bn.params["bias"]] = _channel_sum(ops, g)
    if not ctx.bn_train:
        return ops.mul(g, a)
    c = ops.shape(z)[1]
    gamma = ops.reshape(p["weight"], [1, c, 1, 1]) if "weight" in p else None
    gx = g if gamma is None else ops.mul(g, gamma)
    centred = ops.sub(gx, channel_mean(ops, gx))
    return ops.mul(ops.sub(centred, ops.mul(xhat, channel_mean(ops, ops.mul(gx, xhat)))), r)
