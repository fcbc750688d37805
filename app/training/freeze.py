"""`--freeze-until LAYER`: which leading pipeline modules a run keeps frozen (alpha = 0 throughout).

Freezing acts on whole modules because alpha is per module; no re-export is needed. A frozen
prefix runs its tangent-free ``forward`` graph and never updates (the scheduler skips alpha-0
modules), which is the cheap way to fine-tune only the top of a pretrained network.
"""
from __future__ import annotations

from collections.abc import Sequence

from asyncfgd.runtime.artifacts import ModuleInfo


class FreezeError(ValueError):
    """The layer is unknown, or freezing through it would leave nothing to train."""


def _layers(mod: ModuleInfo) -> list[str]:
    return list(mod.raw["layers"])


def boundaries(modules: Sequence[ModuleInfo]) -> str:
    """``module 0: a .. b; module 1: c .. d`` for error messages."""
    return "; ".join(f"module {m.index}: {_layers(m)[0]} .. {_layers(m)[-1]}" for m in modules)


def _holds(mod: ModuleInfo, layer: str) -> bool:
    """A layer name, or a block name such as ``features.1`` that prefixes layer names."""
    return any(n == layer or n.startswith(layer + ".") for n in _layers(mod))


def _next_layer(modules: Sequence[ModuleInfo], layer: str) -> str | None:
    """The first layer after the last one that ``layer`` names (where a cut would have to go)."""
    names = [n for m in modules for n in _layers(m)]
    last = max(i for i, n in enumerate(names) if n == layer or n.startswith(layer + "."))
    return names[last + 1] if last + 1 < len(names) else None


def frozen_modules(modules: Sequence[ModuleInfo], layer: str | None) -> int:
    """Number of leading modules frozen by ``--freeze-until layer`` (0 without it)."""
    if layer is None:
        return 0
    holding = [m.index for m in modules if _holds(m, layer)]
    if not holding:
        raise FreezeError(f"--freeze-until {layer!r}: the model has no layer of that name. It freezes whole "
                          f"pipeline modules, which hold these layers: {boundaries(modules)}. Name a layer (or "
                          f"block) from that list.")
    n = holding[-1] + 1
    if n == len(modules):
        cut = _next_layer(modules, layer)
        fix = (f"cut the model after it so the layers from {cut} on form a module of their own (--split {cut} "
               f"with --model, or re-export with --split {cut})" if cut else "name an earlier layer")
        raise FreezeError(f"--freeze-until {layer!r} would freeze every module ({boundaries(modules)}), so nothing "
                          f"would train; {fix}.")
    return n


def freeze_note(modules: Sequence[ModuleInfo], layer: str | None) -> str | None:
    """A warning when the last frozen module also holds layers after ``layer`` (they freeze too)."""
    n = frozen_modules(modules, layer)
    if n == 0:
        return None
    last = modules[n - 1]
    cut = _next_layer(modules, layer)
    if cut is None or cut not in _layers(last):
        return f"frozen: modules 0..{n - 1} ({_layers(modules[0])[0]} .. {_layers(last)[-1]})"
    return (f"frozen: modules 0..{n - 1} ({_layers(modules[0])[0]} .. {_layers(last)[-1]}); module {n - 1} also "
            f"holds {cut} .. {_layers(last)[-1]} after {layer}, which freeze too (cut with --split {cut} to train "
            f"them)")
