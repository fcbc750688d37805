"""`asyncfgd-app bench-memory`: the memory curve, peak RSS against batch size per method."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import typer

from asyncfgd.app.commands.common import fail, parse_ints

HELP = """Peak memory against batch size for bp-torch, fgd and asyncfgd, with each method's slope in MB per sample.

Each point is one fresh worker process (one warm-up and one training step, Adam), so its peak RSS is that
run's alone; the model is exported once. Prints the peaks, the least-squares slope (MB per sample) and
intercept per method, and plots them (--plot)."""


def register(app: typer.Typer) -> None:
    @app.command("bench-memory", help=HELP)
    def bench_memory(
        model: str = typer.Option("resnet18", help="Model: a zoo NAME, torchvision:NAME or PATH.py:FACTORY."),
        input_shape: str = typer.Option("3,32,32", help="C,H,W of the input."),
        batches: str = typer.Option("8,16,32,64,128", help="Comma-separated batch sizes."),
        methods: str = typer.Option("bp-torch,fgd,asyncfgd",
                                    help="Comma-separated methods (as `bench`, fgd-lean and asyncfgd-lean included)."),
        modules: int = typer.Option(2, help="Pipeline modules K for asyncfgd."),
        plot: Path = typer.Option(Path("memory-curve.png"), help="Where to write the plot (PNG)."),
        json_out: Path = typer.Option(None, "--json", help="Write the points as JSON."),
        timeout_s: float = typer.Option(900.0, help="Per-worker time limit (s)."),
    ) -> None:
        from asyncfgd.app.bench.memory_curve import format_curve, plot_memory_curve, run_memory_curve
        from asyncfgd.app.bench.run import BenchConfig, WorkerError
        from asyncfgd.app.bench.worker import METHODS

        chosen = [m.strip() for m in methods.split(",") if m.strip()]
        unknown = [m for m in chosen if m not in METHODS or m == "bp-ort"]
        if unknown:
            fail(f"unknown method(s) {', '.join(unknown)}; choose from "
                 f"{', '.join(m for m in METHODS if m != 'bp-ort')}")
        sizes = parse_ints(batches, "--batches", "8,16,32")
        if len(sizes) < 2:
            fail("--batches needs at least two sizes to fit a slope")
        c, h, w = parse_ints(input_shape, "--input-shape", "3,32,32", 3)
        cfg = BenchConfig(model=model, modules=modules, methods=chosen, input_shape=(c, h, w), timeout_s=timeout_s)
        with tempfile.TemporaryDirectory() as tmp:
            try:
                curves = run_memory_curve(cfg, sizes, Path(tmp), log=typer.echo)
            except WorkerError as exc:
                fail(f"a worker failed: {exc}")
        typer.echo(f"{model} {input_shape}, K = {modules} for asyncfgd, Adam, m = 1")
        typer.echo(format_curve(curves))
        if json_out:
            json_out.write_text(json.dumps({"model": model, "input_shape": [c, h, w], "curves": curves}, indent=1))
            typer.echo(f"wrote {json_out}")
        plot_memory_curve(curves, plot, f"{model} {input_shape}: peak memory vs batch")
        typer.echo(f"wrote {plot}")
