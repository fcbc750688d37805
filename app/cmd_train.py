"""`asyncfgd-app train` and `asyncfgd-app save-torch`: option parsing and error reporting only."""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Literal

import typer

from asyncfgd.exporter.export import BN_MODES
from asyncfgd.runtime.artifacts import ArtifactError
from asyncfgd.runtime.engine import BACKENDS, METHODS
from asyncfgd.runtime.optim import OPTIMIZERS
from asyncfgd.runtime.perturb import MODES
from asyncfgd.runtime.schedules import ALPHA_PRESETS, LR_KINDS

from .artifact_cache import parse_config
from .checkpoint import CheckpointError
from .data import DataError
from .train import Interrupted, TrainConfig, TrainError, saved_config, train

D = TrainConfig()  # the defaults, in one place
EXPORT_OPTIONS = ("model", "modules", "split", "bn", "weights", "config", "tangents")
USER_ERRORS = (ArtifactError, CheckpointError, DataError, TrainError, ValueError, OSError)


def _fail(message: str, code: int = 2) -> typer.Exit:
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
        raise _fail(f"--alphas expects comma-separated numbers such as 1,0.15, got {text!r}") from None


def register(app: typer.Typer) -> None:
    """Add the `train` and `save-torch` commands to the CLI."""

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
            D.optimizer, help="adam copes best with the noisy forward gradient; sgd/momentum need a smaller --lr."),
        lr: float = typer.Option(D.lr, min=0.0, help="Base learning rate. Lower it 10x if the loss becomes NaN."),
        lr_schedule: Literal[LR_KINDS] = typer.Option(
            D.lr_schedule, help="constant; cosine (decays to 0 at the end); step (10x lower at 1/3 and 2/3)."),
        weight_decay: float = typer.Option(D.weight_decay, min=0.0, help="L2 penalty added to the gradient."),
        clip_norm: float | None = typer.Option(None, help="Clip each module's update "
                                                  "to this L2 norm; use it against rare huge steps."),
        epochs: int = typer.Option(D.epochs, min=1, help="Passes over the training set (may be changed on --resume)."),
        batch_size: int = typer.Option(D.batch_size, min=1, help="Mini-batch size."),
        alpha_preset: Literal[ALPHA_PRESETS] = typer.Option(
            D.alpha_preset, help="Per-module tangent scale alpha (0 freezes a module). paper: head module first, "
            "the others join after --alpha-warm-epochs, ramping to --alpha-target; head-only: only the last module "
            "learns; uniform: --alpha-value everywhere (noisy from scratch); constant: --alphas."),
        alpha_value: float = typer.Option(D.alpha_value, min=0.0, help="alpha of every module for uniform."),
        alpha_warm_epochs: float = typer.Option(D.alpha_warm_epochs, min=0.0, help="paper: epochs with only the "
                                                "head module learning."),
        alpha_ramp_epochs: float = typer.Option(D.alpha_ramp_epochs, min=0.0, help="paper: epochs of linear ramp "
                                                "of the other modules' alpha."),
        alpha_target: float = typer.Option(D.alpha_target, min=0.0, help="paper: the other modules' final alpha "
                                           "(small: their forward-gradient noise is large)."),
        alphas: str | None = typer.Option(None, help="constant: one alpha per module, e.g. 0.15,1."),
        tangents: int = typer.Option(D.tangents, min=1, help="Tangents per forward pass (exported into the "
                                     "graphs): more tangents average out gradient noise at more compute per step."),
        tangent_mode: Literal[MODES] = typer.Option(D.tangent_mode, help="Tangent distribution; orthogonal makes "
                                                    "several tangents per pass cover distinct directions."),
        store_tangents: bool = typer.Option(D.store_tangents, help="Keep tangents until their delayed update "
                                            "instead of regenerating them from the seed (more memory, less compute)."),
        seed: int = typer.Option(D.seed, min=0, help="Seed of the initial weights, data order and tangents."),
        threads: int = typer.Option(D.threads, min=0, help="Threads per module (ONNX Runtime intra-op, or torch). "
                                    "1 suits small models, whose K modules already run concurrently; for large "
                                    "ones try cores / K. 0: the runtime's own choice."),
        augment: bool = typer.Option(D.augment, help="Random crops (and flips where labels allow them)."),
        run_dir: Path | None = typer.Option(None, help="Output directory (default: runs/TIME-MODEL-METHOD)."),
        resume: Path | None = typer.Option(None, help="Continue the run in this directory from its last "
                                              "checkpoint, with its saved settings (only --epochs may change)."),
    ) -> None:
        """Train with forward gradients (or the backprop baseline); writes a run directory with metrics and checkpoints."""
        try:
            if resume is not None:
                extra = [n for n in _explicit(ctx, list(ctx.params)) if n not in ("resume", "epochs")]
                if extra:
                    raise _fail(f"--resume continues a run with its saved settings; remove {', '.join('--' + n.replace('_', '-') for n in extra)} "
                                f"(only --epochs may change).")
                cfg = saved_config(resume)
                cfg = replace(cfg, run_dir=str(resume), epochs=epochs if _explicit(ctx, ["epochs"]) else cfg.epochs)
            else:
                if artifacts is not None and _explicit(ctx, EXPORT_OPTIONS):
                    raise _fail(f"--artifacts already fixes how the model was exported; remove "
                                f"{', '.join('--' + n for n in _explicit(ctx, EXPORT_OPTIONS))} or drop --artifacts.")
                name = artifacts.name if artifacts is not None else model
                cfg = TrainConfig(
                    artifacts=str(artifacts) if artifacts else None, model=model, modules=modules,
                    split=split.split(",") if split else None, bn=bn, weights=str(weights) if weights else None,
                    config=parse_config(config), data=data, method=method, backend=backend, optimizer=optimizer,
                    lr=lr, lr_schedule=lr_schedule, weight_decay=weight_decay, clip_norm=clip_norm, epochs=epochs,
                    batch_size=batch_size, alpha_preset=alpha_preset, alpha_value=alpha_value,
                    alpha_warm_epochs=alpha_warm_epochs, alpha_ramp_epochs=alpha_ramp_epochs,
                    alpha_target=alpha_target, alphas=_floats(alphas), tangents=tangents, tangent_mode=tangent_mode,
                    store_tangents=store_tangents, seed=seed, threads=threads, augment=augment,
                    run_dir=str(run_dir or Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}-{method}"))
            typer.echo(f"run directory: {cfg.run_dir}")
            acc = train(cfg, resume=resume is not None, log=typer.echo)
        except Interrupted as exc:
            raise _fail(str(exc), 130) from None
        except KeyboardInterrupt:
            raise _fail("interrupted before training started; nothing was saved.", 130) from None
        except USER_ERRORS as exc:
            raise _fail(str(exc)) from None
        typer.echo(f"test accuracy: {100 * acc:.1f}%")

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
            raise _fail(str(exc)) from None
        typer.echo(f"wrote {out}: load it with build_model({spec['name']!r}, {spec['num_classes']}, "
                   f"{tuple(spec['input_shape'])}, **{spec['config']}).load_state_dict(torch.load({str(out)!r}))")
