"""`asyncfgd-app sweep`: the learning-rate sweep's command line; every train option passes through."""
from __future__ import annotations

import inspect
import time
from pathlib import Path
from typing import Any

import typer

from .cmd_train import USER_ERRORS, fail, new_config, train_options
from .sweep import DEFAULT_EPOCHS, DEFAULT_LRS, DEFAULT_VALIDATION, default_jobs, sweep, table
from .train import Interrupted


def _lrs(text: str) -> tuple[float, ...]:
    try:
        lrs = tuple(float(v) for v in text.split(","))
    except ValueError:
        lrs = ()
    if not lrs or not all(lr > 0 for lr in lrs):
        raise typer.BadParameter(f"expected comma-separated learning rates > 0 such as 1e-4,1e-3, got {text!r}")
    return lrs


OWN_OPTIONS = [
    inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context),
    inspect.Parameter("lrs", inspect.Parameter.KEYWORD_ONLY, annotation=str, default=typer.Option(
        ",".join(f"{lr:g}" for lr in DEFAULT_LRS), callback=_lrs,
        help="Learning rates to try, comma-separated (the paper's grid by default).")),
    inspect.Parameter("jobs", inspect.Parameter.KEYWORD_ONLY, annotation=int, default=typer.Option(
        default_jobs(), min=1, help="Runs at a time, each in its own process with one thread (default: the "
        "cores available). Use 1 when the runs' wall times matter.")),
    inspect.Parameter("out", inspect.Parameter.KEYWORD_ONLY, annotation=Path | None, default=typer.Option(
        None, help="Output directory: sweep.csv, sweep.png and one run directory per learning rate (default "
        "runs/TIME-MODEL-sweep).")),
]


def sweep_cmd(ctx: typer.Context, **_: Any) -> None:
    """Pick the learning rate as the paper does: a short run per candidate on a validation split carved from
    the train set, the best validation accuracy wins; writes sweep.csv and sweep.png."""
    p = ctx.params
    try:
        base = new_config(ctx)
        out = p["out"] or Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{base.model}-sweep"
        result = sweep(base, p["lrs"], out, p["jobs"], log=typer.echo)
    except (Interrupted, KeyboardInterrupt):
        raise fail("interrupted; the runs finished so far are in the output directory.", 130) from None
    except USER_ERRORS as exc:
        raise fail(str(exc)) from None
    typer.echo(table(result.rows))
    typer.echo(f"best learning rate: {result.best['lr']:g} (validation accuracy {100 * result.best['val_acc']:.1f}%)"
               f"; wrote {out / 'sweep.csv'} and {out / 'sweep.png'}. Train with it: `asyncfgd-app train --lr "
               f"{result.best['lr']:g}` and the same options.")


sweep_cmd.__signature__ = inspect.Signature(OWN_OPTIONS + [
    p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in train_options(
        drop=("lr", "run_dir", "resume"), defaults={"epochs": DEFAULT_EPOCHS, "validation": DEFAULT_VALIDATION})])


def register(app: typer.Typer) -> None:
    """Add the `sweep` command to the CLI."""
    app.command("sweep")(sweep_cmd)
