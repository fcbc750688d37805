"""The program: a flat, JSON-serialisable list of layer nodes in execution order, cut into modules.

The program is the one description of a model that everything downstream reads: the splitter
cuts it, the ONNX emitter and the torch backend interpret it with the dual rules, and the
manifest stores it, so a device (or the torch backend) needs no Python model class. Tracing a
torch model into a program is host-side work (``asyncfgd.exporter.trace``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Node:
    name: str  # layer's qualified name in the model (or fx name for functional ops)
    op: str  # rule name in rules.RULES
    inputs: list[str]  # value names: "input" or earlier nodes' names
    attrs: dict[str, Any] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)  # local role -> qualified weight name
    buffers: dict[str, str] = field(default_factory=dict)  # local role -> qualified buffer name
    shape: list[int] = field(default_factory=list)  # output shape without the batch dim
    flops: int = 0  # forward multiply-adds per sample (the splitter's per-sample cost)
    weights: int = 0  # trainable elements (the splitter's per-weight cost: tangent draw, update)
    scopes: list[str] = field(default_factory=list)  # enclosing module paths, outermost first
    source: str = ""  # the traced torch operation this node computes (part of): the oracle runs that
    batched: bool = True  # False: the value does not depend on the data (batch axis 1, rules/core.py)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Node:
        return Node(**d)


def node_flops_dual(node: Node, tangents: int = 1) -> int:
    """Approximate multiply-adds per sample of the dual (y, ẏ) step with m tangents.

    Layers with weights compute y = W x and each ẏ_j = W ẋ_j + U_j x: (1 + 2m)× the forward;
    the others push m tangents through a fixed (linearised) map: (1 + m)×.
    """
    return node.flops * ((1 + 2 * tangents) if node.params else (1 + tangents))


#: an input name that reads the module's input value, for ops that need only its batch size
BATCH_REF = "@batch"


def readers(nodes: list[Node]) -> dict[str, list[Node]]:
    """Value name -> the nodes that read it, in program order."""
    out: dict[str, list[Node]] = {}
    for n in nodes:
        for i in n.inputs:
            out.setdefault(i, []).append(n)
    return out


def weight_names(nodes: list[Node]) -> list[str]:
    """Weights the nodes read, each once, in order of first use."""
    return list(dict.fromkeys(q for n in nodes for q in n.params.values()))


def stat_names(nodes: list[Node]) -> list[str]:
    return list(dict.fromkeys(q for n in nodes for q in n.buffers.values()))


@dataclass
class Site:
    """Where activity perturbation adds its noise ε: the output of ``node``, whose local
    gradient estimate forms the weight estimates of ``layers`` (runtime/dual/activity.py)."""

    node: str  # the program node whose output is perturbed (a linear, a conv, or the BatchNorm after one)
    layers: list[str]  # the nodes whose weights the site estimates: [linear], [conv] or [conv, batchnorm]
    shape: list[int]  # ε's per-sample shape (the node's output shape)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ActivityPlan:
    """How a module is perturbed under the local-activity method: the activity sites, and the
    weights perturbed directly (weight perturbation) because that has the lower variance there
    or the layer has no site form."""

    sites: list[Site]
    weight_perturbed: list[str]  # qualified weight names

    def to_dict(self) -> dict[str, Any]:
        return {"sites": [s.to_dict() for s in self.sites], "weight_perturbed": list(self.weight_perturbed)}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> ActivityPlan:
        return ActivityPlan([Site(**s) for s in d["sites"]], list(d["weight_perturbed"]))


@dataclass
class ModuleSpec:
    """One pipeline module: a contiguous run of the program, reading one value."""

    index: int
    nodes: list[Node]
    input: str  # value name the module consumes ("input" for the first module)
    aux: list[Node] = field(default_factory=list)  # local-loss head (exporter/local_heads.py), if exported
    activity: ActivityPlan | None = None  # the local-activity method's perturbation, if exported

    @property
    def output(self) -> str:
        return self.nodes[-1].name

    def node(self, name: str) -> Node:
        """The module's (or its head's) node called ``name``."""
        return next(n for n in self.nodes + self.aux if n.name == name)

    @property
    def cost(self) -> int:
        """Dual multiply-adds per sample with one tangent (the manifest's ``cost_flops``)."""
        return sum(node_flops_dual(n) for n in self.nodes)


def module_specs(manifest: dict[str, Any]) -> list[ModuleSpec]:
    """Rebuild the split programs from a manifest (for the torch backend and validation)."""
    return [ModuleSpec(m["index"], [Node.from_dict(n) for n in m["program"]], m["input"],
                       [Node.from_dict(n) for n in m.get("aux_program", [])],
                       ActivityPlan.from_dict(m["activity"]) if m.get("activity") else None)
            for m in manifest["modules"]]
