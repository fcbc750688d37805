"""`asyncfgd-app doctor` and `asyncfgd-app build`: what this machine can run, and engine builds.

On a Jetson the usual failure is not a bug but a missing piece (TensorRT bindings invisible to
a venv, pycuda not built, torch without CUDA). The doctor probes each piece independently,
never failing itself, and names the fix for every backend that cannot run. It is the only
place outside the exporter that imports torch, and only to report on it.
"""
import ctypes.util
import json
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import typer

TEGRA_RELEASE = Path("/etc/nv_tegra_release")
SETUP = "./jetson_setup.sh"
_SMI_QUERY = ["nvidia-smi", "--query-gpu=name,memory.free,memory.total,driver_version",
              "--format=csv,noheader,nounits"]


def parse_l4t(text: str) -> str | None:
    """'# R36 (release), REVISION: 4.0, ...' -> 'R36.4.0' (None if unrecognised)."""
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    return f"R{m.group(1)}.{m.group(2)}" if m else None


def jetpack_note(l4t: str | None) -> str:
    """Which JetPack (and so which TensorRT) an L4T release means, for the TensorRT verdict."""
    if l4t is None:
        return "not a Jetson"
    major, minor = (int(p) for p in l4t[1:].split(".")[:2])
    if major != 36:
        return f"L4T {l4t} is not JetPack 6 (R36.x); asyncfgd targets JetPack 6.1+"
    if minor < 4:
        return f"L4T {l4t} is JetPack 6.0, which ships TensorRT 8.6; upgrade to JetPack 6.1+ for TensorRT 10"
    return f"L4T {l4t}: JetPack 6.1+ (TensorRT 10)"


def _probe(import_name: str, version_attr: str = "__version__") -> dict[str, Any]:
    """Import a module and report its version, or the exception that stopped it."""
    try:
        mod = __import__(import_name, fromlist=["_"])
        return {"ok": True, "version": str(getattr(mod, version_attr, "unknown")), "error": None}
    except Exception as e:  # stub wheels and missing shared libraries raise arbitrary errors
        return {"ok": False, "version": None, "error": f"{type(e).__name__}: {e}".strip()}


def _nvidia_smi() -> tuple[str | None, list[dict[str, Any]]]:
    """(driver version, GPUs) from nvidia-smi; ``(None, [])`` when absent or failing."""
    if shutil.which("nvidia-smi") is None:
        return None, []
    try:
        out = subprocess.run(_SMI_QUERY, capture_output=True, text=True, timeout=10, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return None, []
    gpus, driver = [], None
    for line in out.strip().splitlines():
        name, free, total, driver = (p.strip() for p in line.split(","))
        gpus.append({"name": name, "memory_free_mb": _int(free), "memory_total_mb": _int(total),
                     "source": "nvidia-smi"})
    return driver, gpus


def _int(s: str) -> int | None:
    return int(s) if s.isdigit() else None  # Jetson's nvidia-smi reports [N/A] for memory


def _pycuda_gpus() -> list[dict[str, Any]]:
    import pycuda.driver as cuda  # noqa: PLC0415

    cuda.init()
    gpus = []
    for i in range(cuda.Device.count()):
        ctx = cuda.Device(i).make_context()
        try:
            free, total = cuda.mem_get_info()
        finally:
            ctx.pop()
        gpus.append({"name": cuda.Device(i).name(), "memory_free_mb": free >> 20,
                     "memory_total_mb": total >> 20, "source": "pycuda"})
    return gpus


def _torch_info() -> dict[str, Any]:
    info = _probe("torch")
    info.update(cuda=False, cuda_version=None, gpus=[])
    if info["ok"]:
        import torch  # noqa: PLC0415 - doctor only; the runtime never imports torch

        info["cuda_version"] = torch.version.cuda
        info["cuda"] = bool(torch.cuda.is_available())
        for i in range(torch.cuda.device_count() if info["cuda"] else 0):
            free, total = torch.cuda.mem_get_info(i)
            info["gpus"].append({"name": torch.cuda.get_device_name(i), "memory_free_mb": free >> 20,
                                 "memory_total_mb": total >> 20, "source": "torch"})
    return info


def collect() -> dict[str, Any]:
    """Probe Python, platform/L4T, CUDA driver and GPUs, and every backend's packages."""
    l4t = parse_l4t(TEGRA_RELEASE.read_text()) if TEGRA_RELEASE.is_file() else None
    driver, gpus = _nvidia_smi()
    pycuda = _probe("pycuda", "VERSION_TEXT")
    if pycuda["ok"] and not gpus:
        try:
            gpus = _pycuda_gpus()
        except Exception as e:
            pycuda["error"] = f"imports, but CUDA init failed: {type(e).__name__}: {e}"
    ort = _probe("onnxruntime")
    if ort["ok"]:
        import onnxruntime  # noqa: PLC0415

        ort["providers"] = list(onnxruntime.get_available_providers())
    torch = _torch_info()
    return {
        "python": {"version": platform.python_version(), "executable": sys.executable},
        "platform": {"system": platform.system(), "machine": platform.machine(), "kernel": platform.release(),
                     "l4t": l4t, "jetpack": jetpack_note(l4t)},
        "cuda": {"driver": driver, "libcuda": ctypes.util.find_library("cuda"),
                 "nvcc": shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc"
                                                  if Path("/usr/local/cuda/bin/nvcc").exists() else None),
                 "gpus": gpus or torch["gpus"]},
        "tensorrt": _probe("tensorrt"),
        "pycuda": pycuda,
        "onnxruntime": ort,
        "torch": torch,
    }


def usable_backends(info: dict[str, Any]) -> dict[str, tuple[bool, str]]:
    """backend -> (usable, what it runs with | the fix for each missing piece, one per line)."""
    gpu = bool(info["cuda"]["gpus"])
    no_gpu = "no NVIDIA GPU visible to nvidia-smi, pycuda or torch.cuda" + (
        "; libcuda not found: install the NVIDIA driver (on a Jetson: JetPack)" if not info["cuda"]["libcuda"] else "")
    ort, torch, trt, pycuda = info["onnxruntime"], info["torch"], info["tensorrt"], info["pycuda"]
    providers = ort.get("providers", [])
    out: dict[str, tuple[bool, str]] = {}

    out["onnxruntime-cpu"] = ((True, f"onnxruntime {ort['version']}") if "CPUExecutionProvider" in providers
                              else (False, "pip install onnxruntime"))
    if "CUDAExecutionProvider" in providers and gpu:
        out["onnxruntime-cuda"] = (True, f"onnxruntime {ort['version']} with CUDAExecutionProvider")
    else:
        fixes = [] if gpu else [no_gpu]
        if "CUDAExecutionProvider" not in providers:
            fixes.append("this onnxruntime has no CUDAExecutionProvider: replace it with an onnxruntime-gpu build "
                         "for your CUDA (on a Jetson, NVIDIA's JetPack 6 onnxruntime-gpu wheel)")
        out["onnxruntime-cuda"] = (False, "\n".join(fixes))

    no_torch = "pip install -e '.[torch]' (torch is optional on the device: the runtime does not need it)"
    out["torch-cpu"] = (True, f"torch {torch['version']}") if torch["ok"] else (False, no_torch)
    if torch["ok"] and torch["cuda"]:
        out["torch-cuda"] = (True, f"torch {torch['version']}, CUDA {torch['cuda_version']}")
    elif torch["ok"]:
        out["torch-cuda"] = (False, "\n".join(([] if gpu else [no_gpu]) + [
            f"torch {torch['version']} has no usable CUDA: on a Jetson install NVIDIA's wheel with "
            f"TORCH_WHEEL=<wheel path or URL> {SETUP}"]))
    else:
        out["torch-cuda"] = (False, no_torch)

    fixes = []
    if not trt["ok"]:
        fixes.append(f"tensorrt does not import ({trt['error']}): on a Jetson with JetPack 6.1+ run {SETUP}, "
                     "whose venv (--system-site-packages) sees the system TensorRT from python3-libnvinfer, "
                     "elsewhere pip install tensorrt on a CUDA machine")
    elif int(trt["version"].split(".")[0]) < 10:
        fixes.append(f"TensorRT {trt['version']} is too old: JetPack 6.1+ ships TensorRT 10")
    if not pycuda["ok"] or pycuda["error"]:
        fixes.append(f"pycuda unusable ({pycuda['error']}): pip install pycuda with CUDA_ROOT=/usr/local/cuda "
                     f"and nvcc on PATH ({SETUP} does this)")
    if not gpu:
        fixes.append(no_gpu)
    out["tensorrt"] = ((False, "\n".join(fixes)) if fixes
                       else (True, f"TensorRT {trt['version']}, pycuda {pycuda['version']}"))
    return out


def render(info: dict[str, Any]) -> str:
    """A readable two-part report: the machine, then one line per backend."""
    def pkg(p: dict[str, Any]) -> str:
        return p["version"] + (f" ({p['error']})" if p["error"] else "") if p["ok"] else f"not usable: {p['error']}"

    plat, cuda, torch = info["platform"], info["cuda"], info["torch"]
    gpus = ", ".join(f"{g['name']} ({g['memory_free_mb']} MiB free of {g['memory_total_mb']})" if g["memory_free_mb"]
                     is not None else g["name"] for g in cuda["gpus"]) or "none visible"
    rows = [
        ("python", f"{info['python']['version']} ({info['python']['executable']})"),
        ("platform", f"{plat['system']} {plat['machine']}, kernel {plat['kernel']}"),
        ("L4T", plat["jetpack"] if plat["l4t"] else f"not a Jetson ({TEGRA_RELEASE} missing)"),
        ("CUDA driver", cuda["driver"] or ("libcuda found, no nvidia-smi" if cuda["libcuda"] else "none found")),
        ("CUDA toolkit", cuda["nvcc"] or "nvcc not found"),
        ("GPU", gpus),
        ("tensorrt", pkg(info["tensorrt"])),
        ("pycuda", pkg(info["pycuda"])),
        ("onnxruntime", pkg(info["onnxruntime"]) + (f"; providers: {', '.join(info['onnxruntime']['providers'])}"
                                                    if info["onnxruntime"]["ok"] else "")),
        ("torch", pkg(torch) + (f"; CUDA: {'yes' if torch['cuda'] else 'no'}" if torch["ok"] else "")),
    ]
    lines = ["asyncfgd doctor", ""] + [f"  {k:<13} {v}" for k, v in rows] + ["", "backends"]
    for name, (ok, detail) in usable_backends(info).items():
        if ok:
            lines.append(f"  [ok] {name:<17} {detail}")
        else:
            lines.append(f"  [--] {name:<17} not usable here; fix:")
            lines += [f"         - {fix}" for fix in detail.splitlines()]
    return "\n".join(lines)


def register(app: typer.Typer) -> None:
    """Add the `doctor` command to the CLI."""

    @app.command()
    def doctor(as_json: bool = typer.Option(False, "--json", help="Print the raw report as JSON.")) -> None:
        """Report what this machine can run (GPU, TensorRT, pycuda, ORT, torch) and how to fix the rest."""
        info = collect()
        if as_json:
            backends = {k: {"usable": ok, "detail": d} for k, (ok, d) in usable_backends(info).items()}
            typer.echo(json.dumps({**info, "backends": backends}, indent=2))
        else:
            typer.echo(render(info))
