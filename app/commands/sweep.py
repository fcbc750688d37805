"""`asyncfgd-app sweep`: the learning-rate sweep's command line; train's options pass through."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from asyncfgd.app.commands.common import INTERRUPTED, USER_ERRORS, fail
from asyncfgd.app.commands.train import new_config
from asyncfgd.app.commands.train_options import (
    AlphaPresetOpt,
    AlphaRampEpochsOpt,
    AlphasOpt,
    AlphaTargetOpt,
    AlphaValueOpt,
    AlphaWarmEpochsOpt,
    ArtifactsOpt,
    AugmentOpt,
    BackendOpt,
    BatchSizeOpt,
    BnOpt,
    ClipNormOpt,
    ConfigOpt,
    D,
    DataOpt,
    EpochsOpt,
    FreezeUntilOpt,
    LrScheduleOpt,
    MethodOpt,
    ModelOpt,
    ModulesOpt,
    NormalizeOpt,
    OptimizerOpt,
    SeedOpt,
    SplitOpt,
    StoreTangentsOpt,
    TangentModeOpt,
    TangentsOpt,
    ThreadsOpt,
    ValidationOpt,
    WeightDecayOpt,
    WeightsOpt,
)
from asyncfgd.app.training.config import Interrupted
from asyncfgd.app.training.sweep import DEFAULT_EPOCHS, DEFAULT_LRS, DEFAULT_VALIDATION, default_jobs, sweep, table
from asyncfgd.exporter.model_sources import short_name

DEFAULT_JOBS = default_jobs()


def _lrs(text: str) -> tuple[float, ...]:
    try:
        lrs = tuple(float(v) for v in text.split(","))
    except ValueError:
        lrs = ()
    if not lrs or not all(lr > 0 for lr in lrs):
        raise typer.BadParameter(f"expected comma-separated learning rates > 0 such as 1e-4,1e-3, got {text!r}")
    return lrs


def sweep_cmd(
    ctx: typer.Context,
    lrs: Annotated[str, typer.Option(callback=_lrs, help="Learning rates to try, comma-separated (the paper's grid "
                                     "by default).")] = ",".join(f"{lr:g}" for lr in DEFAULT_LRS),
    jobs: Annotated[int, typer.Option(min=1, help="Runs at a time, each in its own process with one thread "
                                      "(default: the cores available). Use 1 when the runs' wall times "
                                      "matter.")] = DEFAULT_JOBS,
    out: Annotated[Path | None, typer.Option(help="Output directory: sweep.csv, sweep.png and one run directory per "
                                             "learning rate (default runs/TIME-MODEL-sweep).")] = None,
    artifacts: ArtifactsOpt = None,
    model: ModelOpt = D.model,
    modules: ModulesOpt = D.modules,
    split: SplitOpt = None,
    bn: BnOpt = D.bn,
    weights: WeightsOpt = None,
    config: ConfigOpt = None,
    data: DataOpt = D.data,
    method: MethodOpt = D.method,
    backend: BackendOpt = D.backend,
    optimizer: OptimizerOpt = D.optimizer,
    lr_schedule: LrScheduleOpt = D.lr_schedule,
    weight_decay: WeightDecayOpt = D.weight_decay,
    normalize: NormalizeOpt = None,
    clip_norm: ClipNormOpt = None,
    epochs: EpochsOpt = DEFAULT_EPOCHS,
    batch_size: BatchSizeOpt = D.batch_size,
    alpha_preset: AlphaPresetOpt = D.alpha_preset,
    alpha_value: AlphaValueOpt = D.alpha_value,
    alpha_warm_epochs: AlphaWarmEpochsOpt = D.alpha_warm_epochs,
    alpha_ramp_epochs: AlphaRampEpochsOpt = D.alpha_ramp_epochs,
    alpha_target: AlphaTargetOpt = D.alpha_target,
    alphas: AlphasOpt = None,
    tangents: TangentsOpt = D.tangents,
    tangent_mode: TangentModeOpt = D.tangent_mode,
    store_tangents: StoreTangentsOpt = D.store_tangents,
    seed: SeedOpt = D.seed,
    threads: ThreadsOpt = D.threads,
    augment: AugmentOpt = D.augment,
    validation: ValidationOpt = DEFAULT_VALIDATION,
    freeze_until: FreezeUntilOpt = None,
) -> None:
    """Pick the learning rate as the paper does: a short run per candidate on a validation split carved from
    the train set, the best validation accuracy wins; writes sweep.csv and sweep.png."""
    try:
        base = new_config(ctx)
        out = out or Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{short_name(base.model)}-sweep"
        result = sweep(base, ctx.params["lrs"], out, jobs, log=typer.echo)
    except (Interrupted, KeyboardInterrupt):
        fail("interrupted; the runs finished so far are in the output directory.", INTERRUPTED)
    except USER_ERRORS as exc:
        fail(str(exc))
    typer.echo(table(result.rows))
    typer.echo(f"best learning rate: {result.best['lr']:g} (validation accuracy {100 * result.best['val_acc']:.1f}%)"
               f"; wrote {out / 'sweep.csv'} and {out / 'sweep.png'}. Train with it: `asyncfgd-app train --lr "
               f"{result.best['lr']:g}` and the same options.")


def register(app: typer.Typer) -> None:
    """Add the `sweep` command to the CLI."""
    app.command("sweep")(sweep_cmd)
