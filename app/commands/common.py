"""What every command shares: the one way a command fails, and the parsers of its list options.

A command never shows the user a traceback for a mistake the user can fix: it prints one
paragraph on stderr that says what is wrong and what would work, and exits with a non-zero code
(``fail``, which raises). Errors of the library that carry such a message are ``USER_ERRORS``.
"""
from __future__ import annotations

import json
from typing import Any, NoReturn

import typer

from asyncfgd.app.training.checkpoint import CheckpointError
from asyncfgd.app.training.config import TrainError
from asyncfgd.app.training.data import DataError
from asyncfgd.runtime.artifacts import ArtifactError

USAGE_ERROR = 2
INTERRUPTED = 130
#: the library's errors whose message is written for the user (FreezeError is a ValueError)
USER_ERRORS = (ArtifactError, CheckpointError, DataError, TrainError, ValueError, OSError)


def fail(message: str, code: int = USAGE_ERROR) -> NoReturn:
    """End the command: ``error: message`` on stderr, exit ``code``, no traceback."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def parse_ints(text: str, what: str, example: str, count: int | None = None) -> list[int]:
    """'3,32,32' -> [3, 32, 32]; positive integers only, ``count`` of them if given."""
    try:
        values = [int(t) for t in text.split(",")]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values) or (count is not None and len(values) != count):
        n = f"{count} " if count else ""
        fail(f"{what} must be {n}comma-separated positive integers (e.g. {example}), got {text!r}")
    return values


def parse_config(items: list[str] | None) -> dict[str, Any]:
    """['width=8', 'hidden=64,32'] -> {'width': 8, 'hidden': [64, 32]} (JSON values, else strings)."""
    config: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            fail(f"--config takes key=value, got {item!r}")
        config[key] = _value(raw)
    return config


def _value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return [_value(p) for p in raw.split(",")] if "," in raw else raw


def parse_perturb(items: list[str] | None) -> dict[str, str]:
    """['features.0.0=weight'] -> {'features.0.0': 'weight'} (the local-activity method's per-layer choice)."""
    from asyncfgd.runtime.dual.activity import PERTURB_CHOICES

    out: dict[str, str] = {}
    for item in items or []:
        layer, sep, how = item.partition("=")
        if not sep or not layer or how not in PERTURB_CHOICES:
            fail(f"--perturb takes LAYER=activity or LAYER=weight (e.g. features.0.0=weight), got {item!r}")
        out[layer] = how
    return out


def bench_model(model: str, shape: tuple[int, ...], config: list[str]) -> Any:
    """The benchmarks' model: ``model`` freshly initialised (seed 0) for 10 classes, or the reason it cannot be
    built (imports torch)."""
    import torch

    from asyncfgd.exporter.model_sources import build_any

    torch.manual_seed(0)
    try:
        return build_any(model, 10, shape, parse_config(config))
    except ValueError as exc:
        fail(str(exc))
