"""`asyncfgd-app report`: equal-time accuracy, acceptance lines, the document's generated block, a smoke run."""
from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from asyncfgd.app.cli import app
from asyncfgd.app.report.render import BEGIN, END, acc_within, acceptance, fmt, table, write_doc
from asyncfgd.app.report.run import PRETRAINED, Result, Setting, settings, skip_rows


def _hist(*points: tuple[float, float]) -> list[dict[str, float]]:
    """(wall_s, test_acc) per epoch."""
    return [{"epoch": i + 1, "wall_s": w, "test_acc": a} for i, (w, a) in enumerate(points)]


def test_accuracy_within_a_time_budget_is_the_last_epoch_that_fits():
    h = _hist((1.0, 0.5), (2.0, 0.7), (3.0, 0.9))
    assert acc_within(h, 2.5) == 0.7 and acc_within(h, 3.0) == 0.9
    assert fmt([acc_within(h, 0.5)]) == "–"  # not one epoch fitted
    assert fmt([0.5, 0.7]) == "60.0 ± 14.1%" and fmt([2.0, 4.0], 1.0, " s") == "3.0 ± 1.4 s"


def _transfer(async_acc: float, async_s: float) -> Result:
    st = Setting("transfer", "recipe", "t", ("bp", "asyncfgd"), {}, pretrained=True, target=("recovery", 0.8))
    res = Result(st, {"bp": 1e-2, "asyncfgd": 1e-2})
    res.histories = {PRETRAINED: [_hist((0.0, 0.1))] * 2, "bp": [_hist((1.0, 0.6), (2.0, 0.6))] * 2,
                     "asyncfgd": [_hist((async_s / 2, 0.2), (async_s, async_acc))] * 2}
    return res


def test_acceptance_is_the_share_of_the_linear_probes_gain_within_five_minutes():
    [line] = acceptance([_transfer(0.5, 10.0)])  # (0.5 - 0.1) / (0.6 - 0.1) = 80%
    assert "recovers 80.0 ± 0.0%" in line and line.endswith("**met**.")
    [slow] = acceptance([_transfer(0.5, 400.0)])
    assert slow.endswith("**not met**.")
    [low] = acceptance([_transfer(0.4, 10.0)])
    assert "recovers 60.0 ± 0.0%" in low and low.endswith("**not met**.")


def test_table_rows_equal_time_columns_and_absent_datasets():
    text = table([_transfer(0.5, 4.0)], [("CIFAR-10", "cifar10")])
    rows = text.splitlines()
    assert "| pretrained model, before fine-tuning | – | 0 | 10.0 ± 0.0% |" in rows[2]
    # AsyncFGD within backprop's 2 s finished only its first epoch (2.0 s): 20%
    assert rows[4].endswith("| 50.0 ± 0.0% | 4.0 ± 0.0 s | 20.0 ± 0.0% | – |")
    assert rows[5] == "| CIFAR-10 | – | – | – | – | not run: files absent (`--cifar10 PATH`) | – | – | – |"


def test_write_doc_replaces_only_the_generated_block(tmp_path: Path):
    doc = tmp_path / "c.md"
    doc.write_text(f"# Title\n\nbefore\n\n{BEGIN}\nold numbers\n{END}\n\nafter\n")
    write_doc(doc, f"{BEGIN}\nnew numbers\n{END}")
    assert doc.read_text() == f"# Title\n\nbefore\n\n{BEGIN}\nnew numbers\n{END}\n\nafter\n"
    fresh = tmp_path / "new.md"
    write_doc(fresh, f"{BEGIN}\nx\n{END}")
    assert fresh.read_text() == f"# Convergence\n\n{BEGIN}\nx\n{END}\n"


def test_report_smoke_run_writes_the_document_and_reuses_finished_runs(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("ASYNCFGD_CACHE", str(tmp_path / "cache"))
    args = ["report", "--only", "digits", "--epochs", "1", "--seeds", "0", "--no-tune-lr", "--jobs", "2",
            "--work", str(tmp_path / "work"), "--doc", str(tmp_path / "c.md"), "--img-dir", str(tmp_path / "img")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    text = (tmp_path / "c.md").read_text()
    for label in ("backprop", "sync FGD", "AsyncFGD", "AsyncFGD, local losses (experimental)"):
        assert f"| digits from scratch (mlp) | all layers, train defaults | {label} | 0.01 | 1 |" in text
    # the method's own defaults without a sweep: lr 3e-3 (and 4 tangents)
    assert "| digits from scratch (mlp) | all layers, train defaults | local-activity | 0.003 | 1 |" in text
    assert "CIFAR-10" not in text  # --only leaves the other settings out
    png = tmp_path / "img" / "convergence-digits.png"
    assert "](img/convergence-digits.png)" in text and 0 < png.stat().st_size < 200_000
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "0 runs to do" in again.output


def test_unknown_setting_is_a_clear_error(tmp_path: Path):
    result = CliRunner().invoke(app, ["report", "--only", "imagenet", "--work", str(tmp_path / "w")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "unknown setting(s) imagenet" in " ".join(result.output.split())


def _scratch(target: tuple[str, float], ours: list[tuple[float, float]], bp: list[tuple[float, float]]) -> Result:
    """local-activity and backprop, 2 epochs each: (wall_s, test_acc) per epoch."""
    st = Setting("mnist", "defaults", "m", ("bp", "local-activity"), {}, target=target)
    res = Result(st, {"bp": 1e-2, "local-activity": 3e-3})
    res.histories = {"bp": [_hist(*bp)] * 2, "local-activity": [_hist(*ours)] * 2}
    return res


def test_local_activity_acceptance_weighs_accuracy_and_time_per_epoch():
    [line] = acceptance([_scratch(("activity", 0.95), [(3.0, 0.9), (6.0, 0.96)], [(1.0, 0.9), (2.0, 0.97)])])
    assert "reaches 96.0 ± 0.0%" in line and "3.00 ± 0.00×" in line and line.endswith("**met**.")
    [slow] = acceptance([_scratch(("activity", 0.95), [(3.0, 0.9), (6.2, 0.96)], [(1.0, 0.9), (2.0, 0.97)])])
    assert slow.endswith("**not met**.")
    [gap] = acceptance([_scratch(("activity-gap", 0.10), [(3.0, 0.6), (6.0, 0.65)], [(1.0, 0.7), (2.0, 0.8)])])
    assert "ends 15.0 ± 0.0 points behind backprop" in gap and gap.endswith("**not met**.")


def test_skipped_rows_are_marked_and_unknown_ones_refused():
    chosen, _ = settings()
    kept = skip_rows(chosen, ["shapes32:asyncfgd"])
    shapes = next(st for st in kept if st.slug == "shapes32")
    assert shapes.methods == ("bp", "fgd", "local-activity") and shapes.not_run == ("asyncfgd",)
    res = Result(shapes, {m: 1e-2 for m in shapes.methods})
    assert table([res], []).splitlines()[-1].endswith("| AsyncFGD | – | – | not run in this report (`--skip`) "
                                                      "| – | – | – |")
    with pytest.raises(ValueError, match="SETTING:METHOD"):
        skip_rows(chosen, ["shapes32:sgd"])
