"""TensorRT backend without TensorRT: import hygiene, the unavailable path, optimizer math.

The engine/stream code cannot run here (no GPU, TensorRT or pycuda). The optimizer's CUDA
kernel bodies are plain C, so they are compiled for the host and driven through the real
TrtOptimizer.step against torch.optim.
"""
from __future__ import annotations

import ctypes
import importlib.util
import json
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from asyncfgd.runtime.trt_backend import (
    OPTIMIZER_KERNELS,
    BackendUnavailable,
    TrtBackend,
    TrtOptimizer,
)


def test_import_pulls_in_neither_torch_nor_tensorrt():
    code = ("import sys, asyncfgd.runtime.trt_backend, asyncfgd.runtime.trt_build;"
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


def _host_kernel_factory(tmp_path):
    """Compile an ElementwiseKernel (args, body) as a host C loop; call it like pycuda does."""
    def factory(args: str, body: str, name: str):
        src = tmp_path / f"{name}.c"
        lib = tmp_path / f"lib{name}.so"
        loop = f"for (int i = 0; i < n; i++) {{ {body} }}"
        src.write_text(f"#include <math.h>\nvoid {name}({args}, int n) {{ {loop} }}\n")
        subprocess.run(["cc", "-O1", "-shared", "-fPIC", "-o", str(lib), str(src), "-lm"], check=True)
        fn = getattr(ctypes.CDLL(str(lib)), name)
        kinds = [decl.strip() for decl in args.split(",")]

        def call(*values, stream=None):
            cargs = []
            for decl, v in zip(kinds, values, strict=True):
                if "*" in decl:
                    assert v.dtype == np.float32 and v.flags.c_contiguous
                    cargs.append(v.ctypes.data_as(ctypes.POINTER(ctypes.c_float)))
                elif decl.startswith("int"):
                    cargs.append(ctypes.c_int(int(v)))
                else:
                    cargs.append(ctypes.c_float(float(v)))
            fn(*cargs, ctypes.c_int(values[0].size))
        return call
    return factory


# (optimizer, hyper-parameters given identically to TrtOptimizer and torch.optim)
CONFIGS = [
    ("sgd", dict(weight_decay=0.1)),
    ("sgd", dict(momentum=0.9, dampening=0.1, weight_decay=0.01)),
    ("sgd", dict(momentum=0.9, nesterov=True)),
    ("adam", dict(weight_decay=0.01, betas=(0.8, 0.99), eps=1e-6)),
]


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler to build the kernel bodies for the host")
@pytest.mark.parametrize("name, opts", CONFIGS)
def test_fused_updates_match_torch_optim(tmp_path, name, opts):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((3, 5)).astype(np.float32)
    grads = [rng.standard_normal((3, 5)).astype(np.float32) for _ in range(4)]
    runner = SimpleNamespace(params={"w": w0.copy()}, xp=np, stream=None,
                             from_host=lambda dst, src: np.copyto(dst, src))
    opt = TrtOptimizer(runner, name, kernel_factory=_host_kernel_factory(tmp_path), **opts)
    tw = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    topt = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[name]([tw], lr=0.05, **opts)
    for g in grads:
        opt.step({"w": g}, lr=0.05)
        tw.grad = torch.from_numpy(g)
        topt.step()
    np.testing.assert_allclose(runner.params["w"], tw.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_every_kernel_is_exercised_by_a_config():
    kinds = {"momentum" if n == "sgd" and o.get("momentum") else n for n, o in CONFIGS}
    assert kinds == set(OPTIMIZER_KERNELS)
