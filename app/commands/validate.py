"""`asyncfgd-app validate`: check an artifact directory's graphs against a float64 PyTorch reference."""
from __future__ import annotations

from pathlib import Path

import typer

from asyncfgd.app.commands.common import fail, parse_ints


def register(app: typer.Typer) -> None:
    """Add the `validate` command to the CLI."""

    @app.command()
    def validate(
        artifacts_dir: Path = typer.Argument(..., help="Directory written by `asyncfgd-app export`."),
        batch_sizes: str = typer.Option("1,64", "--batch-sizes", help="Batch sizes to test, comma-separated."),
        tol: float = typer.Option(1e-4, "--tol", help="Relative error allowed (raised to 10x float32 PyTorch's own "
                                  "error where the problem is ill-conditioned)."),
        seed: int = typer.Option(0, "--seed", help="Seed of the random test inputs."),
    ) -> None:
        """Check every graph against a float64 PyTorch reference; exit 1 if any check fails."""
        from asyncfgd.exporter.validate import validate_artifacts
        from asyncfgd.runtime.artifacts import ArtifactError

        sizes = tuple(parse_ints(batch_sizes, "--batch-sizes", "1,64"))
        try:
            report = validate_artifacts(artifacts_dir, batch_sizes=sizes, seed=seed, tol=tol)
        except (ArtifactError, ValueError) as exc:
            fail(str(exc))
        typer.echo(report.table())
        if not report.passed:
            raise typer.Exit(1)
