"""`asyncfgd-app bench-distributed`: bytes and samples/s of data-parallel FGD, DDP backprop and the
pipeline across ranks, 1..N gloo processes on this machine, priced on a slower link."""
from __future__ import annotations

import tempfile
from pathlib import Path

import typer

from asyncfgd.app.commands.common import bench_model, fail, parse_ints

HELP = """Measure what distributed training sends, and how fast it runs, with gloo processes on 127.0.0.1.

Rows: fgd-data (sync FGD, each process its shard of the global batch; the processes all_reduce m + 3 numbers
per step), ddp-bp (PyTorch DDP backprop + Adam: an all_reduce of the whole gradient), each with every count
of --procs at one thread per process, plus one process with as many threads (the best single-process
baseline); and pipeline (rank k runs module k of --pipeline-modules, AsyncFGD). Columns: samples/s and the
ratio to one process, the bytes a rank hands to collectives or sends per step, the bytes per rank the
loopback interface carried (TCP/IP framing included; quiet machine only), and the step time the link model
predicts at --mbit and --latency-ms (docs/distributed.md). Needs torch."""


def register(app: typer.Typer) -> None:
    @app.command("bench-distributed", help=HELP)
    def bench_distributed(
        model: str = typer.Option("resnet18", help="Model: a zoo NAME, torchvision:NAME or PATH.py:FACTORY."),
        config: list[str] = typer.Option([], "--config", help="Model option KEY=VALUE, repeatable."),
        input_shape: str = typer.Option("3,32,32", help="C,H,W of the input."),
        batch: int = typer.Option(64, help="Global mini-batch (split over the processes)."),
        tangents: int = typer.Option(1, help="Tangents m per step."),
        procs: str = typer.Option("1,2", help="Comma-separated process counts for fgd-data and ddp-bp."),
        pipeline_modules: int = typer.Option(2, help="Modules (= processes) of the pipeline row; 0: no row."),
        steps: int = typer.Option(5, help="Timed steps."),
        warmup: int = typer.Option(2, help="Untimed steps first."),
        mbit: float = typer.Option(100.0, help="Link model: bandwidth in Mbit/s (100: Wi-Fi between devices)."),
        latency_ms: float = typer.Option(2.0, help="Link model: one-way latency in ms."),
        timeout_s: float = typer.Option(900.0, help="Time limit per group of processes (s)."),
    ) -> None:
        shape = tuple(parse_ints(input_shape, "--input-shape", "3,32,32", 3))
        worlds = parse_ints(procs, "--procs", "1,2")
        if batch < max(worlds):
            fail(f"--batch {batch} cannot be split over {max(worlds)} processes")
        from asyncfgd.app.bench.distributed import LinkModel, boundary_bytes, format_table, run_bench
        from asyncfgd.exporter.export import export_model
        from asyncfgd.exporter.models import model_spec
        from asyncfgd.runtime.artifacts import load_artifacts, param_numel

        net = bench_model(model, shape, config)
        with tempfile.TemporaryDirectory() as tmp:
            whole, split = Path(tmp) / "k1", Path(tmp) / "split"
            typer.echo(f"exporting {model} {input_shape} (m = {tangents}) ...")
            export_model(net, whole, shape, 10, modules=1, tangents=tangents, model_spec=model_spec(net))
            if pipeline_modules > 1:
                export_model(net, split, shape, 10, modules=pipeline_modules, tangents=tangents,
                             model_spec=model_spec(net), balance_batch=batch)
            try:
                rows = run_bench(whole, split if pipeline_modules > 1 else None, worlds, batch, steps, warmup,
                                 timeout_s, log=typer.echo)
            except RuntimeError as exc:
                fail(str(exc))
            per_link = boundary_bytes(split, batch) if pipeline_modules > 1 else []
            params = param_numel(load_artifacts(whole).modules[0].raw)
        typer.echo(f"{model} {input_shape}, global batch {batch}, m = {tangents}, gloo on 127.0.0.1")
        typer.echo(format_table(rows, LinkModel(mbit * 1e6, latency_ms / 1e3), per_link, params))
