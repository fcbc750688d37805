"""The training loop behind `asyncfgd-app train`: data stream, learner, metrics, checkpoints.

A *learner* is what trains: the FGD runtime (sync FGD or the AsyncFGD pipeline over the artifact
graphs) or, for comparison, PyTorch autograd on the same model (``baseline_bp``). The loop only
feeds mini-batches, collects losses, evaluates once per epoch and checkpoints.

Resumability: batches are a pure function of (seed, epoch, batch index), tangents of (seed,
step, module), schedules of the step; the checkpoint holds everything else (weights, BN
statistics, optimizer states, the pipeline's in-flight mini-batches), so a resumed run repeats
the uninterrupted one bit for bit.

``--validation F`` evaluates on a stratified fraction F carved off the training set (and trains on
the rest), for choosing hyper-parameters without looking at the test set; the metrics columns are
then ``val_loss``/``val_acc``. ``--epochs 0`` only evaluates the starting weights (e.g. pretrained
ones before fine-tuning).
"""
from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
from tqdm import tqdm

from asyncfgd.runtime.artifacts import Artifacts, load_artifacts
from asyncfgd.runtime.engine import load_runners, make_scheduler
from asyncfgd.runtime.scheduler import NonFiniteLoss, Perturbation, StepOutcome, evaluate
from asyncfgd.runtime.schedules import AlphaSchedule, lr_at

from . import checkpoint, metrics
from .artifact_cache import ExportOptions, cached_artifacts
from .data import ArrayDataset, BatchStream, DatasetSplits, load_dataset, one_hot, split_validation
from .freeze import freeze_note, frozen_modules
from .memory_model import F32, param_numel

#: test hook: the process SIGKILLs itself after feeding this many mini-batches in total
KILL_ENV = "ASYNCFGD_TEST_SIGKILL_AT_STEP"
EVAL_CHUNK = 512
#: curves.png is redrawn after an epoch only if this long has passed (a redraw costs ~0.2 s), and at the end
PLOT_EVERY_S = 10.0


class TrainError(Exception):
    """The run cannot start or continue as configured; the message says what to change."""


class Diverged(TrainError):
    """The loss became NaN/inf (a learning-rate sweep counts this as a lost candidate, not an error)."""


class Interrupted(Exception):
    """Ctrl-C: a checkpoint was saved at the current batch."""

    def __init__(self, run_dir: Path, epoch: int, batch: int) -> None:
        super().__init__(f"interrupted in epoch {epoch + 1} at batch {batch}; a checkpoint was saved in {run_dir}. "
                         f"Continue with `asyncfgd-app train --resume {run_dir}`.")


@dataclass
class TrainConfig:
    """Everything that determines a run (written to ``config.json`` and into every checkpoint).

    The defaults are the winner of scripts/sweep_defaults.py on digits (README, "Convergence"):
    32 tangents per pass and alpha = 1 on both modules, Adam with a cosine decay, 100 epochs.
    """

    artifacts: str | None = None
    model: str = "mlp"
    modules: int = 2
    split: list[str] | None = None
    bn: str = "train"
    weights: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    data: str = "digits"
    method: str = "asyncfgd"
    backend: str = "onnxruntime"
    optimizer: str = "adam"
    lr: float = 1e-2
    lr_schedule: str = "cosine"
    weight_decay: float = 0.0
    clip_norm: float | None = None
    normalize: float | None = None
    epochs: int = 100
    batch_size: int = 64
    alpha_preset: str = "uniform"
    alpha_value: float = 1.0
    alpha_warm_epochs: float = 10.0
    alpha_ramp_epochs: float = 5.0
    alpha_target: float = 0.15
    alphas: list[float] | None = None
    tangents: int = 32
    tangent_mode: str = "gaussian"
    store_tangents: bool | None = None  # None: store when the copies fit in STORE_TANGENTS_BUDGET
    seed: int = 0
    threads: int = 1
    augment: bool = False
    validation: float = 0.0  # > 0: evaluate on this fraction of the train set, train on the rest
    freeze_until: str | None = None  # modules up to the one holding this layer get alpha 0 (and bp freezes them)
    lr_sweep: str | None = None  # the sweep directory whose winner is ``lr`` (train --lr auto)
    run_dir: str = ""

    def alpha_schedule(self) -> AlphaSchedule:
        return AlphaSchedule(self.alpha_preset, self.alpha_value, self.alpha_warm_epochs, self.alpha_ramp_epochs,
                             self.alpha_target, tuple(self.alphas) if self.alphas is not None else None)

    def lr_fn(self, steps_per_epoch: int) -> Callable[[int], float]:
        """Learning rate by step; ``step`` decays 10x at one and two thirds of training."""
        total = max(self.epochs * steps_per_epoch, 1)  # --epochs 0 builds a learner that never steps
        step_size = max(math.ceil(total / 3), 1)
        return lambda s: lr_at(self.lr_schedule, self.lr, s, total, step_size=step_size)

    def optimizer_kw(self) -> dict[str, Any]:
        return {"weight_decay": self.weight_decay, "clip_norm": self.clip_norm, "normalize": self.normalize}


class Learner(Protocol):
    """What the loop trains: the FGD runtime or the autograd baseline."""

    def feed(self, x: np.ndarray, onehot: np.ndarray) -> list[StepOutcome]:
        """Train on one mini-batch; returns the steps whose loss became known."""
        ...

    def finish(self) -> list[StepOutcome]:
        """Apply every pending update (end of training)."""
        ...

    def evaluate(self, x: np.ndarray) -> np.ndarray:
        """Logits with the current weights, BatchNorm on running statistics."""
        ...

    def state(self) -> tuple[checkpoint.Arrays, dict[str, Any]]:
        ...

    def load_state(self, arrays: checkpoint.Arrays, meta: dict[str, Any]) -> None:
        ...

    def close(self) -> None:
        ...


#: with --store-tangents unset, AsyncFGD keeps its delayed tangents when the copies take at most this
STORE_TANGENTS_BUDGET = 64 << 20  # bytes


def store_tangents(cfg: TrainConfig, arts: Artifacts) -> bool:
    """--store-tangents as given, or when unset: keep each delayed module's tangents until its update
    if all the copies fit in STORE_TANGENTS_BUDGET. The weights come out bit-identical either way;
    regenerating costs a second draw per step (the MLP's default run: 10% of its training time),
    storing costs (K − k) copies of module k's m tangents (the MLP's: 2 MB)."""
    if cfg.store_tangents is not None:
        return cfg.store_tangents
    return cfg.method == "asyncfgd" and copies_fit(arts)


def copies_fit(arts: Artifacts) -> bool:
    """Whether AsyncFGD's tangent copies fit in STORE_TANGENTS_BUDGET (the default of storing them)."""
    return stored_tangent_bytes(arts) <= STORE_TANGENTS_BUDGET


def stored_tangent_bytes(arts: Artifacts) -> int:
    """Memory of AsyncFGD's tangent copies: module k (delay K−1−k) keeps K − k steps of m tangents."""
    K = len(arts.modules)
    return sum((K - k) * arts.tangents * F32 * param_numel(mod.raw) for k, mod in enumerate(arts.modules) if k < K - 1)


class FgdLearner:
    """Sync FGD or AsyncFGD on the runtime (ONNX Runtime or torch backend)."""

    def __init__(self, arts: Artifacts, cfg: TrainConfig, steps_per_epoch: int) -> None:
        self.runners = load_runners(arts, cfg.backend, cfg.threads or None)
        schedule, K = cfg.alpha_schedule(), len(self.runners)
        schedule.alpha(K - 1, K, 0.0)  # a wrong number of --alphas fails here, before training
        frozen = frozen_modules(arts.modules, cfg.freeze_until)

        def alpha(module: int, step: int) -> float:
            return 0.0 if module < frozen else schedule.alpha(module, K, step / steps_per_epoch)

        self.scheduler = make_scheduler(self.runners, cfg.method, cfg.optimizer, cfg.lr_fn(steps_per_epoch), alpha,
                                        Perturbation(cfg.seed, cfg.tangent_mode, store_tangents(cfg, arts)),
                                        cfg.optimizer_kw())

    def feed(self, x: np.ndarray, onehot: np.ndarray) -> list[StepOutcome]:
        return self.scheduler.feed(x, onehot)

    def finish(self) -> list[StepOutcome]:
        return self.scheduler.drain()

    def evaluate(self, x: np.ndarray) -> np.ndarray:
        self.scheduler.flush()
        return evaluate(self.runners, x)

    def state(self) -> tuple[checkpoint.Arrays, dict[str, Any]]:
        return checkpoint.runtime_state(self.runners, self.scheduler)

    def load_state(self, arrays: checkpoint.Arrays, meta: dict[str, Any]) -> None:
        checkpoint.restore_runtime_state(arrays, meta, self.runners, self.scheduler)

    def close(self) -> None:
        self.scheduler.close()


def check_fit(arts: Artifacts, data: DatasetSplits) -> None:
    """Artifacts exported for other inputs or another number of classes cannot train on ``data``."""
    problems = []
    if tuple(arts.input_shape) != tuple(data.input_shape):
        problems.append(f"input shape {tuple(arts.input_shape)} vs {tuple(data.input_shape)}")
    if arts.num_classes != data.num_classes:
        problems.append(f"{arts.num_classes} classes vs {data.num_classes}")
    if problems:
        name = arts.manifest["model"]["name"]
        raise TrainError(
            f"the artifacts in {arts.root} do not fit dataset {data.name}: {'; '.join(problems)} (artifacts vs "
            f"data). Re-export for this dataset: `asyncfgd-app export --model {name} --num-classes "
            f"{data.num_classes} --input-shape {','.join(map(str, data.input_shape))} --out DIR` (with your other "
            f"export options), or train with `--model {name}` instead of --artifacts to export on the fly.")


def resolve_artifacts(cfg: TrainConfig, data: DatasetSplits) -> Artifacts:
    """``--artifacts DIR`` as given, or the cached export of ``--model`` for this dataset."""
    if cfg.artifacts:
        directory = Path(cfg.artifacts)
    else:
        directory = cached_artifacts(ExportOptions(
            cfg.model, data.num_classes, tuple(data.input_shape), cfg.modules,
            tuple(cfg.split) if cfg.split else None, cfg.bn, cfg.tangents, cfg.seed, cfg.weights, cfg.config,
            local_heads=cfg.method == "local", balance_batch=cfg.batch_size))
    arts = load_artifacts(directory)
    check_fit(arts, data)
    return arts


def make_learner(arts: Artifacts, cfg: TrainConfig, steps_per_epoch: int) -> Learner:
    if cfg.method == "bp":
        from .baseline_bp import BpLearner  # imports torch

        return BpLearner(arts, cfg, steps_per_epoch)
    return FgdLearner(arts, cfg, steps_per_epoch)


@dataclass
class RunData:
    """What a run trains on and what it evaluates on after every epoch."""

    train: ArrayDataset
    eval: ArrayDataset
    eval_name: str  # "test", or "val" for a split carved off the train set: the metrics columns' prefix
    num_classes: int


def run_data(cfg: TrainConfig, data: DatasetSplits) -> RunData:
    """The test set, or with ``cfg.validation`` a stratified validation split (fixed by the seed)."""
    if cfg.validation <= 0:
        return RunData(data.train, data.test, "test", data.num_classes)
    if cfg.validation >= 1:
        raise TrainError(f"--validation is the fraction of the train set held out for evaluation, in (0, 1); "
                         f"got {cfg.validation}.")
    kept, held = split_validation(data.train, cfg.validation, cfg.seed)
    return RunData(kept, held, "val", data.num_classes)


def evaluate_split(learner: Learner, ds: ArrayDataset) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) on a whole split, in chunks to bound memory."""
    logits = np.concatenate([learner.evaluate(ds.images[i:i + EVAL_CHUNK]) for i in range(0, len(ds), EVAL_CHUNK)])
    return metrics.cross_entropy(logits, ds.labels), metrics.correct(logits, ds.labels) / len(ds)


@dataclass
class Progress:
    """Where the run stands; saved in every checkpoint."""

    epoch: int = 0
    batch: int = 0
    stats: metrics.EpochStats = field(default_factory=metrics.EpochStats)
    history: list[dict[str, Any]] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def finished_epochs(self) -> int:
        return len(self.history)


class _SigintFlag:
    """Turns Ctrl-C into a flag the loop checks between mini-batches (never mid-update)."""

    def __enter__(self) -> _SigintFlag:
        self.raised = False
        self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, *_: Any) -> None:
        self.raised = True

    def __exit__(self, *_: Any) -> None:
        signal.signal(signal.SIGINT, self._old)


def _save(run_dir: Path, cfg: TrainConfig, model_spec: dict[str, Any], learner: Learner, progress: Progress) -> None:
    arrays, learner_meta = learner.state()
    checkpoint.save(run_dir / checkpoint.FILENAME, arrays, checkpoint.stamp({
        "config": asdict(cfg), "model_spec": model_spec, "learner": learner_meta,
        "position": {"epoch": progress.epoch, "batch": progress.batch}, "stats": progress.stats.to_dict(),
        "history": progress.history, "elapsed_s": progress.elapsed_s}))


def _restore(run_dir: Path, learner: Learner) -> Progress:
    arrays, meta = checkpoint.load(run_dir / checkpoint.FILENAME)
    learner.load_state(arrays, meta["learner"])
    pos = meta["position"]
    return Progress(pos["epoch"], pos["batch"], metrics.EpochStats(**meta["stats"]), meta["history"],
                    meta["elapsed_s"])


def saved_config(run_dir: Path) -> TrainConfig:
    """The configuration of the run in ``run_dir``, from its checkpoint (for --resume)."""
    _, meta = checkpoint.load(run_dir / checkpoint.FILENAME)
    return TrainConfig(**meta["config"])


def _write_config(run_dir: Path, cfg: TrainConfig, arts: Artifacts, data: DatasetSplits, rd: RunData,
                  steps: int) -> None:
    resolved = {**asdict(cfg), "store_tangents": store_tangents(cfg, arts), "artifacts_dir": str(arts.root),
                "model_spec": arts.manifest["model"],
                "num_modules": len(arts.modules), "artifact_tangents": arts.tangents, "bn_mode": arts.bn_mode,
                "frozen_modules": frozen_modules(arts.modules, cfg.freeze_until),
                "dataset": {"name": data.name, "train": len(rd.train), rd.eval_name: len(rd.eval),
                            "evaluated_on": "validation" if rd.eval_name == "val" else "test"},
                "steps_per_epoch": steps, "total_steps": steps * cfg.epochs}
    (run_dir / "config.json").write_text(json.dumps(resolved, indent=1) + "\n")


def train(cfg: TrainConfig, resume: bool = False, log: Callable[[str], None] = print, bars: bool = True) -> float:
    """Run (or continue) training; returns the final accuracy on the evaluation split (test or validation).

    ``bars=False`` hides the per-epoch progress bars (runs in parallel would garble the terminal).
    """
    run_dir = Path(cfg.run_dir)
    if not resume and (run_dir / checkpoint.FILENAME).exists():
        raise TrainError(f"{run_dir} already holds a run; continue it with `--resume {run_dir}` or pick another "
                         f"--run-dir.")
    data = load_dataset(cfg.data)
    rd = run_data(cfg, data)
    arts = resolve_artifacts(cfg, data)
    note = freeze_note(arts.modules, cfg.freeze_until)  # an unknown layer fails here, before any output
    stream = BatchStream(rd.train, cfg.batch_size, cfg.seed, shuffle=True, augment=cfg.augment)
    steps = len(stream)
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_config(run_dir, cfg, arts, data, rd, steps)
    if note:
        log(note)
    learner = make_learner(arts, cfg, steps)
    try:
        if cfg.epochs == 0 and not resume:
            return _evaluate_only(cfg, run_dir, rd, learner, log, arts.manifest["model"])
        progress = _restore(run_dir, learner) if resume else Progress()
        if progress.finished_epochs >= cfg.epochs:
            log(f"{run_dir} has finished its {cfg.epochs} epochs already (extend it with --epochs).")
        else:
            _loop(cfg, run_dir, rd, stream, learner, progress, log, arts.manifest["model"], bars)
        return progress.history[-1][f"{rd.eval_name}_acc"]
    except NonFiniteLoss as exc:
        kept = (f"the last good checkpoint (after epoch {progress.finished_epochs}) in {run_dir} is kept"
                if (run_dir / checkpoint.FILENAME).exists() else "no checkpoint had been written yet")
        raise Diverged(f"training diverged: {exc}. No update was applied for that step and {kept}. Lower the "
                         f"learning rate, e.g. by 10x (--lr {cfg.lr / 10:g}), or bound each update with --clip-norm "
                         f"(e.g. 1.0), and start a new run.") from None
    finally:
        learner.close()


def _evaluate_only(cfg: TrainConfig, run_dir: Path, rd: RunData, learner: Learner, log: Callable[[str], None],
                   model_spec: dict[str, Any]) -> float:
    """``--epochs 0``: one metrics row (epoch 0, no training columns) for the starting weights; no checkpoint."""
    loss, acc = evaluate_split(learner, rd.eval)
    nan = float("nan")
    row = {"epoch": 0, "train_loss": nan, "train_acc": nan, f"{rd.eval_name}_loss": round(loss, 6),
           f"{rd.eval_name}_acc": round(acc, 6), "samples_per_s": 0.0, "wall_s": 0.0,
           "peak_rss_mb": round(metrics.peak_rss_mb(), 1)}
    metrics.write_csv(run_dir / "metrics.csv", [row], rd.eval_name)
    log(f"epoch 0 (starting weights, no training): {rd.eval_name} loss {loss:.4f} acc {acc:.1%}")
    return acc


def _loop(cfg: TrainConfig, run_dir: Path, rd: RunData, stream: BatchStream, learner: Learner,
          progress: Progress, log: Callable[[str], None], model_spec: dict[str, Any], bars: bool) -> None:
    kill_at = int(os.environ.get(KILL_ENV, "0"))
    fed_total = progress.epoch * len(stream) + progress.batch
    started = time.perf_counter() - progress.elapsed_s
    plotted = time.perf_counter()
    with _SigintFlag() as sigint:
        for epoch in range(progress.epoch, cfg.epochs):
            stats = progress.stats
            bar = tqdm(total=len(stream), initial=progress.batch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                       unit="batch", leave=False, dynamic_ncols=True, disable=not bars)
            tick = time.perf_counter()
            for i, (x, y) in enumerate(stream.epoch(epoch, progress.batch), start=progress.batch):
                for out in learner.feed(x, one_hot(y, rd.num_classes)):
                    stats.add(out.loss, out.logits, out.labels)
                stats.fed += len(y)
                fed_total += 1
                if fed_total == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                now = time.perf_counter()
                stats.seconds, tick = stats.seconds + now - tick, now
                bar.update()
                bar.set_postfix({"loss": f"{stats.loss:.3f}", "acc": f"{stats.acc:.1%}",
                                 "samples/s": f"{stats.samples_per_s:.0f}"}, refresh=False)
                if sigint.raised:
                    bar.close()
                    progress.epoch, progress.batch = epoch, i + 1
                    progress.elapsed_s = time.perf_counter() - started
                    _save(run_dir, cfg, model_spec, learner, progress)
                    raise Interrupted(run_dir, epoch, i + 1)
            bar.close()
            last = epoch == cfg.epochs - 1
            if last:
                for out in learner.finish():
                    stats.add(out.loss, out.logits, out.labels)
            eval_loss, eval_acc = evaluate_split(learner, rd.eval)
            progress.elapsed_s = time.perf_counter() - started
            progress.history.append({
                "epoch": epoch + 1, "train_loss": round(stats.loss, 6), "train_acc": round(stats.acc, 6),
                f"{rd.eval_name}_loss": round(eval_loss, 6), f"{rd.eval_name}_acc": round(eval_acc, 6),
                "samples_per_s": round(stats.samples_per_s, 1), "wall_s": round(progress.elapsed_s, 3),
                "peak_rss_mb": round(metrics.peak_rss_mb(), 1)})
            progress.epoch, progress.batch, progress.stats = epoch + 1, 0, metrics.EpochStats()
            _save(run_dir, cfg, model_spec, learner, progress)
            metrics.write_csv(run_dir / "metrics.csv", progress.history, rd.eval_name)
            if last or time.perf_counter() - plotted > PLOT_EVERY_S:
                metrics.plot(run_dir / "curves.png", progress.history, f"{model_spec['name']} - {cfg.method}",
                             rd.eval_name)
                plotted = time.perf_counter()
            log(f"epoch {epoch + 1}/{cfg.epochs}: train loss {stats.loss:.4f} acc {stats.acc:.1%} | {rd.eval_name} "
                f"loss {eval_loss:.4f} acc {eval_acc:.1%} | {stats.samples_per_s:.0f} samples/s")
