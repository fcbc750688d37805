"""Regenerate app/training/datasets/digits.npz from scikit-learn's copy of the UCI handwritten digits.

Run once on a development machine (scikit-learn is not a runtime dependency). The split is
stored in the file so that it never depends on the numpy version that loads it.
"""
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

from asyncfgd.app.training.data import stratified_split

OUT = Path(__file__).resolve().parents[1] / "app" / "training" / "datasets" / "digits.npz"


def main() -> None:
    digits = load_digits()
    images = digits.images.astype(np.uint8)  # values 0..16, exact in the source
    labels = digits.target.astype(np.uint8)
    _, test = stratified_split(labels, 0.2, seed=0)
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[test] = True
    np.savez_compressed(OUT, images=images, labels=labels, is_test=is_test)
    print(f"wrote {OUT}: {len(labels) - len(test)} train / {len(test)} test")


if __name__ == "__main__":
    main()
