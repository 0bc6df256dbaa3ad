"""Ranking of configs by R = w*phi + (1-w)*rho, on small hand-computed tables."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest

from llm_energy.analysis.ranking_math import (
    RankingResult,
    compute_phi,
    compute_rho,
    pareto_front,
    rank_configs,
    rank_stability,
    summarise_top,
)
from llm_energy.config import RankingSettings
from llm_energy.tables.store import RANKING_COLUMNS


def make_configs(energy: dict[str, float]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "config_id": list(energy),
            "model": "m",
            "precision": "bf16",
            "adapter": "none",
            "pruning": "none",
            "energy_kwh_per_item": list(energy.values()),
        }
    )


def make_scores(values: dict[tuple[str, str, str], float]) -> pd.DataFrame:
    rows = [
        {
            "config_id": c,
            "task": t,
            "metric": m,
            "value": v,
            "ci_low": v,
            "ci_high": v,
            "n_items": 10,
        }
        for (c, t, m), v in values.items()
    ]
    return pd.DataFrame(rows)


# Hand example. Energies 1, 2, 4:
#   minmax phi = (4 - E) / 3 -> A 1, B 2/3, C 0;  ratio phi = 1 / E -> A 1, B 0.5, C 0.25.
# rho (identity) = mean(rca:accuracy, qa:acc_norm) -> A 0.6, B 0.7, C 0.9.
ENERGY = {"A": 1.0, "B": 2.0, "C": 4.0}
SCORES = {
    ("A", "rca", "accuracy"): 0.5,
    ("A", "qa", "acc_norm"): 0.7,
    ("B", "rca", "accuracy"): 0.8,
    ("B", "qa", "acc_norm"): 0.6,
    ("C", "rca", "accuracy"): 0.9,
    ("C", "qa", "acc_norm"): 0.9,
}


@pytest.fixture
def result() -> RankingResult:
    return rank_configs(make_configs(ENERGY), make_scores(SCORES), RankingSettings())


def rows_at(result: RankingResult, w: float) -> pd.DataFrame:
    return result.table[result.table["w"] == w].set_index("config_id")


# --- settings -----------------------------------------------------------------------------


def test_default_grid_is_clean_tenths() -> None:
    grid = RankingSettings().w_grid
    assert grid == (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    assert grid[3] == 0.3


@pytest.mark.parametrize("grid", [(0.5, 1.2), (-0.1,), (float("nan"),)])
def test_weight_outside_unit_interval_is_rejected(grid: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match=r"w_grid must lie in \[0, 1\]"):
        RankingSettings(w_grid=grid)


def test_empty_grid_and_unknown_methods_are_rejected() -> None:
    with pytest.raises(ValueError, match="at least one weight"):
        RankingSettings(w_grid=())
    with pytest.raises(ValueError, match="phi_method must be one of"):
        RankingSettings(phi_method="log")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="metric_scaling must be one of"):
        RankingSettings(metric_scaling="zscore")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="missing must be one of"):
        RankingSettings(missing="impute")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'task:metric'"):
        RankingSettings(metrics=("accuracy",))


def test_list_grid_is_stored_as_tuple() -> None:
    assert RankingSettings(w_grid=[0, 1]).w_grid == (0.0, 1.0)  # type: ignore[arg-type]


# --- phi and rho --------------------------------------------------------------------------


def test_phi_minmax_exact() -> None:
    phi = compute_phi(pd.Series(ENERGY), "minmax")
    assert phi.to_dict() == pytest.approx({"A": 1.0, "B": 2 / 3, "C": 0.0})


def test_phi_ratio_exact() -> None:
    phi = compute_phi(pd.Series(ENERGY), "ratio")
    assert phi.to_dict() == pytest.approx({"A": 1.0, "B": 0.5, "C": 0.25})


def test_phi_all_equal_energies_is_one() -> None:
    phi = compute_phi(pd.Series({"A": 0.003, "B": 0.003}), "minmax")
    assert phi.tolist() == [1.0, 1.0]


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_phi_rejects_non_positive_or_non_finite_energy(bad: float) -> None:
    with pytest.raises(ValueError, match=r"finite and > 0.*\['B'\]"):
        compute_phi(pd.Series({"A": 1.0, "B": bad}))


def test_rho_identity_is_mean_of_metrics() -> None:
    rho, excluded = compute_rho(make_scores(SCORES), RankingSettings())
    assert rho.to_dict() == pytest.approx({"A": 0.6, "B": 0.7, "C": 0.9})
    assert excluded == []


def test_rho_minmax_scales_each_metric_over_configs() -> None:
    # rca: (v - 0.5) / 0.4 -> A 0, B 0.75, C 1;  qa: (v - 0.6) / 0.3 -> A 1/3, B 0, C 1.
    rho, _ = compute_rho(make_scores(SCORES), RankingSettings(metric_scaling="minmax"))
    assert rho.to_dict() == pytest.approx({"A": 1 / 6, "B": 0.375, "C": 1.0})


def test_rho_minmax_all_equal_metric_is_one() -> None:
    scores = make_scores({("A", "qa", "acc_norm"): 0.4, ("B", "qa", "acc_norm"): 0.4})
    rho, _ = compute_rho(scores, RankingSettings(metric_scaling="minmax"))
    assert rho.tolist() == [1.0, 1.0]


def test_rho_uses_only_chosen_metrics() -> None:
    rho, _ = compute_rho(make_scores(SCORES), RankingSettings(metrics=("rca:accuracy",)))
    assert rho.to_dict() == pytest.approx({"A": 0.5, "B": 0.8, "C": 0.9})


def test_chosen_metric_absent_everywhere_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"\['qa:acc'\] are not in the scores"):
        compute_rho(make_scores(SCORES), RankingSettings(metrics=("qa:acc",)))


def test_identity_scaling_rejects_values_outside_unit_interval() -> None:
    scores = make_scores({**SCORES, ("B", "qa", "acc_norm"): 61.0})
    message = r"outside \[0, 1\].*\('B', 'qa:acc_norm'\).*metric_scaling='minmax'"
    with pytest.raises(ValueError, match=message):
        rank_configs(make_configs(ENERGY), scores, RankingSettings())
    # The same table is fine once each metric is rescaled over configs.
    rank_configs(make_configs(ENERGY), scores, RankingSettings(metric_scaling="minmax"))


# --- rank_configs -------------------------------------------------------------------------


def test_table_shape_columns_and_order(result: RankingResult) -> None:
    table = result.table
    assert list(table.columns) == list(RANKING_COLUMNS)
    assert len(table) == 3 * 11
    assert table.groupby("w").size().eq(3).all()
    assert table.sort_values(["w", "rank"]).index.tolist() == table.index.tolist()
    assert result.excluded == ()


def test_score_is_weighted_blend_and_bounded(result: RankingResult) -> None:
    table = result.table
    expected = table["w"] * table["phi"] + (1 - table["w"]) * table["rho"]
    assert np.array_equal(table["R"].to_numpy(), expected.to_numpy())
    for column in ("phi", "rho", "R"):
        assert table[column].between(0.0, 1.0).all()
    assert table["rank"].notna().all()


def test_ranks_follow_score(result: RankingResult) -> None:
    for _, group in result.table.groupby("w"):
        by_rank = group.sort_values("rank")
        assert by_rank["R"].is_monotonic_decreasing
        assert sorted(group["rank"]) == [1, 2, 3]


def test_hand_computed_scores_and_ranks(result: RankingResult) -> None:
    half = rows_at(result, 0.5)
    # R = 0.5*phi + 0.5*rho -> A (1 + 0.6)/2, B (2/3 + 0.7)/2, C (0 + 0.9)/2.
    assert half["R"].to_dict() == pytest.approx({"A": 0.8, "B": (2 / 3 + 0.7) / 2, "C": 0.45})
    assert half["rank"].to_dict() == {"A": 1, "B": 2, "C": 3}
    assert rows_at(result, 0.0)["rank"].to_dict() == {"C": 1, "B": 2, "A": 3}
    assert rows_at(result, 1.0)["rank"].to_dict() == {"A": 1, "B": 2, "C": 3}


def test_ratio_phi_in_ranking() -> None:
    settings = RankingSettings(phi_method="ratio", w_grid=(1.0,))
    result = rank_configs(make_configs(ENERGY), make_scores(SCORES), settings)
    assert rows_at(result, 1.0)["phi"].to_dict() == pytest.approx({"A": 1.0, "B": 0.5, "C": 0.25})


def test_ties_share_the_best_rank() -> None:
    # Energies 1, 2, 3 -> minmax phi 1, 0.5, 0; at w = 0.5: A 0.5*1 + 0.5*0.5 = 0.75,
    # B 0.5*0.5 + 0.5*1 = 0.75, C 0.5*0 + 0.5*0.25 = 0.125.
    configs = make_configs({"A": 1.0, "B": 2.0, "C": 3.0})
    scores = make_scores(
        {("A", "qa", "acc_norm"): 0.5, ("B", "qa", "acc_norm"): 1.0, ("C", "qa", "acc_norm"): 0.25}
    )
    result = rank_configs(configs, scores, RankingSettings(w_grid=(0.5,)))
    assert rows_at(result, 0.5)["rank"].to_dict() == {"A": 1, "B": 1, "C": 3}


def test_rounding_noise_is_a_tie() -> None:
    # (0.1 + 0.2) / 2 is 0.15000000000000002, not 0.15: equal on paper, so equal in rank.
    configs = make_configs({"A": 1.0, "B": 1.0, "C": 1.0})
    scores = make_scores(
        {
            ("A", "qa", "acc_norm"): 0.1,
            ("A", "rca", "accuracy"): 0.2,
            ("B", "qa", "acc_norm"): 0.15,
            ("B", "rca", "accuracy"): 0.15,
            ("C", "qa", "acc_norm"): 0.0,
            ("C", "rca", "accuracy"): 0.0,
        }
    )
    result = rank_configs(configs, scores, RankingSettings(w_grid=(0.0,)))
    assert rows_at(result, 0.0)["rank"].to_dict() == {"A": 1, "B": 1, "C": 3}


def test_single_config() -> None:
    result = rank_configs(make_configs({"A": 0.002}), make_scores({("A", "qa", "acc_norm"): 0.3}))
    assert result.table["rank"].eq(1).all()
    assert result.table["phi"].eq(1.0).all()
    assert len(result.table) == 11


def test_missing_metric_error_names_config_and_metric() -> None:
    scores = make_scores({k: v for k, v in SCORES.items() if k != ("B", "qa", "acc_norm")})
    with pytest.raises(ValueError, match=r"'B' lacks \['qa:acc_norm'\]"):
        rank_configs(make_configs(ENERGY), scores, RankingSettings())


def test_config_without_any_scores_is_missing() -> None:
    with pytest.raises(ValueError, match=r"'D' lacks \['rca:accuracy', 'qa:acc_norm'\]"):
        rank_configs(make_configs({**ENERGY, "D": 1.5}), make_scores(SCORES), RankingSettings())


def test_exclude_mode_drops_and_reports() -> None:
    scores = make_scores({k: v for k, v in SCORES.items() if k != ("B", "qa", "acc_norm")})
    result = rank_configs(make_configs(ENERGY), scores, RankingSettings(missing="exclude"))
    assert result.excluded == ("B",)
    assert set(result.table["config_id"]) == {"A", "C"}
    # phi is rescaled over the configs still compared: A 1, C 0.
    assert rows_at(result, 1.0)["phi"].to_dict() == {"A": 1.0, "C": 0.0}


def test_scores_of_unlisted_configs_are_ignored() -> None:
    scores = make_scores({**SCORES, ("Z", "qa", "acc_norm"): 1.0, ("Z", "rca", "accuracy"): 1.0})
    result = rank_configs(make_configs(ENERGY), scores, RankingSettings(metric_scaling="minmax"))
    assert set(result.table["config_id"]) == {"A", "B", "C"}
    rho = rows_at(result, 0.0)["rho"].to_dict()
    assert rho == pytest.approx({"A": 1 / 6, "B": 0.375, "C": 1.0})


def test_missing_config_columns_are_reported() -> None:
    configs = make_configs(ENERGY).drop(columns=["pruning"])
    with pytest.raises(ValueError, match=r"configs lacks required columns \['pruning'\]"):
        rank_configs(configs, make_scores(SCORES))


# --- summarise_top ------------------------------------------------------------------------


def test_summarise_top_uses_nearest_grid_weight(result: RankingResult) -> None:
    top = summarise_top(result, w=0.52, k=2)
    assert [row["config_id"] for row in top] == ["A", "B"]
    assert all(row["w"] == 0.5 for row in top)
    assert top[0]["R"] == pytest.approx(0.8)
    assert set(top[0]) == set(RANKING_COLUMNS)


def test_summarise_top_k_larger_than_configs(result: RankingResult) -> None:
    assert len(summarise_top(result, w=0.0, k=10)) == 3
    with pytest.raises(ValueError, match="k must be at least 1"):
        summarise_top(result, w=0.0, k=0)


# --- pareto_front -------------------------------------------------------------------------


def test_pareto_front_hand_example() -> None:
    energy = pd.Series({"A": 1.0, "B": 2.0, "C": 3.0, "D": 2.0, "E": 1.0, "F": 0.5})
    quality = pd.Series({"A": 0.5, "B": 0.9, "C": 0.8, "D": 0.9, "E": 0.4, "F": 0.3})
    front = pareto_front(energy, quality)
    # C is beaten by B (less energy, more quality); E by A (same energy, more quality);
    # B and D are the same point, so neither dominates the other.
    assert front.to_dict() == {"A": True, "B": True, "C": False, "D": True, "E": False, "F": True}


def test_pareto_front_needs_matching_index() -> None:
    with pytest.raises(ValueError, match="same unique config ids"):
        pareto_front(pd.Series({"A": 1.0}), pd.Series({"B": 0.5}))


# --- rank_stability -----------------------------------------------------------------------


HEADLINE = {"rca": "accuracy", "qa": "acc_norm"}  # the default rho: one headline metric per task (cloze QA)


def make_items(correct: dict[str, dict[str, list[int]]]) -> pd.DataFrame:
    """correct[config][task] = per-item 0/1 values; item ids are positions."""
    rows = [
        {"config_id": c, "task": t, "metric": HEADLINE[t], "item_id": i, "value": float(v)}
        for c, tasks in correct.items()
        for t, values in tasks.items()
        for i, v in enumerate(values)
    ]
    return pd.DataFrame(rows)


def make_repeats(repeats: dict[str, list[float]]) -> pd.DataFrame:
    rows = [
        {"config_id": c, "repeat": r, "energy_kwh_per_item": e}
        for c, values in repeats.items()
        for r, e in enumerate(values)
    ]
    return pd.DataFrame(rows)


def test_dominant_config_is_always_first() -> None:
    # X uses the least energy in every repeat and answers every item correctly.
    items = make_items(
        {
            "X": {"qa": [1] * 8, "rca": [1] * 6},
            "Y": {"qa": [1, 0] * 4, "rca": [1, 1, 0] * 2},
            "Z": {"qa": [0, 0, 1, 1] * 2, "rca": [0, 1, 0] * 2},
        }
    )
    repeats = make_repeats({"X": [1.0, 1.1, 0.9], "Y": [2.0, 2.5, 1.8], "Z": [3.0, 2.2, 2.9]})
    configs = make_configs({"X": 1.0, "Y": 2.1, "Z": 2.7})
    stability = rank_stability(configs, items, repeats, RankingSettings(), 0.5, n_boot=200, seed=1)

    expected_columns = ["config_id", "rank_1", "rank_2", "rank_3", "modal_rank", "p_modal"]
    assert list(stability.columns) == expected_columns
    x = stability.set_index("config_id").loc["X"]
    assert x["rank_1"] == 1.0
    assert x["modal_rank"] == 1 and x["p_modal"] == 1.0
    shares = stability[["rank_1", "rank_2", "rank_3"]]
    assert np.allclose(shares.sum(axis=1), 1.0)


def test_rank_shares_sum_to_one_both_ways() -> None:
    # w = 1 ranks on energy alone; continuous repeats make ties practically impossible, so
    # every draw is a permutation and each rank column also sums to one.
    rng = np.random.default_rng(7)
    ids = [f"c{i}" for i in range(5)]
    repeats = make_repeats(
        {c: list(1.0 + 0.1 * i + rng.normal(0, 0.2, size=4)) for i, c in enumerate(ids)}
    )
    items = make_items({c: {"qa": [1, 0, 1]} for c in ids})
    configs = make_configs({c: 1.0 for c in ids})
    stability = rank_stability(configs, items, repeats, RankingSettings(), 1.0, n_boot=300, seed=3)
    shares = stability[[f"rank_{r}" for r in range(1, 6)]]
    assert np.allclose(shares.sum(axis=1), 1.0)
    assert np.allclose(shares.sum(axis=0), 1.0)
    assert (stability["p_modal"] == shares.max(axis=1)).all()


def test_rank_stability_is_deterministic_with_seed() -> None:
    items = make_items({"A": {"qa": [1, 0, 1, 1, 0, 1]}, "B": {"qa": [0, 1, 1, 0, 1, 1]}})
    repeats = make_repeats({"A": [1.0, 1.4, 1.2], "B": [1.1, 1.3, 1.2]})
    configs = make_configs({"A": 1.2, "B": 1.2})
    first = rank_stability(configs, items, repeats, RankingSettings(), w=0.5, n_boot=100, seed=42)
    second = rank_stability(configs, items, repeats, RankingSettings(), w=0.5, n_boot=100, seed=42)
    pd.testing.assert_frame_equal(first, second)


def test_single_repeat_holds_energy_fixed() -> None:
    # Ranking on energy alone with one repeat each: every draw gives the same order.
    items = make_items({"A": {"qa": [1, 0]}, "B": {"qa": [0, 1]}, "C": {"qa": [1, 1]}})
    repeats = make_repeats({"A": [2.0], "B": [1.0], "C": [3.0]})
    configs = make_configs({"A": 2.0, "B": 1.0, "C": 3.0})
    stability = rank_stability(configs, items, repeats, RankingSettings(), w=1.0, n_boot=50)
    assert stability.set_index("config_id")["modal_rank"].to_dict() == {"B": 1, "A": 2, "C": 3}
    assert stability["p_modal"].eq(1.0).all()
    no_repeats = rank_stability(configs, items, None, RankingSettings(), w=1.0, n_boot=50)
    pd.testing.assert_frame_equal(stability, no_repeats)


def test_rank_stability_missing_metric_and_incomplete_items() -> None:
    items = make_items({"A": {"qa": [1, 0], "rca": [1]}, "B": {"qa": [0, 1]}})
    configs = make_configs({"A": 1.0, "B": 2.0})
    with pytest.raises(ValueError, match=r"'B' lacks \['rca:accuracy'\]"):
        rank_stability(configs, items, None, RankingSettings(), w=0.5)
    excluded = rank_stability(configs, items, None, RankingSettings(missing="exclude"), w=0.5)
    assert excluded["config_id"].tolist() == ["A"]
    assert excluded.attrs["excluded"] == ("B",)

    ragged = make_items({"A": {"qa": [1, 0, 1]}, "B": {"qa": [0, 1]}})
    with pytest.raises(ValueError, match=r"qa:acc_norm are incomplete.*'B': 1"):
        rank_stability(configs, ragged, None, RankingSettings(), w=0.5)


def test_rank_stability_rejects_bad_w() -> None:
    items = make_items({"A": {"qa": [1]}})
    with pytest.raises(ValueError, match=r"w must lie in \[0, 1\]"):
        rank_stability(make_configs({"A": 1.0}), items, None, RankingSettings(), w=1.5)


def test_rank_stability_is_fast_enough() -> None:
    rng = np.random.default_rng(0)
    ids = [f"c{i:02d}" for i in range(20)]
    items = make_items(
        {
            c: {"qa": list(rng.integers(0, 2, 200)), "rca": list(rng.integers(0, 2, 150))}
            for c in ids
        }
    )
    repeats = make_repeats({c: list(rng.uniform(0.001, 0.002, 5)) for c in ids})
    configs = make_configs({c: 0.0015 for c in ids})
    start = time.perf_counter()
    stability = rank_stability(configs, items, repeats, RankingSettings(), w=0.5, n_boot=200)
    assert time.perf_counter() - start < 1.0
    assert len(stability) == 20


# --- paired comparisons -------------------------------------------------------------------------

from llm_energy.analysis.ranking_math import compare, mcnemar_exact, paired_comparisons  # noqa: E402


def test_mcnemar_exact_on_a_hand_computed_table():
    # 8 items only A gets right, 2 only B gets right, 10 both right: n = 10 discordant, k = 2.
    a = np.array([1] * 8 + [0] * 2 + [1] * 10)
    b = np.array([0] * 8 + [1] * 2 + [1] * 10)
    # two-sided: 2 * P(X <= 2), X ~ Binomial(10, 1/2) = 2 * (1 + 10 + 45) / 1024
    assert mcnemar_exact(a, b) == pytest.approx(112 / 1024)
    assert mcnemar_exact(a, a) == 1.0  # nothing discordant
    assert mcnemar_exact(np.array([1] * 12), np.array([0] * 12)) == pytest.approx(2 / 4096)


def item_rows(config_id, task, metric, values):
    return [{"config_id": config_id, "task": task, "metric": metric, "item_id": f"i{k:03d}", "value": v}
            for k, v in enumerate(values)]


def test_paired_sign_flip_test_sees_a_difference_on_the_same_items():
    rng = np.random.default_rng(1)
    base = rng.random(60)
    rows = (item_rows("A", "gen", "rouge_l", base + 0.2) + item_rows("B", "gen", "rouge_l", base)
            + item_rows("C", "gen", "rouge_l", base + rng.normal(0, 0.01, 60)))
    table = paired_comparisons(pd.DataFrame(rows), n_boot=2000, seed=0)
    ab = compare(table, "A", "B", "gen", "rouge_l")
    assert ab["diff"] == pytest.approx(0.2) and ab["test"] == "sign_flip"
    # every item moved by exactly 0.2, so the paired interval is a point, far from 0; the Monte-Carlo
    # permutation p-value is floored at 1/(B+1), never 0
    assert ab["ci_low"] == pytest.approx(0.2) and ab["ci_high"] == pytest.approx(0.2)
    assert ab["p_value"] == pytest.approx(1 / 10000)
    ba = compare(table, "B", "A", "gen", "rouge_l")
    assert ba["diff"] == pytest.approx(-0.2) and ba["ci_high"] == pytest.approx(-0.2)
    bc = compare(table, "B", "C", "gen", "rouge_l")
    assert bc["ci_low"] < 0 < bc["ci_high"] and bc["p_value"] > 0.05  # noise only
    assert len(table) == 3  # one row per unordered pair


def test_paired_comparisons_use_mcnemar_for_accuracies_and_only_shared_items():
    a = [1] * 8 + [0] * 2 + [1] * 10
    b = [0] * 8 + [1] * 2 + [1] * 10
    # B misses the last item
    rows = item_rows("A", "rca", "accuracy", a) + item_rows("B", "rca", "accuracy", b)[:-1]
    table = paired_comparisons(pd.DataFrame(rows), seed=0)
    (row,) = table.to_dict(orient="records")
    assert row["test"] == "mcnemar_exact" and row["n_items"] == 19
    assert row["diff"] == pytest.approx((17 - 11) / 19)
    assert row["p_value"] == pytest.approx(112 / 1024)


def test_p_best_and_tied_with_top_on_two_separable_and_two_inseparable_configs():
    from llm_energy.analysis.ranking_math import add_top_uncertainty, rank_configs, rank_stability

    rng = np.random.default_rng(3)
    correct = lambda error: (rng.random(80) >= error).astype(float)  # noqa: E731  (1 = item answered right)
    values = {"A": correct(0.10), "B": correct(0.11), "C": correct(0.45), "D": correct(0.48)}  # A ~ B >> C, D
    rows = [r for c, v in values.items() for r in item_rows(c, "rca", "accuracy", v)]
    items = pd.DataFrame(rows)
    configs = make_configs({c: 0.001 for c in values})  # equal energy: quality decides
    scores = items.groupby(["config_id", "task", "metric"], as_index=False)["value"].mean()
    settings = RankingSettings(w_grid=(0.0, 0.5))
    table = rank_configs(configs, scores, settings).table
    stability = rank_stability(configs, items, None, settings, w=0.5, n_boot=400, seed=0)
    out = add_top_uncertainty(table, stability.attrs["p_best"]).set_index(["config_id", "w"])
    at = out.xs(0.5, level="w")
    # one of them is best in every draw (ties share it)
    assert at.loc["A", "p_best"] + at.loc["B", "p_best"] >= 1.0
    assert at.loc["A", "p_best"] > 0.05 and at.loc["B", "p_best"] > 0.05
    assert at.loc["C", "p_best"] == 0 and at.loc["D", "p_best"] == 0
    assert set(at.index[at["tied_with_top"]]) == {"A", "B"}


# --- one rho, stated: the headline metric per task, the same in the point ranking and the resampling ------


def items_and_means(values: dict[str, dict[str, list[float]]],
                    metric_of: dict[str, str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-item rows and the scores table of their means (what scores.csv holds for accuracies)."""
    rows = [{"config_id": c, "task": t, "metric": metric_of[t], "item_id": f"i{i}", "value": float(v)}
            for c, tasks in values.items() for t, vs in tasks.items() for i, v in enumerate(vs)]
    items = pd.DataFrame(rows)
    scores = items.groupby(["config_id", "task", "metric"], as_index=False)["value"].mean()
    return items, scores


def test_default_rho_is_one_headline_metric_per_task_by_style() -> None:
    from llm_energy.analysis.ranking_math import chosen_metrics, headline_metrics

    assert headline_metrics(["qa", "rca", "rca_resolution"]) == ("rca:accuracy", "qa:acc_norm")
    assert headline_metrics(["qa", "rca"], qa_style="options") == ("rca:accuracy", "qa:acc")
    scores = make_scores({("A", "rca", "accuracy"): 0.5, ("A", "rca", "macro_f1"): 0.2,
                          ("A", "qa", "acc"): 0.7, ("A", "qa", "acc_norm"): 0.9,
                          ("A", "rca_resolution", "rouge_l"): 0.1})
    assert chosen_metrics(scores, RankingSettings()) == ("rca:accuracy", "qa:acc_norm")
    assert chosen_metrics(scores, RankingSettings(), qa_style="options") == ("rca:accuracy", "qa:acc")
    # rho never counts a task twice: (0.5 + 0.9) / 2 for cloze, (0.5 + 0.7) / 2 for options
    assert compute_rho(scores, RankingSettings())[0]["A"] == pytest.approx(0.7)
    assert compute_rho(scores, RankingSettings(), qa_style="options")[0]["A"] == pytest.approx(0.6)
    result = rank_configs(make_configs({"A": 1.0}), scores, RankingSettings())
    assert result.settings.metrics == ("rca:accuracy", "qa:acc_norm")  # the result states what rho counted


def test_override_replaces_the_headline_metrics() -> None:
    from llm_energy.analysis.ranking_math import rho_formula

    scores = make_scores({("A", "rca", "accuracy"): 0.5, ("A", "rca", "macro_f1"): 0.2,
                          ("A", "qa", "acc_norm"): 0.9})
    settings = RankingSettings(metrics=("rca:macro_f1",))
    result = rank_configs(make_configs({"A": 1.0}), scores, settings)
    assert result.table["rho"].iloc[0] == pytest.approx(0.2)
    assert result.settings.metrics == ("rca:macro_f1",)
    assert rho_formula(result.settings) == ("R = w·φ + (1−w)·ρ, ρ = rca:macro_f1, "
                                            "φ = min-max of energy per item (Wh): (E_max − E)/(E_max − "
                                            "E_min)")


def test_headline_metric_absent_is_a_clear_error() -> None:
    scores = make_scores({("A", "rca", "accuracy"): 0.5, ("A", "qa", "acc"): 0.7})
    with pytest.raises(ValueError, match=r"headline metrics \['qa:acc_norm'\] \(qa style "
                                         r"'cloze'\).*ranking.metrics"):
        compute_rho(scores, RankingSettings())


def test_rho_formula_names_the_metrics() -> None:
    from llm_energy.analysis.ranking_math import rho_formula

    settings = RankingSettings(metrics=("rca:accuracy", "qa:acc_norm"))
    assert rho_formula(settings).startswith("R = w·φ + (1−w)·ρ, ρ = (rca:accuracy + qa:acc_norm)/2, φ = "
                                            "min-max")
    ratio = RankingSettings(metrics=("rca:accuracy", "qa:acc"), phi_method="ratio", metric_scaling="minmax")
    assert rho_formula(ratio) == ("R = w·φ + (1−w)·ρ, ρ = (minmax(rca:accuracy) + minmax(qa:acc))/2, "
                                  "φ = E_min/E of energy per item (Wh)")


@pytest.mark.parametrize("scaling", ["identity", "minmax"])
@pytest.mark.parametrize("qa_style", ["cloze", "options"])
def test_point_rho_equals_the_resampling_rho_on_the_observed_items(scaling: str, qa_style: str) -> None:
    from llm_energy.analysis.ranking_math import rho_from_items

    rng = np.random.default_rng(5)
    values = {c: {"rca": list(rng.integers(0, 2, 9)), "qa": list(rng.integers(0, 2, 7))}
              for c in ("A", "B", "C")}
    items_norm, scores_norm = items_and_means(values, {"rca": "accuracy", "qa": "acc_norm"})
    rng2 = np.random.default_rng(6)
    other = {c: {"qa": list(rng2.integers(0, 2, 7))} for c in values}
    items_acc, scores_acc = items_and_means(other, {"qa": "acc"})
    items = pd.concat([items_norm, items_acc], ignore_index=True)
    scores = pd.concat([scores_norm, scores_acc], ignore_index=True)
    settings = RankingSettings(metric_scaling=scaling)
    point = rank_configs(make_configs({"A": 1.0, "B": 2.0, "C": 3.0}), scores, settings, qa_style=qa_style)
    point_rho = point.table.drop_duplicates("config_id").set_index("config_id")["rho"]
    resampling_rho = rho_from_items(items, settings, qa_style=qa_style)
    assert resampling_rho.to_dict() == pytest.approx(point_rho.to_dict(), abs=1e-12)
    # and the draws of rank_stability use that same arithmetic: with w = 0 and items that never vary
    # between draws (one item per task), the stability ranking is the point ranking.
    fixed = items.groupby(["config_id", "task", "metric"], as_index=False)["value"].mean().assign(item_id="x")
    stability = rank_stability(make_configs({"A": 1.0, "B": 2.0, "C": 3.0}), fixed, None, settings, w=0.0,
                               n_boot=20, qa_style=qa_style)
    point_ranks = point.table[point.table["w"] == 0.0].set_index("config_id")["rank"]
    assert stability.set_index("config_id")["modal_rank"].to_dict() == point_ranks.to_dict()
    assert stability["p_modal"].eq(1.0).all()


def test_rank_stability_refuses_a_metric_without_per_item_scores() -> None:
    items = make_items({"A": {"rca": [1, 0, 1]}, "B": {"rca": [0, 1, 1]}})
    settings = RankingSettings(metrics=("rca:accuracy", "rca:macro_f1"))
    with pytest.raises(ValueError, match=r"rho counts \['rca:macro_f1'\], which have no per-item scores.*"
                                         r"ranking.bootstrap: 0"):
        rank_stability(make_configs({"A": 1.0, "B": 2.0}), items, None, settings, w=0.5)
