"""`asyncfgd-app bench-tangents`: time per training step against the number of batched tangents."""
from __future__ import annotations

import tempfile
from pathlib import Path

import typer

from asyncfgd.app.commands.common import bench_model, parse_ints

TANGENTS_HELP = """Time per step of sync FGD on ONNX Runtime as the number of tangents m carried in ONE dual pass grows.

The primal work is shared by all m tangents, so m estimates cost far less than m passes. Every m is measured
in the same run, interleaved, and reported as the median with its half-range, plus the ratio to m = 1."""


def register(app: typer.Typer) -> None:
    @app.command("bench-tangents", help=TANGENTS_HELP)
    def bench_tangents(
        model: str = typer.Option("cnn", help="Model: a zoo NAME, torchvision:NAME or PATH.py:FACTORY (as "
                                  "`train --model`; 10 classes)."),
        config: list[str] = typer.Option([], "--config", help="Model option KEY=VALUE, repeatable (as "
                                         "`train --config`)."),
        input_shape: str = typer.Option("1,8,8", help="C,H,W of the input (1,8,8 = digits)."),
        batch: int = typer.Option(64, help="Batch size."),
        tangents: str = typer.Option("1,2,4,8,16", help="Comma-separated tangent counts m."),
        threads: int = typer.Option(1, help="ONNX Runtime intra-op threads."),
        steps: int = typer.Option(20, help="Timed steps per repeat, at least."),
        seconds: float = typer.Option(1.0, help="Each repeat also runs at least this long."),
        repeats: int = typer.Option(5, help="Interleaved repeats (median reported)."),
    ) -> None:
        shape = tuple(parse_ints(input_shape, "--input-shape", "1,8,8", 3))
        counts = parse_ints(tangents, "--tangents", "1,8")
        from asyncfgd.app.bench.throughput import TrainingLoop, interleaved
        from asyncfgd.exporter.export import export_model
        from asyncfgd.exporter.models import model_spec

        net = bench_model(model, shape, config)
        with tempfile.TemporaryDirectory() as tmp:
            loops = {}
            for m in counts:
                out = Path(tmp) / f"m{m}"
                export_model(net, out, shape, 10, modules=1, tangents=m, model_spec=model_spec(net))
                loops[m] = TrainingLoop(out, "fgd", batch, threads=threads)
            res = interleaved(loops, steps, warmup=3, repeats=repeats, min_seconds=seconds)
            for loop in loops.values():
                loop.close()
        base = batch / res[counts[0]].samples_per_s
        typer.echo(f"{model} {input_shape} batch {batch}, sync FGD, {threads} ORT thread(s)")
        for m in counts:
            t = batch / res[m].samples_per_s
            spread = t * res[m].spread / res[m].samples_per_s
            typer.echo(f"  m = {m:3d}: {1e3 * t:8.2f} ± {1e3 * spread:6.2f} ms/step   {t / base:5.2f}x m={counts[0]}   "
                       f"{t / base / m * counts[0]:5.2f}x per estimate")
