"""Backprop pretraining on the host, saved as a torchvision-format state_dict for ``--weights``.

The transfer workflow's first step: train a zoo model with PyTorch autograd (the ``bp`` learner,
same data stream and run directory as any `train` run), then write its weights and BatchNorm
statistics with the model's own names, which `export --weights` and `train --weights` load.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from asyncfgd.app.training.config import TrainConfig
from asyncfgd.app.training.loop import train

DATA = "digits-transfer-pretrain"
MODEL = "cnn"
EPOCHS = 20  # bp reaches ~99% on upright digits 0-4 with the cnn in about 3 s


def pretrain(cfg: TrainConfig, out: Path, log: Callable[[str], None] = print, bars: bool = True) -> float:
    """Train ``cfg`` with backprop into ``cfg.run_dir`` and save the weights to ``out``; the final test accuracy."""
    from asyncfgd.app.training.bp import save_torch  # imports torch

    acc = train(replace(cfg, method="bp"), log=log, bars=bars)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_torch(Path(cfg.run_dir), out)
    return acc
