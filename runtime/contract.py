"""The artifact directory's names (docs/artifacts.md): the one place the exporter and every
backend take them from, so a graph written by one side is always read by the other.

An artifact directory holds ``manifest.json``, ``weights.npz`` and one ONNX graph per (module,
role). A graph's tensors are named by role: inputs ``x``, ``x_dot``, ``labels`` and one per
weight, weight tangent and BatchNorm statistic (``w.<name>``, ``u.<name>``, ``s.<name>``) and,
in the training roles, one per dropout layer (``mask.<node>``) and, in the activity role, one per
activity site (``e.<node>``); outputs ``y``, ``y_dot`` or ``loss``, ``loss_dot``, ``logits``,
``sample_dot`` and ``g.<name>`` (activity role), and ``s_new.<name>`` for the statistics a
training-mode BatchNorm updates.
"""
from __future__ import annotations

FORMAT = "asyncfgd-artifacts"
FORMAT_VERSION = 2  # 2: dropout masks as graph inputs (``mask.<node>``); 1 had no dropout
SUPPORTED_VERSIONS = (1, 2)
OPSET = 17
BN_MODES = ("train", "frozen")  # BatchNorm in training: batch statistics, or running ones
MANIFEST = "manifest.json"
WEIGHTS_FILE = "weights.npz"

# Graph roles. dual: (x, x_dot, w, u[, labels]) -> (y, y_dot) | (loss, loss_dot, logits);
# dual_first: the same with a zero input tangent (no x_dot); forward: the training-mode primal
# (frozen modules); eval: the inference-mode primal (BatchNorm on running statistics); local: a
# non-last module with an auxiliary head, (x, w, u, labels) -> (y, loss, loss_dot, logits);
# activity: the local-activity method, (x, w, u of the weight-perturbed weights, e (activity
# noise), labels) -> (y, loss, sample_dot, logits, g.<weight> estimates).
DUAL = "dual"
DUAL_FIRST = "dual_first"
FORWARD = "forward"
EVAL = "eval"
LOCAL = "local"
ACTIVITY = "activity"
ROLES = (DUAL, DUAL_FIRST, FORWARD, EVAL)  # every module's roles (the first has no DUAL)
TANGENT_ROLES = (DUAL, DUAL_FIRST, LOCAL, ACTIVITY)
MASK_ROLES = (DUAL, DUAL_FIRST, FORWARD, LOCAL, ACTIVITY)  # the training roles: dropout masks are inputs

# Graph inputs and outputs.
X = "x"
X_DOT = "x_dot"
LABELS = "labels"
Y = "y"
Y_DOT = "y_dot"
LOSS = "loss"
LOSS_DOT = "loss_dot"
LOGITS = "logits"
SAMPLE_DOT = "sample_dot"  # (m, N): each sample's own loss derivative per tangent (activity role)
OUTPUTS = (Y, Y_DOT, LOSS, LOSS_DOT, LOGITS, SAMPLE_DOT)

# Per-tensor prefixes.
WEIGHT = "w."
TANGENT = "u."
STAT = "s."
STAT_NEW = "s_new."
MASK = "mask."
NOISE = "e."  # activity noise of a site: (m, N, *site shape)
GRAD = "g."  # a weight's gradient estimate (activity role): the weight's shape
PREFIXES = (WEIGHT, TANGENT, STAT, STAT_NEW, MASK, NOISE, GRAD)


def graph_file(index: int, role: str) -> str:
    return f"module{index}.{role}.onnx"


def weight_input(name: str) -> str:
    return WEIGHT + name


def tangent_input(name: str) -> str:
    return TANGENT + name


def stat_input(name: str) -> str:
    return STAT + name


def mask_input(node: str) -> str:
    """The dropout mask of program node ``node``: (N, *shape), or (N, 1, ...) for drop-path."""
    return MASK + node


def noise_input(site: str) -> str:
    """The activity noise ε of the site at program node ``site``: (m, N, *shape)."""
    return NOISE + site


def grad_output(name: str) -> str:
    return GRAD + name


def estimated_weight(output: str) -> str | None:
    """The weight a graph output estimates the gradient of (``g.<name>`` -> name), else None."""
    return output[len(GRAD):] if output.startswith(GRAD) else None


def stat_output(name: str) -> str:
    return STAT_NEW + name


def updated_stat(output: str) -> str | None:
    """The BatchNorm statistic a graph output updates (``s_new.<name>`` -> name), else None."""
    return output[len(STAT_NEW):] if output.startswith(STAT_NEW) else None


def split_input(name: str) -> tuple[str, str]:
    """A per-tensor graph input's (prefix, tensor name); ("", name) for x, x_dot and labels."""
    for prefix in (WEIGHT, TANGENT, STAT, MASK, NOISE):
        if name.startswith(prefix):
            return prefix, name[len(prefix):]
    return "", name
