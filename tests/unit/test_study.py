"""The runner's planning and refusals, without executing notebooks."""


import pytest

from llm_energy.config import load_study
from llm_energy.layout import notebooks_dir
from llm_energy.runner import study as runner
from llm_energy.runner.jobs import filter_parameters


def smoke(root):
    return load_study(root / "params" / "smoke.yaml")


SMOKE_TARGETS = "targets: [tiny-random-llama__fp32__lora]"


def smoke_with_targets(root, tmp_path, targets: str):
    """The smoke study with its pruning targets replaced (``null``: the top_k of the ranking)."""
    text = (root / "params" / "smoke.yaml").read_text()
    assert SMOKE_TARGETS in text
    path = tmp_path / "smoke-targets.yaml"
    path.write_text(text.replace(SMOKE_TARGETS, f"targets: {targets}"))
    return path


def test_expand_orders_jobs_and_passes_sections(root, tmp_path):
    jobs, skipped = runner.expand(load_study(smoke_with_targets(root, tmp_path, "null")), tmp_path,
                                  root / "params", "cpu")
    # pruning targets come from the inference ranking, so they are planned later by the runner
    assert [j.phase for j in jobs] == ["data"] + ["finetune"] * 2 + ["inference"] * 7 + ["ranking"]
    assert [j.config_id for j in jobs if j.phase == "finetune"] == ["tiny-random-llama__fp32__lora",
                                                                    "tiny-random-llama__nf4__lora"]
    assert skipped == []
    inference = jobs[3]
    assert inference.config_id == "tiny-random-llama__fp32"
    assert inference.parameters["precision"] == "fp32" and inference.parameters["device"] == "cpu"
    assert inference.parameters["tasks"]["rca"]["max_items"] == 6


def test_unsupported_precision_is_skipped_with_reason(root, tmp_path, monkeypatch):
    import llm_energy.models.loading as models

    monkeypatch.setattr(models, "precision_support",
                        lambda p, d: "bitsandbytes has no backend here" if p in ("int8", "nf4") else None)
    jobs, skipped = runner.expand(smoke(root), tmp_path, root / "params", "cpu")
    assert [s["config_id"] for s in skipped] == ["tiny-random-llama__nf4__lora", "tiny-random-llama__int8",
                                                 "tiny-random-llama__nf4"]
    assert all(s["reason"] == "bitsandbytes has no backend here" for s in skipped)
    assert len([j for j in jobs if j.phase == "inference"]) == 5


def test_parameters_filtered_to_declared_ones(root):
    nb = notebooks_dir() / "05_ranking.ipynb"
    filtered = filter_parameters(nb, {"study_dir": "x", "ranking": {}, "precision": "fp32"})
    assert filtered == {"study_dir": "x", "ranking": {}}


def test_cuda_requested_without_gpu_fails_before_writing(root, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible on this machine")
    params = tmp_path / "gpu.yaml"
    params.write_text((root / "params" / "smoke.yaml").read_text().replace("device: cpu", "device: cuda"))
    out = tmp_path / "out"
    with pytest.raises(runner.StudyRunError, match="device: device 'cuda' was requested but no CUDA GPU is "
                                                   "visible"):
        runner.run_study(params, out=out)
    assert not out.exists()


def test_out_dir_with_results_needs_force_for_no_resume(root, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "tables").mkdir()
    with pytest.raises(runner.StudyRunError, match="Pass --force"):
        runner.prepare_out_dir(smoke(root), out, resume=False, force=False)
    runner.prepare_out_dir(smoke(root), out, resume=False, force=True)
    assert not out.exists()


def test_unknown_phase_and_cluster_are_refused(root, tmp_path):
    with pytest.raises(runner.StudyRunError, match=r"--phases \['training'\] are not phases of this study"):
        runner.run_study(root / "params" / "smoke.yaml", out=tmp_path / "o", phases=["training"])
    with pytest.raises(runner.StudyRunError, match="--cluster must be none, local or slurm; got 'k8s'"):
        runner.run_study(root / "params" / "smoke.yaml", out=tmp_path / "o", cluster="k8s")


def test_slurm_job_script_asks_for_gpus_and_one_device_resource(tmp_path):
    from llm_energy.config import SlurmSettings
    from llm_energy.runner.scale import slurm_cluster

    settings = SlurmSettings(queue="gpu", walltime="01:30:00", gpus_per_job=1, cores=4, memory="16GB",
                             job_extra_directives=["--constraint=h100"])
    cluster = slurm_cluster(settings, tmp_path)
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    assert "#SBATCH -p gpu" in script
    assert "#SBATCH -t 01:30:00" in script
    assert "#SBATCH --gres=gpu:1" in script and "#SBATCH --constraint=h100" in script
    assert "--resources device=1" in script


def test_local_workers_one_per_device(root):
    from llm_energy.runner.scale import local_worker_count

    assert local_worker_count(smoke(root), "cpu") == 1


def test_explicit_pruning_targets_are_planned_up_front(root, tmp_path):
    params = smoke_with_targets(root, tmp_path, '["tiny-random-llama:fp16"]')
    jobs, _ = runner.expand(load_study(params), tmp_path, tmp_path, "cpu")
    pruning = [j for j in jobs if j.phase == "pruning"]
    assert [j.config_id for j in pruning] == ["tiny-random-llama__fp16__magnitude-unstructured-50",
                                              "tiny-random-llama__fp16__wanda-2of4"]
    assert pruning[1].parameters["pruning"]["pattern"] == "2:4"


def test_inconsistent_nm_pattern_is_refused_at_validation(root, tmp_path):
    from llm_energy.config import StudyValidationError

    params = tmp_path / "p.yaml"
    params.write_text((root / "params" / "smoke.yaml").read_text().replace(
        '{method: wanda, pattern: "2:4"}', '{method: wanda, pattern: "2:4", sparsity: 0.3}'))
    with pytest.raises(StudyValidationError, match=r"pruning.methods\[1\]: pattern '2:4' keeps 2 of every 4"):
        load_study(params)


def test_choosing_pruning_targets_does_not_write_the_ranking(root, tmp_path):
    """Only the ranking phase writes ranking.csv; the runner ranks the tables as they are to pick targets."""
    from llm_energy.tables import store as results

    study = smoke(root)
    rows, scores = [], []
    for precision, energy_kwh, accuracy in (("fp32", 2e-6, 0.5), ("bf16", 1e-6, 0.5), ("nf4", 1e-6, 0.1)):
        config_id = f"tiny-random-llama__{precision}"
        for task, metric in (("rca", "accuracy"), ("qa", "acc_norm")):
            row = {c: None for c in results.ENERGY_COLUMNS}
            row.update(config_id=config_id, phase="inference", model="tiny-random-llama", precision=precision,
                       adapter="none", pruning="none", task=task, n_items=10, energy_kwh=energy_kwh,
                       energy_kwh_std=0.0, energy_method="rapl")
            rows.append(row)
            scores.append({"config_id": config_id, "task": task, "metric": metric, "value": accuracy,
                           "ci_low": 0.0, "ci_high": 1.0, "n_items": 10})
    results.upsert_rows(tmp_path, "energy", rows)
    results.upsert_rows(tmp_path, "scores", scores)
    from llm_energy.config import PruningTarget

    assert runner.top_k_targets(study, tmp_path) == [PruningTarget("tiny-random-llama", "bf16")]
    assert not results.table_path(tmp_path, "ranking").exists()


def test_the_gpu_study_is_valid_and_refused_without_a_gpu(root, tmp_path):
    """params/gpu.yaml validates here (its random-weight model folder written as tools/gpu_check.sh
    writes it, at the tiny shape); running it on a machine without CUDA stops before writing."""
    import torch
    import yaml

    from llm_energy.models.random_shapes import save_folder

    raw = yaml.safe_load((root / "params" / "gpu.yaml").read_text())
    assert raw["models"][0] == {"name": "smollm2-135m-random", "source": "local",
                                "path": "../outputs/gpu-models/smollm2-135m-random"}
    raw["models"][0]["path"] = str(save_folder("tiny", tmp_path / "model"))
    params = tmp_path / "gpu.yaml"
    params.write_text(yaml.safe_dump(raw))
    study = load_study(params)
    assert study.device == "cuda" and study.precisions == ["fp32", "bf16", "fp16", "w8a8"]
    assert {m.pattern for m in study.pruning.methods} == {"2:4"} and study.pruning.sparse_kernels == "auto"
    assert study.device_limits.max_slowdown is None
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the refusal cannot be shown here")
    out = tmp_path / "gpu"
    with pytest.raises(runner.StudyRunError, match="no CUDA GPU is visible"):
        runner.run_study(params, out=out)
    assert not out.exists()


def test_top_k_pruning_waits_for_the_adapters_and_can_prune_one(root, tmp_path, monkeypatch):
    """The runner picks top-k pruning targets only once the adapters are evaluated, so the best
    config of the whole ranking, a fine-tuned one here, is the one pruned (jobs faked: no notebooks)."""
    from llm_energy.tables import store as results

    params = smoke_with_targets(root, tmp_path, "null")
    order = []

    def fake_execute(job, out_dir):
        order.append(job.key)
        if job.phase == "finetune":  # the adapter file the runner looks for
            folder = out_dir / "adapters" / job.config_id
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "adapter_model.safetensors").write_bytes(b"")
        if job.phase == "inference":
            best = job.parameters.get("adapter_name") == "lora" and job.parameters["precision"] == "nf4"
            rows, scores = [], []
            for task, metric in (("rca", "accuracy"), ("qa", "acc_norm")):
                row = {c: None for c in results.ENERGY_COLUMNS}
                row.update(config_id=job.config_id, phase="inference", model="tiny-random-llama",
                           precision=job.parameters["precision"],
                           adapter=job.parameters.get("adapter_name", "none"), pruning="none", task=task,
                           n_items=10, energy_kwh=1e-6, energy_kwh_std=0.0, energy_method="rapl")
                rows.append(row)
                scores.append({"config_id": job.config_id, "task": task, "metric": metric,
                               "value": 0.9 if best else 0.3, "ci_low": 0.0, "ci_high": 1.0, "n_items": 10})
            results.upsert_rows(out_dir, "energy", rows)
            results.upsert_rows(out_dir, "scores", scores)
        return {"ok": True, "error": "", "seconds": 0.0}

    monkeypatch.setattr(runner, "execute_job", fake_execute)
    monkeypatch.setenv(runner.PLAIN_KERNELS_ENV, "1")  # faked jobs start no kernel: no warm server either
    runner.run_study(params, out=tmp_path / "out")
    pruning = [k for k in order if k.startswith("pruning__")]
    assert pruning == ["pruning__tiny-random-llama__nf4__lora__magnitude-unstructured-50",
                       "pruning__tiny-random-llama__nf4__lora__wanda-2of4"]
    last_adapter = max(i for i, k in enumerate(order) if k.startswith("inference__") and k.endswith("__lora"))
    assert order.index(pruning[0]) > last_adapter and order[-1] == "ranking"
    assert not results.table_path(tmp_path / "out", "ranking").exists()  # the (faked) ranking job writes it
