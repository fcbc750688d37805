"""Run logging (``train --log tensorboard,mlflow``): fan each epoch's record out to the chosen sinks.

metrics.csv and curves.png are written whatever is chosen (metrics.py); the sinks here are extra
views of the same epochs for the usual dashboards:

* ``tensorboard``: event files in ``RUN_DIR/tensorboard`` through tensorboardX (no torch needed);
  ``tensorboard --logdir RUN_DIR/tensorboard`` shows them.
* ``mlflow``: one MLflow run holding the TrainConfig as parameters and the same scalars as
  metrics, in the tracking store ``$MLFLOW_TRACKING_URI`` or else the file store ``RUN_DIR/mlruns``
  (``mlflow ui --backend-store-uri RUN_DIR/mlruns``); the run's id is kept in ``RUN_DIR/mlflow_run.json``.

The step of every value is the epoch (1-based, as in metrics.csv). A resumed run appends to the
same logs: TensorBoard hides whatever a killed process wrote from the resumed epoch on (its
``purge_step``), MLflow skips the epochs its run already holds, so no epoch appears twice. A sink
that fails mid-run (full disk, unreachable server) is reported once and dropped; training goes on.
"""
from __future__ import annotations

import importlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from asyncfgd.app.training.config import Interrupted, TrainConfig, TrainError

#: sink name -> (module it needs, the extra that installs it)
SINKS = {"tensorboard": ("tensorboardX", "tensorboard"), "mlflow": ("mlflow", "mlflow")}
TENSORBOARD_DIR = "tensorboard"
MLRUNS_DIR = "mlruns"
MLFLOW_STATE = "mlflow_run.json"
MLFLOW_EXPERIMENT = "asyncfgd"


class RunLogError(TrainError):
    """A --log sink cannot be used (unknown name, library missing); the message says what to install."""


def parse(values: list[str] | None) -> list[str]:
    """``--log`` values (repeated and/or comma-separated) -> sink names in order, without repeats."""
    names: list[str] = []
    for value in values or []:
        for name in (v.strip().lower() for v in value.split(",")):
            if name in ("", "none"):
                continue
            if name not in SINKS:
                raise RunLogError(f"--log {name!r}: unknown run log; choose from {', '.join(SINKS)} (or none; "
                                  f"metrics.csv and curves.png are always written).")
            if name not in names:
                names.append(name)
    return names


def _library(sink: str) -> ModuleType:
    module, extra = SINKS[sink]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise RunLogError(f"--log {sink} needs the Python package {module}, which is not installed ({exc}). Install "
                          f"it with `pip install 'asyncfgd[{extra}]'`, or train without --log {sink} (metrics.csv "
                          f"and curves.png are written either way).") from None


def check(sinks: list[str]) -> None:
    """Fail before training when a chosen sink's library is missing."""
    for sink in parse(sinks):
        _library(sink)


class Sink(Protocol):
    def write(self, epoch: int, scalars: dict[str, float]) -> None:
        ...

    def close(self, status: str) -> None:
        ...


class TensorBoardSink:
    """Scalars into ``RUN_DIR/tensorboard`` (a new events file per process, the same directory)."""

    def __init__(self, run_dir: Path, first_epoch: int) -> None:
        tbx = _library("tensorboard")
        # a resumed run (first_epoch > 1) hides the events a killed process wrote for epochs >= first_epoch;
        # the suffix keeps a file name of its own (and the order) for processes started in the same second:
        # tensorboardX names files by the second and truncates an existing one
        self.writer = tbx.SummaryWriter(str(run_dir / TENSORBOARD_DIR), filename_suffix=f".{time.time_ns()}",
                                        purge_step=first_epoch if first_epoch > 1 else None)

    def write(self, epoch: int, scalars: dict[str, float]) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, epoch)
        self.writer.flush()  # one epoch at a time: a killed run loses at most the epoch in progress

    def close(self, status: str) -> None:
        self.writer.close()


def _params(cfg: TrainConfig) -> dict[str, str]:
    return {k: json.dumps(v) if isinstance(v, (list, dict)) else str(v) for k, v in asdict(cfg).items()}


class MlflowSink:
    """One MLflow run per run directory, reopened on resume; its id is kept in RUN_DIR/mlflow_run.json."""

    def __init__(self, cfg: TrainConfig, run_dir: Path) -> None:
        mlflow = _library("mlflow")
        from mlflow.entities import Metric, Param

        self._metric = Metric
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (run_dir / MLRUNS_DIR).resolve().as_uri()
        if uri.startswith("file:"):
            # MLflow 3.18 refuses file stores ("maintenance mode") unless this opt-out is set; a plain
            # directory next to the run needs no database package or server, so it stays the default
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        state = run_dir / MLFLOW_STATE
        run = self._existing(state, uri)
        params = _params(cfg)
        if run is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or MLFLOW_EXPERIMENT
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
            run = self.client.create_run(experiment_id, run_name=run_dir.name,
                                         tags={"asyncfgd.run_dir": str(run_dir.resolve())})
            self.client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])
            state.write_text(json.dumps({"run_id": run.info.run_id, "tracking_uri": uri}, indent=1) + "\n")
            self.logged = -1  # the last epoch logged (0: an --epochs 0 evaluation)
        else:
            self.client.update_run(run.info.run_id, status="RUNNING")
            # parameters cannot change in MLflow: what a resume changed (--epochs) becomes a tag
            changed = {k: v for k, v in params.items() if run.data.params.get(k, v) != v}
            for k, v in changed.items():
                self.client.set_tag(run.info.run_id, f"resumed.{k}", v)
            new = [Param(k, v) for k, v in params.items() if k not in run.data.params]
            if new:
                self.client.log_batch(run.info.run_id, params=new)
            self.logged = max((m.step for key in run.data.metrics
                               for m in self.client.get_metric_history(run.info.run_id, key)), default=-1)
        self.run_id = run.info.run_id

    def _existing(self, state: Path, uri: str) -> Any:
        """The run a previous process of this run directory logged to, if it is still in this store."""
        if not state.exists():
            return None
        saved = json.loads(state.read_text())
        if saved.get("tracking_uri") != uri:
            return None
        try:
            return self.client.get_run(saved["run_id"])
        except Exception:  # deleted, or unreadable: start a new run
            return None

    def write(self, epoch: int, scalars: dict[str, float]) -> None:
        if epoch <= self.logged:
            return  # already logged by the process that was killed after it (a resume repeats the epoch)
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self._metric(k, v, now, epoch) for k, v in scalars.items()])
        self.logged = epoch

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)


class RunLog:
    """The sinks of one training process; ``write`` fans an epoch out, ``close`` ends them.

    Used as a context manager around the loop: the exit marks the MLflow run FINISHED, KILLED
    (Ctrl-C) or FAILED (divergence, any other error)."""

    def __init__(self, sinks: list[Sink], warn: Callable[[str], None] = print) -> None:
        self.sinks, self.warn = dict(enumerate(sinks)), warn

    @classmethod
    def open(cls, cfg: TrainConfig, run_dir: Path, first_epoch: int,
             warn: Callable[[str], None] = print) -> RunLog:
        """The sinks of ``cfg.log`` for a process whose first epoch is ``first_epoch`` (1-based)."""
        sinks: list[Sink] = []
        try:
            for name in parse(cfg.log):
                sinks.append(TensorBoardSink(run_dir, first_epoch) if name == "tensorboard"
                             else MlflowSink(cfg, run_dir))
        except RunLogError:
            cls(sinks, warn).close("FAILED")
            raise
        except Exception as exc:  # the library's own errors (a store it refuses, no permission, ...)
            cls(sinks, warn).close("FAILED")
            raise RunLogError(f"--log {name} could not start: {type(exc).__name__}: {exc}") from None
        return cls(sinks, warn)

    def write(self, epoch: int, scalars: dict[str, float]) -> None:
        for i, sink in list(self.sinks.items()):
            try:
                sink.write(epoch, scalars)
            except Exception as exc:  # a dashboard must not stop training
                self.warn(f"warning: run log {type(sink).__name__} failed ({exc}); it is off for the rest of this run.")
                self.sinks.pop(i)

    def close(self, status: str = "FINISHED") -> None:
        for sink in self.sinks.values():
            try:
                sink.close(status)
            except Exception as exc:
                self.warn(f"warning: closing run log {type(sink).__name__} failed ({exc}).")
        self.sinks = {}

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: Any) -> None:
        if kind is None:
            self.close("FINISHED")
        else:
            self.close("KILLED" if issubclass(kind, (Interrupted, KeyboardInterrupt)) else "FAILED")
