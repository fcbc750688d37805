"""`asyncfgd-app bench-distributed`: what data-parallel FGD, DDP backprop and the pipeline across
ranks send, and how fast they run, with 1..N gloo processes on this machine (127.0.0.1).

Each configuration is one group of worker processes (distributed_worker.py) started together; the
numbers are measured in that run. The link model then prices the measured bytes on a slower link:

    data-parallel (FGD or DDP): t(B, L) = t_here + wire / B + rounds · L
    pipeline:                   t(B, L) = max(t_here, per_link / B) + 2 · L

with t_here the step time measured here (loopback: its communication is nearly free, so t_here
stands for the compute), wire the bytes one rank put on the wire per step (loopback total / ranks),
rounds = 2 (W − 1) latency-bound messages of a ring all_reduce per bucket, per_link the forward
traffic of the busiest boundary, (1 + m)·N·|boundary|·4 bytes, which the pipeline overlaps with
compute, plus the shared result's broadcast and one hop of latency. DDP is priced without the
overlap of its all_reduce with the backward pass (an upper bound of its step time).
"""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asyncfgd.app.bench import distributed_worker
from asyncfgd.runtime.artifacts import load_artifacts

F32 = 4


@dataclass
class LinkModel:
    """A link between devices: bandwidth (bit/s) and one-way latency (s)."""

    bits_per_s: float
    latency_s: float

    def data_parallel(self, seconds: float, wire_bytes: float, world: int, buckets: float = 1) -> float:
        rounds = 2 * (world - 1) * buckets
        return seconds + 8 * wire_bytes / self.bits_per_s + rounds * self.latency_s

    def pipeline(self, seconds: float, per_link_bytes: float) -> float:
        return max(seconds, 8 * per_link_bytes / self.bits_per_s) + 2 * self.latency_s


def boundary_bytes(artifacts: Path, batch: int) -> list[int]:
    """Forward traffic of each module boundary per step: (1 + m)·N·|boundary|·4 bytes (y and its m tangents)."""
    art = load_artifacts(artifacts)
    m = art.tangents
    return [(1 + m) * batch * math.prod(mod.out_shape) * F32 for mod in art.modules[:-1]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_group(mode: str, artifacts: Path, world: int, batch: int, steps: int, warmup: int, threads: int,
              timeout_s: float) -> dict[str, Any]:
    """Start ``world`` ranks of ``mode`` on 127.0.0.1 and return rank 0's JSON (all ranks killed on exit)."""
    port = _free_port()
    cmd = [sys.executable, "-m", distributed_worker.__name__, mode, "--artifacts", str(artifacts), "--batch",
           str(batch), "--steps", str(steps), "--warmup", str(warmup), "--threads", str(threads)]
    procs = []
    try:
        for rank in range(world):
            env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                   "WORLD_SIZE": str(world), "OMP_NUM_THREADS": str(threads)}
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        outs = [p.communicate(timeout=timeout_s) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    failed = [(r, p.returncode, err) for r, (p, (_, err)) in enumerate(zip(procs, outs, strict=True)) if p.returncode]
    if failed:
        r, code, err = failed[0]
        tail = [ln for ln in err.strip().splitlines() if ln.strip()][-1:] or [f"exit code {code}"]
        raise RuntimeError(f"{mode} with {world} ranks: rank {r} failed: {tail[0][:300]}")
    lines = [ln for ln in outs[0][0].splitlines() if ln.startswith("{")]
    return json.loads(lines[-1])


def run_bench(artifacts: Path, pipeline_artifacts: Path | None, procs: Sequence[int], batch: int, steps: int,
              warmup: int, timeout_s: float, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Every (mode, world) row, plus the best single-process run with as many threads as the largest world."""
    rows = []
    plan = [(mode, w, 1) for w in procs for mode in ("fgd-data", "ddp-bp")]
    wide = max(procs)
    if wide > 1:
        plan += [("fgd-data", 1, wide), ("ddp-bp", 1, wide)]
    if pipeline_artifacts is not None:
        K = len(load_artifacts(pipeline_artifacts).modules)
        plan.append(("pipeline", K, 1))
    for mode, world, threads in plan:
        log(f"  {mode}: {world} process(es) x {threads} thread(s) ...")
        art = pipeline_artifacts if mode == "pipeline" and pipeline_artifacts is not None else artifacts
        rows.append(run_group(mode, art, world, batch, steps, warmup, threads, timeout_s))
    return rows


def format_table(rows: list[dict[str, Any]], link: LinkModel, per_link: list[int], params: int) -> str:
    base = {r["mode"]: r["samples_per_s"] for r in rows if r["world"] == 1 and r["threads"] == 1}
    head = (f"{'mode':9} {'procs':>5} {'thr':>3} {'samples/s':>9} {'vs 1':>5} {'collective B/step/rank':>22} "
            f"{'wire B/step/rank':>16} {'modelled s/step':>15}")
    lines = [head, "-" * len(head)]
    for r in rows:
        sent = max(r["sent_per_step"])
        links = r["world"] - 1 if r["mode"] == "pipeline" else r["world"]  # pipeline: per link, not per rank
        wire = r["wire_per_step"] / links if r["wire_per_step"] is not None and r["world"] > 1 else 0.0
        if r["mode"] == "pipeline":
            modelled = link.pipeline(r["seconds_per_step"], max(per_link, default=0))
        else:
            modelled = link.data_parallel(r["seconds_per_step"], wire, r["world"], max(r["messages_per_step"]))
        ratio = f"{r['samples_per_s'] / base[r['mode']]:>4.2f}x" if r["mode"] in base else "    -"
        lines.append(f"{r['mode']:9} {r['world']:>5} {r['threads']:>3} {r['samples_per_s']:>9.1f} {ratio} "
                     f"{sent:>22,.0f} {wire:>16,.0f} {modelled:>15.3f}")
    lines.append("pipeline: bytes sent by rank 0, wire bytes per link; vs 1: against one process of the same mode")
    sizes = ", ".join(f"{b:,}" for b in per_link)
    boundaries = f"pipeline boundaries {sizes} bytes/step" if per_link else "no pipeline"
    lines.append(f"model: {params:,} weights ({params * F32:,} bytes of gradient for DDP); link model "
                 f"{link.bits_per_s / 1e6:g} Mbit/s, {link.latency_s * 1e3:g} ms; {boundaries}")
    return "\n".join(lines)
