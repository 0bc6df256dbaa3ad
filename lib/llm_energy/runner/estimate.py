"""ESTIMATED wall time of a study's jobs on this machine, calibrated on a finished study, and what
fits a time budget (``llm-energy plan``; ``llm-energy run`` warns with it before starting).

Each job's time is built from the work it will compute (:mod:`llm_energy.runner.workload`, the same
FLOP count its windows record) and from what a finished study measured (:class:`Calibration`):

- measured windows and warm-ups: GFLOP / (the throughput probe's rate for the precision here x the
  efficiency that precision reached in the calibration study, for scoring or generation);
- fine-tuning: epochs x (training GFLOP / (rate x training efficiency) + the evaluation-loss forward);
- pruning: loading, calibrating (Wanda) and pruning, in seconds per million weights as measured, then
  the pruned config's evaluation (a top-k target is not known before the ranking: the mean of the
  study's inference configs);
- a fixed overhead per job (kernel start, imports, model load, scoring-layout probes, tokenising,
  window starts and stops, table writes): an intercept per phase plus seconds per million weights,
  fitted to the calibration study's time outside windows, in that machine's seconds (not scaled by
  the probe: a probe taken on a busy machine reads several times low, and would scale them with it);
- the idle baselines (IDLE_BASELINES_PER_JOB x energy.idle_seconds) and, with disturbance detection,
  the canary matmuls around every window (their FLOPs at the fp32 rate);
- the runner's own time (probe, validation, report), as measured.

A quiet machine is assumed: a disturbed window measured again, or a job the re-measure stage runs again
whole, comes on top (``worst_case_remeasure_s`` says how much at most).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..analysis.halfwidths import accuracy_half_width, energy_half_width
from ..config import Study
from ..layout import StudyLayout, done_seconds, project_root
from ..measure.disturbance import CANARY_CALLS, CANARY_ROUNDS, CANARY_SHAPE, REFERENCE_ROUNDS
from .workload import ModelWork, StudyWork

CALIBRATION_FILE = Path(__file__).with_name("plan_calibration.json")
# Idle baselines each config job measures (phases/evaluation.py): the system before the model is loaded,
# loaded before the windows, loaded again after them.
IDLE_BASELINES_PER_JOB = 3
CANARY_WARMUP_CALLS = 2  # per canary reading (measure/disturbance.make_canary)
KINDS: tuple[str, ...] = ("scoring", "generation", "training")


@dataclass(frozen=True)
class Calibration:
    """What a finished study measured, that the estimate scales from. Written by :func:`calibrate`."""

    source: str  # the study and machine it was measured on
    reference_gflop_per_s: float  # its fp32 probe
    efficiency: dict[str, dict[str, float]]  # kind -> precision -> achieved GFLOP/s over the probe's
    overhead_s: dict[str, tuple[float, float]]  # phase -> (s per job, s per million weights)
    load_s_per_mparam: float  # pruning's load step
    prune_s_per_mparam: dict[str, float]  # pruning method -> its prune step, per million decoder weights
    calibration_s_per_text_mparam: float  # Wanda's calibration forward, per text and million weights
    energy_spread: dict[str, float]  # task -> median relative spread of its windows' implied totals
    runner_s: float  # the runner outside its jobs: probe, validation, report

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Calibration":
        data = dict(data)
        data["overhead_s"] = {k: (float(v[0]), float(v[1])) for k, v in data["overhead_s"].items()}
        return cls(**data)

    def save(self, path: Path = CALIBRATION_FILE) -> None:
        path.write_text(json.dumps(self.as_dict(), indent=1, sort_keys=True) + "\n")

    def efficiency_of(self, kind: str, precision: str) -> tuple[float, str]:
        """The efficiency of a precision at a kind of work, or the median of the calibrated precisions'
        with a note when this one was not calibrated."""
        known = self.efficiency.get(kind, {})
        if precision in known:
            return known[precision], ""
        if not known and kind == "training":  # no training calibrated: scoring's
            return self.efficiency_of("scoring", precision)
        fallback = statistics.median(known.values()) if known else math.nan
        return fallback, f"{precision} {kind} not calibrated: the median of {', '.join(sorted(known))}"


def packaged_calibration() -> Calibration:
    """The calibration shipped with the package (from the default study; ``source`` says where)."""
    return Calibration.from_dict(json.loads(CALIBRATION_FILE.read_text()))


@dataclass(frozen=True)
class Estimate:
    """One job's estimated seconds: ``item_s`` grows with the items scored (windows and warm-ups),
    ``training_s`` with the examples trained on, ``fixed_s`` with neither."""

    fixed_s: float
    item_s: float
    training_s: float = 0.0
    notes: tuple[str, ...] = ()

    @property
    def seconds(self) -> float:
        return self.fixed_s + self.item_s + self.training_s

    def __add__(self, other: "Estimate") -> "Estimate":
        return Estimate(self.fixed_s + other.fixed_s, self.item_s + other.item_s,
                        self.training_s + other.training_s, tuple(dict.fromkeys(self.notes + other.notes)))


UNKNOWN = Estimate(math.nan, math.nan)


@dataclass
class Estimator:
    """Job estimates for one study on this device: its work, the probe's rates, a calibration."""

    study: Study
    work: StudyWork
    rates: dict[str, float | None]  # precision -> probe GFLOP/s here
    calibration: Calibration
    notes: list[str] = field(default_factory=list)

    def _seconds(self, gflop: float, kind: str, precision: str) -> tuple[float, tuple[str, ...]]:
        rate = self.rates.get(precision)
        if not rate:
            return math.nan, (f"{precision} has no measured rate here",)
        share, note = self.calibration.efficiency_of(kind, precision)
        return gflop / (rate * share), ((note,) if note else ())

    def _fixed(self, phase: str, model: ModelWork | None) -> float:
        intercept, per_mparam = self.calibration.overhead_s.get(phase, (0.0, 0.0))
        size = model.megaparameters if model is not None else 0.0
        idle = IDLE_BASELINES_PER_JOB * self.study.energy.idle_seconds if model is not None else 0.0
        return intercept + per_mparam * size + idle

    def canary_s(self, windows: int) -> float:
        """The disturbance canaries of a job with ``windows`` windows: the job's reference, then a
        reading at every window edge (back-to-back windows share one), at the fp32 rate."""
        rate = self.rates.get("fp32")
        if not self.study.energy.detect_disturbance or not rate:
            return 0.0
        m, k, n = CANARY_SHAPE
        call_s = 2.0 * m * k * n / (rate * 1e9)
        reading = CANARY_WARMUP_CALLS + CANARY_ROUNDS * CANARY_CALLS
        return call_s * (CANARY_WARMUP_CALLS + REFERENCE_ROUNDS * CANARY_CALLS + (windows + 1) * reading)

    def evaluation(self, model: ModelWork, precision: str) -> Estimate:
        """Every task's windows and warm-ups of one config."""
        item_s, notes = 0.0, ()
        for task in model.tasks.values():
            seconds, why = self._seconds(task.gflop + task.warmup_gflop, task.kind, precision)
            item_s += seconds
            notes += why
        windows = sum(len(t.window_gflop) * t.passes for t in model.tasks.values())
        return Estimate(self.canary_s(windows), item_s, 0.0, notes)

    def _training(self, work: Any, precision: str) -> Estimate:
        train_s, why = self._seconds(work.epochs * work.epoch_gflop, "training", precision)
        eval_s, why_eval = self._seconds(work.epochs * work.eval_gflop, "scoring", precision)
        return Estimate(self.canary_s(work.epochs), 0.0, train_s + eval_s, why + why_eval)

    def job(self, phase: str, model_name: str, precision: str, method: str = "") -> Estimate:
        """A job's estimate (NaN when its model's work or its precision's rate is unknown)."""
        if phase in ("data", "ranking"):
            return Estimate(self._fixed(phase, None), 0.0)
        model = self.work.models.get(model_name)
        if model is None:
            return UNKNOWN
        fixed = Estimate(self._fixed(phase, model), 0.0)
        if phase == "inference":
            return fixed + self.evaluation(model, precision)
        if phase == "finetune":
            return fixed + self._training(model.finetune, precision) if model.finetune else UNKNOWN
        if phase == "pruning":
            cal = self.calibration
            setup = cal.load_s_per_mparam * model.megaparameters
            prune = cal.prune_s_per_mparam.get(method)
            notes: tuple[str, ...] = ()
            if prune is None:
                prune = statistics.median(cal.prune_s_per_mparam.values()) if cal.prune_s_per_mparam else 0.0
                notes = (f"pruning by {method} not calibrated: the median of the others",)
            setup += prune * model.decoder_linear / 1e6
            if method == "wanda":
                setup += cal.calibration_s_per_text_mparam * model.calibration_texts * model.megaparameters
            total = fixed + Estimate(setup, 0.0, 0.0, notes)
            known = precision != "?"
            total = total + (self.evaluation(model, precision) if known else self.mean_evaluation(model))
            if model.recovery is not None:
                total = total + self._training(model.recovery, precision) + self.evaluation(model, precision)
            return total
        return UNKNOWN

    def mean_evaluation(self, model: ModelWork) -> Estimate:
        """A pruning target not known before the ranking: the mean evaluation over the study's precisions."""
        evaluations = (self.evaluation(model, p) for p in self.study.precisions)
        known = [e for e in evaluations if not math.isnan(e.seconds)]
        if not known:
            return UNKNOWN
        n = len(known)
        return Estimate(sum(e.fixed_s for e in known) / n, sum(e.item_s for e in known) / n, 0.0,
                        ("target picked by the ranking: the mean of the study's precisions",))

    def worst_case_remeasure_s(self, job_seconds: list[tuple[str, float]]) -> float:
        """At most, on a disturbed machine: every evaluation job's windows once more (window_attempts)
        and every evaluation job again whole (the re-measure stage)."""
        if not self.study.energy.detect_disturbance or self.study.energy.on_contaminated != "remeasure":
            return 0.0
        evaluations = [s for phase, s in job_seconds if phase in ("inference", "pruning")]
        return 2 * sum(s for s in evaluations if not math.isnan(s))


# --- what fits a budget ----------------------------------------------------------------------------


@dataclass(frozen=True)
class BudgetOption:
    """One way to fit a time budget: what changes, the resulting estimate, and the 95% half-widths
    it leaves (accuracy per task at its items, p = 0.5; energy per task at its windows)."""

    change: str
    total_s: float
    accuracy_half_width: dict[str, float]
    energy_half_width: dict[str, float]


def scored_items(work: StudyWork) -> dict[str, int]:
    """Items each accuracy task scores, as read from its data (the fewest over the models)."""
    items: dict[str, int] = {}
    for model in work.models.values():
        for task in model.tasks.values():
            if task.kind == "scoring":
                items[task.task] = min(items.get(task.task, task.items), task.items)
    return items


def half_widths(study: Study, calibration: Calibration, items: dict[str, int], scale: float = 1.0,
                windows: int | None = None) -> tuple[dict[str, float], dict[str, float]]:
    """The 95% half-widths a study's scoring reaches with its ``items`` (per task) scaled by ``scale``
    (accuracy at p = 0.5) and its energy with ``windows`` windows (default: the study's)."""
    accuracy = {task: accuracy_half_width(max(1, int(n * scale))) for task, n in items.items()}
    w = windows or study.energy.windows or max(1, min(study.energy.repeats, study.energy.max_repeats))
    energy = {task: energy_half_width(spread, w) for task, spread in calibration.energy_spread.items()}
    return accuracy, energy


def fit_budget(study: Study, calibration: Calibration, jobs: list[tuple[str, str, Estimate]],
               runner_s: float, budget_s: float, items_now: dict[str, int]) -> list[BudgetOption]:
    """Ways to bring the estimate under ``budget_s`` (``jobs``: phase, precision, estimate of each job;
    ``items_now``: items each accuracy task scores): fewer items (every scored task scaled alike),
    fewer precisions (the slowest first; fp32, the reference, stays), both, and what fewer windows
    would do."""
    known = [(phase, p, e) for phase, p, e in jobs if not math.isnan(e.seconds)]
    fixed = sum(e.fixed_s + e.training_s for _, _, e in known) + runner_s
    items = sum(e.item_s for _, _, e in known)
    options: list[BudgetOption] = []

    def items_option(fixed_s: float, item_s: float, prefix: str) -> BudgetOption | None:
        if item_s <= 0 or fixed_s >= budget_s:
            return None
        scale = min(1.0, (budget_s - fixed_s) / item_s)
        counts = {task: int(n * scale) for task, n in items_now.items()}
        if not counts or min(counts.values()) < 1:
            return None
        accuracy, energy = half_widths(study, calibration, items_now, scale)
        change = prefix + "items " + ", ".join(f"{task} {n} -> {counts[task]}"
                                               for task, n in items_now.items())
        return BudgetOption(change, fixed_s + scale * item_s, accuracy, energy)

    option = items_option(fixed, items, "")
    if option is not None:
        options.append(option)
    # precisions, the slowest first
    by_precision: dict[str, float] = {}
    for _, p, e in known:
        if p not in ("fp32", "?", ""):
            by_precision[p] = by_precision.get(p, 0.0) + e.seconds
    dropped: list[str] = []
    total = fixed + items
    for precision, seconds in sorted(by_precision.items(), key=lambda kv: -kv[1]):
        if total <= budget_s:
            break
        dropped.append(precision)
        total -= seconds
    if dropped:
        accuracy, energy = half_widths(study, calibration, items_now)
        options.append(BudgetOption(f"precisions without {', '.join(dropped)}", total, accuracy, energy))
        if total > budget_s:
            rest = [(ph, p, e) for ph, p, e in known if p not in dropped]
            both = items_option(sum(e.fixed_s + e.training_s for _, _, e in rest) + runner_s,
                                sum(e.item_s for _, _, e in rest),
                                f"precisions without {', '.join(dropped)}; ")
            if both is not None:
                options.append(both)
    if study.energy.windows and study.energy.windows > 2:
        accuracy, energy = half_widths(study, calibration, items_now, windows=2)
        options.append(BudgetOption(f"windows {study.energy.windows} -> 2 (each item is still scored once: "
                                    "saves only the windows' own starts and stops, not modelled)",
                                    fixed + items, accuracy, energy))
    elif not study.energy.windows and study.energy.repeats > 2:
        share = 2 / study.energy.repeats
        accuracy, energy = half_widths(study, calibration, items_now, windows=2)
        options.append(BudgetOption(f"repeats {study.energy.repeats} -> 2", fixed + share * items, accuracy,
                                    energy))
    return options


# --- calibration from a finished study ------------------------------------------------------------------


def _median(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else math.nan


def calibrate(study_dir: str | Path, base_dir: Path | None = None) -> Calibration:
    """Measure a Calibration from a finished study folder: its parameters (params.resolved.yaml), its
    throughput probe and timing (provenance.json), its jobs' wall times (state/*.done) and its tables
    (energy, energy_repeats, training, idle_baselines, setup_energy)."""
    import pandas as pd
    import yaml

    from ..config import study_from_dict
    from ..tables import store as results
    from .checks import with_context_exclusions
    from .workload import study_work

    layout = StudyLayout(Path(study_dir).resolve())
    raw = yaml.safe_load(layout.params_resolved.read_text())
    source = Path(str((raw.pop("_meta", None) or {}).get("source", "")))
    base_dir = base_dir or (source.parent if source.is_file() else project_root() / "params")
    study = study_from_dict(raw, str(layout.params_resolved))
    study, _ = with_context_exclusions(study, base_dir)
    prov = json.loads(layout.provenance.read_text())
    rates = {p: r.get("gflop_per_s") for p, r in (prov["throughput"]["precisions"]).items()}
    work = study_work(study, base_dir)
    energy = results.read_table(layout.root, "energy")
    repeats = results.read_table(layout.root, "energy_repeats")
    training = results.read_table(layout.root, "training")
    idle = results.read_table(layout.root, "idle_baselines")
    setup = results.read_table(layout.root, "setup_energy")

    def efficiency_rows(phase: str) -> list[tuple[str, str, float]]:
        rows = []
        for row in energy[energy["phase"] == phase].itertuples():
            model, rate = work.models.get(str(row.model)), rates.get(str(row.precision))
            if model is None or not rate:
                continue
            if phase == "finetune":
                gflop = model.finetune.epochs * model.finetune.epoch_gflop if model.finetune else math.nan
                kind = "training"
            else:  # duration_s is one pass: the chunk windows' sum, or the mean full-pass window
                task = model.tasks.get(str(row.task))
                gflop, kind = (sum(task.window_gflop), task.kind) if task is not None else (math.nan, "")
            rows.append((kind, str(row.precision), gflop / float(row.duration_s) / rate))
        return rows

    efficiency: dict[str, dict[str, float]] = {}
    by: dict[tuple[str, str], list[float]] = {}
    for kind, precision, share in efficiency_rows("inference") + efficiency_rows("finetune"):
        by.setdefault((kind, precision), []).append(share)
    for (kind, precision), shares in by.items():
        efficiency.setdefault(kind, {})[precision] = _median(shares)
    cal = Calibration(source="", reference_gflop_per_s=float(rates["fp32"]), efficiency=efficiency,
                      overhead_s={}, load_s_per_mparam=0.0, prune_s_per_mparam={},
                      calibration_s_per_text_mparam=0.0, energy_spread={}, runner_s=0.0)
    estimator = Estimator(study, work, rates, cal)

    # pruning's setup steps, per million weights
    config_model = dict(zip(energy["config_id"].astype(str), energy["model"].astype(str)))
    loads, prunes, calibrations = [], {}, []
    methods = study.pruning.methods if study.pruning is not None else []
    method_of = {study.pruning.spec(m, study.seed).label: m.method for m in methods} if study.pruning else {}
    for row in setup.itertuples():
        model = work.models.get(config_model.get(str(row.config_id), ""))
        if model is None:
            continue
        if row.step == "load":
            loads.append(float(row.duration_s) / model.megaparameters)
        elif row.step == "prune":
            method = next((m for label, m in method_of.items() if str(row.config_id).endswith(label)), "")
            prunes.setdefault(method, []).append(float(row.duration_s) / (model.decoder_linear / 1e6))
        elif row.step == "calibration" and model.calibration_texts:
            calibrations.append(float(row.duration_s) / (model.calibration_texts * model.megaparameters))

    # each job's time outside what the estimate builds from work: its fixed overhead
    def seconds(table: pd.DataFrame, phase: str, config: str) -> float:
        if table.empty:
            return 0.0
        rows = table[table["config_id"].astype(str).isin({config, f"{config}__recovered"})]
        if phase in ("finetune", "inference") and "phase" in rows:
            rows = rows[rows["phase"] == phase]
        return float(rows["duration_s"].sum())

    outside: dict[str, list[tuple[float, float]]] = {}
    walls = {}
    for marker in sorted(layout.state.glob("*.done")):
        phase, _, config = marker.stem.partition("__")
        wall = (done_seconds(marker) or [math.nan])[-1]
        walls[marker.stem] = wall
        size = 0.0
        known = wall
        if config:
            model = work.models.get(config_model.get(config, ""))
            precision = str(energy.loc[energy["config_id"].astype(str) == config, "precision"].iloc[0]) \
                if (energy["config_id"].astype(str) == config).any() else ""
            if model is None:
                continue
            size = model.megaparameters
            known -= sum(seconds(table, phase, config) for table in (repeats, training, idle, setup))
            warm = sum(estimator._seconds(t.warmup_gflop, t.kind, precision)[0] for t in model.tasks.values())
            if phase in ("inference", "pruning"):
                known -= warm
            if phase == "finetune" and model.finetune is not None:
                evaluated = model.finetune.epochs * model.finetune.eval_gflop
                known -= estimator._seconds(evaluated, "scoring", precision)[0]
        outside.setdefault(phase, []).append((size, known))
    overhead: dict[str, tuple[float, float]] = {}
    points = outside.get("inference", [])
    slope = 0.0
    if len({s for s, _ in points}) > 1:
        slope, _ = np.polyfit([s for s, _ in points], [o for _, o in points], 1)
    for phase, values in outside.items():
        per_mparam = float(slope) if phase not in ("data", "ranking") else 0.0
        overhead[phase] = (_median([o - per_mparam * s for s, o in values]), per_mparam)

    spread = {}
    if not repeats.empty:
        windows = repeats[repeats["phase"] == "inference"].copy()
        windows["implied"] = windows["energy_kwh"] * windows["task_items"] / windows["n_items"]
        per_config = windows.groupby(["config_id", "task"])["implied"].agg(lambda x: x.std() / x.mean())
        spread = {str(task): float(v) for task, v in per_config.groupby(level="task").median().items()}
    started, finished = prov.get("started_at"), prov.get("finished_at")
    runner_s = 0.0
    if started and finished:
        # the runner's own time: the study's wall time less its jobs' (earlier runs of a job measured
        # again included: the plan does not foresee a re-measure) and less the sustained canaries' burn
        # (the plan adds the burn its study asks for)
        study_s = (pd.Timestamp(finished) - pd.Timestamp(started)).total_seconds()
        runner_s = max(0.0, study_s - sum(walls.values()) - rerun_seconds(layout.root)
                       - study.energy.sustained_burn_s)
    cpu = (prov.get("hardware") or {}).get("cpu_model") or (prov.get("hardware") or {}).get("cpu") or "?"
    cores = (prov.get("hardware") or {}).get("cpu_count")
    return Calibration(
        source=f"study '{study.study}' finished {str(finished)[:10]} on {cpu}"
               + (f", {cores} cores" if cores else ""),
        reference_gflop_per_s=float(rates["fp32"]), efficiency=efficiency, overhead_s=overhead,
        load_s_per_mparam=_median(loads) if loads else 0.0,
        prune_s_per_mparam={m: _median(v) for m, v in prunes.items() if m},
        calibration_s_per_text_mparam=_median(calibrations) if calibrations else 0.0,
        energy_spread=spread, runner_s=runner_s)


def measured_jobs(study_dir: str | Path) -> dict[str, float]:
    """A finished study's jobs and their wall seconds (state/*.done), for setting an estimate beside."""
    layout = StudyLayout(Path(study_dir).resolve())
    return {m.stem: (done_seconds(m) or [math.nan])[-1] for m in sorted(layout.state.glob("*.done"))}


def rerun_seconds(study_dir: str | Path) -> float:
    """The wall seconds of the earlier runs of jobs the re-measure stage ran again (no plan foresees
    them): in the study's wall time, in no job's last run."""
    layout = StudyLayout(Path(study_dir).resolve())
    return sum(sum(done_seconds(m)[:-1]) for m in layout.state.glob("*.done"))
