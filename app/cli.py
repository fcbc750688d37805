"""The `asyncfgd-app` command line (typer): one module per command in commands/."""
from importlib.metadata import version as package_version

import typer

from asyncfgd.app.commands import (
    bench,
    bench_distributed,
    bench_memory,
    bench_pipeline,
    bench_tangents,
    build,
    doctor,
    export,
    export_inference,
    plan,
    pretrain,
    report,
    save_torch,
    sweep,
    train,
    validate,
)

# Plain click help instead of rich's panels: at 80 columns rich squeezed each option's help into a
# column of ~18 characters (and read [vision] or :factory: in help texts as markup); click gives
# the help ~46 columns there and uses up to HELP_WIDTH on wider terminals.
HELP_WIDTH = 100
app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  context_settings={"max_content_width": HELP_WIDTH},
                  help="Forward-gradient (AsyncFGD) training without backpropagation.")


@app.command()
def version() -> None:
    """Print the package version."""
    typer.echo(package_version("asyncfgd"))


for command in (doctor, build, bench, bench_distributed, bench_memory, bench_pipeline, bench_tangents, train,
                save_torch, sweep, pretrain, report, export, export_inference, plan, validate):
    command.register(app)


def main() -> None:
    app()
