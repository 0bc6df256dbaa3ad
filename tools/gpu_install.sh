#!/usr/bin/env bash
# On the lent GPU machine: installs the carried .gpu-payload/ (tools/gpu_payload.sh built it) without a
# package index, in named steps (config, energy, notebooks, then the Jupyter kernel), each checked
# against the manifest and by importing its modules; prints one status line per step and exits non-zero
# when one failed (the later steps still run). Writes $GPU_SITE/env.sh (the PYTHONPATH that follows).
# Usage: bash tools/gpu_install.sh [--payload DIR] [--site DIR]   (details: tools/gpu_install.py)
set -u
cd "$(dirname "$0")/.."
PY="${GPU_PYTHON:-python3}"
exec "$PY" tools/gpu_install.py --site "${GPU_SITE:-/tmp/gpu-site}" "$@"
