"""On the lent GPU machine: install the carried payload (tools/gpu_payload.sh built it) without a
package index, in named steps, each checked (tools/gpu_install.sh runs this; the standard library only).

1. the manifest: every file it lists is there with its size and sha256 (a missing or damaged file
   fails the steps that need it, by name);
2. per step (config, energy, notebooks, in order): each wheel is installed unless the image already
   has that distribution at the same or a newer version; into ``--site``/<step> with
   ``pip install --no-index --no-deps --no-compile --target`` (unpacked by hand when the image has no
   pip); then the step's modules are imported in a fresh interpreter with every step's folder on the path.
   A failed step does not stop the next: steps that do not need its packages still install;
3. the Jupyter kernel ``python3`` (papermill runs the notebooks with it), when the notebooks step passed;
4. ``--site``/env.sh: ``export PYTHONPATH=...`` for what follows; the SmolLM2 tokenizer is left in the
   payload (``tokenizer/smollm2``).

One line per step: ``install step=<name> status=ok|failed installed=N present=N seconds=S [why]``; the
last line ``install=ok`` or ``install=failed steps=<names>``; exit 1 when a step failed.

    python3 tools/gpu_install.py [--payload .gpu-payload] [--site /tmp/gpu-site]
    python3 tools/gpu_install.py --make-fake DIR    (a one-wheel payload for the CPU rehearsal)
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.metadata as metadata
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

STEP_MODULES = {
    "config": ("pydantic", "pycountry", "yaml"),
    "energy": ("codecarbon",),
    "notebooks": ("papermill", "nbformat", "nbconvert", "ipykernel", "pyzipper"),
    "fake": ("llm_energy_fake_payload",),
}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def version_key(text: str) -> tuple:
    """A sortable key for release numbers (1.10 > 1.9; pre-releases sort before their release)."""
    parts = []
    for piece in re.split(r"[.+-]", text):
        number = re.match(r"\d+", piece)
        parts.append((int(number.group()), piece[number.end():] == "") if number else (-1, False))
    return tuple(parts)


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def read_manifest(payload: Path) -> list[dict[str, str]]:
    lines = (payload / "MANIFEST.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"))) for line in lines[1:] if line.strip()]


def unpack(wheel: Path, target: Path) -> None:
    """A wheel installed by hand: unzipped, its .data/purelib and platlib moved to the top."""
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(target)
    for data in target.glob("*.data"):
        for kind in ("purelib", "platlib"):
            folder = data / kind
            if folder.is_dir():
                for item in folder.iterdir():
                    shutil.move(str(item), str(target / item.name))
        shutil.rmtree(data, ignore_errors=True)


def install(wheels: list[Path], target: Path) -> str:
    """'' when installed, else why not."""
    target.mkdir(parents=True, exist_ok=True)
    has_pip = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode == 0
    if has_pip:
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                               "--no-compile", "--no-cache-dir", "--disable-pip-version-check", "--upgrade",
                               "--target", str(target), *map(str, wheels)], capture_output=True, text=True)
        if done.returncode == 0:
            return ""
        print(done.stdout[-1500:] + done.stderr[-1500:], flush=True)
    try:
        for wheel in wheels:
            unpack(wheel, target)
        print(f"unpacked {len(wheels)} wheels by hand into {target}", flush=True)
        return ""
    except Exception as exc:  # noqa: BLE001
        return f"unpacking failed: {type(exc).__name__}: {exc}"


def import_check(modules: tuple[str, ...], path: str) -> str:
    """'' when every module imports in a fresh interpreter with ``path`` first, else the error's last line."""
    env = {**os.environ, "PYTHONPATH": path}
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    done = subprocess.run([sys.executable, "-c", code, *modules], capture_output=True, text=True, env=env,
                          timeout=120)
    if done.returncode == 0:
        return ""
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else f"exit {done.returncode}"


def make_fake(folder: Path) -> None:
    """A payload of one tiny pure-Python wheel and a tokenizer folder: the install's whole flow on a CPU."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "wheels").mkdir(exist_ok=True)
    name, version = "llm_energy_fake_payload", "1.0"
    wheel = folder / "wheels" / f"{name}-{version}-py3-none-any.whl"
    files = {f"{name}/__init__.py": "VALUE = 1\n",
             f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: "
                                                     f"{version}\n",
             f"{name}-{version}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: fake\nRoot-Is-Purelib: "
                                                   "true\nTag: py3-none-any\n"}
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    record.append(f"{name}-{version}.dist-info/RECORD,,")
    files[f"{name}-{version}.dist-info/RECORD"] = "\n".join(record) + "\n"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    rows = [("fake", "needed", name, version, wheel.stat().st_size, sha256(wheel), f"wheels/{wheel.name}")]
    (folder / "MANIFEST.tsv").write_text("step\trole\tname\tversion\tsize\tsha256\tpath\n"
                                         + "".join("\t".join(map(str, r)) + "\n" for r in rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--payload", type=Path, default=Path(".gpu-payload"))
    parser.add_argument("--site", type=Path, default=Path("/tmp/gpu-site"))
    parser.add_argument("--no-kernel", action="store_true", help="do not install the Jupyter kernel")
    parser.add_argument("--make-fake", type=Path, help="write a one-wheel payload here and exit")
    args = parser.parse_args(argv)
    if args.make_fake:
        make_fake(args.make_fake)
        return 0
    if not (args.payload / "MANIFEST.tsv").is_file():
        print(f"no {args.payload}/MANIFEST.tsv: build the payload with bash tools/gpu_payload.sh and carry "
              f"{args.payload} with the call")
        print("install=failed steps=manifest")
        return 1
    rows = read_manifest(args.payload)
    steps = list(dict.fromkeys(r["step"] for r in rows if r["step"] != "tokenizer"))
    damaged: dict[str, list[str]] = {}
    for row in rows:
        path = args.payload / row["path"]
        if not path.is_file():
            damaged.setdefault(row["step"], []).append(f"{row['path']} missing")
        elif path.stat().st_size != int(row["size"]) or sha256(path) != row["sha256"]:
            damaged.setdefault(row["step"], []).append(f"{row['path']} damaged (size or sha256)")
    print(f"manifest: {len(rows)} files, {sum(int(r['size']) for r in rows) / 2**20:.1f} MiB, "
          f"{sum(len(v) for v in damaged.values())} missing or damaged", flush=True)
    site = args.site.resolve()
    paths = [str(site / step) for step in steps]
    path_text = os.pathsep.join(paths + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    failed = []
    for step in steps:
        start = time.perf_counter()
        mine = [r for r in rows if r["step"] == step]
        wanted, present = [], 0
        for row in mine:
            have = installed_version(row["name"])
            if have is not None and version_key(have) >= version_key(row["version"]):
                present += 1
            else:
                wanted.append(args.payload / row["path"])
        why = "; ".join(damaged.get(step, []))
        if not why:
            why = install(wanted, site / step) if wanted else ""
        if not why:
            why = import_check(STEP_MODULES.get(step, ()), path_text)
        status = "ok" if not why else "failed"
        if why:
            failed.append(step)
        print(f"install step={step} status={status} installed={len(wanted) if status == 'ok' else 0} "
              f"present={present} seconds={time.perf_counter() - start:.1f}" + (f" why={why}" if why else ""),
              flush=True)
    if "notebooks" in steps and "notebooks" not in failed and not args.no_kernel:
        env = {**os.environ, "PYTHONPATH": path_text}
        done = subprocess.run([sys.executable, "-m", "ipykernel", "install", "--user", "--name", "python3"],
                              capture_output=True, text=True, env=env)
        print(f"install step=kernel status={'ok' if done.returncode == 0 else 'failed'}"
              + ("" if done.returncode == 0 else f" why={done.stderr.strip().splitlines()[-1:]}"), flush=True)
        if done.returncode:
            failed.append("kernel")
    site.mkdir(parents=True, exist_ok=True)
    (site / "env.sh").write_text(f"export PYTHONPATH='{path_text}'\n")
    print(f"PYTHONPATH for what follows: {site / 'env.sh'}")
    print("install=ok" if not failed else f"install=failed steps={','.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
