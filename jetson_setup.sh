#!/usr/bin/env bash
# Set up asyncfgd's TensorRT runtime on an NVIDIA Jetson AGX Orin with JetPack 6.1+ (L4T R36.4+).
# See docs/gpu.md. Run ./jetson_setup.sh --help for usage.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: ./jetson_setup.sh [--dry-run] [--venv DIR] [--help]

Sets up asyncfgd on a Jetson AGX Orin running JetPack 6.1 or later (L4T R36.4+, TensorRT 10):
  1. checks the platform: aarch64 and /etc/nv_tegra_release saying R36.4 or newer
  2. checks the tools: python3 >= 3.10 with venv, CUDA at $CUDA_ROOT (default /usr/local/cuda)
  3. creates a venv with --system-site-packages, so it sees JetPack's TensorRT Python bindings
  4. checks that `import tensorrt` works in the venv and is TensorRT 10
  5. builds pycuda against the JetPack CUDA (CUDA_ROOT, PATH)
  6. installs torch from NVIDIA's Jetson wheel if TORCH_WHEEL is set (optional, see below)
  7. installs this package (pip install -e .)
  8. runs `asyncfgd-app doctor`
Any unsupported piece stops the script with a non-zero exit and a message saying what to do.

Options:
  --dry-run   print every step and command without running any; the platform and tool checks
              are still evaluated and reported, but a dry run always exits 0, on any machine
  --venv DIR  virtual environment to create (default: .venv-jetson in the repository)
  --help      show this help

Environment:
  TORCH_WHEEL  path or URL of NVIDIA's torch wheel for your JetPack release. Optional: the
               device runtime never imports torch; torch is only needed for the torch-*
               backends, the exporter and the backprop baseline. The URL is not built in
               because NVIDIA's wheel names and locations change with every JetPack release.
  CUDA_ROOT    CUDA toolkit for building pycuda (default /usr/local/cuda)
  ASYNCFGD_TEGRA_RELEASE, ASYNCFGD_ARCH
               override /etc/nv_tegra_release and `uname -m` (for tests of this script)
EOF
}

DRY_RUN=0
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV_DIR="$REPO_DIR/.venv-jetson"
RELEASE_FILE="${ASYNCFGD_TEGRA_RELEASE:-/etc/nv_tegra_release}"
ARCH="${ASYNCFGD_ARCH:-$(uname -m)}"
CUDA_ROOT="${CUDA_ROOT:-/usr/local/cuda}"
PROBLEMS=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --venv)
      [[ $# -ge 2 ]] || { echo "jetson_setup: --venv needs a directory" >&2; exit 2; }
      VENV_DIR="$2"
      shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "jetson_setup: unknown option: $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
PY="$VENV_DIR/bin/python"

step() { printf '\n==> %s\n' "$*"; }

# Run a command, or in a dry run print it (single-quoting arguments that need it) instead.
run() {
  if [[ $DRY_RUN -eq 1 ]]; then
    local arg q="'"
    printf '+'
    for arg in "$@"; do
      if [[ $arg =~ ^[[:alnum:]_./=:,+@%-]+$ ]]; then
        printf ' %s' "$arg"
      else
        printf " '%s'" "${arg//$q/$q\\$q$q}"
      fi
    done
    printf '\n'
  else
    "$@"
  fi
}

# An unsupported setup: stop with a message, or in a dry run note it and go on.
problem() {
  if [[ $DRY_RUN -eq 1 ]]; then
    echo "  !! a real run would stop here: $*"
    PROBLEMS+=("$*")
  else
    echo "jetson_setup: error: $*" >&2
    exit 1
  fi
}

check_platform() {
  step "1. Check the platform: Jetson (aarch64) with JetPack 6.1+ (L4T R36.4+)"
  if [[ $ARCH != aarch64 ]]; then
    problem "not a Jetson: this machine is $ARCH, a Jetson AGX Orin is aarch64"
  fi
  if [[ ! -r $RELEASE_FILE ]]; then
    problem "not a Jetson: $RELEASE_FILE not found (L4T/JetPack writes it); flash JetPack 6.1+ with SDK Manager"
    return 0
  fi
  local line
  line="$(head -n 1 "$RELEASE_FILE")"
  if [[ $line =~ R([0-9]+)\ \(release\),\ REVISION:\ ([0-9]+) ]]; then
    local major="${BASH_REMATCH[1]}" minor="${BASH_REMATCH[2]}"
    echo "  L4T R$major.$minor"
    if [[ $major -ne 36 ]]; then
      problem "L4T R$major is not JetPack 6 (L4T R36.x); upgrade to JetPack 6.1 or later"
    elif [[ $minor -lt 4 ]]; then
      problem "L4T R36.$minor is JetPack 6.0, which ships TensorRT 8.6; this backend needs TensorRT 10: upgrade to JetPack 6.1+ (L4T R36.4+)"
    fi
  else
    problem "cannot read an L4T release from $RELEASE_FILE: '$line'"
  fi
}

check_tools() {
  step "2. Check the tools: python3 >= 3.10 with venv, CUDA toolkit at $CUDA_ROOT"
  if ! command -v python3 >/dev/null; then
    problem "python3 not found: sudo apt-get install python3 python3-venv python3-dev"
    return 0
  fi
  if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
    problem "python3 is $(python3 -V 2>&1); asyncfgd needs 3.10+ (JetPack 6's Ubuntu 22.04 has 3.10)"
  fi
  if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    problem "python3 cannot create virtual environments: sudo apt-get install python3-venv"
  fi
  if ! python3 -c 'import os, sysconfig; os.stat(os.path.join(sysconfig.get_paths()["include"], "Python.h"))' 2>/dev/null; then
    problem "Python headers missing (pycuda compiles against them): sudo apt-get install python3-dev"
  fi
  if [[ ! -x $CUDA_ROOT/bin/nvcc ]]; then
    problem "no CUDA toolkit at $CUDA_ROOT (pycuda builds against it): sudo apt-get install nvidia-jetpack, or set CUDA_ROOT"
  fi
}

create_venv() {
  step "3. Create the venv $VENV_DIR with --system-site-packages (it must see JetPack's TensorRT bindings)"
  run python3 -m venv --system-site-packages "$VENV_DIR"
  run "$PY" -m pip install --upgrade pip setuptools wheel
}

check_tensorrt() {
  step "4. Check that TensorRT 10 imports inside the venv"
  local probe='import tensorrt; print(tensorrt.__version__)'
  if [[ $DRY_RUN -eq 1 ]]; then
    run "$PY" -c "$probe"
    return 0
  fi
  local version
  if ! version="$("$PY" -c "$probe")"; then
    problem "import tensorrt fails in the venv: install JetPack's bindings (sudo apt-get install python3-libnvinfer) and rerun"
  fi
  echo "  TensorRT $version"
  if [[ ${version%%.*} -lt 10 ]]; then
    problem "TensorRT $version is too old: this backend needs TensorRT 10 (JetPack 6.1+)"
  fi
}

install_pycuda() {
  step "5. Build pycuda against the JetPack CUDA ($CUDA_ROOT)"
  echo "  with CUDA_ROOT=$CUDA_ROOT and $CUDA_ROOT/bin first on PATH (pycuda's build finds nvcc there)"
  (export CUDA_ROOT PATH="$CUDA_ROOT/bin:$PATH"; run "$PY" -m pip install pycuda)
  run "$PY" -c 'import pycuda.driver as cuda; cuda.init(); print("pycuda sees", cuda.Device(0).name())'
}

install_torch() {
  step "6. torch (optional on the device)"
  if [[ -n ${TORCH_WHEEL:-} ]]; then
    run "$PY" -m pip install "$TORCH_WHEEL"
  else
    echo "  skipped: TORCH_WHEEL is not set. The device runtime never imports torch; torch is only"
    echo "  needed for the torch-* backends, the exporter and the backprop baseline. To add it, pass"
    echo "  NVIDIA's Jetson wheel for your JetPack: TORCH_WHEEL=/path/or/url/torch-...whl $0"
  fi
}

install_package() {
  step "7. Install asyncfgd into the venv"
  run "$PY" -m pip install -e "$REPO_DIR"
}

run_doctor() {
  step "8. Report: asyncfgd-app doctor"
  run "$VENV_DIR/bin/asyncfgd-app" doctor
}

check_platform
check_tools
create_venv
check_tensorrt
install_pycuda
install_torch
install_package
run_doctor

if [[ $DRY_RUN -eq 1 ]]; then
  echo
  if [[ ${#PROBLEMS[@]} -gt 0 ]]; then
    echo "Dry run: nothing was changed. A real run on this machine would stop at:"
    printf '  - %s\n' "${PROBLEMS[@]}"
  else
    echo "Dry run: nothing was changed; the platform and tool checks passed."
  fi
else
  printf '\nDone. Activate with: source %q/bin/activate\n' "$VENV_DIR"
  echo "Then build engines: asyncfgd-app build ARTIFACT_DIR [--fp16]"
fi
