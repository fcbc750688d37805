"""Cut a program into K pipeline modules at points where exactly one value crosses.

A valid cut sits between two nodes where only one tensor is live (so residual blocks, whose
skip connection keeps two tensors live, are never cut inside). Automatic balancing minimises the
largest module cost, where cost is the dual step's multiply-adds (3× forward FLOPs for layers
with weights, 2× for the rest). FLOPs rather than parameter counts: a pipeline's throughput is
set by its slowest stage's *compute*, and parameter counts grossly overweight late, wide layers
with small feature maps (ResNet-18's layer4 holds 75% of the weights but ~25% of the FLOPs).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .program import Node, node_flops_dual


class SplitError(ValueError):
    """The requested split is impossible; the message says why and what would work."""


@dataclass
class ModuleSpec:
    index: int
    nodes: list[Node]
    input: str  # value name the module consumes ("input" for the first module)
    aux: list[Node] = field(default_factory=list)  # local-loss head (local_heads.py), if exported

    @property
    def output(self) -> str:
        return self.nodes[-1].name

    @property
    def cost(self) -> int:
        return sum(node_flops_dual(n) for n in self.nodes)


def cut_points(program: list[Node]) -> list[int]:
    """Indices i such that a module may start at program[i] (one value live across the cut)."""
    last_use: dict[str, int] = {}
    for i, n in enumerate(program):
        for v in n.inputs:
            last_use[v] = i
    residual = {n.scopes[-1] for n in program if n.op == "add" and n.scopes}
    points = []
    for i in range(1, len(program)):
        live = {v for v, j in last_use.items() if j >= i and _defined_before(program, v, i)}
        inside = residual & set(program[i - 1].scopes) & set(program[i].scopes)
        if live == {program[i - 1].name} and not inside:
            points.append(i)
    return points


def _defined_before(program: list[Node], value: str, i: int) -> bool:
    return value == "input" or any(n.name == value for n in program[:i])


def split_program(program: list[Node], modules: int | None = None, at: list[str] | None = None) -> list[ModuleSpec]:
    """Split by count (balanced by dual FLOPs) or at named layers (each name starts a module)."""
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
                                 f"{', '.join(program[i].name for i in points[:40])}")
            starts.append(idx)
        if sorted(set(starts)) != starts:
            raise SplitError("cut points must be distinct and in the model's order")
    else:
        k = modules or 1
        if k < 1:
            raise SplitError("the number of modules must be at least 1")
        if k - 1 > len(points):
            raise SplitError(f"cannot split into {k} modules: this model has only {len(points) + 1} "
                             f"uncuttable segments (residual blocks are never cut inside)")
        starts = _balanced(program, points, k)
    bounds = [0, *starts, len(program)]
    return [ModuleSpec(i, program[a:b], "input" if a == 0 else program[a - 1].name)
            for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]


def _balanced(program: list[Node], points: list[int], k: int) -> list[int]:
    """Choose k−1 cut points minimising the largest module cost (exact DP over cut points)."""
    costs = [node_flops_dual(n) for n in program]
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    cand = [0, *points, len(program)]
    n = len(cand)
    inf = float("inf")
    # best[j][i]: minimal max-cost covering program[:cand[i]] with j modules
    best = [[inf] * n for _ in range(k + 1)]
    back = [[-1] * n for _ in range(k + 1)]
    best[0][0] = 0
    for j in range(1, k + 1):
        for i in range(1, n):
            for h in range(i):
                if best[j - 1][h] == inf:
                    continue
                v = max(best[j - 1][h], prefix[cand[i]] - prefix[cand[h]])
                if v < best[j][i]:
                    best[j][i], back[j][i] = v, h
    starts, i = [], n - 1
    for j in range(k, 0, -1):
        i = back[j][i]
        starts.append(cand[i])
    return sorted(starts[:-1])
