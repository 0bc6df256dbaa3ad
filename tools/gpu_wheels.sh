#!/usr/bin/env bash
# Wheels the lent GPU machine lacks (Python 3.12, no package registry there): pydantic and its
# core, for llm_energy.config. Carry the folder with the device run: carry: [".gpu-wheels"].
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .gpu-wheels
pip download --quiet --python-version 3.12 --only-binary=:all: --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 -d .gpu-wheels "pydantic>=2.6" "pyyaml>=6.0"
du -sh .gpu-wheels
