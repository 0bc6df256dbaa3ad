"""The plan's estimate beside what a finished study measured, job by job (issue 29, item 5).

Plans the study's own parameters (its params.resolved.yaml) with the throughput probe it recorded
(provenance.json; ``--live-probe``: a probe taken now instead) and the package's calibration
(``--calibrate``: one measured from this study folder instead), and prints per job the estimate, the
measured wall time (state/*.done) and their ratio; then the totals against the study's wall time.

    python benchmarks/plan_vs_study.py outputs/default
    python benchmarks/plan_vs_study.py tests/unit/fixtures/default_study --write-calibration

``--write-calibration`` stores the calibration measured from the folder as the package's
(lib/llm_energy/runner/plan_calibration.json): do it from tests/unit/fixtures/default_study (the
recorded default study) whenever the FLOP count of the windows changes, since the efficiencies are
achieved GFLOP/s over the probe's. Last line: plan_vs_measured=<estimated total / study wall time>.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "lib"))

from llm_energy.config import study_from_dict
from llm_energy.layout import StudyLayout
from llm_energy.measure import throughput
from llm_energy.runner.checks import with_context_exclusions
from llm_energy.runner.estimate import calibrate, measured_jobs, packaged_calibration, rerun_seconds
from llm_energy.runner.plan import plan_from_probe
from llm_energy.runner.study import probed_precisions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study_dir", type=Path)
    parser.add_argument("--calibrate", action="store_true",
                        help="calibrate on this study instead of the package's")
    parser.add_argument("--write-calibration", action="store_true",
                        help="store this study's calibration as the package's (implies --calibrate)")
    parser.add_argument("--live-probe", action="store_true",
                        help="probe this machine now instead of the study's probe")
    args = parser.parse_args()
    layout = StudyLayout(args.study_dir.resolve())
    base_dir = ROOT / "params"
    calibration = packaged_calibration()
    if args.calibrate or args.write_calibration:
        calibration = calibrate(layout.root, base_dir)
        if args.write_calibration:
            calibration.save()
            print(f"calibration written: {calibration.source}")
    raw = yaml.safe_load(layout.params_resolved.read_text())
    raw.pop("_meta", None)
    study, _ = with_context_exclusions(study_from_dict(raw, str(layout.params_resolved)), base_dir)
    prov = json.loads(layout.provenance.read_text())
    device = prov["throughput"]["device"]
    if args.live_probe:
        probe = throughput.probe_device(probed_precisions(study), device)
    else:
        probe = {p: throughput.PrecisionThroughput(**r) for p, r in prov["throughput"]["precisions"].items()}
    plan = plan_from_probe(study, base_dir, device, probe, calibration)
    measured = measured_jobs(layout.root)
    rows = []
    for job in plan.jobs:
        key = job.key
        if key.startswith("pruning__<top"):  # the ranking's target: the measured job of the same method
            method = key.rsplit("__", 1)[1]
            key = next((k for k in measured if k.startswith("pruning__") and k.endswith(method)), key)
        seen = measured.get(key, math.nan)
        rows.append({"job": job.key, "estimate_s": job.estimate_s, "measured_s": seen,
                     "ratio": job.estimate_s / seen if seen else math.nan})
    table = pd.DataFrame(rows)
    pd.set_option("display.width", 160)
    print(f"calibration: {calibration.source}; probe: {'live' if args.live_probe else 'the study’s own'} "
          f"(fp32 {probe['fp32'].gflop_per_s:.0f} GFLOP/s)")
    print(table.round(2).to_string(index=False))
    study_s = math.nan
    if prov.get("started_at") and prov.get("finished_at"):
        study_s = (pd.Timestamp(prov["finished_at"]) - pd.Timestamp(prov["started_at"])).total_seconds()
    again = rerun_seconds(layout.root)
    print(f"\nestimated {plan.total_s:.0f} s (jobs {plan.total_s - plan.runner_s:.0f} s, "
          f"runner {plan.runner_s:.0f} s); "
          f"measured: study wall {study_s:.0f} s, jobs {sum(measured.values()):.0f} s"
          + (f" (+ {again:.0f} s of earlier runs of jobs measured again: not planned)" if again else "")
          + "; "
          f"worst job ratio {table['ratio'].min():.2f}-{table['ratio'].max():.2f}")
    print(f"plan_vs_measured={plan.total_s / study_s:.3f}")


if __name__ == "__main__":
    main()
