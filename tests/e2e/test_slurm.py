"""The study on a real one-node SLURM, through dask-jobqueue, as the README's "On a cluster" shows it.

The fixture starts munged, slurmctld and slurmd (tests/e2e/slurm_node.py) and stops them after; the
tests run ``llm-energy run STUDY --out DIR --cluster slurm`` with the README's ``cluster:`` block.
Smallest studies that show each point: the tiny random model at fp32 (and a copy of it from a local
folder where a second config is needed), a few items, one measured window.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurm_node import SlurmNode, missing_reason

from llm_energy.tables import store as results

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

ROOT = Path(__file__).resolve().parents[2]
KILLED, KEPT = "tiny-random-llama__fp32", "tiny-copy__fp32"


@pytest.fixture(scope="session")
def slurm():
    """A one-node SLURM on 127.0.0.1; every daemon and job stopped at the end, nothing left running."""
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    node = SlurmNode()
    try:
        node.start()
    except Exception as exc:
        node.stop()
        pytest.fail(f"the test SLURM did not start: {exc}", pytrace=False)
    yield node
    node.stop()
    left = node.leftovers()
    if left:
        print(node.tail())
    assert not left, f"still running after the test SLURM stopped: {left}"
    node.cleanup()


def readme_cluster_block() -> str:
    """The ``cluster:`` YAML of the README's "On a cluster" section, the block the tests run."""
    text = (ROOT / "README.md").read_text()
    section = text.split("### On a cluster: SLURM", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```yaml\n(cluster:\n.*?)```", section, re.S)
    assert block, "README's On a cluster section has no cluster: block"
    assert "llm-energy run study.yaml --out" in section and "--cluster slurm" in section
    return block.group(1)


def study_file(tmp_path: Path, name: str, models: int = 1, phases: str = "[data, inference, ranking]",
               **slurm: str) -> Path:
    """A tiny study with the README's cluster block (``slurm``: keys of it replaced)."""
    from llm_energy.config import TinyLlamaSettings
    from llm_energy.models.loading import ensure_tiny_llama

    cluster = readme_cluster_block()
    if (os.cpu_count() or 1) < 2:  # the README's worker asks for 2 cores
        slurm.setdefault("cores", "1")
    for key, value in slurm.items():
        cluster, n = re.subn(rf"^(\s+{key}:) [^#\n]*?(\s*#.*)?$", rf"\g<1> {value}\g<2>", cluster, flags=re.M)
        assert n == 1, key
    copy = ("\n  - name: tiny-copy\n    source: local\n    path: "
            f"{ensure_tiny_llama(TinyLlamaSettings())}") if models > 1 else ""
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"""study: {name}
phases: {phases}
models:
  - name: tiny-random-llama{copy}
precisions: [fp32]
tasks:
  rca: {{max_items: 3}}
  qa: {{max_items: 3}}
energy: {{idle_seconds: 0.5, repeats: 1, max_repeats: 1, on_contaminated: flag}}
ranking: {{bootstrap: 10}}
{cluster}""")
    return path


def llm_energy(node: SlurmNode, params: Path, out: Path, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "llm_energy.cli", "run", str(params), "--out", str(out),
                             "--cluster", "slurm"], env=node.env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen)


def finish(proc: subprocess.Popen, node: SlurmNode, timeout: float = 600) -> str:
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        pytest.fail(f"the run did not finish in {timeout} s:\n{output}\n{node.tail()}")
    return output


def configs(out: Path):
    table = results.read_table(out, "configs").set_index("config_id")
    table["slurm_job_id"] = [("" if v != v else str(int(v))) for v in table["slurm_job_id"]]
    return table


def test_exclusive_study_runs_each_job_in_slurm_survives_scancel_and_resumes(slurm, tmp_path):
    params = study_file(tmp_path, "slurm-exclusive", models=2)
    out = tmp_path / "out"
    before = set(slurm.jobs())
    proc = llm_energy(slurm, params, out)
    # scancel the worker's SLURM job while it runs the first config's inference
    started = out / "logs" / f"inference__{KILLED}.log"
    deadline = time.time() + 300
    while not started.exists():
        if proc.poll() is not None or time.time() > deadline:
            pytest.fail(f"the first config never started:\n{finish(proc, slurm)}\n{slurm.tail()}")
        time.sleep(0.2)
    killed = slurm.running("dask-worker")
    assert len(killed) == 1, slurm.jobs()
    slurm.run(["scancel", killed[0]])
    output = finish(proc, slurm)
    assert proc.returncode == 1, output  # finished, with the killed job to report
    assert (f"FAILED inference__{KILLED}: WorkerLost: its worker's SLURM job {killed[0]} ended"
            in output), output

    table = configs(out)
    assert table.loc[KILLED, "status"] == "failed" and table.loc[KILLED, "slurm_job_id"] == killed[0]
    assert table.loc[KEPT, "status"] == "ok", output
    replacement = table.loc[KEPT, "slurm_job_id"]
    assert replacement and replacement != killed[0]  # a new worker job took the jobs left
    assert [f["job"] for f in json.loads((out / "failures.json").read_text())] == [f"inference__{KILLED}"]
    assert (out / "report.html").is_file()

    rerun = llm_energy(slurm, params, out)
    output = finish(rerun, slurm)
    assert rerun.returncode == 0, output
    assert "jobs completed: 2, resumed (already done): 2" in output, output  # the killed job and the ranking
    table = configs(out)
    assert (table["status"] == "ok").all(), table
    assert table.loc[KEPT, "slurm_job_id"] == replacement  # resumed, not run again
    assert table.loc[KILLED, "slurm_job_id"] not in ("", killed[0], replacement)
    assert json.loads((out / "failures.json").read_text()) == []

    # every config ran in a SLURM worker job that --exclusive gave its node: energy charged to the machine
    jobs = slurm.jobs()
    for config, row in table.iterrows():
        job = jobs[row["slurm_job_id"]]
        assert job["JobName"] == "dask-worker" and job["Partition"] == "shared", job
        assert job["OverSubscribe"] == "NO" and row["slurm_oversubscribe"] == "NO", (config, job)
    assert set(jobs) - before >= set(table["slurm_job_id"]) | set(killed)
    energy = results.read_table(out, "energy")
    assert sorted(energy["config_id"].unique()) == sorted([KILLED, KEPT])
    assert len(energy) == 2 * 2 and (energy["energy_scope"] == "machine").all()
    assert not energy.duplicated(["config_id", "phase", "task"]).any()
    assert len(results.read_table(out, "scores")) == 2 * (2 + 2)  # rca: accuracy, macro_f1; qa: acc, acc_norm
    assert (out / "report.html").is_file()
    assert not slurm.running(), "worker jobs left running after the study"


def test_without_exclusive_attribution_follows_the_real_job(slurm, tmp_path):
    # The default partition shares nodes: CPU jobs without --exclusive are refused before any job.
    before = set(slurm.jobs())
    params = study_file(tmp_path, "slurm-shared", job_extra_directives="[]")
    proc = llm_energy(slurm, params, tmp_path / "shared")
    output = finish(proc, slurm)
    assert proc.returncode == 2 and "measured CPU jobs would share a node" in output, output
    assert "add --exclusive to cluster.slurm.job_extra_directives" in output
    assert set(slurm.jobs()) == before and not (tmp_path / "shared").exists()

    # A partition with OverSubscribe=EXCLUSIVE gives every job its node without the directive: measured,
    # charged to the machine, because scontrol says so inside the job.
    params = study_file(tmp_path, "slurm-whole", phases="[inference]", queue="whole",
                        job_extra_directives="[]")
    proc = llm_energy(slurm, params, tmp_path / "whole")
    output = finish(proc, slurm)
    assert proc.returncode == 0, output + slurm.tail()
    row = configs(tmp_path / "whole").loc[KILLED]
    assert row["status"] == "ok" and row["slurm_oversubscribe"] == "NO"
    assert slurm.jobs()[row["slurm_job_id"]]["OverSubscribe"] == "NO"
    assert (results.read_table(tmp_path / "whole", "energy")["energy_scope"] == "machine").all()

    # --exclusive asked for, then undone by a later directive: the real job may share its node, so the
    # job is not measured, and configs.csv says which job and what SLURM gave it.
    params = study_file(tmp_path, "slurm-undone", phases="[inference]",
                        job_extra_directives='["--exclusive", "--oversubscribe"]')
    proc = llm_energy(slurm, params, tmp_path / "undone")
    output = finish(proc, slurm)
    assert proc.returncode == 1, output
    row = configs(tmp_path / "undone").loc[KILLED]
    assert row["status"] == "failed" and row["slurm_oversubscribe"] == "YES"
    assert row["reason"].startswith(f"not measured: SLURM job {row['slurm_job_id']} may share its node")
    assert slurm.jobs()[row["slurm_job_id"]]["OverSubscribe"] == "YES"
    assert not len(results.read_table(tmp_path / "undone", "energy"))


def test_refusals_against_the_real_slurm(slurm, tmp_path):
    # An output folder the node cannot see (slurmd's node-local/ is its own empty tmpfs): a one-task srun
    # looks for a file written there, and the run is refused before anything else is written.
    hidden = slurm.node_local / "out"
    if not slurm.node_local_hidden:
        pytest.skip("no private mount namespace for slurmd here (unshare --mount): no folder the node cannot "
                    "see")
    params = study_file(tmp_path, "slurm-refused")
    proc = llm_energy(slurm, params, hidden)
    output = finish(proc, slurm)
    assert proc.returncode == 2, output
    assert f"the output folder {hidden} is not visible from the cluster's nodes: node {slurm.name}" in output
    assert list(slurm.node_local.iterdir()) == []
    # memory beyond the node's RealMemory: sbatch --test-only says so, nothing is submitted
    before = set(slurm.jobs())
    params = study_file(tmp_path, "slurm-too-big", memory="900GB")
    proc = llm_energy(slurm, params, tmp_path / "too-big")
    output = finish(proc, slurm)
    assert proc.returncode == 2 and "SLURM would not run a worker job as cluster.slurm asks for it" in output
    assert "Requested node configuration is not available" in output, output
    assert set(slurm.jobs()) == before and not (tmp_path / "too-big").exists()
