"""Data-parallel forward gradients over torch.distributed: ranks exchange m + 2 scalars a step.

Every rank draws the same tangents from the shared seed, runs its shard of the global mini-batch,
and the ranks sum (count, loss·count,
d_1·count .. d_m·count) with one all_reduce. The global mean d is then the same on every rank,
so every rank applies the identical update to identical weights without ever sending a weight:
8·(m + 2) bytes handed to the collective per rank and step, whatever the model's size. ``Ranks``
adds what keeps the replicas one model: a periodic comparison of weight digests (rank 0's weights
win a mismatch) and the average of the BatchNorm running statistics.

torch is imported when a reducer is made (the single-process runtime never imports it). Only
the weight-perturbed methods (``fgd``, ``asyncfgd``) combine this way: their update is made of
the m scalars and the seeded tangents. The local methods' updates are gradient estimates of D
floats (the local-activity method's, or the local heads' own d per module), so they would need
DDP's all_reduce of whole gradients; they are refused (``engine.make_scheduler``). So are models
with dropout for now: the scheduler draws a step's masks for samples 0..n−1 of what it is fed, and
a rank's shard would need them keyed by global sample index (``draw_masks``'s ``sample_offset``).
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from .backend import ModuleRunner


class ScalarAllReduce:
    """The scheduler's ``reduce``: (local count, local mean loss, local mean d) -> the global means."""

    def __init__(self, group: Any = None) -> None:
        import torch
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("data-parallel FGD needs torch.distributed initialised (launch with torchrun)")
        self.torch, self.dist, self.group = torch, dist, group
        self.bytes_sent = 0  # handed to the collective so far (this rank)

    def __call__(self, count: int, loss: float, d: np.ndarray) -> tuple[float, np.ndarray]:
        torch = self.torch
        buf = torch.empty(2 + d.size, dtype=torch.float64)
        buf[0], buf[1] = float(count), loss * count
        buf[2:] = torch.from_numpy(d.astype(np.float64) * count)
        self.dist.all_reduce(buf, group=self.group)
        self.bytes_sent += buf.numel() * buf.element_size()
        total = float(buf[0])
        return float(buf[1]) / total, (buf[2:] / total).numpy().astype(np.float32)


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
