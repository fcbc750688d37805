"""`asyncfgd-app report`: run the convergence experiments and write docs/convergence.md's table and plots."""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import typer

from asyncfgd.app.commands.train import USER_ERRORS, fail
from asyncfgd.app.report.render import acceptance, block, machine, plot, table, write_doc
from asyncfgd.app.report.run import SEEDS, measured, run_report, settings, skip_rows
from asyncfgd.app.training.config import Interrupted


def _seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(v) for v in text.split(","))
    except ValueError:
        seeds = ()
    if not seeds or min(seeds) < 0:
        raise typer.BadParameter(f"expected comma-separated seeds >= 0 such as 0,1,2, got {text!r}")
    return seeds


def report_cmd(
    work: Path = typer.Option(Path("runs/report"), help="Where the runs go (kept; a re-run reuses finished ones)."),
    doc: Path = typer.Option(Path("docs/convergence.md"), help="Document whose generated block is rewritten (the "
                             "text around the block's markers is kept)."),
    img_dir: Path = typer.Option(Path("docs/img"), help="Where the plots go (convergence-SETTING.png)."),
    seeds: str = typer.Option(",".join(map(str, SEEDS)), callback=_seeds, help="Seeds of every row."),
    jobs: int = typer.Option(1, min=1, help="Timed runs at a time. Keep 1 for comparable wall-clock times; the "
                             "learning-rate sweeps always use every core."),
    tune_lr: bool = typer.Option(True, help="Pick each row's learning rate with a sweep (1e-5..1e-2, 10 epochs, "
                                 "validation split, seed 0) as the paper does; --no-tune-lr uses train's default."),
    cifar10: str | None = typer.Option(None, help="CIFAR-10 directory (python batches): adds its rows."),
    svhn: str | None = typer.Option(None, help="SVHN directory (train/test_32x32.mat): adds its rows."),
    only: str | None = typer.Option(None, help="Run only these settings (comma-separated: digits, transfer-head, "
                                    "transfer-all, mnist-5k, shapes32, cifar10, svhn); the document then holds only "
                                    "them."),
    skip: list[str] = typer.Option([], "--skip", metavar="SETTING:METHOD", help="Leave this row out of the run "
                                   "(repeatable), e.g. shapes32:asyncfgd when its hours of CPU are not available; "
                                   "the table marks it as not run."),
    epochs: int | None = typer.Option(None, min=1, help="Override every setting's epochs (a quick smoke run; the "
                                      "document's numbers use the settings' own)."),
) -> None:
    """Measure backprop, sync FGD, AsyncFGD, local-activity and the local-loss mode on digits from scratch,
    mnist-5k and shapes32 from scratch and the digits-transfer fine-tune (and CIFAR-10/SVHN when given), at
    equal epochs and equal wall-clock, over several seeds; writes the table into docs/convergence.md and the
    plots into docs/img."""
    chosen, skipped = settings(cifar10, svhn)
    if only:
        wanted = set(only.split(","))
        unknown = wanted - {st.slug for st in chosen} - {"cifar10", "svhn"}
        if unknown:
            fail(f"--only: unknown setting(s) {', '.join(sorted(unknown))}; choose from "
                       f"{', '.join(st.slug for st in chosen)} (cifar10/svhn need their --cifar10/--svhn PATH).")
        chosen = [st for st in chosen if st.slug in wanted]
        skipped = [(name, flag) for name, flag in skipped if flag in wanted]
    try:
        chosen = skip_rows(chosen, skip)
    except ValueError as exc:
        fail(str(exc))
    if epochs is not None:
        chosen = [replace(st, options={**st.options, "epochs": epochs}) for st in chosen]
    try:
        results = run_report(chosen, work, seeds, jobs, tune_lr, log=typer.echo)
        img_dir.mkdir(parents=True, exist_ok=True)
        images = {}
        for res in results:
            path = img_dir / f"convergence-{res.setting.slug}.png"
            plot(res, path)
            images[res.setting.slug] = os.path.relpath(path, doc.parent)
        doc.parent.mkdir(parents=True, exist_ok=True)
        write_doc(doc, block(results, skipped, seeds, machine(measured(work)), images))
    except (Interrupted, KeyboardInterrupt):
        fail(f"interrupted; finished runs are kept in {work} and a re-run reuses them.", 130)
    except USER_ERRORS as exc:
        fail(str(exc))
    typer.echo(table(results, skipped))
    for line in acceptance(results):
        typer.echo(line)
    typer.echo(f"wrote {doc} and {len(images)} plot(s) in {img_dir}")


def register(app: typer.Typer) -> None:
    """Add the `report` command to the CLI."""
    app.command("report")(report_cmd)
