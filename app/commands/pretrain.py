"""`asyncfgd-app pretrain`: backprop pretraining to a state_dict; train's options pass through."""
from __future__ import annotations

import json
import shlex
import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from asyncfgd.app.commands.common import USER_ERRORS, fail
from asyncfgd.app.commands.train import new_config, run_reported
from asyncfgd.app.commands.train_options import (
    AUTO,
    ArtifactsOpt,
    AugmentOpt,
    BatchSizeOpt,
    BnOpt,
    ClipNormOpt,
    ConfigOpt,
    D,
    DataOpt,
    EpochsOpt,
    FreezeUntilOpt,
    LrOpt,
    LrScheduleOpt,
    ModelOpt,
    ModulesOpt,
    NormalizeOpt,
    OptimizerOpt,
    RunDirOpt,
    SeedOpt,
    SplitOpt,
    ThreadsOpt,
    ValidationOpt,
    WeightDecayOpt,
    WeightsOpt,
)
from asyncfgd.app.training import pretrain as defaults
from asyncfgd.app.training.pretrain import pretrain
from asyncfgd.exporter.model_sources import short_name


def pretrain_cmd(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option("--out", help="Where to write the pretrained state_dict (.pth), for "
                                      "`train --weights F` or `export --weights F`.")],
    artifacts: ArtifactsOpt = None,
    model: ModelOpt = defaults.MODEL,
    modules: ModulesOpt = D.modules,
    split: SplitOpt = None,
    bn: BnOpt = D.bn,
    weights: WeightsOpt = None,
    config: ConfigOpt = None,
    data: DataOpt = defaults.DATA,
    optimizer: OptimizerOpt = D.optimizer,
    lr: LrOpt = D.lr,
    lr_schedule: LrScheduleOpt = D.lr_schedule,
    weight_decay: WeightDecayOpt = D.weight_decay,
    normalize: NormalizeOpt = None,
    clip_norm: ClipNormOpt = None,
    epochs: EpochsOpt = defaults.EPOCHS,
    batch_size: BatchSizeOpt = D.batch_size,
    seed: SeedOpt = D.seed,
    threads: ThreadsOpt = D.threads,
    augment: AugmentOpt = D.augment,
    validation: ValidationOpt = D.validation,
    freeze_until: FreezeUntilOpt = None,
    run_dir: RunDirOpt = None,
) -> None:
    """Pretrain a model (zoo, torchvision:NAME or PATH.py:FACTORY) with backprop (PyTorch autograd, on the host)
    and save its state_dict; by default the cnn on upright digits 0-4, the source task of the digits-transfer
    fine-tune."""
    try:
        cfg = new_config(ctx)
        run_dir = run_dir or Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{short_name(cfg.model)}-pretrain"
        cfg = replace(cfg, method="bp", run_dir=str(run_dir))
        typer.echo(f"run directory: {cfg.run_dir}")
    except USER_ERRORS as exc:
        fail(str(exc))
    cfg = run_reported(cfg, lr == AUTO, lambda c: pretrain(c, out, log=typer.echo))
    model_args = shlex.join(["--model", cfg.model, *(f"--config={k}={json.dumps(v)}" for k, v in cfg.config.items())])
    typer.echo(f"wrote {out}: fine-tune it with `asyncfgd-app train {model_args} --weights {shlex.quote(str(out))} "
               f"...` (or `asyncfgd-app export --weights {shlex.quote(str(out))} ...`)")


def register(app: typer.Typer) -> None:
    """Add the `pretrain` command to the CLI."""
    app.command("pretrain")(pretrain_cmd)
