"""The study runner: validate, expand into configs, execute each phase notebook with papermill.

Each job (a phase, or a phase for one config) runs its notebook in a fresh kernel; the executed
notebook is kept under ``notebooks/`` of the output folder. A finished job leaves a marker in
``state/`` so a rerun resumes; a failing job is recorded in ``failures.json`` and the study goes on.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from . import results
from .config import Study, load_study, resolved_dict, study_hash
from .inference import config_id_for, project_root, record_config

log = logging.getLogger("llm_energy.study")

NOTEBOOKS = {"data": "01_data.ipynb", "finetune": "02_finetune.ipynb", "inference": "03_inference.ipynb",
             "pruning": "04_pruning.ipynb", "ranking": "05_ranking.ipynb"}
PACKAGES = ("llm_energy", "torch", "transformers", "bitsandbytes", "codecarbon", "papermill", "accelerate",
            "numpy", "pandas", "matplotlib", "seaborn", "pydantic", "nbconvert", "gguf")


class StudyRunError(RuntimeError):
    """The run cannot start (an output-folder conflict); nothing was written."""


@dataclass(frozen=True)
class Job:
    phase: str
    config_id: str | None
    parameters: dict[str, Any]

    @property
    def key(self) -> str:
        return self.phase if self.config_id is None else f"{self.phase}__{self.config_id}"

    @property
    def notebook(self) -> str:
        return NOTEBOOKS[self.phase]


@dataclass
class StudyOutcome:
    out_dir: Path
    completed: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    report: Path | None = None


def notebooks_dir() -> Path:
    """The phase notebooks: the project's notebooks/ folder (installed editable from the repo)."""
    here = Path(__file__).resolve().parents[2] / "notebooks"
    if here.is_dir():
        return here
    return project_root() / "notebooks"


def resolve_device(study: Study) -> str:
    from .models import resolve_device as resolve

    return resolve(study.device)


def expand(study: Study, out_dir: Path, base_dir: Path, device: str) -> tuple[list[Job], list[dict[str, str]]]:
    """The jobs known before anything runs (data, fine-tuning, base inference, explicit pruning
    targets, ranking), in run order, and configs skipped because their precision cannot run here.
    Adapter evaluation and top-k pruning are added by the runner once their inputs exist."""
    from .models import precision_support

    common = base_parameters(study, out_dir, base_dir, device)
    jobs: list[Job] = []
    skipped: list[dict[str, str]] = []
    if "data" in study.phases:
        jobs.append(Job("data", None, {**common, "model": study.models[0].model_dump(mode="json")}))

    def runnable(model: Any, precision: str, config_id: str) -> bool:
        reason = precision_support(precision, device)
        if reason:
            skipped.append({"config_id": config_id, "model": model.name, "precision": precision, "reason": reason})
        return reason is None

    if "finetune" in study.phases and study.finetune is not None:
        for model in study.models:
            for precision in study.finetune.precisions:
                config_id = config_id_for(model.name, precision, adapter="lora")
                if runnable(model, precision, config_id):
                    jobs.append(Job("finetune", config_id, {
                        **common, "config_id": config_id, "model": model.model_dump(mode="json"), "adapter_name": "lora",
                        "precision": precision, "finetune": study.finetune.model_dump(mode="json")}))
    if "inference" in study.phases:
        for model in study.models:
            for precision in study.precisions:
                config_id = config_id_for(model.name, precision)
                if runnable(model, precision, config_id):
                    jobs.append(inference_job(common, model.model_dump(mode="json"), precision, config_id))
    if "pruning" in study.phases and study.pruning is not None and study.pruning.targets:
        models = {m.name: m for m in study.models}
        for target in study.pruning.targets:
            name, _, precision = target.partition(":")
            jobs += [j for j in pruning_jobs(study, common, models[name].model_dump(mode="json"), precision)
                     if runnable(models[name], precision, j.config_id or "")]
    if "ranking" in study.phases:
        jobs.append(Job("ranking", None, {**common, "ranking": study.ranking.model_dump(mode="json")}))
    return jobs, skipped


def base_parameters(study: Study, out_dir: Path, base_dir: Path, device: str) -> dict[str, Any]:
    return {"study_dir": str(out_dir), "base_dir": str(base_dir), "seed": study.seed, "device": device,
            "tasks": study.tasks.model_dump(mode="json"), "energy": study.energy.model_dump(mode="json")}


def inference_job(common: dict[str, Any], model: dict[str, Any], precision: str, config_id: str,
                  adapter: str = "", adapter_name: str = "none") -> Job:
    return Job("inference", config_id, {**common, "config_id": config_id, "model": model, "precision": precision,
                                        "adapter": adapter, "adapter_name": adapter_name})


def pruning_jobs(study: Study, common: dict[str, Any], model: dict[str, Any], precision: str) -> list[Job]:
    from .prune import PruningSpec

    assert study.pruning is not None
    jobs = []
    for method in study.pruning.methods:
        spec = PruningSpec(method=method.method, pattern=method.pattern, sparsity=method.sparsity)
        config_id = config_id_for(model["name"], precision, pruning=spec.label)
        jobs.append(Job("pruning", config_id, {
            **common, "config_id": config_id, "model": model, "precision": precision, "pruning_label": spec.label,
            "pruning": {"method": method.method, "pattern": method.pattern, "sparsity": method.sparsity,
                        "calibration_samples": study.pruning.calibration_samples,
                        "calibration_max_tokens": study.pruning.calibration_max_tokens,
                        "include": list(study.pruning.include), "seed": study.seed},
            "sparse_kernels": study.pruning.sparse_kernels,
        }))
    return jobs


def adapter_jobs(study: Study, common: dict[str, Any], out_dir: Path, finished: list[Job]) -> list[Job]:
    """Evaluate every adapter that a fine-tuning job saved, on its base model at its precision."""
    jobs = []
    for job in finished:
        adapter_dir = out_dir / "adapters" / (job.config_id or "")
        if job.phase == "finetune" and (adapter_dir / "adapter_model.safetensors").is_file():
            jobs.append(inference_job(common, job.parameters["model"], job.parameters["precision"],
                                      job.config_id or "", adapter=str(adapter_dir), adapter_name="lora"))
    return jobs


def top_k_targets(study: Study, out_dir: Path) -> list[tuple[str, str]]:
    """(model, precision) of the best base configs of the inference ranking at the study's w."""
    from .report import rank_study

    assert study.pruning is not None
    table = rank_study(out_dir, study.ranking).result.table
    base = table[(table["adapter"] == "none") & (table["pruning"] == "none")]
    at_w = base[(base["w"] - study.ranking.w).abs() < 1e-9].sort_values(["rank", "config_id"])
    return [(row.model, row.precision) for row in at_w.head(study.pruning.top_k).itertuples()]


def _git(args: list[str]) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=project_root(), capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except Exception:
        return None


def provenance(study: Study, device: str, params_path: Path) -> dict[str, Any]:
    import torch

    from .energy import nvml_available, rapl_available

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "study": study.study,
        "params_file": str(params_path),
        "params_hash": study_hash(study),
        "git_commit": _git(["rev-parse", "HEAD"]),
        "git_dirty": bool(_git(["status", "--porcelain"])),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": versions,
        "hardware": {"cpu": cpu, "cpu_count": os.cpu_count(), "gpu": gpu, "device": device,
                     "cuda": torch.version.cuda if torch.cuda.is_available() else None},
        "energy_methods_available": {
            "codecarbon": True, "rapl": rapl_available(), "nvml_counter": nvml_available() if gpu else False,
        },
        "device_resolved": {"requested": study.device, "used": device},
    }


def prepare_out_dir(study: Study, out_dir: Path, resume: bool, force: bool) -> None:
    """Refuse to mix results of different parameters; --no-resume needs --force to overwrite."""
    resolved = out_dir / "params.resolved.yaml"
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return
    if not resume:
        if not force:
            raise StudyRunError(
                f"{out_dir} already holds results; --no-resume would overwrite them. "
                "Pass --force to start afresh there, or choose another folder with --out."
            )
        shutil.rmtree(out_dir)
        return
    if resolved.exists():
        previous = yaml.safe_load(resolved.read_text()) or {}
        previous_hash = (previous.get("_meta") or {}).get("params_hash")
        if previous_hash and previous_hash != study_hash(study):
            raise StudyRunError(
                f"{out_dir} was written with different parameters (hash {previous_hash}, now {study_hash(study)}). "
                "Resuming would mix results. Use --out NEW_FOLDER, or --no-resume --force to start afresh."
            )


def _filter_parameters(notebook: Path, parameters: dict[str, Any]) -> dict[str, Any]:
    """Only the keys the notebook's parameters cell declares (papermill itself would just warn)."""
    import papermill

    declared = papermill.inspect_notebook(str(notebook))
    return {k: v for k, v in parameters.items() if k in declared}


def run_job(job: Job, out_dir: Path) -> None:
    import papermill

    notebook = notebooks_dir() / job.notebook
    executed = out_dir / "notebooks" / f"{Path(job.notebook).stem}__{job.config_id or 'study'}.ipynb"
    executed.parent.mkdir(parents=True, exist_ok=True)
    logs = out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / f"{job.key}.log", "w") as stdout:
        papermill.execute_notebook(
            str(notebook), str(executed), parameters=_filter_parameters(notebook, job.parameters),
            kernel_name="python3", progress_bar=False, log_output=False, stdout_file=stdout, stderr_file=stdout,
            cwd=str(notebook.parent),
        )


def execute_job(job: Job, out_dir: Path) -> dict[str, Any]:
    """Run one job and report, never raise: {'ok', 'error', 'seconds'} (also used on cluster workers)."""
    start = time.perf_counter()
    try:
        run_job(job, out_dir)
    except Exception as exc:  # one failing config must not stop the study
        return {"ok": False, "error": _short_error(exc), "seconds": time.perf_counter() - start}
    return {"ok": True, "error": "", "seconds": time.perf_counter() - start}


def run_study(params_path: str | Path, out: str | Path | None = None, resume: bool = True, force: bool = False,
              phases: list[str] | None = None, cluster: str = "none") -> StudyOutcome:
    """Validate, then run every job of the study; return what completed, resumed, was skipped or failed."""
    from tqdm.auto import tqdm

    params_path = Path(params_path).resolve()
    study = load_study(params_path)  # raises before anything is written
    if phases:
        unknown = [p for p in phases if p not in study.phases]
        if unknown:
            raise StudyRunError(f"--phases {unknown} are not phases of this study ({', '.join(study.phases)})")
    if cluster not in ("none", "local", "slurm"):
        raise StudyRunError(f"--cluster must be none, local or slurm; got {cluster!r}")
    from .models import PrecisionUnsupported

    try:
        device = resolve_device(study)
    except PrecisionUnsupported as exc:  # e.g. device: cuda on a machine without a GPU
        raise StudyRunError(f"{params_path}: device: {exc}") from None
    out_dir = Path(out).resolve() if out else (Path.cwd() / "outputs" / study.study)
    prepare_out_dir(study, out_dir, resume, force)
    out_dir.mkdir(parents=True, exist_ok=True)
    base_dir = params_path.parent
    if not any(m.source == "hub" for m in study.models):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in this study may reach a hub

    resolved = resolved_dict(study)
    resolved["_meta"] = {"params_hash": study_hash(study), "source": str(params_path), "device_used": device}
    results.atomic_write_text(out_dir / "params.resolved.yaml", yaml.safe_dump(resolved, sort_keys=False))
    prov = provenance(study, device, params_path)
    prov["started_at"] = dt.datetime.now(dt.timezone.utc).isoformat()
    results.atomic_write_json(out_dir / "provenance.json", prov)

    jobs, skipped = expand(study, out_dir, base_dir, device)
    for item in skipped:
        log.warning("skipping %s: %s", item["config_id"], item["reason"])
        record_config(out_dir, item["config_id"], item["model"], item["precision"], "skipped", item["reason"])
    outcome = StudyOutcome(out_dir=out_dir, skipped=skipped)
    state = out_dir / "state"
    state.mkdir(exist_ok=True)
    failures_path = out_dir / "failures.json"
    failures = json.loads(failures_path.read_text()) if (resume and failures_path.exists()) else []

    _ensure_idle_baseline(study, out_dir, device, resume)
    common = base_parameters(study, out_dir, base_dir, device)
    selected = (lambda job: job.phase in phases) if phases else (lambda job: True)

    def settle(job: Job, result: dict[str, Any]) -> None:
        nonlocal failures
        failures = [f for f in failures if f["job"] != job.key]
        if result["ok"]:
            (state / f"{job.key}.done").write_text(json.dumps({"seconds": result["seconds"]}))
            outcome.completed.append(job.key)
            return
        log.error("job %s failed: %s", job.key, result["error"])
        failures.append({"job": job.key, "config_id": job.config_id or "", "error": result["error"],
                         "notebook": str(out_dir / "notebooks"), "log": str(out_dir / "logs" / f"{job.key}.log")})
        if job.config_id:
            record_config(out_dir, job.config_id, job.parameters.get("model", {}).get("name", ""),
                          job.parameters.get("precision", ""), "failed", result["error"],
                          adapter=job.parameters.get("adapter_name", "none"),
                          pruning=job.parameters.get("pruning_label", "none"))
        results.atomic_write_json(failures_path, failures)
        outcome.failed.append(failures[-1])

    bar = tqdm(total=len(jobs), desc=f"study {study.study}", unit="job")

    def run_stage(stage: list[Job]) -> None:
        """Run jobs that do not depend on each other: here in turn, or spread over the cluster."""
        todo = []
        for job in stage:
            if not selected(job):
                bar.update()
            elif resume and (state / f"{job.key}.done").exists() and job.phase != "ranking":
                outcome.resumed.append(job.key)
                bar.update()
            else:
                todo.append(job)
        if cluster == "none" or len(todo) <= 1:
            for job in todo:
                bar.set_postfix_str(job.key)
                settle(job, execute_job(job, out_dir))
                bar.update()
            return
        from .scale import run_on_cluster

        for job, result in run_on_cluster(todo, out_dir, cluster, study, device):
            bar.set_postfix_str(job.key)
            settle(job, result)
            bar.update()

    # Stage 1: everything that needs nothing but the parameters.
    first = [j for j in jobs if j.phase in ("data", "finetune", "inference")]
    run_stage(first)
    # Stage 2: adapters the fine-tuning saved, and pruning of the best configs found so far.
    second = adapter_jobs(study, common, out_dir, [j for j in first if j.phase == "finetune"])
    second += [j for j in jobs if j.phase == "pruning"]
    wants_pruning = "pruning" in study.phases and (not phases or "pruning" in phases)
    if wants_pruning and study.pruning is not None and not study.pruning.targets:
        try:
            models = {m.name: m for m in study.models}
            for model, precision in top_k_targets(study, out_dir):
                second += pruning_jobs(study, common, models[model].model_dump(mode="json"), precision)
        except ValueError as exc:  # nothing ranked: every inference config failed
            failures.append({"job": "pruning", "config_id": "", "error": f"no pruning targets: {exc}",
                             "notebook": "", "log": ""})
            outcome.failed.append(failures[-1])
    bar.total = len(jobs) + len(second) - sum(1 for j in jobs if j.phase == "pruning")
    run_stage(second)
    # Stage 3: the ranking reads every table, so it runs last, here; the report lists failures.
    results.atomic_write_json(failures_path, failures)
    for job in [j for j in jobs if j.phase == "ranking"]:
        run_stage([job])
    bar.close()
    results.atomic_write_json(failures_path, failures)

    ranking_nb = out_dir / "notebooks" / "05_ranking__study.ipynb"
    if "ranking" in study.phases and (not phases or "ranking" in phases) and ranking_nb.exists() \
            and not any(f["job"] == "ranking" for f in failures):
        from .report import render_html

        outcome.report = render_html(ranking_nb, out_dir / "report.html")
    prov["finished_at"] = dt.datetime.now(dt.timezone.utc).isoformat()
    idle = results.tables_dir(out_dir) / "idle_baseline.json"
    if idle.exists():
        prov["idle_baseline"] = json.loads(idle.read_text())
    prov["jobs"] = {"completed": outcome.completed, "resumed": outcome.resumed, "failed": [f["job"] for f in failures],
                    "skipped": skipped}
    results.atomic_write_json(out_dir / "provenance.json", prov)
    return outcome


def _ensure_idle_baseline(study: Study, out_dir: Path, device: str, resume: bool) -> None:
    """One idle baseline per study run, measured before any job, shared by every notebook."""
    if "inference" not in study.phases:
        return
    path = results.tables_dir(out_dir) / "idle_baseline.json"
    if resume and path.exists():
        return
    from .energy import EnergyMeter
    from .inference import record_idle_baseline

    with EnergyMeter(study.energy, device) as meter:
        record_idle_baseline(out_dir, meter)


def _short_error(exc: BaseException) -> str:
    name = type(exc).__name__
    text = str(exc).strip()
    # papermill's errors carry the notebook traceback; keep the exception line.
    ename, evalue = getattr(exc, "ename", None), getattr(exc, "evalue", None)
    if ename:
        return f"{ename}: {evalue}"
    lines = [line for line in text.splitlines() if line.strip()]
    return f"{name}: {lines[-1] if lines else ''}" if lines else name + "\n" + "".join(traceback.format_exception_only(exc))


def render_report(study_dir: str | Path) -> Path:
    """Re-execute the ranking notebook over a study's saved tables and render report.html."""
    study_dir = Path(study_dir).resolve()
    resolved = study_dir / "params.resolved.yaml"
    if not resolved.exists():
        raise StudyRunError(f"{study_dir} is not a study output folder (no params.resolved.yaml)")
    data = yaml.safe_load(resolved.read_text())
    job = Job("ranking", None, {"study_dir": str(study_dir), "ranking": data.get("ranking", {})})
    run_job(job, study_dir)
    from .report import render_html

    return render_html(study_dir / "notebooks" / "05_ranking__study.ipynb", study_dir / "report.html")
