"""The study runner: validate, expand into configs, execute each phase notebook with papermill.

Each job (a phase, or a phase for one config) runs its notebook in a fresh kernel; the executed
notebook is kept under ``notebooks/`` of the output folder. A finished job leaves a marker in
``state/`` so a rerun resumes; a failing job is recorded in ``failures.json`` and the study goes on.
The runner imports no phase module: it passes parameters to notebooks and reads tables back.
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from ..analysis import ranking_math as rank
from ..config import (
    PruningTarget,
    Study,
    StudyValidationError,
    load_study,
    resolved_dict,
    section_dict,
    study_hash,
)
from ..layout import RECOVERED_SUFFIX, StudyLayout, config_id_for, done_seconds, project_root
from ..measure import throughput
from ..tables import store as results
from ..tables.rows import record_config
from .checks import data_problems, with_context_exclusions
from .jobs import Job, execute_job, preload_job_machinery, run_job
from .warm_kernels import WarmKernels, kernel_modules

log = logging.getLogger("llm_energy.runner.study")

PACKAGES = ("llm_energy", "torch", "transformers", "bitsandbytes", "codecarbon", "papermill", "accelerate",
            "numpy", "pandas", "matplotlib", "seaborn", "pydantic", "nbconvert", "gguf")


class StudyRunError(RuntimeError):
    """The run cannot start (an output-folder conflict); nothing was written."""


@dataclass
class StudyOutcome:
    out_dir: Path
    completed: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    report: Path | None = None
    remeasured: list[str] = field(default_factory=list)  # jobs run again for contaminated windows


@dataclass(frozen=True)
class Stage:
    """One stage of a study's job graph: its jobs run side by side (or in turn), after every job of the
    stages before it. ``known``: when its jobs become known."""

    name: str
    runs: str
    known: str


# The job graph's stages, in order: the one description that run_study follows, `llm-energy plan`
# notes its later jobs with, and the README quotes.
STAGES: tuple[Stage, ...] = (
    Stage("first", "data; every fine-tuning; every inference config", "from the parameters"),
    Stage("adapters", "inference of each adapter a fine-tuning saved; pruning of the named targets",
          "after its fine-tuning (an adapter that was saved)"),
    Stage("top-k pruning", "pruning (and recovery) of the ranking's top configs when no targets are named",
          "from the ranking of everything evaluated so far, adapters included"),
    Stage("re-measure", "each job whose windows stayed contaminated, again, whole (energy.on_contaminated: "
                        "remeasure)",
          "from energy.csv's contaminated_windows"),
    Stage("ranking", "the ranking notebook over every table", "always last: it reads every table"),
    Stage("report", "report.html from the executed ranking notebook", "after the ranking"),
)
STAGE = {stage.name: stage for stage in STAGES}


def display_path(path: Path) -> str:
    """A path as a user types it: relative to the working directory when under it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def resolve_device(study: Study) -> str:
    from ..models.loading import resolve_device as resolve

    return resolve(study.device)


def expand(study: Study, out_dir: Path, base_dir: Path, device: str,
           attribution: str = "machine", slow: Mapping[str, str] | None = None,
           slow_training: Mapping[str, str] | None = None) -> tuple[list[Job], list[dict[str, str]]]:
    """The jobs known before anything runs (data, fine-tuning, base inference, explicit pruning
    targets, ranking), in run order, and configs skipped because their precision cannot run here,
    or runs too slowly here (``slow``: precision -> measured reason, from :func:`slow_precisions`;
    fine-tuning also ``slow_training``, from :func:`slow_training_precisions`; a config already
    finished in this folder is kept). Adapter evaluation and top-k pruning are added by the runner
    once their inputs exist."""
    from ..models.loading import precision_support

    common = base_parameters(study, out_dir, base_dir, device, attribution)
    jobs: list[Job] = []
    skipped: list[dict[str, str]] = []
    if "data" in study.phases:
        jobs.append(Job("data", None, {**common, "model": study.models[0].model_dump(mode="json")}))

    def runnable(model: Any, precision: str, config_id: str, phase: str = "inference", adapter: str = "none",
                 pruning: str = "none") -> bool:
        reason = precision_support(precision, device)
        too_slow = {**(slow or {}), **((slow_training or {}) if phase == "finetune" else {})}
        if (not reason and precision in too_slow
                and not StudyLayout(out_dir).done_marker(f"{phase}__{config_id}").exists()):
            reason = too_slow[precision]
        if reason:
            skipped.append({"config_id": config_id, "model": model.name, "precision": precision,
                            "reason": reason, "adapter": adapter, "pruning": pruning})
        return reason is None

    if "finetune" in study.phases and study.finetune is not None:
        chosen = study.finetune.models
        for model in [m for m in study.models if chosen is None or m.name in chosen]:
            for precision in study.finetune.precisions:
                config_id = config_id_for(model.name, precision, adapter="lora")
                if runnable(model, precision, config_id, "finetune", adapter="lora"):
                    jobs.append(Job("finetune", config_id, {
                        **common, "config_id": config_id, "model": model.model_dump(mode="json"),
                        "adapter_name": "lora", "precision": precision,
                        "finetune": section_dict(study.finetune)}))
    if "inference" in study.phases:
        for model in study.models:
            for precision in study.precisions:
                config_id = config_id_for(model.name, precision)
                if runnable(model, precision, config_id):
                    jobs.append(inference_job(common, model.model_dump(mode="json"), precision, config_id))
    if "pruning" in study.phases and study.pruning is not None and study.pruning.targets:
        models = {m.name: m for m in study.models}
        for target in study.pruning.parsed_targets():
            jobs += [j for j in pruning_jobs(study, common, models[target.model].model_dump(mode="json"),
                                             target, out_dir)
                     if runnable(models[target.model], target.precision, j.config_id or "", "pruning",
                                 adapter=target.adapter, pruning=j.parameters["pruning_label"])]
    if "ranking" in study.phases:
        jobs.append(Job("ranking", None, {**common, "ranking": section_dict(study.ranking)}))
    return jobs, skipped


def probed_precisions(study: Study) -> list[str]:
    """Every precision a job of the study may load: inference, fine-tuning, named pruning targets."""
    wanted = list(study.precisions)
    if "finetune" in study.phases and study.finetune is not None:
        wanted += study.finetune.precisions
    if study.pruning is not None and study.pruning.targets:
        wanted += [t.precision for t in study.pruning.parsed_targets()]
    return list(dict.fromkeys(wanted))


def slow_precisions(study: Study,
                    device: str) -> tuple[dict[str, throughput.PrecisionThroughput], dict[str, str]]:
    """The device throughput probe of every precision the study loads, and those it skips as too
    slow here (study.device_limits), with the measured reason."""
    probe = throughput.probe_device(probed_precisions(study), device)
    return probe, throughput.slow_precisions(probe, study.device_limits)


def slow_training_precisions(study: Study, device: str) -> tuple[dict[str, throughput.PrecisionThroughput],
                                                                  dict[str, str]]:
    """The training probe (a frozen layer's forward and input backward, as LoRA runs it) of every
    precision the study fine-tunes at, and those fine-tuning skips as too slow here
    (study.device_limits.max_training_slowdown), with the measured reason; nothing without fine-tuning
    or that limit."""
    if "finetune" not in study.phases or study.finetune is None:
        return {}, {}
    if study.device_limits.max_training_slowdown is None:
        return {}, {}
    probe = throughput.probe_device(study.finetune.precisions, device, training=True)
    return probe, throughput.slow_precisions(probe, study.device_limits, training=True)


def base_parameters(study: Study, out_dir: Path, base_dir: Path, device: str,
                    attribution: str = "machine") -> dict[str, Any]:
    energy = {**study.energy.model_dump(mode="json"), "attribution": attribution}
    return {"study_dir": str(out_dir), "base_dir": str(base_dir), "seed": study.seed, "device": device,
            "tasks": study.tasks.model_dump(mode="json"), "energy": energy}


def energy_attribution(study: Study, cluster: str, device: str) -> str:
    """How each job's energy is attributed, decided once for the run (see EnergySettings.attribution).

    Sequentially every job has the machine to itself: "machine". A local cluster with one worker per
    GPU runs measured jobs side by side on one node: their CPU and RAM are shared, so "gpu_only". On
    SLURM a worker has its node to itself only with --exclusive (or on an exclusive partition); this is
    what the runner expects, and each job checks what its real SLURM job got before it is measured
    (scale.job_attribution: OverSubscribe=NO, or the job is charged its GPUs only, or refused on a CPU).
    Measured jobs sharing a CPU device cannot be told apart at all, so that is refused.
    """
    requested = study.energy.attribution
    shared = False
    if cluster == "local":
        from .scale import local_worker_count

        shared = local_worker_count(study, device) > 1
    elif cluster == "slurm":
        from .scale import exclusive_requested

        shared = not exclusive_requested(study.cluster.slurm)
    if shared and not device.startswith("cuda"):
        raise StudyRunError(
            "measured CPU jobs would share a node (" + ("cluster.local_workers > 1" if cluster == "local" else
            "SLURM without --exclusive in cluster.slurm.job_extra_directives, on a partition that is not "
            "OverSubscribe=EXCLUSIVE") + "): their CPU energy cannot be told apart. Use one worker, or give "
            "each SLURM worker its node (add --exclusive to cluster.slurm.job_extra_directives).")
    if requested == "machine" and shared:
        raise StudyRunError("energy.attribution: machine, but measured jobs share a node here: each job "
                            "would be charged the whole machine's CPU and RAM. Use attribution: auto or "
                            "gpu_only.")
    if requested == "auto":
        return "gpu_only" if shared else "machine"
    return requested


def inference_job(common: dict[str, Any], model: dict[str, Any], precision: str, config_id: str,
                  adapter: str = "", adapter_name: str = "none") -> Job:
    return Job("inference", config_id,
               {**common, "config_id": config_id, "model": model, "precision": precision,
                "adapter": adapter, "adapter_name": adapter_name})


def pruning_jobs(study: Study, common: dict[str, Any], model: dict[str, Any], target: PruningTarget,
                 out_dir: Path) -> list[Job]:
    """One job per pruning method on a target config; a fine-tuned target brings its adapter (merged
    into the weights before pruning)."""
    assert study.pruning is not None
    adapter_dir = ""
    if target.adapter != "none":
        adapter_dir = str(StudyLayout(out_dir).adapter(config_id_for(model["name"], target.precision,
                                                                     adapter=target.adapter)))
    jobs = []
    for method in study.pruning.methods:
        spec = study.pruning.spec(method, study.seed)
        config_id = config_id_for(model["name"], target.precision, adapter=target.adapter, pruning=spec.label)
        jobs.append(Job("pruning", config_id, {
            **common, "config_id": config_id, "model": model, "precision": target.precision,
            "pruning_label": spec.label, "pruning": section_dict(spec),
            "sparse_kernels": study.pruning.sparse_kernels, "adapter": adapter_dir,
            "adapter_name": target.adapter,
            "recover": section_dict(study.pruning.recover) if study.pruning.recover is not None else {},
        }))
    return jobs


def adapter_jobs(study: Study, common: dict[str, Any], out_dir: Path, finished: list[Job]) -> list[Job]:
    """Evaluate every adapter that a fine-tuning job saved, on its base model at its precision."""
    jobs = []
    for job in finished:
        adapter_dir = StudyLayout(out_dir).adapter(job.config_id or "")
        if job.phase == "finetune" and (adapter_dir / "adapter_model.safetensors").is_file():
            jobs.append(inference_job(common, job.parameters["model"], job.parameters["precision"],
                                      job.config_id or "", adapter=str(adapter_dir), adapter_name="lora"))
    return jobs


def study_out_dir(study: Study, out: str | Path | None) -> Path:
    """Where a run writes: --out, else outputs/<study> under the working directory."""
    return Path(out).resolve() if out else (Path.cwd() / "outputs" / study.study)


def planned_jobs(params_path: str | Path, out: str | Path | None = None) -> tuple[list[Job], str]:
    """Every job a run of this study into ``out`` would execute, in run order, with the parameters
    the runner gives it, and a note on jobs not known yet. Adapters are evaluated at the paths their
    fine-tuning saves them to; top-k pruning targets come from the ranking, so their jobs are listed
    only once ``out`` holds the evaluated configs (after a run, or a run's inference phase)."""
    params_path = Path(params_path).resolve()
    study, device, attribution = _validate(params_path, None, "none")
    out_dir = study_out_dir(study, out)
    jobs, _ = expand(study, out_dir, params_path.parent, device, attribution)
    common = base_parameters(study, out_dir, params_path.parent, device, attribution)
    first = [j for j in jobs if j.phase in ("data", "finetune", "inference")]
    adapters = [inference_job(common, j.parameters["model"], j.parameters["precision"], j.config_id or "",
                              adapter=str(StudyLayout(out_dir).adapter(j.config_id or "")),
                              adapter_name="lora")
                for j in first if j.phase == "finetune"]
    pruning = [j for j in jobs if j.phase == "pruning"]
    note = ""
    if "pruning" in study.phases and study.pruning is not None and not study.pruning.targets:
        try:
            targets = top_k_targets(study, out_dir)
        except (ValueError, KeyError, OSError):
            targets = []
        models = {m.name: m for m in study.models}
        pruning = [job for target in targets
                   for job in pruning_jobs(study, common, models[target.model].model_dump(mode="json"),
                                           target, out_dir)]
        if not targets:
            note = (f"pruning jobs (the top {study.pruning.top_k} configs of the ranking) are known once "
                    f"{out_dir} holds the evaluated configs: run the study (or its inference phase) there "
                    "first")
    return first + adapters + pruning + [j for j in jobs if j.phase == "ranking"], note


def top_k_targets(study: Study, out_dir: Path) -> list[PruningTarget]:
    """The best evaluated configs of the ranking at the study's w (fine-tuned ones included, pruned
    ones not), ranked from the tables as they are (ranking.csv is the ranking phase's to write)."""
    assert study.pruning is not None
    configs = rank.config_energy(results.read_table(out_dir, "energy"), study.ranking.energy_basis)
    if configs.empty:
        raise ValueError(f"{results.table_path(out_dir, 'energy')} has no inference rows to rank")
    qa_style = study.tasks.qa.style if study.tasks.qa is not None else "cloze"
    table = rank.rank_evaluations(configs, results.read_table(out_dir, "scores"), study.ranking,
                                  qa_style).table
    unpruned = table[table["pruning"] == "none"]
    at_w = unpruned[(unpruned["w"] - study.ranking.w).abs() < 1e-9].sort_values(["rank", "config_id"])
    return [PruningTarget(row.model, row.precision, row.adapter)
            for row in at_w.head(study.pruning.top_k).itertuples()]


def _git(args: list[str]) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=project_root(), capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except Exception:
        return None


def provenance(study: Study, device: str, params_path: Path) -> dict[str, Any]:
    import torch

    from ..measure.hardware import describe_cpu, describe_gpus, provenance_fields
    from ..measure.meter import nvml_available, rapl_available

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    # the machine the runner (and the throughput probe) ran on: CPU model and speed-deciding flags,
    # cores, governor and clock, load average at the start, memory; every GPU NVML sees
    machine = provenance_fields(describe_cpu(), describe_gpus())
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
        "hardware": {**machine, "gpu": gpu, "device": device,
                     "cuda": torch.version.cuda if torch.cuda.is_available() else None},
        "energy_methods_available": {
            "codecarbon": True, "rapl": rapl_available(), "nvml_counter": nvml_available() if gpu else False,
        },
        "device_resolved": {"requested": study.device, "used": device},
    }


def prepare_out_dir(study: Study, out_dir: Path, resume: bool, force: bool) -> None:
    """Refuse to mix results of different parameters; --no-resume needs --force to overwrite."""
    resolved = StudyLayout(out_dir).params_resolved
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
                f"{out_dir} was written with different parameters (hash {previous_hash}, now "
                f"{study_hash(study)}). Resuming would mix results. Use --out NEW_FOLDER, or --no-resume "
                "--force to start afresh."
            )


class _Run:
    """The state of one study run: which jobs finished, resumed or failed, and the progress bar."""

    def __init__(self, study: Study, layout: StudyLayout, device: str, resume: bool, phases: list[str] | None,
                 cluster: str, skipped: list[dict[str, str]], attribution: str):
        self.study, self.layout, self.device, self.attribution = study, layout, device, attribution
        self.resume, self.phases, self.cluster = resume, phases, cluster
        self.outcome = StudyOutcome(out_dir=layout.root, skipped=skipped)
        failures = layout.failures
        self.failures: list[dict[str, str]] = (json.loads(failures.read_text())
                                               if (resume and failures.exists()) else [])
        self.bar: Any = None
        self.warm: WarmKernels | None = None  # started before the first job run here

    def wants(self, phase: str) -> bool:
        return phase in self.study.phases and (not self.phases or phase in self.phases)

    def run_stage(self, stage: list[Job], again: bool = False) -> None:
        """Run jobs that do not depend on each other: here in turn, or spread over the cluster
        (``again``: even those finished before, as the re-measure stage does)."""
        todo = []
        for job in stage:
            if self.phases and job.phase not in self.phases:
                self.bar.update()
            elif (self.resume and not again and self.layout.done_marker(job.key).exists()
                  and job.phase != "ranking"):
                self.outcome.resumed.append(job.key)
                self.bar.update()
            else:
                todo.append(job)
        # On SLURM every job but the ranking (which reads the tables, here) runs in a SLURM job, even alone.
        here = len(todo) <= 1 if self.cluster == "local" else all(job.phase == "ranking" for job in todo)
        if self.cluster == "none" or here:
            finished = ((job, self._execute(job)) for job in todo)
        else:
            from .scale import run_on_cluster

            finished = run_on_cluster(todo, self.layout.root, self.cluster, self.study, self.device)
        for job, result in finished:
            self.settle(job, result, again)
            self.bar.update()

    def _execute(self, job: Job) -> dict[str, Any]:
        if self.warm is not None:  # its imports before this job's kernel starts, never beside a window
            self.warm.start()
        self.bar.set_postfix_str(f"{job.key} (log: {display_path(self.layout.log(job.key))})")
        return execute_job(job, self.layout.root)

    def settle(self, job: Job, result: dict[str, Any], again: bool = False) -> None:
        """A finished job leaves its done marker (a job run again in this study, ``again``, keeps its
        earlier runs' seconds there); a failed one its failure record and config row."""
        self.failures = [f for f in self.failures if f["job"] != job.key]
        if result["ok"]:
            marker = self.layout.done_marker(job.key)
            record: dict[str, Any] = {"seconds": result["seconds"]}
            earlier = done_seconds(marker) if again else []
            if earlier:  # run again by the re-measure stage: its first run's time stays on record
                record["earlier_runs_s"] = earlier
            marker.write_text(json.dumps(record))
            self.outcome.completed.append(job.key)
            return
        log.error("job %s failed: %s", job.key, result["error"])
        self.add_failure({"job": job.key, "config_id": job.config_id or "", "error": result["error"],
                          "notebook": str(self.layout.notebooks), "log": str(self.layout.log(job.key))})
        if job.config_id:
            record_config(self.layout.root, job.config_id, job.parameters.get("model", {}).get("name", ""),
                          job.parameters.get("precision", ""), "failed", result["error"],
                          adapter=job.parameters.get("adapter_name", "none"),
                          pruning=job.parameters.get("pruning_label", "none"),
                          slurm_job_id=result.get("slurm_job_id", ""),
                          slurm_oversubscribe=result.get("slurm_oversubscribe", ""))

    def add_failure(self, failure: dict[str, str]) -> None:
        self.failures.append(failure)
        self.save_failures()
        self.outcome.failed.append(failure)

    def save_failures(self) -> None:
        results.atomic_write_json(self.layout.failures, self.failures)


def run_study(params_path: str | Path, out: str | Path | None = None, resume: bool = True,
              force: bool = False, phases: list[str] | None = None, cluster: str = "none",
              before_jobs: Callable[..., dict[str, Any]] | None = None,
              ) -> StudyOutcome:
    """Validate, then run every job of the study; return what completed, resumed, was skipped or failed.
    ``before_jobs(study, base_dir, device, probe, training_probe)``: called once the throughput probes
    are taken, before the first job; what it returns is kept in provenance.json under "plan"."""
    from tqdm.auto import tqdm

    params_path = Path(params_path).resolve()
    study, device, attribution = _validate(params_path, phases, cluster)  # raises before anything is written
    out_dir = study_out_dir(study, out)
    if cluster == "slurm":
        check_slurm_run(study, out_dir)
    prepare_out_dir(study, out_dir, resume, force)
    layout = StudyLayout(out_dir)
    layout.state.mkdir(parents=True, exist_ok=True)
    if not any(m.source == "hub" for m in study.models):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in this study may reach a hub
    warm = start_warm_kernels(study, device, cluster, params_path.parent)
    try:
        prov = _write_parameters_and_provenance(study, layout, device, params_path)
        probe, slow = slow_precisions(study, device)  # before any job: each precision's speed on this device
        training_probe, slow_training = slow_training_precisions(study, device)
        if study.energy.detect_disturbance:  # the machine-speed canary every window is compared with
            import socket

            from ..measure.disturbance import (
                REFERENCE_ROUNDS,
                RUNNER_ENV,
                make_canary,
                sustained_canaries,
                write_study_canary,
            )
            from ..models.fourbit import canary_precision

            if study.energy.sustained_burn_s > 0:
                trained = study.finetune.precisions if study.finetune is not None else []
                kernels = {canary_precision(p, device) for p in [*study.precisions, *trained]}
                # the warm kernel server's imports (~10 s) and the runner's own for executing jobs (~1.5 s)
                # run beside the burn instead of after it; the burn lasts until both are done
                warm.begin()
                importing = preload_job_machinery()
                sustained = sustained_canaries(device, sorted(kernels), burn_s=study.energy.sustained_burn_s,
                                               busy=lambda: not warm.settled() or importing.is_alive())
                importing.join()
                # the study's start canary (canary_vs_study) is the fp32 one under sustained load too
                write_study_canary(layout.root, sustained["fp32"], sustained)
            else:
                write_study_canary(layout.root, make_canary(device)(REFERENCE_ROUNDS))
            # the runner (and its Dask scheduler) is the study's own harness: no window counts it as a
            # co-tenant
            os.environ[RUNNER_ENV] = f"{socket.gethostname()}:{os.getpid()}"
        prov["throughput"] = {"device": device, "precisions": {p: r.as_dict() for p, r in probe.items()},
                              "device_limits": study.device_limits.model_dump(mode="json"),
                              "skipped_as_slow": slow,
                              "training": {"precisions": {p: r.as_dict() for p, r in training_probe.items()},
                                           "skipped_as_slow": slow_training}}
        if before_jobs is not None:  # e.g. the plan's time check (cli: runner.plan.check_budget)
            prov["plan"] = before_jobs(study, params_path.parent, device, probe, training_probe)
        results.atomic_write_json(layout.provenance, prov)

        jobs, skipped = expand(study, out_dir, params_path.parent, device, attribution, slow, slow_training)
        _record_skipped(out_dir, skipped)
        run = _Run(study, layout, device, resume, phases, cluster, skipped, attribution)
        run.warm = warm
        run.bar = tqdm(total=len(jobs), desc=f"study {study.study}", unit="job")
        # the stages of STAGES, in its order
        first = [j for j in jobs if j.phase in ("data", "finetune", "inference")]
        run.run_stage(first)
        second = _second_stage(run, jobs, first, params_path.parent)
        run.bar.total = len(jobs) + len(second) - sum(1 for j in jobs if j.phase == "pruning")
        run.run_stage(second)
        third = _top_k_pruning_stage(run, params_path.parent)  # ranks everything evaluated, adapters included
        run.bar.total += len(third)
        run.run_stage(third)
        again = _remeasure_stage(run, first + second + third)
        if again:
            run.bar.total += len(again)
            run.run_stage(again, again=True)
        run.save_failures()
        run.run_stage([j for j in jobs if j.phase == "ranking"])  # reads every table, so it runs last
        run.bar.close()
        run.save_failures()
        run.outcome.report = _render_report_if_ranked(run)
        prov["warm_kernels"] = warm.summary()  # how many job kernels were forked, how many plain
        _finish_provenance(prov, layout, run)
        return run.outcome
    finally:
        warm.__exit__(None, None, None)


PLAIN_KERNELS_ENV = "LLM_ENERGY_PLAIN_KERNELS"  # "1": every job starts a plain kernel (no warm server)


def start_warm_kernels(study: Study, device: str, cluster: str, base_dir: Path) -> WarmKernels:
    """This study's warm kernel server (runner.warm_kernels), started when the first job runs here, for
    a CPU study whose jobs run in this process; a disabled one otherwise: jobs on a cluster (a Dask
    worker's own thread settings, SLURM's jobs), CUDA, or LLM_ENERGY_PLAIN_KERNELS=1."""
    from ..models.loading import weights_folder

    trained = study.finetune.precisions if study.finetune is not None else []

    def modules() -> list[str]:  # when the first job runs (a built-in model's folder may be prepared)
        folders = [f for f in (weights_folder(m, base_dir.resolve()) for m in study.models) if f]
        rca = study.tasks.rca
        data = {key: base_parameters(study, Path(), base_dir, device)[key] for key in ("tasks", "base_dir")}
        return kernel_modules([*study.precisions, *trained], folders,
                              embedder=rca is not None and rca.generation is not None, data=data)

    plain = os.environ.get(PLAIN_KERNELS_ENV) == "1"
    why = ("plain kernels asked for (LLM_ENERGY_PLAIN_KERNELS=1)" if plain
           else f"device {device}" if device != "cpu" else f"cluster {cluster}" if cluster != "none" else "")
    return WarmKernels(modules, enabled=not why,
                       note=f"not used: {why}" if why else "")


def _validate(params_path: Path, phases: list[str] | None, cluster: str) -> tuple[Study, str, str]:
    """The study, the device it runs on and how energy is attributed, or StudyRunError /
    StudyValidationError."""
    from ..models.loading import PrecisionUnsupported

    study = load_study(params_path)
    # records too long for a model's context, under invalid_records: skip, are left out by every job
    study, _ = with_context_exclusions(study, params_path.parent.resolve())
    problems = data_problems(study, params_path.parent.resolve())
    if problems:
        raise StudyValidationError(problems)
    if phases:
        unknown = [p for p in phases if p not in study.phases]
        if unknown:
            raise StudyRunError(f"--phases {unknown} are not phases of this study "
                                f"({', '.join(study.phases)})")
    if cluster not in ("none", "local", "slurm"):
        raise StudyRunError(f"--cluster must be none, local or slurm; got {cluster!r}")
    try:
        device = resolve_device(study)
    except PrecisionUnsupported as exc:  # e.g. device: cuda on a machine without a GPU
        raise StudyRunError(f"{params_path}: device: {exc}") from None
    if cluster == "slurm":
        from .scale import slurm_tools_problem

        problem = slurm_tools_problem()  # dask-jobqueue and sbatch & co., before asking SLURM anything
        if problem:
            raise StudyRunError(problem)
    return study, device, energy_attribution(study, cluster, device)


def check_slurm_run(study: Study, out_dir: Path) -> None:
    """Before anything is written or submitted on SLURM: SLURM accepts the worker job cluster.slurm
    describes (sbatch --test-only), and a node sees the output folder (a one-task srun), or
    StudyRunError saying what to do."""
    from .scale import out_dir_problem, worker_job_problem

    problem = worker_job_problem(study.cluster.slurm) or out_dir_problem(study.cluster.slurm, out_dir)
    if problem:
        raise StudyRunError(problem)


def _write_parameters_and_provenance(study: Study, layout: StudyLayout, device: str,
                                     params_path: Path) -> dict[str, Any]:
    resolved = resolved_dict(study)
    resolved["_meta"] = {"params_hash": study_hash(study), "source": str(params_path), "device_used": device}
    results.atomic_write_text(layout.params_resolved, yaml.safe_dump(resolved, sort_keys=False))
    prov = provenance(study, device, params_path)
    prov["started_at"] = dt.datetime.now(dt.timezone.utc).isoformat()
    results.atomic_write_json(layout.provenance, prov)
    return prov


def _record_skipped(out_dir: Path, skipped: list[dict[str, str]]) -> None:
    for item in skipped:
        log.warning("skipping %s: %s", item["config_id"], item["reason"])
        record_config(out_dir, item["config_id"], item["model"], item["precision"], "skipped", item["reason"],
                      adapter=item.get("adapter", "none"), pruning=item.get("pruning", "none"),
                      slurm_job_id="", slurm_oversubscribe="")  # decided here, in no SLURM job


def _second_stage(run: _Run, jobs: list[Job], first: list[Job], base_dir: Path) -> list[Job]:
    """Adapters the fine-tuning saved, and pruning of the targets the study names."""
    common = base_parameters(run.study, run.layout.root, base_dir, run.device, run.attribution)
    second = adapter_jobs(run.study, common, run.layout.root, [j for j in first if j.phase == "finetune"])
    return second + [j for j in jobs if j.phase == "pruning"]


def _top_k_pruning_stage(run: _Run, base_dir: Path) -> list[Job]:
    """Without named targets: pruning of the best configs of the ranking so far, which by now holds
    every evaluated config (base models and their adapters), so a fine-tuned config can be the one
    pruned."""
    study = run.study
    if not (run.wants("pruning") and study.pruning is not None and not study.pruning.targets):
        return []
    common = base_parameters(study, run.layout.root, base_dir, run.device, run.attribution)
    models = {m.name: m for m in study.models}
    try:
        targets = top_k_targets(study, run.layout.root)
    except ValueError as exc:  # nothing ranked: every inference config failed
        run.add_failure({"job": "pruning", "config_id": "", "error": f"no pruning targets: {exc}",
                         "notebook": "", "log": ""})
        return []
    log.info("pruning targets (top %d at w = %g): %s", study.pruning.top_k, study.ranking.w,
             ", ".join(config_id_for(t.model, t.precision, adapter=t.adapter) for t in targets))
    return [job for target in targets
            for job in pruning_jobs(study, common, models[target.model].model_dump(mode="json"), target,
                                    run.layout.root)]


def remeasure_candidates(energy: Any, jobs: list[Job]) -> dict[str, list[str]]:
    """Jobs whose configs kept contaminated windows (energy.csv ``contaminated_windows`` > 0), each with
    the configs that did: an inference job by its config, a pruning job by its pruned and recovered
    configs."""
    if energy is None or not len(energy) or "contaminated_windows" not in energy.columns:
        return {}
    flagged = energy[pd.to_numeric(energy["contaminated_windows"], errors="coerce").fillna(0) > 0]
    configs = set(flagged["config_id"].astype(str))
    out: dict[str, list[str]] = {}
    for job in jobs:
        if job.phase not in ("inference", "pruning") or not job.config_id:
            continue
        mine = ({job.config_id, f"{job.config_id}__{RECOVERED_SUFFIX}"} if job.phase == "pruning"
                else {job.config_id})
        hit = sorted(configs & mine)
        if hit:
            out[job.key] = hit
    return out


def _remeasure_stage(run: _Run, jobs: list[Job]) -> list[Job]:
    """The re-measure stage (``energy.on_contaminated: remeasure``): each job whose configs kept
    contaminated windows runs again, whole, once per study (state/remeasured.json remembers it, so a
    resumed study does not run it a third time): all its windows are replaced, never a choice of the
    clean repeat, which would bias the spread low; a disturbed stretch of minutes then does not land
    on one config. What the second run measured stands, flags included."""
    if run.study.energy.on_contaminated != "remeasure" or not run.study.energy.detect_disturbance:
        return []
    path = run.layout.state / "remeasured.json"
    done = json.loads(path.read_text()) if path.exists() else {}
    candidates = remeasure_candidates(results.read_table(run.layout.root, "energy"), jobs)
    todo = {key: configs for key, configs in candidates.items() if key not in done}
    if not todo:
        return []
    log.warning("measuring again, whole, at the end of the study (contaminated windows): %s",
                ", ".join(f"{k} ({', '.join(v)})" for k, v in todo.items()))
    done.update(todo)
    results.atomic_write_json(path, done)
    run.outcome.remeasured.extend(todo)
    return [job for job in jobs if job.key in todo]


def _render_report_if_ranked(run: _Run) -> Path | None:
    ranking_nb = run.layout.executed_notebook("ranking", None)
    if run.wants("ranking") and ranking_nb.exists() and not any(f["job"] == "ranking" for f in run.failures):
        from ..report.html import render_html

        return render_html(ranking_nb, run.layout.report)
    return None


def _finish_provenance(prov: dict[str, Any], layout: StudyLayout, run: _Run) -> None:
    prov["finished_at"] = dt.datetime.now(dt.timezone.utc).isoformat()
    idle = results.read_table(layout.root, "idle_baselines")
    if len(idle):  # each job's own baselines, measured in its process: system and loaded idle
        prov["idle_baselines"] = idle.astype(object).where(idle.notna(), None).to_dict(orient="records")
    remeasured = run.layout.state / "remeasured.json"
    prov["jobs"] = {"remeasured": json.loads(remeasured.read_text()) if remeasured.exists() else {},
                    "completed": run.outcome.completed, "resumed": run.outcome.resumed,
                    "failed": [f["job"] for f in run.failures], "skipped": run.outcome.skipped}
    results.atomic_write_json(layout.provenance, prov)


def render_report(study_dir: str | Path) -> Path:
    """Re-execute the ranking notebook over a study's saved tables and render report.html."""
    layout = StudyLayout(Path(study_dir).resolve())
    if not layout.params_resolved.exists():
        raise StudyRunError(f"{layout.root} is not a study output folder (no params.resolved.yaml)")
    data = yaml.safe_load(layout.params_resolved.read_text())
    job = Job("ranking", None, {"study_dir": str(layout.root), "ranking": data.get("ranking", {})})
    run_job(job, layout.root)
    from ..report.html import render_html

    return render_html(layout.executed_notebook("ranking", None), layout.report)
