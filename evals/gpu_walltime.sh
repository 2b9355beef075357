#!/usr/bin/env bash
# The prepared GPU check: evals/gpu_walltime.py --all in one run of about 8 minutes on one CUDA
# GPU (H100/H200 class), installing nothing beyond diffguide's own extras.
#
#   pip install -e ".[gpu]"           # where a package registry is reachable: xformers beside your torch
#   evals/gpu_walltime.sh [OUT_DIR]   # from the repository root; default OUT_DIR: $OUT or evals/results
#
# On a GPU machine with no registry, `make gpu-wheels` here first fills .whl/ (git-ignored) with
# diffusers and xformers wheels for CPython 3.12; the script installs them into /tmp/site. Then
# `python evals/gpu_walltime.py --report OUT_DIR/gpu_walltime.json` writes the BENCHMARKS section.
set -euo pipefail
out="${1:-${OUT:-evals/results}}"
shift || true
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
mkdir -p "$out"
nvidia-smi >"$out/nvidia_smi.txt" 2>&1 || true
python3 -m xformers.info >"$out/xformers_info.txt" 2>&1 || echo "xformers.info failed: see $out/xformers_info.txt"
python3 evals/gpu_walltime.py --all --no-section --out "$out/gpu_walltime.json" "$@" 2>&1 | tee "$out/gpu_walltime.log"
