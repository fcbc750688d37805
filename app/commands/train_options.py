"""train's options as typer ``Annotated`` aliases: `train`, `sweep` and `pretrain` declare the ones
they take with them, so an option's name, checks and help are written once. Defaults stay in the
commands' signatures (TrainConfig's, ``D``), where a command may give its own."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from asyncfgd.app.training import run_log
from asyncfgd.app.training.config import TrainConfig
from asyncfgd.app.training.distributed import MODES as DISTRIBUTED_MODES
from asyncfgd.app.training.learners import STORE_TANGENTS_BUDGET
from asyncfgd.runtime.contract import BN_MODES
from asyncfgd.runtime.engine import BACKENDS, METHODS
from asyncfgd.runtime.host_memory import MEMORY_MODES
from asyncfgd.runtime.optim import OPTIMIZERS
from asyncfgd.runtime.perturb import MODES
from asyncfgd.runtime.schedules import ALPHA_PRESETS, LR_KINDS

D = TrainConfig()  # the defaults, in one place
AUTO = "auto"


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


def _log(values: list[str] | None) -> list[str]:
    """``--log``: repeated and/or comma-separated sink names -> a list (empty when not given)."""
    try:
        return run_log.parse(values)
    except run_log.RunLogError as exc:
        raise typer.BadParameter(str(exc)) from None


ArtifactsOpt = Annotated[Path | None, typer.Option(
    "--artifacts", help="Artifact directory from `asyncfgd-app export`. Use it to train exactly what "
    "you exported (e.g. on a device without torch). Without it, --model is exported on the fly and cached.")]
MODEL_HELP = (
    "Model to export on the fly, in one of three forms. NAME: the zoo, mlp, cnn, resnet18, resnet18-imagenet, "
    "resnet50-imagenet, mobilenetv2 (mlp/cnn suit digits; the ResNet/MobileNet suit 32x32 image datasets, the "
    "-imagenet ones 224x224). torchvision:NAME: a torchvision.models architecture, e.g. torchvision:resnet18, "
    "freshly initialised (never downloaded; "
    "pretrained weights via --weights FILE); needs `pip install 'asyncfgd[vision]'`. PATH.py:FACTORY: a function "
    "or nn.Module class in your own file that returns the model; --config KEY=VALUE become its keyword "
    "arguments, and it gets num_classes if it has a parameter of that name.")
ModelOpt = Annotated[str, typer.Option(help=MODEL_HELP)]
ModulesOpt = Annotated[int, typer.Option(
    min=1, help="Pipeline modules K (AsyncFGD runs them concurrently; "
    "module k lags K-1-k steps). More modules = more overlap but staler updates.")]
SplitOpt = Annotated[str | None, typer.Option(
    help="Cut before these layers instead of balancing K by FLOPs, "
    "e.g. layers.2 or layer2,layer4.")]
BnOpt = Annotated[Literal[BN_MODES], typer.Option(
    help="BatchNorm during training: train (batch statistics) or "
    "frozen (running statistics, e.g. when fine-tuning pretrained weights).")]
WEIGHTS_HELP = (
    "Local state_dict (.pth) to start from (fine-tuning), e.g. torchvision's for torchvision:NAME; every tensor "
    "must match by name and shape, except a classifier head of another size, which is re-initialised (for "
    "torchvision and file models the head is the last module whose weight has num_classes rows).")
CONFIG_HELP = (
    "Model option KEY=VALUE, repeatable (values are JSON, or comma-separated lists): zoo options, e.g. "
    "hidden=256,128 (mlp), channels=16,32 (cnn), width=32 (resnet18); keyword arguments of the torchvision "
    "builder (e.g. dropout=0.1) or of your FACTORY.")
WeightsOpt = Annotated[Path | None, typer.Option(help=WEIGHTS_HELP)]
ConfigOpt = Annotated[list[str] | None, typer.Option("--config", help=CONFIG_HELP)]
DataOpt = Annotated[str, typer.Option(
    help="Dataset: digits, digits-transfer, digits-transfer-pretrain, mnist-5k, shapes32, "
    "cifar10:PATH, svhn:PATH, imagefolder:PATH[:SIZE] (docs/usage.md).")]
MethodOpt = Annotated[Literal[(*METHODS, "bp")], typer.Option(
    help="asyncfgd: pipelined forward gradients (the product); fgd: synchronous forward gradients "
    "(no staleness, no overlap); local-activity: pipelined, each module a block that learns from its own head's "
    "loss with activity perturbation (noise on pre-activations, not weights): learns from scratch far better; "
    "local: experimental, local heads with weight perturbation; bp: PyTorch backprop on the same model and data, "
    "as a baseline.")]
BackendOpt = Annotated[Literal[BACKENDS], typer.Option(
    help="Where FGD runs: onnxruntime (CPU, no torch "
    "needed), torch / torch-cuda, tensorrt (Jetson).")]
OptimizerOpt = Annotated[Literal[OPTIMIZERS], typer.Option(
    help="adam copes best with the noisy forward gradient; sgd/momentum need a smaller --lr "
    "(e.g. 1e-3).")]
LrOpt = Annotated[str, typer.Option(
    callback=_lr, help="Base learning rate (default 1e-2; 3e-3 with --method local-activity; lower it 10x if the "
    "loss becomes NaN), or 'auto': "
    "first a short sweep (`asyncfgd-app sweep`: 1e-5..1e-2, up to 10 epochs each, on a validation split of the "
    "train set) picks it; config.json records the choice and the sweep's directory.")]
LrScheduleOpt = Annotated[Literal[LR_KINDS], typer.Option(
    help="constant; cosine (decays to 0 at the end); step (10x lower at 1/3 and 2/3).")]
WeightDecayOpt = Annotated[float, typer.Option(
    min=0.0, help="L2 penalty added to the gradient.")]
NormalizeOpt = Annotated[float | None, typer.Option(
    min=0.0, max=0.9999, help="Variance reduction for FGD methods: divide each module's gradient estimate "
    "by the running RMS of its estimates (this decay, e.g. 0.99). Makes SGD step sizes independent of the noise "
    "level; costs one extra pass over the gradient per step. Adam already normalises per element.")]
ClipNormOpt = Annotated[float | None, typer.Option(
    help="Clip each module's gradient estimate to this L2 "
    "norm; use it against rare huge steps (or NaN losses).")]
EpochsOpt = Annotated[int, typer.Option(
    min=0, help="Passes over the training set (may be changed on --resume). "
    "0: only evaluate the starting weights, e.g. pretrained ones before fine-tuning.")]
BatchSizeOpt = Annotated[int, typer.Option(
    min=1, help="Mini-batch size.")]
AlphaPresetOpt = Annotated[Literal[ALPHA_PRESETS], typer.Option(
    help="Per-module tangent scale alpha (0 freezes a module and removes its noise). "
    "uniform: --alpha-value on every module (best on the small zoo models with many tangents); paper: "
    "head-first, the head module alone for --alpha-warm-epochs, then the others ramp to --alpha-target "
    "(try it when the body has far more weights than the head and few tangents are affordable); "
    "head-only: only the last module learns; constant: --alphas.")]
AlphaValueOpt = Annotated[float, typer.Option(
    min=0.0, help="alpha of every module for uniform.")]
AlphaWarmEpochsOpt = Annotated[float, typer.Option(
    min=0.0, help="paper: epochs with only the "
    "head module learning.")]
AlphaRampEpochsOpt = Annotated[float, typer.Option(
    min=0.0, help="paper: epochs of linear ramp "
    "of the other modules' alpha.")]
AlphaTargetOpt = Annotated[float, typer.Option(
    min=0.0, help="paper: the other modules' final alpha "
    "(small: their forward-gradient noise is large).")]
AlphasOpt = Annotated[str | None, typer.Option(
    help="constant: one alpha per module, e.g. 0.15,1.")]
TangentsOpt = Annotated[int, typer.Option(
    min=1, help="Tangents per forward pass (exported into the "
    "graphs): the gradient noise falls as 1/M for M times the tangent compute. "
    "The main lever on accuracy; lower it to train faster. Default 32; 4 with --method local-activity.")]
PerturbOpt = Annotated[list[str] | None, typer.Option(
    "--perturb", metavar="LAYER=activity|weight", show_default=False,
    help="local-activity: perturb this layer's pre-activations (activity) or its weights (weight), repeatable. "
    "Default per layer: activity where the layer has more weights than activations per sample / batch size "
    "(the lower-variance choice), else weight; layers other than linear and ungrouped conv are always "
    "weight-perturbed.")]
TangentModeOpt = Annotated[Literal[MODES], typer.Option(
    help="Tangent distribution; orthogonal makes "
    "several tangents per pass cover distinct directions.")]
StoreTangentsOpt = Annotated[bool | None, typer.Option(
    "--store-tangents/--no-store-tangents", show_default=False,
    help="Keep tangents until their delayed update instead of regenerating them from the seed (more memory, "
    "less compute; the weights are identical either way). Default: keep them when the copies fit in "
    f"{STORE_TANGENTS_BUDGET >> 20} MiB.")]
SeedOpt = Annotated[int, typer.Option(
    min=0, help="Seed of the initial weights, data order and tangents.")]
ThreadsOpt = Annotated[int, typer.Option(
    min=0, help="Threads per module (ONNX Runtime intra-op, or torch). "
    "1 suits small models, whose K modules already run concurrently; for large "
    "ones try cores / K. 0: the runtime's own choice.")]
MemoryOpt = Annotated[Literal[MEMORY_MODES], typer.Option(
    help="How ONNX Runtime holds memory. fast: its arena, which keeps freed blocks for reuse; lean: no "
    "arena and no buffer reuse, freed tensors go back to the OS at once, so the peak follows the live "
    "tensors: 7-30% less peak memory on ResNets, 20-40% slower steps (docs/performance.md). "
    "Only the onnxruntime backend has it; may change on --resume.")]
AugmentOpt = Annotated[bool, typer.Option(
    help="Random crops (and flips where labels allow them).")]
ValidationOpt = Annotated[float, typer.Option(
    min=0.0, max=0.9, help="Hold out this stratified fraction of "
    "the train set, train on the rest and evaluate on it instead of the test set "
    "(metrics columns val_loss/val_acc): for tuning without touching the test set.")]
FreezeUntilOpt = Annotated[str | None, typer.Option(
    help="Keep the pipeline modules up to and including the one that holds this layer (or block, e.g. "
    "flatten, features.1) frozen: alpha 0 whatever --alpha-preset says, so they run forward only and never "
    "update; with --method bp their parameters get no gradient. For fine-tuning: freeze the pretrained body "
    "and cut it from the head with --split HEAD_LAYER.")]
DistributedOpt = Annotated[Literal[DISTRIBUTED_MODES] | None, typer.Option(
    help="Under torchrun (docs/distributed.md): data = every rank trains on its shard of each global batch and "
    "the ranks exchange m + 3 numbers a step (fgd, asyncfgd); pipeline = rank k runs module k of the AsyncFGD "
    "pipeline (world size = --modules). Rank 0 writes the run directory. Needs torch on every device.",
    show_default=False)]
DriftCheckEveryOpt = Annotated[int, typer.Option(
    min=0, help="--distributed data: compare the ranks' weight digests every N steps (rank 0's weights replace "
    "a rank's that drifted; 0: never).")]
DistTimeoutOpt = Annotated[float, typer.Option(
    min=1.0, help="--distributed: seconds a rank waits for the others before it gives up (longer than rank 0's "
    "evaluation and checkpoint writing).")]
RunDirOpt = Annotated[Path | None, typer.Option(
    help="Output directory (default: runs/TIME-MODEL-METHOD).")]
ResumeOpt = Annotated[Path | None, typer.Option(
    help="Continue the run in this directory from its last "
    "checkpoint, with its saved settings (only --epochs, --log and --log-every may change).")]
LogOpt = Annotated[list[str] | None, typer.Option(
    "--log", metavar="SINK", callback=_log, show_default=False,
    help="Also send every epoch (losses, accuracies, learning rate, alpha per module, samples/s) to "
    "tensorboard (event files in RUN_DIR/tensorboard; `pip install 'asyncfgd[tensorboard]'`) and/or mlflow (a run "
    "in RUN_DIR/mlruns or $MLFLOW_TRACKING_URI; `pip install 'asyncfgd[mlflow]'`). Repeat it or use commas: "
    "--log tensorboard,mlflow. Default: none; metrics.csv and curves.png are always written.")]
LogEveryOpt = Annotated[int | None, typer.Option(
    min=1, show_default=False, help="Print a summary line every N epochs (and after the first and the last). "
    "Default: epochs / 10, about ten lines a run; on a terminal one progress bar shows the rest.")]
