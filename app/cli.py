"""The `asyncfgd-app` command line (typer): one module per command in commands/."""
from importlib.metadata import version as package_version

import typer

from asyncfgd.app.commands import (
    bench,
    bench_pipeline,
    bench_tangents,
    build,
    doctor,
    export,
    export_inference,
    pretrain,
    report,
    save_torch,
    sweep,
    train,
    validate,
)

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Forward-gradient (AsyncFGD) training without backpropagation.")


@app.command()
def version() -> None:
    """Print the package version."""
    typer.echo(package_version("asyncfgd"))


for command in (doctor, build, bench, bench_pipeline, bench_tangents, train, save_torch, sweep, pretrain, report,
                export, export_inference, validate):
    command.register(app)


def main() -> None:
    app()
