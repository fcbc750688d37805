"""One rank of `asyncfgd-app bench-distributed`; rank 0 prints one JSON line with the group's numbers.

``python -m asyncfgd.app.bench.distributed_worker MODE --artifacts DIR --batch N ...`` with
MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE in the environment (bench-distributed sets them). Modes:
- ``fgd-data``: sync FGD, each rank its shard of the global batch, (count, correct, loss, d) all_reduced;
- ``ddp-bp``: PyTorch DDP backprop + Adam on the same model and shards (gloo);
- ``pipeline``: rank k runs module k of the AsyncFGD pipeline (world size = K).

Counted per step: the bytes this rank hands to collectives and sends (the reducer's and the stage
link's counters; DDP's through a communication hook that counts its buckets), and the bytes the
loopback interface carried (/proc/net/dev: every rank's traffic with TCP/IP framing, on a quiet
machine nothing else).
"""
from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

MODES = ("fgd-data", "ddp-bp", "pipeline")


def loopback_bytes() -> int | None:
    """Bytes the loopback interface has transmitted (Linux), None where unknown."""
    try:
        for line in Path("/proc/net/dev").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name.strip() == "lo":
                return int(rest.split()[8])
    except (OSError, IndexError, ValueError):
        pass
    return None


def _fgd(a: argparse.Namespace, rank: int, world: int) -> tuple[Any, Any]:
    from asyncfgd.app.bench.throughput import synthetic_batch
    from asyncfgd.runtime.artifacts import load_artifacts
    from asyncfgd.runtime.distributed import ScalarAllReduce, shard
    from asyncfgd.runtime.engine import load_runners, make_scheduler
    from asyncfgd.runtime.scheduler import Perturbation

    art = load_artifacts(a.artifacts)
    reduce = ScalarAllReduce()
    sched = make_scheduler(load_runners(art, "onnxruntime", a.threads), "fgd", "adam", lambda s: 1e-4,
                           lambda k, s: 1.0, Perturbation(0), reduce=reduce)
    x, y = synthetic_batch(art.input_shape, art.num_classes, a.batch)
    mine = shard(a.batch, rank, world)
    xs, ys = x[mine], np.eye(art.num_classes, dtype=np.float32)[y[mine]]
    return lambda: sched.feed(xs, ys), lambda: (reduce.bytes_sent, reduce.calls)


def _ddp(a: argparse.Namespace, rank: int, world: int) -> tuple[Any, Any]:
    import torch
    import torch.nn.functional as F
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel

    from asyncfgd.app.bench.throughput import synthetic_batch
    from asyncfgd.app.training.bp import build_from_spec
    from asyncfgd.runtime.artifacts import load_artifacts
    from asyncfgd.runtime.distributed import shard

    art = load_artifacts(a.artifacts)
    model = DistributedDataParallel(build_from_spec(art.manifest["model"], art.weights, art.root))
    sent = [0, 0]

    def counting(state: Any, bucket: Any) -> Any:
        buf = bucket.buffer()
        sent[0] += buf.numel() * buf.element_size()
        sent[1] += 1
        return default_hooks.allreduce_hook(state, bucket)

    # DDP checks the hook's annotations against dist.GradBucket; this module's are strings, a lambda has none
    model.register_comm_hook(None, lambda state, bucket: counting(state, bucket))
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x, y = synthetic_batch(art.input_shape, art.num_classes, a.batch)
    mine = shard(a.batch, rank, world)
    xs, ys = torch.from_numpy(x[mine]), torch.from_numpy(y[mine])

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(xs), ys).backward()
        opt.step()
    return step, lambda: (sent[0], sent[1])


def _pipeline(a: argparse.Namespace, rank: int, world: int) -> tuple[Any, Any]:
    from asyncfgd.app.bench.throughput import synthetic_batch
    from asyncfgd.runtime.artifacts import load_artifacts
    from asyncfgd.runtime.distributed import StageLink
    from asyncfgd.runtime.engine import make_backend
    from asyncfgd.runtime.optim import make_optimizer
    from asyncfgd.runtime.pipeline_ranks import StageFGD
    from asyncfgd.runtime.scheduler import Perturbation

    art = load_artifacts(a.artifacts)
    if len(art.modules) != world:
        raise SystemExit(f"the pipeline needs {len(art.modules)} ranks, got {world}")
    runner = make_backend("onnxruntime").load_module(art, rank, art.tangents, a.threads)
    link = StageLink()
    stage = StageFGD(runner, make_optimizer("adam", runner.params, runner.xp, lr=1e-4), world, lambda k, s: 1.0,
                     lambda s: 1e-4, Perturbation(0), link, art.modules[rank].in_shape, art.tangents)
    x, y = synthetic_batch(art.input_shape, art.num_classes, a.batch)
    onehot = np.eye(art.num_classes, dtype=np.float32)[y]
    return lambda: stage.feed(x, onehot), lambda: (link.bytes_sent, link.sends)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=MODES)
    p.add_argument("--artifacts", required=True)
    p.add_argument("--batch", type=int, required=True, help="global mini-batch")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()

    import torch
    import torch.distributed as dist

    torch.set_num_threads(a.threads)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    rank, world = dist.get_rank(), dist.get_world_size()
    build = {"fgd-data": _fgd, "ddp-bp": _ddp, "pipeline": _pipeline}[a.mode]
    step, sent = build(a, rank, world)
    for _ in range(a.warmup):
        step()
    dist.barrier()
    (sent0, calls0), wire0, t0 = sent(), loopback_bytes(), time.perf_counter()
    for _ in range(a.steps):
        step()
    dist.barrier()
    seconds = (time.perf_counter() - t0) / a.steps
    wire1 = loopback_bytes()
    sent1, calls1 = sent()
    mine = torch.tensor([(sent1 - sent0) / a.steps, (calls1 - calls0) / a.steps], dtype=torch.float64)
    every = [torch.zeros(2, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(every, mine)
    if rank == 0:
        print(json.dumps({
            "mode": a.mode, "world": world, "threads": a.threads, "batch": a.batch, "seconds_per_step": seconds,
            "samples_per_s": a.batch / seconds, "sent_per_step": [float(t[0]) for t in every],
            "messages_per_step": [float(t[1]) for t in every],
            "wire_per_step": None if wire0 is None or wire1 is None else (wire1 - wire0) / a.steps}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
