"""`asyncfgd-app train` and `asyncfgd-app save-torch`: option parsing and error reporting only.

``train_cmd`` is at module level because `sweep` and `pretrain` take the same options (they build
their signatures from its, see ``train_options``), so a train option never has to be declared twice.
"""
from __future__ import annotations

import copy
import inspect
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Callable, Literal

import typer

from asyncfgd.exporter.export import BN_MODES
from asyncfgd.runtime.artifacts import ArtifactError
from asyncfgd.runtime.engine import BACKENDS, METHODS
from asyncfgd.runtime.optim import OPTIMIZERS
from asyncfgd.runtime.perturb import MODES
from asyncfgd.runtime.schedules import ALPHA_PRESETS, LR_KINDS

from .cmd_export import parse_config
from .checkpoint import CheckpointError
from .data import DataError
from .train import STORE_TANGENTS_BUDGET, Interrupted, TrainConfig, TrainError, saved_config, train

D = TrainConfig()  # the defaults, in one place
EXPORT_OPTIONS = ("model", "modules", "split", "bn", "weights", "config", "tangents")
USER_ERRORS = (ArtifactError, CheckpointError, DataError, TrainError, ValueError, OSError)  # incl. FreezeError
AUTO = "auto"


def fail(message: str, code: int = 2) -> typer.Exit:
    """The error line for the user; raise what it returns (exit ``code``, no traceback)."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _explicit(ctx: typer.Context, names: tuple[str, ...] | list[str]) -> list[str]:
    """Which of ``names`` were given on the command line (not left at their defaults)."""
    return [n for n in names if getattr(ctx.get_parameter_source(n), "name", None) == "COMMANDLINE"]


def _floats(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise fail(f"--alphas expects comma-separated numbers such as 1,0.15, got {text!r}") from None


def _lr(value: str) -> float | str:
    """``--lr``: a non-negative number, or ``auto`` (a learning-rate sweep picks it)."""
    if value == AUTO:
        return value
    try:
        lr = float(value)
    except ValueError:
        lr = -1.0
    if not lr >= 0:
        raise typer.BadParameter(f"expected a number >= 0 such as 1e-3, or 'auto', got {value!r}")
    return lr


def _flags(names: list[str]) -> str:
    return ", ".join("--" + n.replace("_", "-") for n in names)


def _resumed_config(ctx: typer.Context, run_dir: Path) -> TrainConfig:
    """The saved configuration; only --epochs may be changed on resume."""
    extra = [n for n in _explicit(ctx, list(ctx.params)) if n not in ("resume", "epochs")]
    if extra:
        raise fail(f"--resume continues a run with its saved settings; remove {_flags(extra)} "
                    f"(only --epochs may change).")
    cfg = saved_config(run_dir)
    epochs = ctx.params["epochs"] if _explicit(ctx, ["epochs"]) else cfg.epochs
    return replace(cfg, run_dir=str(run_dir), epochs=epochs)


def new_config(ctx: typer.Context) -> TrainConfig:
    """TrainConfig from the options (same names), converting the few that are parsed strings or paths.

    Commands whose options are a subset of train's (`sweep`, `pretrain`) use it too: what they lack
    keeps TrainConfig's default, and ``--lr auto`` leaves the default for the sweep to replace.
    """
    p = ctx.params
    if p["artifacts"] is not None and _explicit(ctx, EXPORT_OPTIONS):
        raise fail(f"--artifacts already fixes how the model was exported; remove "
                    f"{_flags(_explicit(ctx, EXPORT_OPTIONS))} or drop --artifacts.")
    name = p["artifacts"].name if p["artifacts"] is not None else p["model"]
    run_dir = p.get("run_dir") or Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}-{p.get('method', D.method)}"
    lr = p.get("lr", D.lr)
    return TrainConfig(**{**{f.name: p[f.name] for f in fields(TrainConfig) if f.name in p},
                          "lr": D.lr if lr == AUTO else lr,
                          "artifacts": str(p["artifacts"]) if p["artifacts"] else None,
                          "split": p["split"].split(",") if p["split"] else None,
                          "weights": str(p["weights"]) if p["weights"] else None,
                          "config": parse_config(p["config"]), "alphas": _floats(p.get("alphas")),
                          "run_dir": str(run_dir)})


def train_cmd(
    ctx: typer.Context,
    artifacts: Path | None = typer.Option(
        None, "--artifacts", help="Artifact directory from `asyncfgd-app export`. Use it to train exactly what "
        "you exported (e.g. on a device without torch). Without it, --model is exported on the fly and cached."),
    model: str = typer.Option(
        D.model, help="Zoo model to export on the fly: mlp, cnn, resnet18, resnet18-imagenet, mobilenetv2. "
        "mlp/cnn suit digits; the ResNet/MobileNet suit 32x32 image datasets."),
    modules: int = typer.Option(D.modules, min=1, help="Pipeline modules K (AsyncFGD runs them concurrently; "
                                "module k lags K-1-k steps). More modules = more overlap but staler updates."),
    split: str | None = typer.Option(None, help="Cut before these layers instead of balancing K by FLOPs, "
                                        "e.g. layers.2 or layer2,layer4."),
    bn: Literal[BN_MODES] = typer.Option(D.bn, help="BatchNorm during training: train (batch statistics) or "
                                         "frozen (running statistics, e.g. when fine-tuning pretrained weights)."),
    weights: Path | None = typer.Option(None, help="Local torchvision-format state_dict to start from "
                                           "(fine-tuning); a head of another size is re-initialised."),
    config: list[str] = typer.Option([], "--config", help="Model option KEY=VALUE, repeatable, e.g. "
                                     "hidden=256,128 (mlp), channels=16,32 (cnn), width=32 (resnet18)."),
    data: str = typer.Option(D.data, help="Dataset: digits, digits-transfer, digits-transfer-pretrain, "
                             "cifar10:PATH, svhn:PATH, imagefolder:PATH[:SIZE]."),
    method: Literal[(*METHODS, "bp")] = typer.Option(
        D.method, help="asyncfgd: pipelined forward gradients (the product); fgd: synchronous forward gradients "
        "(no staleness, no overlap); local: experimental, each module learns from its own auxiliary head; bp: "
        "PyTorch backprop on the same model and data, as a baseline."),
    backend: Literal[BACKENDS] = typer.Option(D.backend, help="Where FGD runs: onnxruntime (CPU, no torch "
                                              "needed), torch / torch-cuda, tensorrt (Jetson)."),
    optimizer: Literal[OPTIMIZERS] = typer.Option(
        D.optimizer, help="adam copes best with the noisy forward gradient; sgd/momentum need a smaller --lr "
        "(e.g. 1e-3)."),
    lr: str = typer.Option(
        D.lr, callback=_lr, help="Base learning rate (lower it 10x if the loss becomes NaN), or 'auto': "
        "first a short sweep (`asyncfgd-app sweep`: 1e-5..1e-2, up to 10 epochs each, on a validation split of the "
        "train set) picks it; config.json records the choice and the sweep's directory."),
    lr_schedule: Literal[LR_KINDS] = typer.Option(
        D.lr_schedule, help="constant; cosine (decays to 0 at the end); step (10x lower at 1/3 and 2/3)."),
    weight_decay: float = typer.Option(D.weight_decay, min=0.0, help="L2 penalty added to the gradient."),
    normalize: float | None = typer.Option(
        None, min=0.0, max=0.9999, help="Variance reduction for FGD methods: divide each module's gradient estimate "
        "by the running RMS of its estimates (this decay, e.g. 0.99). Makes SGD step sizes independent of the noise "
        "level; costs one extra pass over the gradient per step. Adam already normalises per element."),
    clip_norm: float | None = typer.Option(None, help="Clip each module's gradient estimate to this L2 "
                                           "norm; use it against rare huge steps (or NaN losses)."),
    epochs: int = typer.Option(D.epochs, min=0, help="Passes over the training set (may be changed on --resume). "
                               "0: only evaluate the starting weights, e.g. pretrained ones before fine-tuning."),
    batch_size: int = typer.Option(D.batch_size, min=1, help="Mini-batch size."),
    alpha_preset: Literal[ALPHA_PRESETS] = typer.Option(
        D.alpha_preset, help="Per-module tangent scale alpha (0 freezes a module and removes its noise). "
        "uniform: --alpha-value on every module (best on the small zoo models with many tangents); paper: "
        "head-first, the head module alone for --alpha-warm-epochs, then the others ramp to --alpha-target "
        "(try it when the body has far more weights than the head and few tangents are affordable); "
        "head-only: only the last module learns; constant: --alphas."),
    alpha_value: float = typer.Option(D.alpha_value, min=0.0, help="alpha of every module for uniform."),
    alpha_warm_epochs: float = typer.Option(D.alpha_warm_epochs, min=0.0, help="paper: epochs with only the "
                                            "head module learning."),
    alpha_ramp_epochs: float = typer.Option(D.alpha_ramp_epochs, min=0.0, help="paper: epochs of linear ramp "
                                            "of the other modules' alpha."),
    alpha_target: float = typer.Option(D.alpha_target, min=0.0, help="paper: the other modules' final alpha "
                                       "(small: their forward-gradient noise is large)."),
    alphas: str | None = typer.Option(None, help="constant: one alpha per module, e.g. 0.15,1."),
    tangents: int = typer.Option(D.tangents, min=1, help="Tangents per forward pass (exported into the "
                                 "graphs): the gradient noise falls as 1/M for M times the tangent compute. "
                                 "The main lever on accuracy; lower it to train faster."),
    tangent_mode: Literal[MODES] = typer.Option(D.tangent_mode, help="Tangent distribution; orthogonal makes "
                                                "several tangents per pass cover distinct directions."),
    store_tangents: bool | None = typer.Option(
        D.store_tangents, "--store-tangents/--no-store-tangents", show_default=False,
        help="Keep tangents until their delayed update instead of regenerating them from the seed (more memory, "
        "less compute; the weights are identical either way). Default: keep them when the copies fit in "
        f"{STORE_TANGENTS_BUDGET >> 20} MiB."),
    seed: int = typer.Option(D.seed, min=0, help="Seed of the initial weights, data order and tangents."),
    threads: int = typer.Option(D.threads, min=0, help="Threads per module (ONNX Runtime intra-op, or torch). "
                                "1 suits small models, whose K modules already run concurrently; for large "
                                "ones try cores / K. 0: the runtime's own choice."),
    augment: bool = typer.Option(D.augment, help="Random crops (and flips where labels allow them)."),
    validation: float = typer.Option(D.validation, min=0.0, max=0.9, help="Hold out this stratified fraction of "
                                     "the train set, train on the rest and evaluate on it instead of the test set "
                                     "(metrics columns val_loss/val_acc): for tuning without touching the test set."),
    freeze_until: str | None = typer.Option(
        None, help="Keep the pipeline modules up to and including the one that holds this layer (or block, e.g. "
        "flatten, features.1) frozen: alpha 0 whatever --alpha-preset says, so they run forward only and never "
        "update; with --method bp their parameters get no gradient. For fine-tuning: freeze the pretrained body "
        "and cut it from the head with --split HEAD_LAYER."),
    run_dir: Path | None = typer.Option(None, help="Output directory (default: runs/TIME-MODEL-METHOD)."),
    resume: Path | None = typer.Option(None, help="Continue the run in this directory from its last "
                                          "checkpoint, with its saved settings (only --epochs may change)."),
) -> None:
    """Train with forward gradients (or the backprop baseline); writes a run directory with metrics and
    checkpoints."""
    try:
        # the options are read from ctx.params: they have the names of TrainConfig's fields
        cfg = _resumed_config(ctx, resume) if resume is not None else new_config(ctx)
        typer.echo(f"run directory: {cfg.run_dir}")
    except USER_ERRORS as exc:
        raise fail(str(exc)) from None
    run_reported(cfg, lr == AUTO, lambda c: train(c, resume=resume is not None, log=typer.echo))


def run_reported(cfg: TrainConfig, auto_lr: bool, job: Callable[[TrainConfig], float]) -> TrainConfig:
    """Pick the learning rate first when asked (`--lr auto`), run ``job``, turn every user-facing failure into
    a one-paragraph message and exit code, and end with the accuracy line. Returns the config actually used."""
    try:
        if auto_lr:
            from .sweep import auto_lr as sweep_lr

            cfg = sweep_lr(cfg, log=typer.echo)
        acc = job(cfg)
    except Interrupted as exc:
        raise fail(str(exc), 130) from None
    except KeyboardInterrupt:
        raise fail("interrupted before training started; nothing was saved.", 130) from None
    except USER_ERRORS as exc:
        raise fail(str(exc)) from None
    typer.echo(f"{'validation' if cfg.validation > 0 else 'test'} accuracy: {100 * acc:.1f}%")
    return cfg


def train_options(drop: tuple[str, ...] = (), defaults: dict[str, Any] | None = None) -> list[inspect.Parameter]:
    """train's options (after ``ctx``) minus ``drop``, some with other defaults: for the commands that
    pass every train option through."""
    out = []
    for param in list(inspect.signature(train_cmd, eval_str=True).parameters.values())[1:]:
        if param.name in drop:
            continue
        if param.name in (defaults or {}):
            option = copy.copy(param.default)
            option.default = defaults[param.name]
            param = param.replace(default=option)
        out.append(param)
    return out


def register(app: typer.Typer) -> None:
    """Add the `train` and `save-torch` commands to the CLI."""
    app.command("train")(train_cmd)

    @app.command("save-torch")
    def save_torch_cmd(
        run: Path = typer.Argument(..., help="Run directory (holds checkpoint.npz)."),
        out: Path = typer.Option(..., "--out", help="Where to write the PyTorch state_dict (.pth)."),
    ) -> None:
        """Export a run's trained weights and BN statistics as a PyTorch state_dict for the same zoo model."""
        try:
            from .baseline_bp import save_torch  # imports torch

            spec = save_torch(run, out)
        except USER_ERRORS as exc:
            raise fail(str(exc)) from None
        typer.echo(f"wrote {out}: load it with build_model({spec['name']!r}, {spec['num_classes']}, "
                   f"{tuple(spec['input_shape'])}, **{spec['config']}).load_state_dict(torch.load({str(out)!r}))")
