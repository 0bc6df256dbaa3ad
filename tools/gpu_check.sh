#!/usr/bin/env bash
# Everything this project checks on a lent CUDA GPU, in ONE command under the device tool's 540 s limit
# (the steps' own limits are cut to a deadline, 525 s by default, so the summary is always written):
#   a. env      GPU, driver, power limit, clocks, versions; NVML counter read twice 5 s apart, power;
#               the meter's NVML source (test-read, fallback recorded)                    limit  30 s
#      install  the carried .gpu-payload/ in named steps (tools/gpu_install.sh)            limit  40 s
#   b. tests    tests/unit/test_sparse_gpu.py (cuSPARSELt 2:4 exact against dense, padding)  limit  60 s
#   c. sparse24 2:4 prefill where it can pay: Llama-70B and 8B layer slices (8192x8192 weights at 8192
#               tokens among them), fp16 and bf16; dense vs planned, energy, kernel names  limit 150 s
#   d. energy   J/token, prefill 16x512 and decode batch 32 x 128, Llama-3.2-1B shape at fp32, bf16,
#               fp16, w8a8, 2:4 fp16; NVML counter, CodeCarbon and power integral per window  limit 100 s
#   e. study    params/gpu.yaml through the runner and papermill (SmolLM2-135M shape)     the rest, <= 200 s
# Models have random weights of real shapes: quality not meaningful; energy and kernels are.
# Each step writes its results as it finishes; after each, tools/gpu_summary.py rebuilds the result
# folder: summary.md, gpu-check.tar.gz (every log and table) and at most 6 other files, flat.
#
# Usage: bash tools/gpu_check.sh [--dry-run] [RESULT_DIR]
#   RESULT_DIR, else $GPU_CHECK_OUT, else $OUT (set by the device tool), else outputs/gpu-check
#   --dry-run: the same steps on the CPU with a fake NVML, tiny shapes, a one-wheel payload and the
#   study cut to one precision and a few items (tools/gpu_dry_params.py); checks the flow, the time
#   limits and the result folder's layout; last line dry_run=ok steps=5. make test runs it.
# The device call that runs it (README, "The GPU check"):
#   command: bash tools/gpu_check.sh "$OUT"   carry: [".gpu-payload"]   timeout_s: 540
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
DRY=0
RESULTS=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) RESULTS="$arg" ;;
  esac
done
if [ "$DRY" = 1 ]; then
  RESULTS="${RESULTS:-${GPU_CHECK_OUT:-outputs/gpu-check-dry}}"
  WORK="${GPU_CHECK_WORK:-outputs/gpu-check-dry-work/gpu-check}"
  DEADLINE="${GPU_CHECK_DEADLINE_S:-110}"
  PY="${GPU_PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
else
  RESULTS="${RESULTS:-${GPU_CHECK_OUT:-${OUT:-outputs/gpu-check}}}"
  WORK="${GPU_CHECK_WORK:-outputs/gpu-check-work/gpu-check}"
  DEADLINE="${GPU_CHECK_DEADLINE_S:-525}"
  PY="${GPU_PYTHON:-python3}"
fi
RESERVE=8
rm -rf "$WORK"
mkdir -p "$WORK" "$RESULTS"
export PYTHONPATH="$ROOT/lib" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export LLM_ENERGY_CACHE="${LLM_ENERGY_CACHE:-$([ "$DRY" = 1 ] && echo "$HOME/.cache/llm_energy" || echo /tmp/llm-energy-cache)}"
T0=$(date +%s.%N)
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
printf 'step\tstatus\texit\tseconds\tlimit_s\n' > "$WORK/steps.tsv"
OK_STEPS=0
ALL_OK=1

# run_step NAME LIMIT_S COMMAND...: at most LIMIT_S, cut to what is left before the deadline; log in
# $WORK/NAME.log; a line in steps.tsv; the result folder rebuilt.
run_step() {
  local name=$1 limit=$2; shift 2
  local left status rc start seconds
  left=$(awk -v d="$DEADLINE" -v e="$(elapsed)" -v r="$RESERVE" 'BEGIN { printf "%d", d - e - r }')
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 3 ]; then
    printf '%s\tskipped\t-\t0\t%s\n' "$name" "$limit" >> "$WORK/steps.tsv"
    echo "step $name: skipped (no time left before the ${DEADLINE} s deadline)"
    ALL_OK=0
    return
  fi
  start=$(date +%s.%N)
  timeout -k 5 "$limit" "$@" > "$WORK/$name.log" 2>&1
  rc=$?
  seconds=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  case $rc in
    0) status=ok ;;
    124|137) status=timeout ;;
    *) status=failed ;;
  esac
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$seconds" "$limit" >> "$WORK/steps.tsv"
  echo "step $name: $status (exit $rc) in ${seconds} s, limit ${limit} s, at $(elapsed) s: $(grep -v '^\s*$' "$WORK/$name.log" | tail -1 | cut -c1-300)"
  if [ "$status" = ok ]; then
    [ "$name" != install ] && OK_STEPS=$((OK_STEPS + 1))
  else
    ALL_OK=0
  fi
  timeout 30 "$PY" tools/gpu_summary.py "$WORK" "$RESULTS" || echo "summary: failed to write $RESULTS"
}

if [ "$DRY" = 1 ]; then
  # a. environment (fake NVML: a counter rising at 100 W)
  run_step env 20 "$PY" tools/gpu_env.py --out "$WORK/env.json" --fake-nvml --gap-s 0.5 --window-s 0.2
  # install: a one-wheel payload through the same manifest check, steps and import check
  run_step install 20 bash -c "'$PY' tools/gpu_install.py --make-fake '$WORK/fake-payload' && \
    '$PY' tools/gpu_install.py --payload '$WORK/fake-payload' --site '$WORK/site' --no-kernel"
  # b. the GPU tests: skipped on a CPU, with the reason (collection and imports checked)
  run_step gpu_tests 30 "$PY" -m pytest -o addopts="" -p no:cacheprovider -q -rs tests/unit/test_sparse_gpu.py
  # c. the 2:4 benchmark: tiny preset, reference backend
  run_step sparse24 30 "$PY" benchmarks/sparse24_gpu.py --dry-run-cpu --fake-nvml --presets tiny --dtypes fp16 \
    --batch 2 --seq 32 --repeats 1 --min-seconds 0.05 --idle-seconds 0.1 --token-counts 64 --skip-naive \
    --decode-tokens 0 --min-speedup 0 --budget-s 20 --out "$WORK/sparse24.jsonl"
  # d. energy per token: tiny preset, every precision, CodeCarbon's reading beside the fake counter
  run_step energy 40 "$PY" benchmarks/energy_per_token_gpu.py --dry-run-cpu --fake-nvml --preset tiny \
    --prefill-batch 2 --prefill-seq 32 --decode-batch 2 --decode-tokens 4 --prompt-tokens 8 --repeats 1 \
    --min-window-s 0.05 --idle-s 0.1 --budget-s 30 --out "$WORK/energy_per_token.jsonl"
  # e. the study: the tiny shape with SmolLM2's tokenizer, one precision, a few items
  TOKENIZER=.gpu-payload/tokenizer/smollm2
  run_step study 60 bash -c "set -e
    tok='$TOKENIZER'; [ -f \"\$tok/tokenizer.json\" ] || tok=\$('$PY' -c 'from llm_energy.models.loading import ensure_tokenizer; print(ensure_tokenizer())')
    '$PY' -m llm_energy.models.random_shapes --preset tiny --tokenizer \"\$tok\" --out '$WORK/model'
    '$PY' tools/gpu_dry_params.py --params params/gpu.yaml --model '$WORK/model' --out '$WORK/params.yaml'
    '$PY' -m llm_energy.cli run '$WORK/params.yaml' --out '$WORK/gpu-study'"
else
  nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.sm,clocks.max.sm --format=csv 2>&1 | tail -2
  run_step env 30 "$PY" tools/gpu_env.py --out "$WORK/env.json" --gap-s 5
  run_step install 40 "$PY" tools/gpu_install.py --payload .gpu-payload --site /tmp/gpu-site
  # shellcheck disable=SC1091
  [ -f /tmp/gpu-site/env.sh ] && . /tmp/gpu-site/env.sh
  run_step gpu_tests 60 "$PY" -m pytest -o addopts="" -p no:cacheprovider -q -rs tests/unit/test_sparse_gpu.py
  run_step sparse24 150 "$PY" benchmarks/sparse24_gpu.py --presets llama-70b-slice,llama-8b-slice --dtypes fp16,bf16 \
    --token-counts 2048,8192 --skip-naive --decode-tokens 0 --repeats 3 --min-seconds 1 --idle-seconds 3 \
    --budget-s 100 --out "$WORK/sparse24.jsonl"
  run_step energy 100 "$PY" benchmarks/energy_per_token_gpu.py --budget-s 75 --out "$WORK/energy_per_token.jsonl"
  run_step study 200 bash -c "set -e
    '$PY' -m llm_energy.models.random_shapes --preset smollm2-135m --tokenizer .gpu-payload/tokenizer/smollm2 \
      --out outputs/gpu-models/smollm2-135m-random
    '$PY' -m llm_energy.cli run params/gpu.yaml --out '$WORK/gpu-study'"
fi

# The result folder: at most 8 files, no deeper than 2 folders, plain names.
COUNT=$(find "$RESULTS" -type f | wc -l)
DEPTH_BAD=$(find "$RESULTS" -mindepth 3 | wc -l)
NAMES_BAD=$(find "$RESULTS" -mindepth 1 | sed "s|^$RESULTS/||" | grep -cv '^[A-Za-z0-9._/-]*$')
BYTES=$(du -sb "$RESULTS" | cut -f1)
echo "results: $RESULTS: $COUNT files, $BYTES bytes, too deep: $DEPTH_BAD, odd names: $NAMES_BAD"
LAYOUT_OK=1
{ [ "$COUNT" -le 8 ] && [ "$DEPTH_BAD" -eq 0 ] && [ "$NAMES_BAD" -eq 0 ] && [ -f "$RESULTS/summary.md" ] \
  && [ -f "$RESULTS/gpu-check.tar.gz" ]; } || LAYOUT_OK=0
TOTAL=$(elapsed)
if [ "$DRY" = 1 ]; then
  if [ "$ALL_OK" = 1 ] && [ "$LAYOUT_OK" = 1 ] && [ "$OK_STEPS" = 5 ]; then
    echo "dry run in $TOTAL s (deadline $DEADLINE s)"
    echo "dry_run=ok steps=$OK_STEPS"
    exit 0
  fi
  cat "$WORK/steps.tsv"
  echo "dry_run=failed steps=$OK_STEPS layout_ok=$LAYOUT_OK seconds=$TOTAL"
  exit 1
fi
echo "gpu_check=$([ "$ALL_OK" = 1 ] && echo ok || echo partial) steps=$OK_STEPS/5 seconds=$TOTAL layout_ok=$LAYOUT_OK"
[ "$ALL_OK" = 1 ] && [ "$LAYOUT_OK" = 1 ]
