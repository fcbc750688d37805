"""The training loop behind `asyncfgd-app train`: data stream, learner, metrics, checkpoints.

The loop only feeds mini-batches to a learner (learners.py), collects losses, evaluates once per
epoch and checkpoints.

Resumability: batches are a pure function of (seed, epoch, batch index), tangents of (seed,
step, module), schedules of the step; the checkpoint holds everything else (weights, BN
statistics, optimizer states, the pipeline's in-flight mini-batches), so a resumed run repeats
the uninterrupted one bit for bit.

The console shows one progress bar for the whole run (on a terminal only) and a summary line
every ``--log-every`` epochs; ``--log`` also sends every epoch to TensorBoard and/or MLflow
(run_log.py). metrics.csv and curves.png are written either way.

``--validation F`` evaluates on a stratified fraction F carved off the training set (and trains on
the rest), for choosing hyper-parameters without looking at the test set; the metrics columns are
then ``val_loss``/``val_acc``. ``--epochs 0`` only evaluates the starting weights (e.g. pretrained
ones before fine-tuning).
"""
from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from asyncfgd.app.training import checkpoint, distributed, metrics, run_log
from asyncfgd.app.training.artifact_cache import ExportOptions, cached_artifacts
from asyncfgd.app.training.config import Diverged, Interrupted, TrainConfig, TrainError
from asyncfgd.app.training.data import ArrayDataset, BatchStream, DatasetSplits, load_dataset, one_hot, split_validation
from asyncfgd.app.training.distributed import Group
from asyncfgd.app.training.freeze import freeze_note, frozen_modules
from asyncfgd.app.training.learners import Learner, make_learner, store_tangents
from asyncfgd.runtime.artifacts import Artifacts, load_artifacts
from asyncfgd.runtime.engine import ACTIVITY_METHOD, LOCAL_METHOD
from asyncfgd.runtime.scheduler import NonFiniteLoss

EVAL_CHUNK = 512
#: failures rank 0 shares with every rank of a distributed run (so that all stop with its message)
USER_FACING = (TrainError, checkpoint.CheckpointError, OSError, ValueError)
#: the run's one progress bar, e.g. ``epoch 9/100   8%|█     | ETA 01:02, loss 0.210 acc 95.4% | test 95.3%``:
#: fits 80 columns (the bar takes what is left); samples/s are in metrics.csv and the run logs
BAR_FORMAT = "{desc} {percentage:3.0f}%|{bar}| ETA {remaining}{postfix}"
#: curves.png is redrawn after an epoch only if this long has passed (a redraw costs ~0.2 s), and at the end
PLOT_EVERY_S = 10.0


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
            local_heads=cfg.method == LOCAL_METHOD, balance_batch=cfg.batch_size,
            activity=cfg.method == ACTIVITY_METHOD, perturb=tuple(sorted(cfg.perturb.items()))))
    arts = load_artifacts(directory)
    check_fit(arts, data)
    if cfg.method == ACTIVITY_METHOD and any(m.activity is None for m in arts.modules):
        raise TrainError(f"the artifacts in {arts.root} have no local-activity graphs; export them with "
                         "`asyncfgd-app export --activity ...` or train with --model to export on the fly.")
    return arts


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
    """(mean cross-entropy, accuracy) on a whole split, in chunks to bound memory; NaN on a distributed
    rank that does not hold the logits."""
    learner.before_eval()
    chunks = [learner.evaluate(ds.images[i:i + EVAL_CHUNK]) for i in range(0, len(ds), EVAL_CHUNK)]
    if any(c is None for c in chunks):
        return float("nan"), float("nan")
    logits = np.concatenate([c for c in chunks if c is not None])
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


class _NoSigint:
    """A flag that Ctrl-C never sets (distributed ranks leave SIGINT to the launcher)."""

    raised = False

    def __enter__(self) -> _NoSigint:
        return self

    def __exit__(self, *_: Any) -> None:
        return None


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


def _save(run_dir: Path, cfg: TrainConfig, model_spec: dict[str, Any], learner: Learner, progress: Progress,
          group: Group | None = None) -> None:
    arrays, learner_meta = learner.state()  # distributed: gathered on rank 0
    if group is not None and not group.writer:
        return
    checkpoint.save(run_dir / checkpoint.FILENAME, arrays, checkpoint.stamp({
        "config": asdict(cfg), "model_spec": model_spec, "learner": learner_meta,
        "position": {"epoch": progress.epoch, "batch": progress.batch}, "stats": progress.stats.to_dict(),
        "history": progress.history, "elapsed_s": progress.elapsed_s}))


def _restore(run_dir: Path, learner: Learner, group: Group | None = None) -> Progress:
    """The checkpoint (read by rank 0 and sent to every rank when distributed)."""
    if group is None:
        arrays, meta = checkpoint.load(run_dir / checkpoint.FILENAME)
    else:
        arrays, meta = _agree(group, lambda: checkpoint.load(run_dir / checkpoint.FILENAME))
    learner.load_state(arrays, meta["learner"])
    pos = meta["position"]
    return Progress(pos["epoch"], pos["batch"], metrics.EpochStats(**meta["stats"]), meta["history"],
                    meta["elapsed_s"])


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


def _agree(group: Group, job: Callable[[], Any]) -> Any:
    """``job``'s result on rank 0, or its user-facing error, on every rank (so all ranks go on or stop)."""
    result: Any = None
    error: str | None = None
    if group.writer:
        try:
            result = job()
        except USER_FACING as exc:
            error = str(exc)
    result, error = group.share((result, error))
    if error is not None:
        raise TrainError(error)
    return result


def train(cfg: TrainConfig, resume: bool = False, log: Callable[[str], None] = print, bars: bool = True,
          group: Group | None = None) -> float:
    """Run (or continue) training; returns the final accuracy on the evaluation split (test or validation;
    NaN on the distributed ranks other than 0, which write nothing).

    ``bars=False`` hides the per-epoch progress bars (runs in parallel would garble the terminal).
    """
    run_dir = Path(cfg.run_dir)
    writer = group is None or group.writer
    if not writer:
        log, bars, cfg_logs = (lambda _: None), False, replace(cfg, log=[])
    else:
        cfg_logs = cfg

    def fresh() -> None:
        if not resume and (run_dir / checkpoint.FILENAME).exists():
            raise TrainError(f"{run_dir} already holds a run; continue it with `--resume {run_dir}` or pick "
                             f"another --run-dir.")

    if group is None:
        fresh()
    else:
        _agree(group, fresh)
    run_log.check(cfg.log)  # a missing TensorBoard/MLflow library fails here, before any work
    data = load_dataset(cfg.data)
    rd = run_data(cfg, data)
    if group is None:
        arts = resolve_artifacts(cfg, data)
    else:  # rank 0 exports into the cache first; the others then find it there
        _agree(group, lambda: resolve_artifacts(cfg, data).root)
        arts = resolve_artifacts(cfg, data)
    distributed.check(cfg, group, len(arts.modules))
    note = freeze_note(arts.modules, cfg.freeze_until)  # an unknown layer fails here, before any output
    stream = BatchStream(rd.train, cfg.batch_size, cfg.seed, shuffle=True, augment=cfg.augment)
    steps = len(stream)
    if writer:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_config(run_dir, cfg, arts, data, rd, steps)
    if note:
        log(note)
    learner = (make_learner(arts, cfg, steps) if group is None
               else distributed.make_distributed_learner(arts, cfg, steps, group, log))
    try:
        if cfg.epochs == 0 and not resume:
            with run_log.RunLog.open(cfg_logs, run_dir, 0, log) as sinks:
                return _evaluate_only(run_dir, rd, learner, log, sinks, writer)
        progress = _restore(run_dir, learner, group) if resume else Progress()
        if progress.finished_epochs >= cfg.epochs:
            log(f"{run_dir} has finished its {cfg.epochs} epochs already (extend it with --epochs).")
        else:
            with run_log.RunLog.open(cfg_logs, run_dir, progress.finished_epochs + 1, log) as sinks:
                _loop(cfg, run_dir, rd, stream, learner, progress, log, arts, bars, sinks, group)
        return progress.history[-1][f"{rd.eval_name}_acc"]
    except NonFiniteLoss as exc:
        kept = (f"the last good checkpoint (after epoch {progress.finished_epochs}) in {run_dir} is kept"
                if (run_dir / checkpoint.FILENAME).exists() else "no checkpoint had been written yet")
        raise Diverged(f"training diverged: {exc}. No update was applied for that step and {kept}. Lower the "
                         f"learning rate, e.g. by 10x (--lr {cfg.lr / 10:g}), or bound each update with --clip-norm "
                         f"(e.g. 1.0), and start a new run.") from None
    finally:
        learner.close()


def _evaluate_only(run_dir: Path, rd: RunData, learner: Learner, log: Callable[[str], None],
                   sinks: run_log.RunLog, writer: bool = True) -> float:
    """``--epochs 0``: one metrics row (epoch 0, no training columns) for the starting weights; no checkpoint."""
    loss, acc = evaluate_split(learner, rd.eval)
    if not writer:
        return acc
    sinks.write(0, {f"loss/{rd.eval_name}": loss, f"accuracy/{rd.eval_name}": acc})
    nan = float("nan")
    row = {"epoch": 0, "train_loss": nan, "train_acc": nan, f"{rd.eval_name}_loss": round(loss, 6),
           f"{rd.eval_name}_acc": round(acc, 6), "samples_per_s": 0.0, "wall_s": 0.0,
           "peak_rss_mb": round(metrics.peak_rss_mb(), 1)}
    metrics.write_csv(run_dir / "metrics.csv", [row], rd.eval_name)
    log(f"epoch 0 (starting weights, no training): {rd.eval_name} loss {loss:.4f} acc {acc:.1%}")
    return acc


def _clock(seconds: float) -> str:
    """Elapsed time as m:ss or h:mm:ss."""
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def _bar_disable(bars: bool) -> bool | None:
    """tqdm's ``disable``: off when asked (``bars=False``, TQDM_DISABLE set), else None: drawn only when
    stderr is a terminal, so a log file or a pipe gets the summary lines and no bar redraws."""
    if not bars or os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false"):
        return True
    return None


def _scalars(eval_name: str, stats: metrics.EpochStats, eval_loss: float, eval_acc: float, lr: float,
             alphas: list[float], norms: list[float | None]) -> dict[str, float]:
    """One epoch's record for the run logs (run_log.py): the step is the epoch, lr and α at its last step,
    each module's mean estimate norm ‖ĝ‖ over the epoch's updates."""
    out = {"loss/train": stats.loss, f"loss/{eval_name}": eval_loss, "accuracy/train": stats.acc,
           f"accuracy/{eval_name}": eval_acc, "lr": lr, "samples_per_s": stats.samples_per_s,
           **{f"alpha/module{k}": a for k, a in enumerate(alphas)},
           **{f"estimate_norm/module{k}": v for k, v in enumerate(norms) if v is not None}}
    if stats.jvp_rms is not None:
        out["fgd/jvp_rms"] = stats.jvp_rms
    return out


def _loop(cfg: TrainConfig, run_dir: Path, rd: RunData, stream: BatchStream, learner: Learner,
          progress: Progress, log: Callable[[str], None], arts: Artifacts, bars: bool,
          sinks: run_log.RunLog, group: Group | None = None) -> None:
    """The epochs left: one bar over every step of the run, a summary line every ``cfg.summary_every()``
    epochs (and after the first and the last), each epoch into metrics.csv, curves.png and the run logs."""
    model_spec = arts.manifest["model"]
    steps, every = len(stream), cfg.summary_every()
    lr_at = cfg.lr_fn(steps)
    first = progress.epoch
    started = time.perf_counter() - progress.elapsed_s
    plotted = time.perf_counter()
    last_eval = f" | {rd.eval_name} {progress.history[-1][f'{rd.eval_name}_acc']:.1%}" if progress.history else ""
    bar = tqdm(total=cfg.epochs * steps, initial=progress.epoch * steps + progress.batch, leave=False,
               dynamic_ncols=True, disable=_bar_disable(bars), bar_format=BAR_FORMAT)

    def say(line: str) -> None:
        if bar.disable:
            log(line)
        else:
            with tqdm.external_write_mode():  # clear the bar, print, redraw it
                log(line)

    writer = group is None or group.writer
    # distributed ranks cannot all stop at the same batch on Ctrl-C: the launcher ends them, and the run
    # resumes from the last epoch's checkpoint
    with (_SigintFlag() if group is None else _NoSigint()) as sigint, bar:
        for epoch in range(progress.epoch, cfg.epochs):
            stats = progress.stats
            bar.set_description_str(f"epoch {epoch + 1}/{cfg.epochs}", refresh=False)
            tick = time.perf_counter()
            for i, (x, y) in enumerate(stream.epoch(epoch, progress.batch), start=progress.batch):
                for out in learner.feed(x, one_hot(y, rd.num_classes)):
                    stats.add(out)
                stats.fed += len(y)
                if group is not None:
                    group.heartbeat(epoch * steps + i)
                now = time.perf_counter()
                stats.seconds, tick = stats.seconds + now - tick, now
                bar.update()
                bar.set_postfix_str(f"loss {stats.loss:.3f} acc {stats.acc:.1%}{last_eval}", refresh=False)
                if sigint.raised:
                    progress.epoch, progress.batch = epoch, i + 1
                    progress.elapsed_s = time.perf_counter() - started
                    _save(run_dir, cfg, model_spec, learner, progress, group)
                    raise Interrupted(run_dir, epoch, i + 1)
            last = epoch == cfg.epochs - 1
            if last:
                for out in learner.finish():
                    stats.add(out)
            # (data-parallel: this also averages the ranks' BatchNorm statistics, which the checkpoint saves)
            eval_loss, eval_acc = evaluate_split(learner, rd.eval)
            progress.elapsed_s = time.perf_counter() - started
            progress.history.append({
                "epoch": epoch + 1, "train_loss": round(stats.loss, 6), "train_acc": round(stats.acc, 6),
                f"{rd.eval_name}_loss": round(eval_loss, 6), f"{rd.eval_name}_acc": round(eval_acc, 6),
                "samples_per_s": round(stats.samples_per_s, 1), "wall_s": round(progress.elapsed_s, 3),
                "peak_rss_mb": round(metrics.peak_rss_mb(), 1)})
            # the run logs before the checkpoint: a process killed in between repeats this epoch on resume,
            # which the logs hide or skip (run_log.py), instead of leaving a gap
            end_step = (epoch + 1) * steps - 1
            sinks.write(epoch + 1, _scalars(rd.eval_name, stats, eval_loss, eval_acc, lr_at(end_step),
                                            learner.alphas(end_step), learner.estimate_norms()))
            progress.epoch, progress.batch, progress.stats = epoch + 1, 0, metrics.EpochStats()
            _save(run_dir, cfg, model_spec, learner, progress, group)
            if not writer:
                continue
            metrics.write_csv(run_dir / "metrics.csv", progress.history, rd.eval_name)
            if last or time.perf_counter() - plotted > PLOT_EVERY_S:
                metrics.plot(run_dir / "curves.png", progress.history, f"{model_spec['name']} - {cfg.method}",
                             rd.eval_name)
                plotted = time.perf_counter()
            last_eval = f" | {rd.eval_name} {eval_acc:.1%}"
            if last or epoch == first or (epoch + 1) % every == 0:
                say(f"epoch {epoch + 1}/{cfg.epochs}: train loss {stats.loss:.3f} acc {stats.acc:.1%} | "
                    f"{rd.eval_name} loss {eval_loss:.3f} acc {eval_acc:.1%} | {_clock(progress.elapsed_s)}")
