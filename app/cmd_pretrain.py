"""`asyncfgd-app pretrain`: backprop pretraining to a state_dict; train's options pass through."""
from __future__ import annotations

import inspect
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import typer

from . import pretrain as defaults
from .cmd_train import AUTO, USER_ERRORS, fail, new_config, run_reported, train_options
from .pretrain import pretrain

FGD_ONLY = ("method", "backend", "alpha_preset", "alpha_value", "alpha_warm_epochs", "alpha_ramp_epochs",
            "alpha_target", "alphas", "tangents", "tangent_mode", "store_tangents", "resume")

OWN_OPTIONS = [
    inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context),
    inspect.Parameter("out", inspect.Parameter.KEYWORD_ONLY, annotation=Path, default=typer.Option(
        ..., "--out", help="Where to write the pretrained state_dict (.pth), for `train --weights F` or "
        "`export --weights F`.")),
]


def pretrain_cmd(ctx: typer.Context, **_: Any) -> None:
    """Pretrain a zoo model with backprop (PyTorch autograd, on the host) and save a torchvision-format
    state_dict; by default the cnn on upright digits 0-4, the source task of the digits-transfer fine-tune."""
    p = ctx.params
    try:
        cfg = new_config(ctx)
        run_dir = p["run_dir"] or Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.model}-pretrain"
        cfg = replace(cfg, method="bp", run_dir=str(run_dir))
        typer.echo(f"run directory: {cfg.run_dir}")
    except USER_ERRORS as exc:
        raise fail(str(exc)) from None
    cfg = run_reported(cfg, p["lr"] == AUTO, lambda c: pretrain(c, p["out"], log=typer.echo))
    typer.echo(f"wrote {p['out']}: fine-tune it with `asyncfgd-app train --model {cfg.model} --weights {p['out']} "
               f"...` (or `asyncfgd-app export --weights {p['out']} ...`)")


pretrain_cmd.__signature__ = inspect.Signature(OWN_OPTIONS + [
    p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in train_options(
        drop=FGD_ONLY, defaults={"model": defaults.MODEL, "data": defaults.DATA, "epochs": defaults.EPOCHS})])


def register(app: typer.Typer) -> None:
    """Add the `pretrain` command to the CLI."""
    app.command("pretrain")(pretrain_cmd)
