"""The rows the phases and the runner write into a study's tables, built in one place.

Each function takes typed results (a :class:`~llm_energy.methods.scoring.TaskResult`, a
:class:`~llm_energy.measure.meter.RepeatedMeasurement`, a fine-tuning result, a pruning result) and writes the
rows that DESIGN.md fixes, through :mod:`llm_energy.tables.store`. A phase never assembles a table row
itself, so the columns of a table are decided here and in ``results.TABLES`` only.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import CORRECTNESS_TASKS, headline_metric
from ..measure.hardware import job_hardware
from ..measure.meter import J_PER_KWH, EnergyRecord, IdleBaseline
from ..measure.throughput import ProbeRate
from . import store as results

if TYPE_CHECKING:
    from ..measure.meter import RepeatedMeasurement
    from ..methods.lora_training import FinetuneResult
    from ..methods.scoring import TaskResult
    from ..methods.sparsify import PruningResult



@dataclass(frozen=True)
class ConfigIdentity:
    """What names a config in every table."""

    config_id: str
    model: str
    precision: str
    adapter: str = "none"
    pruning: str = "none"


def record_config(study_dir: Path, config_id: str, model: str, precision: str, status: str, reason: str = "",
                  weights_origin: str = "", adapter: str = "none", pruning: str = "none", kernel: str = "",
                  kernel_note: str = "", scoring_path: str = "", data: str = "",
                  slurm_job_id: str | None = None, slurm_oversubscribe: str | None = None) -> None:
    """The config's row in configs.csv: ok, skipped or failed, why, where its weights came from, the
    kernels a pruned config runs, the path its multiple-choice scoring took and the data it was
    scored on (synthetic data says so), and the SLURM job it ran in: by default this process's
    (``SLURM_JOB_ID``, which a job's kernel inherits from its SLURM worker, and the OverSubscribe the
    runner read there, ``LLM_ENERGY_SLURM_OVERSUBSCRIBE``), both empty when not under SLURM."""
    if slurm_job_id is None:
        slurm_job_id = os.environ.get("SLURM_JOB_ID", "")
    if slurm_oversubscribe is None:
        slurm_oversubscribe = os.environ.get("LLM_ENERGY_SLURM_OVERSUBSCRIBE", "") if slurm_job_id else ""
    results.upsert_rows(study_dir, "configs", results.as_rows(results.ConfigRow(
        config_id=config_id, model=model, precision=precision, adapter=adapter, pruning=pruning,
        status=status, reason=reason, weights_origin=weights_origin, scoring_path=scoring_path, kernel=kernel,
        kernel_note=kernel_note, data=data, slurm_job_id=slurm_job_id,
        slurm_oversubscribe=slurm_oversubscribe)))


def record_idle_baselines(study_dir: Path, config_id: str, phase: str, device: str,
                          *baselines: IdleBaseline | None, drift: float | None = None,
                          max_drift: float | None = None) -> None:
    """The job's idle baselines (system, loaded; loaded_after with its ``drift`` against loaded, and
    ``drifted`` when it passes ``max_drift``), measured in its own process."""
    def drifted(b: IdleBaseline) -> bool | None:
        if b.kind != "loaded_after" or drift is None or max_drift is None or math.isnan(drift):
            return None
        return bool(abs(drift) > max_drift)

    hardware = job_hardware(device)  # where this job runs (its node under SLURM), the load average now
    results.upsert_rows(study_dir, "idle_baselines", results.as_rows(*(
        results.IdleRow(**hardware, config_id=config_id, phase=phase, kind=b.kind, power_w=b.power_w,
                        duration_s=b.duration_s, method=b.method, device=device, disturbance=b.disturbance,
                        idle_drift=drift if b.kind == "loaded_after" else None, drifted=drifted(b))
        for b in baselines if b is not None)))


ENERGY_FIELDS = ("cpu_method", "gpu_method", "ram_method", "estimated_components", "energy_scope",
                 "country_iso_code", "carbon_intensity_g_per_kwh")


def energy_fields(record: EnergyRecord) -> dict[str, Any]:
    """The columns every energy and training row carries about how its energy was obtained."""
    return {
        "cpu_method": record.cpu_method, "gpu_method": record.gpu_method, "ram_method": record.ram_method,
        "estimated_components": record.estimated_components, "energy_scope": record.scope,
        "country_iso_code": record.country_iso_code,
        "carbon_intensity_g_per_kwh": record.carbon_intensity_g_per_kwh,
    }


def record_task(study_dir: Path, config: ConfigIdentity, phase: str, result: TaskResult,
                measurement: RepeatedMeasurement, device: str, compute_description: str, memory_bytes: int,
                generated_tokens: int = 0, sparsity: PruningResult | None = None,
                idle_system_power_w: float | None = None, source: str = "", style: str = "",
                fewshot: Sequence[Any] = (), limit: ProbeRate | None = None) -> None:
    """One task's energy row, its scores, its per-item scores and its per-window energy. ``fewshot``:
    the worked examples every item was shown (scores.csv: how many, and their ids). ``limit``: the
    probed rate the windows' achieved GFLOP/s is set beside (``measurement.window_gflop``). A
    re-measured config x phase x task replaces all its rows in every one of these tables (fewer items
    or windows than before leave no stale rows behind)."""
    first = measurement.records[0]
    energy_kwh = measurement.total("energy_kwh")
    energy_net_kwh = measurement.total("energy_net_kwh")
    per_token = token_energy(result, energy_kwh, energy_net_kwh, generated_tokens)
    row = results.EnergyRow(
        config_id=config.config_id, phase=phase, model=config.model, precision=config.precision,
        adapter=config.adapter, pruning=config.pruning,
        sparsity_pattern=sparsity.pattern if sparsity is not None else None,
        target_sparsity=sparsity.target_sparsity if sparsity is not None else 0.0,
        measured_sparsity=sparsity.measured_sparsity if sparsity is not None else None,
        task=result.task, n_items=result.n_items, n_tokens=result.n_tokens,
        n_tokens_prompted=result.n_tokens_prompted if result.n_tokens_prompted is not None
        else result.n_tokens, duration_s=measurement.total("duration_s"), energy_kwh=energy_kwh,
        energy_net_kwh=energy_net_kwh, cpu_energy_kwh=measurement.total("cpu_energy_kwh"),
        gpu_energy_kwh=measurement.total("gpu_energy_kwh"),
        ram_energy_kwh=measurement.total("ram_energy_kwh"), emissions_kg=measurement.total("emissions_kg"),
        energy_method=first.energy_method, device=device, repeats=measurement.repeats,
        energy_kwh_std=measurement.std("energy_kwh"), energy_std_estimator=measurement.std_estimator,
        energy_kwh_se=measurement.se("energy_kwh"), net_at_or_below_idle=bool(energy_net_kwh <= 0),
        windows=measurement.windows, window_unit=measurement.unit, **energy_fields(first),
        idle_power_w=first.idle_power_w, idle_loaded_power_w=first.idle_power_w,
        idle_system_power_w=idle_system_power_w, duration_s_std=measurement.std("duration_s"),
        energy_kwh_per_item=energy_kwh / max(result.n_items, 1),
        energy_kwh_per_1k_tokens=energy_kwh * 1000 / max(result.n_tokens, 1),
        energy_kwh_per_correct=energy_per_correct(energy_kwh, result, style),
        compute_dtype=compute_description, memory_bytes=memory_bytes, n_generated_tokens=generated_tokens,
        energy_kwh_per_1k_generated_tokens=energy_kwh * 1000 / generated_tokens if generated_tokens else None,
        **per_token,
        canary_slowdown=measurement.worst("canary_slowdown"),
        canary_vs_study=measurement.worst("canary_vs_study"),
        foreign_cpu_share=measurement.worst("foreign_cpu_share"),
        steal_share=measurement.worst("steal_share"),
        foreign_gpu_processes=max(r.foreign_gpu_processes for r in measurement.records),
        contaminated=measurement.contaminated_windows > 0,
        contaminated_windows=measurement.contaminated_windows,
        remeasured_windows=measurement.remeasured_windows,
        rate_outlier_windows=sum(measurement.rate_outliers()),
        **limit_fields(measurement.gflop(), measurement.total("duration_s"), limit),
    )
    mine = {"config_id": config.config_id, "task": result.task}
    window_gflop = measurement.window_gflop if len(measurement.window_gflop) == measurement.windows else None
    results.upsert_rows(study_dir, "energy", results.as_rows(row))
    results.upsert_rows(study_dir, "scores", results.as_rows(*(
        results.ScoreRow(config_id=config.config_id, task=result.task, metric=metric, value=value,
                         ci_low=result.intervals[metric][0], ci_high=result.intervals[metric][1],
                         n_items=result.n_items, data=source, style=style, fewshot=len(fewshot),
                         fewshot_ids=" ".join(str(example.id) for example in fewshot))
        for metric, value in result.metrics.items())), replace_where=mine)
    results.upsert_rows(study_dir, "item_scores", results.as_rows(*(
        results.ItemScoreRow(config_id=config.config_id, task=result.task, metric=metric, item_id=item_id,
                             value=float(v))
        for metric, values in result.per_item.items()
        for item_id, v in zip(result.item_ids, values))), replace_where=mine)
    rates, outliers = measurement.rate_vs_median(), measurement.rate_outliers()
    results.upsert_rows(study_dir, "energy_repeats", results.as_rows(*(
        results.WindowRow(config_id=config.config_id, phase=phase, task=result.task, repeat=i + 1,
                          duration_s=r.duration_s, energy_kwh=r.energy_kwh, energy_net_kwh=r.energy_net_kwh,
                          n_items=measurement.window_items[i] if measurement.unit == "chunk"
                          else result.n_items, window_unit=measurement.unit, task_items=result.n_items,
                          canary_slowdown=r.canary_slowdown, canary_vs_study=r.canary_vs_study,
                          foreign_cpu_share=r.foreign_cpu_share,
                          steal_share=r.steal_share, foreign_gpu_processes=r.foreign_gpu_processes,
                          contaminated=r.contaminated, disturbance=r.disturbance, attempts=r.attempts,
                          rate_vs_median=rates[i], rate_outlier=outliers[i],
                          **window_limit(window_gflop[i] if window_gflop else None, r.duration_s, limit))
        for i, r in enumerate(measurement.records))), replace_where={**mine, "phase": phase})


def _finite(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def window_limit(gflop: float | None, duration_s: float, limit: ProbeRate | None) -> dict[str, Any]:
    """gflop, gflop_per_s and limit_share of one window (or a whole workload); empty when the work was
    not counted, limit_share empty without a probed rate."""
    gflop = _finite(gflop)
    rate = gflop / duration_s if gflop is not None and duration_s and duration_s > 0 else None
    share = limit.share(rate) if limit is not None else None
    return {"gflop": gflop, "gflop_per_s": rate, "limit_share": share}


def limit_fields(gflop: float | None, duration_s: float, limit: ProbeRate | None) -> dict[str, Any]:
    """An energy row's limit columns: its window columns, the probe's rate and whose probe it was."""
    return {**window_limit(gflop, duration_s, limit),
            "probe_gflop_per_s": limit.gflop_per_s if limit is not None else None,
            "limit_basis": limit.source if limit is not None else None}


OUTPUT_TOKEN_BASIS = "whole window / new tokens (prefill not split)"


def token_energy(result: TaskResult, energy_kwh: float, energy_net_kwh: float,
                 generated_tokens: int = 0) -> dict[str, Any]:
    """Energy per token in the field's units, gross and net of loaded idle: for a scoring window J per
    input token (prefill: the tokens as they ran, a shared few-shot prefix once); for a generation window
    J per output token, the whole window's energy over the new tokens (its prompts' prefill is not
    measured apart, which ``output_token_basis`` says)."""
    joules, net_joules = energy_kwh * J_PER_KWH, energy_net_kwh * J_PER_KWH
    if generated_tokens:
        return {"j_per_output_token": joules / generated_tokens,
                "j_per_output_token_net": net_joules / generated_tokens,
                "output_token_basis": OUTPUT_TOKEN_BASIS}
    tokens = max(result.n_tokens, 1)
    return {"j_per_input_token": joules / tokens, "j_per_input_token_net": net_joules / tokens}


def record_setup_steps(study_dir: Path, config: ConfigIdentity, steps: Sequence[tuple[str, EnergyRecord]],
                       device: str, notes: dict[str, str] | None = None) -> None:
    """What making a config cost, one row per measured setup step (setup_energy.csv): e.g. a pruned
    config's loading, Wanda calibration, pruning and re-quantization. A re-made config replaces its rows."""
    rows = results.as_rows(*(results.SetupRow(
        config_id=config.config_id, step=name, order=index, model=config.model, precision=config.precision,
        adapter=config.adapter, pruning=config.pruning, duration_s=record.duration_s,
        energy_kwh=record.energy_kwh, energy_net_kwh=record.energy_net_kwh, emissions_kg=record.emissions_kg,
        energy_method=record.energy_method, device=device,
        net_at_or_below_idle=bool(record.energy_net_kwh <= 0), note=(notes or {}).get(name, ""),
        **energy_fields(record),
    ) for index, (name, record) in enumerate(steps)))
    if rows:
        results.upsert_rows(study_dir, "setup_energy", rows, replace_where={"config_id": config.config_id})


def energy_per_correct(energy_kwh: float, result: TaskResult, style: str = "cloze") -> float:
    """Energy per correct answer under the task's headline metric (config.headline_metric: the same
    metric rho and the verdicts use; inf when none is correct, NaN for generation)."""
    if result.task not in CORRECTNESS_TASKS:
        return float("nan")  # generation has no notion of a correct answer
    correct = result.metrics[headline_metric(result.task, style)] * result.n_items
    return energy_kwh / correct if correct > 0 else float("inf")


def record_training(study_dir: Path, config: ConfigIdentity, result: FinetuneResult, device: str, task: str,
                    phase: str = "finetune", limit: ProbeRate | None = None) -> None:
    """Per-epoch rows into training.csv and one training energy row (all epochs) into energy.csv;
    ``phase`` is "finetune", or "recovery" for an adapter trained on a pruned model. ``limit``: the
    probed rate the epochs' achieved GFLOP/s (forward and backward) is set beside."""
    rows = results.as_rows(*(results.TrainingRow(
        phase=phase, config_id=config.config_id, model=config.model, precision=config.precision,
        adapter=config.adapter, epoch=e.epoch, train_loss=e.train_loss, eval_loss=e.eval_loss,
        duration_s=e.duration_s, energy_kwh=e.energy_kwh, emissions_kg=e.emissions_kg,
        energy_method=e.energy_method, n_examples=e.n_examples, n_tokens=e.n_tokens,
        energy_net_kwh=e.record.energy_net_kwh if e.record is not None else None,
        gflop=_finite(e.gflop), gflop_per_s=window_limit(e.gflop, e.duration_s, None)["gflop_per_s"],
        eval_duration_s=e.eval_record.duration_s if e.eval_record is not None else None,
        eval_energy_kwh=e.eval_record.energy_kwh if e.eval_record is not None else None,
        eval_energy_net_kwh=e.eval_record.energy_net_kwh if e.eval_record is not None else None,
        **(energy_fields(e.record) if e.record is not None else dict.fromkeys(ENERGY_FIELDS)),
    ) for e in result.epochs))
    results.upsert_rows(study_dir, "training", rows, replace_where={"config_id": config.config_id})
    record = result.epochs[0].record
    net = math.fsum(e.record.energy_net_kwh for e in result.epochs) if record is not None else None
    n_tokens = sum(e.n_tokens for e in result.epochs)
    row = results.EnergyRow(
        config_id=config.config_id, phase=phase, model=config.model, precision=config.precision,
        adapter=config.adapter, pruning=config.pruning, target_sparsity=0.0, task=task,
        n_items=sum(e.n_examples for e in result.epochs), n_tokens=n_tokens, n_tokens_prompted=n_tokens,
        duration_s=sum(e.duration_s for e in result.epochs),
        energy_kwh=sum(e.energy_kwh for e in result.epochs),
        emissions_kg=sum(e.emissions_kg for e in result.epochs), energy_method=result.epochs[0].energy_method,
        device=device, repeats=1, energy_kwh_std=math.nan, energy_net_kwh=net,
        net_at_or_below_idle=bool(net <= 0) if net is not None else None,
        **(energy_fields(record) if record is not None else {}),
        **limit_fields(math.fsum(e.gflop for e in result.epochs), sum(e.duration_s for e in result.epochs),
                       limit),
    )
    results.upsert_rows(study_dir, "energy", results.as_rows(row))


def record_pruned_layers(study_dir: Path, config_id: str, outcome: PruningResult,
                         plan_rows: list[dict[str, Any]] | None = None,
                         after: list[Any] | None = None) -> None:
    """Measured sparsity of every pruned layer (N:M verification as text), the same layers measured
    again after a round trip (quantization, or recovery training) when there was one, and the
    sparse-kernel plan."""
    rows = outcome.as_rows(config_id)
    checks = {c.name: c for c in after or []}
    for row in rows:  # text, so the CSV column reads back the same whatever other configs wrote
        row["verified_nm"] = _nm_text(row["verified_nm"])
        check = checks.get(row["layer"])
        row["measured_sparsity_after"] = check.measured_sparsity if check else None
        row["verified_nm_after"] = _nm_text(check.verified_nm) if check else None
    results.upsert_rows(study_dir, "pruning_layers", rows, replace_where={"config_id": config_id})
    if plan_rows:
        results.upsert_rows(study_dir, "sparse_plan", plan_rows, replace_where={"config_id": config_id})


def _nm_text(verified: bool | None) -> str:
    return {True: "yes", False: "no"}.get(verified, "not N:M")
