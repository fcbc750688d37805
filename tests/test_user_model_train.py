"""End to end: `train --model FILE.py:Net` on an ImageFolder, with a model written as the PyTorch
CIFAR-10 tutorial writes it (functional relu and pooling, torch.flatten), exported on the fly."""
from __future__ import annotations

import csv
import json
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from asyncfgd.app.cli import app

TUTORIAL_NET = '''
import torch
import torch.nn as nn
import torch.nn.functional as F


class Net(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 3)
        self.fc1 = nn.Linear(16 * 2 * 2, 32)
        self.fc2 = nn.Linear(32, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        return self.fc2(x)
'''


def _image_folder(root: Path, per_class: dict[str, int], size: int = 16) -> None:
    """3 classes of distinct colour patterns (stripes, columns, checkers in red, green, blue) over noise."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    patterns = [(yy // 2) % 2 == 0, (xx // 2) % 2 == 0, ((yy + xx) // 2) % 2 == 0]
    for split, n in per_class.items():
        for c, mask in enumerate(patterns):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 60, (size, size, 3))
                img[..., c] += np.where(mask, 180, 0)
                Image.fromarray(img.astype(np.uint8)).save(folder / f"{i}.png")


def test_train_a_user_file_model_on_an_image_folder(tmp_path, monkeypatch):
    model_file = tmp_path / "net.py"
    model_file.write_text(textwrap.dedent(TUTORIAL_NET))
    _image_folder(tmp_path / "data", {"train": 8, "test": 4})  # load_imagefolder: train/ and test/ class folders
    monkeypatch.setenv("ASYNCFGD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.chdir(tmp_path)  # the default run directory, runs/TIME-MODEL-METHOD, lands here
    res = CliRunner().invoke(app, ["train", "--model", f"{model_file}:Net", "--data", "imagefolder:data:16",
                                   "--epochs", "2", "--batch-size", "8", "--tangents", "4", "--modules", "2",
                                   "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert "test accuracy:" in res.output

    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1, runs  # one flat directory: no folders from the model's path, no ':' in its name
    run = runs[0]
    assert run.name.endswith("-net-Net-asyncfgd") and ":" not in run.name
    assert {"config.json", "metrics.csv", "curves.png", "checkpoint.npz"} <= {p.name for p in run.iterdir()}
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert all(np.isfinite(float(r["train_loss"])) and 0 <= float(r["test_acc"]) <= 1 for r in rows)
    config = json.loads((run / "config.json").read_text())
    assert config["model_spec"] == {"name": f"{model_file}:Net", "num_classes": 3, "input_shape": [3, 16, 16],
                                    "config": {}}
    assert config["num_modules"] == 2 and config["dataset"]["train"] == 24 and config["dataset"]["test"] == 12
    assert any((tmp_path / "cache").iterdir())  # the on-the-fly export went to $ASYNCFGD_CACHE


def test_bench_exports_a_user_file_model(tmp_path):
    from asyncfgd.app.bench.run import BenchConfig, export_artifacts
    from asyncfgd.runtime.artifacts import load_artifacts

    model_file = tmp_path / "net.py"
    model_file.write_text(textwrap.dedent(TUTORIAL_NET))
    cfg = BenchConfig(model=f"{model_file}:Net", modules=2, batch=8, input_shape=(3, 16, 16), num_classes=3)
    dirs = export_artifacts(cfg, tmp_path / "bench")
    assert {k: d.name for k, d in dirs.items()} == {1: "net-Net-k1", 2: "net-Net-k2"}
    assert [len(load_artifacts(d).modules) for d in dirs.values()] == [1, 2]
    assert load_artifacts(dirs[2]).manifest["model"]["name"] == f"{model_file}:Net"
