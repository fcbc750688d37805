"""Auxiliary heads for the experimental local-loss mode (after Ren et al. 2023).

Each non-last module k gets a small classifier on its output (average pooling to a grid × grid map
when the output is a feature map: global for the local mode, a coarse grid for local-activity, whose
estimates through a train-mode BatchNorm need the spatial variation a global pool averages away;
then flatten and a linear layer to the classes) and a cross-entropy loss. The
module's directional derivative then depends only on its own weights (and its head), so it can
update at once, with no wait for the last module and no staleness. The heads are extra program
nodes with weights named ``aux<k>.fc.weight`` / ``aux<k>.fc.bias``, initialised like nn.Linear
(uniform ±1/√fan_in) from a seeded generator.
"""
from __future__ import annotations

import math

import numpy as np

from asyncfgd.runtime.dual.program import ModuleSpec, Node


def aux_head(mod: ModuleSpec, out_shape: list[int], num_classes: int, grid: int = 1) -> list[Node]:
    """The head's program: (average-pool to grid × grid →) flatten → linear, reading the module's output."""
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
        nodes.append(Node(f"aux{k}.flatten", "flatten", [f"aux{k}.pool"], shape=[features], flops=features))
        prev = f"aux{k}.flatten"
    elif len(out_shape) == 1:
        features = out_shape[0]
    else:
        raise ValueError(f"module {k} output of shape {out_shape} has no auxiliary head (expected C×H×W or F)")
    nodes.append(Node(f"aux{k}.fc", "linear", [prev], params={"weight": f"aux{k}.fc.weight", "bias": f"aux{k}.fc.bias"},
                      shape=[num_classes], flops=features * num_classes, weights=(features + 1) * num_classes))
    return nodes


def init_aux_weights(nodes: list[Node], features: int, num_classes: int, seed: int) -> dict[str, np.ndarray]:
    """nn.Linear's default initialisation, from a generator seeded per head."""
    fc = nodes[-1]
    rng = np.random.default_rng([seed, int(fc.name[3:].split(".")[0])])
    bound = 1.0 / math.sqrt(features)
    return {fc.params["weight"]: rng.uniform(-bound, bound, (num_classes, features)).astype(np.float32),
            fc.params["bias"]: rng.uniform(-bound, bound, (num_classes,)).astype(np.float32)}
