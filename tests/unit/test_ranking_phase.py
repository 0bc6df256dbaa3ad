"""The ranking phase over a study's tables: the stated formula with the metrics ρ counts, the same ρ in
the resampling, the top set under both φ choices, and the achieved precision of the scores."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml

from llm_energy.config import RankingSettings
from llm_energy.layout import StudyLayout
from llm_energy.phases import ranking as rk
from llm_energy.tables import store as results

RCA_ITEMS, QA_ITEMS = 40, 30


def energy_row(config_id: str, task: str, energy_kwh: float, n_items: int) -> dict:
    row = dict.fromkeys(results.ENERGY_COLUMNS)
    row.update(config_id=config_id, phase="inference", model="m", precision=config_id, adapter="none",
               pruning="none", task=task, n_items=n_items, n_tokens=10 * n_items, duration_s=1.0,
               energy_kwh=energy_kwh, energy_net_kwh=energy_kwh * 0.5, energy_method="codecarbon:cpu_tdp",
               repeats=3, energy_kwh_std=energy_kwh * 0.01, cpu_method="cpu_tdp", estimated_components="cpu")
    return row


def write_study(root, accuracy: dict[str, tuple[float, float]], energy: dict[str, float],
                qa_style: str = "cloze", seed: int = 0):
    """A study folder: per config its (rca, qa) accuracy and energy per item (kWh)."""
    rng = np.random.default_rng(seed)
    layout = StudyLayout(root)
    layout.root.mkdir(parents=True, exist_ok=True)
    layout.params_resolved.write_text(yaml.safe_dump({"tasks": {"qa": {"style": qa_style}}}))
    energy_rows, score_rows, item_rows, repeat_rows = [], [], [], []
    for config_id, (rca, qa) in accuracy.items():
        per_task = {"rca": (rng.random(RCA_ITEMS) < rca).astype(float),
                    "qa": (rng.random(QA_ITEMS) < qa).astype(float)}
        metrics = {"rca": {"accuracy": per_task["rca"]},
                   "qa": {"acc": per_task["qa"][::-1].copy(), "acc_norm": per_task["qa"]}}
        for task, by_metric in metrics.items():
            n = len(per_task[task])
            energy_rows.append(energy_row(config_id, task, energy[config_id] * n, n))
            for r, factor in enumerate((0.97, 1.0, 1.03)):
                repeat_rows.append(
                    {"config_id": config_id, "phase": "inference", "task": task, "repeat": r + 1,
                     "duration_s": 1.0, "energy_kwh": energy[config_id] * n * factor,
                     "energy_net_kwh": energy[config_id] * n * factor / 2, "n_items": n})
            for metric, values in by_metric.items():
                p = values.mean()
                half = 1.96 * np.sqrt(max(p * (1 - p), 1e-9) / n)
                score_rows.append({"config_id": config_id, "task": task, "metric": metric, "value": p,
                                   "ci_low": p - half, "ci_high": p + half, "n_items": n})
                item_rows += [{"config_id": config_id, "task": task, "metric": metric,
                               "item_id": f"{task}{i}", "value": v} for i, v in enumerate(values)]
        score_rows.append({"config_id": config_id, "task": "rca", "metric": "macro_f1", "value": rca / 2,
                           "ci_low": rca / 2 - 0.1, "ci_high": rca / 2 + 0.1, "n_items": RCA_ITEMS})
    results.upsert_rows(root, "energy", energy_rows)
    results.upsert_rows(root, "scores", score_rows)
    results.upsert_rows(root, "item_scores", item_rows)
    results.upsert_rows(root, "energy_repeats", repeat_rows)
    results.upsert_rows(root, "configs", [{"config_id": c, "model": "m", "precision": c, "adapter": "none",
                                           "pruning": "none", "status": "ok", "reason": "",
                                           "weights_origin": "", "scoring_path": ""} for c in accuracy])
    return root


def summary(outcome) -> str:
    return rk.summary_markdown(outcome, {}, [], [])


def test_the_summary_states_the_formula_and_the_stability_uses_the_same_rho(tmp_path):
    study = write_study(tmp_path / "s", {"fp32": (0.8, 0.7), "bf16": (0.6, 0.5)},
                        {"fp32": 2e-6, "bf16": 1e-6})
    outcome = rk.rank_study(study, RankingSettings(bootstrap=50))
    assert outcome.result.settings.metrics == ("rca:accuracy", "qa:acc_norm")
    assert outcome.stability_metrics == ("rca:accuracy", "qa:acc_norm")
    text = summary(outcome)
    assert ("R = w·φ + (1−w)·ρ, ρ = (rca:accuracy + qa:acc_norm)/2, φ = min-max of energy per item "
            "(Wh)") in text
    assert "resample the items of rca:accuracy, qa:acc_norm (the same ρ as the point ranking)" in text
    scores = results.read_table(study, "scores").set_index(["config_id", "task", "metric"])["value"]
    ranking = results.read_table(study, "ranking").drop_duplicates("config_id").set_index("config_id")["rho"]
    for config_id in ("fp32", "bf16"):
        assert ranking[config_id] == pytest.approx((scores[(config_id, "rca", "accuracy")]
                                                    + scores[(config_id, "qa", "acc_norm")]) / 2)


def test_the_qa_style_of_the_study_picks_its_headline_metric(tmp_path):
    study = write_study(tmp_path / "s", {"fp32": (0.8, 0.7), "bf16": (0.6, 0.5)},
                        {"fp32": 2e-6, "bf16": 1e-6}, qa_style="options")
    assert rk.study_qa_style(study) == "options"
    outcome = rk.rank_study(study, RankingSettings(bootstrap=20))
    assert outcome.result.settings.metrics == ("rca:accuracy", "qa:acc")
    # a style column in scores.csv, when the scoring writes one, wins over the parameters
    scores = results.read_table(study, "scores").assign(style="cloze")
    assert rk.study_qa_style(study, scores) == "cloze"


def test_an_override_without_per_item_scores_is_ranked_but_not_resampled_and_says_why(tmp_path):
    study = write_study(tmp_path / "s", {"fp32": (0.8, 0.7), "bf16": (0.6, 0.5)},
                        {"fp32": 2e-6, "bf16": 1e-6})
    outcome = rk.rank_study(study, RankingSettings(metrics=("rca:macro_f1", "qa:acc_norm"), bootstrap=20))
    assert outcome.stability is None
    table = results.read_table(study, "ranking")
    assert table["p_best"].isna().all()
    text = summary(outcome)
    assert "ρ = (rca:macro_f1 + qa:acc_norm)/2" in text
    assert "Rank stability was not estimated: ρ counts rca:macro_f1, which has no per-item scores" in text


def test_the_top_set_under_both_phi_choices(tmp_path):
    # Two configs: minmax gives phi 1 and 0 whatever the energies, so at w = 0.5 the cheap A wins by far;
    # ratio gives B phi = 1/1.25 = 0.8, and B's better quality puts it first (or tied) instead.
    study = write_study(tmp_path / "s", {"A": (0.5, 0.5), "B": (0.85, 0.85)}, {"A": 1.0e-6, "B": 1.25e-6})
    outcome = rk.rank_study(study, RankingSettings(bootstrap=100))
    assert set(outcome.top_by_phi) == {"minmax", "ratio"}
    assert outcome.top_by_phi["minmax"] == rk.tied_at(outcome.result.table, 0.5)  # the ranking's own φ
    assert [c for c, _ in outcome.top_by_phi["minmax"]] == ["A"]
    assert "B" in [c for c, _ in outcome.top_by_phi["ratio"]]
    text = summary(outcome)
    assert "φ choice and the top set at w = 0.5" in text
    assert "| minmax (used) | A (100%) |" in text
    assert "The top set depends on the φ choice (only under ratio: B)." in text


def test_phi_choice_sentence_names_what_changes():
    text = rk.phi_choice_markdown({"minmax": [("A", 1.0)], "ratio": [("A", 0.6), ("B", 0.4)]}, "minmax", 0.5)
    assert "| ratio | A (60%), B (40%) |" in text
    assert "The top set depends on the φ choice (only under ratio: B)." in text
    same = rk.phi_choice_markdown({"minmax": [("A", 1.0)], "ratio": [("A", 0.9)]}, "ratio", 0.5)
    assert "| ratio (used) | A (90%) |" in same and "The top set is the same under both φ choices." in same


def test_achieved_half_widths_against_the_targets():
    assert rk.wilson_half_width(0.5, 196) == pytest.approx(0.0695, abs=5e-4)
    assert rk.items_for_half_width(0.07) == 196 and rk.items_for_half_width(0.09) == 119
    scores = pd.DataFrame([
        {"config_id": "a", "task": "qa", "metric": "acc_norm", "value": 0.5, "ci_low": 0.45, "ci_high": 0.55,
         "n_items": 400},
        {"config_id": "b", "task": "qa", "metric": "acc_norm", "value": 0.5, "ci_low": 0.44, "ci_high": 0.56,
         "n_items": 400},
        {"config_id": "a", "task": "qa", "metric": "acc", "value": 0.5, "ci_low": 0.0, "ci_high": 1.0,
         "n_items": 400},
        {"config_id": "a", "task": "rca", "metric": "accuracy", "value": 0.5, "ci_low": 0.3, "ci_high": 0.7,
         "n_items": 20},
    ])
    lines = rk.precision_lines(scores, "cloze")
    assert lines[0].startswith("- qa acc_norm: ±0.060 (bootstrap), ±0.049 (Wilson), largest over 2 configs, "
                               "400 items; target ±0.07: **met**.")
    assert lines[1].startswith("- rca accuracy: ±0.200 (bootstrap)")
    assert "target ±0.09: **NOT met** (about 119 items would reach it" in lines[1]
    options = rk.precision_lines(scores, "options")
    assert "qa acc: ±0.500 (bootstrap)" in options[0] and "NOT met" in options[0]


def test_the_summary_reports_the_precision_of_the_scores(tmp_path):
    study = write_study(tmp_path / "s", {"fp32": (0.8, 0.7), "bf16": (0.6, 0.5)},
                        {"fp32": 2e-6, "bf16": 1e-6})
    text = summary(rk.rank_study(study, RankingSettings(bootstrap=10)))
    assert "**Precision of the scores.**" in text
    assert "- rca accuracy: ±" in text and f"{RCA_ITEMS} items; target ±0.09: **NOT met**" in text
    assert "- qa acc_norm: ±" in text and "target ±0.07" in text


def test_the_summary_shows_the_device_probe_and_the_precisions_skipped_as_slow(tmp_path):
    import json

    study = write_study(tmp_path / "s", {"fp32": (0.8, 0.7), "int8": (0.6, 0.5)},
                        {"fp32": 2e-6, "int8": 1e-6})
    reason = "bf16: 1.2 GFLOP/s vs 29.8 fp32 on this CPU (no native kernel for it here), 24.8x slower"
    StudyLayout(study).provenance.write_text(json.dumps({"throughput": {
        "device": "cpu", "device_limits": {"max_slowdown": 8.0, "always_run": []},
        "precisions": {"fp32": {"gflop_per_s": 29.8}, "bf16": {"gflop_per_s": 1.2},
                       "nf4": {"gflop_per_s": None, "reason": "bitsandbytes not importable: x"}},
        "skipped_as_slow": {"bf16": reason}}}))
    text = summary(rk.rank_study(study, RankingSettings(bootstrap=10)))
    assert ("**Precisions on this device.** Matmul throughput measured before the first job on cpu "
            "(GFLOP/s): fp32 29.8, bf16 1.2, nf4 not measured (bitsandbytes not importable: x). A precision "
            "more than 8x slower than fp32 is skipped unless device_limits.always_run lists it.") in text
    # beside the throughput, each precision's speed against fp32 (no CPU flags in this provenance: none named)
    assert "- bf16 skipped: 25x slower than fp32 on this CPU." in text


def test_report_says_what_each_task_scored(tmp_path):
    from llm_energy.phases.ranking import data_lines
    from llm_energy.tables import store as results

    scores = pd.DataFrame({"config_id": ["a", "a"], "task": ["qa", "rca"], "metric": ["acc", "accuracy"],
                           "value": [0.3, 0.5], "ci_low": [0.2, 0.4], "ci_high": [0.4, 0.6],
                           "n_items": [200, 100], "data": ["teleqna", "synthetic"],
                           "style": ["options", "labels"]})
    results.upsert_rows(tmp_path, "splits", [
        {"task": "qa", "source": "teleqna", "item_id": f"q{i}", "class": "c",
         "split": ("train", "test")[i % 2], "assigned_by": "assigned", "scored": bool(i % 2)}
        for i in range(6)])
    results.upsert_rows(tmp_path, "skipped_records", [
        {"task": "qa", "source": "teleqna", "file": "TeleQnA.zip", "line": None, "record": "question 390",
         "field": "options", "reason": "the choice 'x' appears more than once"}])
    qa, rca = data_lines(tmp_path, scores)
    assert "TeleQnA (Maatouk et al." in qa and "lettered options" in qa and "200 items per config" in qa
    assert "seeded assignment stratified by class" in qa and "1 invalid record(s) left out" in qa
    assert "synthetic (generated by tools/make_sample_data.py; not real tickets or questions)" in rca
    assert "100 items per config" in rca
