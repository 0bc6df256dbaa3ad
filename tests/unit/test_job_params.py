"""`llm-energy jobs` lists a study's jobs; `llm-energy params` writes one job's papermill parameters,
the same the runner passes (tests/e2e/test_job_params_papermill.py runs them through papermill)."""

import yaml

from llm_energy import cli
from llm_energy.runner.jobs import notebook_parameters
from llm_energy.runner.study import planned_jobs


def test_jobs_lists_every_job_of_the_smoke_study_in_run_order(root, capsys):
    assert cli.main(["jobs", str(root / "params" / "smoke.yaml")]) == 0
    lines = capsys.readouterr().out.splitlines()
    keys = [line.split("\t")[0] for line in lines]
    assert keys[0] == "data" and keys[-1] == "ranking"
    assert "inference__tiny-random-llama__fp32\t03_inference.ipynb" in lines
    assert "inference__tiny-random-llama__nf4__lora" in keys  # the adapter the fine-tuning job saves
    assert "pruning__tiny-random-llama__fp32__lora__wanda-2of4" in keys
    assert (keys.index("finetune__tiny-random-llama__fp32__lora")
            < keys.index("inference__tiny-random-llama__fp32__lora"))


def test_params_writes_what_the_runner_passes(root, tmp_path, capsys):
    out = tmp_path / "study"
    job_file = tmp_path / "job.yaml"
    key = "pruning__tiny-random-llama__fp32__lora__wanda-2of4"
    assert cli.main(["params", str(root / "params" / "smoke.yaml"), "--job", key, "--out", str(out),
                     "-o", str(job_file)]) == 0
    assert f"-f {job_file}" in capsys.readouterr().err
    written = yaml.safe_load(job_file.read_text())
    jobs, _ = planned_jobs(root / "params" / "smoke.yaml", out=out)
    (job,) = [j for j in jobs if j.key == key]
    assert written == notebook_parameters(job)
    assert written["study_dir"] == str(out.resolve())
    assert written["adapter"] == str(out.resolve() / "adapters" / "tiny-random-llama__fp32__lora")
    assert written["pruning"]["method"] == "wanda" and written["precision"] == "fp32"
    assert "pruning_label" not in written  # not declared by 04_pruning: the runner drops it too


def test_params_refuses_an_unknown_job_and_names_the_known_ones(root, capsys):
    assert cli.main(["params", str(root / "params" / "smoke.yaml"), "--job", "inference__nope"]) == 2
    err = capsys.readouterr().err
    assert "has no job 'inference__nope'" in err and "inference__tiny-random-llama__bf16" in err


def test_top_k_pruning_jobs_wait_for_the_ranking(root, tmp_path, capsys):
    assert cli.main(["jobs", str(root / "params" / "default.yaml"), "--out", str(tmp_path / "empty")]) == 0
    captured = capsys.readouterr()
    assert not [line for line in captured.out.splitlines() if line.startswith("pruning__")]
    assert "pruning jobs (the top" in captured.err and "are known once" in captured.err


def test_the_runner_imports_what_executing_a_job_needs_in_the_background():
    """preload_job_machinery: papermill and the kernel manager imported in a thread (the runner starts it
    beside its sustained-load burn, which waits for it), so the first job does not pay the imports.
    In a fresh interpreter (this one has imported papermill already)."""
    import subprocess
    import sys

    code = ("import sys, time\n"
            "from llm_energy.runner.jobs import JOB_MACHINERY, preload_job_machinery\n"
            "assert 'papermill' not in sys.modules\n"
            "started = time.perf_counter()\n"
            "thread = preload_job_machinery()\n"
            "returned = time.perf_counter() - started\n"
            "thread.join(120)\n"
            "assert not thread.is_alive() and thread.daemon\n"
            "missing = [m for m in JOB_MACHINERY if m not in sys.modules]\n"
            "print(repr((returned, missing)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    returned, missing = eval(out.strip().splitlines()[-1])
    assert missing == [] and returned < 0.5  # it did not wait for the imports
