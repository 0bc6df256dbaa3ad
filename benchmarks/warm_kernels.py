"""Warm kernels against plain kernels: one study both ways, same machine, same run (issue 29, item 3).

Warm: `llm-energy run` as it runs by default, each job's kernel forked from the study's warm kernel
server (torch, transformers, the modeling modules, bitsandbytes, the notebooks' modules and the models'
tokenizers imported once; runner/warm_kernels.py). Plain: the same study with LLM_ENERGY_PLAIN_KERNELS=1,
a fresh interpreter per job importing everything itself. Each in a fresh output folder, in a subprocess.

    .venv/bin/python benchmarks/warm_kernels.py [--params params/smoke.yaml] [--order warm,plain]

Prints per job the wall seconds both ways (the done markers' own timing), then the totals and
`warm_kernels_ratio=<warm jobs' seconds / plain jobs' seconds>` (lower is better).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(params: Path, out: Path, plain: bool) -> tuple[float, dict[str, float], dict]:
    from llm_energy.layout import StudyLayout, done_seconds

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if plain:
        env["LLM_ENERGY_PLAIN_KERNELS"] = "1"
    else:
        env.pop("LLM_ENERGY_PLAIN_KERNELS", None)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "llm_energy.cli", "run", str(params), "--out", str(out),
                           "--force"], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        mode = "plain" if plain else "warm"
        raise SystemExit(f"{mode} run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    layout = StudyLayout(out)
    jobs = {marker.stem: sum(done_seconds(marker)) for marker in sorted(layout.state.glob("*.done"))}
    warm = json.loads(layout.provenance.read_text()).get("warm_kernels", {})
    return wall, jobs, warm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=ROOT / "params" / "smoke.yaml")
    parser.add_argument("--order", default="warm,plain", help="which runs first (the machine may drift)")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="warm-kernels-") as tmp:
        for mode in args.order.split(","):
            results[mode] = run(args.params.resolve(), Path(tmp) / mode, plain=(mode == "plain"))
            print(f"{mode}: study {results[mode][0]:.1f} s, server {results[mode][2]}", flush=True)
    (warm_wall, warm_jobs, _), (plain_wall, plain_jobs, _) = results["warm"], results["plain"]
    print(f"\n{'job':<70} {'warm s':>8} {'plain s':>8} {'saved s':>8}")
    for key in plain_jobs:
        w, p = warm_jobs.get(key, float("nan")), plain_jobs[key]
        print(f"{key:<70} {w:8.1f} {p:8.1f} {p - w:8.1f}")
    warm_total, plain_total = sum(warm_jobs.values()), sum(plain_jobs.values())
    print(f"\njobs: warm {warm_total:.1f} s, plain {plain_total:.1f} s ({len(plain_jobs)} jobs; "
          f"{(plain_total - warm_total) / max(len(plain_jobs), 1):.1f} s saved a job); study wall: warm "
          f"{warm_wall:.1f} s, plain {plain_wall:.1f} s")
    print(f"warm_kernels_ratio={warm_total / plain_total:.3f}")


if __name__ == "__main__":
    main()
