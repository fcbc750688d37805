"""`asyncfgd-app build`: TensorRT engines for an artifact directory (the experimental TensorRT
backend, runtime/trt; never executed where this project is tested)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from asyncfgd.app.commands.common import fail


def register(app: typer.Typer) -> None:
    """Add the `build` command to the CLI."""

    @app.command()
    def build(
        artifact_dir: Annotated[Path, typer.Argument(help="Directory written by `asyncfgd-app export`.")],
        fp16: Annotated[bool, typer.Option("--fp16", help="Allow FP16 kernels (I/O stays float32).")] = False,
        workspace: Annotated[int, typer.Option("--workspace", help="Builder workspace limit, MiB.")] = 1024,
        max_batch: Annotated[int, typer.Option("--max-batch", help="Largest batch size the engines accept.")] = 64,
        opt_batch: Annotated[int | None, typer.Option("--opt-batch", help="Batch size to tune for "
                                                      "(default: max).")] = None,
    ) -> None:
        """Build (or reuse cached) TensorRT engines for every module and graph role (experimental)."""
        from asyncfgd.runtime.trt.build import build_engines
        from asyncfgd.runtime.trt.env import BackendUnavailable

        try:
            engines = build_engines(artifact_dir, fp16=fp16, workspace_mb=workspace,
                                    max_batch=max_batch, opt_batch=opt_batch)
        except BackendUnavailable as e:
            fail(str(e))
        except (FileNotFoundError, ValueError) as e:
            fail(str(e))
        for (module, role), path in sorted(engines.items()):
            typer.echo(f"m{module} {role:<10} {path}")
