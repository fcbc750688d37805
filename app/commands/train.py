"""`asyncfgd-app train`: option parsing and error reporting only.

The options are train_options.py's aliases; `sweep` and `pretrain` declare the ones they pass
through with the same aliases and turn them into a TrainConfig with ``new_config``.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path

import typer

from asyncfgd.app.commands.common import INTERRUPTED, USER_ERRORS, fail, parse_config, parse_perturb
from asyncfgd.app.commands.train_options import (
    AUTO,
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
    DistributedOpt,
    DistTimeoutOpt,
    DriftCheckEveryOpt,
    EpochsOpt,
    FreezeUntilOpt,
    LogEveryOpt,
    LogOpt,
    LrOpt,
    LrScheduleOpt,
    MemoryOpt,
    MethodOpt,
    ModelOpt,
    ModulesOpt,
    NormalizeOpt,
    OptimizerOpt,
    PerturbOpt,
    ResumeOpt,
    RunDirOpt,
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
from asyncfgd.app.training import distributed as ranks
from asyncfgd.app.training import run_log
from asyncfgd.app.training.config import Interrupted, TrainConfig, method_defaults, saved_config
from asyncfgd.app.training.loop import train
from asyncfgd.exporter.model_sources import short_name
from asyncfgd.runtime.engine import ACTIVITY_METHOD

EXPORT_OPTIONS = ("model", "modules", "split", "bn", "weights", "config", "tangents", "perturb")


def _explicit(ctx: typer.Context, names: tuple[str, ...] | list[str]) -> list[str]:
    """Which of ``names`` were given on the command line (not left at their defaults)."""
    return [n for n in names if getattr(ctx.get_parameter_source(n), "name", None) == "COMMANDLINE"]


def _floats(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        fail(f"--alphas expects comma-separated numbers such as 1,0.15, got {text!r}")


def _flags(names: list[str]) -> str:
    return ", ".join("--" + n.replace("_", "-") for n in names)


#: what --resume may change: the length of the run, how it is held in memory and how it is watched
RESUME_MAY_CHANGE = ("epochs", "memory", "log", "log_every")
#: how a run is launched, not what it computes (never saved)
LAUNCH_OPTIONS = ("dist_timeout",)
DIST_TIMEOUT_S = 600.0


def _resumed_config(ctx: typer.Context, run_dir: Path) -> TrainConfig:
    """The saved configuration; only --epochs and how the run is watched may be changed on resume."""
    extra = [n for n in _explicit(ctx, list(ctx.params)) if n not in ("resume", *RESUME_MAY_CHANGE, *LAUNCH_OPTIONS)]
    if extra:
        fail(f"--resume continues a run with its saved settings; remove {_flags(extra)} "
             f"(only {_flags(list(RESUME_MAY_CHANGE))} may change).")
    cfg = saved_config(run_dir)
    return replace(cfg, run_dir=str(run_dir), **{n: ctx.params[n] for n in _explicit(ctx, RESUME_MAY_CHANGE)})


def new_config(ctx: typer.Context) -> TrainConfig:
    """TrainConfig from the options (same names), converting the few that are parsed strings or paths.

    Commands whose options are a subset of train's (`sweep`, `pretrain`) use it too: what they lack
    keeps TrainConfig's default, and ``--lr auto`` leaves the default for the sweep to replace.
    """
    p = ctx.params
    if p["artifacts"] is not None and _explicit(ctx, EXPORT_OPTIONS):
        fail(f"--artifacts already fixes how the model was exported; remove "
             f"{_flags(_explicit(ctx, EXPORT_OPTIONS))} or drop --artifacts.")
    name = p["artifacts"].name if p["artifacts"] is not None else short_name(p["model"])  # no '/' or ':'
    run_dir = p.get("run_dir") or Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}-{p.get('method', D.method)}"
    method = p.get("method", D.method)
    given = _explicit(ctx, list(p))
    defaults = {k: v for k, v in method_defaults(method).items() if k not in given}
    lr = defaults.pop("lr", p.get("lr", D.lr))
    perturb = parse_perturb(p.get("perturb"))
    if perturb and method != ACTIVITY_METHOD:
        fail("--perturb chooses how the local-activity method perturbs a layer; add --method local-activity")
    return TrainConfig(**{**{f.name: p[f.name] for f in fields(TrainConfig) if f.name in p},
                          **defaults, "perturb": perturb,
                          "lr": D.lr if lr == AUTO else lr,
                          "artifacts": str(p["artifacts"]) if p["artifacts"] else None,
                          "split": p["split"].split(",") if p["split"] else None,
                          "weights": str(p["weights"]) if p["weights"] else None,
                          "config": parse_config(p["config"]), "alphas": _floats(p.get("alphas")),
                          "run_dir": str(run_dir)})


def train_cmd(
    ctx: typer.Context,
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
    lr: LrOpt = D.lr,
    lr_schedule: LrScheduleOpt = D.lr_schedule,
    weight_decay: WeightDecayOpt = D.weight_decay,
    normalize: NormalizeOpt = None,
    clip_norm: ClipNormOpt = None,
    epochs: EpochsOpt = D.epochs,
    batch_size: BatchSizeOpt = D.batch_size,
    alpha_preset: AlphaPresetOpt = D.alpha_preset,
    alpha_value: AlphaValueOpt = D.alpha_value,
    alpha_warm_epochs: AlphaWarmEpochsOpt = D.alpha_warm_epochs,
    alpha_ramp_epochs: AlphaRampEpochsOpt = D.alpha_ramp_epochs,
    alpha_target: AlphaTargetOpt = D.alpha_target,
    alphas: AlphasOpt = None,
    tangents: TangentsOpt = D.tangents,
    perturb: PerturbOpt = None,
    tangent_mode: TangentModeOpt = D.tangent_mode,
    store_tangents: StoreTangentsOpt = D.store_tangents,
    seed: SeedOpt = D.seed,
    threads: ThreadsOpt = D.threads,
    augment: AugmentOpt = D.augment,
    validation: ValidationOpt = D.validation,
    freeze_until: FreezeUntilOpt = None,
    distributed: DistributedOpt = None,
    drift_check_every: DriftCheckEveryOpt = D.drift_check_every,
    dist_timeout: DistTimeoutOpt = DIST_TIMEOUT_S,
    run_dir: RunDirOpt = None,
    memory: MemoryOpt = D.memory,
    resume: ResumeOpt = None,
    log: LogOpt = None,
    log_every: LogEveryOpt = None,
) -> None:
    """Train with forward gradients (or the backprop baseline); writes a run directory with metrics and
    checkpoints."""
    if ranks.launched():
        _train_ranks(ctx, resume, dist_timeout, lr == AUTO)
        return
    try:
        # the options are read from ctx.params: they have the names of TrainConfig's fields
        cfg = _resumed_config(ctx, resume) if resume is not None else new_config(ctx)
        run_log.check(cfg.log)  # a missing TensorBoard/MLflow package fails now, not after an --lr auto sweep
        if cfg.distributed is not None:
            typer.echo(f"--distributed {cfg.distributed} without torchrun: training in this one process"
                       f"{' (the modules as threads)' if cfg.distributed == 'pipeline' else ''}.")
        typer.echo(f"run directory: {cfg.run_dir}")
    except USER_ERRORS as exc:
        fail(str(exc))
    run_reported(cfg, lr == AUTO, lambda c: train(c, resume=resume is not None, log=typer.echo))


def _train_ranks(ctx: typer.Context, resume: Path | None, timeout_s: float, auto_lr: bool) -> None:
    """One rank of a torchrun launch: rank 0's configuration for all (its run directory, its saved
    settings on --resume), rank 0's messages only, and a failed or silent rank named in the error."""
    if auto_lr:
        fail("--lr auto runs a sweep of separate trainings; run it in one process, then launch the distributed "
             "run with the --lr it found.")
    try:
        group = ranks.join(timeout_s)
    except (RuntimeError, ValueError) as exc:
        fail(f"cannot join the torchrun process group: {exc}")
    echo = typer.echo if group.writer else (lambda _: None)
    try:
        try:
            cfg = _resumed_config(ctx, resume) if resume is not None else new_config(ctx)
            error = None
        except USER_ERRORS as exc:
            cfg, error = None, str(exc)
        cfg, error = group.share((cfg, error))
        if error is not None or cfg is None:
            fail(error or "no configuration")
        echo(f"run directory: {cfg.run_dir} ({group.world} ranks, --distributed {cfg.distributed})")
        run_reported(cfg, False, lambda c: train(c, resume=resume is not None, log=echo, group=group),
                     echo=echo)
    except ranks.Stopped:
        fail(f"rank {group.rank}: stopped by the launcher (another rank failed or was interrupted; torchrun's "
             "report names it). Continue from the last checkpoint with --resume under the same launch.",
             INTERRUPTED)
    except RuntimeError as exc:
        if not ranks.is_comm_error(exc):
            raise
        fail(f"{group.lost(exc)}. Every rank stops; continue from the last checkpoint (written after every epoch) "
             f"with the same torchrun launch and `--resume DIR`.")
    finally:
        ranks.leave()


def run_reported(cfg: TrainConfig, auto_lr: bool, job: Callable[[TrainConfig], float],
                 echo: Callable[[str], None] = typer.echo) -> TrainConfig:
    """Pick the learning rate first when asked (`--lr auto`), run ``job``, turn every user-facing failure into
    a one-paragraph message and exit code, and end with the accuracy line. Returns the config actually used."""
    try:
        if auto_lr:
            from asyncfgd.app.training.sweep import auto_lr as sweep_lr

            cfg = sweep_lr(cfg, log=typer.echo)
        acc = job(cfg)
    except Interrupted as exc:
        fail(str(exc), INTERRUPTED)
    except KeyboardInterrupt:
        fail("interrupted before training started; nothing was saved.", INTERRUPTED)
    except USER_ERRORS as exc:
        fail(str(exc))
    echo(f"{'validation' if cfg.validation > 0 else 'test'} accuracy: {100 * acc:.1f}%")
    return cfg


def register(app: typer.Typer) -> None:
    """Add the `train` command to the CLI."""
    app.command("train")(train_cmd)
