#!/usr/bin/env bash
# Everything this project checks on a lent CUDA GPU, in one call (the device image has torch,
# transformers, nvidia-ml-py and pytest, but not pydantic, which llm_energy.config needs: build
# .gpu-wheels/ here first with `bash tools/gpu_wheels.sh` and carry it with the run's `carry`). Writes logs and results under $OUT
# (default ./gpu-check). Run from the repository root:  bash tools/gpu_check.sh
set -u
OUT="${OUT:-gpu-check}"
mkdir -p "$OUT"
export PYTHONPATH=lib PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if ! python3 -c "import pydantic" 2>/dev/null; then
  if ls .gpu-wheels/*.whl >/dev/null 2>&1; then
    python3 -m pip install --quiet --no-index --find-links .gpu-wheels pydantic pyyaml 2>&1 | tail -2
  else
    echo "pydantic is missing and no .gpu-wheels/ was carried: run tools/gpu_wheels.sh and carry .gpu-wheels" | tee "$OUT/missing.txt"
  fi
fi
nvidia-smi --query-gpu=name,driver_version,power.draw --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cusparselt', torch.backends.cusparselt.version())" | tee -a "$OUT/gpu.txt"
# 1. the GPU tests (cuSPARSELt layer against dense, kernel names, conversion with verification)
python3 -m pytest -o addopts="" -p no:cacheprovider -q -rs tests/unit/test_sparse_gpu.py 2>&1 | tee "$OUT/gpu_tests.log"
# 2. the prefill benchmark: dense vs naive vs planned 2:4, NVML energy per token
timeout "${SPARSE24_TIMEOUT_S:-420}" python3 benchmarks/sparse24_gpu.py --budget-s "${SPARSE24_BUDGET_S:-300}" \
    --out "$OUT/sparse24.jsonl" 2>&1 | tee "$OUT/sparse24.log"
