"""`asyncfgd-app bench`: every training method on one model, input and batch, each in its own process.

The orchestration: export the model once (one artifact set with K=1 for the single-stream methods,
one with K modules for AsyncFGD), run ``worker`` once per method (and per thread count where
the best one is taken), and turn the JSON lines into a table, a JSON report and a bar chart, with
the memory model's prediction next to each measured peak. A worker that fails or times out becomes
a row with its error; the others still run.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from asyncfgd.app.bench import worker
from asyncfgd.app.bench.memory_model import graph_live, predict
from asyncfgd.app.bench.throughput import synthetic_batch
from asyncfgd.app.plots import pyplot
from asyncfgd.runtime import contract as c

ORT_TRAINING_PACKAGES = ("onnxruntime-training-cpu==1.19.2", "numpy", "onnx")
DEFAULT_ORT_VENV = Path(".venv-ort-training")
BASELINE = "bp-torch"
REFERENCE = "fgd"


class WorkerError(RuntimeError):
    """A method's worker failed; the message is what its row shows."""


@dataclass
class BenchConfig:
    model: str = "resnet18"
    modules: int = 4
    batch: int = 64
    steps: int = 3
    warmup: int = 2
    repeats: int = 3
    methods: list[str] = field(default_factory=lambda: list(worker.DEFAULT_METHODS))
    input_shape: tuple[int, int, int] = (3, 32, 32)
    num_classes: int = 10
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    timeout_s: float = 600.0
    ort_venv: Path = DEFAULT_ORT_VENV
    backend: str = "onnxruntime"
    device: str = "cpu"

    def pipelined(self, method: str) -> bool:
        return worker.runtime_method(method)[0] == "asyncfgd"

    def thread_choices(self, method: str) -> list[int]:
        """ORT single-stream methods get the better of 1 and all cores; AsyncFGD 1 per module."""
        method = worker.runtime_method(method)[0]
        if method == "asyncfgd":
            return [1]
        if method in ("forward", "fgd", "bp-ort") and self.backend == "onnxruntime":
            return sorted({1, self.threads})
        return [self.threads]


# -- artifacts -------------------------------------------------------------------------------------

def export_artifacts(cfg: BenchConfig, root: Path) -> dict[int, Path]:
    """The model exported unsplit (K=1) and split into ``cfg.modules`` modules, same weights."""
    import torch

    from asyncfgd.exporter.export import export_model
    from asyncfgd.exporter.model_sources import build_any, short_name
    from asyncfgd.exporter.models import model_spec

    torch.manual_seed(0)
    model = build_any(cfg.model, cfg.num_classes, cfg.input_shape)
    dirs = {}
    for k in sorted({1, cfg.modules}):
        dirs[k] = root / f"{short_name(cfg.model)}-k{k}"
        export_model(model, dirs[k], cfg.input_shape, cfg.num_classes, modules=k, model_spec=model_spec(model),
                     balance_batch=cfg.batch)
    return dirs


def write_ort_training_base(artifacts_dir: Path, out: Path, batch: int) -> None:
    """bp-ort's input: the training-mode forward graph up to the logits, weights as initializers.

    Our own loss head ends in ReduceMax, which has no gradient in ONNX Runtime's builder, so it is
    cut off and the generator appends its CrossEntropyLoss. Running BatchNorm statistics are not
    needed for train-mode logits and are dropped with the unused nodes.
    """
    import onnx
    from onnx import numpy_helper

    from asyncfgd.runtime.artifacts import load_artifacts

    art = load_artifacts(artifacts_dir)
    model = onnx.load_from_string(art.graph_bytes(0, c.FORWARD))
    g = model.graph
    needed, nodes = {c.LOGITS}, []
    for node in reversed(list(g.node)):
        if any(o in needed for o in node.output):
            nodes.append(node)
            needed.update(node.input)
    outputs = [o for o in g.output if o.name == c.LOGITS]
    tensors = {i.name: c.split_input(i.name) for i in g.input if i.name in needed}
    inputs = [i for i in g.input if i.name in tensors and not tensors[i.name][0]]
    weights = [numpy_helper.from_array(art.weights[name], full) for full, (prefix, name) in tensors.items() if prefix]
    constants = [t for t in g.initializer if t.name in needed]
    for container, items in ((g.node, nodes[::-1]), (g.output, outputs), (g.input, inputs),
                             (g.initializer, constants + weights)):
        del container[:]
        container.extend(items)
    out.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out / worker.ORT_BASE_MODEL))
    trainable = [full for full, (prefix, _) in tensors.items() if prefix == c.WEIGHT]
    (out / worker.ORT_META).write_text(json.dumps({"trainable": trainable}))
    x, labels = synthetic_batch(art.input_shape, art.num_classes, batch)
    np.savez(out / worker.ORT_BATCH, x=x, labels=labels)


# -- the onnxruntime-training venv -----------------------------------------------------------------

def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def setup_ort_training(venv: Path, log: Callable[[str], None] = print) -> None:
    """Create ``venv`` with onnxruntime-training: it ships the same ``onnxruntime`` module as the
    plain package, so it must never share an environment with the project's own runtime."""
    log(f"creating {venv} with {' '.join(ORT_TRAINING_PACKAGES)}")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv_python(venv)), "-m", "pip", "install", "--quiet", *ORT_TRAINING_PACKAGES], check=True)
    subprocess.run([str(venv_python(venv)), "-c",
                    "import onnxruntime, onnx; print('onnxruntime', onnxruntime.__version__)"],
                   check=True)


# -- workers ---------------------------------------------------------------------------------------

def run_worker(cmd: list[str], timeout_s: float) -> dict[str, Any]:
    """Run one worker and return its JSON line; failures raise WorkerError with the reason."""
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise WorkerError(f"timed out after {timeout_s:.0f} s") from None
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        tail = [ln for ln in res.stderr.strip().splitlines() if ln.strip()][-1:] or [f"exit code {res.returncode}"]
        raise WorkerError(tail[0].strip()[:300])
    return json.loads(lines[-1])


def worker_cmd(python: str, method: str, artifacts: Path, cfg: BenchConfig, threads: int) -> list[str]:
    warmup = max(cfg.warmup, cfg.modules) if cfg.pipelined(method) else cfg.warmup  # fill the pipeline
    entry = [str(Path(worker.__file__))] if method == "bp-ort" else ["-m", worker.__name__]
    return [python, *entry, method, "--artifacts", str(artifacts), "--batch", str(cfg.batch),
            "--steps", str(cfg.steps), "--warmup", str(warmup), "--repeats", str(cfg.repeats),
            "--threads", str(threads), "--backend", cfg.backend, "--device", cfg.device]


def bench_method(method: str, cfg: BenchConfig, dirs: dict[int, Path], tmp: Path) -> dict[str, Any]:
    """The method's best run over its thread choices (all runs kept under ``threads_tried``)."""
    python, artifacts = sys.executable, dirs[cfg.modules if cfg.pipelined(method) else 1]
    if method == "bp-ort":
        python = str(venv_python(cfg.ort_venv))
        if not Path(python).exists():
            raise WorkerError(f"not installed: run `asyncfgd-app bench --setup-ort-training` (creates {cfg.ort_venv})")
        artifacts = tmp / "bp-ort"
        write_ort_training_base(dirs[1], artifacts, cfg.batch)
        run_worker([python, str(Path(worker.__file__)), worker.PREPARE_BP_ORT, "--artifacts",
                    str(artifacts)], cfg.timeout_s)
    runs = [run_worker(worker_cmd(python, method, artifacts, cfg, t), cfg.timeout_s)
            for t in cfg.thread_choices(method)]
    best = max(runs, key=lambda r: r["samples_per_s"])
    return {**best, "threads_tried": {str(r["threads"]): r["samples_per_s"] for r in runs}}


# -- the report ------------------------------------------------------------------------------------

def run_bench(cfg: BenchConfig, root: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every method of ``cfg`` (artifacts under ``root``) and return the report."""
    unknown = [m for m in cfg.methods if m not in worker.METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(worker.METHODS)}")
    load_start = os.getloadavg()[0]
    dirs = export_artifacts(cfg, root)
    manifests = {k: json.loads((d / "manifest.json").read_text()) for k, d in dirs.items()}
    methods: dict[str, dict[str, Any]] = {}
    for method in cfg.methods:
        t0 = time.perf_counter()
        try:
            methods[method] = bench_method(method, cfg, dirs, root)
        except WorkerError as exc:
            methods[method] = {"error": str(exc)}
        log(f"{method}: done in {time.perf_counter() - t0:.0f} s")
        k, base = cfg.modules if cfg.pipelined(method) else 1, worker.runtime_method(method)[0]
        live = graph_live(dirs[k], manifests[k], cfg.batch) if base in ("fgd", "asyncfgd") else None
        pred = predict(manifests[k], base, cfg.batch, live=live)
        methods[method].update(predicted_mb=pred.total / 2**20, predicted_parts_mb=pred.mb(),
                               predicted_layers_only_mb=pred.layers_only / 2**20)
    add_ratios(methods)
    return {"config": {**asdict(cfg), "ort_venv": str(cfg.ort_venv)},
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                        "load_avg_start": load_start, "load_avg_end": os.getloadavg()[0]},
            "methods": methods}


def add_ratios(methods: dict[str, dict[str, Any]]) -> None:
    """Throughput vs bp-torch and fgd, memory vs bp-torch, measured working memory vs the model."""
    def ok(name: str) -> dict[str, Any] | None:
        r = methods.get(name)
        return r if r and r.get("samples_per_s") else None

    base, ref = ok(BASELINE), ok(REFERENCE)
    for r in methods.values():
        r.setdefault("samples_per_s", None)
        r.setdefault("peak_rss_mb", None)
        if r["samples_per_s"] is None:
            continue
        r["working_mb"] = r["peak_rss_mb"] - r["baseline_rss_mb"]
        r["measured_over_predicted"] = r["working_mb"] / r["predicted_mb"]
        r["measured_over_layers_only"] = r["working_mb"] / r.get("predicted_layers_only_mb", r["predicted_mb"])
        r["vs_bp_torch"] = r["samples_per_s"] / base["samples_per_s"] if base else None
        r["vs_fgd"] = r["samples_per_s"] / ref["samples_per_s"] if ref else None
        r["rss_vs_bp_torch"] = r["peak_rss_mb"] / base["peak_rss_mb"] if base else None


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def format_table(report: dict[str, Any]) -> str:
    cfg = report["config"]
    head = (f"{cfg['model']} {tuple(cfg['input_shape'])} batch {cfg['batch']}, AsyncFGD K={cfg['modules']}; "
            f"{report['machine']['cpus']} CPUs, load {report['machine']['load_avg_start']:.1f} -> "
            f"{report['machine']['load_avg_end']:.1f}")
    cols = (f"{'method':13s} {'samples/s':>16s} {'vs bp-torch':>11s} {'vs fgd':>7s} {'thr':>3s} | "
            f"{'peak RSS MB':>11s} {'vs bp-torch':>11s} {'baseline':>8s} {'working':>7s} {'model':>6s} "
            f"{'meas/model':>10s} {'layers-only':>10s}")
    lines = [head, cols, "-" * len(cols)]
    for name, r in report["methods"].items():
        if r["samples_per_s"] is None:
            lines.append(f"{name:13s} error: {r['error']}")
            continue
        lines.append(
            f"{name:13s} {r['samples_per_s']:8.1f} ± {r['spread']:5.1f} {_x(r['vs_bp_torch']):>11s} "
            f"{_x(r['vs_fgd']):>7s} {r['threads']:3d} | {r['peak_rss_mb']:11.0f} {_x(r['rss_vs_bp_torch']):>11s} "
            f"{r['baseline_rss_mb']:8.0f} {r['working_mb']:7.0f} {r['predicted_mb']:6.0f} "
            f"{r['measured_over_predicted']:9.2f}x {r['measured_over_layers_only']:9.2f}x"
            + (f" | device peak {r['peak_device_mb']:.0f} MB" if r.get("peak_device_mb") else ""))
    lines.append("samples/s: median ± half-range of the repeats; working = peak RSS - baseline (RSS after imports); "
                 "model = the memory model's bytes (app/bench/memory_model.py); layers-only: measured / the model "
                 "without the dual graphs' temporaries")
    return "\n".join(lines)


def format_memory_model(report: dict[str, Any]) -> str:
    """The model's components per method, to see what dominates."""
    lines = ["memory model (MB):"]
    for name, r in report["methods"].items():
        parts = ", ".join(f"{k} {v:.1f}" for k, v in r["predicted_parts_mb"].items() if v)
        lines.append(f"  {name:13s} {r['predicted_mb']:7.1f} = {parts}")
    return "\n".join(lines)


def write_plot(report: dict[str, Any], path: Path) -> None:
    """Throughput and peak memory side by side; failed methods are left out."""
    plt = pyplot()
    rows = {k: r for k, r in report["methods"].items() if r["samples_per_s"] is not None}
    names = list(rows)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax1.bar(names, [rows[n]["samples_per_s"] for n in names], yerr=[rows[n]["spread"] for n in names],
            color="tab:blue", capsize=4)
    ax1.set_ylabel("samples / s (median, ± half-range)")
    ax1.set_title("throughput")
    base = [rows[n]["baseline_rss_mb"] for n in names]
    ax2.bar(names, base, color="lightgray", label="baseline (imports)")
    ax2.bar(names, [rows[n]["working_mb"] for n in names], bottom=base, color="tab:orange", label="working")
    ax2.scatter(names, [b + rows[n]["predicted_mb"] for b, n in zip(base, names, strict=False)], marker="_", s=400,
                color="black", zorder=3, label="baseline + memory model")
    ax2.set_ylabel("peak RSS (MB)")
    ax2.set_title("peak memory")
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", rotation=30)
    cfg = report["config"]
    fig.suptitle(f"{cfg['model']} {tuple(cfg['input_shape'])}, batch {cfg['batch']}, "
                 f"AsyncFGD K={cfg['modules']}, {report['machine']['cpus']} CPUs")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
