#!/usr/bin/env bash
# One command for a lent GPU machine (torch + CUDA, no TensorRT, no internet): runs the
# backend-conformance suite on the torch-cuda backend and the GPU pipeline bench, and writes
# their outputs to $OUT (default /tmp/gpu_check).
#
#   bash scripts/gpu_check.sh
#
# It does not reinstall torch (the machine's CUDA build must be kept): the package is installed
# without dependencies, after checking that the ones it needs are importable.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/gpu_check}"
mkdir -p "$out"

python - <<'PY'
import importlib, sys
missing = [m for m in ("numpy", "onnx", "onnxruntime", "typer", "tqdm", "psutil", "matplotlib", "torch")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_check: missing Python packages {missing}; install them (no internet on lent machines: carry a wheelhouse)")
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no CUDA GPU here; nothing to check")
print(f"torch {torch.__version__}, GPU {torch.cuda.get_device_name(0)}")
PY
pip install -q --no-deps --no-build-isolation -e . >/dev/null

asyncfgd-app doctor | tee "$out/doctor.txt"
# conformance: every backend against the reference, step for step (CPU backends run too, as a control)
python -m pytest tests/test_runtime.py -q -rs -k "jvp_reference" -p no:cacheprovider | tee "$out/conformance.txt"
# AsyncFGD with one CUDA stream per module vs sync FGD on the same GPU
asyncfgd-app bench-pipeline --backend torch-cuda --models cnn,resnet18 --batches 8,64 --modules 4 | tee "$out/bench_pipeline.txt"
echo "gpu_check: outputs in $out"
