"""`asyncfgd-app export`: make an artifact directory (`validate` checks it).

Every mistake a user can make on the command line (unknown model, impossible split, a layer
without a dual rule, a malformed shape, a missing weights file) ends in a one-paragraph
message on stderr and exit code 2, never a traceback: the exporter's exceptions already
say what went wrong and what would work.

``--check`` writes nothing: it traces the model and prints its operations, size, parameters and
cut points (exporter/coverage.py), then "OK" (exit 0) or the operations without a dual rule (exit 1).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

from asyncfgd.app.commands.common import fail, parse_config, parse_ints, parse_perturb
from asyncfgd.app.commands.train_options import CONFIG_HELP, MODEL_HELP, WEIGHTS_HELP
from asyncfgd.runtime.artifacts import param_numel

#: ``--check``'s class count and input shape when not given
CHECK_CLASSES = 10
CHECK_SHAPE = "3,32,32"


def _summary(manifest: dict[str, Any], out: Path) -> str:
    """One line per module: layers, parameter count, dual cost, files."""
    rows = [("module", "layers", "params", "dual MFLOP/sample", "files")]
    for m in manifest["modules"]:
        files = [out / g["file"] for g in m["graphs"].values()]
        size = sum(f.stat().st_size for f in files) / 1e6
        params = param_numel(m)
        rows.append((str(m["index"]), f"{m['layers'][0]} .. {m['layers'][-1]}", f"{params:,}",
                     f"{m['cost_flops'] / 1e6:.2f}", f"{len(files)} ({size:.2f} MB)"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip() for r in rows)


def _check(model: str, num_classes: int, input_shape: str, config: list[str], seed: int) -> None:
    """``export --check``: the coverage report on stdout; exit 1 with the tracer's message if it fails."""
    import torch

    from asyncfgd.exporter.coverage import check, format_report
    from asyncfgd.exporter.model_sources import build_any

    shape = tuple(parse_ints(input_shape, "--input-shape", "3,32,32", 3))
    try:
        torch.manual_seed(seed)
        net = build_any(model, num_classes, shape, parse_config(config))
    except (ValueError, OSError) as exc:  # a model that cannot be built: a usage error, as for an export
        fail(str(exc))
    report = check(net, shape)
    typer.echo(format_report(report, model))
    if report.error is not None:
        fail(report.error, code=1)


def register(app: typer.Typer) -> None:
    """Add the `export` command to the CLI."""

    @app.command()
    def export(
        model: str = typer.Option(..., "--model", help=MODEL_HELP.replace(" to export on the fly", "")),
        out: Path | None = typer.Option(None, "--out", help="Artifact directory to write (created if missing). "
                                         "Required, except with --check."),
        num_classes: int | None = typer.Option(None, "--num-classes", help="Number of classes of the classifier "
                                                 f"head. Required, except with --check (default {CHECK_CLASSES})."),
        input_shape: str | None = typer.Option(None, "--input-shape", help="Input C,H,W of one sample, e.g. "
                                               f"3,32,32. Required, except with --check (default {CHECK_SHAPE})."),
        check: bool = typer.Option(False, "--check", help="Export nothing: trace the model and print its "
                                   "operations (program op -> count), program nodes, trainable parameters and "
                                   "single-value cut points (so the largest --modules K, and the first names "
                                   "--split takes), then 'OK: every operation has a dual rule' (exit 0), or the "
                                   "first unsupported operation with its module and source line, and every "
                                   "other operation without a dual rule (exit 1). Only --model, --num-classes, "
                                   "--input-shape, --config and --seed apply."),
        modules: int | None = typer.Option(None, "--modules", help="Split into K pipeline modules balanced by "
                                              "step cost (default 1). Exclusive with --split."),
        balance_batch: int = typer.Option(64, "--balance-batch", help="Training batch size --modules balances "
                                          "for: a module's step is batch x dual FLOPs plus per-weight work "
                                          "(tangent draws, update) that does not shrink with the batch, so "
                                          "small batches move cuts towards weight-heavy layers. Layers with "
                                          "two exact graph forms also pick the faster one for this batch "
                                          "(manifest tuned_batch, docs/artifacts.md); any batch still runs."),
        split: str | None = typer.Option(None, "--split", help="Comma-separated layer or block names, each "
                                            "starting a new module (e.g. layer2,layer4). Exclusive with --modules."),
        weights: Path | None = typer.Option(None, "--weights", help=WEIGHTS_HELP),
        bn: str = typer.Option("train", "--bn", help="BatchNorm in the dual/forward graphs: 'train' (batch "
                               "statistics, updated running stats as outputs) or 'frozen' (running stats)."),
        tangents: int = typer.Option(1, "--tangents", help="Weight tangents M per pass (leading dim of u.* inputs)."),
        config: list[str] = typer.Option([], "--config", help=CONFIG_HELP),
        seed: int = typer.Option(0, "--seed", help="Seed of the weight initialisation (and of local heads)."),
        activity: bool = typer.Option(False, "--activity", help="Also export what `train --method local-activity` "
                                      "runs: a local head on every non-last module and the 'activity' graph "
                                      "role (docs/artifacts.md)."),
        perturb: list[str] = typer.Option([], "--perturb", metavar="LAYER=activity|weight",
                                          help="With --activity: how to perturb this layer, repeatable "
                                          "(default: the lower-variance choice, docs/algorithm.md)."),
    ) -> None:
        """Export a model (zoo, torchvision or your own file) as forward-mode dual ONNX graphs (docs/artifacts.md).

        With --check, export nothing: report whether every operation of the model has a dual rule.
        """
        import torch
        from tqdm import tqdm

        from asyncfgd.exporter.export import export_model
        from asyncfgd.exporter.model_sources import build_any, load_any_weights
        from asyncfgd.exporter.models import model_spec
        from asyncfgd.runtime.contract import BN_MODES
        from asyncfgd.runtime.dual.interpreter import module_roles
        from asyncfgd.runtime.dual.program import ActivityPlan, ModuleSpec, Node

        def aux_stub(has: bool) -> list[Node]:  # module_roles counts a local role where a head exists
            return [Node("aux", "linear", [])] if has else []

        if check:
            _check(model, num_classes or CHECK_CLASSES, input_shape or CHECK_SHAPE, config, seed)
            return
        missing = [flag for flag, value in (("--out", out), ("--num-classes", num_classes),
                                            ("--input-shape", input_shape)) if value is None]
        if missing:
            fail(f"exporting needs {', '.join(missing)} (only `export --check` does without them)")
        assert out is not None and num_classes is not None and input_shape is not None
        if modules is not None and split:
            fail("give either --modules K or --split a,b, not both")
        if modules is not None and modules < 1:
            fail(f"--modules must be at least 1, got {modules}")
        if balance_batch < 1:
            fail(f"--balance-batch must be at least 1, got {balance_batch}")
        if bn not in BN_MODES:
            fail(f"--bn must be one of {', '.join(BN_MODES)}, got {bn!r}")
        shape = tuple(parse_ints(input_shape, "--input-shape", "3,32,32", 3))
        choices = parse_perturb(perturb)
        if choices and not activity:
            fail("--perturb chooses how the local-activity graphs perturb a layer; add --activity")
        cuts = [s.strip() for s in split.split(",") if s.strip()] if split else None
        k = len(cuts) + 1 if cuts else (modules or 1)
        try:
            torch.manual_seed(seed)
            net = build_any(model, num_classes, shape, parse_config(config))
            if weights is not None:
                for note in load_any_weights(net, weights, num_classes):
                    typer.echo(f"note: {note}")
            plan = ActivityPlan([], []) if activity else None
            graphs = sum(len(module_roles(ModuleSpec(i, [], "input", aux_stub(activity and i < k - 1), plan)))
                         for i in range(k))
            with tqdm(total=graphs, unit="graph", file=sys.stderr) as bar:
                started = []  # a disabled bar (TQDM_DISABLE) keeps no description to test instead

                def progress(what: str) -> None:  # called as each graph starts: the previous one is done
                    if started:
                        bar.update()
                    started.append(what)
                    bar.set_description(what)

                manifest = export_model(net, out, shape, num_classes, modules=modules, split_at=cuts,
                                        bn_mode=bn, tangents=tangents, model_spec=model_spec(net),
                                        balance_batch=balance_batch, activity=activity, perturb=choices,
                                        seed=seed, progress=progress)
                bar.update()
        except (ValueError, OSError) as exc:  # incl. SplitError, UnsupportedLayerError, a missing --weights
            fail(str(exc))
        typer.echo(_summary(manifest, out))
        typer.echo(f"wrote {out} (check it with `asyncfgd-app validate {out}`)")
