"""One job of the smoke study, run by hand: `llm-energy params` writes its parameters, papermill runs
its notebook with `-f`, and the tables hold the same rows as the runner's run of that job (times and
energies aside). Also: the runner's jobs are quiet (no kernel transport warning) and each names its log."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from llm_energy.tables import store as results

pytestmark = pytest.mark.slow

JOB = "inference__tiny-random-llama__fp32"
CONFIG = "tiny-random-llama__fp32"
# Column names holding a time, an energy, a method that depends on the machine's counters, or what the
# disturbance witnesses read (machine speed, other processes, steal: the moment's, not the config's).
VOLATILE = ("energy", "duration", "emissions", "idle", "power", "seconds", "memory", "method", "carbon",
            "repeats", "calls", "j_per_", "canary", "foreign", "steal", "contaminated", "remeasured", "rate_",
            "attempts", "disturbance",
            "gflop_per_s", "limit_", "probe_")  # achieved rates; the runner's probe, or the job's own alone


def cli(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "llm_energy.cli", *args], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def rows(study_dir, table: str) -> pd.DataFrame:
    frame = results.read_table(study_dir, table)
    frame = frame[frame["config_id"] == CONFIG]
    keep = [c for c in frame.columns if not any(marker in c for marker in VOLATILE)]
    return frame[keep].sort_values(results.TABLES[table][1]).reset_index(drop=True)


def test_params_file_is_exactly_what_the_runner_passed(root, smoke_study, tmp_path):
    out, _ = smoke_study
    job_file = tmp_path / "job.yaml"
    cli("params", str(root / "params" / "smoke.yaml"), "--job", JOB, "--out", str(out), "-o", str(job_file))
    executed = json.loads((out / "notebooks" / "03_inference__tiny-random-llama__fp32.ipynb").read_text())
    assert yaml.safe_load(job_file.read_text()) == executed["metadata"]["papermill"]["parameters"]


def test_papermill_with_the_params_file_reproduces_the_runners_rows(root, smoke_study, tmp_path):
    out, _ = smoke_study
    replay = tmp_path / "replay"
    job_file = tmp_path / "job.yaml"
    cli("params", str(root / "params" / "smoke.yaml"), "--job", JOB, "--out", str(replay), "-o",
        str(job_file))
    proc = subprocess.run([sys.executable, "-m", "papermill", str(root / "notebooks" / "03_inference.ipynb"),
                           str(tmp_path / "out.ipynb"), "-f", str(job_file), "-k", "python3",
                           "--cwd", str(root / "notebooks"), "--no-progress-bar"],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Passed unknown parameter" not in proc.stderr
    for table in ("scores", "item_scores", "energy", "configs"):
        theirs, mine = rows(out, table), rows(replay, table)
        assert len(mine) > 0, table
        # dtypes may differ where a column is empty here (e.g. sparsity_pattern: no pruned rows)
        pd.testing.assert_frame_equal(mine, theirs, check_dtype=False, check_exact=False, rtol=1e-6,
                                      obj=table)


def test_runner_names_each_jobs_log_and_prints_no_kernel_warning(smoke_study):
    out, proc = smoke_study
    assert "without encryption" not in proc.stderr + proc.stdout
    assert f"(log: {out / 'logs' / (JOB + '.log')})" in proc.stderr
