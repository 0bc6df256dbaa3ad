"""Every verdict the report prints is right (issue 24): one headline metric everywhere, paired tests
that keep their size (cross-checked with scipy and statsmodels), energy and tokens that match what
ran, spreads right for the sum, and rankings that refuse what cannot be compared."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pandas as pd
import pytest
from test_ranking_phase import energy_row, write_study

from llm_energy.analysis import ranking_math as rank
from llm_energy.analysis.significance import (
    MIN_VERDICT_ITEMS,
    holm,
    mcnemar_exact,
    paired_interval,
    sign_flip_test,
)
from llm_energy.config import RankingSettings, headline_metric
from llm_energy.measure.meter import (
    EnergyRecord,
    RepeatedMeasurement,
    component_methods,
    nvml_indices,
    windows_needed,
)
from llm_energy.methods import scoring
from llm_energy.methods.scoring import TaskResult
from llm_energy.phases import ranking as rk
from llm_energy.tables import store as results
from llm_energy.tables.rows import ConfigIdentity, energy_per_correct, record_task

scipy_stats = pytest.importorskip("scipy.stats")


# --- one headline metric ---------------------------------------------------------------------------


def test_one_headline_metric_per_task_and_style():
    assert headline_metric("qa", "options") == "acc" and headline_metric("qa", "cloze") == "acc_norm"
    assert headline_metric("rca", "labels") == "accuracy" and headline_metric("rca_resolution") == "rouge_l"
    assert not hasattr(rk, "HEADLINE_METRICS")  # the copy that disagreed is gone
    assert (rk.verdict_metrics("options")
            == (("rca", "accuracy"), ("qa", "acc"), ("rca_resolution", "rouge_l")))


def _options_study(root, n_qa=40, n_rca=40):
    """Two precisions of one model, QA as lettered options (only `acc` written, as the real scorer does)."""
    study = write_study(root, {"fp32": (0.8, 0.7), "bf16": (0.3, 0.2)}, {"fp32": 2e-6, "bf16": 1e-6},
                        qa_style="options")
    for table in ("scores", "item_scores"):
        frame = results.read_table(study, table)
        frame = frame[~((frame["task"] == "qa") & (frame["metric"] == "acc_norm"))]
        frame["style"] = np.where(frame["task"] == "qa", "options", "labels") if table == "scores" else None
        results.write_table(study, table, frame.drop(columns=["style"]) if table == "item_scores" else frame)
    configs = results.read_table(study, "configs")
    configs["model"] = "m"
    results.write_table(study, "configs", configs)
    energy = results.read_table(study, "energy")
    energy["model"] = "m"
    results.write_table(study, "energy", energy)
    return study


def test_the_quantization_verdicts_of_an_options_study_state_qa_acc_with_adjusted_p(tmp_path):
    # Failed before: verdicts looked up qa acc_norm, which an options study never writes, so QA was left out.
    outcome = rk.rank_study(_options_study(tmp_path / "s"), RankingSettings(bootstrap=20))
    text = rk.quality_changes(outcome, "quantization")
    assert "bf16 vs fp32" in text
    assert "qa acc " in text and "rca accuracy " in text and "p_adj = " in text
    comparisons = results.read_table(tmp_path / "s", "comparisons")
    judged = comparisons[comparisons["family"].fillna("") != ""]
    assert set(judged["family"]) == {"quantization:rca:accuracy", "quantization:qa:acc"}
    assert judged["p_adjusted"].notna().all() and (judged["p_adjusted"] >= judged["p_value"]).all()
    # pairs the report does not judge keep p_adjusted empty
    assert comparisons[comparisons["family"].fillna("") == ""]["p_adjusted"].isna().all()


def test_recovery_and_energy_per_correct_follow_the_style(tmp_path):
    result = TaskResult("qa", {"acc": 0.5, "acc_norm": 0.25}, {}, {}, (), (), n_items=4)
    # Failed before: energy per correct counted acc under cloze while rho counted acc_norm.
    assert energy_per_correct(1.0, result, "cloze") == pytest.approx(1.0)  # 0.25 * 4 = 1 correct
    assert energy_per_correct(1.0, result, "options") == pytest.approx(0.5)


def test_a_metric_on_too_few_items_gets_no_verdict(tmp_path):
    outcome = rk.rank_study(_options_study(tmp_path / "s"), RankingSettings(bootstrap=0))
    few = outcome.comparisons.copy()
    few.loc[few["task"] == "qa", "n_items"] = MIN_VERDICT_ITEMS - 1
    adjusted = rk.adjust_comparisons(few, outcome.configs, "options")
    assert adjusted.loc[adjusted["task"] == "qa", "p_adjusted"].isna().all()
    text = rk.quality_changes(rk.RankingOutcome(**{**outcome.__dict__, "comparisons": adjusted}),
                              "quantization")
    assert "qa acc" in text and "too few items to judge" in text
    assert "beyond noise" in text or "within noise" in text  # RCA (40 items) is still judged


# --- paired tests keep their size; cross-checks -----------------------------------------------------


def test_mcnemar_matches_scipy_binomtest_and_survives_thousands_of_discordant_pairs():
    rng = np.random.default_rng(0)
    for n in (5, 30, 200, 3000):
        a = (rng.random(n) < 0.5).astype(float)
        b = (rng.random(n) < 0.45).astype(float)
        only_a, only_b = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
        expected = scipy_stats.binomtest(min(only_a, only_b), only_a + only_b, 0.5).pvalue
        assert mcnemar_exact(a, b) == pytest.approx(expected, rel=1e-9)
    # Failed before: 2.0**n overflows at 1,024 discordant pairs.
    a = np.array([1.0] * 700 + [0.0] * 700)
    b = np.array([0.0] * 700 + [1.0] * 700)
    assert mcnemar_exact(a, b) == 1.0
    # 700 only-a against 600 only-b
    assert (mcnemar_exact(a[:1300], b[:1300])
            == pytest.approx(scipy_stats.binomtest(600, 1300).pvalue, rel=1e-9))


def test_sign_flip_test_matches_scipy_permutation_test():
    rng = np.random.default_rng(1)
    for n in (8, 12):  # exact: every sign pattern, as scipy enumerates them
        d = rng.normal(0.05, 0.1, n)
        expected = scipy_stats.permutation_test((d,), np.mean, permutation_type="samples",
                                                alternative="two-sided", n_resamples=np.inf).pvalue
        assert sign_flip_test(d) == pytest.approx(expected, rel=1e-9)
    d = rng.normal(0.02, 0.1, 200)  # Monte-Carlo: within its error of scipy's exact-in-the-limit answer
    expected = scipy_stats.permutation_test((d,), np.mean, permutation_type="samples",
                                            alternative="two-sided", n_resamples=50000, random_state=2).pvalue
    assert sign_flip_test(d, n_perm=20000) == pytest.approx(expected, abs=0.02)
    # Failed before: the bootstrap p-value printed 0 when every difference had one sign.
    assert sign_flip_test(np.full(8, -0.1)) == pytest.approx(2 / 256)
    assert sign_flip_test(np.full(40, 0.1), n_perm=999) == pytest.approx(1 / 1000)


def test_paired_interval_matches_scipy_bootstrap():
    rng = np.random.default_rng(3)
    d = rng.normal(0.1, 0.3, 150)
    low, high = paired_interval(d, n_boot=20000, rng=np.random.default_rng(0))
    ref = scipy_stats.bootstrap((d,), np.mean, n_resamples=20000, method="percentile",
                                random_state=0).confidence_interval
    assert low == pytest.approx(ref.low, abs=0.01) and high == pytest.approx(ref.high, abs=0.01)


def test_holm_matches_statsmodels():
    multipletests = pytest.importorskip("statsmodels.stats.multitest").multipletests
    rng = np.random.default_rng(4)
    for m in (1, 3, 10):
        p = rng.random(m) ** 3
        assert holm(p) == pytest.approx(list(multipletests(p, method="holm")[1]))
    assert math.isnan(holm([0.01, float("nan"), 0.04])[1])
    assert (holm([0.01, float("nan"), 0.04])[::2]
            == pytest.approx(list(multipletests([0.01, 0.04], method="holm")[1])))


def test_the_tests_keep_their_size_under_no_difference():
    rng = np.random.default_rng(5)
    n, sims = 30, 400
    rejections = 0
    for _ in range(sims):
        x = rng.random((n, 2))  # exchangeable pair per item: no difference
        rejections += sign_flip_test(x[:, 0] - x[:, 1], n_perm=499, seed=int(rng.integers(1 << 30))) < 0.05
    assert rejections / sims <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / sims)


def test_two_thousand_qa_items_per_config_rank_without_error(tmp_path):
    import llm_energy.phases.ranking as ranking_module

    rng = np.random.default_rng(6)
    n = 2000
    base = (rng.random(n) < 0.5).astype(float)
    other = np.where(rng.random(n) < 0.6, 1 - base, base)  # about 1,200 discordant pairs
    study = write_study(tmp_path / "big", {"fp32": (0.8, 0.7), "bf16": (0.6, 0.5)},
                        {"fp32": 2e-6, "bf16": 1e-6}, qa_style="options")
    items = results.read_table(study, "item_scores")
    items = items[items["task"] != "qa"]
    rows = [{"config_id": c, "task": "qa", "metric": "acc", "item_id": f"q{i}", "value": float(v)}
            for c, values in (("fp32", base), ("bf16", other)) for i, v in enumerate(values)]
    results.write_table(study, "item_scores", pd.concat([items, pd.DataFrame(rows)], ignore_index=True))
    scores = results.read_table(study, "scores")
    scores = scores[scores["task"] != "qa"]
    qa = [{"config_id": c, "task": "qa", "metric": "acc", "value": v.mean(), "ci_low": v.mean() - 0.02,
           "ci_high": v.mean() + 0.02, "n_items": n} for c, v in (("fp32", base), ("bf16", other))]
    results.write_table(study, "scores", pd.concat([scores, pd.DataFrame(qa)], ignore_index=True))
    outcome = ranking_module.rank_study(study, RankingSettings(bootstrap=20))
    row = rank.compare(outcome.comparisons, "bf16", "fp32", "qa", "acc")
    assert row["n_items"] == n and row["test"] == "mcnemar_exact" and 0 <= row["p_value"] <= 1


# --- energy and tokens that match ---------------------------------------------------------------------


def _record(kwh: float, net: float | None = None, seconds: float = 1.0) -> EnergyRecord:
    return EnergyRecord(name="w", duration_s=seconds, cpu_energy_kwh=kwh, gpu_energy_kwh=0.0,
                        ram_energy_kwh=0.0, emissions_kg=kwh * 0.05, cpu_method="codecarbon:cpu_load",
                        gpu_method="none", ram_method="none",
                        idle_power_w=(kwh - (net if net is not None else kwh / 2)) * 3.6e6 / seconds)


def test_p_best_resamples_the_point_rankings_energy_per_item():
    # One config: a chunked task of 4 windows and a generation task of 2 full-pass repeats.
    energy = pd.DataFrame([
        {**energy_row("c", "qa", 4.0, 200), "energy_scope": "machine"},
        {**energy_row("c", "rca_resolution", 3.0, 8), "energy_scope": "machine"},
    ])
    repeats = pd.DataFrame(
        [{"config_id": "c", "phase": "inference", "task": "qa", "repeat": i + 1, "duration_s": 1.0,
          "energy_kwh": 1.0, "energy_net_kwh": 0.5, "n_items": 50, "window_unit": "chunk", "task_items": 200}
         for i in range(4)]
        + [{"config_id": "c", "phase": "inference", "task": "rca_resolution", "repeat": i + 1,
            "duration_s": 1.0, "energy_kwh": e, "energy_net_kwh": e / 2, "n_items": 8,
            "window_unit": "repeat", "task_items": 8}
           for i, e in enumerate((2.9, 3.1))])
    point = rank.config_energy(energy).set_index("config_id")["energy_kwh_per_item"]["c"]
    observed = rank.energy_draws(rank.repeat_energy(repeats), ["c"], n_boot=1)[0, 0]
    assert observed == pytest.approx(point) == pytest.approx(7.0 / 208)
    # Failed before: window i was added across tasks, windows 3-4 dropped, generated items over-weighted.
    draws = rank.energy_draws(rank.repeat_energy(repeats), ["c"], n_boot=4000, rng=np.random.default_rng(0))
    assert draws.mean() == pytest.approx(point, rel=0.01)


def test_tokens_are_counted_as_they_ran_with_a_shared_prefix_once_per_call(tiny_model):
    from test_fewshot import _requests

    prepared = scoring.prepare_task("qa", tiny_model.tokenizer, _requests(), None, "options")
    shared = scoring.shared_prefix_length(prepared.encoded)
    assert shared >= scoring.MIN_SHARED_PREFIX
    result = scoring.task_result(prepared,
                                 scoring.score_prepared(tiny_model.model, tiny_model.tokenizer, prepared))
    prompted = sum(r.n_tokens for r in prepared.encoded)
    assert result.n_tokens_prompted == prompted
    # Failed before: the prefix was counted for every item although it ran once.
    if scoring._prefix_sharing_ok(tiny_model.model):
        assert result.n_tokens == prompted - shared * (len(prepared.encoded) - 1)
    else:
        assert result.n_tokens == prompted


# --- spreads right for the sum; two-stage repeats --------------------------------------------------------


def test_a_chunked_pass_reports_the_standard_error_of_its_sum():
    m = RepeatedMeasurement(tuple(_record(k) for k in (1.0, 1.2, 0.8, 1.0)), None, unit="chunk",
                            window_items=(10, 10, 10, 10))
    implied = [4.0, 4.8, 3.2, 4.0]
    assert m.total("energy_kwh") == pytest.approx(4.0)
    # Failed before: the spread of the implied totals themselves, sqrt(4) = 2x too large for the sum.
    assert m.std("energy_kwh") == pytest.approx(statistics.stdev(implied) / 2)
    assert m.std_estimator == "se_of_chunk_sum" and m.se("energy_kwh") == pytest.approx(m.std("energy_kwh"))


def test_two_stage_repeats_report_an_unbiased_spread():
    rng = np.random.default_rng(7)
    sigma = 0.08
    variances = []
    for _ in range(6000):
        pilot = list(rng.normal(1.0, sigma, 3))
        total = windows_needed(pilot, 0.05, 5)
        values = pilot + list(rng.normal(1.0, sigma, total - 3))
        m = RepeatedMeasurement(tuple(_record(v) for v in values), None, pilot=3)
        variances.append(m.std("energy_kwh") ** 2)
    # Stopping when the running spread is small reported variances 8-18% low in the same simulation.
    assert statistics.fmean(variances) / sigma**2 == pytest.approx(1.0, abs=0.06)
    assert windows_needed([1.0, 1.0, 1.0], 0.05, 5) == 3 and windows_needed([0.8, 1.2, 1.0], 0.05, 5) == 5


# --- refusals and stale rows --------------------------------------------------------------------------------


def _identity(config_id="c"):
    return ConfigIdentity(config_id, "m", "fp32")


def _result(n: int, task: str = "rca") -> TaskResult:
    values = np.ones(n)
    return TaskResult(task, {"accuracy": 1.0}, {"accuracy": (1.0, 1.0)}, {"accuracy": values},
                      tuple(f"i{k}" for k in range(n)), tuple([0] * n), n_items=n, n_tokens=10 * n)


def test_a_remeasured_config_replaces_all_its_rows_and_net_at_or_below_idle_is_flagged(tmp_path):
    four = RepeatedMeasurement(tuple(_record(1.0) for _ in range(4)), None, unit="chunk",
                               window_items=(3, 3, 2, 2))
    record_task(tmp_path, _identity(), "inference", _result(10), four, "cpu", "float32", 0)
    two = RepeatedMeasurement(tuple(_record(1.0, net=-0.1) for _ in range(2)), None, unit="chunk",
                              window_items=(3, 3))
    record_task(tmp_path, _identity(), "inference", _result(6), two, "cpu", "float32", 0)
    # Failed before: items 6-9 and windows 3-4 of the first run stayed behind for the resampling.
    assert len(results.read_table(tmp_path, "item_scores")) == 6
    assert sorted(results.read_table(tmp_path, "energy_repeats")["repeat"]) == [1, 2]
    energy = results.read_table(tmp_path, "energy")
    assert len(energy) == 1 and bool(energy["net_at_or_below_idle"].iloc[0])
    assert list(energy.columns[: len(results.ENERGY_ALL_COLUMNS)]) == results.ENERGY_ALL_COLUMNS


def test_a_net_ranking_with_net_energy_at_or_below_zero_refuses_naming_the_configs():
    energy = pd.DataFrame([energy_row("a", "rca", 1.0, 10),
                           {**energy_row("b", "rca", 1.0, 10), "energy_net_kwh": -0.01}])
    rank.config_energy(energy, "gross")  # gross is fine
    with pytest.raises(ValueError, match=r"rows of b have net energy at or below zero"):
        rank.config_energy(energy, "net")


def test_a_ranking_never_mixes_energy_scopes():
    energy = pd.DataFrame([{**energy_row("a", "rca", 1.0, 10), "energy_scope": "machine"},
                           {**energy_row("b", "rca", 1.0, 10), "energy_scope": "gpu_only: shared node"}])
    with pytest.raises(ValueError, match=r"mixes energy scopes.*gpu_only: shared node: b.*machine: a"):
        rank.config_energy(energy)


# --- the method sentence; the GPU a job meters -------------------------------------------------------------


def test_the_method_sentence_reads_every_component(tmp_path):
    study = write_study(tmp_path / "s", {"fp32": (0.8, 0.7), "bf16": (0.6, 0.5)},
                        {"fp32": 2e-6, "bf16": 1e-6})
    energy = results.read_table(study, "energy")
    energy["energy_method"] = "nvml_counter"
    energy["gpu_method"], energy["cpu_method"], energy["ram_method"] = ("nvml_counter", "codecarbon:cpu_load",
                                                                        "codecarbon:ram_power_model")
    results.write_table(study, "energy", energy)
    outcome = rk.rank_study(study, RankingSettings(bootstrap=0))
    # Failed before: only energy_method (the GPU's counter) was read: "measured by hardware counters".
    assert set(outcome.methods) == {"nvml_counter", "codecarbon:cpu_load", "codecarbon:ram_power_model"}
    text = rk.summary_markdown(outcome, {}, [], [])
    assert "ESTIMATED, not measured: codecarbon:cpu_load" in text
    assert "codecarbon:cpu_load" in rk.figure_energy_method(outcome.methods)
    ranked = results.read_table(study, "ranking")
    assert "codecarbon:cpu_load" in str(ranked["energy_method"].iloc[0])
    assert (component_methods(energy.head(1))
            == ["codecarbon:cpu_load", "nvml_counter", "codecarbon:ram_power_model"])


class _FakeNvml:
    def nvmlDeviceGetHandleByUUID(self, uuid):
        if uuid not in ("GPU-bbb", "MIG-ccc"):
            raise RuntimeError("not found")
        return uuid

    def nvmlDeviceGetIndex(self, handle):
        return {"GPU-bbb": 3, "GPU-parent": 1}[handle]

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, handle):
        return "GPU-parent"


def test_gpu_uuids_and_mig_slices_map_to_the_right_nvml_index(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaa,GPU-bbb,MIG-ccc")
    nvml = _FakeNvml()
    # Failed before: a UUID fell back to the CUDA index, metering NVML GPU 1 for the job on GPU 3.
    assert nvml_indices("cuda:1", nvml) == [3]
    assert nvml_indices("cuda:2", nvml) == [1]
    with pytest.raises(ValueError, match="GPU-aaa"):
        nvml_indices("cuda:0", nvml)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0")
    assert nvml_indices("cuda:1") == [0]


# --- the scales of phi and rho ------------------------------------------------------------------------------


def test_the_report_prints_both_ranges_and_energys_effective_weight_and_rho_scale_minmax(tmp_path):
    study = write_study(tmp_path / "s", {"a": (0.5, 0.4), "b": (0.45, 0.35), "c": (0.4, 0.3)},
                        {"a": 3e-6, "b": 2e-6, "c": 1e-6})
    raw = rk.rank_study(study, RankingSettings(bootstrap=0))
    text = rk.summary_markdown(raw, {}, [], [])
    assert "Observed ranges at w = 0.5: φ 0.000–1.000, ρ " in text and "energy effectively weighs" in text
    at_w = raw.result.table[np.isclose(raw.result.table["w"], 0.5)]
    assert at_w["rho"].max() - at_w["rho"].min() < 0.5
    scaled = rk.rank_study(study, RankingSettings(bootstrap=20, rho_scale="minmax"))
    at_w = scaled.result.table[np.isclose(scaled.result.table["w"], 0.5)]
    assert at_w["rho"].min() == pytest.approx(0.0) and at_w["rho"].max() == pytest.approx(1.0)
    assert "minmax over configs of" in rank.rho_formula(scaled.result.settings)
    with pytest.raises(ValueError):
        RankingSettings(rho_scale="log")
