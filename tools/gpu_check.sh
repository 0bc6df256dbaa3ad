#!/usr/bin/env bash
# Everything this project checks on a lent CUDA GPU, in one call (under 9 minutes): the GPU tests,
# the 2:4 benchmark and the GPU study (params/gpu.yaml). Logs and results go under $OUT (default
# ./gpu-check). Run from the repository root:  bash tools/gpu_check.sh
# The image lacks most of the project's dependencies and the embedded model: build .gpu-payload/
# with tools/gpu_payload.sh on a machine with PyPI and carry its parts first (see that script).
set -u
OUT="${OUT:-gpu-check}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/lib" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,driver_version,power.draw --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cusparselt', torch.backends.cusparselt.version())" | tee -a "$OUT/gpu.txt"
# 0. the carried payload: wheels the image lacks, the embedded model, the notebooks' kernel
bash tools/gpu_install.sh 2>&1 | tee "$OUT/install.log"
# 1. the GPU tests (cuSPARSELt layer against dense, kernel names, conversion with verification)
timeout 120 python3 -m pytest -o addopts="" -p no:cacheprovider -q -rs tests/unit/test_sparse_gpu.py 2>&1 | tee "$OUT/gpu_tests.log"
# 2. the prefill benchmark: dense vs naive vs planned 2:4, NVML energy per token (gross and net)
timeout "${SPARSE24_TIMEOUT_S:-200}" python3 benchmarks/sparse24_gpu.py --budget-s "${SPARSE24_BUDGET_S:-150}" \
    --out "$OUT/sparse24.jsonl" 2>&1 | tee "$OUT/sparse24.log"
# 3. the GPU study: the embedded model at five precisions, 2:4 pruning at fp16/bf16, NVML energy
timeout "${STUDY_TIMEOUT_S:-300}" python3 -m llm_energy.cli run params/gpu.yaml --out "$OUT/gpu-study" 2>&1 \
    | tail -40 | tee "$OUT/gpu_study.log"
for table in energy scores configs ranking; do
  cp "$OUT/gpu-study/tables/$table.csv" "$OUT/" 2>/dev/null || true
done
