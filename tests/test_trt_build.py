"""Engine-cache keys and staleness (pure logic: no TensorRT needed)."""
from __future__ import annotations

import dataclasses
import importlib.util
import json

import pytest

from asyncfgd.runtime.trt.build import (
    BuildKey,
    batch_profile,
    build_engines,
    engine_name,
    file_sha256,
    find_entry,
    load_index,
    profile_shapes,
    record_entry,
    save_index,
    select_graphs,
    stale_reason,
)
from asyncfgd.runtime.trt.env import BackendUnavailable

KEY = BuildKey("ab" * 32, "10.3.0", "Orin", "fp32", (1, 32, 64))


def _cached(tmp_path, key=KEY, payload=b"plan"):
    """Record an engine for m0.dual.onnx built with ``key``; return its entry as reloaded from disk."""
    name = engine_name("m0.dual.onnx", key)
    (tmp_path / name).write_bytes(payload)
    index = load_index(tmp_path)
    record_entry(index, "m0.dual.onnx", key, name, file_sha256(tmp_path / name))
    save_index(tmp_path, index)
    return find_entry(load_index(tmp_path), "m0.dual.onnx", key)


def test_fresh_entry_round_trips_through_json(tmp_path):
    entry = _cached(tmp_path)
    assert stale_reason(entry, KEY, tmp_path) is None


def test_variants_coexist_and_an_unbuilt_variant_says_what_differs(tmp_path):
    fp16 = dataclasses.replace(KEY, precision="fp16")
    _cached(tmp_path, KEY)
    _cached(tmp_path, fp16, payload=b"plan16")
    index = load_index(tmp_path)
    assert stale_reason(find_entry(index, "m0.dual.onnx", KEY), KEY, tmp_path) is None
    assert stale_reason(find_entry(index, "m0.dual.onnx", fp16), fp16, tmp_path) is None
    big = dataclasses.replace(KEY, profile=(1, 128, 128))  # compared with the latest entry, the fp16 one
    assert stale_reason(find_entry(index, "m0.dual.onnx", big), big, tmp_path).startswith("precision differs")
    assert find_entry(index, "m1.dual.onnx", KEY) is None


def test_a_changed_graph_obsoletes_its_old_engines_only(tmp_path):
    _cached(tmp_path, KEY)
    _cached(tmp_path, dataclasses.replace(KEY, precision="fp16"))
    index = load_index(tmp_path)
    record_entry(index, "m1.eval.onnx", KEY, engine_name("m1.eval.onnx", KEY), "00")
    new = dataclasses.replace(KEY, onnx_sha256="cd" * 32)
    obsolete = record_entry(index, "m0.dual.onnx", new, engine_name("m0.dual.onnx", new), "11")
    assert sorted(obsolete) == sorted([engine_name("m0.dual.onnx", KEY),
                                       engine_name("m0.dual.onnx", dataclasses.replace(KEY, precision="fp16"))])
    assert sorted(e["graph"] for e in index["entries"].values()) == ["m0.dual.onnx", "m1.eval.onnx"]
    old = find_entry(index, "m0.dual.onnx", KEY)
    assert stale_reason(old, KEY, tmp_path) == "ONNX graph changed"


@pytest.mark.parametrize("change, expect", [
    ({"onnx_sha256": "cd" * 32}, "ONNX graph changed"),
    ({"trt_version": "10.7.0"}, "trt_version"),
    ({"gpu": "NVIDIA H100"}, "gpu"),
    ({"precision": "fp16"}, "precision"),
    ({"profile": (1, 64, 64)}, "profile"),
])
def test_any_key_mismatch_is_stale(tmp_path, change, expect):
    entry = _cached(tmp_path)
    reason = stale_reason(entry, dataclasses.replace(KEY, **change), tmp_path)
    assert reason is not None and expect in reason


def test_missing_or_altered_engine_file_is_stale(tmp_path):
    entry = _cached(tmp_path)
    engine = tmp_path / entry["engine"]
    engine.write_bytes(b"truncated")
    assert "altered" in stale_reason(entry, KEY, tmp_path)
    engine.unlink()
    assert "missing" in stale_reason(entry, KEY, tmp_path)
    assert stale_reason(None, KEY, tmp_path) == "not built yet"


def test_digest_is_stable_and_key_sensitive():
    assert KEY.digest() == BuildKey("ab" * 32, "10.3.0", "Orin", "fp32", (1, 32, 64)).digest()
    assert KEY.digest() != dataclasses.replace(KEY, precision="fp16").digest()
    assert engine_name("m0.dual.onnx", KEY) == f"m0.dual.{KEY.digest()}.engine"


def test_index_of_another_format_is_ignored(tmp_path):
    (tmp_path / "index.json").write_text(json.dumps({"format": 1, "entries": {"x": {}}}))
    assert load_index(tmp_path)["entries"] == {}


def test_batch_profile_and_profile_shapes():
    assert batch_profile(64) == (1, 64, 64)
    assert batch_profile(64, 16) == (1, 16, 64)
    with pytest.raises(ValueError):
        batch_profile(8, 16)
    assert profile_shapes([-1, 3, 32, 32], (1, 16, 64)) == ((1, 3, 32, 32), (16, 3, 32, 32), (64, 3, 32, 32))
    # x_dot is (m, N, ...): the batch dim is wherever the -1 is
    assert profile_shapes([4, -1, 10], (1, 2, 8)) == ((4, 1, 10), (4, 2, 10), (4, 8, 10))
    assert profile_shapes([4, 3, 3], (1, 2, 8)) is None
    with pytest.raises(ValueError, match="only the batch"):
        profile_shapes([-1, -1], (1, 2, 8), "x")


MANIFEST = {"modules": [
    {"index": 0, "graphs": {"dual_first": {"file": "m0.dual_first.onnx"}, "eval": {"file": "m0.eval.onnx"}}},
    {"index": 1, "graphs": {"dual": {"file": "m1.dual.onnx"}, "eval": {"file": "m1.eval.onnx"}}},
]}


def test_select_graphs_filters_roles_and_modules():
    assert select_graphs(MANIFEST) == [(0, "dual_first", "m0.dual_first.onnx"), (0, "eval", "m0.eval.onnx"),
                                       (1, "dual", "m1.dual.onnx"), (1, "eval", "m1.eval.onnx")]
    assert select_graphs(MANIFEST, roles=["eval"], modules=[1]) == [(1, "eval", "m1.eval.onnx")]
    with pytest.raises(ValueError, match="unknown graph roles"):
        select_graphs(MANIFEST, roles=["train"])


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_build_without_tensorrt_raises_backend_unavailable(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps(MANIFEST))
    with pytest.raises(BackendUnavailable, match="doctor") as exc:
        build_engines(tmp_path)
    assert "jetson_setup.sh" in str(exc.value) and "tensorrt" in str(exc.value)
    assert not (tmp_path / "engines").exists()


def test_build_without_manifest_names_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        build_engines(tmp_path)
