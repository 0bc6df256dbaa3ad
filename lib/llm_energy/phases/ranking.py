"""The ranking phase (notebook ``05_ranking``): every evaluated config ranked by
R = w·φ + (1−w)·ρ from the study's saved tables, its stability under resampling, and the written
summary at the top of the report. This phase alone writes ``ranking.csv``.

The arithmetic (φ, ρ, R, Pareto front, resampling) is :mod:`llm_energy.analysis.ranking_math`; the figures are
:mod:`llm_energy.report.figures`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from ..analysis import ranking_math as rank
from ..analysis.halfwidths import HALF_WIDTH_TARGETS, items_for_half_width, wilson_half_width
from ..analysis.lifecycle import amortized_energy_per_item, lifecycle_table
from ..analysis.limits import precision_limits
from ..analysis.significance import MIN_VERDICT_ITEMS, holm
from ..config import PHI_METHODS, PRECISIONS, TINY_LLAMA, RankingSettings, headline_metric
from ..layout import StudyLayout, config_words, parent_config_id, project_root
from ..measure.hardware import SPEED_FLAGS, cpu_sentence, gpu_sentence, speed_sentence
from ..measure.meter import J_PER_KWH, component_methods, describe_methods, is_estimate
from ..tables import store as results


@dataclass(frozen=True)
class RankingOutcome:
    result: rank.RankingResult
    configs: pd.DataFrame
    stability: pd.DataFrame | None
    stability_metrics: tuple[str, ...]
    w: float
    methods: tuple[str, ...]
    energy_lines: tuple[str, ...] = ()  # per component: method, estimate or not; scope; carbon intensity
    comparisons: pd.DataFrame | None = None  # paired comparisons of every pair of configs (comparisons.csv)
    stability_note: str = ""  # why rank stability was not estimated, when it was not
    top_by_phi: dict[str, list[tuple[str, float]]] | None = None  # phi choice -> tied-with-top set at w
    precision_lines: tuple[str, ...] = ()  # achieved 95% half-widths against the targets
    device_lines: tuple[str, ...] = ()  # each precision's measured throughput on the device, and skips
    # the machine (CPU, speed-deciding flags, GPU) and where each job ran
    hardware_lines: tuple[str, ...] = ()
    # what each task scored: data source (synthetic said so), style, items, skips
    data_lines: tuple[str, ...] = ()
    scale_lines: tuple[str, ...] = ()  # observed ranges of φ and ρ and the weight energy effectively gets
    qa_style: str = "cloze"  # how QA was scored (its headline metric follows)
    lifecycle: pd.DataFrame | None = None  # lifecycle.csv: setup by step, per-query energy, break-even
    per_query_configs: pd.DataFrame | None = None  # config_energy rows before any amortisation
    token_energy: pd.DataFrame | None = None  # per config: J per input token and per output token
    # contaminated windows, re-measured jobs, rate outliers, idle drift
    disturbance_lines: tuple[str, ...] = ()
    contaminated_excluded: tuple[str, ...] = ()  # left out under ranking.contaminated: exclude


EXAMPLE_PRECISIONS: tuple[str, ...] = ("fp32", "bf16")
EXAMPLE_FOLDER = "ranking-example"


def example_study(folder: str | Path = "") -> Path:
    """A small study for the ranking notebook run alone (no study folder named): the tiny random Llama
    at fp32 and bf16, 20 items per task, really evaluated and measured as the inference phase does
    (about half a minute on two cores), into ``folder`` (default outputs/ranking-example of the
    project). Built once: a folder that already holds both configs' rows is reused."""
    from . import inference
    from .evaluation import ConfigRun, measure_system_idle, open_meter

    root = Path(folder).expanduser().resolve() if folder else project_root() / "outputs" / EXAMPLE_FOLDER
    done = set(results.read_table(root, "energy")["config_id"].astype(str))
    for precision in EXAMPLE_PRECISIONS:
        run = ConfigRun.from_parameters(
            study_dir=str(root), config_id="", model={"name": TINY_LLAMA}, precision=precision, device="cpu",
            tasks={"rca": {"max_items": 20}, "qa": {"max_items": 20}},
            energy={"idle_seconds": 0.5, "repeats": 2, "max_repeats": 2}, seed=0, base_dir="")
        if run.config_id in done:
            continue
        system_idle = measure_system_idle(run)
        loaded = inference.load(run)
        inference.prepare(run, loaded)
        with open_meter(run, loaded.device, system_idle) as meter:
            inference.measure_config_tasks(run, loaded, meter)
    return root


def rank_study(study_dir: str | Path, settings: RankingSettings) -> RankingOutcome:
    """Rank every evaluated config from the saved tables and write tables/ranking.csv."""
    energy = results.read_table(study_dir, "energy")
    scores = results.read_table(study_dir, "scores")
    configs = rank.config_energy(energy, settings.energy_basis)
    if configs.empty:
        raise ValueError(f"{results.table_path(study_dir, 'energy')} has no inference rows to rank")
    flagged = contaminated_configs(energy)
    excluded_disturbed: tuple[str, ...] = ()
    if settings.contaminated == "exclude" and flagged:
        excluded_disturbed = tuple(c for c in configs["config_id"].astype(str) if c in flagged)
        configs = configs[~configs["config_id"].astype(str).isin(flagged)]
        if configs.empty:
            raise ValueError(f"every config has contaminated windows ({', '.join(excluded_disturbed)}) and "
                             "ranking.contaminated is exclude: nothing left to rank; measure again on a "
                             "quiet machine, or set ranking.contaminated: flag")
    per_query = configs
    lifecycle = lifecycle_table(configs, energy, results.read_table(study_dir, "setup_energy"),
                                results.read_table(study_dir, "configs"), settings.energy_basis)
    results.write_table(study_dir, "lifecycle", lifecycle)
    offset = None
    if settings.amortize_over:
        amortized = amortized_energy_per_item(configs, lifecycle, settings.amortize_over,
                                              settings.energy_basis)
        offset = pd.Series((amortized - configs["energy_kwh_per_item"].astype(float)).to_numpy(),
                           index=configs["config_id"].astype(str))
        configs = configs.assign(energy_kwh_per_item=amortized)
    qa_style = study_qa_style(study_dir, scores)
    result = rank.rank_evaluations(configs, scores, settings, qa_style)
    stability, used, note = _stability(study_dir, configs, result.settings, result, offset)
    p_best = stability.attrs.get("p_best") if stability is not None else None
    result = rank.RankingResult(table=rank.add_top_uncertainty(result.table, p_best),
                                excluded=result.excluded, settings=result.settings)
    top_by_phi = {result.settings.phi_method: tied_at(result.table, result.settings.w)}
    for other in (m for m in PHI_METHODS if m != result.settings.phi_method):
        alt = rank.rank_evaluations(configs, scores, result.settings.model_copy(update={"phi_method": other}),
                                    qa_style)
        alt_stability, _, _ = _stability(study_dir, configs, alt.settings, alt, offset)
        alt_table = rank.add_top_uncertainty(alt.table,
                                             alt_stability.attrs.get("p_best") if alt_stability is not None
                                             else None)
        top_by_phi[other] = tied_at(alt_table, result.settings.w)
    results.write_table(study_dir, "ranking", result.table)
    items = results.read_table(study_dir, "item_scores")
    items = items[items["config_id"].astype(str).isin(set(configs["config_id"].astype(str)))]
    comparisons = adjust_comparisons(rank.paired_comparisons(items), configs, qa_style)
    results.write_table(study_dir, "comparisons", comparisons)
    measured = energy[energy["phase"].isin(rank.EVALUATION_PHASES + ("finetune", "recovery"))]
    methods = tuple(sorted({m for m in component_methods(measured) if m}))
    return RankingOutcome(result=result, configs=configs, stability=stability, stability_metrics=used,
                          w=settings.w, methods=methods,
                          energy_lines=tuple(energy_description(energy, settings)), comparisons=comparisons,
                          stability_note=note, top_by_phi=top_by_phi,
                          precision_lines=tuple(
                              precision_lines(scores, qa_style, configs["config_id"].tolist())),
                          scale_lines=tuple(scale_lines(result.table, result.settings)), qa_style=qa_style,
                          lifecycle=lifecycle, per_query_configs=per_query, token_energy=token_energy(energy),
                          device_lines=tuple(device_lines(study_dir)),
                          hardware_lines=tuple(hardware_lines(study_dir)),
                          data_lines=tuple(data_lines(study_dir, scores)),
                          disturbance_lines=tuple(disturbance_lines(study_dir, energy, settings)),
                          contaminated_excluded=excluded_disturbed)


def contaminated_configs(energy: pd.DataFrame) -> set[str]:
    """Configs with evaluation windows kept with the contaminated flag (after any re-measure)."""
    if "contaminated_windows" not in energy.columns:
        return set()
    rows = energy[energy["phase"].isin(rank.EVALUATION_PHASES)]
    counts = pd.to_numeric(rows["contaminated_windows"], errors="coerce").fillna(0)
    return set(rows.loc[counts > 0, "config_id"].astype(str))


def disturbance_lines(study_dir: str | Path, energy: pd.DataFrame, settings: RankingSettings) -> list[str]:
    """The report's account of disturbed measurements: windows kept contaminated (counted, named,
    why), windows measured again, jobs run again whole, rate outliers, and idle drift per job."""
    if "contaminated_windows" not in energy.columns:
        return ["Disturbance was not checked in this study (its tables predate the checks)."]
    rows = energy[energy["phase"].isin(rank.EVALUATION_PHASES)].copy()
    for column in ("contaminated_windows", "remeasured_windows", "rate_outlier_windows"):
        rows[column] = pd.to_numeric(rows.get(column), errors="coerce").fillna(0).astype(int)
    windows = pd.to_numeric(rows.get("windows"), errors="coerce").fillna(0).astype(int).sum()
    lines = []
    flagged = rows[rows["contaminated_windows"] > 0]
    foreign = pd.to_numeric(rows.get("foreign_cpu_share"), errors="coerce")
    slow = pd.to_numeric(rows.get("canary_slowdown"), errors="coerce")
    if not windows or (foreign.isna().all() and slow.isna().all()):
        return ["Disturbance was not checked (energy.detect_disturbance: false)."]
    lines.append(f"{int(flagged['contaminated_windows'].sum())} of {windows} measured windows kept a "
                 f"contaminated flag; {int(rows['remeasured_windows'].sum())} disturbed windows were "
                 "discarded and measured again. Worst over all windows: machine-speed canary "
                 f"{slow.max():.2f}x its speed at the start, other processes {foreign.max():.0%} of the CPU "
                 "time, hypervisor steal "
                 f"{pd.to_numeric(rows.get('steal_share'), errors='coerce').max():.0%}.")
    repeats = results.read_table(study_dir, "energy_repeats")
    if len(flagged):
        why = {}
        if "disturbance" in repeats.columns:
            bad = repeats[repeats["contaminated"].astype(str).str.lower() == "true"]
            why = bad.groupby("config_id")["disturbance"].agg(
                lambda v: "; ".join(sorted({str(x) for x in v if str(x)})))
        for config_id, group in flagged.groupby("config_id"):
            lines.append(f"- **{config_id}**: {int(group['contaminated_windows'].sum())} contaminated "
                         f"window(s) in {', '.join(group['task'].astype(str))}"
                         + (f" ({why[config_id]})" if config_id in why else "")
                         + ("; left out of the ranking (ranking.contaminated: exclude)"
                            if settings.contaminated == "exclude" else "; ranked, with this flag"))
    prov_path = StudyLayout(Path(study_dir)).provenance
    remeasured = (((json.loads(prov_path.read_text()).get("jobs") or {}).get("remeasured") or {})
                  if prov_path.exists() else {})
    if remeasured:
        lines.append("Run again, whole, at the end of the study (every window replaced): "
                     + ", ".join(f"{job} ({', '.join(configs)})" for job, configs in remeasured.items())
                     + ".")
    outliers = rows[rows["rate_outlier_windows"] > 0]
    if len(outliers):
        lines.append("Windows well below their config's median items per second (shown, not re-measured: "
                     "chunks differ in length): "
                     + ", ".join(f"{r.config_id} {r.task} ({r.rate_outlier_windows})"
                                                         for r in outliers.itertuples()) + ".")
    idle = results.read_table(study_dir, "idle_baselines")
    if "idle_drift" in idle.columns:
        after = idle[idle["kind"] == "loaded_after"].copy()
        after["idle_drift"] = pd.to_numeric(after["idle_drift"], errors="coerce")
        drifted = after[after["drifted"].astype(str).str.lower() == "true"]
        if len(after):
            lines.append(f"Loaded idle power after each job's windows against before: largest change "
                         f"{after['idle_drift'].abs().max():.0%} over {len(after)} jobs; "
                         + (f"beyond energy.max_idle_drift in {', '.join(drifted['config_id'].astype(str))}."
                            if len(drifted) else "none beyond energy.max_idle_drift."))
    return lines


def disturbance_table(study_dir: str | Path) -> pd.DataFrame:
    """Per job (config x phase): its windows' worst foreign CPU share, canary slowdown and steal,
    its contaminated and re-measured windows, and its loaded-idle drift."""
    energy = results.read_table(study_dir, "energy")
    if "contaminated_windows" not in energy.columns or energy.empty:
        return pd.DataFrame()
    rows = energy[energy["phase"].isin(rank.EVALUATION_PHASES)]
    numeric = {c: pd.to_numeric(rows[c], errors="coerce") for c in
               ("foreign_cpu_share", "canary_slowdown", "steal_share", "contaminated_windows",
                "remeasured_windows")}
    table = pd.DataFrame({"config_id": rows["config_id"], "phase": rows["phase"], **numeric})
    table = table.groupby(["config_id", "phase"], as_index=False).agg(
        foreign_cpu_share=("foreign_cpu_share", "max"), canary_slowdown=("canary_slowdown", "max"),
        steal_share=("steal_share", "max"), contaminated_windows=("contaminated_windows", "sum"),
        remeasured_windows=("remeasured_windows", "sum"))
    idle = results.read_table(study_dir, "idle_baselines")
    if "idle_drift" in idle.columns:
        after = idle[idle["kind"] == "loaded_after"][["config_id", "phase", "idle_drift", "drifted"]]
        table = table.merge(after, on=["config_id", "phase"], how="left")
    return table


STYLE_WORDS = {
    "cloze": "cloze: each choice's text scored as a continuation of the question",
    "options": "lettered options: the choices shown in the prompt, the answer letter scored",
    "labels": "each root cause's words scored as a continuation of the ticket",
}


def data_lines(study_dir: str | Path, scores: pd.DataFrame) -> list[str]:
    """Per task: the data it was scored on (synthetic data says so; TeleQnA with its citation), how
    it was scored, the items per config, where the scored split came from, and the records skipped."""
    from ..data.tasks import describe_source

    if scores.empty or "data" not in scores:
        return []
    splits = results.read_table(study_dir, "splits")
    skipped = results.read_table(study_dir, "skipped_records")
    lines = []
    for task, rows in scores.groupby("task", sort=True):
        source = str(rows["data"].dropna().iloc[0]) if rows["data"].notna().any() else ""
        style = str(rows["style"].dropna().iloc[0]) if "style" in rows and rows["style"].notna().any() else ""
        n_items = sorted({int(n) for n in rows["n_items"].dropna()})
        words = STYLE_WORDS.get(style, style)
        line = f"- **{task}**: {describe_source(source) if source else 'unknown source'}"
        line += f"; {words}" if words else ""
        shots = sorted({int(k) for k in rows["fewshot"].dropna()}) if "fewshot" in rows else []
        if any(shots):
            ids = (sorted({str(i) for i in rows["fewshot_ids"].dropna() if str(i)}) if "fewshot_ids" in rows
                   else [])
            line += (f"; {'/'.join(map(str, shots))} worked example(s) from the train split shown before "
                     "every question" + (f" ({'; '.join(ids)})" if ids else ""))
        line += f"; {', '.join(map(str, n_items))} items per config" if n_items else ""
        if not splits.empty and task in set(splits["task"]):
            mine = splits[splits["task"] == task]
            if set(mine["assigned_by"]) == {"assigned"}:
                line += (f"; the file has no splits, so a seeded assignment stratified by class made them "
                         f"({', '.join(f'{k} {v}' for k, v in mine['split'].value_counts().sort_index().items())}; "  # noqa: E501
                         "tables/splits.csv), and only the test split is scored")
        if not skipped.empty and task in set(skipped["task"]):
            mine = skipped[skipped["task"] == task]
            reasons = mine["field"].fillna("").astype(str).value_counts()
            line += (f"; {len(mine)} invalid record(s) left out before sampling (invalid_records: skip; by "
                     "field: "
                     + ", ".join(f"{k or '?'} {v}" for k, v in reasons.items())
                     + "; tables/skipped_records.csv)")
        lines.append(line + ".")
    return lines


def device_lines(study_dir: str | Path) -> list[str]:
    """The runner's throughput probe from provenance.json: GFLOP/s per precision on the study's device,
    then one line per precision: its speed against fp32 beside the CPU flags that decide it, and
    whether it was skipped as too slow ("bf16 skipped: 25x slower than fp32 on this CPU, which has no
    avx512_bf16 or amx_bf16"; empty when the study has no probe)."""
    path = StudyLayout(Path(study_dir)).provenance
    prov = json.loads(path.read_text()) if path.exists() else {}
    probe = prov.get("throughput") or {}
    precisions = probe.get("precisions") or {}
    if not precisions:
        return []
    parts = []
    ordered = sorted(precisions.items(), key=lambda kv: (kv[0] not in PRECISIONS, PRECISIONS.index(kv[0])
                                                         if kv[0] in PRECISIONS else 0, kv[0]))
    for precision, result in ordered:
        rate = result.get("gflop_per_s")
        parts.append(f"{precision} {rate:.3g}" if rate
                     else f"{precision} not measured ({result.get('reason', '')})")
    limit = (probe.get("device_limits") or {}).get("max_slowdown")
    skips = (f"A precision more than {limit:g}x slower than fp32 is skipped unless device_limits.always_run "
             "lists it." if limit else "device_limits.max_slowdown: null, so no precision was skipped for "
             "speed.")
    lines = [f"Matmul throughput measured before the first job on {probe.get('device', '?')} (GFLOP/s): "
             + ", ".join(parts) + ". " + skips + achieved_sentence(study_dir)]
    skipped = probe.get("skipped_as_slow") or {}
    flags = (prov.get("hardware") or {}).get("isa_flags")  # the runner's machine: where the probe ran
    on_cpu = not str(probe.get("device", "cpu")).startswith("cuda")
    reference = (precisions.get("fp32") or {}).get("gflop_per_s")
    for precision, result in ordered:
        rate = result.get("gflop_per_s")
        if precision == "fp32" or not (rate and reference):
            continue  # the reference itself, and a precision not measured (the line above says why)
        lines.append("- " + speed_sentence(precision, reference / rate, flags, on_cpu=on_cpu,
                                           skipped=precision in skipped) + ".")
    return lines


def achieved_sentence(study_dir: str | Path) -> str:
    """What the study's inference windows achieved per precision, beside the probe (analysis/limits.py):
    the median GFLOP/s of the useful work and its share of the probe's rate, scoring and generation
    apart; empty for a study whose windows do not carry their work."""
    limits = precision_limits(results.read_table(study_dir, "energy"),
                              results.read_table(study_dir, "energy_repeats"))
    if limits.empty:
        return ""
    order = {p: i for i, p in enumerate(PRECISIONS)}
    limits = limits.sort_values("precision", key=lambda s: s.map(lambda p: order.get(p, len(order))))

    def share(value: float) -> str:
        return "n/a" if pd.isna(value) else f"{value:.2f}"

    parts = [f"{row.precision} {row.gflop_per_s:.3g} GFLOP/s, {share(row.limit_share)} of its probe "
             f"(scoring {share(row.scoring_limit_share)}, generation {share(row.generation_limit_share)})"
             for row in limits.itertuples()]
    return (" Achieved in the study's inference windows (median over windows of the useful work: 2 x the "
            "decoder's weights per token run, attention, logits where scored; limit_share in energy.csv): "
            + "; ".join(parts) + ".")


JOB_HARDWARE_COLUMNS = ("host", "cpu_model", "isa_flags", "cpu_cores", "governor", "cpu_mhz", "load_avg_1m",
                        "gpu_name", "gpu_power_limit_w")


def job_hardware(study_dir: str | Path) -> pd.DataFrame:
    """Per job (config x phase), where it ran, from idle_baselines.csv (its loaded-idle row, else its
    first): host, CPU model, speed-deciding flags, cores, governor, clock, the 1-minute load average
    when its baselines were taken, GPU and power limit. Empty for tables written before these columns."""
    idle = results.read_table(study_dir, "idle_baselines")
    if idle.empty or "cpu_model" not in idle.columns:
        return pd.DataFrame()
    order = idle.assign(_later=idle["kind"].astype(str) != "loaded")
    order = order.sort_values(["config_id", "phase", "_later"],
                              kind="stable").drop_duplicates(["config_id", "phase"])
    columns = [c for c in JOB_HARDWARE_COLUMNS if c in idle.columns]
    return order[["config_id", "phase", *columns]].reset_index(drop=True)


def _text(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def hardware_lines(study_dir: str | Path) -> list[str]:
    """The machine the runner and its throughput probe ran on (provenance.json "hardware": CPU, its
    speed-deciding flags, governor, clock, load, memory; every GPU), then where the jobs ran
    (idle_baselines.csv): one machine, or each machine with its jobs, and the load average each job
    started its measurements under."""
    path = StudyLayout(Path(study_dir)).provenance
    hw = ((json.loads(path.read_text()).get("hardware") or {}) if path.exists() else {})
    lines = []
    if hw:
        host = f" ({hw['host']})" if hw.get("host") else ""
        lines.append(f"The runner's machine{host}, where the throughput probe ran: {cpu_sentence(hw)}")
        lines += [f"- {gpu_sentence(g)}" for g in hw.get("gpus") or []]
    jobs = job_hardware(study_dir)
    if jobs.empty:
        return lines
    key = [c for c in ("host", "cpu_model", "isa_flags", "gpu_name", "gpu_power_limit_w")
           if c in jobs.columns]
    machines = jobs.assign(**{c: jobs[c].map(_text) for c in key}).groupby(key, sort=True)
    flags = hw.get("isa_flags") or {}
    probe_flags = (";".join(f for f in SPEED_FLAGS if flags.get(f)) or "none") if flags else ""

    def machine(values: tuple[Any, ...]) -> str:
        m = dict(zip(key, values))
        words = f"{m.get('host') or '?'}: {m.get('cpu_model') or '?'}, flags {m.get('isa_flags') or '?'}"
        if m.get("gpu_name"):
            words += f", GPU {m['gpu_name']}" + (f" at {float(m['gpu_power_limit_w']):g} W"
                                                 if m.get("gpu_power_limit_w") else "")
        if probe_flags and m.get("isa_flags") and m["isa_flags"] != probe_flags:
            words += " (other flags than the probe's machine: its precisions' speeds may differ)"
        return words

    groups = list(machines)
    if len(groups) == 1:
        lines.append(f"{'The one measured job' if len(jobs) == 1 else f'All {len(jobs)} measured jobs'} ran "
                     f"on {machine(groups[0][0])} (tables/idle_baselines.csv).")
    else:
        lines.append(f"The {len(jobs)} measured jobs ran on {len(groups)} machines "
                     "(tables/idle_baselines.csv):")
        lines += [f"- {machine(values)}: "
                  + ", ".join(f"{r.config_id} ({r.phase})" for r in group.itertuples())
                  for values, group in groups]
    load = pd.to_numeric(jobs.get("load_avg_1m"), errors="coerce")
    if load.notna().any():
        worst = jobs.loc[load.idxmax()]
        lines.append(f"Load average (1 min) when each job's idle baselines were taken: {load.min():.2f} to "
                     f"{load.max():.2f} (highest: {worst['config_id']}, {worst['phase']}"
                     + (f", on {int(worst['cpu_cores'])} logical cores" if pd.notna(worst.get("cpu_cores"))
                        else "")
                     + ").")
    return lines


def study_qa_style(study_dir: str | Path, scores: pd.DataFrame | None = None) -> str:
    """The QA scoring style of a study: a ``style`` column of scores.csv when the scoring wrote one,
    else tasks.qa.style of its params.resolved.yaml, else "cloze" (the default)."""
    if scores is not None and "style" in scores:
        styles = sorted({str(s) for s in scores.loc[scores["task"] == "qa", "style"].dropna()})
        if len(styles) > 1:
            raise ValueError(f"scores.csv mixes QA styles {styles}: one study scores QA one way")
        if styles:
            return styles[0]
    path = StudyLayout(Path(study_dir)).params_resolved
    if path.exists():
        qa = ((yaml.safe_load(path.read_text()) or {}).get("tasks") or {}).get("qa") or {}
        return str(qa.get("style") or "cloze")
    return "cloze"


def tied_at(table: pd.DataFrame, w: float) -> list[tuple[str, float]]:
    """The configs tied with the top at w (ranking.csv's tied_with_top), best first, with p_best."""
    at_w = table[np.isclose(table["w"], w) & table["tied_with_top"].astype(bool)]
    at_w = at_w.sort_values(["rank", "config_id"])
    return [(str(r.config_id), float(r.p_best)) for r in at_w.itertuples()]


def phi_choice_markdown(top_by_phi: dict[str, list[tuple[str, float]]] | None, chosen: str, w: float) -> str:
    """How the set the data cannot separate at w changes between the two φ choices."""
    if not top_by_phi or len(top_by_phi) < 2:
        return ""
    names = {"minmax": "min-max (E_max − E)/(E_max − E_min)", "ratio": "ratio E_min/E"}
    sets = {m: [c for c, _ in top] for m, top in top_by_phi.items()}
    lines = [(f"**φ choice and the top set at w = {w:g}.** The ranking uses φ = {names[chosen]}; the other "
              "choice, with the same ρ and the same resampled items and energy repeats, gives:"), "",
             "| φ | tied with the top (p_best) |", "|---|---|"]
    for method in PHI_METHODS:
        if method in top_by_phi:
            cell = (", ".join(f"{c} ({p:.0%})" if not math.isnan(p) else c for c, p in top_by_phi[method])
                    or "—")
            lines.append(f"| {method}{' (used)' if method == chosen else ''} | {cell} |")
    lines.append("")
    values = list(sets.values())
    if all(set(v) == set(values[0]) for v in values):
        lines.append("The top set is the same under both φ choices.")
    else:
        a, b = (m for m in PHI_METHODS if m in sets)
        only_a = sorted(set(sets[a]) - set(sets[b]))
        only_b = sorted(set(sets[b]) - set(sets[a]))
        parts = []
        if only_a:
            parts.append(f"only under {a}: {', '.join(only_a)}")
        if only_b:
            parts.append(f"only under {b}: {', '.join(only_b)}")
        lines.append("The top set depends on the φ choice (" + "; ".join(parts) + ").")
    return "\n".join(lines)


def precision_lines(scores: pd.DataFrame, qa_style: str, config_ids: list[str] | None = None,
                    targets: dict[str, float] = HALF_WIDTH_TARGETS) -> list[str]:
    """Per task: the achieved 95% half-width of its headline accuracy (largest over configs, from the
    bootstrap interval in scores.csv, with the Wilson interval beside it) against its target."""
    lines = []
    for task, target in targets.items():
        metric = headline_metric(task, qa_style)
        rows = scores[(scores["task"] == task) & (scores["metric"] == metric)]
        if config_ids is not None:
            rows = rows[rows["config_id"].isin(config_ids)]
        if rows.empty:
            continue
        boot = ((rows["ci_high"].astype(float) - rows["ci_low"].astype(float)) / 2).max()
        wilson = max(wilson_half_width(float(v), int(n)) for v, n in zip(rows["value"], rows["n_items"]))
        n_items = int(rows["n_items"].min())
        worst = max(boot, wilson) if not math.isnan(boot) else wilson
        met = worst <= target
        lines.append(f"- {task} {metric}: ±{boot:.3f} (bootstrap), ±{wilson:.3f} (Wilson), largest over "
                     f"{len(rows)} configs, {n_items} items; target ±{target:.2f}: "
                     + ("**met**." if met else f"**NOT met** (about {items_for_half_width(target)} items "
                                                "would reach it at worst, p = 0.5)."))
    return lines


def energy_description(energy: pd.DataFrame, settings: RankingSettings) -> list[str]:
    """What the energy numbers are, in words: each component's method and whether it is an estimate,
    what the totals cover, the carbon intensity, and the basis the ranking used."""
    rows = energy[energy["phase"].isin(rank.EVALUATION_PHASES + ("finetune",))]
    lines = []
    parts = []
    for component in ("cpu", "gpu", "ram"):
        column = f"{component}_method"
        methods = (sorted({str(m) for m in rows[column].dropna() if str(m) not in ("none", "")})
                   if column in rows else [])
        if not methods:
            continue
        words = ", ".join(f"{m} ({'ESTIMATE' if is_estimate(m) else 'measured'})" for m in methods)
        parts.append(f"{component.upper()}: {words}")
    if parts:
        lines.append("Per component — " + "; ".join(parts) + ".")
    estimated = sorted({c for value in rows.get("estimated_components", pd.Series(dtype=str)).dropna()
                        for c in str(value).split(";") if c})
    measured_gpu = "gpu_method" in rows and any(m == "nvml_counter" for m in rows["gpu_method"].dropna())
    if measured_gpu and estimated:
        lines.append("The GPU energy is measured by its NVML counter, but "
                     f"{' and '.join(c.upper() for c in estimated)} energy in the totals is modelled, not "
                     "measured.")
    scopes = sorted({str(s) for s in rows.get("energy_scope", pd.Series(dtype=str)).dropna()})
    if any(s.startswith("gpu_only") for s in scopes):
        lines.append("Some jobs shared their node with other measured jobs: their totals hold their GPUs "
                     "only (energy_scope 'gpu_only: shared node'); CPU and RAM are recorded beside them, not "
                     "charged.")
    intensity = rows.get("carbon_intensity_g_per_kwh", pd.Series(dtype=float)).dropna()
    country = rows.get("country_iso_code", pd.Series(dtype=str)).dropna()
    if len(intensity):
        lines.append(f"Carbon: {intensity.iloc[0]:.0f} g CO2e/kWh"
                     + (f" (grid of {country.iloc[0]})" if len(country) else "") + ".")
    lines.append(f"The ranking uses {settings.energy_basis} energy"
                 + (" (net of each job's loaded-idle power)." if settings.energy_basis == "net" else
                    " (as measured, idle included); energy_net_kwh in energy.csv subtracts each job's "
                    "loaded-idle power."))
    return lines


def _stability(study_dir: str | Path, configs: pd.DataFrame, settings: RankingSettings,
               result: rank.RankingResult,
               offset: pd.Series | None = None) -> tuple[pd.DataFrame | None, tuple[str, ...], str]:
    """Rank stability and p_best over exactly the point ranking's metrics (result.settings.metrics,
    resolved), or None and the reason it was not estimated."""
    if settings.bootstrap == 0:
        return None, (), "ranking.bootstrap is 0"
    items = results.read_table(study_dir, "item_scores")
    if items.empty:
        return None, (), "no per-item scores to resample"
    items = items[items["config_id"].isin(configs["config_id"]) & ~items["config_id"].isin(result.excluded)]
    per_item_pairs = set(items["task"] + ":" + items["metric"])
    chosen = tuple(result.settings.metrics or ())
    lacking = [m for m in chosen if m not in per_item_pairs]
    if lacking:
        # Resampling the other metrics alone would rank by a different rho than the point ranking.
        return None, (), (f"ρ counts {', '.join(lacking)}, which has no per-item scores to resample (a "
                          "corpus-level metric); choose per-item metrics in ranking.metrics to estimate it")
    sub = settings.model_copy(update={"metrics": chosen, "missing": "exclude"})
    keep = configs[~configs["config_id"].isin(result.excluded)]
    repeats = rank.repeat_energy(results.read_table(study_dir, "energy_repeats"), settings.energy_basis)
    stability = rank.rank_stability(keep, items, repeats if len(repeats) else None, sub, w=settings.w,
                                    n_boot=settings.bootstrap, seed=0,
                                    energy_offset=offset if len(repeats) else None)  # (else configs holds it)
    return stability, chosen, ""


def _fmt_energy(kwh: float) -> str:
    wh = kwh * 1000
    return f"{wh:.3g} Wh" if wh >= 0.1 else f"{wh * 1000:.3g} mWh"


pretty_config = config_words  # model · precision · adapter · pruning (· recovered): layout.config_words


def _ordinal(n: int) -> str:
    return {1: "the least", 2: "2nd least", 3: "3rd least"}.get(n, f"{n}th least")


def reason_line(row: Any, at_w: pd.DataFrame) -> str:
    """Why a config stands where it does, in one line: its R from φ and ρ, where its energy per item
    and its ρ place it among the ranked configs."""
    energies = at_w["energy_kwh_per_item"].astype(float)
    rhos = at_w["rho"].astype(float)
    energy_place = int((energies < float(row["energy_kwh_per_item"]) - 1e-18).sum()) + 1
    rho_place = int((rhos > float(row["rho"]) + 1e-12).sum()) + 1
    rho_words = "the best ρ" if rho_place == 1 else f"ρ {rhos.max() - float(row['rho']):.3f} below the best"
    return (f"R = {row['R']:.3f} from φ = {row['phi']:.3f} ({_fmt_energy(row['energy_kwh_per_item'])} per "
            f"item, {_ordinal(energy_place).replace('the least', 'the least energy')}"
            + ("" if energy_place == 1 else " energy")
            + f" of {len(at_w)}) and ρ = {row['rho']:.3f} ({rho_words})")


def answer_markdown(outcome: RankingOutcome, k: int = 3) -> str:
    """The report's opening: the answer at the chosen w (the configs the data cannot separate from the
    top, each with p_best and why), then the top k with their rank stability."""
    table = outcome.result.table
    at_w = table[np.isclose(table["w"], outcome.w)]
    lines = [separability_sentence(outcome), ""]
    tied = at_w[at_w["tied_with_top"].astype(bool)] if "tied_with_top" in at_w else at_w.iloc[:0]
    if "p_best" in at_w and not at_w["p_best"].isna().all() and len(tied):
        for _, row in tied.sort_values(["rank", "config_id"]).iterrows():
            lines.append(f"- **{pretty_config(row['config_id'])}** — best in {row['p_best']:.0%} of "
                         "resamples; "
                         + reason_line(row, at_w) + ".")
        lines.append("")
    lines += _top_lines(outcome, k)
    if outcome.contaminated_excluded:
        lines += ["", "Left out of this ranking for disturbed measurements (ranking.contaminated: exclude): "
                  + ", ".join(pretty_config(c) for c in outcome.contaminated_excluded) + "."]
    return "\n".join(lines)


def _top_lines(outcome: RankingOutcome, k: int) -> list[str]:
    top = rank.summarise_top(outcome.result, outcome.w, k=k)
    lines = [f"### Top configurations at w = {outcome.w:g}", ""]
    stability = outcome.stability.set_index("config_id") if outcome.stability is not None else None
    for row in top:
        robust = ""
        if stability is not None and row["config_id"] in stability.index:
            share = stability.loc[row["config_id"]].get(f"rank_{int(row['rank'])}", float("nan"))
            if not (isinstance(share, float) and math.isnan(share)):
                robust = (f"; holds rank {int(row['rank'])} in {share:.0%} of "
                          f"{len(outcome.stability) and 'bootstrap'} resamples")
        lines.append(
            f"{int(row['rank'])}. **{pretty_config(row['config_id'])}** — R = {row['R']:.3f} (φ = "
            f"{row['phi']:.3f}, ρ = {row['rho']:.3f}, {_fmt_energy(row['energy_kwh_per_item'])} per "
            f"item{robust})"
        )
    return lines


def summary_markdown(outcome: RankingOutcome, weights_origin: dict[str, str], skipped: list[dict[str, str]],
                     failures: list[dict[str, str]], k: int = 3,
                     finetune_lines: list[str] | None = None) -> str:
    """The answer, then the methods behind it (the report shows them apart: answer first, evidence,
    methods)."""
    return (answer_markdown(outcome, k) + "\n\n"
            + methods_markdown(outcome, weights_origin, skipped, failures, finetune_lines))


def methods_markdown(outcome: RankingOutcome, weights_origin: dict[str, str], skipped: list[dict[str, str]],
                     failures: list[dict[str, str]], finetune_lines: list[str] | None = None) -> str:
    """How the answer was reached: the formula and its scales, stability, the precision of the scores,
    the device and its hardware, disturbed measurements, the data, the energy method, where the weights
    came from, what was skipped or failed."""
    lines = [f"**{rank.rho_formula(outcome.result.settings)}.**"]
    lines.append(
        "ρ counts one headline metric per task unless ranking.metrics names others"
        + (" (each scaled min-max over the configs)." if outcome.result.settings.metric_scaling == "minmax"
           else " (accuracies, already in [0, 1]).")
        + " Energy per item = a config's inference energy over all tasks / items scored"
        + (f", plus its setup energy (fine-tuning, pruning, recovery) amortised over a life of "
           f"{outcome.result.settings.amortize_over:g} queries (ranking.amortize_over)."
           if outcome.result.settings.amortize_over else
           " (per query: setup energy is not counted, the paper's ranking; ranking.amortize_over: N counts "
           "it over a life of N queries, see \"What it costs over its life\").")
    )
    lines += list(outcome.scale_lines)
    if outcome.stability_metrics:
        lines.append("Rank stability and p_best resample the items of "
                     f"{', '.join(outcome.stability_metrics)} (the same ρ as the point ranking) and the "
                     "energy repeats.")
    elif outcome.stability_note:
        lines.append(f"Rank stability was not estimated: {outcome.stability_note}.")
    phi_lines = phi_choice_markdown(outcome.top_by_phi, outcome.result.settings.phi_method, outcome.w)
    if phi_lines:
        lines += ["", phi_lines]
    if outcome.precision_lines:
        lines += ["", ("**Precision of the scores.** Achieved 95% half-width of each task's headline "
                       "accuracy against its target:"), *outcome.precision_lines]
    if outcome.hardware_lines:
        lines += ["", "**Hardware.** " + outcome.hardware_lines[0], *outcome.hardware_lines[1:]]
    if outcome.device_lines:
        lines += ["", "**Precisions on this device.** " + outcome.device_lines[0], *outcome.device_lines[1:]]
    if outcome.result.excluded:
        lines.append(f"Excluded from the ranking (missing metrics): {', '.join(outcome.result.excluded)}.")
    if outcome.contaminated_excluded:
        lines.append("Excluded from the ranking (contaminated windows, ranking.contaminated: exclude): "
                     f"{', '.join(outcome.contaminated_excluded)}.")
    if outcome.disturbance_lines:
        lines += ["", "**Disturbed measurements.** " + outcome.disturbance_lines[0],
                  *outcome.disturbance_lines[1:]]
    if outcome.data_lines:
        lines += ["", "**What was scored.**", *outcome.data_lines]
    lines += ["", "**Energy method.** " + describe_methods(set(outcome.methods)) + "."]
    lines += list(outcome.energy_lines)
    if any(is_estimate(m) for m in outcome.methods):
        lines.append(
            "Differences between precisions on this machine reflect run time under an estimated power model; "
            "treat them as estimates, not measurements."
        )
    lines += ["", "**Where the weights came from.**"]
    lines += [f"- {model}: {origin}" for model, origin in sorted(weights_origin.items())]
    if skipped:
        lines += ["", "**Skipped configurations.**"]
        lines += [f"- {s['config_id']}: {s['reason']}" for s in skipped]
    if finetune_lines:
        lines += ["", "**Fine-tuning against the base model.**"] + finetune_lines
    if failures:
        lines += ["", "**Failed configurations.**"]
        lines += [f"- {f['job']}: {f['error']}" for f in failures]
    return "\n".join(lines)


def separability_sentence(outcome: RankingOutcome) -> str:
    """The headline: one config only when the data separate it from the rest, else the set."""
    table = outcome.result.table
    at_w = table[np.isclose(table["w"], outcome.w)]
    if "tied_with_top" not in at_w or at_w["p_best"].isna().all():
        return ("_Whether the top configuration is separable from the others was not estimated (no per-item "
                "scores to resample, or ranking.bootstrap: 0)._")
    tied = at_w[at_w["tied_with_top"].astype(bool)].sort_values(["rank", "config_id"])
    share = f"{rank.TIED_WITH_TOP_SHARE:.0%}"
    if len(tied) == 1:
        row = tied.iloc[0]
        return (f"**Best at w = {outcome.w:g}: {pretty_config(row['config_id'])}**, best in "
                f"{row['p_best']:.0%} of joint resamples of items and energy repeats; no other config is "
                f"best in {share} or more of them.")
    names = ", ".join(f"{pretty_config(r['config_id'])} ({r['p_best']:.0%})" for _, r in tied.iterrows())
    return (f"**No single best configuration at w = {outcome.w:g}.** The data cannot separate {len(tied)} "
            f"configs: {names}, each best in at least {share} of joint resamples of items and energy repeats "
            "(or first in the point ranking). More items, or more energy repeats, would be needed to tell "
            "them apart.")


def finetune_effect(scores: pd.DataFrame, energy: pd.DataFrame, task: str = "rca",
                    metric: str = "accuracy") -> list[str]:
    """One sentence per fine-tuned config: does it beat its base model on the task, and by how much."""
    meta = energy.drop_duplicates("config_id").set_index(
        "config_id")[["model", "precision", "adapter", "pruning"]]
    values = scores[(scores["task"] == task) & (scores["metric"] == metric)].set_index("config_id")
    lines = []
    for config_id, row in meta[(meta["adapter"] != "none") & (meta["pruning"] == "none")].iterrows():
        base = meta[(meta["model"] == row["model"]) & (meta["precision"] == row["precision"])
                    & (meta["adapter"] == "none") & (meta["pruning"] == "none")]
        if config_id not in values.index or base.empty or base.index[0] not in values.index:
            continue
        tuned, before = values.loc[config_id], values.loc[base.index[0]]
        delta = tuned["value"] - before["value"]
        overlap = tuned["ci_low"] <= before["ci_high"] and before["ci_low"] <= tuned["ci_high"]
        verdict = ("beats" if delta > 0 else "does NOT beat") + " its base model"
        lines.append(f"- {config_id}: {task} {metric} {tuned['value']:.3f} vs {before['value']:.3f} for "
                     f"{base.index[0]} ({delta:+.3f}); it {verdict}"
                     + (" (95% intervals overlap: not a clear difference)" if overlap else "") + ".")
    return lines


def not_trained(study_dir: str | Path) -> list[dict[str, str]]:
    """The fine-tuning configs (LoRA on an unpruned model) that were skipped or failed, with why
    (configs.csv): what Figure 3 would have drawn. A reason keeps its measured part, up to the advice
    after its first semicolon, and its first line."""
    configs = results.read_table(study_dir, "configs")
    if configs.empty or not {"status", "adapter", "pruning"} <= set(configs.columns):
        return []
    rows = configs[configs["status"].isin(["skipped", "failed"]) & (configs["adapter"].astype(str) == "lora")
                   & (configs["pruning"].astype(str) == "none")]

    def why(row: Any) -> str:
        text = str(row["reason"]).strip() if pd.notna(row["reason"]) else ""
        return text.splitlines()[0].split("; ")[0] if text else str(row["status"])

    return [{"model": str(r["model"]), "precision": str(r["precision"]), "reason": why(r)}
            for _, r in rows.iterrows()]


def config_notes(study_dir: str | Path) -> tuple[dict[str, str], list[dict[str, str]], list[dict[str, str]]]:
    """Weights origin per model, skipped configs and failed jobs, from the run's tables."""
    configs = results.read_table(study_dir, "configs")
    origin = {}
    # A model's own weights: from a config with neither adapter nor pruning when there is one.
    plain = (configs["adapter"].astype(str) == "none") & (configs["pruning"].astype(str) == "none")
    for _, row in pd.concat([configs[plain], configs[~plain]]).iterrows():
        if isinstance(row.get("weights_origin"), str) and row["weights_origin"]:
            origin.setdefault(row["model"], row["weights_origin"])
    skipped = [
        {"config_id": r["config_id"], "reason": str(r["reason"])}
        for _, r in configs[configs["status"] == "skipped"].iterrows()
    ]
    failures_path = Path(study_dir) / "failures.json"
    failures = json.loads(failures_path.read_text()) if failures_path.exists() else []
    return origin, skipped, failures


def pruning_kernels_markdown(study_dir: str | Path) -> str:
    """Which kernels each pruned config ran, so nobody reads an energy saving into masked zeros."""
    configs = results.read_table(study_dir, "configs")
    if not len(configs) or "pruning" not in configs:
        return ""
    pruned = configs[(configs["pruning"].astype(str) != "none") & (configs["status"] == "ok")]
    if not len(pruned):
        return ""
    lines = [("**Kernels of the pruned configurations.** Pruning lowers energy only where a sparse kernel "
             "skips the zeros; masked weights through dense kernels cost the same as the dense model.")]
    for _, row in pruned.sort_values("config_id").iterrows():
        kernel = row.get("kernel")
        kernel = kernel if isinstance(kernel, str) and kernel else "dense"
        note = row.get("kernel_note")
        note = f" — {note}" if isinstance(note, str) and note else ""
        lines.append(f"- {row['config_id']}: {kernel}{note}")
    return "\n".join(lines)


def figure_energy_method(methods: tuple[str, ...]) -> str | None:
    return ", ".join(methods) if methods else None


def load_tables(study_dir: str | Path) -> dict[str, pd.DataFrame]:
    return {name: results.read_table(study_dir, name)
            for name in ("energy", "scores", "training", "token_lengths")}


def empty(frame: Any) -> bool:
    return frame is None or len(frame) == 0


def recovery_markdown(study_dir: str | Path, metrics: tuple[tuple[str, str], ...] | None = None) -> str:
    """Per recovered config: the quality pruning cost and recovery won back, beside the energy the
    recovery fine-tuning spent; ``metrics`` (task, metric) default to each task's headline metric
    (config.headline_metric under the study's QA style)."""
    energy = results.read_table(study_dir, "energy")
    scores = results.read_table(study_dir, "scores")
    if metrics is None:
        metrics = verdict_metrics(study_qa_style(study_dir, scores))
    training = energy[energy["phase"] == "recovery"]
    if training.empty:
        return ""
    values = scores.set_index(["config_id", "task", "metric"])["value"]
    lines = [("**Recovery fine-tuning.** A LoRA adapter trained on each pruned model (its pruned weights "
             "unchanged): quality before pruning → pruned → recovered, and the energy the recovery training "
             "spent.")]
    for _, row in training.sort_values("config_id").iterrows():
        recovered = str(row["config_id"])
        pruned = parent_config_id(recovered) or recovered
        target = parent_config_id(pruned, pruning=str(row["pruning"])) or pruned
        parts = []
        for task, metric in metrics:
            got = [values.get((c, task, metric)) for c in (target, pruned, recovered)]
            if all(v is not None and not pd.isna(v) for v in got):
                parts.append(f"{task} {metric} {got[0]:.3f} → {got[1]:.3f} → {got[2]:.3f}")
        estimate = (" (estimate)" if isinstance(row.get("estimated_components"), str)
                    and row["estimated_components"] else "")
        lines.append(f"- {pruned}: {'; '.join(parts) or 'no scores'}; recovery training "
                     f"{_fmt_energy(row['energy_kwh'])}{estimate} over {int(row['n_items'])} examples")
    return "\n".join(lines)


VERDICT_TASKS: tuple[str, ...] = ("rca", "qa", "rca_resolution")
VERDICT_KINDS: dict[str, str] = {"quantization": "quantization verdicts",
                                 "pruning": "pruning and recovery verdicts"}


def verdict_metrics(qa_style: str) -> tuple[tuple[str, str], ...]:
    """What "quality changed" is judged on, per task: its headline metric (config.headline_metric)."""
    return tuple((task, headline_metric(task, qa_style)) for task in VERDICT_TASKS)


def judged_pairs(configs: pd.DataFrame, kind: str) -> list[tuple[str, str]]:
    """The (config, reference) pairs a paragraph of the report judges: ``kind`` "quantization" pairs
    each unpruned precision with its own model's fp32 (same adapter); "pruning" pairs each pruned
    config with its target, and each recovered config with its pruned one."""
    meta = configs.set_index("config_id")
    pairs = []
    if kind == "quantization":
        plain = meta[meta["pruning"] == "none"]
        for config_id, row in plain.iterrows():
            if row["precision"] == "fp32":
                continue
            reference = plain[(plain["model"] == row["model"]) & (plain["precision"] == "fp32")
                              & (plain["adapter"] == row["adapter"])]
            if len(reference):
                pairs.append((str(config_id), str(reference.index[0])))
    elif kind == "pruning":
        for config_id, row in meta[meta["pruning"] != "none"].iterrows():
            config_id = str(config_id)
            reference = parent_config_id(config_id, pruning=str(row["pruning"]))
            if reference in meta.index:
                pairs.append((config_id, reference))
    else:
        raise ValueError(f"kind must be one of {list(VERDICT_KINDS)}; got {kind!r}")
    return sorted(pairs)


def adjust_comparisons(comparisons: pd.DataFrame, configs: pd.DataFrame, qa_style: str) -> pd.DataFrame:
    """comparisons.csv with ``family`` and ``p_adjusted`` filled for the pairs the report judges:
    Holm's correction within each family, one family per paragraph of verdicts (quantization; pruning
    and recovery) and per headline metric, e.g. "quantization:qa:acc". Pairs on fewer than
    MIN_VERDICT_ITEMS items get no verdict and stay out of the family; every other row keeps
    ``family`` and ``p_adjusted`` empty."""
    out = comparisons.copy()
    out["family"] = ""
    out["p_adjusted"] = np.nan
    if out.empty:
        return out
    key = {(a, b, t, m): i
           for i, (a, b, t, m) in enumerate(zip(out["config_a"], out["config_b"], out["task"],
                                                out["metric"]))}
    for kind in VERDICT_KINDS:
        pairs = judged_pairs(configs, kind)
        for task, metric in verdict_metrics(qa_style):
            rows = []
            for config_id, reference in pairs:
                index = key.get((config_id, reference, task, metric),
                                key.get((reference, config_id, task, metric)))
                if index is not None and int(out.iloc[index]["n_items"]) >= MIN_VERDICT_ITEMS:
                    rows.append(out.index[index])
            if not rows:
                continue
            out.loc[rows, "family"] = f"{kind}:{task}:{metric}"
            out.loc[rows, "p_adjusted"] = holm(out.loc[rows, "p_value"].astype(float).tolist())
    return out


def quality_changes(outcome: RankingOutcome, kind: str, alpha: float = 0.05) -> str:
    """Whether quality changed beyond noise, in words, from the paired comparisons, on each task's
    headline metric: ``kind`` "quantization" compares each precision with its own model's fp32 (same
    adapter); "pruning" compares each pruned config with its target, and each recovered config with its
    pruned one. The verdict reads the Holm-adjusted p-value of the paragraph's family; a metric on fewer
    than MIN_VERDICT_ITEMS items gets "too few items to judge" instead of a verdict."""
    table = outcome.comparisons
    if table is None or table.empty:
        return ""
    pairs = judged_pairs(outcome.configs, kind)
    if not pairs:
        return ""
    title = ("**Quantization against fp32, paired on the same items.**" if kind == "quantization" else
             "**Pruning against its unpruned config (and recovery against its pruned one), paired on the "
             "same items.**")
    metrics = verdict_metrics(outcome.qa_style)
    lines = [title + " Each task is judged on its headline metric "
             f"({', '.join(f'{t} {m}' for t, m in metrics)}). A change is beyond noise when its p-value, "
             f"Holm-adjusted over this paragraph's pairs for that metric (p_adj), is below {alpha:g}; the "
             "test is McNemar's exact test for accuracies and a paired sign-flip permutation test otherwise, "
             "and the interval the paired-bootstrap 95% interval of the difference. A metric scored on "
             f"fewer than {MIN_VERDICT_ITEMS} items gets no verdict."]
    for config_id, reference in pairs:
        parts = []
        for task, metric in metrics:
            row = rank.compare(table, config_id, reference, task, metric)
            if row is None:
                continue
            head = (f"{task} {metric} {row['diff']:+.3f} [{row['ci_low']:+.3f}, {row['ci_high']:+.3f}] "
                    f"on {int(row['n_items'])} items")
            adjusted = row.get("p_adjusted")
            if int(row["n_items"]) < MIN_VERDICT_ITEMS or adjusted is None or pd.isna(adjusted):
                parts.append(f"{head}: too few items to judge")
                continue
            verdict = "beyond noise" if adjusted < alpha else "within noise"
            parts.append(f"{head}, p = {row['p_value']:.3g}, p_adj = {adjusted:.3g}: {verdict}")
        if parts:
            lines.append(f"- {config_id} vs {reference}: " + "; ".join(parts))
    return "\n".join(lines)


def scale_lines(table: pd.DataFrame, settings: RankingSettings) -> list[str]:
    """The observed ranges of φ and ρ at the headline w and the weight energy effectively gets there:
    w·span(φ) / (w·span(φ) + (1−w)·span(ρ)). φ spans [0, 1] under min-max by construction while ρ spans
    only the accuracies observed, so w = 0.5 can weigh energy several times more than quality."""
    at_w = table[np.isclose(table["w"].astype(float), settings.w)].drop_duplicates("config_id")
    if len(at_w) < 2:
        return []
    phi = at_w["phi"].astype(float)
    rho = at_w["rho"].astype(float)
    span_phi, span_rho = float(phi.max() - phi.min()), float(rho.max() - rho.min())
    w = settings.w
    total = w * span_phi + (1 - w) * span_rho
    effective = w * span_phi / total if total > 0 else float("nan")
    scale = ("ρ is min-max scaled over the configs (ranking.rho_scale: minmax)"
             if settings.rho_scale == "minmax"
             else "ρ as observed (ranking.rho_scale: raw, the paper's definition; rho_scale: minmax scales "
                  "it to [0, 1])")
    return [f"Observed ranges at w = {w:g}: φ {phi.min():.3f}–{phi.max():.3f}, ρ "
            f"{rho.min():.3f}–{rho.max():.3f} ({scale}). Across these configs energy effectively weighs "
            f"{effective:.0%} of R's spread (w·span φ / (w·span φ + (1−w)·span ρ)), quality "
            f"{1 - effective:.0%}."
            if not math.isnan(effective) else
            f"Observed ranges at w = {w:g}: φ {phi.min():.3f}–{phi.max():.3f}, ρ "
            f"{rho.min():.3f}–{rho.max():.3f}."]


def token_energy(energy: pd.DataFrame) -> pd.DataFrame:
    """Per evaluated config: J per input token over its scoring windows (tokens as they ran) and J per
    output token over its generation windows, gross and net of loaded idle."""
    rows = energy[energy["phase"].isin(rank.EVALUATION_PHASES)].copy()
    out = []
    for config_id, group in rows.groupby("config_id", sort=True):
        scoring = group[group.get("n_generated_tokens",
                                  pd.Series(0, index=group.index)).fillna(0).astype(float) == 0]
        generation = group.drop(scoring.index)
        row = {"config_id": config_id}
        tokens = scoring["n_tokens"].astype(float).sum()
        if tokens > 0:
            row["j_per_input_token"] = scoring["energy_kwh"].astype(float).sum() * J_PER_KWH / tokens
            row["j_per_input_token_net"] = scoring["energy_net_kwh"].astype(float).sum() * J_PER_KWH / tokens
        new = generation["n_generated_tokens"].astype(float).sum() if len(generation) else 0.0
        if new > 0:
            row["j_per_output_token"] = generation["energy_kwh"].astype(float).sum() * J_PER_KWH / new
            row["j_per_output_token_net"] = generation["energy_net_kwh"].astype(float).sum() * J_PER_KWH / new
        out.append(row)
    return pd.DataFrame(out, columns=["config_id", "j_per_input_token", "j_per_input_token_net",
                                      "j_per_output_token", "j_per_output_token_net"])


def _joules(kwh: float) -> str:
    j = kwh * J_PER_KWH
    return f"{j / 1000:.3g} kJ" if abs(j) >= 1000 else f"{j:.3g} J"


def lifecycle_verdicts(outcome: RankingOutcome, alpha: float = 0.05) -> dict[str, tuple[str, bool]]:
    """Per config with a reference: its quality change against the reference on each task's headline
    metric, in words, and whether it is worse beyond noise (Holm over the configs compared, per metric;
    fewer than MIN_VERDICT_ITEMS items: no verdict)."""
    table = outcome.lifecycle
    comparisons = outcome.comparisons
    if table is None or comparisons is None or comparisons.empty:
        return {}
    totals = table[(table["step"] == "total") & (table["reference"].fillna("") != "")]
    pairs = [(str(c), str(r)) for c, r in zip(totals["config_id"], totals["reference"]) if str(c) != str(r)]
    found: dict[tuple[str, str, str], dict] = {}
    for task, metric in verdict_metrics(outcome.qa_style):
        if task == "rca_resolution":
            continue
        rows = [(c, rank.compare(comparisons, c, r, task, metric)) for c, r in pairs]
        judged = [(c, row) for c, row in rows if row is not None and int(row["n_items"]) >= MIN_VERDICT_ITEMS]
        adjusted = holm([float(row["p_value"]) for _, row in judged])
        for (c, row), p_adj in zip(judged, adjusted):
            found[(c, task, metric)] = {**row, "p_adjusted": p_adj}
    out = {}
    for config_id, _ in pairs:
        parts, worse = [], False
        for task, metric in verdict_metrics(outcome.qa_style):
            row = found.get((config_id, task, metric))
            if row is None:
                continue
            beyond = row["p_adjusted"] < alpha
            worse |= beyond and row["diff"] < 0
            parts.append(f"{task} {row['diff']:+.3f}" + (" (beyond noise)" if beyond else ""))
        out[config_id] = ("; ".join(parts) or "not compared", worse)
    return out


def lifecycle_figure_configs(outcome: RankingOutcome, most: int = 6) -> list[str]:
    """The configs Figure 8 draws (their references are added by the figure): the top set at w, then
    the configs whose break-even is a number of queries, fewest first, up to ``most`` in all."""
    top = [c for c, _ in tied_at(outcome.result.table, outcome.w)]
    table = outcome.lifecycle
    if table is None or table.empty:
        return top
    totals = table[table["step"] == "total"]
    counted = sorted(((int(v), str(c)) for c, v in zip(totals["config_id"], totals["break_even_queries"])
                      if str(v).isdigit()), key=lambda pair: pair[0])
    return (top + [c for _, c in counted if c not in top])[: max(most, len(top))]


def lifecycle_markdown(outcome: RankingOutcome, focus: list[str] | None = None) -> str:
    """The "What it costs over its life" section: per config its setup energy, energy per query, the
    break-even query count against its reference and the quality change beside it; then J per input
    and per output token. ``focus``: the configs to list (default: every config with a setup cost, and
    every config whose break-even is not "reference")."""
    table = outcome.lifecycle
    if table is None or table.empty:
        return ""
    totals = table[table["step"] == "total"].set_index("config_id")
    verdicts = lifecycle_verdicts(outcome)
    ids = focus or [c for c in totals.index if totals.loc[c, "break_even_queries"] != "reference"]
    lines = [("**Setup energy against energy per query.** Making a variant costs energy once (fine-tuning, "
              "Wanda calibration, pruning, re-quantization, recovery fine-tuning: every measured step along "
              "its lineage); serving costs energy per query (one scored item). Against its reference (its "
              "model at fp32, no adapter, no pruning) a variant pays for itself after the break-even number "
              "of queries: \"immediately\" when it costs no more setup and no more per query, \"never\" when "
              "its per-query energy is not lower. A quality change marked beyond noise (McNemar's exact "
              "test, Holm over the variants compared per metric) means the saving is bought with quality."),
             "", "| config | setup | per query | break-even (queries) | quality vs reference |",
             "|---|---|---|---|---|"]
    for config_id in ids:
        if config_id not in totals.index:
            continue
        row = totals.loc[config_id]
        steps = table[(table["config_id"] == config_id) & (table["step"] != "total")]
        estimate = " (estimate)" if steps["estimate"].astype(bool).any() else ""
        setup = _joules(float(row["setup_kwh"])) + estimate if float(row["setup_kwh"]) > 0 else "none"
        quality, worse = verdicts.get(config_id, ("—", False))
        verdict = str(row["break_even_queries"])
        lines.append(f"| {config_id} | {setup} | {float(row['per_query_j']):.3g} J | "
                     f"{'**' + verdict + '** (worse beyond noise)' if worse else verdict} | {quality} |")
    shared = table[(table["step"] != "total") & (table["shared_with"].fillna("") != "")]
    if len(shared):
        lines += ["", "Shared setup steps (counted once in each config that inherits them): "
                  + "; ".join(sorted({f"{r.step} of {r.source_config}" for r in shared.itertuples()})) + "."]
    tokens = outcome.token_energy
    if tokens is not None and len(tokens):
        lines += ["", ("**Energy per token** (J; input tokens as they ran in the scoring windows, a shared "
                       "few-shot prefix once; output tokens: a generation window's whole energy over its new "
                       "tokens, prefill not split), gross / net of loaded idle:"), "",
                  "| config | J per input token | J per output token |", "|---|---|---|"]
        for row in tokens.itertuples():
            cells = []
            for name in ("j_per_input_token", "j_per_output_token"):
                gross, net = getattr(row, name), getattr(row, f"{name}_net")
                cells.append("—" if pd.isna(gross) else f"{gross:.3g} / {net:.3g}")
            lines.append(f"| {row.config_id} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


# --- tables a person reads (the report's Tables section) ------------------------------------------


def energy_view(energy: pd.DataFrame) -> pd.DataFrame:
    """energy.csv in units a person reads: per config (model · precision · adapter · pruning), phase and
    task, mWh per item gross and net of loaded idle with its standard error, J per 1k tokens as run,
    mg CO2e per item, seconds, windows (and those kept contaminated), the method and what is estimated."""
    rows = energy[energy["phase"].isin(rank.EVALUATION_PHASES)].copy()
    if rows.empty:
        return pd.DataFrame()
    items = pd.to_numeric(rows["n_items"], errors="coerce").clip(lower=1)
    tokens = pd.to_numeric(rows["n_tokens"], errors="coerce").clip(lower=1)
    kwh = pd.to_numeric(rows["energy_kwh"], errors="coerce")
    view = pd.DataFrame({
        "config": rows["config_id"].map(pretty_config), "phase": rows["phase"], "task": rows["task"],
        "items": rows["n_items"], "tokens as run": rows["n_tokens"],
        "mWh per item": kwh * 1e6 / items,
        "± (s.e.)": pd.to_numeric(rows.get("energy_kwh_se"), errors="coerce") * 1e6 / items,
        "net mWh per item": pd.to_numeric(rows["energy_net_kwh"], errors="coerce") * 1e6 / items,
        "J per 1k tokens": kwh * 3.6e6 * 1000 / tokens,
        "mg CO2e per item": pd.to_numeric(rows["emissions_kg"], errors="coerce") * 1e6 / items,
        "seconds": pd.to_numeric(rows["duration_s"], errors="coerce"),
        "windows": rows.get("windows"),
        "contaminated": rows.get("contaminated_windows"),
        "method": rows["energy_method"],
        "estimated": rows.get("estimated_components"),
    })
    return view.reset_index(drop=True)


def ranking_view(table: pd.DataFrame, w: float) -> pd.DataFrame:
    """The ranking at w: rank, config, R, φ, ρ, mWh per item, on the Pareto front, p_best."""
    at_w = table[np.isclose(table["w"], w)].sort_values(["rank", "config_id"])
    view = pd.DataFrame({"rank": at_w["rank"], "config": at_w["config_id"].map(pretty_config),
                         "R": at_w["R"], "φ": at_w["phi"], "ρ": at_w["rho"],
                         "mWh per item": at_w["energy_kwh_per_item"].astype(float) * 1e6,
                         "Pareto front": at_w["pareto"].map({True: "yes", False: ""})})
    if "p_best" in at_w:
        view["p_best"] = at_w["p_best"].map(lambda p: "" if pd.isna(p) else f"{p:.0%}")
    return view.reset_index(drop=True)


def scores_view(scores: pd.DataFrame) -> pd.DataFrame:
    """Every metric of every config (rows: model · precision · adapter · pruning), three decimals."""
    table = scores.assign(config=scores["config_id"].map(pretty_config))
    return table.pivot_table(index="config", columns=["task", "metric"], values="value").round(3)


def collapsible(frame: pd.DataFrame, title: str, note: str = "", open: bool = False, digits: int = 3) -> str:
    """A table as HTML inside <details>, so a wide table does not push the report sideways: its title
    always shown, the table when opened (``open``: shown from the start)."""
    from html import escape

    if frame is None or frame.empty:
        return f"<p><em>{escape(title)}: nothing to show.</em></p>"
    body = frame.to_html(index=isinstance(frame.index, pd.MultiIndex) or frame.index.name is not None,
                         float_format=lambda v: f"{v:.{digits}g}" if abs(v) < 10 ** digits else f"{v:.0f}",
                         na_rep="", border=0, classes="llm-energy-table")
    summary = f"<summary><strong>{escape(title)}</strong> ({len(frame)} rows)</summary>"
    text = f"<p>{escape(note)}</p>" if note else ""
    return (f"<details{' open' if open else ''}>{summary}{text}"
            f"<div style=\"overflow-x:auto\">{body}</div></details>")
