"""`asyncfgd-app report`: the experiments behind docs/convergence.md, run on this machine.

A *setting* is a group of runs compared with each other: one task, the same options and epochs,
one row per method (backprop, sync FGD, AsyncFGD, local-activity and the experimental local-loss
mode), each over several seeds. Learning rates are chosen as the paper does (`sweep`, on a validation split,
seed 0) unless ``tune_lr`` is off. Fine-tuning settings start every seed from its own backprop-
pretrained model (`pretrain`, seed s), and add the pretrained model's accuracy before
fine-tuning. Timed runs go one at a time by default, each in a fresh process, so that their
wall-clock times can be compared; everything is kept under the work directory, and a re-run
reuses what finished (to re-render the document, or after an interruption).
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from asyncfgd.app.training import metrics
from asyncfgd.app.training import pretrain as pretrain_defaults
from asyncfgd.app.training.config import TrainConfig, method_defaults
from asyncfgd.app.training.pretrain import pretrain
from asyncfgd.app.training.sweep import DEFAULT_EPOCHS, DEFAULT_LRS, DEFAULT_VALIDATION, default_jobs, run_many, sweep
from asyncfgd.runtime.engine import ACTIVITY_METHOD
from asyncfgd.runtime.engine import METHODS as FGD_METHODS

SEEDS = (0, 1, 2)
METHODS = ("bp", *FGD_METHODS)
#: the from-scratch comparison of issue 16: the product, its synchronous form, the new method, backprop
SCRATCH_METHODS = ("bp", "fgd", "asyncfgd", ACTIVITY_METHOD)
PRETRAINED = "pretrained"  # the row of the starting model, evaluated without training (epochs 0)
MEASURED = "measured.json"  # when the timed runs ran, and the machine's load then (a re-render keeps it)
#: the fine-tune recipe (docs/convergence.md): pretrained body frozen, the head its own module, trained
RECIPE = {"model": "cnn", "data": "digits-transfer", "split": ["head"], "freeze_until": "flatten", "epochs": 100}


@dataclass(frozen=True)
class Setting:
    """Runs compared with each other: same task and options, one row per method."""

    task: str
    name: str
    slug: str  # names the work subdirectory and the plot docs/img/convergence-SLUG.png
    methods: tuple[str, ...]
    options: dict[str, Any]  # TrainConfig fields shared by every method
    pretrained: bool = False  # fine-tune each seed's pretrained model (and report its accuracy before)
    #: an acceptance bar: ("accuracy", a) or ("recovery", r) for AsyncFGD; ("activity", a): local-activity
    #: reaches a at most ACTIVITY_TIME_RATIO x backprop's time per epoch; ("activity-gap", g): local-activity
    #: ends within g of backprop
    target: tuple[str, float] | None = None
    tune_lr: bool = True  # False: every method at its train default (method_defaults), even when tuning
    not_run: tuple[str, ...] = ()  # methods left out of this report run (`report --skip`): shown as not run


@dataclass
class Result:
    """A setting's measurements: per row (method, or PRETRAINED), one metrics history per seed."""

    setting: Setting
    lrs: dict[str, float]
    histories: dict[str, list[list[dict[str, float]]]] = field(default_factory=dict)
    diverged: dict[str, int] = field(default_factory=dict)


def settings(cifar10: str | None = None, svhn: str | None = None) -> tuple[list[Setting], list[tuple[str, str]]]:
    """The report's settings, and the (task, option) pairs left out because their files were not given."""
    out = [
        Setting("digits from scratch (mlp)", "all layers, train defaults", "digits", METHODS, {},
                target=("accuracy", 0.90)),
        Setting("digits-transfer fine-tune (cnn)", "body frozen, head trained (the recipe)", "transfer-head",
                ("bp", "fgd", "asyncfgd"), RECIPE, pretrained=True, target=("recovery", 0.80)),
        Setting("digits-transfer fine-tune (cnn)", "all layers", "transfer-all", METHODS,
                {"model": "cnn", "data": "digits-transfer", "epochs": 30}, pretrained=True),
    ]
    for data, bar in (("mnist-5k", ("activity", 0.95)), ("shapes32", ("activity-gap", 0.10))):
        out.append(Setting(f"{data} from scratch (cnn)", "train defaults, 20 epochs", data, SCRATCH_METHODS,
                           {"model": "cnn", "data": data, "epochs": 20}, target=bar, tune_lr=False))
    skipped = []
    for name, spec, flag in (("CIFAR-10", cifar10, "cifar10"), ("SVHN", svhn, "svhn")):
        if spec is None:
            skipped.append((name, flag))
            continue
        out.append(Setting(f"{name} from scratch (cnn 32-64-128)", "all layers", flag, METHODS,
                           {"model": "cnn", "config": {"channels": [32, 64, 128]}, "data": f"{flag}:{spec}",
                            "epochs": 10, "tangents": 8}))
    return out, skipped


def skip_rows(chosen: list[Setting], skip: list[str]) -> list[Setting]:
    """The settings without the ``SLUG:METHOD`` rows in ``skip`` (each named row must exist)."""
    pairs = set()
    for item in skip:
        slug, _, method = item.partition(":")
        st = next((st for st in chosen if st.slug == slug), None)
        if st is None or method not in st.methods:
            raise ValueError(f"--skip {item!r}: expected SETTING:METHOD with a chosen setting "
                             f"({', '.join(st.slug for st in chosen)}) and one of its methods")
        pairs.add((slug, method))
    return [replace(st, methods=tuple(m for m in st.methods if (st.slug, m) not in pairs),
                    not_run=tuple(m for m in st.methods if (st.slug, m) in pairs)) for st in chosen]


def _complete(cfg: TrainConfig) -> bool:
    """The run in cfg.run_dir finished all its epochs (metrics.csv has its last row)."""
    path = Path(cfg.run_dir) / "metrics.csv"
    return path.exists() and int(metrics.read_csv(path)[-1]["epoch"]) == cfg.epochs


def _pretrained_weights(work: Path, seeds: tuple[int, ...], log: Callable[[str], None]) -> dict[int, str]:
    """Each seed's backprop-pretrained state_dict (reused when present)."""
    out = {}
    for seed in seeds:
        path = work / "pretrain" / f"seed-{seed}.pth"
        if not path.exists():
            run_dir = work / "pretrain" / f"seed-{seed}"
            shutil.rmtree(run_dir, ignore_errors=True)
            cfg = TrainConfig(model=pretrain_defaults.MODEL, data=pretrain_defaults.DATA,
                              epochs=pretrain_defaults.EPOCHS, seed=seed, run_dir=str(run_dir))
            acc = pretrain(cfg, path, log=lambda _: None, bars=False)
            log(f"pretrained seed {seed}: {100 * acc:.1f}% on {pretrain_defaults.DATA} -> {path}")
        out[seed] = str(path)
    return out


def _base(st: Setting, method: str, seed: int, weights: dict[int, str], run_dir: Path) -> TrainConfig:
    return TrainConfig(**{**method_defaults(method), **st.options, "method": method, "seed": seed,
                          "run_dir": str(run_dir),
                          "weights": weights.get(seed) if st.pretrained else None})


def _choose_lr(st: Setting, method: str, weights: dict[int, str], work: Path, tune: bool,
               log: Callable[[str], None]) -> float:
    """The sweep's winner on seed 0 (reused from an earlier report run), or train's default."""
    if not (tune and st.tune_lr):
        return float(method_defaults(method).get("lr", TrainConfig().lr))
    out = work / st.slug / method / "lr-sweep"
    base = _base(st, method, 0, weights, out)
    short = replace(base, epochs=min(base.epochs, DEFAULT_EPOCHS), validation=DEFAULT_VALIDATION)
    if (out / "sweep.csv").exists():
        with (out / "sweep.csv").open() as f:
            best = next(r for r in csv.DictReader(f) if r["best"] == "1")
        if int(best["epochs"]) == short.epochs:
            return float(best["lr"])
    shutil.rmtree(out, ignore_errors=True)  # interrupted, or swept for other epochs
    result = sweep(short, DEFAULT_LRS, out, default_jobs(), log=lambda _: None)
    log(f"{st.slug} {method}: lr {result.best['lr']:g} (validation {100 * result.best['val_acc']:.1f}%)")
    return float(result.best["lr"])


def run_report(chosen: list[Setting], work: Path, seeds: tuple[int, ...] = SEEDS, jobs: int = 1,
               tune_lr: bool = True, log: Callable[[str], None] = print) -> list[Result]:
    """Run (or reuse) every setting's runs; ``jobs`` timed runs at a time."""
    weights = _pretrained_weights(work, seeds, log) if any(st.pretrained for st in chosen) else {}
    results, plan = [], []
    for st in chosen:
        res = Result(st, {m: _choose_lr(st, m, weights, work, tune_lr, log) for m in st.methods})
        rows = {}
        if st.pretrained:
            rows[PRETRAINED] = [replace(_base(st, "asyncfgd", s, weights, work / st.slug / PRETRAINED / f"seed-{s}"),
                                        epochs=0) for s in seeds]
        rows.update({m: [replace(_base(st, m, s, weights, work / st.slug / m / f"seed-{s}"), lr=res.lrs[m])
                         for s in seeds] for m in st.methods})
        plan.append((res, rows))
    todo = [c for _, rows in plan for cfgs in rows.values() for c in cfgs if not _complete(c)]
    for cfg in todo:
        shutil.rmtree(cfg.run_dir, ignore_errors=True)  # an interrupted run of an earlier report
    log(f"{len(todo)} runs to do, {jobs} at a time, under {work}")
    finished = {}
    if todo:
        load_start = os.getloadavg()[0]
        finished = dict(zip((c.run_dir for c in todo), run_many(todo, jobs), strict=False))
        (work / MEASURED).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "load_start": load_start,
                                                 "load_end": os.getloadavg()[0], "jobs": jobs}) + "\n")
    for res, rows in plan:
        for row, cfgs in rows.items():
            done = [c for c in cfgs if finished.get(c.run_dir, True)]
            res.histories[row] = [metrics.read_csv(Path(c.run_dir) / "metrics.csv") for c in done]
            res.diverged[row] = len(cfgs) - len(done)
        results.append(res)
    return results


def measured(work: Path) -> dict[str, Any]:
    """Date and load averages of the last batch of timed runs under ``work``."""
    return json.loads((work / MEASURED).read_text())
