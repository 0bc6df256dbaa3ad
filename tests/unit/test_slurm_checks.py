"""--cluster slurm: the refusals before any job, and how a job's energy follows what SLURM gave it.

Without SLURM: dask-jobqueue or sbatch missing (monkeypatched away), and the decisions read from
scontrol's words. The same refusals against a real one-node SLURM are in tests/e2e/test_slurm.py.
"""

import sys

import pytest

from llm_energy.config import SlurmSettings
from llm_energy.runner import scale
from llm_energy.runner import study as runner
from llm_energy.runner.jobs import Job

STUDY = """
study: slurm-refusals
models:
  - name: tiny-random-llama
precisions: [fp32]
phases: [inference]
tasks:
  rca: {max_items: 3}
energy: {idle_seconds: 0.5, repeats: 1, max_repeats: 1}
cluster:
  slurm: {gpus_per_job: 0, cores: 1, memory: 1GB, job_extra_directives: ["--exclusive"]}
"""


@pytest.fixture
def params(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(STUDY)
    return path


def refused(params, out, match):
    with pytest.raises(runner.StudyRunError, match=match) as err:
        runner.run_study(params, out=out, cluster="slurm")
    assert not out.exists(), "a refused run wrote its output folder"
    return str(err.value)


def test_refused_without_dask_jobqueue(params, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "dask_jobqueue", None)  # import dask_jobqueue raises ImportError
    message = refused(params, tmp_path / "out", "--cluster slurm needs dask-jobqueue")
    assert "make setup" in message and "pip install dask-jobqueue" in message


def test_refused_without_sbatch_on_the_path(params, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    message = refused(params, tmp_path / "out", "sbatch, srun, scontrol, scancel are not on the PATH")
    assert "login node" in message and "apt install slurm-client" in message


def test_refused_with_an_output_folder_no_node_sees(params, tmp_path, monkeypatch):
    """The srun check's answer from a node that lacks the file this machine wrote."""
    monkeypatch.setattr(scale, "slurm_tools_problem", lambda: None)
    monkeypatch.setattr(scale, "partition_oversubscribe", lambda queue: "")
    monkeypatch.setattr(scale, "worker_job_problem", lambda settings: None)
    seen = {}

    def srun(command, timeout):
        import subprocess

        seen["command"] = command
        assert (tmp_path / command[-1].rsplit("/", 1)[-1]).is_file()  # the probe exists while srun runs
        return subprocess.CompletedProcess(command, 0, "node=node7\nmissing\n", "")

    monkeypatch.setattr(scale, "_run", srun)
    message = refused(params, tmp_path / "out", "is not visible from the cluster's nodes: node node7")
    assert "put --out on a filesystem the nodes share" in message
    assert seen["command"][0] == "srun" and "--immediate=120" in seen["command"]
    assert not list(tmp_path.glob(".llm-energy-node-check-*"))  # the probe is removed again


def test_a_node_that_sees_the_folder_passes(tmp_path, monkeypatch):
    import subprocess

    def srun(command, timeout):
        return subprocess.CompletedProcess(command, 0, f"node=n1\n{(tmp_path / command[-1]).read_text()}", "")

    monkeypatch.setattr(scale, "_run", srun)
    assert scale.out_dir_problem(SlurmSettings(queue="cpu"), tmp_path / "out" / "deeper") is None


def test_no_node_in_time_says_the_check_could_not_run(tmp_path, monkeypatch):
    import subprocess

    monkeypatch.setattr(scale, "_run", lambda command, timeout: subprocess.CompletedProcess(
        command, 1, "", "srun: error: Unable to allocate resources: Requested nodes are busy"))
    problem = scale.out_dir_problem(SlurmSettings(), tmp_path)
    assert problem and "could not check" in problem and "Requested nodes are busy" in problem


def test_cpu_jobs_without_exclusive_are_refused_unless_the_partition_is_exclusive(params, monkeypatch):
    from llm_energy.config import load_study

    study = load_study(params)
    shared = study.model_copy(update={"cluster": study.cluster.model_copy(update={
        "slurm": study.cluster.slurm.model_copy(update={"job_extra_directives": [], "queue": "cpu"})})})
    monkeypatch.setattr(scale, "partition_oversubscribe", lambda queue: "NO")
    with pytest.raises(runner.StudyRunError, match="measured CPU jobs would share a node"):
        runner.energy_attribution(shared, "slurm", "cpu")
    assert runner.energy_attribution(study, "slurm", "cpu") == "machine"  # --exclusive
    monkeypatch.setattr(scale, "partition_oversubscribe", lambda queue: "EXCLUSIVE")
    assert runner.energy_attribution(shared, "slurm", "cpu") == "machine"


def test_attribution_follows_the_real_job():
    assert scale.job_attribution("auto", "NO", "cpu", "7") == ("machine", None)
    assert scale.job_attribution("auto", "NO", "cuda", "7") == ("machine", None)
    assert scale.job_attribution("auto", "OK", "cuda", "7") == ("gpu_only", None)
    assert scale.job_attribution("gpu_only", "NO", "cuda", "7") == ("gpu_only", None)
    attribution, why = scale.job_attribution("auto", "USER", "cpu", "7")
    assert attribution == "" and "SLURM job 7 may share its node" in why and "OverSubscribe=USER" in why
    assert "--exclusive" in why
    attribution, why = scale.job_attribution("machine", "OK", "cuda", "7")
    assert attribution == "" and "charged the whole node" in why
    assert scale.job_attribution("auto", "unknown", "cpu", "7")[0] == ""  # not shown exclusive: not measured


def test_a_worker_reads_its_slurm_job_before_measuring(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(scale, "execute_job", lambda job,
                        out: ran.append(job) or {"ok": True, "error": "", "seconds": 1.0})
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    job = Job("inference", "m__fp32", {"device": "cpu", "energy": {"attribution": "auto"}})

    monkeypatch.setattr(scale, "slurm_job_oversubscribe", lambda job_id: "OK")
    result = scale._run_on_worker(job, str(tmp_path), True, "auto")
    assert not result["ok"] and result["error"].startswith("not measured: SLURM job 41 may share its node")
    assert result["slurm_job_id"] == "41" and result["slurm_oversubscribe"] == "OK" and not ran

    monkeypatch.setattr(scale, "slurm_job_oversubscribe", lambda job_id: "NO")
    result = scale._run_on_worker(job, str(tmp_path), True, "auto")
    assert result["ok"] and result["slurm_job_id"] == "41" and result["slurm_oversubscribe"] == "NO"
    assert ran[-1].parameters["energy"]["attribution"] == "machine"
    # not on SLURM (a local cluster inside an allocation): nothing read, nothing recorded
    result = scale._run_on_worker(job, str(tmp_path), False, "auto")
    assert result["slurm_job_id"] == "" and ran[-1].parameters["energy"]["attribution"] == "auto"


def test_partition_oversubscribe_reads_the_default_partition(monkeypatch):
    import subprocess

    lines = ("PartitionName=a Default=NO OverSubscribe=EXCLUSIVE State=UP\n"
             "PartitionName=b Default=YES OverSubscribe=NO State=UP\n")
    monkeypatch.setattr(scale, "_run", lambda command,
                        timeout: subprocess.CompletedProcess(command, 0, lines, ""))
    assert scale.partition_oversubscribe(None) == "NO"
    monkeypatch.setattr(scale, "_run", lambda command, timeout: subprocess.CompletedProcess(
        command, 0, lines.splitlines()[0], ""))
    assert scale.partition_oversubscribe("a") == "EXCLUSIVE"


def test_configs_row_records_the_slurm_job(tmp_path, monkeypatch):
    from llm_energy.tables import store as results
    from llm_energy.tables.rows import record_config

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    record_config(tmp_path, "a__fp32", "a", "fp32", "ok")
    monkeypatch.setenv("SLURM_JOB_ID", "12")
    monkeypatch.setenv(scale.OVERSUBSCRIBE_ENV, "NO")
    record_config(tmp_path, "b__fp32", "b", "fp32", "ok")
    record_config(tmp_path, "c__fp32", "c", "fp32", "failed", "x", slurm_job_id="9", slurm_oversubscribe="")
    table = results.read_table(tmp_path, "configs").set_index("config_id")
    ids = {k: "" if v != v else str(int(v)) for k, v in table["slurm_job_id"].items()}  # read back as numbers
    assert ids == {"a__fp32": "", "b__fp32": "12", "c__fp32": "9"}
    assert table.loc["b__fp32", "slurm_oversubscribe"] == "NO"
