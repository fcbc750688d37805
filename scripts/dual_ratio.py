"""How much a forward-gradient step costs over inference: ORT time of the dual graphs / eval graphs.

For each zoo model at full width, and each architecture fixture of tests/architectures.py
(``--models fixtures`` runs them all with ResNet-18): export K modules (m = 1), time every module's
dual graph (module 0: ``dual_first``) and its ``eval`` graph in ONNX Runtime with the runtime's
session options (batch 64, 2 intra-op threads, median of 5 interleaved runs after warm-up: eval,
dual, eval, dual, ... so both meet the same load; with ``--repeat R`` the least of R such medians),
and sum over modules. Then
profile both with ORT's profiler and list where the dual graphs' extra time goes, by op type.
The FLOP floor of a weight-perturbed dual step is about 3x the forward (y = Wx, then W·ẋ and U·x).

    python scripts/dual_ratio.py [--models resnet18,cnn|fixtures] [--batch 64] [--threads 2] [--repeat 1] [--out r.json]
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from asyncfgd.exporter.export import export_model
from asyncfgd.exporter.models import build_model, model_spec
from asyncfgd.exporter.split import cut_points
from asyncfgd.exporter.trace import trace
from asyncfgd.runtime import contract as c
from asyncfgd.runtime.artifacts import Artifacts, load_artifacts
from asyncfgd.runtime.ort_backend import session_options

CASES = {  # model: (input shape, modules)
    "mlp": ((1, 8, 8), 4),
    "cnn": ((1, 8, 8), 4),
    "resnet18": ((3, 32, 32), 4),
    "mobilenetv2": ((3, 32, 32), 4),
    "resnet18-imagenet": ((3, 64, 64), 4),
}
RUNS, WARMUP = 5, 2
FIXTURE_FILE = Path(__file__).resolve().parents[1] / "tests" / "architectures.py"


def _fixtures() -> dict:
    """tests/architectures.py's FIXTURES (name: (factory, input shape)), loaded by path."""
    spec = importlib.util.spec_from_file_location("asyncfgd_fixtures", FIXTURE_FILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FIXTURES


def _build(name: str) -> tuple[torch.nn.Module, tuple[int, ...], int, dict | None]:
    """(model, input shape, modules, zoo spec) for a zoo name or a fixture name."""
    if name in CASES:
        shape, k = CASES[name]
        torch.manual_seed(0)
        model = build_model(name, 10, shape)
        return model, shape, k, model_spec(model)
    fixtures = _fixtures()
    if name not in fixtures:
        raise SystemExit(f"unknown model {name!r}: zoo {sorted(CASES)} or fixtures {sorted(fixtures)}")
    make, shape = fixtures[name]
    model = make()
    return model, tuple(shape), min(4, len(cut_points(trace(model, tuple(shape)))) + 1), None


def _feeds(sess: ort.InferenceSession, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    feeds = {}
    for inp in sess.get_inputs():
        shape = [batch if isinstance(d, str) else d for d in inp.shape]
        v = rng.standard_normal(shape).astype(np.float32)
        feeds[inp.name] = np.abs(v) + 1 if inp.name.endswith("running_var") else v
    return feeds


def _session(arts: Artifacts, index: int, role: str, threads: int, profile: str | None = None) -> ort.InferenceSession:
    opts = session_options(threads)
    if profile:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile
    return ort.InferenceSession(arts.graph_bytes(index, role), opts, providers=["CPUExecutionProvider"])


def _op_ms(sess: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> collections.Counter:
    """Kernel time per op type (ms per run), from ORT's profiler."""
    for _ in range(RUNS):
        sess.run(None, feeds)
    path = Path(sess.end_profiling())
    agg: collections.Counter = collections.Counter()
    for ev in json.loads(path.read_text()):
        if ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time"):
            agg[ev["args"]["op_name"]] += ev["dur"] / 1e3 / RUNS
    path.unlink()
    return agg


def _interleaved_ms(sessions: dict[str, ort.InferenceSession], feeds: dict[str, dict]) -> dict[str, float]:
    """Median ms per role over RUNS runs taken in turns (after WARMUP runs of each)."""
    times: dict[str, list[float]] = {kind: [] for kind in sessions}
    for i in range(WARMUP + RUNS):
        for kind, sess in sessions.items():
            t = time.perf_counter()
            sess.run(None, feeds[kind])
            if i >= WARMUP:
                times[kind].append(time.perf_counter() - t)
    return {kind: 1e3 * statistics.median(ts) for kind, ts in times.items()}


def measure(name: str, batch: int, threads: int, repeat: int, work: Path) -> dict:
    model, shape, k, spec = _build(name)
    export_model(model, work / name, shape, 10, modules=k, bn_mode="train", model_spec=spec, balance_batch=batch)
    arts = load_artifacts(work / name)
    rng = np.random.default_rng(0)
    total = {c.DUAL: 0.0, c.EVAL: 0.0}
    ops = {c.DUAL: collections.Counter(), c.EVAL: collections.Counter()}
    for info in arts.modules:
        roles = {c.DUAL: c.DUAL if info.index else c.DUAL_FIRST, c.EVAL: c.EVAL}
        sessions = {kind: _session(arts, info.index, role, threads) for kind, role in roles.items()}
        feeds = {kind: _feeds(sess, batch, rng) for kind, sess in sessions.items()}
        medians: dict[str, list[float]] = {kind: [] for kind in roles}
        for _ in range(repeat):
            for kind, ms in _interleaved_ms(sessions, feeds).items():
                medians[kind].append(ms)
        for kind, role in roles.items():
            total[kind] += min(medians[kind])
            ops[kind] += _op_ms(_session(arts, info.index, role, threads, str(work / "prof")), feeds[kind])
    dual, ev = ops[c.DUAL], ops[c.EVAL]
    extra = {op: dual[op] - ev[op] for op in dual | ev}
    return {"model": name, "input": list(shape), "modules": k, "batch": batch, "threads": threads,
            "dual_ms": total[c.DUAL], "eval_ms": total[c.EVAL], "ratio": total[c.DUAL] / total[c.EVAL],
            "dual_ops_ms": dict(dual.most_common()), "eval_ops_ms": dict(ev.most_common()),
            "extra_ops_ms": dict(sorted(extra.items(), key=lambda kv: -kv[1]))}


def report(r: dict) -> str:
    extra = sum(v for v in r["extra_ops_ms"].values())
    lines = [f"{r['model']:<18} {'x'.join(map(str, r['input'])):>8}  K={r['modules']}  dual {r['dual_ms']:8.2f} ms  "
             f"eval {r['eval_ms']:8.2f} ms  ratio {r['ratio']:.2f}x"]
    for op, ms in list(r["extra_ops_ms"].items())[:6]:
        lines.append(f"    {op:<18} dual {r['dual_ops_ms'].get(op, 0):7.2f}  eval {r['eval_ops_ms'].get(op, 0):7.2f}  "
                     f"extra {ms:7.2f} ms ({100 * ms / extra:4.1f}% of the extra kernel time)")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(CASES), help="zoo or fixture names, or 'fixtures' (all + resnet18)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1, help="take the least of this many medians per graph")
    ap.add_argument("--out", type=Path, help="also write the results as JSON")
    args = ap.parse_args()
    results = []
    names = [*_fixtures(), "resnet18"] if args.models == "fixtures" else args.models.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            results.append(measure(name, args.batch, args.threads, args.repeat, Path(tmp)))
            print(report(results[-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
