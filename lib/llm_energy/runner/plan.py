"""What a study will run, before it runs: ``llm-energy plan PARAMS.yaml``.

The jobs the runner would expand, each precision's measured matmul throughput on this device (the
same probe the runner takes before its first job), the precisions skipped as too slow and why, and an
ESTIMATED time per job built from the work each job will compute (its data tokenised, the FLOPs its
windows will record) and what a finished study measured (:mod:`llm_energy.runner.estimate`). When the
total passes ``plan.budget_minutes`` it says what would fit (fewer items, precisions or windows) and
the 95% half-widths that leaves. It is a planning aid, not a measurement.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import Study, load_study
from ..layout import config_id_for
from ..measure import throughput
from .checks import with_context_exclusions
from .estimate import (
    BudgetOption,
    Calibration,
    Estimate,
    Estimator,
    fit_budget,
    packaged_calibration,
    scored_items,
)
from .study import STAGE, STAGES, expand, probed_precisions, resolve_device, slow_training_precisions
from .workload import StudyWork, study_work

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlannedJob:
    key: str
    phase: str
    precision: str
    model: str
    estimate: Estimate
    note: str = ""

    @property
    def estimate_s(self) -> float:
        return self.estimate.seconds


@dataclass(frozen=True)
class StudyPlan:
    study: Study
    device: str
    probe: dict[str, throughput.PrecisionThroughput]
    slow: dict[str, str]  # precision -> why the study skips it here
    jobs: list[PlannedJob]
    skipped: list[dict[str, str]]  # configs the runner would skip, with the reason
    calibration: Calibration
    work: StudyWork
    runner_s: float = 0.0  # the runner outside its jobs (probe, validation, report)
    worst_case_remeasure_s: float = 0.0
    options: list[BudgetOption] = field(default_factory=list)  # what fits the budget, when over it
    training_probe: dict[str, throughput.PrecisionThroughput] = field(default_factory=dict)  # fine-tuning's

    @property
    def total_s(self) -> float:
        return sum(j.estimate_s for j in self.jobs if not math.isnan(j.estimate_s)) + self.runner_s

    @property
    def budget_s(self) -> float | None:
        minutes = self.study.plan.budget_minutes
        return minutes * 60.0 if minutes is not None else None

    @property
    def over_budget(self) -> bool:
        return self.budget_s is not None and self.total_s > self.budget_s


def plan_study(params_path: str | Path, calibration: Calibration | None = None,
               probe: Mapping[str, throughput.PrecisionThroughput] | None = None) -> StudyPlan:
    """Expand the study as the runner would (nothing is written), with the probe and estimates.
    ``probe``: a throughput probe already taken (the runner's); else it is measured here, with the
    training probe of the fine-tuning precisions."""
    params_path = Path(params_path).resolve()
    study = load_study(params_path)
    study, _ = with_context_exclusions(study, params_path.parent)
    device = resolve_device(study)
    training_probe = None
    if probe is None:
        probe = throughput.probe_device(probed_precisions(study), device)
        training_probe, _ = slow_training_precisions(study, device)
    return plan_from_probe(study, params_path.parent, device, probe, calibration, training_probe)


def plan_from_probe(study: Study, base_dir: Path, device: str,
                    probe: Mapping[str, throughput.PrecisionThroughput],
                    calibration: Calibration | None = None,
                    training_probe: Mapping[str, throughput.PrecisionThroughput] | None = None) -> StudyPlan:
    """The plan of a validated study (context exclusions applied) with a probe in hand; fine-tuning
    precisions are held to device_limits.max_training_slowdown only with a ``training_probe``."""
    probe = dict(probe)
    calibration = calibration or packaged_calibration()
    slow = throughput.slow_precisions(probe, study.device_limits)
    training_probe = dict(training_probe or {})
    slow_training = throughput.slow_precisions(training_probe, study.device_limits, training=True)
    out_dir = Path.cwd() / "outputs" / study.study
    jobs, skipped = expand(study, out_dir, base_dir, device, "machine", slow, slow_training)
    work = study_work(study, base_dir)
    estimator = Estimator(study, work, {p: r.gflop_per_s for p, r in probe.items()}, calibration)
    unknown_note = {name: f"not estimated: {why}" for name, why in work.unknown.items()}
    planned: list[PlannedJob] = []
    for job in jobs:
        precision = str(job.parameters.get("precision", ""))
        model = (job.parameters.get("model") or {}).get("name", "")
        method = (job.parameters.get("pruning") or {}).get("method", "")
        note = unknown_note.get(model, "") if job.phase in ("inference", "finetune", "pruning") else ""
        planned.append(PlannedJob(job.key, job.phase, precision, model,
                                  estimator.job(job.phase, model, precision, method), note))
    # adapters and top-k pruning join the study once their inputs exist; the ranking stays last
    later = _later_jobs(study, skipped, estimator, unknown_note)
    ranking = [j for j in planned if j.phase == "ranking"]
    planned = [j for j in planned if j.phase != "ranking"] + later + ranking
    plan = StudyPlan(study=study, device=device, probe=probe, slow=slow, jobs=planned, skipped=skipped,
                     calibration=calibration, work=work,
                     # the runner's own time as recorded, plus the sustained canaries' burn if asked
                     runner_s=calibration.runner_s + (study.energy.sustained_burn_s
                                                      if study.energy.detect_disturbance else 0.0),
                     training_probe=training_probe,
                     worst_case_remeasure_s=estimator.worst_case_remeasure_s(
                         [(j.phase, j.estimate_s) for j in planned]))
    if plan.over_budget:
        assert plan.budget_s is not None
        options = fit_budget(study, calibration, [(j.phase, j.precision, j.estimate) for j in planned],
                             plan.runner_s, plan.budget_s, scored_items(work))
        plan = StudyPlan(**{**plan.__dict__, "options": options})
    return plan


def _later_jobs(study: Study, skipped: list[dict[str, str]], estimator: Estimator,
                unknown_note: dict[str, str]) -> list[PlannedJob]:
    """Jobs the runner adds once their inputs exist: each saved adapter evaluated, and pruning of the
    ranking's top configs when no targets are named (their precision is the ranking's to pick)."""
    later = []
    skipped_ids = {s["config_id"] for s in skipped}
    if "finetune" in study.phases and study.finetune is not None and "inference" in study.phases:
        chosen = study.finetune.models
        for model in [m for m in study.models if chosen is None or m.name in chosen]:
            for precision in study.finetune.precisions:
                config_id = config_id_for(model.name, precision, adapter="lora")
                if config_id not in skipped_ids:
                    stage = STAGE["adapters"]
                    note = unknown_note.get(model.name) or f"stage '{stage.name}': {stage.known}"
                    later.append(PlannedJob(f"inference__{config_id}", "inference", precision, model.name,
                                            estimator.job("inference", model.name, precision), note))
    if "pruning" in study.phases and study.pruning is not None and not study.pruning.targets:
        model = study.models[0].name
        for rank in range(1, study.pruning.top_k + 1):
            for method in study.pruning.methods:
                later.append(PlannedJob(f"pruning__<top {rank}>__{method.label}", "pruning", "?", model,
                                        estimator.job("pruning", model, "?", method.method),
                                        f"stage '{STAGE['top-k pruning'].name}': target "
                                        f"{STAGE['top-k pruning'].known}"))
    return later


def _duration(seconds: float) -> str:
    if math.isnan(seconds):
        return "unknown"
    if seconds < 90:
        return f"~{seconds:.0f} s"
    if seconds < 5400:
        return f"~{seconds / 60:.1f} min"
    return f"~{seconds / 3600:.1f} h"


def _percent(value: float) -> str:
    return "n/a" if math.isnan(value) else f"±{100 * value:.1f}%"


def budget_lines(plan: StudyPlan) -> list[str]:
    """The budget check: within it, or over it with what would fit and the half-widths that leaves."""
    if plan.budget_s is None:
        return ["plan.budget_minutes: null — no time budget."]
    minutes = plan.study.plan.budget_minutes
    if not plan.over_budget:
        return [f"Within plan.budget_minutes ({minutes:g} min)."]
    lines = [f"OVER plan.budget_minutes ({minutes:g} min) by {_duration(plan.total_s - plan.budget_s)}. "
             "What would fit (ESTIMATED; 95% half-widths: accuracy at p = 0.5 for the items, energy from the "
             f"windows' spread in {plan.calibration.source}):"]
    for option in plan.options:
        fits = "fits" if option.total_s <= plan.budget_s else "still over"
        accuracy = ", ".join(f"{task} ±{hw:.3f}" for task, hw in option.accuracy_half_width.items())
        energy = ", ".join(f"{task} {_percent(hw)}" for task, hw in option.energy_half_width.items())
        lines.append(f"  - {option.change}: {_duration(option.total_s)} ({fits}); accuracy {accuracy}; "
                     f"energy {energy}")
    if not any(option.total_s <= plan.budget_s for option in plan.options):
        lines.append("  - none of these fits: fewer models, less fine-tuning or pruning, or a faster machine")
    return lines


def budget_warning(plan: StudyPlan) -> str | None:
    """What ``llm-energy run`` says before starting when the estimate passes the budget (it runs anyway)."""
    if not plan.over_budget:
        return None
    head = (f"warning: study '{plan.study.study}' is ESTIMATED at {_duration(plan.total_s)} on this machine, "
            f"over plan.budget_minutes ({plan.study.plan.budget_minutes:g} min); running it anyway.")
    tail = "  (`llm-energy plan` shows the estimate per job; set plan.budget_minutes to silence this.)"
    return "\n".join([head, *budget_lines(plan)[1:], tail])


def _probe_lines(probe: Mapping[str, throughput.PrecisionThroughput]) -> list[str]:
    lines, ref = [], probe.get(throughput.REFERENCE)
    for precision, result in probe.items():
        if result.gflop_per_s is None:
            lines.append(f"  {precision:5s} not measured: {result.reason}")
            continue
        factor = throughput.slowdown(probe, precision)
        relative = ""
        if factor and precision != throughput.REFERENCE and ref:
            relative = (f" ({factor:.1f}x slower than fp32)" if factor >= 1
                        else f" ({1 / factor:.1f}x faster than fp32)")
        lines.append(f"  {precision:5s} {result.gflop_per_s:8.2f} GFLOP/s{relative}  [{result.method}]")
    return lines


def format_plan(plan: StudyPlan) -> str:
    """The plan as text for the terminal."""
    study, limits = plan.study, plan.study.device_limits
    lines = [f"study '{study.study}' on {plan.device}: {len(plan.jobs)} job(s)", "",
             (f"Measured matmul throughput on {throughput.device_words(plan.device)} "
              f"(best of {throughput.ROUNDS} short rounds; a shared machine reads lower):")]
    lines += _probe_lines(plan.probe)
    if plan.training_probe:
        lines += ["Fine-tuning's: a frozen layer's forward and input backward, as LoRA runs it:",
                  *_probe_lines(plan.training_probe)]
    lines.append("")
    if limits.max_slowdown is None:
        lines.append("device_limits.max_slowdown: null — every precision runs, however slow.")
    else:
        lines.append(f"device_limits.max_slowdown: {limits.max_slowdown:g} (always_run: "
                     f"{', '.join(limits.always_run) or 'none'})")
    if plan.training_probe:
        limit = limits.max_training_slowdown
        lines.append("device_limits.max_training_slowdown: "
                     + (f"{limit:g}" if limit is not None else "null — every fine-tuning precision runs"))
    for precision, reason in plan.slow.items():
        lines.append(f"  SKIPPED {reason}")
    other = [s for s in plan.skipped if s["precision"] not in plan.slow]
    for item in other:
        lines.append(f"  SKIPPED {item['config_id']}: {item['reason']}")
    if not plan.slow and not other:
        lines.append("  no precision skipped")
    lines += ["", "Stages, in order (each after the ones before it):"]
    lines += [f"  {i}. {stage.name}: {stage.runs} (known {stage.known})" for i, stage in enumerate(STAGES, 1)]
    lines += ["", *_work_lines(plan), "",
              ("Jobs, in run order, with an ESTIMATED time each: the work over each precision's probed rate "
               "times the efficiency it reached, plus a fixed overhead per job and its idle baselines, as "
               f"measured in {plan.calibration.source} (fp32 probe "
               f"{plan.calibration.reference_gflop_per_s:.0f} GFLOP/s there); a re-measured job counts "
               "again:")]
    for job in plan.jobs:
        notes = [job.note] if job.note else []
        notes += list(job.estimate.notes)
        note = f"  ({'; '.join(n for n in notes if n)})" if notes else ""
        lines.append(f"  {job.key:60s} {_duration(job.estimate_s):>10s}{note}")
    lines.append(f"  {'runner (probe, validation, report)':60s} {_duration(plan.runner_s):>10s}")
    unknown = sum(1 for j in plan.jobs if math.isnan(j.estimate_s))
    lines += ["", f"Estimated total: {_duration(plan.total_s)}"
              + (f" plus {unknown} job(s) not estimated" if unknown else "")
              + (f"; on a disturbed machine up to {_duration(plan.worst_case_remeasure_s)} more (windows and "
                 "jobs measured again)" if plan.worst_case_remeasure_s else "") + "."]
    lines += budget_lines(plan)
    return "\n".join(lines)


def _work_lines(plan: StudyPlan) -> list[str]:
    """Per model: its size and the useful work of one config's evaluation, from the tokenised data."""
    lines = ["Work per config (useful GFLOP, from the study's data tokenised by each model; "
             "measure/flops.py):"]
    for model in plan.work.models.values():
        tasks = ", ".join(f"{t.task} {t.items} items {t.gflop:.0f}" for t in model.tasks.values())
        train = (f"; fine-tuning {model.finetune.examples} examples x {model.finetune.epochs} epochs "
                 f"{model.finetune.epoch_gflop * model.finetune.epochs:.0f}" if model.finetune else "")
        lines.append(f"  {model.name} ({model.megaparameters:.0f}M weights): {tasks}{train}")
    for name, why in plan.work.unknown.items():
        lines.append(f"  {name}: not counted ({why})")
    return lines


Probe = Mapping[str, throughput.PrecisionThroughput]


def check_budget(study: Study, base_dir: Path, device: str, probe: Probe,
                 training_probe: Probe | None = None) -> dict[str, Any]:
    """The plan's estimate of the study, with the probe just taken; over plan.budget_minutes it warns
    on standard error, with what would fit, and the study runs anyway. Never raises: a study runs
    whether or not it could be estimated. Returns what provenance.json keeps of it."""
    try:
        plan = plan_from_probe(study, base_dir, device, probe, training_probe=training_probe)
    except Exception as exc:  # noqa: BLE001  (an estimate is advice; the study runs without it)
        log.warning("the plan's estimate failed (%s: %s); running the study without a time check",
                    type(exc).__name__, exc)
        return {"error": f"{type(exc).__name__}: {exc}"}
    warning = budget_warning(plan)
    if warning:
        print(warning, file=sys.stderr)

    def seconds(value: float) -> float | None:
        return None if math.isnan(value) else round(value, 1)

    return {"estimated_s": seconds(plan.total_s), "budget_minutes": study.plan.budget_minutes,
            "over_budget": plan.over_budget, "calibration": plan.calibration.source,
            "jobs": {j.key: seconds(j.estimate_s) for j in plan.jobs}}
