"""`asyncfgd-app export --check`: the op coverage of a model, without exporting it (exporter/coverage.py)."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from asyncfgd.app.cli import app
from asyncfgd.exporter.coverage import check, format_report
from asyncfgd.exporter.model_sources import build_any

SUPPORTED = '''
import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 2 * 2, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv(x)), 2)
        x = torch.flatten(x, 1)
        return self.fc(x)
'''

UNSUPPORTED = '''
import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = torch.flatten(x, 1)
        x = torch.cumsum(x, 1)
        x = F.relu(x)
        x = x.cumprod(1)
        x = torch.cumsum(x, 1)
        return self.fc(x)
'''


def _write(tmp_path: Path, name: str, code: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(code))
    return path


def _check(args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)  # whatever --check writes would land here
    before = sorted(p.name for p in tmp_path.iterdir())
    res = CliRunner().invoke(app, ["export", "--check", *args], env={"TQDM_DISABLE": "1"})
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "--check must write nothing"
    assert "Traceback" not in res.output, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.output
    return res


def test_check_a_zoo_model(tmp_path, monkeypatch):
    res = _check(["--model", "cnn", "--input-shape", "1,8,8", "--config", "channels=[4,4]"], tmp_path, monkeypatch)
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert "cnn, input 1,8,8: 366 trainable parameters" in out
    table = dict(line.split() for line in out.splitlines()
                 if len(line.split()) == 2 and line.split()[1].isdigit())
    assert table == {"conv2d": "2", "batchnorm2d": "2", "relu": "2", "maxpool2d": "2", "reshape": "1",
                     "linear": "1"}
    assert "program nodes: 10" in out
    assert "cut points: 9 single-value cuts, so --modules up to 10; a module may start at: features.0.1," in out
    assert "(+1 more)" in out  # 8 names shown of 9
    assert out.rstrip().endswith("OK: every operation has a dual rule")


def test_check_a_supported_user_file(tmp_path, monkeypatch):
    path = _write(tmp_path, "mynet.py", SUPPORTED)
    res = _check(["--model", f"{path}:Net", "--input-shape", "1,4,4", "--num-classes", "3"], tmp_path,
                 monkeypatch)
    assert res.exit_code == 0, res.output
    assert f"{path}:Net, input 1,4,4: {4 * 9 + 4 + 16 * 3 + 3} trainable parameters" in res.stdout
    for op in ("conv2d", "relu", "maxpool2d", "reshape", "linear"):
        assert any(line.split()[:1] == [op] for line in res.stdout.splitlines()), op
    assert "OK: every operation has a dual rule" in res.stdout


def test_check_an_unsupported_user_file_names_the_op_and_line(tmp_path, monkeypatch):
    path = _write(tmp_path, "cum.py", UNSUPPORTED)
    res = _check(["--model", f"{path}:Net", "--input-shape", "1,4,4", "--num-classes", "3"], tmp_path,
                 monkeypatch)
    assert res.exit_code == 1, res.output
    assert "OK" not in res.stdout
    line = next(i for i, text in enumerate(textwrap.dedent(UNSUPPORTED).splitlines(), 1) if "cumsum" in text)
    error = " ".join(res.stderr.split())
    assert error.startswith("error: 'cumsum'") and f"cum.py:{line}: x = torch.cumsum(x, 1)" in error
    assert "has no dual rule" in error
    # every operation without a rule, not only the first: cumsum twice on two lines, and cumprod
    assert "operations without a dual rule (3):" in res.stdout
    assert "tensor method '.cumprod()': cum.py:" in res.stdout
    assert res.stdout.count("'cumsum'") == 2


def test_check_default_shape_and_bad_models(tmp_path, monkeypatch):
    res = _check(["--model", "mlp", "--config", "hidden=[8]"], tmp_path, monkeypatch)  # default 3,32,32 and 10
    assert res.exit_code == 0 and "mlp, input 3,32,32:" in res.stdout, res.output
    res = _check(["--model", f"{tmp_path}/none.py:Net"], tmp_path, monkeypatch)
    assert res.exit_code == 2 and "model file not found" in res.stderr
    res = _check(["--model", "mlp", "--input-shape", "1,8"], tmp_path, monkeypatch)
    assert res.exit_code == 2 and "--input-shape must be 3" in res.stderr


def test_export_without_check_still_needs_out_classes_and_shape(tmp_path):
    res = CliRunner().invoke(app, ["export", "--model", "mlp", "--input-shape", "1,8,8"])
    assert res.exit_code == 2
    assert "exporting needs --out, --num-classes" in res.stderr and "Traceback" not in res.output


def test_report_of_a_module_with_an_unsupported_layer(tmp_path):
    from torch import nn

    class WithGlu(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.glu = nn.GLU()
            self.fc = nn.Linear(1, 3)

        def forward(self, x):
            return self.fc(self.glu(self.pool(x).flatten(1)))

    report = check(WithGlu(), (2, 4, 4))
    assert not report.ok and "GLU" in (report.error or "")
    assert [m.what for m in report.missing] == ["layer 'glu' (GLU)"]
    assert report.parameters == 6 and report.ops == {}
    text = format_report(report)
    assert "operations without a dual rule" not in text  # one: the error message says it all

    model = build_any("mlp", 10, (1, 8, 8), {"hidden": [8]})
    report = check(model, (1, 8, 8))
    assert report.ok and report.max_modules == len(report.cuts) + 1 and report.nodes == sum(report.ops.values())
    assert report.program_weights == report.parameters
