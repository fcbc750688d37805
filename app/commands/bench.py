"""`asyncfgd-app bench`: throughput and peak memory of every training method, side by side."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import typer

from asyncfgd.app.bench.worker import DEFAULT_METHODS
from asyncfgd.app.commands.common import parse_ints
from asyncfgd.exporter.model_sources import FORMS

MODEL_HELP = (
    f"Model to benchmark: {FORMS} (the forms `train --help` describes), built with its defaults (bench takes no "
    "--config; a PATH.py:FACTORY gets num_classes if it has a parameter of that name) and freshly initialised.")

BENCH_HELP = (
    "Compare training methods on one model, input and batch, each in its own process.\n\n"
    "Methods: forward (ONNX Runtime inference only, the floor); bp-torch (PyTorch autograd + Adam); bp-ort (ONNX "
    "Runtime's on-device training API, backprop + AdamW; needs --setup-ort-training once); fgd-torch (PyTorch "
    "forward-mode forward gradient + Adam); fgd (this runtime: sync FGD on ONNX Runtime, best of 1 and all "
    "threads); asyncfgd (the K-module pipeline, one thread per module); fgd-lean and asyncfgd-lean (the same in "
    "`train --memory lean`, not run unless named).\n\n"
    "Prints samples/s (median ± half-range of the repeats, warm-up excluded), peak RSS with the import baseline "
    "and the memory model's prediction, and ratios vs bp-torch and fgd; --json and --plot save them. Methods run "
    "one after another: compare numbers taken on a quiet machine (the load average is printed)."
)


def register(app: typer.Typer) -> None:
    @app.command("bench", help=BENCH_HELP)
    def bench(
        model: str = typer.Option("resnet18", help=MODEL_HELP),
        modules: int = typer.Option(4, help="Pipeline modules K for asyncfgd."),
        batch: int = typer.Option(64, help="Mini-batch size (every method)."),
        steps: int = typer.Option(3, help="Timed training steps per repeat."),
        warmup: int = typer.Option(2, help="Untimed steps first (asyncfgd: at least K, to fill the pipeline)."),
        repeats: int = typer.Option(3, help="Timed repeats per method (median reported)."),
        methods: str = typer.Option(",".join(DEFAULT_METHODS), help="Comma-separated methods to run."),
        input_shape: str = typer.Option("3,32,32", help="Input C,H,W."),
        num_classes: int = typer.Option(10, help="Classes."),
        json_out: Path = typer.Option(None, "--json", help="Write the report as JSON."),
        plot: Path = typer.Option(None, help="Write a bar chart (PNG): throughput and peak memory."),
        timeout_s: float = typer.Option(600.0, help="Per-worker time limit (s)."),
        ort_venv: Path = typer.Option(Path(".venv-ort-training"), help="Venv holding onnxruntime-training (bp-ort)."),
        setup: bool = typer.Option(False, "--setup-ort-training",
                                                help="Create --ort-venv with onnxruntime-training-cpu, then exit."),
        backend: str = typer.Option("onnxruntime", help="Runtime backend for fgd/asyncfgd (e.g. torch-cuda)."),
        device: str = typer.Option("cpu", help="Torch device for bp-torch/fgd-torch (cuda: reports device peak)."),
        curve: bool = typer.Option(False, "--curve",
                                   help="Instead: test accuracy vs time and epochs, bp/fgd/asyncfgd "
                                        "trained with the `train` defaults, at most --budget-s each."),
        budget_s: float = typer.Option(60.0, help="--curve: wall-clock training seconds per method (at most)."),
    ) -> None:
        from asyncfgd.app.bench.run import (
            BenchConfig,
            format_memory_model,
            format_table,
            run_bench,
            setup_ort_training,
            write_plot,
        )

        if setup:
            setup_ort_training(ort_venv, typer.echo)
            return
        if curve:
            _curve(budget_s, json_out, plot)
            return
        cfg = BenchConfig(model=model, modules=modules, batch=batch, steps=steps, warmup=warmup, repeats=repeats,
                          methods=[m.strip() for m in methods.split(",") if m.strip()],
                          input_shape=tuple(parse_ints(input_shape, "--input-shape", "3,32,32", 3)),
                          num_classes=num_classes, timeout_s=timeout_s,
                          ort_venv=ort_venv, backend=backend, device=device)
        with tempfile.TemporaryDirectory() as tmp:
            try:
                report = run_bench(cfg, Path(tmp), typer.echo)
            except ValueError as exc:
                raise typer.BadParameter(str(exc)) from None
        typer.echo(format_table(report))
        typer.echo(format_memory_model(report))
        if json_out:
            json_out.write_text(json.dumps(report, indent=1))
            typer.echo(f"wrote {json_out}")
        if plot:
            write_plot(report, plot)
            typer.echo(f"wrote {plot}")



def _curve(budget_s: float, json_out: Path | None, plot: Path | None) -> None:
    from asyncfgd.app.bench.curve import plot_curve, run_curve

    with tempfile.TemporaryDirectory() as tmp:
        curves = run_curve(Path(tmp), budget_s, log=typer.echo)
    for method, hist in curves.items():
        best = max((h["test_acc"] for h in hist), default=float("nan"))
        secs = hist[-1]["wall_s"] if hist else 0.0
        typer.echo(f"{method:9s} {len(hist):5d} epochs in {secs:5.1f} s, best test acc {best:.1%}")
    if json_out:
        json_out.write_text(json.dumps({"budget_s": budget_s, "curves": curves}, indent=1))
        typer.echo(f"wrote {json_out}")
    plot_curve(curves, plot or Path("bench-curve.png"),
               f"asyncfgd-app train defaults, at most {budget_s:.0f} s per method")
    typer.echo(f"wrote {plot or 'bench-curve.png'}")
