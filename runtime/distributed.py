"""Data-parallel forward gradients over torch.distributed: ranks exchange m + 2 scalars a step.

Every rank draws the same tangents (and dropout masks, keyed by global sample index) from the
shared seed, runs its shard of the global mini-batch, and the ranks sum (count, loss·count,
d_1·count .. d_m·count) with one all_reduce. The global mean d is then the same on every rank,
so every rank applies the identical update to identical weights without ever sending a weight:
8·(m + 2) bytes handed to the collective per rank and step, whatever the model's size.

torch is imported when a reducer is made (the single-process runtime never imports it). Only
the weight-perturbed methods (``fgd``, ``asyncfgd``) combine this way: their update is made of
the m scalars and the seeded tangents. The local methods' updates are gradient estimates of D
floats (the local-activity method's, or the local heads' own d per module), so they would need
DDP's all_reduce of whole gradients; they are refused (``engine.make_scheduler``).
"""
from __future__ import annotations

from typing import Any

import numpy as np


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
