"""Per-epoch metrics: accumulation, ``metrics.csv`` and the ``curves.png`` plot.

The rows are also stored in the checkpoint and both files are rewritten from them after every
epoch, so a resumed run's files hold the same rows as an uninterrupted run's (timings aside).
"""
from __future__ import annotations

import csv
import resource
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from asyncfgd.app.plots import pyplot
from asyncfgd.runtime.scheduler import StepOutcome

COLUMNS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "samples_per_s", "wall_s", "peak_rss_mb")


def columns(eval_name: str = "test") -> tuple[str, ...]:
    """COLUMNS for a run evaluated on ``eval_name`` ("test", or "val" for a validation split)."""
    return tuple(c.replace("test_", f"{eval_name}_") for c in COLUMNS)


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean cross-entropy of integer ``labels`` under ``logits`` (N, C), computed stably in float64."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(labels)), labels].mean())


def correct(logits: np.ndarray, labels: np.ndarray) -> int:
    return int((logits.argmax(axis=1) == labels).sum())


def peak_rss_mb() -> float:
    """Peak resident memory of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


@dataclass
class EpochStats:
    """Running sums of one epoch's training metrics; saved in checkpoints taken mid-epoch.

    Loss and accuracy are over the mini-batches whose loss became known this epoch (AsyncFGD
    reports the last K-1 batches of an epoch during the next one); ``fed`` counts the samples
    that entered training, for throughput.
    """

    loss_sum: float = 0.0
    correct: int = 0
    samples: int = 0
    batches: int = 0
    fed: int = 0
    seconds: float = 0.0
    dot_sq_sum: float = 0.0  # FGD: sum of the squared directional derivatives ∇L·u of the steps (run logs)
    dots: int = 0

    def add(self, out: StepOutcome) -> None:
        self.loss_sum += out.loss
        self.batches += 1
        self.correct += out.correct
        self.samples += out.count
        if out.loss_dot is not None:
            self.dot_sq_sum += float(np.square(out.loss_dot, dtype=np.float64).sum())
            self.dots += len(out.loss_dot)

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.batches, 1)

    @property
    def acc(self) -> float:
        return self.correct / max(self.samples, 1)

    @property
    def samples_per_s(self) -> float:
        return self.fed / self.seconds if self.seconds > 0 else 0.0

    @property
    def jvp_rms(self) -> float | None:
        """RMS of the epoch's directional derivatives (all modules' tangents together); None without them."""
        return (self.dot_sq_sum / self.dots) ** 0.5 if self.dots else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def write_csv(path: Path, rows: list[dict[str, Any]], eval_name: str = "test") -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns(eval_name))
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: Path) -> list[dict[str, float]]:
    """A metrics.csv's rows as numbers (for tools that compare runs: sweep, report)."""
    with path.open() as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def plot(path: Path, rows: list[dict[str, Any]], title: str, eval_name: str = "test") -> None:
    """Loss and accuracy (train and test or val) against epoch, with the non-interactive Agg backend."""
    plt = pyplot()
    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for split in ("train", eval_name):
        ax_loss.plot(epochs, [r[f"{split}_loss"] for r in rows], marker=".", label=split)
        ax_acc.plot(epochs, [100 * r[f"{split}_acc"] for r in rows], marker=".", label=split)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.85, wspace=0.25)  # tight_layout costs a redraw
    fig.savefig(path, dpi=100)
    plt.close(fig)
