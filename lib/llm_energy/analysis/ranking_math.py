"""Rank model variants ("configs") by a weighted blend of energy efficiency and task quality.

For a weight ``w`` in [0, 1] the score of a config is

    R(config, w) = w * phi(config) + (1 - w) * rho(config)

where ``phi`` is energy efficiency scaled to [0, 1] over the compared configs and ``rho``
is the mean of the chosen task metrics, each scaled to [0, 1]. Sweeping ``w`` from 0
(quality only) to 1 (energy only) shows how robust a recommendation is to the trade-off.

The chosen metrics are ``settings.metrics`` when set, else ONE headline metric per task
(:func:`llm_energy.config.headline_metric`: RCA accuracy; QA acc_norm for the cloze style, acc
for lettered options), so that no task counts twice. The point ranking and the resampling
(:func:`rank_stability`) use exactly the same metrics and the same arithmetic on them
(:func:`rho_from_items` is the resampling's ρ on the data as observed). A metric with no
per-item scores (RCA macro-F1, a corpus-level statistic) cannot be resampled item by item from
the tables, so :func:`rank_stability` refuses it rather than resample a different ρ.

Metrics are named ``"task:metric"`` (e.g. ``"rca:accuracy"``, ``"qa:acc_norm"``).
Config ids are compared as strings throughout, so ids read from CSV as numbers still join.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from ..config import PHI_METHODS, TASK_NAMES, RankingSettings, headline_metric
from ..measure.meter import component_methods
from .significance import mcnemar_exact, paired_interval, paired_test

__all__ = [
    "COMPARISON_COLUMNS",
    "CONFIG_COLUMNS",
    "ENERGY_REPEAT_COLUMNS",
    "ENERGY_WINDOW_COLUMNS",
    "EVALUATION_PHASES",
    "ITEM_SCORE_COLUMNS",
    "MetricScaling",
    "MissingPolicy",
    "PhiMethod",
    "RANKING_COLUMNS",
    "RankingResult",
    "SCORE_COLUMNS",
    "TIED_WITH_TOP_SHARE",
    "TIE_TOLERANCE",
    "add_top_uncertainty",
    "check_one_scope",
    "chosen_metrics",
    "compare",
    "compute_phi",
    "compute_rho",
    "config_energy",
    "energy_draws",
    "headline_metrics",
    "mcnemar_exact",
    "paired_comparisons",
    "pareto_front",
    "pareto_optimal",
    "rank_configs",
    "rank_evaluations",
    "rank_stability",
    "repeat_energy",
    "rho_formula",
    "rho_from_items",
    "summarise_top",
]

PhiMethod = Literal["minmax", "ratio"]
MetricScaling = Literal["identity", "minmax"]
MissingPolicy = Literal["error", "exclude"]

# ranking.csv's columns from the arithmetic (tables.store adds p_best and tied_with_top)
RANKING_COLUMNS: list[str] = [
    "config_id", "model", "precision", "adapter", "pruning", "energy_kwh_per_item", "phi", "rho", "w",
    "R", "rank",
]

# R is a sum of products of floats; configs that are equal on paper can differ in the
# last bits, and a rank should not depend on rounding noise.
TIE_TOLERANCE = 1e-12

# What rank_configs needs per config: the first columns of the ranking table.
CONFIG_COLUMNS: tuple[str, ...] = tuple(RANKING_COLUMNS[: RANKING_COLUMNS.index("energy_kwh_per_item") + 1])
SCORE_COLUMNS: tuple[str, ...] = ("config_id", "task", "metric", "value")
ITEM_SCORE_COLUMNS: tuple[str, ...] = ("config_id", "task", "metric", "item_id", "value")
ENERGY_REPEAT_COLUMNS: tuple[str, ...] = ("config_id", "repeat", "energy_kwh_per_item")
# energy_repeats rows per task window (repeat_energy), what energy_draws resamples
ENERGY_WINDOW_COLUMNS: tuple[str, ...] = ("config_id", "task", "repeat", "energy_kwh", "n_items",
                                          "window_unit", "task_items")
# Phases whose energy rows are evaluations of a config (fine-tuning energy is reported apart).
EVALUATION_PHASES: tuple[str, ...] = ("inference", "pruning")


@dataclass(frozen=True)
class RankingResult:
    """Output of :func:`rank_configs`.

    table: one row per (config, w) with RANKING_COLUMNS, sorted by w then rank.
    excluded: configs dropped for missing metrics (only under missing="exclude").
    """

    table: pd.DataFrame
    excluded: tuple[str, ...]
    settings: RankingSettings


def compute_phi(energy_kwh_per_item: pd.Series, method: PhiMethod = "minmax") -> pd.Series:
    """Energy efficiency in [0, 1] per config (index = config_id); 1 is the most efficient."""
    _check_choice("method", method, PHI_METHODS)
    energy = _as_float_series(energy_kwh_per_item, "energy_kwh_per_item")
    if energy.index.has_duplicates:
        dupes = sorted(map(str, energy.index[energy.index.duplicated()].unique()))
        raise ValueError(f"energy_kwh_per_item has duplicate config ids: {dupes}")
    _check_positive_energy(energy)
    if energy.empty:
        return pd.Series(dtype=float, name="phi")
    values = _phi_array(energy.to_numpy(dtype=float)[np.newaxis, :], method)[0]
    return pd.Series(values, index=energy.index, name="phi")


def compute_rho(
    scores: pd.DataFrame,
    settings: RankingSettings | None = None,
    config_ids: Sequence[str] | None = None,
    qa_style: str = "cloze",
) -> tuple[pd.Series, list[str]]:
    """Mean scaled task quality per config, and the configs excluded for missing metrics.

    config_ids fixes the compared set (default: every config in scores); a config listed
    there without scores counts as missing all of its metrics. Under minmax scaling the
    metrics are scaled over the configs that remain after exclusion. qa_style picks the QA
    headline metric when settings.metrics is None.
    """
    settings = settings or RankingSettings()
    long = _prepare_long_scores(scores, SCORE_COLUMNS, "scores")
    ids = _unique_ids(config_ids) if config_ids is not None else list(pd.unique(long["config_id"]))
    long = long[long["config_id"].isin(ids)]
    chosen = _chosen_metrics(long, settings, qa_style)

    dupes = long.duplicated(subset=["config_id", "key"], keep=False)
    if dupes.any():
        pairs = sorted(set(zip(long.loc[dupes, "config_id"], long.loc[dupes, "key"])))
        raise ValueError(f"scores has more than one row per config and metric: {pairs[:10]}")

    wide = (
        long[long["key"].isin(chosen)]
        .pivot(index="config_id", columns="key", values="value")
        .reindex(index=ids, columns=list(chosen))
    )
    kept, excluded = _apply_missing_policy(wide.notna(), settings.missing)
    wide = wide.loc[kept]

    if settings.metric_scaling == "identity":
        _check_unit_interval(long[long["config_id"].isin(kept) & long["key"].isin(chosen)])
    values = wide.to_numpy(dtype=float)[np.newaxis, :, :]
    rho = pd.Series(_rho_array(values, settings.metric_scaling, settings.rho_scale)[0],
                    index=pd.Index(kept, name="config_id"), name="rho")
    return rho, excluded


def headline_metrics(tasks: Sequence[str], qa_style: str = "cloze") -> tuple[str, ...]:
    """ONE "task:metric" per known task (in the order of config.TASK_NAMES): the default rho."""
    return tuple(f"{task}:{headline_metric(task, qa_style)}" for task in TASK_NAMES if task in set(tasks))


def chosen_metrics(scores: pd.DataFrame, settings: RankingSettings,
                   qa_style: str = "cloze") -> tuple[str, ...]:
    """The metrics rho counts for these scores (a table with task and metric columns)."""
    return _chosen_metrics(_prepare_long_scores(scores, SCORE_COLUMNS, "scores"), settings, qa_style)


def rho_formula(settings: RankingSettings) -> str:
    """The ranking's formula with the exact metrics, e.g. "R = w·φ + (1−w)·ρ, ρ = (rca:accuracy +
    qa:acc_norm)/2, φ = min-max of energy per item (Wh)". settings.metrics must be resolved (as in
    RankingResult.settings)."""
    metrics = list(settings.metrics or ())
    scaled = [f"minmax({m})" for m in metrics] if settings.metric_scaling == "minmax" else metrics
    if not scaled:
        rho = "(not resolved)"
    elif len(scaled) == 1:
        rho = scaled[0]
    else:
        rho = f"({' + '.join(scaled)})/{len(scaled)}"
    if settings.rho_scale == "minmax":
        rho = f"minmax over configs of {rho}"
    phi = ("min-max of energy per item (Wh): (E_max − E)/(E_max − E_min)" if settings.phi_method == "minmax"
           else "E_min/E of energy per item (Wh)")
    return f"R = w·φ + (1−w)·ρ, ρ = {rho}, φ = {phi}"


def rank_configs(
    configs: pd.DataFrame,
    scores: pd.DataFrame,
    settings: RankingSettings | None = None,
    qa_style: str = "cloze",
) -> RankingResult:
    """Score every config at every w of the grid and rank them (1 = best, ties share a rank).

    Scores for configs absent from the configs table are ignored: the configs table defines
    the compared set, so phi and any minmax metric scaling are relative to it. The result's
    settings name the metrics rho counted (the headline metric per task when none were set).
    """
    settings = settings or RankingSettings()
    table = _prepare_configs(configs)
    long = _prepare_long_scores(scores, SCORE_COLUMNS, "scores")
    settings = settings.model_copy(update={
        "metrics": _chosen_metrics(long[long["config_id"].isin(table["config_id"])], settings, qa_style)})
    rho, excluded = compute_rho(scores, settings, config_ids=table["config_id"].tolist())
    table = table.set_index("config_id").loc[rho.index]
    phi = compute_phi(table["energy_kwh_per_item"], settings.phi_method)

    phi_values = phi.to_numpy()
    rho_values = rho.to_numpy()
    blocks = []
    for w in settings.w_grid:
        score = w * phi_values + (1.0 - w) * rho_values
        block = table[list(CONFIG_COLUMNS[1:])].copy()
        block["phi"] = phi_values
        block["rho"] = rho_values
        block["w"] = w
        block["R"] = score
        block["rank"] = _competition_ranks(score[np.newaxis, :])[0]
        blocks.append(block.reset_index())

    ranking = pd.concat(blocks, ignore_index=True)[list(RANKING_COLUMNS)]
    ranking = ranking.sort_values(["w", "rank", "config_id"], kind="stable", ignore_index=True)
    return RankingResult(table=ranking, excluded=tuple(excluded), settings=settings)


def config_energy(energy: pd.DataFrame, basis: str = "gross") -> pd.DataFrame:
    """One row per evaluated config from energy.csv rows: energy per item over all its tasks (total
    energy / total items), its standard error, and its energy method. ``basis`` "net" takes the energy
    net of the job's loaded-idle power instead of the gross reading.

    Refused with the configs named: rows of more than one energy scope (a whole machine's energy
    beside a GPU's alone does not compare), and, on the net basis, a config whose net energy is at or
    below zero (its windows drew no more than the loaded-idle baseline: noise, not a cost)."""
    rows = energy[energy["phase"].isin(EVALUATION_PHASES)].copy()
    if rows.empty:
        return pd.DataFrame(columns=["config_id", "model", "precision", "adapter", "pruning",
                                     "energy_kwh_per_item", "energy_kwh_per_item_std", "energy_method"])
    check_one_scope(rows)
    if basis == "net":
        net = rows["energy_net_kwh"].astype(float)
        bad = sorted(set(rows.loc[~(net > 0), "config_id"].astype(str)))
        if bad:
            raise ValueError(
                f"ranking.energy_basis: net, but rows of {', '.join(bad)} have net energy at or below zero "
                "(their windows drew no more than the loaded-idle baseline; energy.csv's "
                "net_at_or_below_idle marks the rows): a net ranking of them means nothing. Rank on "
                "energy_basis: gross, or measure longer windows.")
        rows["energy_kwh"] = net
    # the uncertainty of each row's energy: its standard error where recorded, else its spread
    spread = rows["energy_kwh_std"].astype(float)
    if "energy_kwh_se" in rows:
        spread = rows["energy_kwh_se"].astype(float).where(rows["energy_kwh_se"].notna(), spread)
    rows["var"] = spread.fillna(0.0) ** 2
    grouped = rows.groupby("config_id", sort=False)
    out = grouped.agg(
        model=("model", "first"), precision=("precision", "first"), adapter=("adapter", "first"),
        pruning=("pruning", "first"), energy_kwh=("energy_kwh", "sum"), n_items=("n_items", "sum"),
        var=("var", "sum"),
    ).reset_index()
    # every component's method behind the config's totals (not only the first component's)
    methods = {c: ";".join(sorted(set(m for m in component_methods(g) if m)))
               for c, g in rows.groupby("config_id", sort=False)}
    out["energy_method"] = out["config_id"].map(methods)
    out["energy_kwh_per_item"] = out["energy_kwh"] / out["n_items"]
    out["energy_kwh_per_item_std"] = np.sqrt(out["var"]) / out["n_items"]
    return out.drop(columns=["var"])


def check_one_scope(rows: pd.DataFrame) -> None:
    """Refuse energy rows of more than one scope (e.g. whole-machine rows beside 'gpu_only' ones, from
    a study resumed under another --cluster), naming the configs of each."""
    if "energy_scope" not in rows:
        return
    scopes = rows["energy_scope"].astype(object).where(rows["energy_scope"].notna(), "").astype(str)
    if scopes.nunique() <= 1:
        return
    detail = "; ".join(f"{scope or '(none recorded)'}: "
                       f"{', '.join(sorted(set(rows.loc[scopes == scope, 'config_id'].astype(str))))}"
                       for scope in sorted(set(scopes)))
    raise ValueError(f"energy.csv mixes energy scopes, which a ranking cannot compare ({detail}). Re-measure "
                     "the configs of one scope under the other (rerun them with the same --cluster), or rank "
                     "each scope's configs in a study of its own.")


def repeat_energy(repeats: pd.DataFrame, basis: str = "gross") -> pd.DataFrame:
    """Each evaluated config's measured windows per task from energy_repeats.csv (gross, or net of
    loaded idle), for the energy resampling of rank stability: config_id, task, repeat, energy_kwh,
    n_items (the window's items), window_unit and task_items (the items the task scored). Resampled
    by :func:`energy_draws`, which gives back, on the windows as measured, exactly the point ranking's
    energy per item (every task's energy, however many windows it had, over all its items)."""
    rows = repeats[repeats["phase"].isin(EVALUATION_PHASES)].copy()
    if basis == "net":
        rows["energy_kwh"] = rows["energy_net_kwh"]
    if rows.empty:
        return pd.DataFrame(columns=list(ENERGY_WINDOW_COLUMNS))
    rows["window_unit"] = rows["window_unit"].fillna("repeat") if "window_unit" in rows else "repeat"
    if "task_items" not in rows:
        rows["task_items"] = np.nan
    chunk_total = rows.groupby(["config_id", "phase", "task"])["n_items"].transform("sum")
    derived = np.where(rows["window_unit"] == "chunk", chunk_total, rows["n_items"])
    rows["task_items"] = rows["task_items"].astype(float).fillna(
        pd.Series(derived, index=rows.index).astype(float))
    rows["task"] = rows["phase"].astype(str) + ":" + rows["task"].astype(str)
    return rows[list(ENERGY_WINDOW_COLUMNS)].reset_index(drop=True)


def energy_draws(windows: pd.DataFrame, config_ids: Sequence[str], n_boot: int,
                 rng: np.random.Generator | None = None) -> np.ndarray:
    """Energy per item of each config in each draw, shape (n_boot, configs): per task its windows
    resampled with replacement (rng None: every window once, as measured); a task's energy is the mean
    of its full-pass repeats, or its items x the resampled chunks' energy / their items (which is the
    chunks' sum as measured); a config's energy per item is the sum over its tasks / all their items."""
    frame = windows.copy()
    frame["config_id"] = frame["config_id"].astype(str)
    out = np.zeros((n_boot, len(config_ids)))
    absent = sorted(set(map(str, config_ids)) - set(frame["config_id"]))
    if absent:
        raise ValueError(f"energy_repeats has no rows for configs: {absent}")
    for i, config_id in enumerate(config_ids):
        mine = frame[frame["config_id"] == str(config_id)]
        items = 0.0
        for _, task in mine.groupby("task", sort=True):
            e = task["energy_kwh"].to_numpy(dtype=float)
            n = task["n_items"].to_numpy(dtype=float)
            k = len(e)
            draws = (rng.integers(0, k, size=(n_boot, k)) if rng is not None and k > 1
                     else np.broadcast_to(np.arange(k), (n_boot, k)))
            task_items = float(task["task_items"].iloc[0])
            if (task["window_unit"] == "chunk").all():
                out[:, i] += task_items * e[draws].sum(axis=1) / n[draws].sum(axis=1)
            else:
                out[:, i] += e[draws].mean(axis=1)
            items += task_items
        out[:, i] /= items
    return out


def rank_evaluations(configs: pd.DataFrame, scores: pd.DataFrame, settings: RankingSettings,
                     qa_style: str = "cloze") -> RankingResult:
    """rank_configs over :func:`config_energy` rows with the headline w on the grid, plus the
    columns the study's ranking table carries: Pareto front at w, energy spread and method."""
    settings = settings.with_w_in_grid()
    result = rank_configs(configs, scores, settings, qa_style)
    table = result.table.copy()
    at_w = table[np.isclose(table["w"], settings.w)].set_index("config_id")
    front = pareto_front(at_w["energy_kwh_per_item"], at_w["rho"])
    table["pareto"] = table["config_id"].map(front).fillna(False).astype(bool)
    by_id = configs.set_index("config_id")
    table["energy_kwh_per_item_std"] = table["config_id"].map(by_id["energy_kwh_per_item_std"])
    table["energy_method"] = table["config_id"].map(by_id["energy_method"])
    return RankingResult(table=table, excluded=result.excluded, settings=result.settings)


def pareto_front(energy_kwh_per_item: pd.Series, quality: pd.Series) -> pd.Series:
    """True for configs no other config dominates (energy <= and quality >=, one strictly).

    Identical points do not dominate each other, so duplicates on the front all stay on it.
    """
    energy = _as_float_series(energy_kwh_per_item, "energy_kwh_per_item")
    quality = _as_float_series(quality, "quality")
    if set(energy.index) != set(quality.index) or energy.index.has_duplicates:
        raise ValueError(
            "energy_kwh_per_item and quality must be indexed by the same unique config ids"
        )
    quality = quality.reindex(energy.index)
    bad = energy.index[~(np.isfinite(energy.to_numpy()) & np.isfinite(quality.to_numpy()))]
    if len(bad):
        raise ValueError(f"non-finite energy or quality for configs: {sorted(map(str, bad))}")

    return pd.Series(pareto_optimal(energy.to_numpy(), quality.to_numpy()), index=energy.index,
                     name="on_pareto_front")


def pareto_optimal(energy: Sequence[float], quality: Sequence[float]) -> np.ndarray:
    """The Pareto rule itself, on arrays: True where no other point has energy <= and quality >=
    with one strictly better. A NaN point is never optimal and dominates nothing."""
    e = np.asarray(energy, dtype=float)
    q = np.asarray(quality, dtype=float)
    valid = ~(np.isnan(e) | np.isnan(q))
    # dominates[j, i]: point j dominates point i.
    no_worse = (e[:, None] <= e[None, :]) & (q[:, None] >= q[None, :])
    better = (e[:, None] < e[None, :]) | (q[:, None] > q[None, :])
    dominated = (no_worse & better & valid[:, None]).any(axis=0)
    return valid & ~dominated


def rank_stability(
    configs: pd.DataFrame,
    scores_per_item: pd.DataFrame,
    energy_repeats: pd.DataFrame | None,
    settings: RankingSettings | None,
    w: float,
    n_boot: int = 200,
    seed: int = 0,
    qa_style: str = "cloze",
    energy_offset: pd.Series | None = None,
) -> pd.DataFrame:
    """How often each config lands at each rank when items and energy repeats are bootstrapped.

    Each draw resamples the item ids of every task with replacement (the same ids for every
    config, so configs are compared on the same questions) and, per config, its energy
    repeats. A config with a single repeat keeps its energy fixed, as does every config when
    energy_repeats is None (then the configs table's energy_kwh_per_item is used). ``energy_offset``
    (kWh per item, by config id) is added to every draw: setup energy amortised over a life of queries.

    Per-item scores must be complete: every compared config needs a value for every item of
    each chosen metric's task, and every chosen metric needs per-item scores: rho here is the
    point ranking's rho (same metrics, same scaling), so a metric without them (RCA macro-F1)
    is refused with a ValueError instead of being silently dropped. Returns one row per config with columns
    config_id, rank_1..rank_N (share of draws at each rank), modal_rank (lowest rank among equally
    frequent ones) and p_modal, sorted by modal_rank. Excluded configs are listed in
    ``result.attrs["excluded"]``.
    """
    settings = settings or RankingSettings()
    w = float(w)
    if not (np.isfinite(w) and 0.0 <= w <= 1.0):
        raise ValueError(f"w must lie in [0, 1]; got {w}")
    if int(n_boot) != n_boot or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer; got {n_boot}")
    n_boot = int(n_boot)

    table = _prepare_configs(configs)
    items, kept, excluded, chosen = _prepare_items(scores_per_item, table["config_id"].tolist(), settings,
                                                   qa_style)

    rng = np.random.default_rng(seed)
    metric_means = _bootstrap_metric_means(items, kept, chosen, n_boot, rng)
    energy = _bootstrap_energy(table.set_index("config_id").loc[kept], energy_repeats, n_boot, rng)
    if energy_offset is not None:  # e.g. setup energy amortised over a life of N queries, per item
        energy = energy + energy_offset.reindex(kept).fillna(0.0).to_numpy(dtype=float)[np.newaxis, :]

    rho = _rho_array(metric_means, settings.metric_scaling, settings.rho_scale)
    phi = _phi_array(energy, settings.phi_method)
    ranks = _competition_ranks(w * phi + (1.0 - w) * rho)

    n_configs = len(kept)
    shares = np.stack([(ranks == r).mean(axis=0) for r in range(1, n_configs + 1)], axis=1)
    result = pd.DataFrame(shares, columns=[f"rank_{r}" for r in range(1, n_configs + 1)])
    result.insert(0, "config_id", kept)
    # argmax picks the first maximum, i.e. the best rank when two ranks are equally frequent.
    result["modal_rank"] = shares.argmax(axis=1) + 1
    result["p_modal"] = shares.max(axis=1)
    result = result.sort_values(
        ["modal_rank", "p_modal", "config_id"], ascending=[True, False, True], ignore_index=True
    )
    result.attrs["excluded"] = tuple(excluded)
    # The same draws at every w of the grid: how often each config comes out best (ties share it).
    p_best = [{"config_id": c, "w": float(grid_w), "p_best": float(p)}
              for grid_w in settings.w_grid
              for c, p in zip(kept,
                              (_competition_ranks(grid_w * phi + (1.0 - grid_w) * rho) == 1).mean(axis=0))]
    result.attrs["p_best"] = pd.DataFrame(p_best, columns=["config_id", "w", "p_best"])
    return result


def rho_from_items(scores_per_item: pd.DataFrame, settings: RankingSettings | None = None,
                   config_ids: Sequence[str] | None = None, qa_style: str = "cloze") -> pd.Series:
    """rho per config as :func:`rank_stability` computes it in each draw, here on the items as
    observed (every item drawn once): equal to :func:`compute_rho` on the per-item means."""
    settings = settings or RankingSettings()
    long = _prepare_long_scores(scores_per_item, ITEM_SCORE_COLUMNS, "scores_per_item")
    ids = _unique_ids(config_ids) if config_ids is not None else list(pd.unique(long["config_id"]))
    items, kept, _, chosen = _prepare_items(scores_per_item, ids, settings, qa_style)
    means = _metric_means(items, kept, chosen, lambda n: np.ones((1, n)))
    return pd.Series(_rho_array(means, settings.metric_scaling, settings.rho_scale)[0],
                     index=pd.Index(kept, name="config_id"), name="rho")


# A config best in at least this share of joint resamples cannot be separated from the top one.
TIED_WITH_TOP_SHARE = 0.05


def add_top_uncertainty(table: pd.DataFrame, p_best: pd.DataFrame | None,
                        share: float = TIED_WITH_TOP_SHARE) -> pd.DataFrame:
    """ranking.csv's p_best (share of joint resamples of items and energy repeats in which a config
    is best at that w) and tied_with_top (the point ranking's top config, and every config best in at
    least ``share`` of the resamples: the set the data cannot separate). Configs left out of the
    resampling (no per-item scores) get p_best NaN and are tied only if ranked first."""
    out = table.copy()
    if p_best is None or p_best.empty:
        out["p_best"] = np.nan
    else:
        keyed = p_best.assign(w=p_best["w"].round(9)).set_index(["config_id", "w"])["p_best"]
        out["p_best"] = [keyed.get((c, round(float(w), 9)), np.nan)
                         for c, w in zip(out["config_id"], out["w"])]
    out["tied_with_top"] = (out["rank"] == 1) | (out["p_best"].fillna(0.0) >= share)
    return out


def summarise_top(result: RankingResult, w: float, k: int = 3) -> list[dict]:
    """Top-k rows of the ranking at the grid weight nearest to w (the lower one on a tie)."""
    if k < 1:
        raise ValueError(f"k must be at least 1; got {k}")
    grid = sorted(result.settings.w_grid)
    nearest = min(grid, key=lambda g: abs(g - w))
    rows = result.table[result.table["w"] == nearest]
    rows = rows.sort_values(["rank", "config_id"], kind="stable").head(k)
    return rows.to_dict(orient="records")


# --- internals ----------------------------------------------------------------------------


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}; got {value!r}")


def _require_columns(frame: pd.DataFrame, columns: Sequence[str], name: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{name} lacks required columns {missing}; has {list(frame.columns)}")


def _as_float_series(series: pd.Series, name: str) -> pd.Series:
    try:
        return series.astype(float)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be numeric") from exc


def _check_positive_energy(energy: pd.Series) -> None:
    values = energy.to_numpy(dtype=float)
    bad = energy.index[~(np.isfinite(values) & (values > 0))]
    if len(bad):
        raise ValueError(
            f"energy_kwh_per_item must be finite and > 0; bad for configs: {sorted(map(str, bad))}"
        )


def _unique_ids(config_ids: Sequence[object]) -> list[str]:
    ids = [str(c) for c in config_ids]
    if len(set(ids)) != len(ids):
        dupes = sorted({c for c in ids if ids.count(c) > 1})
        raise ValueError(f"duplicate config ids: {dupes}")
    return ids


def _prepare_configs(configs: pd.DataFrame) -> pd.DataFrame:
    _require_columns(configs, CONFIG_COLUMNS, "configs")
    if configs.empty:
        raise ValueError("configs has no rows; nothing to rank")
    if configs["config_id"].isna().any():
        raise ValueError("configs has rows without a config_id")
    table = configs[list(CONFIG_COLUMNS)].copy()
    table["config_id"] = _unique_ids(table["config_id"].tolist())
    table["energy_kwh_per_item"] = _as_float_series(
        table["energy_kwh_per_item"], "energy_kwh_per_item"
    )
    return table.reset_index(drop=True)


def _prepare_long_scores(scores: pd.DataFrame, columns: Sequence[str], name: str) -> pd.DataFrame:
    _require_columns(scores, columns, name)
    long = scores[list(columns)].copy()
    long["config_id"] = long["config_id"].astype(str)
    long["task"] = long["task"].astype(str)
    long["key"] = long["task"] + ":" + long["metric"].astype(str)
    long["value"] = _as_float_series(long["value"], f"{name}.value")
    infinite = np.isinf(long["value"].to_numpy())
    if infinite.any():
        pairs = sorted(set(zip(long.loc[infinite, "config_id"], long.loc[infinite, "key"])))
        raise ValueError(f"{name} has infinite values for (config, metric) {pairs[:10]}")
    return long


def _chosen_metrics(long: pd.DataFrame, settings: RankingSettings,
                    qa_style: str = "cloze") -> tuple[str, ...]:
    available = set(long["key"])
    if settings.metrics is None:
        if not available:
            raise ValueError("no scores for the compared configs; cannot compute rho")
        chosen = headline_metrics(sorted(set(long["task"])), qa_style)
        if not chosen:
            raise ValueError(f"no task with a headline metric ({', '.join(TASK_NAMES)}) in the scores; "
                             f"available: {sorted(available)}. Name the metrics in ranking.metrics.")
        absent = [m for m in chosen if m not in available]
        if absent:
            raise ValueError(f"headline metrics {absent} (qa style {qa_style!r}) are not in the scores; "
                             f"available: {sorted(available)}. Name the metrics in ranking.metrics.")
        return chosen
    # A metric nobody has is a typo or a missing evaluation, not a per-config gap: excluding
    # every config for it would only hide the problem.
    absent = [m for m in settings.metrics if m not in available]
    if absent:
        raise ValueError(
            f"metrics {absent} are not in the scores of any compared config; "
            f"available: {sorted(available)}"
        )
    return settings.metrics


def _apply_missing_policy(
    present: pd.DataFrame, policy: MissingPolicy
) -> tuple[list[str], list[str]]:
    """Split configs (rows of a config x metric presence table) into kept and excluded."""
    lacking = {
        config_id: [key for key, ok in row.items() if not ok]
        for config_id, row in present.iterrows()
        if not row.all()
    }
    if lacking and policy == "error":
        detail = "; ".join(f"{c!r} lacks {keys}" for c, keys in lacking.items())
        raise ValueError(
            f"configs missing chosen metrics: {detail}. "
            "Use missing='exclude' to drop them, or restrict settings.metrics."
        )
    kept = [c for c in present.index if c not in lacking]
    if not kept:
        raise ValueError(f"every config lacks a chosen metric; nothing left to rank: {lacking}")
    return kept, list(lacking)


def _check_unit_interval(long: pd.DataFrame) -> None:
    values = long["value"].to_numpy(dtype=float)
    outside = (values < 0.0) | (values > 1.0)
    if outside.any():
        found = sorted(set(zip(long.loc[outside, "config_id"], long.loc[outside, "key"])))
        raise ValueError(
            f"metric values outside [0, 1] with metric_scaling='identity' for (config, metric) "
            f"{found[:10]}; use metric_scaling='minmax' for metrics on other scales"
        )


def _phi_array(energy: np.ndarray, method: PhiMethod) -> np.ndarray:
    """phi along the last axis (configs) of an array of positive energies."""
    e_min = energy.min(axis=-1, keepdims=True)
    if method == "ratio":
        return e_min / energy
    e_max = energy.max(axis=-1, keepdims=True)
    span = e_max - e_min
    # All-equal energies: every config is as efficient as the best, so phi = 1.
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(span > 0, (e_max - energy) / np.where(span > 0, span, 1.0), 1.0)


def _scale_metrics(values: np.ndarray, scaling: MetricScaling) -> np.ndarray:
    """Scale metrics over configs; values has shape (draws, configs, metrics)."""
    if scaling == "identity":
        return values
    low = values.min(axis=1, keepdims=True)
    high = values.max(axis=1, keepdims=True)
    span = high - low
    # All configs equal on a metric: it cannot separate them, so give everyone full marks.
    return np.where(span > 0, (values - low) / np.where(span > 0, span, 1.0), 1.0)


def _rho_array(metric_means: np.ndarray, scaling: MetricScaling, rho_scale: str = "raw") -> np.ndarray:
    """rho from metric values of shape (draws, configs, metrics): the one formula of the point
    ranking and of every resample; ``rho_scale`` "minmax" rescales it over the configs of each draw to
    [0, 1] (all equal: 1, as phi)."""
    rho = _scale_metrics(metric_means, scaling).mean(axis=2)
    if rho_scale == "minmax":
        low = rho.min(axis=1, keepdims=True)
        span = rho.max(axis=1, keepdims=True) - low
        rho = np.where(span > 0, (rho - low) / np.where(span > 0, span, 1.0), 1.0)
    return rho


def _prepare_items(scores_per_item: pd.DataFrame, ids: list[str], settings: RankingSettings,
                   qa_style: str) -> tuple[pd.DataFrame, list[str], list[str], tuple[str, ...]]:
    """Per-item rows of the chosen metrics for the kept configs, kept, excluded, chosen."""
    items = _prepare_long_scores(scores_per_item, ITEM_SCORE_COLUMNS, "scores_per_item")
    items = items[items["config_id"].isin(ids) & items["value"].notna()]
    if settings.metrics is not None:
        lacking = [m for m in settings.metrics if m not in set(items["key"])]
        if lacking:
            raise ValueError(
                f"rho counts {lacking}, which have no per-item scores to resample (a corpus-level metric "
                "such as macro-F1 is not an average over items); resampling without them would rank by a "
                f"different rho than the point ranking. Per-item metrics here: {sorted(set(items['key']))}. "
                "Choose those in ranking.metrics, or set ranking.bootstrap: 0.")
    chosen = _chosen_metrics(items, settings, qa_style)
    items = items[items["key"].isin(chosen)]

    dupes = items.duplicated(subset=["config_id", "key", "item_id"], keep=False)
    if dupes.any():
        pairs = sorted(set(zip(items.loc[dupes, "config_id"], items.loc[dupes, "key"])))
        raise ValueError(f"scores_per_item repeats an item_id for config and metric: {pairs[:10]}")

    present = (
        items.groupby(["config_id", "key"])
        .size()
        .unstack("key")
        .reindex(index=ids, columns=list(chosen))
    )
    kept, excluded = _apply_missing_policy(present.notna(), settings.missing)
    items = items[items["config_id"].isin(kept)]
    if settings.metric_scaling == "identity":
        # Item values in [0, 1] keep every bootstrapped mean in [0, 1] too.
        _check_unit_interval(items)
    return items, kept, excluded, chosen


def _competition_ranks(score: np.ndarray) -> np.ndarray:
    """Ranks along the last axis, 1 = highest; ties within TIE_TOLERANCE share the best rank."""
    beaten_by = score[..., np.newaxis, :] > score[..., :, np.newaxis] + TIE_TOLERANCE
    return 1 + beaten_by.sum(axis=-1)


def _bootstrap_metric_means(
    items: pd.DataFrame,
    config_ids: list[str],
    chosen: tuple[str, ...],
    n_boot: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Bootstrapped mean of each chosen metric: shape (n_boot, configs, metrics)."""

    def counts_of(n_items: int) -> np.ndarray:
        # Drawing counts rather than indices lets one matrix product average every config.
        draws = rng.integers(0, n_items, size=(n_boot, n_items))
        offsets = (np.arange(n_boot) * n_items)[:, np.newaxis]
        counts = np.bincount((draws + offsets).ravel(), minlength=n_boot * n_items)
        return counts.reshape(n_boot, n_items).astype(float)

    return _metric_means(items, config_ids, chosen, counts_of)


def _metric_means(items: pd.DataFrame, config_ids: list[str], chosen: tuple[str, ...],
                  counts_of: Callable[[int], np.ndarray]) -> np.ndarray:
    """Weighted mean of each chosen metric over each task's items, one weighting per draw:
    counts_of(n_items) gives how often each item counts in each draw, shape (draws, n_items)."""
    means: np.ndarray | None = None
    task_of = dict(zip(items["key"], items["task"]))
    for task in sorted({task_of[key] for key in chosen}):
        task_items = items[items["task"] == task]
        universe = pd.Index(pd.unique(task_items["item_id"])).sort_values()
        n_items = len(universe)
        counts = counts_of(n_items)
        if means is None:
            means = np.empty((counts.shape[0], len(config_ids), len(chosen)))
        for j, key in enumerate(chosen):
            if task_of[key] != task:
                continue
            matrix = (
                task_items[task_items["key"] == key]
                .pivot(index="config_id", columns="item_id", values="value")
                .reindex(index=config_ids, columns=universe)
            )
            gaps = matrix.isna().sum(axis=1)
            if gaps.any():
                detail = {c: int(n) for c, n in gaps[gaps > 0].items()}
                raise ValueError(
                    f"per-item scores for {key} are incomplete (items missing per config: "
                    f"{detail}); the bootstrap needs every config scored on every item "
                    f"of task {task!r}"
                )
            means[:, :, j] = counts @ matrix.to_numpy(dtype=float).T / n_items
    assert means is not None
    return means


def _bootstrap_energy(
    configs: pd.DataFrame,
    energy_repeats: pd.DataFrame | None,
    n_boot: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Bootstrapped mean energy per config: shape (n_boot, configs); configs indexed by id."""
    config_ids = configs.index.tolist()
    if energy_repeats is None:
        fixed = configs["energy_kwh_per_item"]
        _check_positive_energy(fixed)
        return np.broadcast_to(fixed.to_numpy(dtype=float), (n_boot, len(config_ids))).copy()

    if "task" in energy_repeats.columns:  # per-task windows (repeat_energy): the point ranking's energy
        _require_columns(energy_repeats, ENERGY_WINDOW_COLUMNS, "energy_repeats")
        draws = energy_draws(energy_repeats, config_ids, n_boot, rng)
        bad = [c for c, ok in zip(config_ids, np.isfinite(draws).all(axis=0) & (draws > 0).all(axis=0))
               if not ok]
        if bad:
            raise ValueError("energy_kwh_per_item must be finite and > 0 in every resample; bad for "
                             f"configs: {bad}")
        return draws
    _require_columns(energy_repeats, ENERGY_REPEAT_COLUMNS, "energy_repeats")
    repeats = energy_repeats[list(ENERGY_REPEAT_COLUMNS)].copy()
    repeats["config_id"] = repeats["config_id"].astype(str)
    repeats["energy_kwh_per_item"] = _as_float_series(
        repeats["energy_kwh_per_item"], "energy_repeats.energy_kwh_per_item"
    )
    repeats = repeats[repeats["config_id"].isin(config_ids)]
    absent = sorted(set(config_ids) - set(repeats["config_id"]))
    if absent:
        raise ValueError(f"energy_repeats has no rows for configs: {absent}")
    _check_positive_energy(repeats.set_index("config_id")["energy_kwh_per_item"])

    energy = np.empty((n_boot, len(config_ids)))
    by_config = {c: g["energy_kwh_per_item"].to_numpy() for c, g in repeats.groupby("config_id")}
    for i, config_id in enumerate(config_ids):
        values = by_config[config_id]
        if len(values) == 1:
            energy[:, i] = values[0]
            continue
        draws = rng.integers(0, len(values), size=(n_boot, len(values)))
        energy[:, i] = values[draws].mean(axis=1)
    return energy


# --- paired comparisons ---------------------------------------------------------------------------

COMPARISON_COLUMNS: tuple[str, ...] = ("config_a", "config_b", "task", "metric", "diff", "ci_low", "ci_high",
                                       "p_value", "test", "n_items", "family", "p_adjusted")


def paired_comparisons(item_scores: pd.DataFrame, n_boot: int = 2000, level: float = 0.95,
                       seed: int = 0, n_perm: int = 9999) -> pd.DataFrame:
    """Every pair of configs on every task metric they were both scored on, item by item.

    diff = mean(a) - mean(b) over the items both have; its interval is a paired bootstrap (the same
    resampled items for both configs). The p-value is McNemar's exact test for 0/1 metrics
    (accuracies) and the paired sign-flip permutation test otherwise
    (:mod:`llm_energy.analysis.significance`). ``p_adjusted`` and ``family`` stay empty here: the ranking
    phase fills them for the pairs the report judges (Holm within each family). One row per unordered pair,
    ``config_a`` before ``config_b`` in sorted order."""
    items = _prepare_long_scores(item_scores, ITEM_SCORE_COLUMNS, "item_scores")
    items = items[items["value"].notna()]
    rows = []
    rng = np.random.default_rng(seed)
    for (task, metric), group in items.groupby(["task", "metric"], sort=True):
        wide = group.pivot_table(index="item_id", columns="config_id", values="value", aggfunc="first")
        configs = sorted(wide.columns)
        if len(configs) < 2:
            continue
        for i, a in enumerate(configs):
            for b in configs[i + 1 :]:
                pair = wide[[a, b]].dropna()
                n = len(pair)
                if n == 0:
                    continue
                va, vb = pair[a].to_numpy(dtype=float), pair[b].to_numpy(dtype=float)
                d = va - vb
                low, high = paired_interval(d, n_boot, level, rng)
                p_value, test = paired_test(va, vb, n_perm=n_perm, seed=seed)
                rows.append({"config_a": a, "config_b": b, "task": task, "metric": metric,
                             "diff": float(d.mean()), "ci_low": low, "ci_high": high, "p_value": p_value,
                             "test": test, "n_items": n, "family": "", "p_adjusted": np.nan})
    return pd.DataFrame(rows, columns=list(COMPARISON_COLUMNS))


def compare(comparisons: pd.DataFrame, config: str, reference: str, task: str, metric: str) -> dict | None:
    """The comparison of ``config`` against ``reference`` (diff = config - reference), whichever
    order the table holds the pair in; None when they were not compared."""
    hit = comparisons[(comparisons["task"] == task) & (comparisons["metric"] == metric)]
    forward = hit[(hit["config_a"] == config) & (hit["config_b"] == reference)]
    if len(forward):
        return forward.iloc[0].to_dict()
    backward = hit[(hit["config_a"] == reference) & (hit["config_b"] == config)]
    if not len(backward):
        return None
    row = backward.iloc[0].to_dict()
    # (+ 0.0: a difference of zero reads 0.000, not -0.000)
    row.update(config_a=config, config_b=reference, diff=-row["diff"] + 0.0, ci_low=-row["ci_high"] + 0.0,
               ci_high=-row["ci_low"] + 0.0)
    return row
