"""The inference phase for one config: load, score each task inside measured windows, record.

The notebook ``03_inference`` calls these functions step by step; the runner executes that notebook
once per model x precision.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import results
from .config import EnergySettings, GenerationParams, ModelSettings, TasksSettings, validate_section
from .data import TaskData, load_task_data
from .energy import EnergyMeter, IdleBaseline, RepeatedMeasurement
from .models import LoadedModel
from .scoring import TaskResult, evaluate

IDLE_FILE = "idle_baseline.json"


def config_id_for(model: str, precision: str, adapter: str = "none", pruning: str = "none") -> str:
    parts = [model, precision]
    if adapter != "none":
        parts.append(adapter)
    if pruning != "none":
        parts.append(pruning)
    return "__".join(parts)


def project_root(start: Path | None = None) -> Path:
    """The folder holding pyproject.toml above the working directory (notebooks run in notebooks/)."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "notebooks").is_dir():
            return folder
    return here


def resolve_study_dir(study_dir: str) -> Path:
    """Empty means outputs/notebook-defaults of the project, wherever the notebook runs from."""
    if not study_dir:
        return project_root() / "outputs" / "notebook-defaults"
    path = Path(study_dir).expanduser()
    return path if path.is_absolute() else (project_root() / path)


@dataclass(frozen=True)
class InferenceRun:
    """The validated parameters of one inference notebook run."""

    study_dir: Path
    config_id: str
    model: ModelSettings
    precision: str
    device: str
    tasks: TasksSettings
    energy: EnergySettings
    seed: int
    base_dir: Path

    @classmethod
    def from_parameters(cls, *, study_dir: str, config_id: str, model: dict[str, Any], precision: str,
                        device: str, tasks: dict[str, Any], energy: dict[str, Any], seed: int,
                        base_dir: str) -> "InferenceRun":
        from .config import PRECISIONS, StudyValidationError, Problem

        if precision not in PRECISIONS:
            raise StudyValidationError(
                [Problem("notebook parameters", None, "precision", f"{precision!r} is not one of {', '.join(PRECISIONS)}")]
            )
        model_settings = validate_section(ModelSettings, model, "model")
        return cls(
            study_dir=resolve_study_dir(study_dir),
            config_id=config_id or config_id_for(model_settings.name, precision),
            model=model_settings,
            precision=precision,
            device=device,
            tasks=validate_section(TasksSettings, tasks, "tasks"),
            energy=validate_section(EnergySettings, energy, "energy"),
            seed=seed,
            base_dir=Path(base_dir).expanduser().resolve() if base_dir else project_root(),
        )


def full_split(task: str, settings: Any, split: str, base_dir: Path) -> TaskData:
    """A whole split, ignoring the scoring sample size (training and calibration use their own)."""
    return load_task_data(task, settings.model_copy(update={"max_items": None}), split=split, base_dir=base_dir)


def load_task_sets(tasks: TasksSettings, base_dir: Path) -> dict[str, TaskData]:
    return {name: load_task_data(name, settings, base_dir=base_dir) for name, settings in tasks.enabled().items()}


def open_meter(study_dir: Path, settings: EnergySettings, device: str) -> EnergyMeter:
    """A meter carrying the study's idle baseline (measured now and saved if the study has none)."""
    meter = EnergyMeter(settings, device)
    path = results.tables_dir(study_dir) / IDLE_FILE
    if path.exists():
        saved = json.loads(path.read_text())
        meter.use_idle_baseline(IdleBaseline(saved["idle_power_w"], saved["idle_duration_s"], saved["idle_method"]))
    else:
        record_idle_baseline(study_dir, meter)
    return meter


def record_idle_baseline(study_dir: Path, meter: EnergyMeter) -> IdleBaseline:
    baseline = meter.measure_idle_baseline()
    results.atomic_write_json(results.tables_dir(study_dir) / IDLE_FILE, baseline.as_dict())
    if baseline.duration_s > 0:
        row = {column: None for column in results.ENERGY_COLUMNS}
        energy_kwh = baseline.power_w * baseline.duration_s / 3.6e6
        row.update(
            config_id="idle", phase="idle", model="none", precision="none", adapter="none", pruning="none",
            task="none", n_items=0, n_tokens=0, duration_s=baseline.duration_s, energy_kwh=energy_kwh,
            energy_net_kwh=0.0, cpu_energy_kwh=None, gpu_energy_kwh=None, ram_energy_kwh=None,
            emissions_kg=energy_kwh * meter.carbon_intensity_g_per_kwh() / 1000.0,
            energy_method=baseline.method, device=meter.device, repeats=1, energy_kwh_std=None,
        )
        row["idle_power_w"] = baseline.power_w
        results.upsert_rows(study_dir, "energy", [row])
    return baseline


def measure_task(loaded: LoadedModel, task: str, data: TaskData, meter: EnergyMeter,
                 prompt: str | None = None, seed: int = 0) -> tuple[TaskResult, RepeatedMeasurement]:
    """Score a task inside repeated measured windows (after a short unmeasured warm-up)."""
    warm = TaskData(task=data.task, source=data.source, split=data.split, items=data.items[:2], labels=data.labels)
    with warnings.catch_warnings():
        # bitsandbytes warns on every int8 matmul that inputs are cast; once is enough for the log.
        warnings.filterwarnings("ignore", message=".*inputs will be cast from.*")
        measurement = meter.measure_repeated(
            lambda: evaluate(task, loaded.model, loaded.tokenizer, data, prompt, progress=True, seed=seed),
            name=f"inference:{task}",
            warmup=lambda: evaluate(task, loaded.model, loaded.tokenizer, warm, prompt, seed=seed),
        )
    return measurement.result, measurement


def measure_generation(loaded: LoadedModel, data: TaskData, params: "GenerationParams", meter: EnergyMeter,
                       seed: int = 0) -> tuple[TaskResult, RepeatedMeasurement, Any]:
    """Write RCA resolutions at a fixed length inside measured windows, then score them outside."""
    from .generation import (CHAT_RESOLUTION_PROMPT, DEFAULT_RESOLUTION_PROMPT, Embedder, GenerationSpec,
                             generate_resolutions, score_resolutions)

    spec = GenerationSpec(new_tokens=params.new_tokens, max_items=None, batch_size=params.batch_size,
                          chat=params.chat, prompt=CHAT_RESOLUTION_PROMPT if params.chat else DEFAULT_RESOLUTION_PROMPT)
    items = list(data.items)[: params.max_items] if params.max_items else list(data.items)
    missing = [item.id for item in items if not item.resolution.strip()]
    if missing:
        raise ValueError(f"generation needs a reference 'resolution' on every rca item; missing on {missing[:3]}")
    measurement = meter.measure_repeated(
        lambda: generate_resolutions(loaded.model, loaded.tokenizer, items, spec),
        name="inference:rca_resolution",
        warmup=lambda: generate_resolutions(loaded.model, loaded.tokenizer, items[:1], spec),
    )
    output = measurement.result
    result = score_resolutions(items, output, Embedder(), seed=seed)
    return result, measurement, output


def record_task(run: InferenceRun, loaded: LoadedModel, result: TaskResult, measurement: RepeatedMeasurement,
                phase: str = "inference", adapter: str = "none", pruning: str = "none",
                generated_tokens: int = 0, sparsity: "Any | None" = None) -> None:
    """Write one task's energy, scores, per-item scores and per-repeat energy into the tables."""
    first = measurement.records[0]
    std = measurement.std("energy_kwh")
    energy_row = {
        "config_id": run.config_id, "phase": phase, "model": run.model.name, "precision": run.precision,
        "adapter": adapter, "pruning": pruning,
        "sparsity_pattern": sparsity.pattern if sparsity is not None else None,
        "target_sparsity": sparsity.target_sparsity if sparsity is not None else 0.0,
        "measured_sparsity": sparsity.measured_sparsity if sparsity is not None else None,
        "task": result.task, "n_items": result.n_items, "n_tokens": result.n_tokens,
        "duration_s": measurement.mean("duration_s"), "energy_kwh": measurement.mean("energy_kwh"),
        "energy_net_kwh": measurement.mean("energy_net_kwh"), "cpu_energy_kwh": measurement.mean("cpu_energy_kwh"),
        "gpu_energy_kwh": measurement.mean("gpu_energy_kwh"), "ram_energy_kwh": measurement.mean("ram_energy_kwh"),
        "emissions_kg": measurement.mean("emissions_kg"), "energy_method": first.energy_method,
        "device": loaded.device, "repeats": measurement.repeats, "energy_kwh_std": std,
        "cpu_method": first.cpu_method, "gpu_method": first.gpu_method, "ram_method": first.ram_method,
        "idle_power_w": first.idle_power_w, "duration_s_std": measurement.std("duration_s"),
        "energy_kwh_per_item": measurement.mean("energy_kwh") / max(result.n_items, 1),
        "energy_kwh_per_1k_tokens": measurement.mean("energy_kwh") * 1000 / max(result.n_tokens, 1),
        "energy_kwh_per_correct": _per_correct(measurement.mean("energy_kwh"), result),
        "compute_dtype": loaded.compute_dtype, "memory_bytes": loaded.memory_bytes,
        "n_generated_tokens": generated_tokens,
        "energy_kwh_per_1k_generated_tokens": (measurement.mean("energy_kwh") * 1000 / generated_tokens
                                               if generated_tokens else None),
    }
    results.upsert_rows(run.study_dir, "energy", [energy_row])
    score_rows = [
        {"config_id": run.config_id, "task": result.task, "metric": metric, "value": value,
         "ci_low": result.intervals[metric][0], "ci_high": result.intervals[metric][1], "n_items": result.n_items}
        for metric, value in result.metrics.items()
    ]
    results.upsert_rows(run.study_dir, "scores", score_rows)
    item_rows = [
        {"config_id": run.config_id, "task": result.task, "metric": metric, "item_id": item_id, "value": float(v)}
        for metric, values in result.per_item.items()
        for item_id, v in zip(result.item_ids, values)
    ]
    results.upsert_rows(run.study_dir, "item_scores", item_rows)
    repeat_rows = [
        {"config_id": run.config_id, "phase": phase, "task": result.task, "repeat": i + 1,
         "duration_s": r.duration_s, "energy_kwh": r.energy_kwh, "energy_net_kwh": r.energy_net_kwh,
         "n_items": result.n_items}
        for i, r in enumerate(measurement.records)
    ]
    results.upsert_rows(run.study_dir, "energy_repeats", repeat_rows)


PRIMARY_METRIC = {"rca": "accuracy", "qa": "acc"}


def _per_correct(energy_kwh: float, result: TaskResult) -> float:
    """Energy per correct answer under the task's primary metric (inf when none is correct)."""
    if result.task not in PRIMARY_METRIC:
        return float("nan")  # generation has no notion of a correct answer
    correct = result.metrics[PRIMARY_METRIC[result.task]] * result.n_items
    return energy_kwh / correct if correct > 0 else float("inf")


def record_config(study_dir: Path, config_id: str, model: str, precision: str, status: str, reason: str = "",
                  weights_origin: str = "", adapter: str = "none", pruning: str = "none", kernel: str = "",
                  kernel_note: str = "") -> None:
    results.upsert_rows(study_dir, "configs", [{
        "config_id": config_id, "model": model, "precision": precision, "adapter": adapter, "pruning": pruning,
        "status": status, "reason": reason, "weights_origin": weights_origin, "kernel": kernel,
        "kernel_note": kernel_note,
    }])


# --------------------------------------------------------------------------------------------------
# Fine-tuning and pruning phases (notebooks 02 and 04)


def record_training(study_dir: Path, config_id: str, model: str, precision: str, adapter: str, result: Any,
                    device: str, task: str) -> None:
    """Per-epoch rows into training.csv and one fine-tuning energy row (all epochs) into energy.csv."""
    import math

    rows = [{
        "config_id": config_id, "model": model, "precision": precision, "adapter": adapter, "epoch": e.epoch,
        "train_loss": e.train_loss, "eval_loss": e.eval_loss, "duration_s": e.duration_s, "energy_kwh": e.energy_kwh,
        "emissions_kg": e.emissions_kg, "energy_method": e.energy_method, "n_examples": e.n_examples,
        "n_tokens": e.n_tokens,
    } for e in result.epochs]
    results.upsert_rows(study_dir, "training", rows, replace_where={"config_id": config_id})
    energy = sum(e.energy_kwh for e in result.epochs)
    row = {column: None for column in results.ENERGY_COLUMNS}
    row.update(
        config_id=config_id, phase="finetune", model=model, precision=precision, adapter=adapter, pruning="none",
        target_sparsity=0.0, task=task, n_items=sum(e.n_examples for e in result.epochs),
        n_tokens=sum(e.n_tokens for e in result.epochs), duration_s=sum(e.duration_s for e in result.epochs),
        energy_kwh=energy, emissions_kg=sum(e.emissions_kg for e in result.epochs),
        energy_method=result.epochs[0].energy_method, device=device, repeats=1, energy_kwh_std=math.nan,
    )
    results.upsert_rows(study_dir, "energy", [row])


def prepare_pruned(run: InferenceRun, spec: Any, calibration: list[str]) -> tuple[LoadedModel, Any]:
    """Prune the dense weights, then load them at the run's precision (quantizing after pruning)."""
    from .models import load_model

    dense_precision = run.precision if run.precision in ("fp32", "bf16", "fp16") else "fp32"
    dense = load_model(run.model, dense_precision, run.device, base_dir=run.base_dir)
    from .prune import prune_model

    outcome = prune_model(dense.model, spec, calibration=calibration, tokenizer=dense.tokenizer)
    if dense_precision == run.precision:
        return dense, outcome
    # bitsandbytes quantizes at load time, so the pruned weights go through a folder first.
    folder = run.study_dir / "pruned" / run.config_id
    folder.mkdir(parents=True, exist_ok=True)
    dense.model.save_pretrained(folder, safe_serialization=True)
    dense.tokenizer.save_pretrained(folder)
    pruned_settings = run.model.model_copy(update={"source": "local", "path": str(folder)})
    quantized = load_model(pruned_settings, run.precision, run.device, base_dir=run.base_dir)
    origin = f"{dense.weights_origin}; pruned ({spec.label}) then quantized to {run.precision}"
    from dataclasses import replace as dc_replace

    return dc_replace(quantized, name=run.model.name, weights_origin=origin), outcome


def with_adapter(loaded: LoadedModel, model: Any, adapter_dir: str) -> LoadedModel:
    """The loaded base model with a LoRA adapter on it (same tokenizer, precision and device)."""
    from dataclasses import replace as dc_replace

    return dc_replace(loaded, model=model, weights_origin=f"{loaded.weights_origin}; LoRA adapter {adapter_dir}")


def replace_config_id(run: InferenceRun, config_id: str) -> InferenceRun:
    from dataclasses import replace as dc_replace

    return dc_replace(run, config_id=config_id)


def finetune_spec(params: Any) -> Any:
    """The library's FinetuneSpec from the study's validated `finetune` section."""
    from .finetune import FinetuneSpec

    return FinetuneSpec(
        rank=params.rank, alpha=params.alpha, dropout=params.dropout, target_modules=tuple(params.target_modules),
        learning_rate=params.learning_rate, epochs=params.epochs, batch_size=params.batch_size,
        max_length=params.max_length, max_train_items=params.max_train_items, max_eval_items=params.max_eval_items,
        seed=params.seed, task=params.task,
    )


@dataclass
class SparseExecution:
    """Which kernels a pruned config runs: ``kernel`` is "cusparselt" when any layer runs sparse."""

    kernel: str
    note: str
    converted: list[str]
    plan_rows: list[dict[str, Any]]


def sparse_execution(run: InferenceRun, loaded: LoadedModel, outcome: Any, mode: str = "auto",
                     token_counts: tuple[int, ...] = (256, 1024, 4096)) -> SparseExecution:
    """Route 2:4 layers through cuSPARSELt where a timing on this GPU says it is faster (see
    ``llm_energy.sparse``); say in one sentence why not everywhere else (CPU, other patterns,
    quantized precisions, ``off``)."""
    import torch

    from . import sparse

    nm = outcome.spec.nm
    if mode == "off":
        return SparseExecution("dense", "sparse kernels turned off (pruning.sparse_kernels: off)", [], [])
    if nm is None or (nm.kept, nm.group) != (2, 4):
        return SparseExecution("dense", f"pattern {outcome.spec.pattern} has no sparse tensor-core kernel "
                                        "(only 2:4 does): zeros are multiplied by dense kernels", [], [])
    if run.precision not in ("fp16", "bf16"):
        if run.precision in ("int8", "nf4", "fp4"):
            why = "bitsandbytes kernels are dense"
        else:
            why = "2:4 sparse kernels run fp16/bf16 only"
        return SparseExecution("dense", f"{run.precision}: {why}", [], [])
    dtype = torch.float16 if run.precision == "fp16" else torch.bfloat16
    reason = sparse.support_reason(loaded.device, dtype)
    if reason is not None:
        return SparseExecution("dense", reason, [], [])
    plans = sparse.plan(loaded.model, token_counts)
    total = sum(len(p.layers) for p in plans)
    rows = [{"config_id": run.config_id, **row} for row in sparse.plan_rows(plans)]
    need = max((p.min_tokens for p in plans if p.convert), default=0)
    if need:
        # A probe that takes the sparse path: rows of 256 random tokens, at least `need` in all.
        gen = torch.Generator(device=loaded.device).manual_seed(run.seed)
        vocab = loaded.model.get_input_embeddings().num_embeddings
        probe = torch.randint(0, vocab, (max(1, -(-need // 256)), 256), device=loaded.device, generator=gen)

        def forward() -> Any:
            with torch.inference_mode():
                return loaded.model(input_ids=probe, use_cache=False).logits[:, -8:]

        converted, check = sparse.convert_and_verify(loaded.model, plans, forward)
        if converted:
            note = (f"{len(converted)} of {total} 2:4 layers run cuSPARSELt (shapes measured faster sparse; "
                    f"dense below their crossover token count); {check.reason}")
            return SparseExecution("cusparselt", note, converted, rows)
        return SparseExecution("dense", f"sparse conversion refused, running dense: {check.reason}", [], rows)
    best = max((p.best_speedup for p in plans), default=0.0)
    return SparseExecution("dense", f"no layer shape ran faster sparse on this GPU at {', '.join(map(str, token_counts))} "
                                    f"tokens (best {best:.2f}x): all {total} layers run dense", [], rows)


def record_pruning(run: InferenceRun, loaded: LoadedModel, outcome: Any,
                   execution: SparseExecution | None = None) -> None:
    """Per-layer sparsity rows and the config's status, with where its weights came from and which
    kernels it runs."""
    rows = outcome.as_rows(run.config_id)
    for row in rows:  # text, so the CSV column reads back the same whatever other configs wrote
        row["verified_nm"] = {True: "yes", False: "no"}.get(row["verified_nm"], "not N:M")
    results.upsert_rows(run.study_dir, "pruning_layers", rows, replace_where={"config_id": run.config_id})
    if execution is not None and execution.plan_rows:
        results.upsert_rows(run.study_dir, "sparse_plan", execution.plan_rows, replace_where={"config_id": run.config_id})
    record_config(run.study_dir, run.config_id, run.model.name, run.precision, "ok",
                  weights_origin=loaded.weights_origin, pruning=outcome.spec.label,
                  kernel=execution.kernel if execution else "", kernel_note=execution.note if execution else "")


def evaluate_config(run: InferenceRun, loaded: LoadedModel, meter: EnergyMeter, phase: str = "inference",
                    adapter: str = "none", pruning: str = "none", sparsity: Any = None) -> list[dict[str, Any]]:
    """Every task of the study (and RCA resolutions when asked), measured and written to the tables;
    the same steps for base, fine-tuned and pruned configs so their rows compare."""
    summary = []
    task_sets = load_task_sets(run.tasks, run.base_dir)
    for name, task_data in task_sets.items():
        result, measurement = measure_task(loaded, name, task_data, meter, run.tasks.enabled()[name].prompt, run.seed)
        record_task(run, loaded, result, measurement, phase=phase, adapter=adapter, pruning=pruning, sparsity=sparsity)
        summary.append(_summary_row(result, measurement))
    rca = run.tasks.rca
    if rca is not None and rca.generation is not None and "rca" in task_sets:
        result, measurement, output = measure_generation(loaded, task_sets["rca"], rca.generation, meter, run.seed)
        record_task(run, loaded, result, measurement, phase=phase, adapter=adapter, pruning=pruning,
                    sparsity=sparsity, generated_tokens=output.n_new_tokens)
        summary.append(_summary_row(result, measurement))
    return summary


def _summary_row(result: TaskResult, measurement: RepeatedMeasurement) -> dict[str, Any]:
    return {"task": result.task, "n_items": result.n_items, **result.metrics,
            "energy_kwh": measurement.mean("energy_kwh"), "energy_kwh_std": measurement.std("energy_kwh"),
            "repeats": measurement.repeats, "method": measurement.records[0].energy_method}
