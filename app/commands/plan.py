"""`asyncfgd-app plan`: the batch, K and m that fit a memory budget (CPU, ONNX Runtime)."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from asyncfgd.app.commands.common import bench_model, fail, parse_ints

if TYPE_CHECKING:
    from asyncfgd.app.bench.planner import Calibration

HELP = """Pick the batch, pipeline modules K and tangents m that fit in --memory MB of peak RSS, and say why.

Predictions are the memory model's bytes for each candidate (app/bench/memory_model.py, with the dual graphs'
liveness) turned into a peak RSS by a calibration: a `bench-memory --json` file of one model measured on this
machine, at the input size you plan for (the arena's overhead differs between 32x32 and 224x224 inputs;
docs/performance.md). Scope: CPU with ONNX Runtime; no GPU device profile yet. A calibration that also measured
fgd-lean and asyncfgd-lean adds `train --memory lean` candidates, chosen only when nothing else fits.
--check FILE instead compares the calibration's predictions with the measured peaks of another bench-memory
file (another model, or held-out batches)."""


def register(app: typer.Typer) -> None:
    @app.command("plan", help=HELP)
    def plan(
        calibration: Path = typer.Option(..., help="bench-memory JSON measured on this machine (the calibration)."),
        memory: float = typer.Option(None, help="Peak-RSS budget in MB."),
        model: str = typer.Option("resnet18", help="Model: a zoo NAME, torchvision:NAME or PATH.py:FACTORY."),
        input_shape: str = typer.Option("3,32,32", help="C,H,W of the input."),
        batches: str = typer.Option("8,16,32,64,128", help="Candidate batch sizes."),
        modules: int = typer.Option(2, help="K for the asyncfgd candidates (fgd: one module)."),
        tangents: str = typer.Option("1,4", help="Candidate tangent counts m."),
        max_batch: int = typer.Option(64, help="Largest batch worth choosing."),
        calibrate_batches: str = typer.Option(None, help="Fit the calibration on these batches only."),
        check_file: Path = typer.Option(None, "--check", help="Compare predictions with this bench-memory JSON."),
    ) -> None:
        from asyncfgd.app.bench.planner import PlanError, calibrate, candidates, choose, load_curve
        from asyncfgd.app.bench.worker import runtime_method

        try:
            only = parse_ints(calibrate_batches, "--calibrate-batches", "16,64") if calibrate_batches else None
            cal = calibrate(load_curve(calibration), only)
            if check_file is not None:
                _check(cal, load_curve(check_file))
                return
        except PlanError as exc:
            fail(str(exc))
        if memory is None:
            fail("--memory MB is the budget to plan for (or use --check FILE)")
        shape = tuple(parse_ints(input_shape, "--input-shape", "3,32,32", 3))
        sizes, counts = parse_ints(batches, "--batches", "8,16,32"), parse_ints(tangents, "--tangents", "1,4")
        net = bench_model(model, shape, [])
        from asyncfgd.exporter.export import export_model
        from asyncfgd.exporter.models import model_spec

        with tempfile.TemporaryDirectory() as tmp:
            exports = {}
            for m in counts:
                for k in sorted({1, modules}):
                    typer.echo(f"exporting {model} with K = {k}, m = {m} ...")
                    exports[(k, m)] = Path(tmp) / f"k{k}-m{m}"
                    export_model(net, exports[(k, m)], shape, 10, modules=k, tangents=m, model_spec=model_spec(net),
                                 balance_batch=max_batch)
            options = candidates(exports, sizes, cal)
        best, why = choose(options, memory, max_batch)
        typer.echo(f"{'method':13} {'K':>2} {'m':>3} {'batch':>5} {'model MB':>9} {'predicted peak MB':>18}  fits")
        for c in sorted(options, key=lambda c: (c.method, c.tangents, c.batch)):
            typer.echo(f"{c.method:13} {c.modules:>2} {c.tangents:>3} {c.batch:>5} {c.model_mb:9.0f} "
                       f"{c.peak_mb:18.0f}  {'yes' if c.peak_mb <= memory else 'no'}")
        if best is None:
            fail(why)
        method, mode = runtime_method(best.method)
        typer.echo(f"chosen: {best.method}, K = {best.modules}, m = {best.tangents}, batch {best.batch}. {why}")
        typer.echo(f"calibrated on {cal.model} (batches {', '.join(map(str, cal.batches))}) with baseline "
                   f"{cal.baseline_mb:.0f} MB; train with: asyncfgd-app train --model {model} --method {method} "
                   f"--modules {best.modules} --tangents {best.tangents} --batch-size {best.batch}"
                   + (f" --memory {mode}" if mode != "fast" else ""))


def _check(cal: Calibration, curve: dict[str, Any]) -> None:
    from asyncfgd.app.bench.planner import check

    rows = check(cal, curve)
    typer.echo(f"calibrated on {cal.model} batches {', '.join(map(str, cal.batches))}; checking {curve.get('model')}")
    typer.echo(f"{'method':13} {'batch':>5} {'measured MB':>11} {'predicted MB':>12} {'error':>7}")
    for r in rows:
        typer.echo(f"{r['method']:13} {r['batch']:>5} {r['measured_mb']:11.0f} {r['predicted_mb']:12.0f} "
                   f"{100 * r['error']:+6.1f}%{'  (calibration point)' if r['calibrated'] else ''}")
    held = [abs(r["error"]) for r in rows if not r["calibrated"]]
    if held:
        typer.echo(f"largest error on points not calibrated on: {100 * max(held):.1f}%")
