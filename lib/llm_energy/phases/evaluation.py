"""What every config job shares: its validated parameters, its data, its meter, and the measured
evaluation that inference, adapters and pruned models all go through, so their rows compare.

The phase modules (:mod:`~llm_energy.phases.finetune`, :mod:`~llm_energy.phases.inference`,
:mod:`~llm_energy.phases.pruning`) build on this; the runner does not import it.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..config import (
    PRECISIONS,
    EnergySettings,
    GenerationParams,
    ModelSettings,
    Problem,
    StudyValidationError,
    TaskSettings,
    TasksSettings,
    validate_section,
)
from ..data.tasks import load_task_data, source_name
from ..items import TaskData
from ..layout import StudyLayout, config_id_for, project_root, resolve_study_dir
from ..measure.disturbance import DisturbanceMonitor, Thresholds, read_study_canary, read_sustained_canaries
from ..measure.meter import EnergyMeter, IdleBaseline, RepeatedMeasurement, split_chunks
from ..measure.throughput import ProbeRate, probe_precision, study_probe_rate
from ..methods.generation import (
    Embedder,
    GenerationOutput,
    decode_generations,
    encode_prompts,
    generate_encoded,
    generation_gflop,
    score_resolutions,
    uses_chat,
)
from ..methods.scoring import (
    PreparedTask,
    TaskResult,
    prepare_task,
    score_prepared,
    scoring_gflop,
    task_result,
)
from ..models.fourbit import canary_precision
from ..models.loading import LoadedModel
from ..tables.rows import ConfigIdentity, record_idle_baselines, record_task
from . import reuse


@dataclass(frozen=True)
class ConfigRun:
    """The validated parameters of one config job (a fine-tuning, inference or pruning notebook run)."""

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
                        base_dir: str) -> "ConfigRun":
        """From a notebook's parameters cell: each section validated by the study file's rules."""
        if precision not in PRECISIONS:
            raise StudyValidationError(
                [Problem("notebook parameters", None, "precision",
                         f"{precision!r} is not one of {', '.join(PRECISIONS)}")]
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

    def with_config_id(self, config_id: str) -> "ConfigRun":
        return replace(self, config_id=config_id)

    def identity(self, adapter: str = "none", pruning: str = "none") -> ConfigIdentity:
        return ConfigIdentity(self.config_id, self.model.name, self.precision, adapter, pruning)


def full_split(task: str, settings: TaskSettings, split: str, base_dir: Path) -> TaskData:
    """A whole split, ignoring the scoring sample size (training and calibration use their own)."""
    return load_task_data(task, settings.model_copy(update={"max_items": None}), split=split,
                          base_dir=base_dir)


def training_splits(run: ConfigRun, task: str) -> tuple[TaskData, TaskData]:
    """A task's whole training and validation splits (what fine-tuning and recovery train on)."""
    settings = run.tasks.enabled()[task]
    return (full_split(task, settings, "train", run.base_dir),
            full_split(task, settings, "validation", run.base_dir))


def load_task_sets(tasks: TasksSettings, base_dir: Path) -> dict[str, TaskData]:
    """The scored items of every enabled task."""
    return {name: load_task_data(name, settings, base_dir=base_dir)
            for name, settings in tasks.enabled().items()}


def meter_for(run: ConfigRun, device: str) -> EnergyMeter:
    """A meter for this job's device, attributing energy as the study decided (``auto``: machine),
    with the disturbance witnesses around every window unless ``energy.detect_disturbance`` is false."""
    attribution = "machine" if run.energy.attribution == "auto" else run.energy.attribution
    return EnergyMeter(run.energy, device, attribution=attribution, monitor=disturbance_monitor(run, device))


def disturbance_monitor(run: ConfigRun, device: str) -> DisturbanceMonitor | None:
    """Machine speed against the job's and the study's start, co-tenants (and foreign GPU processes
    on the job's GPUs), steal."""
    if not run.energy.detect_disturbance:
        return None
    nvml, indices = None, []
    if device.startswith("cuda"):
        try:
            import pynvml

            from ..measure.meter import nvml_indices

            pynvml.nvmlInit()
            nvml, indices = pynvml, nvml_indices(device)
        except Exception:  # noqa: BLE001  (no NVML: foreign GPU processes not read)
            nvml, indices = None, []
    return DisturbanceMonitor(Thresholds.from_settings(run.energy), device, nvml=nvml, gpu_indices=indices,
                              study_canary_s=read_study_canary(run.study_dir),
                              precision=canary_precision(run.precision, device),
                              sustained=read_sustained_canaries(run.study_dir))


def record_idle_drift(run: ConfigRun, meter: EnergyMeter, phase: str, config_id: str | None = None) -> float:
    """Loaded idle measured again after the job's windows; its drift against the loaded idle before
    them goes to idle_baselines.csv (kind ``loaded_after``), flagged beyond ``energy.max_idle_drift``."""
    after, drift = meter.measure_idle_drift()
    if after.duration_s > 0:
        record_idle_baselines(run.study_dir, config_id or run.config_id, phase, meter.device, after,
                              drift=drift, max_drift=run.energy.max_idle_drift)
    return drift


def measure_system_idle(run: ConfigRun) -> IdleBaseline:
    """System idle in this job's process, before the model is loaded (a short-lived meter)."""
    with meter_for(run, run.device) as meter:
        return meter.measure_idle_baseline(kind="system")


def setup_meter(run: ConfigRun, system_idle: IdleBaseline | None = None) -> EnergyMeter:
    """A meter for the steps that make a config before it is evaluated (loading, calibration, pruning,
    re-quantization): no model is in memory yet, so net energy subtracts the system idle measured
    before. Use it as a context manager."""
    meter = meter_for(run, run.device)
    if system_idle is not None:
        meter.use_idle_baseline(system_idle)
    return meter


def open_meter(run: ConfigRun, device: str, system_idle: IdleBaseline | None = None,
               phase: str = "inference") -> EnergyMeter:
    """The job's meter, with the model already in memory: it measures loaded idle now (what net
    energy subtracts) and writes both of the job's baselines to idle_baselines.csv. Use it as a
    context manager, so that its trackers stop even when a cell fails."""
    meter = meter_for(run, device)
    try:
        if system_idle is not None:
            meter.use_idle_baseline(system_idle)
        loaded = meter.measure_idle_baseline(kind="loaded")
        record_idle_baselines(run.study_dir, run.config_id, phase, device, system_idle, loaded)
    except BaseException:
        meter.close()
        raise
    return meter


log = logging.getLogger(__name__)

WARMUP_NEW_TOKENS = 4  # tokens a generation warm-up writes (before the first window; never measured)


def counted_gflop(count: Callable[[], float]) -> float:
    """A window's useful GFLOP (measure/flops.py), or NaN for a model whose configuration does not
    describe a Llama-like decoder (its rows then leave gflop, gflop_per_s and limit_share empty)."""
    try:
        return count()
    except (AttributeError, TypeError, ValueError) as exc:
        log.warning("useful FLOPs not counted for this model (%s: %s): gflop and limit_share stay empty",
                    type(exc).__name__, exc)
        return math.nan


def probe_rate(run: ConfigRun, precision: str | None = None) -> ProbeRate:
    """The matmul rate a job's windows are set beside (``limit_share``): the study's throughput
    probe for its precision (provenance.json, measured by the runner before the first job), or, for
    a notebook run alone (no study probe), this precision probed here, briefly (about half a second),
    before any window. The runner's probe ran on the runner's machine: a job elsewhere (SLURM) is set
    beside that machine's rate."""
    precision = precision or run.precision
    provenance = StudyLayout(run.study_dir).provenance
    if provenance.exists():
        probe = json.loads(provenance.read_text()).get("throughput") or {}
        rate = study_probe_rate(probe, precision, run.device)
        if rate is not None:
            return rate
    result = _job_probe(precision, run.device)
    if result.gflop_per_s is None:
        return ProbeRate(None, f"not probed: {result.reason}")
    return ProbeRate(result.gflop_per_s, "probed in this job (no study probe)")


@functools.lru_cache(maxsize=None)
def _job_probe(precision: str, device: str) -> Any:
    """Once per precision and device in a process (a pruning job evaluates two configs)."""
    return probe_precision(precision, device)


# per model object, the (task, style) pairs it has just scored outside any table (a reader's look at a
# few items, right before the phase's windows): their warm-up has run (mark_warm)
_WARMED: weakref.WeakKeyDictionary[Any, set[tuple[str, str]]] = weakref.WeakKeyDictionary()


def mark_warm(model: Any, task: str, style: str) -> None:
    """Items of ``task`` scored on ``model`` just now, unmeasured for the tables: the next
    :func:`measure_task` of that task and style on it needs no warm-up of its own."""
    try:
        _WARMED.setdefault(model, set()).add((task, style))
    except TypeError:  # not weak-referenceable: it warms up as usual
        pass


def _warmed(model: Any, task: str, style: str) -> bool:
    try:
        return (task, style) in _WARMED.get(model, set())
    except TypeError:
        return False


def measure_task(loaded: LoadedModel, task: str, data: TaskData, meter: EnergyMeter,
                 prompt: str | None = None, seed: int = 0, style: str = "cloze",
                 prepared: PreparedTask | None = None) -> tuple[TaskResult, RepeatedMeasurement]:
    """Score a task inside repeated measured windows (after a short unmeasured warm-up, unless the
    model has just scored items of the task: :func:`mark_warm`). The items are tokenised before the
    windows (or were, by an earlier job: ``prepared``) and the metrics computed after: a window holds
    forward passes only."""
    prepared = prepared or prepare_task(task, loaded.tokenizer, data, prompt, style)
    warm = replace(prepared, encoded=prepared.encoded[:2])
    warmup: Callable[[], Any] | None = (None if _warmed(loaded.model, task, prepared.style)
                                        else lambda: score_prepared(loaded.model, loaded.tokenizer, warm))
    with warnings.catch_warnings():
        # bitsandbytes warns on every int8 matmul that inputs are cast; once is enough for the log.
        warnings.filterwarnings("ignore", message=".*inputs will be cast from.*")
        windows = meter.settings.windows
        if windows:
            chunks = split_chunks(len(prepared.encoded), windows)
            parts = [replace(prepared, encoded=tuple(prepared.encoded[i] for i in chunk)) for chunk in chunks]
            measurement = meter.measure_chunks(
                [lambda part=part: score_prepared(loaded.model, loaded.tokenizer, part) for part in parts],
                [len(chunk) for chunk in chunks], name=f"inference:{task}", warmup=warmup,
            )
            scores: list[Any] = [None] * len(prepared.encoded)
            for chunk, chunk_scores in zip(chunks, measurement.result):
                for index, score in zip(chunk, chunk_scores):
                    scores[index] = score
            work = [counted_gflop(lambda p=part, r=result: scoring_gflop(loaded.model.config, p.encoded, r))
                    for part, result in zip(parts, measurement.result)]
            return task_result(prepared, scores, seed=seed), replace(measurement, window_gflop=tuple(work))
        measurement = meter.measure_repeated(
            lambda: score_prepared(loaded.model, loaded.tokenizer, prepared),
            name=f"inference:{task}", warmup=warmup,
        )
    # every repeat runs the whole pass; the scores are the first's
    work = counted_gflop(lambda: scoring_gflop(loaded.model.config, prepared.encoded, measurement.result))
    measurement = replace(measurement, window_gflop=(work,) * measurement.windows)
    return task_result(prepared, measurement.result, seed=seed), measurement


def measure_generation(loaded: LoadedModel, data: TaskData, params: GenerationParams, meter: EnergyMeter,
                       seed: int = 0) -> tuple[TaskResult, RepeatedMeasurement, GenerationOutput]:
    """Write RCA resolutions at a fixed length inside measured windows; prompts are tokenised before,
    texts decoded and scored after."""
    items = list(data.items)[: params.max_items] if params.max_items else list(data.items)
    missing = [item.id for item in items if not item.resolution.strip()]
    if missing:
        raise ValueError("generation needs a reference 'resolution' on every rca item; missing on "
                         f"{missing[:3]}")
    encoded = encode_prompts(loaded.tokenizer, items, params)
    # the warm-up runs the prefill and a few decode steps (every kernel a window runs); the full
    # length would only repeat the decode step, outside any window
    warm = replace(encode_prompts(loaded.tokenizer, items[:1], params),
                   new_tokens=min(WARMUP_NEW_TOKENS, params.new_tokens))
    windows = meter.settings.windows
    if windows and len(encoded.batches) > 1:
        # one window per group of whole batches (a batch is the unit generation runs at)
        groups = split_chunks(len(encoded.batches), windows)
        parts = [replace(encoded, batches=tuple(encoded.batches[i] for i in group)) for group in groups]
        sizes = [sum(int(encoded.batches[i][0].shape[0]) for i in group) for group in groups]
        measurement = meter.measure_chunks(
            [lambda part=part: generate_encoded(loaded.model, part) for part in parts], sizes,
            name="inference:rca_resolution", warmup=lambda: generate_encoded(loaded.model, warm),
        )
        outputs: list[Any] = [None] * len(encoded.batches)
        for group, generated in zip(groups, measurement.result):
            for index, batch_output in zip(group, generated):
                outputs[index] = batch_output
        output = decode_generations(loaded.tokenizer, encoded, outputs)
        work = tuple(counted_gflop(lambda p=part: generation_gflop(loaded.model.config, p)) for part in parts)
    else:
        measurement = meter.measure_repeated(
            lambda: generate_encoded(loaded.model, encoded),
            name="inference:rca_resolution",
            warmup=lambda: generate_encoded(loaded.model, warm),
        )
        output = decode_generations(loaded.tokenizer, encoded, measurement.result)
        work = (counted_gflop(lambda: generation_gflop(loaded.model.config, encoded)),) * measurement.windows
    measurement = replace(measurement, window_gflop=work)
    result = score_resolutions(items, output, Embedder(), seed=seed)
    return result, measurement, output


def evaluate_config(run: ConfigRun, loaded: LoadedModel, meter: EnergyMeter, phase: str = "inference",
                    adapter: str = "none", pruning: str = "none",
                    sparsity: Any = None) -> list[dict[str, Any]]:
    """Every task of the study (and RCA resolutions when asked), measured and written to the tables;
    the same steps for base, fine-tuned and pruned configs so their rows compare."""
    summary = []
    identity = run.identity(adapter, pruning)
    limit = probe_rate(run)  # before any window

    def record(result: TaskResult, measurement: RepeatedMeasurement, source: str, style: str,
               generated_tokens: int = 0, fewshot: tuple[Any, ...] = ()) -> None:
        record_task(run.study_dir, identity, phase, result, measurement, loaded.device,
                    loaded.compute_description, loaded.memory_bytes, generated_tokens=generated_tokens,
                    sparsity=sparsity,
                    idle_system_power_w=meter.idle_system.power_w if meter.idle_system else None,
                    source=source, style=style, fewshot=fewshot, limit=limit)
        summary.append(summary_row(result, measurement))

    task_sets = load_task_sets(run.tasks, run.base_dir)
    for name, task_data in task_sets.items():
        settings = run.tasks.enabled()[name]
        prepared = reuse.prepared_task(run.study_dir, loaded, run.model, run.base_dir, name, task_data,
                                       settings.prompt, settings.style)
        record(*measure_task(loaded, name, task_data, meter, settings.prompt, run.seed, settings.style,
                             prepared),
               task_data.source, scoring_style(name, settings.style), fewshot=task_data.fewshot)
    rca = run.tasks.rca
    if rca is not None and rca.generation is not None and "rca" in task_sets:
        result, measurement, output = measure_generation(loaded, task_sets["rca"], rca.generation, meter,
                                                         run.seed)
        chat = "chat template" if uses_chat(rca.generation, loaded.tokenizer) else "plain prompt"
        record(result, measurement, task_sets["rca"].source, f"generation, {chat}", output.n_new_tokens)
    record_idle_drift(run, meter, phase, identity.config_id)
    return summary


def scoring_style(task: str, style: str) -> str:
    """scores.csv's `style`: how a task was scored (QA: "cloze" or "options"; RCA: "labels", each
    root cause's words scored; resolutions: "generation, chat template" or "generation, plain prompt")."""
    return style if task == "qa" else "labels"


def data_description(tasks: TasksSettings, base_dir: Path) -> str:
    """configs.csv's `data` column: each task's source ("synthetic" said as such) and QA style."""
    parts = []
    for name, settings in tasks.enabled().items():
        text = f"{name}: {source_name(name, settings, base_dir)}"
        shots = f", {settings.fewshot}-shot" if name == "qa" and settings.fewshot else ""
        parts.append(text + (f" ({settings.style}{shots})" if name == "qa" else ""))
    return "; ".join(parts)


def summary_row(result: TaskResult, measurement: RepeatedMeasurement) -> dict[str, Any]:
    """One line per task for the notebook's summary table."""
    return {"task": result.task, "n_items": result.n_items, **result.metrics,
            "energy_kwh": measurement.total("energy_kwh"), "energy_kwh_std": measurement.std("energy_kwh"),
            "repeats": measurement.repeats, "method": measurement.records[0].energy_method}
