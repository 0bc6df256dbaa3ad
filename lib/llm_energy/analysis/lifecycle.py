"""What a deployment costs over its life: the energy spent making each config (setup), amortised over
the queries it serves, and the query count at which it pays for itself against its reference.

A config's **setup** is every measured step that made it, along its lineage (a config id's grammar,
:func:`llm_energy.layout.parent_config_id`): the fine-tuning epochs of its adapter (energy.csv, phase
``finetune``), the pruning phase's steps (setup_energy.csv: loading, Wanda calibration, pruning,
re-quantization) and recovery fine-tuning (phase ``recovery``). A config that inherits an adapter
counts that adapter's training once, and the table says which other configs share the step.

A **query** is one scored item; a config's energy per query is its inference energy over all its tasks
divided by its items (the ranking's energy per item). Its **reference** is its model at fp32 without
adapter or pruning. Over a life of N queries a config costs setup + N x per-query; its **break-even**
is the smallest N at which that is at most the reference's: "immediately" when it costs no more setup
and no more per query, "never" when its per-query energy is not lower (and it costs more setup), a
number otherwise, and "unknown: <why>" when a setup step it needs was not measured.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from ..layout import RECOVERED_SUFFIX, config_id_for, parent_config_id
from ..measure.meter import J_PER_KWH, component_methods, is_estimate

__all__ = [
    "DEFAULT_LIFECYCLE_QUERIES",
    "LIFECYCLE_COLUMNS",
    "SetupStep",
    "break_even",
    "lifecycle_table",
    "setup_steps",
]

DEFAULT_LIFECYCLE_QUERIES: tuple[float, ...] = (1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8)
LIFECYCLE_COLUMNS: tuple[str, ...] = (
    "config_id", "reference", "step", "source_config", "setup_kwh", "setup_net_kwh", "setup_g_co2e", "method",
    "estimate", "shared_with", "per_query_j", "reference_per_query_j", "reference_setup_kwh",
    "break_even_queries",
)
TRAINING_STEPS = {"finetune": "fine-tuning", "recovery": "recovery fine-tuning"}


@dataclass(frozen=True)
class SetupStep:
    """One measured step that made a config (or an ancestor it inherits from)."""

    step: str
    source_config: str  # the config whose job ran the step
    kwh: float
    net_kwh: float
    g_co2e: float
    method: str  # every component's method, ";"-joined
    estimate: bool


def _meta(configs: pd.DataFrame, energy: pd.DataFrame) -> dict[str, tuple[str, str]]:
    """config_id -> (adapter, pruning) from configs.csv and energy.csv rows."""
    meta: dict[str, tuple[str, str]] = {}
    for frame in (energy, configs):
        if frame is None or frame.empty or "adapter" not in frame:
            continue
        for row in frame.drop_duplicates("config_id").itertuples():
            meta[str(row.config_id)] = (str(row.adapter), str(row.pruning))
    return meta


def lineage(config_id: str, meta: dict[str, tuple[str, str]]) -> list[str]:
    """The config and every config it was made from, itself first."""
    chain = [config_id]
    while True:
        adapter, pruning = meta.get(chain[-1], ("none", "none"))
        parent = parent_config_id(chain[-1], adapter, pruning)
        if parent is None or parent in chain:
            return chain
        chain.append(parent)


def _step(step: str, source: str, rows: pd.DataFrame) -> SetupStep:
    methods = sorted({m for m in component_methods(rows) if m})
    net = (rows["energy_net_kwh"].astype(float) if "energy_net_kwh" in rows
           else pd.Series(float("nan"), index=rows.index))
    return SetupStep(step=step, source_config=source, kwh=float(rows["energy_kwh"].astype(float).sum()),
                     net_kwh=float(net.sum(min_count=1)),
                     g_co2e=float(rows["emissions_kg"].astype(float).sum() * 1000), method=";".join(methods),
                     estimate=any(is_estimate(m) for m in methods) or not methods)


def setup_steps(config_id: str, energy: pd.DataFrame, setup_energy: pd.DataFrame,
                meta: dict[str, tuple[str, str]]) -> tuple[list[SetupStep], list[str]]:
    """Every measured setup step of a config along its lineage, and why any expected step is unknown."""
    steps: list[SetupStep] = []
    unknown: list[str] = []
    for source in lineage(config_id, meta):
        adapter, pruning = meta.get(source, ("none", "none"))
        parent = parent_config_id(source, adapter, pruning)
        training = energy[(energy["config_id"].astype(str) == source)
                          & energy["phase"].isin(list(TRAINING_STEPS))]
        for phase, rows in training.groupby("phase", sort=False):
            steps.append(_step(TRAINING_STEPS[str(phase)], source, rows))
        made = (setup_energy[setup_energy["config_id"].astype(str) == source] if not setup_energy.empty
                else setup_energy)
        if len(made):
            for _, row in made.sort_values("order").iterrows():
                steps.append(_step(str(row["step"]), source, made[made["step"] == row["step"]]))
        recovered = parent is not None and source.endswith(f"__{RECOVERED_SUFFIX}")
        if recovered and training.empty:
            unknown.append(f"the recovery fine-tuning of {source} was not measured (its job failed or was "
                           "skipped)")
        elif pruning != "none" and not recovered and not len(made):
            unknown.append(f"the pruning setup of {source} was not measured (a study from before setup "
                           "metering, or its job failed)")
        elif adapter != "none" and pruning == "none" and not recovered and training.empty:
            unknown.append(f"the fine-tuning of {source}'s adapter was not measured (its job failed or was "
                           "skipped)")
    return steps, unknown


def break_even(setup_j: float, per_query_j: float, reference_setup_j: float,
               reference_per_query_j: float) -> str:
    """The smallest number of queries N at which setup + N x per-query is at most the reference's:
    "immediately" (no more setup and no more per query), "never" (per query not lower, with more setup;
    or per query higher), else N."""
    extra_setup = setup_j - reference_setup_j
    saving = reference_per_query_j - per_query_j
    if extra_setup <= 0 and saving >= 0:
        return "immediately"
    if saving <= 0:
        return "never"
    return str(max(1, math.ceil(extra_setup / saving - 1e-9)))


def lifecycle_table(configs: pd.DataFrame, energy: pd.DataFrame, setup_energy: pd.DataFrame,
                    configs_table: pd.DataFrame | None = None, basis: str = "gross") -> pd.DataFrame:
    """lifecycle.csv: per ranked config (``configs``: config_energy rows) one row per setup step (with the
    config that ran it and who else shares it) and one ``total`` row with energy per query, the
    reference's and the break-even query count. ``basis`` "net" takes setup energy net of idle."""
    meta = _meta(configs_table if configs_table is not None else pd.DataFrame(), energy)
    for row in configs.itertuples():
        meta.setdefault(str(row.config_id), (str(row.adapter), str(row.pruning)))
    per_query = {str(c): float(e) * J_PER_KWH
                 for c, e in zip(configs["config_id"], configs["energy_kwh_per_item"])}
    found = {str(c): setup_steps(str(c), energy, setup_energy, meta) for c in configs["config_id"]}
    users: dict[tuple[str, str], list[str]] = {}
    for config_id, (steps, _) in found.items():
        for s in steps:
            users.setdefault((s.step, s.source_config), []).append(config_id)

    def total_j(steps: Sequence[SetupStep]) -> float:
        return sum((s.net_kwh if basis == "net" else s.kwh) for s in steps) * J_PER_KWH

    rows = []
    for row in configs.itertuples():
        config_id = str(row.config_id)
        steps, unknown = found[config_id]
        reference = config_id_for(str(row.model), "fp32")
        has_reference = reference in per_query
        for s in steps:
            others = [c for c in users[(s.step, s.source_config)] if c != config_id]
            rows.append({"config_id": config_id, "reference": reference if has_reference else "",
                         "step": s.step, "source_config": s.source_config, "setup_kwh": s.kwh,
                         "setup_net_kwh": s.net_kwh, "setup_g_co2e": s.g_co2e, "method": s.method,
                         "estimate": s.estimate, "shared_with": " ".join(sorted(others))})
        if config_id == reference:
            verdict = "reference"
        elif unknown:
            verdict = "unknown: " + "; ".join(unknown)
        elif not has_reference:
            verdict = f"unknown: no reference ({reference}, the model at fp32, was not evaluated)"
        else:
            verdict = break_even(total_j(steps), per_query[config_id], total_j(found[reference][0]),
                                 per_query[reference])
        # the total's energy is setup + queries x per query: both methods count
        per_query_methods = str(getattr(row, "energy_method", "") or "")
        methods = sorted({m for s in steps for m in s.method.split(";") if m}
                         | {m for m in per_query_methods.split(";") if m and m != "nan"})
        rows.append({
            "config_id": config_id, "reference": reference if has_reference else "", "step": "total",
            "source_config": config_id, "setup_kwh": sum(s.kwh for s in steps),
            "setup_net_kwh": sum(s.net_kwh for s in steps), "setup_g_co2e": sum(s.g_co2e for s in steps),
            "method": ";".join(methods),
            "estimate": any(s.estimate for s in steps) or any(is_estimate(m) for m in methods) or not methods,
            "shared_with": "",
            "per_query_j": per_query[config_id],
            "reference_per_query_j": per_query.get(reference, float("nan")),
            "reference_setup_kwh": (sum(s.kwh for s in found[reference][0]) if reference in found
                                    else float("nan")),
            "break_even_queries": verdict,
        })
    return pd.DataFrame(rows, columns=list(LIFECYCLE_COLUMNS))


def amortized_energy_per_item(configs: pd.DataFrame, lifecycle: pd.DataFrame, queries: float,
                              basis: str = "gross") -> pd.Series:
    """Energy per item (kWh) over a life of ``queries``: setup / queries + energy per query."""
    totals = lifecycle[lifecycle["step"] == "total"].set_index("config_id")
    setup = totals["setup_net_kwh" if basis == "net" else "setup_kwh"].astype(float)
    ids = configs["config_id"].astype(str)
    return pd.Series(configs["energy_kwh_per_item"].astype(float).to_numpy()
                     + ids.map(setup).fillna(0.0).to_numpy()
                     / queries, index=configs.index)
