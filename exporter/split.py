"""Cut a program into K pipeline modules at points where exactly one value crosses.

A valid cut sits between two nodes where only one tensor is live (so residual blocks, whose
skip connection keeps two tensors live, are never cut inside). Automatic balancing minimises the
largest module's step cost (``StepCost``): the dual run, batch × (dual multiply-adds + a cost
per output element, since ONNX Runtime's element-wise ops take far longer per element than a
conv takes per multiply-add), plus the work every weight costs whatever the batch: drawing its
tangent (a second time at update in delayed, non-last modules, which regenerate instead of
storing) and the update g = d·u + Adam.
Neither term alone balances: FLOPs ignore that ResNet-18's layer4 holds 75% of the weights but
~25% of the FLOPs, which makes the last module the bottleneck at small batches (per-weight work
is half its step at batch 8); weight counts would starve the early, compute-heavy layers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from asyncfgd.runtime.dual.program import BATCH_REF, ModuleSpec, Node, node_flops_dual

#: costs in dual multiply-add equivalents on one CPU thread, from ``scripts/split_costs.py`` on the
#: development x86 host (ORT, batch 8 and 64). Set from its first version: a gaussian tangent draw
#: 10.5 ns and the update 2.1 ns per weight against 23.5 ps per dual MAC, 65-90 MACs per output
#: element. Since the Box-Muller draw (runtime/perturb.py) a draw measures 3.4 ns alone (155 MACs,
#: quiet machine, 2026-11-25; update 91, elements 130), but DRAW_MACS stays at 450 on end-to-end
#: evidence: at 160 ResNet-18's batch-8 cut moves from layer3.1 to layer3.0 and the measured busy
#: times get worse (195 / 244 ms per step instead of 211 / 186-191): in a running pipeline the
#: per-weight work costs more than alone (both modules share the GIL and the memory bus). The cuts
#: these constants choose were measured (docs/performance.md). Another device moves the balance
#: point, not the principle.
DRAW_MACS = 450
UPDATE_MACS = 90
ELEMENT_MACS = 80


@dataclass(frozen=True)
class StepCost:
    """One module's pipeline step in dual multiply-add equivalents (see the module docstring)."""

    batch: int = 64
    tangents: int = 1

    def __post_init__(self) -> None:
        if self.batch < 1 or self.tangents < 1:
            raise SplitError(f"balancing needs batch >= 1 and tangents >= 1, got {self.batch} and {self.tangents}")

    def per_sample(self, node: Node) -> float:
        """Dual multiply-adds plus element-wise work (primal + m tangents: (1 + m)/2 of m = 1's)."""
        elements = math.prod(node.shape)
        return node_flops_dual(node, self.tangents) + ELEMENT_MACS * elements * (1 + self.tangents) / 2

    def combine(self, per_sample: float, weights: float, last: bool) -> float:
        """A module's step: ``per_sample`` summed over its nodes, ``weights`` its trainable elements."""
        draws = self.tangents * (1 if last else 2)
        return self.batch * per_sample + weights * (draws * DRAW_MACS + UPDATE_MACS)


class SplitError(ValueError):
    """The requested split is impossible; the message says why and what would work."""


def cut_points(program: list[Node]) -> list[int]:
    """Indices i such that a module may start at program[i]: one per-sample value is live across
    the cut, no weight is read on both sides, the cut is not inside one traced operation's nodes
    (an attention layer) nor inside a residual block."""
    defined = {n.name: i for i, n in enumerate(program)}
    last_use: dict[str, int] = {}
    weight_span: dict[str, tuple[int, int]] = {}
    for i, n in enumerate(program):
        for v in n.inputs:
            last_use[v] = i
        for q in n.params.values():
            weight_span[q] = (weight_span.get(q, (i, i))[0], i)
    residual = {n.scopes[-1] for n in program if n.op == "add" and n.scopes}
    points = []
    for i in range(1, len(program)):
        prev, cur = program[i - 1], program[i]
        live = {v for v, j in last_use.items() if j >= i and v != BATCH_REF and defined.get(v, -1) < i}
        inside = residual & set(prev.scopes) & set(cur.scopes)
        one_op = bool(cur.source) and cur.source == prev.source
        shared = any(a < i <= b for a, b in weight_span.values())
        if live == {prev.name} and prev.batched and not inside and not one_op and not shared:
            points.append(i)
    return points


def describe_cuts(program: list[Node], points: list[int]) -> str:
    """The layers a module may start at, for error messages."""
    names = [program[i].name for i in points]
    more = f" (+{len(names) - 40} more)" if len(names) > 40 else ""
    return ", ".join(names[:40]) + more if names else "none"


def split_program(program: list[Node], modules: int | None = None, at: list[str] | None = None,
                  cost: StepCost = StepCost()) -> list[ModuleSpec]:
    """Split by count (balanced by ``cost``) or at named layers (each name starts a module)."""
    points = cut_points(program)
    if at:
        names = [n.name for n in program]
        starts = []
        for name in at:
            if name not in names:
                # a block name like "layer2" means the first node inside it
                inside = [i for i, n in enumerate(program) if n.name.startswith(name + ".")]
                if not inside:
                    raise SplitError(f"cannot cut at '{name}': no layer of that name. Layers: {', '.join(names[:40])}")
                idx = inside[0]
            else:
                idx = names.index(name)
            if idx not in points:
                raise SplitError(f"cannot cut at '{name}': it is inside a residual block or another multi-input "
                                 f"structure (more than one tensor is live there). Valid cut points start at: "
                                 f"{describe_cuts(program, points)}")
            starts.append(idx)
        if sorted(set(starts)) != starts:
            raise SplitError("cut points must be distinct and in the model's order")
    else:
        k = modules or 1
        if k < 1:
            raise SplitError("the number of modules must be at least 1")
        if k - 1 > len(points):
            raise SplitError(f"cannot split into {k} modules: this model has only {len(points)} single-value cut "
                             f"point(s), so at most {len(points) + 1} modules (a module boundary is one tensor; "
                             f"residual blocks, attention layers and values used further on are never cut). "
                             f"Candidate cuts: {describe_cuts(program, points)}")
        starts = _balanced(program, points, k, cost)
    bounds = [0, *starts, len(program)]
    return [ModuleSpec(i, program[a:b], "input" if a == 0 else program[a - 1].name)
            for i, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False))]


def _balanced(program: list[Node], points: list[int], k: int, cost: StepCost) -> list[int]:
    """Choose k−1 cut points minimising the largest module cost (exact DP over cut points).

    Every module must hold weights where the model allows it: when per-weight work dominates
    (tiny models) a weightless module would otherwise "balance" best, which pipelines nothing.
    """
    per_sample, weights = [0.0], [0]
    for n in program:
        per_sample.append(per_sample[-1] + cost.per_sample(n))
        weights.append(weights[-1] + n.weights)
    cand = [0, *points, len(program)]
    inf = float("inf")

    def solve(need_weights: bool) -> tuple[float, list[int]]:
        n = len(cand)
        # best[j][i]: minimal max-cost covering program[:cand[i]] with j modules
        best = [[inf] * n for _ in range(k + 1)]
        back = [[-1] * n for _ in range(k + 1)]
        best[0][0] = 0
        for j in range(1, k + 1):
            for i in range(1, n):
                for h in range(i):
                    a, b = cand[h], cand[i]
                    if best[j - 1][h] == inf or (need_weights and weights[b] == weights[a]):
                        continue
                    v = max(best[j - 1][h], cost.combine(per_sample[b] - per_sample[a], weights[b] - weights[a],
                                                         last=j == k))
                    if v < best[j][i]:
                        best[j][i], back[j][i] = v, h
        starts, i = [], n - 1
        if best[k][i] == inf:
            return inf, []
        for j in range(k, 0, -1):
            i = back[j][i]
            starts.append(cand[i])
        return best[k][n - 1], sorted(starts[:-1])

    value, starts = solve(need_weights=True)
    return starts if value < inf else solve(need_weights=False)[1]
