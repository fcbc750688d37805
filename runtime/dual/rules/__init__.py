"""Dual rules: for each op, (y, ẏ) = (f(x; θ), ∂f/∂x·ẋ + ∂f/∂θ·u) written with plain ops.

``core`` holds the table (``RULES``), the layouts and the rule constructors; the other modules
register the rules of one family each. Importing this package registers them all.
"""
from . import activations, layers, pooling, tensor
from .core import RULES, Rule, RuleContext, RuleOut, merge_m, primal, rule, split_m, swap_major
from .loss import cross_entropy

__all__ = ["RULES", "Rule", "RuleContext", "RuleOut", "activations", "cross_entropy", "layers", "merge_m",
           "pooling", "primal", "rule", "split_m", "swap_major", "tensor"]
