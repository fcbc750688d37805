"""One benchmark method in a process of its own; prints one JSON line with its numbers.

``python -m asyncfgd.app.bench.worker METHOD --artifacts DIR --batch N ...``. A fresh process
per method gives clean memory numbers: the process's high-water mark (``peak_rss_mb``) is read
once after the method's imports (the baseline: interpreter + libraries) and once at the end
(the peak). Only the standard library is imported at module level, because the ``bp-ort``
worker runs under the onnxruntime-training venv's python (``bench --setup-ort-training``),
where neither torch nor this package is installed: it is started by file path.

Every method trains the same model on the same synthetic batch; a step is a full training
step (update included). ``steps`` timed steps are repeated ``repeats`` times after ``warmup``
untimed ones; the median rate is reported with half the range.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_METHODS = ("forward", "bp-torch", "bp-ort", "fgd-torch", "fgd", "asyncfgd")
LEAN = "-lean"  # fgd-lean, asyncfgd-lean: the runtime in ONNX Runtime's lean memory mode (runtime/host_memory.py)
METHODS = (*DEFAULT_METHODS, "fgd" + LEAN, "asyncfgd" + LEAN)
PREPARE_BP_ORT = "prepare-bp-ort"
ORT_BASE_MODEL = "base.onnx"  # bp-ort: the forward graph with weights as initializers (run.py writes it)
ORT_META = "meta.json"  # bp-ort: {"trainable": the weight initializers' names}
ORT_BATCH = "batch.npz"  # bp-ort: the synthetic batch (x, labels) every method trains on
LR = 1e-4

Step = Callable[[int], float]  # run n training steps, return seconds per step


def peak_rss_mb() -> float:
    """The process's peak resident memory so far.

    Linux: ``VmHWM`` of /proc/self/status, the high-water mark of this program's own memory.
    ``ru_maxrss`` would be wrong in a worker: Linux carries the parent's peak across fork and exec,
    so every worker would start at the bench process's size (torch included).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def runtime_method(method: str) -> tuple[str, str]:
    """(the scheduler's method, the memory mode) of a runtime method: ``asyncfgd-lean`` -> (asyncfgd, lean)."""
    return (method.removesuffix(LEAN), "lean") if method.endswith(LEAN) else (method, "fast")


def measure(run: Step, batch: int, steps: int, warmup: int, repeats: int) -> dict[str, Any]:
    if warmup:
        run(warmup)
    rates = [batch / run(steps) for _ in range(repeats)]
    return {"samples_per_s": statistics.median(rates), "spread": (max(rates) - min(rates)) / 2, "rates": rates}


def timed(step: Callable[[], None], sync: Callable[[], None] = lambda: None) -> Step:
    def run(n: int) -> float:
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        sync()
        return (time.perf_counter() - t0) / n
    return run


# -- methods: each imports what it needs, then marks the baseline, then builds its step ------------

def _forward(a: argparse.Namespace, mark: Callable[[], None]) -> tuple[Step, dict[str, Any]]:
    """Plain ONNX Runtime forward of the eval graphs: the floor any training step is measured against."""
    import onnxruntime as ort

    from asyncfgd.app.bench.throughput import synthetic_batch
    from asyncfgd.runtime import contract as c
    from asyncfgd.runtime.artifacts import load_artifacts
    from asyncfgd.runtime.ort_backend import session_options

    mark()
    art = load_artifacts(a.artifacts)
    x, _ = synthetic_batch(art.input_shape, art.num_classes, a.batch)
    chain = []
    for k in range(len(art.modules)):
        s = ort.InferenceSession(art.graph_bytes(k, c.EVAL), session_options(a.threads),
                                 providers=["CPUExecutionProvider"])
        feeds = {i.name: art.weights[c.split_input(i.name)[1]] for i in s.get_inputs() if i.name != c.X}
        chain.append((s, feeds))

    def step() -> None:
        h = x
        for s, feeds in chain:
            h = s.run(None, {c.X: h, **feeds})[0]
    return timed(step), {}


def _runtime(a: argparse.Namespace, mark: Callable[[], None]) -> tuple[Step, dict[str, Any]]:
    """Sync FGD or the AsyncFGD pipeline, exactly as `asyncfgd-app bench-pipeline` runs them."""
    from asyncfgd.app.bench.throughput import TrainingLoop
    from asyncfgd.runtime.engine import make_backend

    method, memory = runtime_method(a.method)
    make_backend(a.backend, memory)  # imports the backend's libraries (and sets the memory mode) before the baseline
    mark()
    loop = TrainingLoop(a.artifacts, method, a.batch, threads=a.threads, backend=a.backend, memory=memory)
    info: dict[str, Any] = {}

    def run(n: int) -> float:
        per_step, busy = loop.run(n)
        if busy is not None:
            info["busy_s"] = busy
        return per_step
    return run, info


def _torch(a: argparse.Namespace, mark: Callable[[], None]) -> tuple[Step, dict[str, Any]]:
    """PyTorch eager: autograd (bp-torch) or a forward-mode forward-gradient step (fgd-torch), Adam."""
    import torch
    import torch.autograd.forward_ad as fwad
    import torch.nn.functional as F
    from torch.func import functional_call

    from asyncfgd.app.bench.throughput import synthetic_batch
    from asyncfgd.app.training.bp import build_from_spec
    from asyncfgd.exporter.reference_modules import set_bn_training
    from asyncfgd.runtime.artifacts import load_artifacts

    torch.set_num_threads(a.threads)
    mark()
    art = load_artifacts(a.artifacts)
    model = build_from_spec(art.manifest["model"], art.weights, art.root).to(a.device)
    model.eval()  # dropout off, BatchNorm per the artifacts' mode, as the runtime
    set_bn_training(model, art.bn_mode == "train")
    x, y = (torch.from_numpy(v).to(a.device) for v in synthetic_batch(art.input_shape, art.num_classes, a.batch))
    del art
    params = dict(model.named_parameters())
    opt = torch.optim.Adam(params.values(), lr=LR)
    if a.method == "bp-torch":
        def step() -> None:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
    else:
        # torch.func.jvp refuses train-mode BatchNorm (it mutates running statistics), so the
        # step uses the same forward-mode engine through dual tensors: one pass, stats updated
        u = {n: torch.empty_like(p) for n, p in params.items()}

        def step() -> None:
            with torch.no_grad(), fwad.dual_level():
                for t in u.values():
                    t.normal_()
                duals = {n: fwad.make_dual(p.detach(), u[n]) for n, p in params.items()}
                d = fwad.unpack_dual(F.cross_entropy(functional_call(model, duals, (x,)), y)).tangent
                for n, p in params.items():
                    p.grad = u[n].mul_(d)  # g = (∇L·u) u, formed in the tangent's memory
            opt.step()
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    return timed(step, sync), {}


def _ort_training() -> types.ModuleType:
    """``onnxruntime.training`` without its ``__init__``, which imports torch for ORTModule;
    the artifact generator and the on-device API need only onnx and the runtime."""
    import onnxruntime

    name = "onnxruntime.training"
    if name not in sys.modules:
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(Path(onnxruntime.__file__).parent / "training")]
        sys.modules[name] = pkg
    return sys.modules[name]


def _bp_ort(a: argparse.Namespace, mark: Callable[[], None]) -> tuple[Step, dict[str, Any]]:
    """ONNX Runtime's on-device training API (backprop): train step + AdamW (decay 0 = Adam)."""
    import onnxruntime as ort

    _ort_training()
    from onnxruntime.training.api import CheckpointState, Module, Optimizer

    mark()
    d = Path(a.artifacts)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = a.threads
    state = CheckpointState.load_checkpoint(str(d / "checkpoint"))
    module = Module(str(d / "training_model.onnx"), state, session_options=opts)
    opt = Optimizer(str(d / "optimizer_model.onnx"), module)
    opt.set_learning_rate(LR)
    module.train()
    import numpy as np

    with np.load(d / ORT_BATCH) as batch:
        x, y = batch["x"], batch["labels"]

    def step() -> None:
        module(x, y)
        opt.step()
        module.lazy_reset_grad()
    return timed(step), {}


def prepare_bp_ort(directory: Path) -> None:
    """Training artifacts (gradient graph, AdamW graph, checkpoint) from ``base.onnx``.

    Runs in its own process before the measured one, so the generator's memory is not counted.
    The optimizer graph is written with IR version 14, which ORT 1.19 cannot load: re-saved as 10.
    """
    import onnx

    _ort_training()
    from onnxruntime.training import artifacts
    from onnxruntime.training.onnxblock.optim import AdamW

    model = onnx.load(str(directory / ORT_BASE_MODEL))
    trainable = json.loads((directory / ORT_META).read_text())["trainable"]
    frozen = [t.name for t in model.graph.initializer if t.name not in trainable]
    artifacts.generate_artifacts(model, requires_grad=trainable, frozen_params=frozen,
                                 loss=artifacts.LossType.CrossEntropyLoss, optimizer=AdamW(eps=1e-8),
                                 artifact_directory=str(directory))
    path = str(directory / "optimizer_model.onnx")
    opt = onnx.load(path)
    opt.ir_version = min(opt.ir_version, 10)
    onnx.save(opt, path)


SETUPS = {"forward": _forward, "fgd": _runtime, "asyncfgd": _runtime, "fgd" + LEAN: _runtime,
          "asyncfgd" + LEAN: _runtime, "bp-torch": _torch, "fgd-torch": _torch, "bp-ort": _bp_ort}


def device_peak_mb() -> float | None:
    """Peak CUDA memory of a torch method that ran on a GPU, else None."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda.max_memory_allocated() / 2**20


def run_method(a: argparse.Namespace) -> dict[str, Any]:
    baseline: list[float] = []
    run, info = SETUPS[a.method](a, lambda: baseline.append(peak_rss_mb()))
    out = {"method": a.method, "threads": a.threads,
           **measure(run, a.batch, a.steps, a.warmup, a.repeats), **info}
    out.update(peak_rss_mb=peak_rss_mb(), baseline_rss_mb=baseline[0], peak_device_mb=device_peak_mb())
    return out


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m asyncfgd.app.bench.worker", description=__doc__.splitlines()[0])
    p.add_argument("method", choices=(*METHODS, PREPARE_BP_ORT))
    p.add_argument("--artifacts", required=True, help="artifact directory (bp-ort: its training directory)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--backend", default="onnxruntime", help="fgd/asyncfgd: runtime backend")
    p.add_argument("--device", default="cpu", help="bp-torch/fgd-torch: torch device")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a = parse(sys.argv[1:] if argv is None else argv)
    if a.method == PREPARE_BP_ORT:
        prepare_bp_ort(Path(a.artifacts))
        print(json.dumps({"prepared": a.artifacts}))
    else:
        print(json.dumps(run_method(a)))


if __name__ == "__main__":
    main()
