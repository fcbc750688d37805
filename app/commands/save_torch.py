"""`asyncfgd-app save-torch`: a run's trained weights as a PyTorch state_dict (needs torch)."""
from __future__ import annotations

from pathlib import Path

import typer

from asyncfgd.app.commands.common import USER_ERRORS, fail


def register(app: typer.Typer) -> None:
    """Add the `save-torch` command to the CLI."""

    @app.command("save-torch")
    def save_torch_cmd(
        run: Path = typer.Argument(..., help="Run directory (holds checkpoint.npz)."),
        out: Path = typer.Option(..., "--out", help="Where to write the PyTorch state_dict (.pth)."),
    ) -> None:
        """Export a run's trained weights and BN statistics as a PyTorch state_dict for the same model (zoo,
        torchvision or your own file: it is rebuilt from the run's stored model spec)."""
        try:
            from asyncfgd.app.training.bp import save_torch  # imports torch

            spec = save_torch(run, out)
        except USER_ERRORS as exc:
            fail(str(exc))
        if ":" in spec["name"]:  # torchvision:NAME or PATH.py:FACTORY
            build = (f"asyncfgd.exporter.model_sources.build_any({spec['name']!r}, {spec['num_classes']}, "
                     f"{tuple(spec['input_shape'])}, {spec['config']})")
        else:
            build = (f"build_model({spec['name']!r}, {spec['num_classes']}, {tuple(spec['input_shape'])}, "
                     f"**{spec['config']})")
        typer.echo(f"wrote {out}: load it with {build}.load_state_dict(torch.load({str(out)!r}))")
