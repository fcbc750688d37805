"""TensorRT backend without TensorRT: import hygiene and the unavailable path.

The engine/stream code cannot run here (no GPU, TensorRT or pycuda): runtime/trt is experimental.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from asyncfgd.runtime.trt.backend import BackendUnavailable, TrtBackend


def test_import_pulls_in_neither_torch_nor_tensorrt():
    code = ("import sys, asyncfgd.runtime.trt.backend, asyncfgd.runtime.trt.build;"
            "bad = [m for m in ('torch', 'tensorrt', 'pycuda') if m in sys.modules];"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_load_module_without_tensorrt_explains_the_fix(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"tangents": 2, "modules": []}))
    with pytest.raises(BackendUnavailable) as exc:
        TrtBackend().load_module(tmp_path, 0, 2, None)
    msg = str(exc.value)
    assert "tensorrt" in msg and "pycuda" in msg and "asyncfgd-app doctor" in msg and "jetson_setup.sh" in msg
