"""Where a finished study's time went: seconds per job and per phase, and the share spent outside the
measured model windows (kernel start, imports, model load, warm-up, table writes, report).

Reads only the study folder:
- ``state/<job>.done``: the job's wall time as the runner measured it (papermill, kernel start included);
- ``notebooks/*.ipynb``: papermill's per-cell durations (their sum is the time inside the kernel, so
  wall − cells is kernel start and shutdown);
- ``tables/energy_repeats.csv``: every measured inference/pruning window (a repeat over a task's items);
  ``tables/training.csv``: every measured training epoch and its eval-loss window (``eval_duration_s``);
  ``tables/setup_energy.csv``: the measured windows that make a pruned config (loading, calibration,
  pruning, re-quantization: what the lifecycle charges it); ``tables/idle_baselines.csv``: the idle
  windows.

    python benchmarks/study_profile.py outputs/default

Then each precision's limit_share (the median over the study's inference windows of the achieved
GFLOP/s over the throughput probe's; analysis/limits.py), the worst inference job's seconds outside
measured and idle windows, and as the last line:
outside_measured_share=<share of job wall time outside measured model windows>
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "lib"))

from llm_energy.analysis.limits import precision_limits
from llm_energy.layout import StudyLayout


def _table(layout: StudyLayout, name: str) -> pd.DataFrame:
    path = layout.table(name)
    return pd.read_csv(path, dtype={"config_id": str}) if path.exists() else pd.DataFrame()


def _cells_s(notebook: Path) -> float | None:
    """Seconds spent executing the notebook's cells (papermill's per-cell duration)."""
    if not notebook.exists():
        return None
    cells = json.loads(notebook.read_text()).get("cells", [])
    return sum(float((c.get("metadata", {}).get("papermill") or {}).get("duration") or 0.0) for c in cells)


def _seconds(table: pd.DataFrame, phase: str, config_id: str, column: str = "duration_s") -> float:
    """duration_s summed over a job's rows: its config (and, for pruning, the recovered config it also
    evaluates); a fine-tuned config id is shared by its fine-tuning and its inference job, so those
    two are told apart by the rows' phase."""
    if table.empty or not config_id:
        return 0.0
    rows = table[table["config_id"].isin({config_id, f"{config_id}__recovered"})]
    if phase in ("finetune", "inference") and "phase" in rows:
        rows = rows[rows["phase"] == phase]
    return float(rows[column].sum()) if column in rows else 0.0


def _repeated_s(table: pd.DataFrame, phase: str, config_id: str) -> float:
    """Seconds of window attempts measured and then discarded as contaminated (``attempts`` - 1 per
    kept window, each taken as long as the kept one: an estimate; the discarded attempt's own duration
    is not recorded)."""
    if table.empty or not config_id or "attempts" not in table:
        return 0.0
    rows = table[table["config_id"].isin({config_id, f"{config_id}__recovered"})]
    if phase in ("finetune", "inference") and "phase" in rows:
        rows = rows[rows["phase"] == phase]
    return float(((rows["attempts"].fillna(1) - 1).clip(lower=0) * rows["duration_s"]).sum())


def profile(study_dir: Path) -> pd.DataFrame:
    """One row per finished job: wall, in-kernel, measured model windows, idle windows, outside."""
    layout = StudyLayout(study_dir)
    repeats, training, idle = (_table(layout, "energy_repeats"), _table(layout, "training"),
                               _table(layout, "idle_baselines"))
    setup = _table(layout, "setup_energy")
    rows = []
    for marker in sorted(layout.state.glob("*.done")):
        key = marker.stem
        phase, _, config_id = key.partition("__")
        record = json.loads(marker.read_text() or "{}")
        wall = float(record.get("seconds", float("nan")))
        earlier = float(sum(record.get("earlier_runs_s", [])))
        measured = (_seconds(repeats, phase, config_id) + _seconds(training, phase, config_id)
                    + _seconds(training, phase, config_id, "eval_duration_s"))
        idle_s = _seconds(idle, phase, config_id)
        setup_s = _seconds(setup, phase, config_id)
        cells = (_cells_s(layout.executed_notebook(phase, config_id or None))
                 if phase in ("data", "finetune", "inference",
                                                                                            "pruning",
                              "ranking") else None)
        rows.append({"job": key, "phase": phase, "wall_s": wall, "in_kernel_s": cells,
                     "kernel_start_s": wall - cells if cells is not None else float("nan"),
                     "measured_model_s": measured, "setup_windows_s": setup_s, "idle_windows_s": idle_s,
                     "outside_measured_s": wall - measured - setup_s - idle_s,
                     "remeasured_attempts_s": _repeated_s(repeats, phase, config_id),
                     "earlier_runs_s": earlier})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study_dir", type=Path)
    args = parser.parse_args()
    jobs = profile(args.study_dir.resolve())
    if jobs.empty:
        raise SystemExit(f"{args.study_dir}: no finished jobs (state/*.done)")
    pd.set_option("display.width", 160)
    print("Per job (seconds):")
    print(jobs.round(1).to_string(index=False))
    phases = jobs.groupby("phase",
                          sort=False)[["wall_s", "kernel_start_s", "measured_model_s", "setup_windows_s",
                                                  "idle_windows_s", "outside_measured_s"]].sum()
    phases["outside_share"] = phases["outside_measured_s"] / phases["wall_s"]
    print("\nPer phase (seconds):")
    print(phases.round(2).to_string())
    prov = StudyLayout(args.study_dir.resolve()).provenance
    total_wall = jobs["wall_s"].sum()
    if prov.exists():
        data = json.loads(prov.read_text())
        if data.get("started_at") and data.get("finished_at"):
            study_s = (pd.Timestamp(data["finished_at"]) - pd.Timestamp(data["started_at"])).total_seconds()
            print(f"\nstudy wall {study_s:.0f} s; jobs {total_wall:.0f} s; runner outside jobs (probe, "
                  f"validation, report) {study_s - total_wall:.0f} s")
    layout = StudyLayout(args.study_dir.resolve())
    limits = precision_limits(_table(layout, "energy"), _table(layout, "energy_repeats"))
    if limits.empty:
        print("limit_share: not recorded (energy_repeats.csv has no gflop_per_s: a study from before "
              "issue 29)")
    for row in limits.itertuples():
        print(f"limit_share[{row.precision}]={row.limit_share:.3f} (median of {row.windows} inference "
              f"windows: {row.gflop_per_s:.1f} GFLOP/s against the probe's {row.probe_gflop_per_s:.1f}; "
              f"scoring "
              f"{row.scoring_limit_share:.3f}, generation {row.generation_limit_share:.3f})")
    inference = jobs[jobs["phase"] == "inference"]
    if not inference.empty:
        worst = inference.loc[inference["outside_measured_s"].idxmax()]
        print(f"worst_inference_outside_s={worst['outside_measured_s']:.1f} ({worst['job']})")
        net = inference["outside_measured_s"] - inference["remeasured_attempts_s"]
        print(f"worst_inference_outside_without_discarded_attempts_s={net.max():.1f} "
              f"({inference.loc[net.idxmax(), 'job']}; median of inference jobs {net.median():.1f})")
    share = jobs["outside_measured_s"].sum() / total_wall
    print(f"setup windows {jobs['setup_windows_s'].sum():.0f} s (measured, setup_energy.csv); "
          f"outside_measured_share_if_setup_windows_were_outside="
          f"{(jobs['outside_measured_s'].sum() + jobs['setup_windows_s'].sum()) / total_wall:.3f}")
    print(f"measured model windows {jobs['measured_model_s'].sum():.0f} s, idle windows "
          f"{jobs['idle_windows_s'].sum():.0f} s, kernel start {jobs['kernel_start_s'].sum():.0f} s")
    # What a disturbed machine adds, apart from the dead time above: window attempts measured and then
    # discarded as contaminated (inside outside_measured_s; estimated as long as the kept attempt), and
    # whole runs of jobs the re-measure stage ran again (not in the jobs' seconds above).
    repeated, earlier = jobs["remeasured_attempts_s"].sum(), jobs["earlier_runs_s"].sum()
    clean = (jobs["outside_measured_s"].sum() - repeated) / total_wall
    print(f"discarded window attempts ~{repeated:.0f} s (estimate), earlier runs of jobs measured again "
          f"{earlier:.0f} s ({int((jobs['earlier_runs_s'] > 0).sum())} jobs)")
    print(f"outside_measured_share_without_discarded_attempts={clean:.3f}")
    print(f"outside_measured_share={share:.3f}")  # the last line, as issue 29 reads it


if __name__ == "__main__":
    main()
