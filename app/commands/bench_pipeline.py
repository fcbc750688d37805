"""`asyncfgd-app bench-pipeline`: sync FGD vs the AsyncFGD pipeline on ONNX Runtime, side by side."""
from __future__ import annotations

import tempfile
from pathlib import Path

import typer

from asyncfgd.app.commands.common import fail, parse_ints

PIPELINE_HELP = """Measure whether module parallelism pays on this machine.

For each model and batch size, in one run and interleaved: sync FGD on ONNX Runtime with 1 and with 2
intra-op threads (the better one is the baseline), and AsyncFGD with K modules running concurrently,
one ORT thread each. Prints samples/s (median ± half-range of the repeats), the AsyncFGD/FGD ratio and
the pipeline efficiency: measured samples/s over the bound set by the slowest module's busy time
(its update, tangent draw and dual run per step)."""


def register(app: typer.Typer) -> None:
    @app.command("bench-pipeline", help=PIPELINE_HELP)
    def bench_pipeline(
        models: str = typer.Option("cnn,resnet18", help="Comma-separated models, each a zoo NAME, torchvision:NAME "
                                   "or PATH.py:FACTORY as in `train --model` (input 3x32x32, 10 classes)."),
        batches: str = typer.Option("8,64", help="Comma-separated batch sizes."),
        modules: int = typer.Option(2, help="Pipeline modules K for AsyncFGD (one worker thread each)."),
        steps: int = typer.Option(6, help="Timed steps per repeat, at least."),
        seconds: float = typer.Option(1.0, help="Each repeat also runs at least this long (more steps for fast "
                                      "models)."),
        repeats: int = typer.Option(5, help="Interleaved repeats per method (median reported)."),
        warmup: int = typer.Option(3, help="Untimed steps per method before timing."),
        store_tangents: bool | None = typer.Option(
            None, "--store-tangents/--no-store-tangents", show_default=False,
            help="Keep the delayed modules' tangents instead of regenerating them. Default: as `train` does, "
                 "keep them when all copies fit in 64 MiB."),
        backend: str = typer.Option("onnxruntime", help="onnxruntime (CPU threads) or torch-cuda (one CUDA "
                                    "stream per module; needs a GPU)."),
    ) -> None:
        batch_sizes = parse_ints(batches, "--batches", "8,64")
        import torch

        from asyncfgd.app.bench.throughput import TrainingLoop, interleaved
        from asyncfgd.app.training.learners import copies_fit
        from asyncfgd.exporter.export import export_model
        from asyncfgd.exporter.model_sources import build_any, short_name
        from asyncfgd.exporter.models import model_spec
        from asyncfgd.runtime.artifacts import load_artifacts

        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            for i, source in enumerate(m.strip() for m in models.split(",") if m.strip()):
                torch.manual_seed(0)
                try:
                    model = build_any(source, 10, (3, 32, 32))
                except ValueError as exc:
                    fail(str(exc))
                name = short_name(source)
                for b in batch_sizes:
                    dirs, manifests = {}, {}
                    for k in sorted({1, modules}):  # the split is balanced for this batch size
                        dirs[k] = Path(tmp) / f"{i}-b{b}-k{k}"
                        manifests[k] = export_model(model, dirs[k], (3, 32, 32), 10, modules=k,
                                                    model_spec=model_spec(model), balance_batch=b)
                    cuts = ", ".join(m["layers"][0] for m in manifests[modules]["modules"][1:])
                    store = copies_fit(load_artifacts(dirs[modules])) if store_tangents is None else store_tangents
                    kw = {"store_tangents": store, "backend": backend}
                    loops = {
                        "fgd-1t": TrainingLoop(dirs[1], "fgd", b, threads=1, **kw),
                        "fgd-2t": TrainingLoop(dirs[1], "fgd", b, threads=2, **kw),
                        "async": TrainingLoop(dirs[modules], "asyncfgd", b, threads=1, **kw),
                    }
                    if backend != "onnxruntime":  # threads mean nothing on a GPU
                        del loops["fgd-2t"]
                    res = interleaved(loops, steps, warmup, repeats, min_seconds=seconds)
                    for loop in loops.values():
                        loop.close()
                    best = max((k for k in res if k.startswith("fgd")), key=lambda k: res[k].samples_per_s)
                    a = res["async"]
                    bound = b / max(a.busy_s)
                    rows.append((name, b, best, res[best], a, a.samples_per_s / res[best].samples_per_s,
                                 a.samples_per_s / bound, cuts, store))
                    _print_row(rows[-1])
        typer.echo("\nratio = AsyncFGD / best sync FGD; "
                   "efficiency = AsyncFGD samples/s / (batch / slowest module busy time)")


def _print_row(row: tuple) -> None:
    name, b, best, fgd, a, ratio, eff, cuts, store = row
    busy = "/".join(f"{1e3 * t:.1f}" for t in a.busy_s)
    typer.echo(f"{name:10s} batch {b:3d} | sync FGD ({best[4:]}) {fgd.samples_per_s:8.1f} ± {fgd.spread:5.1f} samples/s"
               f" | AsyncFGD {a.samples_per_s:8.1f} ± {a.spread:5.1f} | ratio {ratio:4.2f}x"
               f" | efficiency {100 * eff:5.1f}%"
               f" | cut before {cuts}, busy {busy} ms/step, tangents {'stored' if store else 'regenerated'}")
