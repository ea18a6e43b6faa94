#!/usr/bin/env bash
# Source this file: it creates the virtual environment (.venv, or $VENV) on first use,
# installs the project in editable mode with its dev extra, and activates it.
# torch: on a machine without an NVIDIA GPU the CPU build is installed
# (TORCH_CPU_SPEC, default torch==2.13.0; set TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
# where PyPI would hand out the CUDA build); with a GPU, plain PyPI torch (CUDA build).
set -euo pipefail
_repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_venv="${VENV:-$_repo_root/.venv}"
if [ ! -x "$_venv/bin/python" ]; then
    echo "[setup] creating virtual environment in $_venv"
    python3 -m venv "$_venv"
fi
# shellcheck disable=SC1091
source "$_venv/bin/activate"
_stamp="$_venv/.celestial-installed-$(sha1sum "$_repo_root/pyproject.toml" | cut -c1-12)"
if [ ! -f "$_stamp" ]; then
    if ! python -c "import torch" >/dev/null 2>&1; then
        if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
            echo "[setup] NVIDIA GPU found: installing the CUDA build of torch"
            python -m pip install --quiet "torch>=2.4"
        else
            echo "[setup] no GPU: installing the CPU build of torch (${TORCH_CPU_SPEC:-torch==2.13.0})"
            python -m pip install --quiet "${TORCH_CPU_SPEC:-torch==2.13.0}" \
                ${TORCH_CPU_INDEX:+--index-url "$TORCH_CPU_INDEX"}
        fi
    fi
    echo "[setup] installing celestial-pgat and its dependencies"
    python -m pip install --quiet -e "$_repo_root[dev]"
    touch "$_stamp"
fi
cd "$_repo_root"
set +euo pipefail
