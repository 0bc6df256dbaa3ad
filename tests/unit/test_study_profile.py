"""benchmarks/study_profile.py on a hand-made study folder: seconds per job, measured windows by phase."""

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "study_profile.py"


@pytest.fixture(scope="module")
def profiler():
    spec = importlib.util.spec_from_file_location("study_profile", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_profile_splits_each_job_into_measured_idle_and_outside(profiler, tmp_path, capsys, monkeypatch):
    state, tables, notebooks = tmp_path / "state", tmp_path / "tables", tmp_path / "notebooks"
    for folder in (state, tables, notebooks):
        folder.mkdir()
    lora = "m__fp32__lora"
    (state / f"finetune__{lora}.done").write_text(json.dumps({"seconds": 20.0}))
    (state / f"inference__{lora}.done").write_text(json.dumps({"seconds": 10.0}))
    (state / "ranking.done").write_text(json.dumps({"seconds": 5.0}))
    cells = {"cells": [{"metadata": {"papermill": {"duration": 3.0}}},
                       {"metadata": {"papermill": {"duration": 1.5}}}]}
    (notebooks / "05_ranking__study.ipynb").write_text(json.dumps(cells))
    # one config id, two jobs: the rows' phase says which job measured them
    pd.DataFrame([{"config_id": lora, "phase": "inference", "task": "rca", "repeat": r, "duration_s": 2.0}
                  for r in (1, 2)]).to_csv(tables / "energy_repeats.csv", index=False)
    pd.DataFrame([{"config_id": lora, "phase": "finetune", "epoch": e, "duration_s": 6.0}
                  for e in (1, 2)]).to_csv(tables / "training.csv", index=False)
    pd.DataFrame([{"config_id": lora, "phase": p, "kind": "loaded", "duration_s": 1.0}
                  for p in ("finetune", "inference")]).to_csv(tables / "idle_baselines.csv", index=False)
    jobs = profiler.profile(tmp_path).set_index("job")
    assert jobs.loc[f"finetune__{lora}",
                    ["measured_model_s", "idle_windows_s", "outside_measured_s"]].tolist() == [12.0, 1.0, 7.0]
    assert jobs.loc[f"inference__{lora}",
                    ["measured_model_s", "idle_windows_s", "outside_measured_s"]].tolist() == [4.0, 1.0, 5.0]
    assert jobs.loc["ranking", "kernel_start_s"] == pytest.approx(0.5)
    monkeypatch.setattr("sys.argv", ["study_profile.py", str(tmp_path)])
    profiler.main()
    assert capsys.readouterr().out.strip().endswith(f"outside_measured_share={(7 + 5 + 5) / 35:.3f}")
    # an epoch's eval loss measured in its own window (training.csv's eval_duration_s) is measured too
    pd.DataFrame([{"config_id": lora, "phase": "finetune", "epoch": e, "duration_s": 6.0,
                   "eval_duration_s": 1.5} for e in (1, 2)]).to_csv(tables / "training.csv", index=False)
    jobs = profiler.profile(tmp_path).set_index("job")
    assert jobs.loc[f"finetune__{lora}", ["measured_model_s", "outside_measured_s"]].tolist() == [15.0, 4.0]
    # a pruning job's setup steps (setup_energy.csv) are measured windows too
    pruned = f"{lora}__wanda-2of4"
    (state / f"pruning__{pruned}.done").write_text(json.dumps({"seconds": 30.0}))
    steps = ("load", "calibration", "prune")
    pd.DataFrame([{"config_id": pruned, "step": s, "duration_s": 4.0} for s in steps]).to_csv(
        tables / "setup_energy.csv", index=False)
    jobs = profiler.profile(tmp_path).set_index("job")
    assert jobs.loc[f"pruning__{pruned}", ["setup_windows_s", "outside_measured_s"]].tolist() == [12.0, 18.0]


def test_profile_prints_each_precisions_limit_share_and_the_worst_inference_job(profiler, tmp_path, capsys,
                                                                                 monkeypatch):
    (tmp_path / "state").mkdir()
    (tmp_path / "tables").mkdir()
    for config, seconds in (("m__fp32", 30.0), ("m__nf4", 50.0)):
        (tmp_path / "state" / f"inference__{config}.done").write_text(json.dumps({"seconds": seconds}))
    energy = pd.DataFrame([{"config_id": c, "phase": "inference", "task": "rca", "precision": p,
                            "probe_gflop_per_s": 100.0} for c, p in (("m__fp32", "fp32"), ("m__nf4", "nf4"))])
    energy.to_csv(tmp_path / "tables" / "energy.csv", index=False)
    pd.DataFrame([{"config_id": c, "phase": "inference", "task": "rca", "repeat": r, "duration_s": 10.0,
                   "gflop_per_s": 100.0 * s, "limit_share": s}
                  for c, shares in (("m__fp32", (0.6, 0.8)), ("m__nf4", (0.2, 0.3)))
                  for r, s in enumerate(shares, 1)]
                 ).to_csv(tmp_path / "tables" / "energy_repeats.csv", index=False)
    monkeypatch.setattr("sys.argv", ["study_profile.py", str(tmp_path)])
    profiler.main()
    out = capsys.readouterr().out
    assert "limit_share[fp32]=0.700" in out and "limit_share[nf4]=0.250" in out
    assert "worst_inference_outside_s=30.0 (inference__m__nf4)" in out  # 50 s less two 10 s windows
    assert out.strip().endswith(f"outside_measured_share={(10 + 30) / 80:.3f}")


def test_discarded_attempts_and_earlier_runs_are_told_apart_from_dead_time(profiler, tmp_path, capsys,
                                                                            monkeypatch):
    (tmp_path / "state").mkdir()
    (tmp_path / "tables").mkdir()
    # a job run twice (the re-measure stage): 40 s first, 30 s the run kept
    (tmp_path / "state" / "inference__m__fp32.done").write_text(json.dumps({"seconds": 30.0,
                                                                            "earlier_runs_s": [40.0]}))
    # two windows of 5 s, one of them measured twice (its first attempt discarded as contaminated)
    pd.DataFrame([{"config_id": "m__fp32", "phase": "inference", "task": "qa", "repeat": r, "duration_s": 5.0,
                   "attempts": a} for r, a in ((1, 2), (2, 1))]
                 ).to_csv(tmp_path / "tables" / "energy_repeats.csv", index=False)
    jobs = profiler.profile(tmp_path).set_index("job")
    assert jobs.loc["inference__m__fp32", ["outside_measured_s", "remeasured_attempts_s", "earlier_runs_s"]
                    ].tolist() == [20.0, 5.0, 40.0]
    monkeypatch.setattr("sys.argv", ["study_profile.py", str(tmp_path)])
    profiler.main()
    out = capsys.readouterr().out
    assert ("discarded window attempts ~5 s (estimate), earlier runs of jobs measured again 40 s (1 jobs)"
            in out)
    assert f"outside_measured_share_without_discarded_attempts={15 / 30:.3f}" in out
    assert "worst_inference_outside_without_discarded_attempts_s=15.0" in out
    assert out.strip().endswith(f"outside_measured_share={20 / 30:.3f}")
