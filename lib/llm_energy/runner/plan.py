"""What a study will run, before it runs: ``llm-energy plan PARAMS.yaml``.

The jobs the runner would expand, each precision's measured matmul throughput on this device (the
same probe the runner takes before its first job), the precisions skipped as too slow and why, and an
ESTIMATED time per job: a fixed per-job overhead plus passes x items x seconds per item, the seconds
per item scaled from the probe's fp32-relative throughput and the model's parameter count
(:mod:`llm_energy.measure.throughput`). It is a planning aid, calibrated on one machine, not a measurement.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from ..config import BUILTIN_MODEL_PARAMETERS, TINY_LLAMA, ModelSettings, Study, load_study
from ..layout import config_id_for
from ..measure import throughput
from .study import STAGE, STAGES, expand, probed_precisions, resolve_device

# Parameter counts of the builtin models (the estimate's model size).
TINY_VOCABULARY = 32_000  # tokenizer of the random tiny Llama, for its embedding size


@dataclass(frozen=True)
class PlannedJob:
    key: str
    phase: str
    precision: str
    estimate_s: float  # NaN when unknown
    note: str = ""


@dataclass(frozen=True)
class StudyPlan:
    study: Study
    device: str
    probe: dict[str, throughput.PrecisionThroughput]
    slow: dict[str, str]  # precision -> why the study skips it here
    jobs: list[PlannedJob]
    skipped: list[dict[str, str]]  # configs the runner would skip, with the reason

    @property
    def total_s(self) -> float:
        return sum(j.estimate_s for j in self.jobs if not math.isnan(j.estimate_s))


def model_parameters(model: ModelSettings) -> float | None:
    """Approximate parameter count: builtin sizes, the tiny Llama's shape, or a size in the name
    or path ("...-360M", "1.7b"); None when unknown."""
    if BUILTIN_MODEL_PARAMETERS.get(model.name):
        return BUILTIN_MODEL_PARAMETERS[model.name]
    if model.name == TINY_LLAMA:
        t = model.tiny
        per_layer = 4 * t.hidden_size**2 + 3 * t.hidden_size * t.intermediate_size
        return float(t.num_hidden_layers * per_layer + 2 * TINY_VOCABULARY * t.hidden_size)
    for text in (model.name, model.path or ""):
        found = re.search(r"(\d+(?:\.\d+)?)\s*([mMbB])(?![a-zA-Z])", text)
        if found:
            return float(found.group(1)) * (1e6 if found.group(2).lower() == "m" else 1e9)
    return None


def _items(study: Study) -> tuple[dict[str, int], str]:
    """Items scored per task in one pass, and a note for tasks whose count is only known at run time."""
    items, unknown = {}, []
    for name, task in study.tasks.enabled().items():
        if task.max_items is None:
            unknown.append(name)
        else:
            items[name] = task.max_items
        if task.generation is not None and task.generation.max_items:
            items["rca_resolution"] = min(task.generation.max_items, task.max_items or task.generation.max_items)
    note = f"items of {', '.join(unknown)} not counted (max_items: null, known once the data is read)" if unknown else ""
    return items, note


def _passes(study: Study) -> float:
    """Measured passes over the items: the minimum repeats, plus the warm-up (two items)."""
    return study.energy.repeats + (0.05 if study.energy.warmup else 0.0)


def plan_study(params_path: str | Path) -> StudyPlan:
    """Expand the study as the runner would (nothing is written), with the probe and estimates."""
    params_path = Path(params_path).resolve()
    study = load_study(params_path)
    device = resolve_device(study)
    probe = throughput.probe_device(probed_precisions(study), device)
    slow = throughput.slow_precisions(probe, study.device_limits)
    out_dir = Path.cwd() / "outputs" / study.study
    jobs, skipped = expand(study, out_dir, params_path.parent, device, "machine", slow)
    items, items_note = _items(study)
    rate = {p: r.gflop_per_s for p, r in probe.items()}
    sizes = {m.name: model_parameters(m) for m in study.models}

    def inference_s(model: str, precision: str) -> float:
        return throughput.estimate_job_s(sizes.get(model), items, _passes(study), rate.get(precision))

    def training_s(model: str, precision: str, spec_items: int | None, epochs: int) -> float:
        if spec_items is None:
            return math.nan
        return throughput.estimate_job_s(sizes.get(model), {"train": spec_items}, epochs, rate.get(precision))

    planned: list[PlannedJob] = []
    for job in jobs:
        precision = str(job.parameters.get("precision", ""))
        model = (job.parameters.get("model") or {}).get("name", "")
        note = ""
        if job.phase == "inference":
            estimate, note = inference_s(model, precision), items_note
        elif job.phase == "finetune" and study.finetune is not None:
            estimate = training_s(model, precision, study.finetune.max_train_items, study.finetune.epochs)
            note = "" if study.finetune.max_train_items else "max_train_items: null, not estimated"
        elif job.phase == "pruning" and study.pruning is not None:
            estimate = inference_s(model, precision)
            recover = study.pruning.recover
            if recover is not None:
                estimate += training_s(model, precision, recover.max_train_items, recover.epochs) + inference_s(model, precision)
        else:  # data, ranking: no model work
            estimate = throughput.JOB_OVERHEAD_S
        planned.append(PlannedJob(job.key, job.phase, precision, estimate, note))
    planned += _later_jobs(study, slow, skipped, inference_s)
    return StudyPlan(study=study, device=device, probe=probe, slow=slow, jobs=planned, skipped=skipped)


def _later_jobs(study: Study, slow: dict[str, str], skipped: list[dict[str, str]], inference_s) -> list[PlannedJob]:
    """Jobs the runner adds once their inputs exist: each saved adapter evaluated, and pruning of the
    ranking's top configs when no targets are named (estimated at fp32: the target is not known yet)."""
    later = []
    skipped_ids = {s["config_id"] for s in skipped}
    if "finetune" in study.phases and study.finetune is not None and "inference" in study.phases:
        chosen = study.finetune.models
        for model in [m for m in study.models if chosen is None or m.name in chosen]:
            for precision in study.finetune.precisions:
                config_id = config_id_for(model.name, precision, adapter="lora")
                if config_id not in skipped_ids:
                    later.append(PlannedJob(f"inference__{config_id}", "inference", precision,
                                            inference_s(model.name, precision),
                                            f"stage '{STAGE['adapters'].name}': {STAGE['adapters'].known}"))
    if "pruning" in study.phases and study.pruning is not None and not study.pruning.targets:
        model = study.models[0].name
        for rank in range(1, study.pruning.top_k + 1):
            for method in study.pruning.methods:
                later.append(PlannedJob(f"pruning__<top {rank}>__{method.label}", "pruning", "?",
                                        inference_s(model, "fp32"),
                                        f"stage '{STAGE['top-k pruning'].name}': target {STAGE['top-k pruning'].known}; "
                                        "estimated at fp32"))
    return later


def _duration(seconds: float) -> str:
    if math.isnan(seconds):
        return "unknown"
    if seconds < 90:
        return f"~{seconds:.0f} s"
    if seconds < 5400:
        return f"~{seconds / 60:.0f} min"
    return f"~{seconds / 3600:.1f} h"


def format_plan(plan: StudyPlan) -> str:
    """The plan as text for the terminal."""
    study, limits = plan.study, plan.study.device_limits
    ref = plan.probe.get(throughput.REFERENCE)
    lines = [f"study '{study.study}' on {plan.device}: {len(plan.jobs)} job(s)", "",
             (f"Measured matmul throughput on {throughput.device_words(plan.device)} "
              f"(best of {throughput.ROUNDS} short rounds; a shared machine reads lower):")]
    for precision, result in plan.probe.items():
        if result.gflop_per_s is None:
            lines.append(f"  {precision:5s} not measured: {result.reason}")
            continue
        factor = throughput.slowdown(plan.probe, precision)
        relative = ""
        if factor and precision != throughput.REFERENCE and ref:
            relative = f" ({factor:.1f}x slower than fp32)" if factor >= 1 else f" ({1 / factor:.1f}x faster than fp32)"
        lines.append(f"  {precision:5s} {result.gflop_per_s:8.2f} GFLOP/s{relative}  [{result.method}]")
    lines.append("")
    if limits.max_slowdown is None:
        lines.append("device_limits.max_slowdown: null — every precision runs, however slow.")
    else:
        lines.append(f"device_limits.max_slowdown: {limits.max_slowdown:g} (always_run: "
                     f"{', '.join(limits.always_run) or 'none'})")
    for precision, reason in plan.slow.items():
        lines.append(f"  SKIPPED {reason}")
    other = [s for s in plan.skipped if s["precision"] not in plan.slow]
    for item in other:
        lines.append(f"  SKIPPED {item['config_id']}: {item['reason']}")
    if not plan.slow and not other:
        lines.append("  no precision skipped")
    lines += ["", "Stages, in order (each after the ones before it):"]
    lines += [f"  {i}. {stage.name}: {stage.runs} (known {stage.known})" for i, stage in enumerate(STAGES, 1)]
    lines += ["", ("Jobs, in run order, with an ESTIMATED time each (overhead + passes x items x seconds per "
                   "item scaled from the probe; calibrated on one CPU, expect 2-3x either way; a re-measured "
                   "job counts again):")]
    for job in plan.jobs:
        note = f"  ({job.note})" if job.note else ""
        lines.append(f"  {job.key:60s} {_duration(job.estimate_s):>10s}{note}")
    unknown = sum(1 for j in plan.jobs if math.isnan(j.estimate_s))
    lines += ["", f"Estimated total: {_duration(plan.total_s)}"
              + (f" plus {unknown} job(s) not estimated" if unknown else "")
              + f" (models: {', '.join(f'{m.name} ~{(model_parameters(m) or math.nan) / 1e6:.0f}M parameters' for m in study.models)})."]
    return "\n".join(lines)
