"""Sync FGD and the AsyncFGD pipeline over K module runners (docs/algorithm.md).

Notation: module k ∈ 0..K−1 (0-based), step s = the global index of a mini-batch. Module k
draws its tangent for step s as u_k^s = α_k(s)·ε(seed, s, k) and, when the loss derivative d_s
of that step is known, updates w_k ← opt(w_k, g = mean_j d_s,j · u_k,j^s).
- Sync FGD: each step runs through all K modules with current weights, then all update.
- AsyncFGD: at tick t module k works on step t − k, all modules concurrently (a thread pool:
  ONNX Runtime releases the GIL), reading the (h, ḣ) its predecessor produced at tick t − 1.
  After the tick's barrier, the last module's d for step s* = t − (K−1) updates every module
  with the tangent it used for s*, which module k drew K−1−k ticks earlier.
Module k's tangent for s* is re-created from its seed (memory: one tangent per module) or,
with ``store_tangents``, read from a ring of K−k copies (no regeneration, more memory).

Determinism: within a tick each module touches only its own buffers, and updates happen
after the barrier, so results do not depend on thread timing.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import contract as c
from .backend import ModuleRunner, RunResult
from .buffers import contiguous_span
from .masks import draw_masks
from .perturb import fill_signs, fill_tangents


def _require_finite(step: int, loss: float, d: np.ndarray | None) -> None:
    if not math.isfinite(loss) or (d is not None and not np.all(np.isfinite(d))):
        raise NonFiniteLoss(step, loss, d)


class NonFiniteLoss(FloatingPointError):
    """The loss or its derivative became NaN/inf; no update was applied for that step."""

    def __init__(self, step: int, loss: float, loss_dot: Any) -> None:
        d = np.asarray(loss_dot if loss_dot is not None else [], dtype=np.float64)
        summary = (f"{int(np.sum(~np.isfinite(d)))} of {d.size} directional derivatives non-finite, "
                   f"largest |d| = {np.nanmax(np.abs(d)) if d.size else float('nan'):.3g}")
        super().__init__(f"non-finite loss at step {step}: loss={loss:.4g}, {summary}")
        self.step = step


@dataclass
class StepOutcome:
    """A mini-batch whose loss is known (its update, if any, has been applied).

    Counts, not logits: under data parallelism or the pipeline across ranks the rank that reports a
    step does not hold every sample's logits, only the combined counts."""

    step: int
    loss: float
    loss_dot: np.ndarray | None  # (m,) directional derivatives, None when every module was frozen
    correct: int  # samples whose arg-max logit is their label
    count: int  # samples in the mini-batch

    @staticmethod
    def of(step: int, loss: float, loss_dot: np.ndarray | None, logits: np.ndarray, onehot: np.ndarray) -> StepOutcome:
        return StepOutcome(step, loss, loss_dot, n_correct(logits, onehot), len(onehot))


def n_correct(logits: np.ndarray, onehot: np.ndarray) -> int:
    """How many rows of ``logits`` have their largest entry at the one-hot label."""
    return int((np.asarray(logits).argmax(axis=1) == onehot.argmax(axis=1)).sum())


@dataclass
class Perturbation:
    seed: int = 0
    mode: str = "gaussian"
    store_tangents: bool = False


AlphaFn = Callable[[int, int], float]  # (module, step) -> α
LrFn = Callable[[int], float]  # step -> learning rate
#: data-parallel FGD's combination of one step's local (sample count, correct count, mean loss, mean d) over
#: all ranks into the global ones (runtime/distributed.py); None: one process
Reducer = Callable[[int, int, float, np.ndarray], tuple[int, int, float, np.ndarray]]


class _Base:
    """Tangent bookkeeping and the update shared by both schedulers."""

    def __init__(self, runners: Sequence[ModuleRunner], optimizers: Sequence[Any], alpha: AlphaFn, lr: LrFn,
                 perturbation: Perturbation, delays: Sequence[int], reduce: Reducer | None = None) -> None:
        """``runners``: modules 0..K−1, or (one stage of the pipeline across ranks) the modules this
        process holds, by their ``index``; ``delays`` has one entry per module of the whole network."""
        self.runners, self.optimizers = list(runners), list(optimizers)
        self._runner = {r.index: r for r in self.runners}
        self._opt = {r.index: o for r, o in zip(self.runners, self.optimizers, strict=True)}
        self.reduce = reduce
        self.alpha, self.lr, self.pert = alpha, lr, perturbation
        self.K = len(delays)
        self.delays = list(delays)
        self._live_step = [-1] * self.K  # which step's tangents sit in each live tangent buffer
        self._rings: list[dict[int, list[np.ndarray]]] = [{} for _ in range(self.K)]

    # -- roles and tangents ----------------------------------------------------------------
    def _role(self, k: int, step: int) -> tuple[str, bool]:
        """(graph role, whether this module is perturbed) for module k at step s."""
        perturbed = self.alpha(k, step) > 0
        upstream = any(self.alpha(j, step) > 0 for j in range(k))
        if upstream:
            return c.DUAL, perturbed
        return (c.DUAL_FIRST if perturbed else c.FORWARD), perturbed

    def _fill(self, k: int, step: int) -> None:
        r = self._runner[k]
        fill_tangents(r.tangent_host(), self.pert.seed, step, k, self.pert.mode, self.alpha(k, step))
        r.upload_tangents()
        self._live_step[k] = step
        if self.pert.store_tangents and self.delays[k] > 0:
            ring = self._rings[k]
            ring[step] = [h.copy() for h in r.tangent_host()]
            for old in [s for s in ring if s <= step - self.delays[k] - 1]:
                del ring[old]

    def _tangents_for(self, k: int, step: int) -> dict[str, Any]:
        """Module k's tangents for ``step``: live buffer, stored ring copy, or regenerated."""
        r = self._runner[k]
        if self._live_step[k] == step:
            return r.tangents
        hosts = r.scratch_host()
        if self.pert.store_tangents and step in self._rings[k]:
            for dst, src in zip(hosts, self._rings[k][step], strict=False):
                np.copyto(dst, src)
        else:
            fill_tangents(hosts, self.pert.seed, step, k, self.pert.mode, self.alpha(k, step))
        r.upload_scratch()
        return r.scratch

    def _masks(self, k: int, step: int, n: int, offset: int = 0) -> dict[str, np.ndarray] | None:
        """Module k's dropout masks for ``step`` (runtime/masks.py): a function of the seed, step,
        module, layer and sample alone, so resuming and every backend draw the same."""
        sites = self._runner[k].dropout
        return draw_masks(sites, self.pert.seed, step, k, n, offset) if sites else None

    def _update(self, k: int, step: int, d: np.ndarray) -> None:
        """w_k ← opt(w_k, g = mean_j d_j·u_j) with module k's tangents for ``step``."""
        if self.alpha(k, step) <= 0:
            return  # frozen: no noise, and no optimizer drift from momentum/Adam state
        r = self._runner[k]
        xp = r.xp
        tangents = self._tangents_for(k, step)
        m = len(d)
        pairs = [(tangents[name], g) for name, g in r.grads.items()]
        if m == 1:  # one tangent per weight: module-wide buffers combine in one call
            u_all, g_all = contiguous_span([u for u, _ in pairs]), contiguous_span([g for _, g in pairs])
            if u_all is not None and g_all is not None:
                pairs = [(u_all[None], g_all)]
        with r.device_context():
            for u, g in pairs:
                xp.multiply(u[0], float(d[0]) / m, out=g)
                for j in range(1, m):
                    g += u[j] * (float(d[j]) / m)
            self._opt[k].step(r.grads, self.lr(step))

    def _check(self, step: int, res: RunResult,
               to_host: Callable[[Any], np.ndarray]) -> tuple[float, np.ndarray | None]:
        """(loss, d) of a run, checked to be finite."""
        loss = float(to_host(res.loss))
        d = None if res.loss_dot is None else to_host(res.loss_dot).reshape(-1)
        _require_finite(step, loss, d)
        return loss, d

    def _outcome(self, step: int, res: RunResult, to_host: Callable[[Any], np.ndarray],
                 onehot: np.ndarray) -> StepOutcome:
        """The last module's result, combined over the ranks when data-parallel, and checked after
        combining, so that every rank sees the same NaN and stops at the same step."""
        loss = float(to_host(res.loss))
        d = None if res.loss_dot is None else to_host(res.loss_dot).reshape(-1)
        correct, count = n_correct(to_host(res.logits), onehot), len(onehot)
        if self.reduce is not None:
            mine = np.zeros(0, np.float32) if d is None else d
            count, correct, loss, combined = self.reduce(count, correct, loss, mine)
            d = None if d is None else combined
        _require_finite(step, loss, d)
        return StepOutcome(step, loss, d, correct, count)

    def close(self) -> None:
        """Release worker threads (async only)."""


class SyncFGD(_Base):
    """Every mini-batch through all modules with current weights, then every module updates."""

    def __init__(self, runners: Sequence[ModuleRunner], optimizers: Sequence[Any], alpha: AlphaFn, lr: LrFn,
                 perturbation: Perturbation, reduce: Reducer | None = None) -> None:
        super().__init__(runners, optimizers, alpha, lr, perturbation, [0] * len(runners), reduce)
        self.next_step = 0

    def feed(self, x: np.ndarray, labels: np.ndarray, offset: int = 0) -> list[StepOutcome]:
        """One step on ``x``; ``offset``: the index of its first sample in the global mini-batch (a
        data-parallel rank's shard), which keys the dropout masks."""
        s = self.next_step
        h, hd, ready = x, None, None
        for k, r in enumerate(self.runners):
            role, perturbed = self._role(k, s)
            if role != c.FORWARD:
                self._fill(k, s)
            res = r.run(role, h, hd, labels if r.is_last else None, ready=ready,
                        masks=self._masks(k, s, len(x), offset))
            h, hd, ready = res.y, res.y_dot, res.ready
        out = self._outcome(s, res, self.runners[-1].to_host, labels)
        if out.loss_dot is not None:
            for k in range(self.K):
                self._update(k, s, out.loss_dot)
        self.next_step += 1
        return [out]

    def drain(self) -> list[StepOutcome]:
        return []

    def flush(self) -> None:
        """Updates are applied within ``feed``: nothing is pending."""

    def state_dict(self) -> dict[str, Any]:
        return {"next_step": self.next_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.next_step = int(state["next_step"])


@dataclass
class _Handoff:
    """What module k produced at a tick, for module k+1 at the next tick."""

    step: int
    h: Any
    h_dot: Any
    labels: np.ndarray
    ready: Any = None  # device event of the producing run
    offset: int = 0  # the first sample's index in the global mini-batch (data-parallel shards)


class AsyncFGD(_Base):
    """The pipeline: K modules concurrently on K different mini-batches, descending delays.

    Module k applies the update for step s* at the start of its job in the next tick (before
    its next forward, exactly when the algorithm needs it), so updates of different modules
    overlap with each other and with the other modules' forwards instead of forming a serial
    phase. ``flush()`` applies pending updates now; reading weights requires it.
    """

    def __init__(self, runners: Sequence[ModuleRunner], optimizers: Sequence[Any], alpha: AlphaFn, lr: LrFn,
                 perturbation: Perturbation, workers: int | None = None, reduce: Reducer | None = None) -> None:
        K = len(runners)
        super().__init__(runners, optimizers, alpha, lr, perturbation, [K - 1 - k for k in range(K)], reduce)
        self.next_step = 0
        self.handoff: list[_Handoff | None] = [None] * K  # handoff[k]: input waiting for module k
        self.pending: tuple[int, np.ndarray] | None = None  # (step, d) not yet applied
        self.busy_s = [0.0] * K  # per-module time spent in tick jobs: the pipeline's balance
        self._pool = ThreadPoolExecutor(max_workers=workers or K, thread_name_prefix="asyncfgd-module")

    def feed(self, x: np.ndarray, labels: np.ndarray, offset: int = 0) -> list[StepOutcome]:
        """One tick with a new mini-batch entering module 0 (``offset``: as SyncFGD's)."""
        self.handoff[0] = _Handoff(self.next_step, x, None, labels, offset=offset)
        self.next_step += 1
        return self._tick()

    def drain(self) -> list[StepOutcome]:
        """Ticks without new input until every in-flight mini-batch has its update applied."""
        out: list[StepOutcome] = []
        while any(h is not None for h in self.handoff):
            out += self._tick()
        self.flush()
        return out

    def flush(self) -> None:
        """Apply the pending update of every module (weights are current afterwards)."""
        if self.pending is not None:
            step, d = self.pending
            for f in [self._pool.submit(self._update, k, step, d) for k in range(self.K)]:
                f.result()
            self.pending = None

    def _work(self, k: int, job: _Handoff | None) -> tuple[_Handoff, RunResult] | None:
        t0 = time.perf_counter()
        try:
            return self._job(k, job)
        finally:
            self.busy_s[k] += time.perf_counter() - t0

    def _job(self, k: int, job: _Handoff | None) -> tuple[_Handoff, RunResult] | None:
        """Module k's share of a tick: the pending update, then its forward on its mini-batch."""
        if self.pending is not None:
            self._update(k, *self.pending)
        if job is None:
            return None
        role, _ = self._role(k, job.step)
        if role != c.FORWARD:
            self._fill(k, job.step)
        r = self.runners[k]
        return job, r.run(role, job.h, job.h_dot if role == c.DUAL else None, job.labels if r.is_last else None,
                          ready=job.ready, masks=self._masks(k, job.step, len(job.labels), job.offset))

    def _finish(self, job: _Handoff, res: RunResult) -> StepOutcome:
        """The last module's result: its d becomes every module's pending update."""
        out = self._outcome(job.step, res, self.runners[-1].to_host, job.labels)
        if out.loss_dot is not None:
            self.pending = (job.step, out.loss_dot)
        return out

    def _tick(self) -> list[StepOutcome]:
        active = [k for k in range(self.K) if self.handoff[k] is not None or self.pending is not None]
        futures = {k: self._pool.submit(self._work, k, self.handoff[k]) for k in active}
        results = {k: f.result() for k, f in futures.items()}  # the tick's barrier
        self.handoff, self.pending = [None] * self.K, None
        outcomes = []
        for k, done in results.items():
            if done is None:
                continue
            job, res = done
            if k < self.K - 1:
                self.handoff[k + 1] = _Handoff(job.step, res.y, res.y_dot, job.labels, res.ready, job.offset)
            else:
                outcomes.append(self._finish(job, res))
        return outcomes

    def state_dict(self) -> dict[str, Any]:
        """In-flight mini-batches are saved (not drained), so a resumed run continues the same stream."""
        self.flush()
        flight = []
        for k, h in enumerate(self.handoff):
            if h is not None:
                to_host = self.runners[max(k - 1, 0)].to_host
                flight.append({"module": k, "step": h.step, "h": to_host(h.h), "labels": h.labels,
                               "h_dot": None if h.h_dot is None else to_host(h.h_dot)})
        return {"next_step": self.next_step, "in_flight": flight}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.next_step = int(state["next_step"])
        self.handoff, self.pending = [None] * self.K, None
        for f in state["in_flight"]:
            self.handoff[f["module"]] = _Handoff(int(f["step"]), f["h"], f["h_dot"], f["labels"],
                                                 offset=int(f.get("offset", 0)))

    def close(self) -> None:
        self.flush()
        self._pool.shutdown(wait=True)


class LocalFGD(AsyncFGD):
    """Experimental local-loss mode (after Ren et al. 2023): pipelined like AsyncFGD, but every
    non-last module takes its directional derivative from its own auxiliary head's loss
    (exported with ``local_heads``), so it updates right after its own run with the tangent
    still in its buffer: no broadcast, no stale tangents, no regeneration. The last module
    uses the real loss with respect to its own weights only. The price: earlier modules optimise
    a proxy objective (their head's), not the network's loss.
    """

    def _role(self, k: int, step: int) -> tuple[str, bool]:
        if self.alpha(k, step) <= 0:
            return c.FORWARD, False
        return (c.DUAL_FIRST if k == self.K - 1 else c.LOCAL), True

    def _job(self, k: int, job: _Handoff | None) -> tuple[_Handoff, RunResult] | None:
        if job is None:
            return None
        role, perturbed = self._role(k, job.step)
        r = self.runners[k]
        if perturbed:
            self._fill(k, job.step)
        res = r.run(role, job.h, None, job.labels if (r.is_last or role == c.LOCAL) else None, ready=job.ready,
                    masks=self._masks(k, job.step, len(job.labels), job.offset))
        if perturbed:
            _, d = self._check(job.step, res, r.to_host)
            assert d is not None  # perturbed roles (local, dual_first) always output loss_dot
            self._update(k, job.step, d)
        return job, res

    def _finish(self, job: _Handoff, res: RunResult) -> StepOutcome:
        last = self.runners[-1]
        loss = float(last.to_host(res.loss))
        d = None if res.loss_dot is None else last.to_host(res.loss_dot).reshape(-1)
        return StepOutcome.of(job.step, loss, d, last.to_host(res.logits), job.labels)


class LocalActivity(AsyncFGD):
    """The local-activity method (runtime/dual/activity.py): pipelined like AsyncFGD, each module a
    block with its own local loss (its head's; the last module's is the true loss), trained from
    activity perturbation. A module's run returns its weight estimates, which it applies at once:
    no broadcast of d, no stored or regenerated tangents. Staleness: none in the weights (each update
    uses the weights of the run that made it); module k's input for step s was made by module k−1
    one tick earlier, with k−1's weights after its update for step s−1 (docs/algorithm.md).

    Per step and module the scheduler draws the sites' ε (``fill_signs``) and the weight-perturbed
    weights' tangents (``fill_tangents``) from the seeded streams; α only freezes (α = 0) here.
    """

    def __init__(self, runners: Sequence[ModuleRunner], optimizers: Sequence[Any], alpha: AlphaFn, lr: LrFn,
                 perturbation: Perturbation, workers: int | None = None) -> None:
        for r in runners:
            if r.activity is None:
                raise ValueError("the local-activity method needs artifacts exported with its graphs "
                                 "(export_model(activity=True); `asyncfgd-app train` does this itself)")
        super().__init__(runners, optimizers, alpha, lr, perturbation, workers)
        self._noise: dict[tuple[int, int], dict[str, np.ndarray]] = {}  # (module, batch) -> ε buffers

    def _role(self, k: int, step: int) -> tuple[str, bool]:
        if self.alpha(k, step) <= 0 or not self.runners[k].params:
            return c.FORWARD, False
        return c.ACTIVITY, True

    def _draw(self, k: int, step: int, n: int) -> dict[str, np.ndarray]:
        r = self.runners[k]
        plan = r.activity
        assert plan is not None  # checked at construction
        if plan.weight_perturbed:
            hosts = dict(zip(r.tangents, r.tangent_host(), strict=False))
            fill_tangents([hosts[q] for q in plan.weight_perturbed], self.pert.seed, step, k, self.pert.mode)
            r.upload_tangents()
        key = (k, n)
        if key not in self._noise:
            m = next(iter(r.tangents.values())).shape[0] if r.tangents else 1
            self._noise[key] = {s.node: np.empty((m, n, *s.shape), np.float32) for s in plan.sites}
        eps = self._noise[key]
        fill_signs(list(eps.values()), self.pert.seed, step, k)
        return eps

    def _job(self, k: int, job: _Handoff | None) -> tuple[_Handoff, RunResult] | None:
        if job is None:
            return None
        role, perturbed = self._role(k, job.step)
        r = self.runners[k]
        n = len(job.labels)
        noise = self._draw(k, job.step, n) if perturbed else None
        wants_labels = r.is_last or perturbed
        res = r.run(role, job.h, None, job.labels if wants_labels else None, ready=job.ready,
                    masks=self._masks(k, job.step, n, job.offset), noise=noise)
        if perturbed:
            self._check(job.step, RunResult(loss=res.loss, loss_dot=res.sample_dot), r.to_host)
            assert res.grads is not None  # the activity role outputs every weight's estimate
            with r.device_context():
                self.optimizers[k].step(res.grads, self.lr(job.step))
        return job, res

    def _finish(self, job: _Handoff, res: RunResult) -> StepOutcome:
        last = self.runners[-1]
        d = None if res.sample_dot is None else last.to_host(res.sample_dot).mean(axis=1)
        return StepOutcome.of(job.step, float(last.to_host(res.loss)), d, last.to_host(res.logits), job.labels)


def evaluate(runners: Sequence[ModuleRunner], x: np.ndarray) -> np.ndarray:
    """Logits from the eval graphs with the runners' weights (call the scheduler's ``flush()`` first)."""
    h, ready = x, None
    for r in runners:
        res = r.run(c.EVAL, h, ready=ready)
        h, ready = (res.logits if r.is_last else res.y), res.ready
    return runners[-1].to_host(h)
