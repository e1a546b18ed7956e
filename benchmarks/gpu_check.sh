#!/usr/bin/env bash
# The prepared GPU check (benchmarks/gpu_check.py), from the repository root of a copy of
# the working tree on a machine with an NVIDIA GPU, torch with CUDA, nvcc and
# compute-sanitizer: builds for the local GPU only, runs the CUDA tests (shipped cubin and
# NVRTC), the sanitizers and the benchmark rows, and writes OUT_DIR/gpu_check.md.
#
# usage: bash benchmarks/gpu_check.sh [OUT_DIR] [gpu_check.py options]   (OUT_DIR default $OUT)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-gpu_check_out}}"
[ $# -gt 0 ] && shift
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" benchmarks/gpu_check.py --out "$OUT_DIR" "$@"
