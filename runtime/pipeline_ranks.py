"""One stage of the AsyncFGD pipeline across ranks: rank k of K holds module k (docs/distributed.md).

The ticks are the threaded ``AsyncFGD``'s: at tick t rank k first applies the pending update (the d
of step t − K, shared by the last rank at the end of tick t − 1), then runs step t − k on the input
rank k − 1 made at tick t − 1, and sends its (y, ẏ) to rank k + 1. The last rank computes (loss,
d) and shares them with every rank (``StageLink.share``: the only message that goes backwards,
m + 4 floats). Same seeds, same tangents, same order of operations: the weights come out bit
for bit as the threaded pipeline's.

Every rank is fed the same global stream (``feed(x, labels)``): rank 0 uses x, every rank keeps the
labels of its steps in flight (the last one needs them for the loss, all need the batch size), so
labels never cross the wire. Which ranks send and receive what at each tick follows from the
tick, the steps fed and α, so no rank waits for a message that is not coming.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import contract as c
from .backend import ModuleRunner, RunResult
from .distributed import Pending, StageLink
from .scheduler import AlphaFn, LrFn, NonFiniteLoss, Perturbation, StepOutcome, _Base, n_correct

#: the last rank's shared result: loss, correct, count, whether d exists, then d_1..d_m
_HEAD = 4


class StageFGD(_Base):
    """Module ``runner.index`` of K, with the ``feed``/``drain``/``flush`` of the threaded scheduler."""

    def __init__(self, runner: ModuleRunner, optimizer: Any, modules: int, alpha: AlphaFn, lr: LrFn,
                 perturbation: Perturbation, link: StageLink, in_shape: Sequence[int], tangents: int) -> None:
        K = modules
        super().__init__([runner], [optimizer], alpha, lr, perturbation, [K - 1 - k for k in range(K)])
        self.k, self.link, self.m = runner.index, link, tangents
        self.in_shape = tuple(in_shape)  # one sample's input of this module
        self.next_step = 0  # steps fed so far
        self.first = 0  # the first step not yet through the pipeline when it was (re)started
        self.tick = 0
        self.labels: dict[int, np.ndarray] = {}  # step -> one-hot labels, for the steps still in flight here
        self.x: np.ndarray | None = None  # rank 0: the step entering now
        self.inbox: tuple[int, Pending | list[np.ndarray]] | None = None  # (step, input) for the next tick
        self.pending: tuple[int, np.ndarray] | None = None

    @property
    def runner(self) -> ModuleRunner:
        return self.runners[0]

    # -- the stream --------------------------------------------------------------------------------
    def feed(self, x: np.ndarray, labels: np.ndarray) -> list[StepOutcome]:
        self.labels[self.next_step] = labels
        self.x = x if self.k == 0 else None
        self.next_step += 1
        return self._tick()

    def drain(self) -> list[StepOutcome]:
        out: list[StepOutcome] = []
        while self.tick - (self.K - 1) < self.next_step:
            out += self._tick()
        self.flush()
        return out

    def flush(self) -> None:
        if self.pending is not None:
            self._update(self.k, *self.pending)
            self.pending = None

    def _mine(self, tick: int, module: int) -> int | None:
        """The step ``module`` works on at ``tick``, if any."""
        s = tick - module
        return s if self.first <= s < self.next_step else None

    def _input(self, step: int) -> tuple[Any, Any]:
        if self.k == 0:
            assert self.x is not None and self.tick == step
            return self.x, None
        assert self.inbox is not None and self.inbox[0] == step, "pipeline ranks out of step"
        got = self.inbox[1]
        arrays = got.wait() if isinstance(got, Pending) else got
        self.inbox = None
        return arrays[0], (arrays[1] if len(arrays) > 1 else None)

    def _expect(self, step: int) -> None:
        """Post the receive of this module's input for ``step`` (sent by rank k − 1 this tick)."""
        n = len(self.labels[step])
        shapes = [(n, *self.in_shape)]
        if self._role(self.k, step)[0] == c.DUAL:
            shapes.append((self.m, n, *self.in_shape))
        self.inbox = (step, self.link.recv(shapes))

    def _tick(self) -> list[StepOutcome]:
        t, k, r = self.tick, self.k, self.runner
        self.flush()  # the pending update first, as the threaded job does
        s = self._mine(t, k)
        res: RunResult | None = None
        if s is not None:
            h, h_dot = self._input(s)
            role, _ = self._role(k, s)
            if role != c.FORWARD:
                self._fill(k, s)
            labels = self.labels[s]
            res = r.run(role, h, h_dot if role == c.DUAL else None, labels if r.is_last else None,
                        masks=self._masks(k, s, len(labels)))
            if not r.is_last:
                self.link.send([r.to_host(res.y)] + ([] if res.y_dot is None else [r.to_host(res.y_dot)]))
        nxt = self._mine(t + 1, k)
        if k > 0 and nxt is not None:
            self._expect(nxt)
        done = self._mine(t, self.K - 1)
        outcomes = []
        if done is not None:
            out = self._share(done, res if r.is_last else None)  # the last rank ran ``done`` this tick
            if out.loss_dot is not None:
                self.pending = (done, out.loss_dot)
            outcomes.append(out)
            self.labels.pop(done, None)
        for old in [q for q in self.labels if q < t - k]:
            del self.labels[old]
        self.tick += 1
        return outcomes

    def _share(self, step: int, res: RunResult | None) -> StepOutcome:
        """The last rank's (loss, correct, count, d) on every rank, checked after sharing so that every
        rank stops at the same step."""
        values = None
        if res is not None:
            r = self.runner
            d = None if res.loss_dot is None else r.to_host(res.loss_dot).reshape(-1)
            labels = self.labels[step]
            values = np.zeros(_HEAD + self.m)
            values[:_HEAD] = (float(r.to_host(res.loss)), n_correct(r.to_host(res.logits), labels), len(labels),
                              d is not None)
            if d is not None:
                values[_HEAD:] = d
        got = self.link.share(values, _HEAD + self.m)
        loss, correct, count, has_d = float(got[0]), int(got[1]), int(got[2]), bool(got[3])
        d = got[_HEAD:].astype(np.float32) if has_d else None
        if not math.isfinite(loss) or (d is not None and not np.all(np.isfinite(d))):
            raise NonFiniteLoss(step, loss, d)
        return StepOutcome(step, loss, d, correct, count)

    # -- evaluation and checkpoints ------------------------------------------------------------------
    def settle(self) -> None:
        """Complete the posted receive and the sends (before evaluation or a checkpoint)."""
        if self.inbox is not None and isinstance(self.inbox[1], Pending):
            self.inbox = (self.inbox[0], self.inbox[1].wait())
        self.link.settle()

    def evaluate(self, x: np.ndarray, num_classes: int) -> np.ndarray | None:
        """Logits of ``x`` through every rank's eval graph; returned on rank 0 (None elsewhere). Every
        rank passes the same ``x`` (only its length matters beyond rank 0)."""
        self.flush()
        self.settle()
        r, n = self.runner, len(x)
        h = x if self.k == 0 else self.link.recv([(n, *self.in_shape)]).wait()[0]
        res = r.run(c.EVAL, h)
        out = r.to_host(res.logits if r.is_last else res.y)
        if not r.is_last:
            self.link.send([out])
            self.link.settle()
        return self.link.to_first(out if r.is_last else None, (n, num_classes))

    def state_dict(self) -> dict[str, Any]:
        """This rank's share of the threaded scheduler's state: its pending input as the in-flight entry
        of module k (the entries of all ranks together are the threaded pipeline's ``in_flight``)."""
        self.flush()
        self.settle()
        flight = []
        if self.inbox is not None:
            step, got = self.inbox
            assert not isinstance(got, Pending)
            flight.append({"module": self.k, "step": step, "h": got[0], "labels": self.labels[step],
                           "h_dot": got[1] if len(got) > 1 else None})
        return {"next_step": self.next_step, "in_flight": flight}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """From the whole pipeline's state: this rank takes module k's entry; every rank keeps the labels
        of all the steps in flight (the last rank needs them when those steps reach it)."""
        self.next_step = self.tick = int(state["next_step"])
        self.pending, self.inbox = None, None
        self.labels = {int(f["step"]): f["labels"] for f in state["in_flight"]}
        self.first = min(self.labels, default=self.next_step)
        for f in state["in_flight"]:
            if int(f["module"]) == self.k:
                self.inbox = (int(f["step"]), [f["h"]] + ([] if f["h_dot"] is None else [f["h_dot"]]))
