#!/usr/bin/env bash
# Installs nvcc from PyPI into ./.venv (no GPU, driver or CUDA toolkit needed), where build.rs
# finds it. Idempotent: does nothing when .venv already has it. The whole set is pinned: an
# unpinned nvidia-nvvm pulls a newer NVVM whose PTX (ISA 9.5) the 13.0 ptxas and driver 580 reject.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=.venv/lib/python3*/site-packages/nvidia/cu13/bin/nvcc
if compgen -G "$NVCC" >/dev/null && $NVCC --version >/dev/null 2>&1; then
    exit 0
fi
python3 -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check \
    nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
compgen -G "$NVCC" >/dev/null || { echo "nvcc did not land in .venv" >&2; exit 1; }
echo "nvcc installed: $(ls $NVCC)"
