"""`train --distributed data|pipeline` under torchrun: the process group and the rank-aware learners.

- ``data``: every rank holds the whole model and trains on its shard of each global mini-batch;
  the ranks all_reduce (count, correct, loss·count, d·count) per step (runtime/distributed.py) and
  apply identical updates. Every ``drift_check_every`` steps they compare weight digests (rank 0's
  weights win a mismatch, logged); BatchNorm running statistics are averaged before every
  evaluation and checkpoint. Only rank 0 evaluates; the others wait at the next collective.
- ``pipeline``: rank k holds module k (world size = K) and runs it as one stage of the AsyncFGD
  pipeline (runtime/pipeline_ranks.py); evaluation passes through every rank.

Either way rank 0 writes the run directory, and a checkpoint is one single-process checkpoint
(rank 0 gathers the pipeline's modules, or the data-parallel ranks' shares of the in-flight
mini-batches), so a run resumes with another world size (data) or even in one process. torch is
imported here, only for distributed runs.
"""
from __future__ import annotations

import datetime
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from asyncfgd.app.training import checkpoint
from asyncfgd.app.training.config import TrainConfig, TrainError
from asyncfgd.app.training.learners import FgdLearner, alpha_fn, perturbation
from asyncfgd.runtime.artifacts import Artifacts
from asyncfgd.runtime.distributed import Ranks, ScalarAllReduce, StageLink, gather, shard
from asyncfgd.runtime.engine import SCALAR_METHODS, make_backend
from asyncfgd.runtime.optim import make_optimizer
from asyncfgd.runtime.pipeline_ranks import StageFGD
from asyncfgd.runtime.scheduler import StepOutcome

MODES = ("data", "pipeline")
#: how often a rank reports its progress to the rendezvous store (named when another rank loses contact)
HEARTBEAT_S = 1.0
#: after a failed collective, how long the ranks still there take to say so before the others are named
LOST_WAIT_S = 3.0


class Stopped(Exception):
    """SIGTERM: the launcher stops this rank (torchrun does so when another rank failed)."""


def launched() -> bool:
    """Whether this process is one of several started by torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass
class Group:
    """This process's place in a distributed run."""

    rank: int
    world: int
    _beat: float = field(default=0.0, repr=False)  # when this rank last reported its progress

    @property
    def writer(self) -> bool:
        return self.rank == 0

    def share(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def heartbeat(self, step: int) -> None:
        """Tell the rendezvous store how far this rank has come (at most every HEARTBEAT_S)."""
        now = time.time()
        if now - self._beat >= HEARTBEAT_S:
            self._beat = now
            _store().set(f"asyncfgd/alive/{self.rank}", f"{step} {now:.3f}")

    def lost(self, exc: BaseException) -> str:
        """What a failed collective means, naming the ranks that are gone: every rank that is still there
        marks itself in the rendezvous store; those that do not within LOST_WAIT_S died or hung."""
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the launcher's stop must not cut this short
        cause = _first_line(exc)
        try:
            store = _store()
            store.set_timeout(datetime.timedelta(seconds=LOST_WAIT_S))
            store.set(f"asyncfgd/lost/{self.rank}", "1")
            deadline = time.monotonic() + LOST_WAIT_S
            silent = [r for r in range(self.world) if r != self.rank]
            while silent and time.monotonic() < deadline:
                silent = [r for r in silent if not store.check([f"asyncfgd/lost/{r}"])]
                time.sleep(0.05)
            progress = {r: store.get(f"asyncfgd/alive/{r}").decode().split()[0] for r in silent
                        if store.check([f"asyncfgd/alive/{r}"])}
        except Exception:  # noqa: BLE001 - the store may have gone with the process that hosted it
            return (f"rank {self.rank} lost contact with the other ranks and with the rendezvous store ({cause}); "
                    "rank 0 or the launcher is gone")
        if not silent:
            return f"rank {self.rank} lost contact with the other ranks ({cause}), though every rank is still there"
        who = ", ".join(f"rank {r}" + (f" (last progress at step {progress[r]})" if r in progress else "")
                        for r in silent)
        return f"rank {self.rank} lost contact with the other ranks ({cause}): {who} died or hung"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def _store() -> Any:
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()


def join(timeout_s: float) -> Group:
    """Join the process group torchrun describes (gloo: CPU tensors carry every message)."""
    import torch.distributed as dist

    if not dist.is_available():
        raise TrainError("this torch build has no torch.distributed; distributed training needs it.")
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))

    def stop(*_: Any) -> None:
        raise Stopped

    signal.signal(signal.SIGTERM, stop)
    return Group(dist.get_rank(), dist.get_world_size())


def leave() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def is_comm_error(exc: BaseException) -> bool:
    """A failed or timed-out collective (gloo raises RuntimeError subclasses)."""
    return isinstance(exc, RuntimeError) and any(
        w in str(exc) for w in ("Connection", "connection", "Timed out", "timed out", "Gloo", "gloo", "peer"))


def check(cfg: TrainConfig, group: Group | None, modules: int) -> None:
    """Refuse combinations that cannot run, before any work."""
    if cfg.distributed is None:
        if group is not None:
            raise TrainError(f"launched by torchrun with {group.world} processes but without --distributed: add "
                             "--distributed data (each rank a shard of every batch) or --distributed pipeline "
                             "(rank k runs module k).")
        return
    if cfg.method not in SCALAR_METHODS:
        raise TrainError(f"--distributed trains the weight-perturbed methods ({', '.join(SCALAR_METHODS)}); "
                         f"{cfg.method}'s update is a gradient estimate of every weight, which is not "
                         "all_reduced: train it in one process.")
    if cfg.distributed == "pipeline":
        if cfg.method != "asyncfgd":
            raise TrainError("--distributed pipeline runs the AsyncFGD pipeline: use --method asyncfgd.")
        world = group.world if group is not None else modules  # one process: the threaded pipeline
        if world != modules:
            raise TrainError(f"--distributed pipeline runs module k on rank k: launch {modules} processes "
                             f"(`torchrun --nproc-per-node {modules} --no-python asyncfgd-app train ...`), or "
                             f"export with --modules {world}; this launch has {world}.")


class DataParallelLearner(FgdLearner):
    """FGD on this rank's shard of every global mini-batch; identical weights on every rank."""

    def __init__(self, arts: Artifacts, cfg: TrainConfig, steps_per_epoch: int, group: Group,
                 say: Any = print) -> None:
        self.group, self.ranks, self.say = group, Ranks(), say
        self.every, self.steps = cfg.drift_check_every, 0
        super().__init__(arts, cfg, steps_per_epoch, reduce=ScalarAllReduce())

    def feed(self, x: np.ndarray, onehot: np.ndarray) -> list[StepOutcome]:
        mine = shard(len(x), self.group.rank, self.group.world)
        out = self.scheduler.feed(x[mine], onehot[mine], offset=mine.start)
        self.steps += 1
        if self.every and self.steps % self.every == 0:
            self.scheduler.flush()
            odd = self.ranks.drifted(self.runners)
            if odd and self.group.writer:
                self.say(f"step {self.steps}: the weights of rank(s) {', '.join(map(str, odd))} had drifted from "
                         "rank 0's (last-bit differences of the CPU's math); they took rank 0's weights.")
        return out

    def before_eval(self) -> None:
        self.scheduler.flush()
        self.ranks.average_stats(self.runners)

    def evaluate(self, x: np.ndarray) -> np.ndarray | None:
        return super().evaluate(x) if self.group.writer else None

    def state(self) -> tuple[checkpoint.Arrays, dict[str, Any]]:
        """Rank 0's weights with every rank's share of the in-flight mini-batches put back together."""
        arrays, meta = super().state()
        parts = gather(checkpoint.in_flight(arrays, meta))
        if parts is None:
            return {}, {}
        joined = []
        for i, f in enumerate(parts[0]):
            pieces = [p[i] for p in parts]
            joined.append({**f, "h": np.concatenate([p["h"] for p in pieces]),
                           "labels": np.concatenate([p["labels"] for p in pieces]),
                           "h_dot": None if f["h_dot"] is None else np.concatenate([p["h_dot"] for p in pieces], 1)})
        return checkpoint.with_in_flight(arrays, meta["next_step"], joined)

    def load_state(self, arrays: checkpoint.Arrays, meta: dict[str, Any]) -> None:
        """Every rank takes its shard of each in-flight mini-batch (with this run's world size)."""
        flights = []
        for f in checkpoint.in_flight(arrays, meta):
            mine = shard(len(f["labels"]), self.group.rank, self.group.world)
            flights.append({**f, "h": f["h"][mine], "labels": f["labels"][mine], "offset": mine.start,
                            "h_dot": None if f["h_dot"] is None else f["h_dot"][:, mine]})
        super().load_state(*checkpoint.with_in_flight(arrays, meta["next_step"], flights))


class PipelineLearner:
    """Module ``rank`` of the AsyncFGD pipeline on this rank."""

    def __init__(self, arts: Artifacts, cfg: TrainConfig, steps_per_epoch: int, group: Group) -> None:
        k = group.rank
        self.group, self.num_classes = group, arts.num_classes
        self.runner = make_backend(cfg.backend, cfg.memory).load_module(arts, k, arts.tangents, cfg.threads or None)
        lr = cfg.lr_fn(steps_per_epoch)
        opt = make_optimizer(cfg.optimizer, self.runner.params, self.runner.xp, lr=lr(0), **cfg.optimizer_kw())
        self._alpha = alpha_fn(arts, cfg, steps_per_epoch)
        self.stage = StageFGD(self.runner, opt, len(arts.modules), self._alpha, lr,
                              perturbation(cfg, arts), StageLink(),
                              arts.modules[k].in_shape, arts.tangents)

    def feed(self, x: np.ndarray, onehot: np.ndarray) -> list[StepOutcome]:
        return self.stage.feed(x, onehot)

    def finish(self) -> list[StepOutcome]:
        return self.stage.drain()

    def before_eval(self) -> None:
        """BatchNorm statistics live with their module on one rank: nothing to combine."""

    def evaluate(self, x: np.ndarray) -> np.ndarray | None:
        return self.stage.evaluate(x, self.num_classes)

    def estimate_norms(self) -> list[float | None]:
        return []

    def alphas(self, step: int) -> list[float]:
        return [self._alpha(k, step) for k in range(self.stage.K)]

    def state(self) -> tuple[checkpoint.Arrays, dict[str, Any]]:
        """Every module's weights, optimizer state and pending input, gathered on rank 0."""
        arrays, meta = checkpoint.runtime_state([self.runner], self.stage)
        parts = gather((arrays, checkpoint.in_flight(arrays, meta)))
        if parts is None:
            return {}, {}
        merged: checkpoint.Arrays = {}
        for a, _ in parts:
            merged.update(a)
        return checkpoint.with_in_flight(merged, meta["next_step"], [f for _, fl in parts for f in fl])

    def load_state(self, arrays: checkpoint.Arrays, meta: dict[str, Any]) -> None:
        checkpoint.restore_runtime_state(arrays, meta, [self.runner], self.stage)

    def close(self) -> None:
        self.stage.link.settle()


def make_distributed_learner(arts: Artifacts, cfg: TrainConfig, steps_per_epoch: int, group: Group,
                             say: Any = print) -> DataParallelLearner | PipelineLearner:
    if cfg.distributed == "pipeline":
        return PipelineLearner(arts, cfg, steps_per_epoch, group)
    return DataParallelLearner(arts, cfg, steps_per_epoch, group, say)
