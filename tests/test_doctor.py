"""`asyncfgd-app doctor` / `build` on a machine without GPU or TensorRT, plus synthetic reports."""
from __future__ import annotations

import copy
import importlib.util
import json

import pytest
from typer.testing import CliRunner

from asyncfgd.app.cli import app
from asyncfgd.app.commands import doctor

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="module")
def info():
    return doctor.collect()


def test_collect_and_render_run_here(info):
    text = doctor.render(info)
    assert info["python"]["version"] in text
    for name in ("onnxruntime-cpu", "onnxruntime-cuda", "torch-cpu", "torch-cuda", "tensorrt"):
        assert name in text
    assert doctor.usable_backends(info)["onnxruntime-cpu"][0]


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed here")
def test_this_machine_has_no_tensorrt_and_gets_a_fix(info):
    ok, fix = doctor.usable_backends(info)["tensorrt"]
    assert not ok and "jetson_setup.sh" in fix and "pycuda" in fix
    text = doctor.render(info)
    assert "[--] tensorrt" in text and "tensorrt does not import" in text
    if not info["cuda"]["gpus"]:
        assert "GPU           none visible" in text and "no NVIDIA GPU visible" in fix


def test_parse_l4t_and_jetpack_note():
    line = "# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, EABI: aarch64"
    assert doctor.parse_l4t(line) == "R36.4.0"
    assert doctor.parse_l4t("garbage") is None
    assert "TensorRT 8.6" in doctor.jetpack_note("R36.3.0")
    assert "JetPack 6.1+" in doctor.jetpack_note("R36.4.3")
    assert "not JetPack 6" in doctor.jetpack_note("R35.5.0")


def _jetson_info():
    """A synthetic, fully equipped Orin report."""
    ok = {"ok": True, "error": None}
    return {
        "python": {"version": "3.10.12", "executable": "/opt/venv/bin/python"},
        "platform": {"system": "Linux", "machine": "aarch64", "kernel": "5.15.148-tegra", "l4t": "R36.4.3",
                     "jetpack": doctor.jetpack_note("R36.4.3")},
        "cuda": {"driver": "540.4.0", "libcuda": "libcuda.so.1", "nvcc": "/usr/local/cuda/bin/nvcc",
                 "gpus": [{"name": "Orin", "memory_free_mb": None, "memory_total_mb": None, "source": "nvidia-smi"}]},
        "tensorrt": {**ok, "version": "10.3.0"},
        "pycuda": {**ok, "version": "2024.1.2"},
        "onnxruntime": {**ok, "version": "1.20.0", "providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]},
        "torch": {**ok, "version": "2.5.0a0", "cuda": True, "cuda_version": "12.6", "gpus": []},
    }


def test_fully_equipped_jetson_can_use_every_backend():
    info = _jetson_info()
    assert all(ok for ok, _ in doctor.usable_backends(info).values())
    assert "[--]" not in doctor.render(info)


def test_each_missing_piece_gets_its_own_fix():
    info = copy.deepcopy(_jetson_info())
    info["tensorrt"]["version"] = "8.6.2"
    info["pycuda"] = {"ok": False, "version": None, "error": "ModuleNotFoundError: No module named 'pycuda'"}
    info["torch"]["cuda"] = False
    usable = doctor.usable_backends(info)
    ok, fix = usable["tensorrt"]
    assert not ok and "TensorRT 8.6.2 is too old" in fix and "CUDA_ROOT=/usr/local/cuda" in fix
    assert len(fix.splitlines()) == 2
    assert not usable["torch-cuda"][0] and "TORCH_WHEEL" in usable["torch-cuda"][1]
    assert usable["onnxruntime-cuda"][0] and usable["torch-cpu"][0]


def test_doctor_command_prints_and_exits_zero(info, monkeypatch):
    monkeypatch.setattr(doctor, "collect", lambda: info)
    result = CliRunner().invoke(app, ["doctor"])
    assert result.exit_code == 0 and "backends" in result.output
    result = CliRunner().invoke(app, ["doctor", "--json"])
    assert result.exit_code == 0
    report = json.loads(result.output)
    assert set(report["backends"]) == {"onnxruntime-cpu", "onnxruntime-cuda", "torch-cpu", "torch-cuda", "tensorrt"}


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed here")
def test_build_without_tensorrt_exits_2_with_the_message(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"tangents": 2, "modules": [
        {"index": 0, "params": [], "buffers": [], "graphs": {"eval": {"file": "m0.eval.onnx"}}}]}))
    result = CliRunner().invoke(app, ["build", str(tmp_path), "--fp16", "--max-batch", "8"])
    assert result.exit_code == 2
    assert "TensorRT backend cannot run here" in result.output and "asyncfgd-app doctor" in result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)


def test_build_on_a_dir_without_manifest_fails_clearly(tmp_path):
    result = CliRunner().invoke(app, ["build", str(tmp_path)])
    assert result.exit_code == 2 and "manifest.json" in result.output
