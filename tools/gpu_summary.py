"""What comes back from the GPU machine, rebuilt after every step of tools/gpu_check.sh (standard
library only): at most 8 files, flat, in the result folder:

- ``summary.md``: the steps (status, seconds, limit), the environment, the install, the GPU tests,
  the 2:4 benchmark per preset and dtype (speedup, energy ratio, kernels), energy per token per precision
  (prefill and decode, gross and net, beside the H100 notes) with NVML counter vs CodeCarbon vs power
  integral per window, and the GPU study's energy rows; "random weights: quality not meaningful;
  energy and kernels are" at the top;
- ``gpu-check.tar.gz``: the whole work folder (logs, JSON lines, the study's tables, notebooks and
  report), files over 4 MiB left out;
- ``steps.tsv``, ``env.json``, ``sparse24.jsonl``, ``energy_per_token.jsonl``, ``study_energy.csv``.

    python3 tools/gpu_summary.py WORK OUT
"""

from __future__ import annotations

import json
import shutil
import sys
import tarfile
from pathlib import Path

NOTE = "random weights: quality not meaningful; energy and kernels are"
FLAT = ("steps.tsv", "env.json", "sparse24.jsonl", "energy_per_token.jsonl")
MAX_ARCHIVED = 4 << 20
# ../shared/notes/h100-measurements.md: Llama-3.2-1B shape, prefill 16x512 and decode batch 32, mJ/token
H100_NOTES = {"fp32": (40.2, 190), "bf16": (4.31, 108), "fp16": (4.45, 120), "fp16-2:4": (4.33, 107)}


def jsonl(path: Path) -> list[dict]:
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def fmt(value: object, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def tail(path: Path, lines: int = 12) -> str:
    if not path.is_file():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def summary(work: Path) -> str:
    out = [f"# GPU check: {NOTE}", ""]
    steps = [line.split("\t") for line in (work / "steps.tsv").read_text().splitlines()[1:]] \
        if (work / "steps.tsv").is_file() else []
    out += ["## Steps", "", "| step | status | exit | seconds | limit s |", "|---|---|---|---|---|"]
    out += [f"| {' | '.join(s)} |" for s in steps]
    total = sum(float(s[3]) for s in steps if len(s) > 3 and s[3].replace(".", "", 1).isdigit())
    out += ["", f"total {total:.0f} s", ""]
    env = json.loads((work / "env.json").read_text()) if (work / "env.json").is_file() else {}
    if env:
        nvml = env.get("nvml", {})
        out += ["## Environment", "", f"- GPU: {env.get('gpu', nvml.get('name'))}, driver "
                f"{nvml.get('driver')}, power limit {nvml.get('power_limit_w')} W, SM clock "
                f"{nvml.get('sm_clock_mhz')}/{nvml.get('sm_clock_max_mhz')} MHz, memory clock "
                f"{nvml.get('mem_clock_mhz')} MHz",
                f"- Python {env.get('python')}, torch {env.get('torch')} (CUDA {env.get('cuda')}, cuSPARSELt "
                f"{env.get('cusparselt')}), transformers {env.get('transformers_version')}",
                f"- NVML counter over the gap: {fmt(nvml.get('counter_average_power_w'), 1)} W average; "
                f"power readings {[r.get('power_w') for r in nvml.get('counter_reads', [])]}",
                f"- meter's NVML source: {env.get('meter_nvml', {}).get('method')} "
                f"{env.get('meter_nvml', {}).get('fallback_reason') or ''}", ""]
    install = [line for line in tail(work / "install.log", 40).splitlines() if line.startswith("install")]
    if install:
        out += ["## Install", "", *[f"- {line}" for line in install], ""]
    tests = tail(work / "gpu_tests.log", 3)
    out += ["## GPU tests", "", "```", tests, "```", ""]
    records = jsonl(work / "sparse24.jsonl")
    prefill = [r for r in records if r.get("kind") == "prefill"]
    if records:
        out += ["## 2:4 prefill (dense vs cuSPARSELt where planned)", "",
                "| preset | dtype | prefill_speedup | energy ratio | layers sparse | verified | kernel |",
                "|---|---|---|---|---|---|---|"]
        for r in prefill:
            kernel = (r.get("sparse_kernels") or ["-"])[0][:70]
            out.append(f"| {r['preset']} | {r['dtype']} | {fmt(r.get('prefill_speedup'))} | "
                       f"{fmt(r.get('energy_per_token_ratio'))} | {r.get('converted_layers')}/"
                       f"{r.get('candidate_layers')} | {r.get('verified')} | `{kernel}` |")
        shapes = [(r["preset"], r["dtype"], row) for r in records if r.get("kind") == "kernels"
                  for row in r["plan"]]
        if shapes:
            out += ["", "| preset | dtype | shape | tokens | dense ms | sparse ms | speedup |",
                    "|---|---|---|---|---|---|---|"]
            out += [f"| {p} | {d} | {row.get('out_features')}x{row.get('in_features')} | {row.get('tokens')} "
                    f"| {fmt(row.get('dense_ms'))} | {fmt(row.get('sparse_ms'))} | "
                    f"{fmt(row.get('speedup'), 2)} |"
                    for p, d, row in shapes]
        best = max(prefill, key=lambda r: r.get("prefill_speedup") or 0, default=None)
        if best:
            out += ["", f"prefill_speedup={fmt(best.get('prefill_speedup'))} preset={best['preset']} "
                        f"dtype={best['dtype']}"]
        out.append("")
    energy = jsonl(work / "energy_per_token.jsonl")
    rows = [r for r in energy if r.get("kind") == "precision"]
    if energy:
        head = next((r for r in energy if r.get("kind") == "environment"), {})
        out += [f"## Energy per token: {head.get('preset')} ({fmt(head.get('parameters'))} parameters, "
                f"{NOTE})", "",
                "| precision | prefill mJ/token | net | tokens/s | H100 notes | decode mJ/token | net | "
                "tokens/s | H100 notes |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            notes = H100_NOTES.get(r["precision"], (None, None))
            out.append(f"| {r['precision']} | {fmt(r.get('prefill_mj_per_token'))} | "
                       f"{fmt(r.get('prefill_mj_per_token_net'))} | {fmt(r.get('prefill_tokens_per_s'), 0)} "
                       f"| {fmt(notes[0])} | {fmt(r.get('decode_mj_per_token'), 2)} | "
                       f"{fmt(r.get('decode_mj_per_token_net'), 2)} | {fmt(r.get('decode_tokens_per_s'), 0)} "
                       f"| {fmt(notes[1])} |")
        out += ["", "| window | s | NVML counter J | CodeCarbon J | power integral J | CC/counter | "
                    "integral/counter |",
                "|---|---|---|---|---|---|---|"]
        for r in rows:
            for w in r.get("windows", []):
                out.append(f"| {w['window']} | {fmt(w.get('duration_s'), 2)} | "
                           f"{fmt(w.get('nvml_counter_j'), 2)} | {fmt(w.get('codecarbon_gpu_j'), 2)} | "
                           f"{fmt(w.get('power_integral_j'), 2)} | {fmt(w.get('codecarbon_over_counter'))} | "
                           f"{fmt(w.get('integral_over_counter'))} |")
        for r in energy:
            if r.get("kind") in ("error", "skipped"):
                out.append(f"- {r.get('precision')}: {r.get('kind')}: {r.get('error') or r.get('reason')}")
        out.append("")
    study = work / "study_energy.csv"
    if study.is_file():
        lines = study.read_text().splitlines()
        out += ["## GPU study: energy rows", "", f"{len(lines) - 1} rows in study_energy.csv "
                f"(energy_method per row; nvml_counter expected on the GPU)", "", "```", *lines[:12], "```",
                ""]
    failed = [s for s in steps if len(s) > 1 and s[1] != "ok"]
    for s in failed:
        out += [f"## {s[0]}: {s[1]} (log tail)", "", "```", tail(work / f"{s[0]}.log", 15), "```", ""]
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    work, out = Path(argv[0]), Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    study_csv = work / "gpu-study" / "tables" / "energy.csv"
    if study_csv.is_file():
        shutil.copyfile(study_csv, work / "study_energy.csv")
    for name in FLAT + ("study_energy.csv",):
        if (work / name).is_file():
            shutil.copyfile(work / name, out / name)
    (out / "summary.md").write_text(summary(work))
    tmp = out / "gpu-check.tar.gz.tmp"
    with tarfile.open(tmp, "w:gz") as archive:
        for path in sorted(work.rglob("*")):
            if path.is_file() and path.stat().st_size <= MAX_ARCHIVED and not path.name.endswith(".lock"):
                archive.add(path, arcname=str(path.relative_to(work.parent)))
    tmp.replace(out / "gpu-check.tar.gz")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
