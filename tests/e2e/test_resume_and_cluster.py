"""A run killed midway resumes into complete tables; --cluster local gives the sequential tables."""

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from llm_energy.tables import store as results

pytestmark = pytest.mark.slow


# The inference phases of the smoke study only: fine-tuning and pruning add time, not coverage here.
PHASES = ["--phases", "data", "inference", "ranking"]


# Four precisions of the smoke study's seven: two finish before the kill, two after the resume.
PRECISIONS = ["fp32", "bf16", "w8a8", "nf4"]


def four_precisions(root, tmp_path):
    """params/smoke.yaml with four precisions (the study's data are builtin: no path to rebase)."""
    import yaml

    study = yaml.safe_load((root / "params" / "smoke.yaml").read_text())
    study["precisions"] = PRECISIONS
    path = tmp_path / "smoke-four.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def start_run(params, out, *extra):
    return subprocess.Popen([sys.executable, "-m", "llm_energy.cli", "run",
                             str(params), "--out", str(out), *PHASES, *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def test_sigkill_midway_then_rerun_completes_without_duplicates(root, tmp_path):
    out = tmp_path / "killed"
    params = four_precisions(root, tmp_path)
    proc = start_run(params, out)
    deadline = time.time() + 300
    while time.time() < deadline:
        done = list((out / "state").glob("inference__*.done")) if (out / "state").exists() else []
        if len(done) >= 2:
            break
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("the run did not reach two finished configs in time")
    os.killpg(proc.pid, signal.SIGKILL)  # the runner and the kernel it was running
    proc.wait()
    partial = results.read_table(out, "energy")
    assert len(partial) >= 2 * 2  # two configs x two tasks at least

    rerun = subprocess.run([sys.executable, "-m", "llm_energy.cli", "run",
                            str(params), "--out", str(out), *PHASES],
                           capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    energy = results.read_table(out, "energy")
    inference = energy[energy["phase"] == "inference"]
    assert len(inference) == len(PRECISIONS) * 3  # each precision x rca, qa, rca_resolution
    assert not inference.duplicated(["config_id", "phase", "task"]).any()
    for name in ("scores", "item_scores", "energy_repeats", "configs"):
        table = results.read_table(out, name)
        assert not table.duplicated(results.TABLES[name][1]).any(), name
    assert len(results.read_table(out, "scores")) == len(PRECISIONS) * 6
    assert (out / "report.html").is_file()
    assert not list((out / "tables").glob("*.tmp"))


def test_local_cluster_gives_the_sequential_tables(root, tmp_path, smoke_study):
    """The same four precisions as above on a local Dask cluster: their rows equal the sequential smoke
    study's rows for those configs (the other three precisions add time, not coverage)."""
    sequential, _ = smoke_study
    out = tmp_path / "cluster"
    params = four_precisions(root, tmp_path)
    proc = subprocess.run([sys.executable, "-m", "llm_energy.cli", "run", str(params),
                           "--out", str(out), "--cluster", "local", *PHASES], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    def base(folder, name):
        table = results.read_table(folder, name)
        config = table["config_id"].astype(str)
        precision = config.str.split("__").str[1]
        return table[~config.str.contains("lora|magnitude|wanda") & precision.isin(PRECISIONS)]

    def scores(folder):
        return base(folder, "scores").sort_values(["config_id", "task", "metric"]).reset_index(drop=True)

    pd.testing.assert_frame_equal(scores(sequential), scores(out))
    keys = ["config_id", "phase", "task", "n_items", "n_tokens", "repeats", "energy_method"]
    a = base(sequential, "energy")
    a = a[a["phase"].isin(["idle", "inference"])][keys].sort_values(keys).reset_index(drop=True)
    b = base(out, "energy")[keys].sort_values(keys).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)
    assert len(results.read_table(out, "ranking")) == len(PRECISIONS) * 11
