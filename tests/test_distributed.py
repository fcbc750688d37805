"""Data-parallel FGD (runtime/distributed.py): 2 gloo ranks on 127.0.0.1 × batch 32 against one process
× batch 64. Ranks are separate processes (bounded in time, killed on failure)."""
from __future__ import annotations

import hashlib
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from asyncfgd.app.training.data import one_hot
from asyncfgd.exporter.export import export_model
from asyncfgd.runtime.artifacts import load_artifacts
from asyncfgd.runtime.distributed import shard
from asyncfgd.runtime.engine import load_runners, make_scheduler
from asyncfgd.runtime.perturb import fill_tangents
from asyncfgd.runtime.scheduler import Perturbation

STEPS, BATCH, M, LR, SEED = 20, 64, 4, 0.05, 7
TIMEOUT_S = 120

# one rank: the same batches as the single process, its shard of each, SGD, d combined by all_reduce
WORKER = """
import sys, datetime
import numpy as np
import torch.distributed as dist
from asyncfgd.app.training.data import one_hot
from asyncfgd.runtime.artifacts import load_artifacts
from asyncfgd.runtime.distributed import ScalarAllReduce, shard
from asyncfgd.runtime.engine import load_runners, make_scheduler
from asyncfgd.runtime.scheduler import Perturbation
art, out, method, port = sys.argv[1:5]
rank, world, steps, batch, seed = map(int, sys.argv[5:10])
lr = float(sys.argv[10])
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                        timeout=datetime.timedelta(seconds=60))
runners = load_runners(load_artifacts(art), "onnxruntime", 1)
reduce = ScalarAllReduce()
sched = make_scheduler(runners, method, "sgd", lambda s: lr, lambda k, s: 1.0, Perturbation(seed), reduce=reduce)
rng = np.random.default_rng(0)
ds = []
for step in range(steps):
    x = rng.standard_normal((batch, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, batch)
    sl = shard(len(x), rank, world)
    ds += [o.loss_dot for o in sched.feed(x[sl], one_hot(y[sl], 10), offset=sl.start)]
ds += [o.loss_dot for o in sched.drain()]
sched.close()
np.savez(out, d=np.array(ds), sent=reduce.bytes_sent,
         **{n: r.to_host(p) for r in runners for n, p in r.params.items()})
dist.destroy_process_group()
"""


# one rank of the replica checks: rank 1 drifts by one ulp in one weight; statistics differ per rank
CHECKS = """
import sys, datetime
import numpy as np
import torch.distributed as dist
from asyncfgd.runtime.artifacts import load_artifacts
from asyncfgd.runtime.distributed import Ranks, weights_digest
from asyncfgd.runtime.engine import load_runners
art, out, port, rank = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds=60))
runners = load_runners(load_artifacts(art), "onnxruntime", 1)
ranks = Ranks()
w = next(iter(runners[0].params.values()))
if rank == 1:
    flat = w.reshape(-1)
    flat[0] = np.nextafter(flat[0], np.float32(np.inf))
first = ranks.drifted(runners)
second = ranks.drifted(runners)
for r in runners:
    for t in r.buffers.values():
        t[...] = rank + 1.0
ranks.average_stats(runners)
stats = np.concatenate([r.to_host(t).ravel() for r in runners for t in r.buffers.values()])
np.savez(out, first=np.array(first), second=np.array(second), digest=np.frombuffer(weights_digest(runners), np.uint8),
         stats=stats)
dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLP without BatchNorm: a shard's forward is exactly the rows of the whole batch's."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    out = tmp_path_factory.mktemp("art") / "mlp"
    export_model(model, out, (1, 8, 8), 10, modules=2, tangents=M)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ranks(art: Path, tmp: Path, method: str, world: int) -> list[dict[str, np.ndarray]]:
    port = _free_port()
    outs = [tmp / f"rank{r}.npz" for r in range(world)]
    args = [str(v) for v in (STEPS, BATCH, SEED, LR)]
    return _launch([[WORKER, str(art), str(outs[r]), method, str(port), str(r), str(world), *args]
                    for r in range(world)], outs)


def _launch(commands: list[list[str]], outs: list[Path]) -> list[dict[str, np.ndarray]]:
    """Run ``python -c`` per rank, bounded by TIMEOUT_S (every process killed on the way out)."""
    procs = [subprocess.Popen([sys.executable, "-c", *cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for cmd in commands]
    deadline = time.monotonic() + TIMEOUT_S
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    logs = [p.stdout.read() if p.stdout else "" for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    return [dict(np.load(o)) for o in outs]


def _single(art: Path, method: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    runners = load_runners(load_artifacts(art), "onnxruntime", 1)
    sched = make_scheduler(runners, method, "sgd", lambda s: LR, lambda k, s: 1.0, Perturbation(SEED))
    rng = np.random.default_rng(0)
    ds = []
    for _ in range(STEPS):
        x = rng.standard_normal((BATCH, 1, 8, 8)).astype(np.float32)
        ds += [o.loss_dot for o in sched.feed(x, one_hot(rng.integers(0, 10, BATCH), 10))]
    ds += [o.loss_dot for o in sched.drain()]
    sched.close()
    return {n: r.to_host(p) for r in runners for n, p in r.params.items()}, np.array(ds)


def _max_tangent(art: Path) -> float:
    """max |u| over every step's and module's tangents (the bound's factor)."""
    arts = load_artifacts(art)
    top = 0.0
    for k, info in enumerate(arts.modules):
        bufs = [np.empty((M, *p["shape"]), np.float32) for p in info.params]
        for s in range(STEPS):
            fill_tangents(bufs, SEED, s, k)
            top = max(top, max(float(np.abs(b).max()) for b in bufs))
    return top


@pytest.mark.parametrize("method", ["fgd", "asyncfgd"])
def test_two_ranks_match_one_process_and_each_other(mlp: Path, tmp_path: Path, method: str):
    """After 20 steps, 2 ranks × 32 = 1 process × 64 within the first-order bound of docs/algorithm.md
    (SGD: Σ_s lr·max_j|Δd_s,j|·max|u| plus T·4·2⁻²³·max|w| of rounding), a bound that is itself at most
    1e-3 of the weights' total change; the ranks' weights are bit-identical (equal hashes)."""
    _equivalent(mlp, tmp_path, method)


def test_two_ranks_with_dropout_match_one_process(tmp_path: Path):
    """Each rank draws the masks of its shard's global sample indices (``feed(offset=)``): the same rows
    of the same masks the single process draws, so the bound above holds with dropout too."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Dropout(0.3),
                                torch.nn.Linear(32, 10))
    export_model(model, tmp_path / "drop", (1, 8, 8), 10, modules=2, tangents=M)
    _equivalent(tmp_path / "drop", tmp_path, "asyncfgd")


def _equivalent(mlp: Path, tmp_path: Path, method: str) -> None:
    ranks = _ranks(mlp, tmp_path, method, 2)
    single, d_single = _single(mlp, method)
    digests = {hashlib.sha256(b"".join(r[n].tobytes() for n in single)).hexdigest() for r in ranks}
    assert len(digests) == 1
    assert all(int(r["sent"]) == STEPS * 8 * (M + 3) for r in ranks)  # 8·(m + 3) bytes a step, nothing else
    d_ranks = ranks[0]["d"]
    assert d_ranks.shape == d_single.shape == (STEPS, M)
    start = {q: v for q, v in load_artifacts(mlp).weights.items()}
    change = max(float(np.abs(single[q] - start[q]).max()) for q in single)
    w_max = max(float(np.abs(v).max()) for v in single.values())
    bound = LR * float(np.abs(d_ranks - d_single).max(axis=1).sum()) * _max_tangent(mlp) + STEPS * 4 * 2**-23 * w_max
    assert bound <= 1e-3 * change, (bound, change)
    for q in single:
        np.testing.assert_allclose(ranks[0][q], single[q], rtol=0, atol=bound, err_msg=q)


def test_shards_cover_the_batch_and_local_methods_are_refused(mlp: Path):
    assert [shard(10, r, 3) for r in range(3)] == [slice(0, 4), slice(4, 7), slice(7, 10)]
    runners = load_runners(load_artifacts(mlp), "onnxruntime", 1)
    with pytest.raises(ValueError, match="does not all_reduce"):
        make_scheduler(runners, "local-activity", "sgd", lambda s: LR, lambda k, s: 1.0, Perturbation(0),
                       reduce=lambda n, c, loss, d: (n, c, loss, d))


def test_drift_guard_restores_rank_0s_weights_and_statistics_are_averaged(tmp_path: Path):
    """Rank 1's weights differ by one ulp: the digest check names it and copies rank 0's over, after which
    the replicas agree; running statistics (1 on rank 0, 2 on rank 1) average to 1.5 on both."""
    from asyncfgd.exporter.models import build_model

    torch.manual_seed(0)
    art = tmp_path / "cnn"
    export_model(build_model("cnn", 10, (1, 8, 8), channels=[4]), art, (1, 8, 8), 10, modules=2, tangents=1)
    port = _free_port()
    outs = [tmp_path / f"check{r}.npz" for r in range(2)]
    a, b = _launch([[CHECKS, str(art), str(outs[r]), str(port), str(r)] for r in range(2)], outs)
    for res in (a, b):
        assert res["first"].tolist() == [1] and res["second"].tolist() == []
        assert res["stats"].size > 0 and np.all(res["stats"] == 1.5)
    assert np.array_equal(a["digest"], b["digest"])
