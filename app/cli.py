"""The `asyncfgd-app` command line (typer)."""
import typer

from . import (cmd_bench, cmd_bench_pipeline, cmd_bench_tangents, cmd_export, cmd_pretrain, cmd_report, cmd_sweep,
               cmd_train, doctor)

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Forward-gradient (AsyncFGD) training without backpropagation.")


@app.command()
def version() -> None:
    """Print the package version."""
    from importlib.metadata import version as v
    typer.echo(v("asyncfgd"))


doctor.register(app)
cmd_bench.register(app)
cmd_bench_pipeline.register(app)
cmd_bench_tangents.register(app)
cmd_train.register(app)
cmd_sweep.register(app)
cmd_pretrain.register(app)
cmd_report.register(app)
cmd_export.register(app)


def main() -> None:
    app()
