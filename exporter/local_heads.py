"""Auxiliary heads for the local-loss methods (after Ren et al. 2023).

Each non-last module k gets a small classifier on its output (average pooling to a grid × grid map
when the output is a feature map: global for the local mode, a coarse grid for local-activity, whose
estimates through a train-mode BatchNorm need the spatial variation a global pool averages away;
then flatten and a linear layer to the classes) and a cross-entropy loss. The
module's directional derivative then depends only on its own weights (and its head), so it can
update at once, with no wait for the last module and no staleness. local-activity's heads on a
feature map hold one classifier per channel (Ren et al.'s channel-group local losses): a grouped
conv whose kernel is the grid, each channel's classes its own loss, so that a site's noise meets
only its own channel's loss (runtime/dual/activity.py). The heads are extra program nodes with
weights named ``aux<k>.fc.weight`` / ``aux<k>.fc.bias``, initialised like nn.Linear (uniform
±1/√fan_in) from a seeded generator.
"""
from __future__ import annotations

import math

import numpy as np

from asyncfgd.runtime.dual.program import ModuleSpec, Node


def aux_head(mod: ModuleSpec, out_shape: list[int], num_classes: int, grid: int = 1,
             groups: int = 1) -> list[Node]:
    """The head's program: (average-pool to grid × grid →) flatten → linear, reading the module's output.

    ``groups`` > 1 (feature maps only; it must divide the channels) splits the head into that many
    classifiers, each reading its own channels' pooled grid: a grouped conv whose kernel is the
    grid, with ``groups`` · classes outputs, each group's classes its own local loss."""
    k, nodes, prev = mod.index, [], mod.output
    if len(out_shape) == 3:
        c, h, w = out_shape
        gh, gw = min(grid, h), min(grid, w)
        if (gh, gw) == (1, 1):
            nodes.append(Node(f"aux{k}.pool", "global_avgpool", [prev], shape=[c, 1, 1], flops=c * h * w))
        else:
            nodes.append(Node(f"aux{k}.pool", "adaptive_avgpool2d", [prev], {"output_size": [gh, gw]},
                              shape=[c, gh, gw], flops=c * h * w))
        features = c * gh * gw
        if groups > 1:
            if c % groups:
                raise ValueError(f"module {k}: {groups} head groups do not divide its {c} channels")
            out = groups * num_classes
            nodes.append(Node(f"aux{k}.fc", "conv2d", [f"aux{k}.pool"],
                              {"stride": [1, 1], "padding": [0, 0], "dilation": [1, 1], "groups": groups},
                              params={"weight": f"aux{k}.fc.weight", "bias": f"aux{k}.fc.bias"},
                              shape=[out, 1, 1], flops=features * num_classes,
                              weights=(features + groups) * num_classes))
            nodes.append(Node(f"aux{k}.flatten", "flatten", [f"aux{k}.fc"], shape=[out], flops=out))
            return nodes
        nodes.append(Node(f"aux{k}.flatten", "flatten", [f"aux{k}.pool"], shape=[features], flops=features))
        prev = f"aux{k}.flatten"
    elif len(out_shape) == 1:
        features = out_shape[0]
    else:
        raise ValueError(f"module {k} output of shape {out_shape} has no auxiliary head (expected C×H×W or F)")
    nodes.append(Node(f"aux{k}.fc", "linear", [prev], params={"weight": f"aux{k}.fc.weight", "bias": f"aux{k}.fc.bias"},
                      shape=[num_classes], flops=features * num_classes, weights=(features + 1) * num_classes))
    return nodes


def init_aux_weights(nodes: list[Node], num_classes: int, seed: int) -> dict[str, np.ndarray]:
    """nn.Linear's (and nn.Conv2d's) default initialisation, uniform ±1/√fan_in, from a generator
    seeded per head."""
    fc = next(n for n in nodes if n.name.endswith(".fc"))
    rng = np.random.default_rng([seed, int(fc.name[3:].split(".")[0])])
    out = fc.shape[0]
    if fc.op == "conv2d":
        groups = fc.attrs["groups"]
        c, gh, gw = next(n for n in nodes if n.name.endswith(".pool")).shape
        shape: tuple[int, ...] = (out, c // groups, gh, gw)
    else:
        shape = (out, (fc.weights // out) - 1)
    bound = 1.0 / math.sqrt(math.prod(shape[1:]))
    return {fc.params["weight"]: rng.uniform(-bound, bound, shape).astype(np.float32),
            fc.params["bias"]: rng.uniform(-bound, bound, (out,)).astype(np.float32)}
