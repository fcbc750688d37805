"""The console of `asyncfgd-app train`: a short transcript (summary lines every --log-every epochs, the
final accuracy line), no progress-bar redraws when the output is not a terminal, and `--help` that
reads well in an 80-column terminal."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from asyncfgd.app.cli import app
from asyncfgd.app.training import loop
from asyncfgd.app.training.artifact_cache import ExportOptions, export
from asyncfgd.app.training.config import TrainConfig

BATCH = "512"  # 3 mini-batches per digits epoch: the default 100 epochs in about 2 s
MAX_LINES = 15


@pytest.fixture(scope="module")
def art(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("art") / "mlp"
    export(ExportOptions("mlp", 10, (1, 8, 8), 2, tangents=2, config={"hidden": [16]}), out)
    return out


def _summary_epochs(output: str) -> list[int]:
    return [int(m) for m in re.findall(r"^epoch (\d+)/\d+: train loss", output, flags=re.M)]


def test_default_run_prints_a_short_transcript(art: Path, tmp_path: Path):
    """The default 100 epochs: a summary after the first epoch and every tenth, then the accuracy line."""
    assert TrainConfig().epochs == 100 and TrainConfig().summary_every() == 10
    result = CliRunner().invoke(app, ["train", "--artifacts", str(art), "--batch-size", BATCH,
                                      "--run-dir", str(tmp_path / "run")], env={"TQDM_DISABLE": "1"})
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) <= MAX_LINES, result.output
    assert lines[0] == f"run directory: {tmp_path / 'run'}"
    assert re.fullmatch(r"test accuracy: \d{1,3}\.\d%", lines[-1])
    assert _summary_epochs(result.output) == [1, *range(10, 101, 10)]
    assert all(len(line) <= 80 for line in lines[1:]), result.output  # the first: pytest's tmp path, any length


def test_log_every_sets_the_summary_lines(art: Path, tmp_path: Path):
    result = CliRunner().invoke(app, ["train", "--artifacts", str(art), "--batch-size", BATCH, "--epochs", "7",
                                      "--log-every", "3", "--run-dir", str(tmp_path / "run")],
                                env={"TQDM_DISABLE": "1"})
    assert result.exit_code == 0, result.output
    assert _summary_epochs(result.output) == [1, 3, 6, 7]  # the first, every third, the last
    assert TrainConfig(epochs=7).summary_every() == 1 and TrainConfig(epochs=0).summary_every() == 1


def test_output_that_is_not_a_terminal_gets_no_bar(art: Path, tmp_path: Path):
    """A real process with its output piped (a log file, CI) and TQDM_DISABLE unset: tqdm sees no
    terminal and draws nothing, so the log holds the summary lines only."""
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    code = "from asyncfgd.app.cli import main; main()"
    proc = subprocess.run([sys.executable, "-c", code, "train", "--artifacts", str(art), "--batch-size", BATCH,
                           "--epochs", "3", "--run-dir", str(tmp_path / "run")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stdout + proc.stderr and "%|" not in proc.stderr, proc.stderr
    assert _summary_epochs(proc.stdout) == [1, 2, 3] and proc.stdout.splitlines()[-1].startswith("test accuracy:")


def test_bar_is_off_when_asked_and_left_to_tqdm_otherwise(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert loop._bar_disable(True) is None  # tqdm draws it on a terminal only
    assert loop._bar_disable(False) is True
    for value, disabled in (("1", True), ("true", True), ("0", None), ("", None)):
        monkeypatch.setenv("TQDM_DISABLE", value)
        assert loop._bar_disable(True) is disabled, value


def _option_help(text: str, option: str) -> list[str]:
    """The continuation lines of ``option``'s help (pure help text in a two-column layout; with rich's
    panels, the text between the borders)."""
    raw = text.splitlines()
    lines = [line.strip(" │") for line in raw]
    start = next(i for i, line in enumerate(raw) if line.lstrip(" │").startswith(option + " ")
                 and len(line) - len(line.lstrip(" │")) <= 3)  # an option's own line, not a mention in help
    block = []
    for line in lines[start + 1:]:
        if not line or line.startswith("-"):
            break
        block.append(line)
    return block


def test_help_is_readable_in_80_columns():
    result = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert all(len(line) <= 80 for line in lines), max(lines, key=len)
    for option in ("--freeze-until", "--model", "--log"):
        helped = _option_help(result.output, option)
        assert len(helped) >= 2 and max(map(len, helped)) >= 35, (option, helped)  # not a narrow column
    text = " ".join(result.output.split())
    assert "pip install 'asyncfgd[vision]'" in text and "PATH.py:FACTORY" in text  # no markup eaten
    assert "--log-every" in text and "--log SINK" in text
