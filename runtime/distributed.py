"""Data-parallel forward gradients over torch.distributed: ranks exchange m + 3 scalars a step.

Every rank draws the same tangents from the shared seed, runs its shard of the global mini-batch,
and the ranks sum (count, correct, loss·count,
d_1·count .. d_m·count) with one all_reduce. The global mean d is then the same on every rank,
so every rank applies the identical update to identical weights without ever sending a weight:
8·(m + 3) bytes handed to the collective per rank and step, whatever the model's size. ``Ranks``
adds what keeps the replicas one model: a periodic comparison of weight digests (rank 0's weights
win a mismatch) and the average of the BatchNorm running statistics.

torch is imported when a reducer is made (the single-process runtime never imports it). Only
the weight-perturbed methods (``fgd``, ``asyncfgd``) combine this way: their update is made of
the m scalars and the seeded tangents. The local methods' updates are gradient estimates of D
floats (the local-activity method's, or the local heads' own d per module), so they would need
DDP's all_reduce of whole gradients; they are refused (``engine.make_scheduler``). Dropout works:
a rank feeds its shard with ``offset`` = its first sample's global index, which keys the masks.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from .backend import ModuleRunner


class ScalarAllReduce:
    """The scheduler's ``reduce``: local (count, correct, mean loss, mean d) -> the global ones."""

    def __init__(self, group: Any = None) -> None:
        import torch
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("data-parallel FGD needs torch.distributed initialised (launch with torchrun)")
        self.torch, self.dist, self.group = torch, dist, group
        self.bytes_sent, self.calls = 0, 0  # handed to the collective so far (this rank)

    def __call__(self, count: int, correct: int, loss: float, d: np.ndarray) -> tuple[int, int, float, np.ndarray]:
        torch = self.torch
        buf = torch.empty(3 + d.size, dtype=torch.float64)
        buf[0], buf[1], buf[2] = float(count), float(correct), loss * count
        buf[3:] = torch.from_numpy(d.astype(np.float64) * count)
        self.dist.all_reduce(buf, group=self.group)
        self.bytes_sent += buf.numel() * buf.element_size()
        self.calls += 1
        total = float(buf[0])
        return int(total), int(buf[1]), float(buf[2]) / total, (buf[3:] / total).numpy().astype(np.float32)


def shard(n: int, rank: int, world: int) -> slice:
    """Rank ``rank``'s contiguous share of a global batch of n samples (sizes differ by at most one)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def weights_digest(runners: Sequence[ModuleRunner]) -> bytes:
    """SHA-256 of every module's weights and BatchNorm statistics, in module order (host copies)."""
    h = hashlib.sha256()
    for r in runners:
        for name, t in (*r.params.items(), *r.buffers.items()):
            h.update(name.encode())
            h.update(np.ascontiguousarray(r.to_host(t)).tobytes())
    return h.digest()


class Ranks:
    """The collective operations data-parallel training needs besides ``ScalarAllReduce``."""

    def __init__(self, group: Any = None) -> None:
        import torch
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("data-parallel FGD needs torch.distributed initialised (launch with torchrun)")
        self.torch, self.dist, self.group = torch, dist, group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)

    def drifted(self, runners: Sequence[ModuleRunner]) -> list[int]:
        """The ranks whose weights differ from rank 0's (numpy's SIMD transcendentals may round
        differently on another CPU family, so identical updates can still drift); each such rank
        then takes rank 0's weights and statistics. Returns the same list on every rank."""
        torch = self.torch
        mine = torch.frombuffer(bytearray(weights_digest(runners)), dtype=torch.uint8)
        every = [torch.empty_like(mine) for _ in range(self.world)]
        self.dist.all_gather(every, mine, group=self.group)
        odd = [r for r in range(self.world) if not torch.equal(every[r], every[0])]
        if odd:
            for r in runners:
                for t in (*r.params.values(), *r.buffers.values()):
                    host = torch.from_numpy(np.ascontiguousarray(r.to_host(t)))
                    self.dist.broadcast(host, src=0, group=self.group)
                    r.from_host(t, host.numpy())
        return odd

    def average_stats(self, runners: Sequence[ModuleRunner]) -> None:
        """Running BatchNorm statistics averaged over the ranks, in place (each rank normalised its own
        shard with its own batch statistics, as DDP without SyncBatchNorm does)."""
        torch = self.torch
        for r in runners:
            for t in r.buffers.values():
                host = torch.from_numpy(np.ascontiguousarray(r.to_host(t), dtype=np.float64))
                self.dist.all_reduce(host, group=self.group)
                r.from_host(t, (host / self.world).numpy().astype(np.float32))


class Pending:
    """Arrays being received (``irecv``); ``wait()`` returns them as host arrays."""

    def __init__(self, works: list[Any], tensors: list[Any]) -> None:
        self._works, self._tensors = works, tensors

    def wait(self) -> list[np.ndarray]:
        for w in self._works:
            w.wait()
        self._works = []
        return [t.numpy() for t in self._tensors]


class StageLink:
    """The traffic of one stage of the pipeline across ranks (rank k holds module k of K): arrays to
    the next rank and from the previous one, and the last rank's per-step result to every rank.

    Sends are asynchronous (``isend`` of a private copy, so the module may overwrite its outputs at
    once) and receives are posted one tick ahead, so the wire overlaps with compute; host arrays
    (gloo: CPU, Jetsons; a CUDA backend stages through the host)."""

    def __init__(self, group: Any = None) -> None:
        import torch
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("the pipeline across ranks needs torch.distributed initialised (launch with torchrun)")
        self.torch, self.dist, self.group = torch, dist, group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self._sending: list[Any] = []
        self.bytes_sent, self.sends = 0, 0  # arrays handed to point-to-point sends so far (this rank)

    def send(self, arrays: Sequence[np.ndarray]) -> None:
        """Hand ``arrays`` to the next rank (after the previous sends completed)."""
        self.settle()
        for a in arrays:
            t = self.torch.from_numpy(np.array(a, dtype=np.float32, copy=True))
            self._sending.append(self.dist.isend(t, self.rank + 1, group=self.group))
            self.bytes_sent += t.numel() * 4
            self.sends += 1

    def settle(self) -> None:
        """Wait until every send so far has left."""
        for w in self._sending:
            w.wait()
        self._sending = []

    def recv(self, shapes: Sequence[Sequence[int]]) -> Pending:
        """Post receives of float32 arrays of ``shapes`` from the previous rank."""
        tensors = [self.torch.empty(tuple(s), dtype=self.torch.float32) for s in shapes]
        return Pending([self.dist.irecv(t, self.rank - 1, group=self.group) for t in tensors], tensors)

    def share(self, values: np.ndarray | None, size: int) -> np.ndarray:
        """The last rank's ``values`` (float64, ``size`` of them) on every rank."""
        buf = self.torch.zeros(size, dtype=self.torch.float64)
        if values is not None:
            buf[:] = self.torch.from_numpy(np.asarray(values, dtype=np.float64))
        self.dist.broadcast(buf, src=self.world - 1, group=self.group)
        return buf.numpy()

    def to_first(self, values: np.ndarray | None, shape: Sequence[int]) -> np.ndarray | None:
        """Move float32 ``values`` of ``shape`` from the last rank to rank 0 (None elsewhere)."""
        if self.rank == self.world - 1:
            if self.rank != 0:
                self.dist.send(self.torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)), 0,
                               group=self.group)
            return values
        if self.rank == 0:
            t = self.torch.empty(tuple(shape), dtype=self.torch.float32)
            self.dist.recv(t, self.world - 1, group=self.group)
            return t.numpy()
        return None



def gather(obj: Any, group: Any = None) -> list[Any] | None:
    """Every rank's ``obj`` (picklable) on rank 0, in rank order; None on the other ranks."""
    import torch.distributed as dist

    out: list[Any] | None = [None] * dist.get_world_size(group) if dist.get_rank(group) == 0 else None
    dist.gather_object(obj, out, dst=0, group=group)
    return out
