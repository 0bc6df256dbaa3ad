"""Tests for llm_energy.report.figures on small synthetic tables (2 models x 3 precisions x 2 tasks)."""

from __future__ import annotations

import itertools
import zlib

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from llm_energy.report import figures as plots

MODELS = ("org/model-a", "org/model-b")
# Deliberately not in bit order: the figures must sort them.
PRECISIONS = ("nf4", "fp32", "int8")
TASKS = ("rca", "qa")
METRICS = {"rca": ("accuracy",), "qa": ("f1", "exact_match")}
ESTIMATE = "codecarbon:cpu_load"
MEASURED = "nvml_counter"


def _energy_row(config_id, phase, model, precision, task, method, *, adapter="none", pruning="none",
                pattern=np.nan, sparsity=np.nan, n_items=20, std=0.0002):
    # crc32, not hash(): str hashes change between interpreter runs.
    rng = np.random.default_rng(zlib.crc32(f"{config_id}|{phase}|{task}".encode()))
    kwh = 0.002 * {"fp32": 4, "int8": 2, "nf4": 1}.get(precision, 3) * rng.uniform(0.8, 1.2)
    return {
        "config_id": config_id, "phase": phase, "model": model, "precision": precision, "adapter": adapter,
        "pruning": pruning, "sparsity_pattern": pattern, "target_sparsity": sparsity,
        "measured_sparsity": sparsity, "task": task, "n_items": n_items, "n_tokens": n_items * 300,
        "duration_s": 60.0, "energy_kwh": kwh, "energy_net_kwh": kwh * 0.8, "cpu_energy_kwh": kwh * 0.7,
        "gpu_energy_kwh": 0.0, "ram_energy_kwh": kwh * 0.3, "emissions_kg": kwh * 0.4,
        "energy_method": method, "device": "cpu", "repeats": 3, "energy_kwh_std": std,
    }


def base_configs():
    return [(f"{m.split('-')[-1]}_{p}", m, p) for m, p in itertools.product(MODELS, PRECISIONS)]


def make_energy(method: str = ESTIMATE) -> pd.DataFrame:
    rows = [_energy_row(f"idle_{m}", "idle", m, "fp32", "none", method) for m in MODELS]
    for cid, model, precision in base_configs():
        for i, task in enumerate(TASKS):
            # One NaN std to check that missing spreads draw no bar rather than failing.
            rows.append(_energy_row(cid, "inference", model, precision, task, method,
                                    std=np.nan if (cid == "a_nf4" and i == 0) else 0.0002))
    for cid, pruning, pattern, sparsity in [("a_fp32_mag50", "magnitude", "unstructured", 0.5),
                                            ("a_fp32_wanda24", "wanda", "2:4", 0.5)]:
        rows.append(_energy_row(cid, "pruning", MODELS[0], "fp32", "none", method, pruning=pruning,
                                pattern=pattern, sparsity=sparsity))
        for task in TASKS:
            rows.append(_energy_row(cid, "inference", MODELS[0], "fp32", task, method, pruning=pruning,
                                    pattern=pattern, sparsity=sparsity))
    rows.append(_energy_row("a_fp32_lora", "finetune", MODELS[0], "fp32", "rca", method, adapter="lora"))
    return pd.DataFrame(rows)


def make_scores() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    cids = [c for c, _, _ in base_configs()] + ["a_fp32_mag50", "a_fp32_wanda24", "a_fp32_lora"]
    for cid, task in itertools.product(cids, TASKS):
        for metric in METRICS[task]:
            value = rng.uniform(0.4, 0.8)
            rows.append({"config_id": cid, "task": task, "metric": metric, "value": value,
                         "ci_low": value - 0.05, "ci_high": value + 0.05, "n_items": 20})
    return pd.DataFrame(rows)


def make_token_lengths() -> pd.DataFrame:
    rng = np.random.default_rng(1)
    rows = []
    for task, dataset, split, mean in [("rca", "logs", "test", 600), ("rca", "logs", "train", 550),
                                       ("qa", "squad", "validation", 180)]:
        for i, n in enumerate(rng.normal(mean, mean / 4, 80).clip(10).astype(int)):
            rows.append({"task": task, "dataset": dataset, "split": split, "item_id": i, "n_tokens": n,
                         "tokenizer": "Qwen2.5"})
    return pd.DataFrame(rows)


def make_training() -> pd.DataFrame:
    rows = []
    for precision, scale in zip(PRECISIONS, (1.0, 2.5, 1.6)):
        for epoch in (1, 2, 3):
            rows.append({"config_id": f"a_{precision}_lora", "model": MODELS[0], "precision": precision,
                         "adapter": "lora", "epoch": epoch, "train_loss": 2.0 / epoch + 0.1 * scale,
                         "eval_loss": 2.2 / epoch, "duration_s": 300.0, "energy_kwh": 0.01 * scale,
                         "emissions_kg": 0.004 * scale, "energy_kwh_std": 0.001})
    return pd.DataFrame(rows)


def make_ranking(with_pareto: bool = False) -> pd.DataFrame:
    rows = []
    points = {"a_fp32": (0.4, 0.9), "a_int8": (0.2, 0.85), "a_nf4": (0.1, 0.7), "b_fp32": (0.5, 0.88),
              "b_int8": (0.25, 0.6), "b_nf4": (0.12, 0.65)}
    for cid, (wh, rho) in points.items():
        model, precision = f"org/model-{cid[0]}", cid[2:]
        for w in (0.0, 0.25, 0.5, 0.75, 1.0):
            rows.append({"config_id": cid, "model": model, "precision": precision, "adapter": "none",
                         "pruning": "none", "energy_kwh_per_item": wh / 1000, "phi": 1 - wh, "rho": rho,
                         "w": w, "R": w * rho + (1 - w) * (1 - wh), "rank": 0, "rho_ci_low": rho - 0.03,
                         "rho_ci_high": rho + 0.03, "energy_kwh_per_item_std": wh / 1000 * 0.1})
    df = pd.DataFrame(rows)
    if with_pareto:
        df["pareto"] = df["config_id"].isin(["a_fp32", "a_int8", "a_nf4"])
    return df


def all_figures(method: str = ESTIMATE) -> dict[str, Figure]:
    energy = make_energy(method)
    scores = make_scores()
    return {
        "fig1_token_lengths": plots.fig1_token_lengths(make_token_lengths()),
        "fig3_finetune_energy_loss": plots.fig3_finetune_energy_loss(make_training(), method),
        "fig4_inference_energy_carbon": plots.fig4_inference_energy_carbon(energy),
        "fig5_quantization_impact": plots.fig5_quantization_impact(scores, energy),
        "fig6_pruning": plots.fig6_pruning(scores, energy),
        "fig7_ranking": plots.fig7_ranking(make_ranking(), energy_method=method),
    }


def _visible_axes(fig: Figure):
    """The panels (not the axes that only hold a legend, drawn with the axis off)."""
    return [ax for ax in fig.axes if ax.get_visible() and ax.axison]


def _joined(fig: Figure) -> str:
    return "\n".join(plots.figure_texts(fig))


# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method,expected", [
    ("codecarbon:cpu_load", True), ("constant", True), ("codecarbon:tdp", True), ("my_estimate", True),
    ("rapl", False), ("nvml_counter", False), ("codecarbon:rapl", False),
])
def test_is_estimate(method, expected):
    assert plots.is_estimate(method) is expected


def test_energy_note_lists_estimate_methods():
    note = plots.energy_note([ESTIMATE, "rapl", ESTIMATE])
    assert ESTIMATE in note and "not a measurement" in note and "rapl" in note
    assert plots.energy_note(["rapl", MEASURED]) is None
    assert "not recorded" in plots.energy_note([None])


def test_each_figure_has_expected_axes():
    # fig4: energy and carbon for each of the two models (one column of panels per model).
    expected = {"fig1_token_lengths": 2, "fig3_finetune_energy_loss": 1, "fig4_inference_energy_carbon": 4,
                "fig5_quantization_impact": 3, "fig6_pruning": 2, "fig7_ranking": 2}
    for name, fig in all_figures().items():
        assert isinstance(fig, Figure), name
        assert len(_visible_axes(fig)) == expected[name], name


@pytest.mark.parametrize("name", ["fig3_finetune_energy_loss", "fig4_inference_energy_carbon", "fig6_pruning",
                                  "fig7_ranking"])
def test_energy_figures_flag_estimates(name):
    estimate_fig = all_figures(ESTIMATE)[name]
    assert any(ESTIMATE in t.get_text() and "not a measurement" in t.get_text() for t in estimate_fig.texts)
    measured_fig = all_figures(MEASURED)[name]
    assert "not a measurement" not in _joined(measured_fig)
    assert "estimate" not in _joined(measured_fig).lower()


def test_estimate_note_is_a_figure_text():
    fig = plots.fig4_inference_energy_carbon(make_energy(ESTIMATE))
    assert any(ESTIMATE in t.get_text() for t in fig.texts)


def test_fig8_draws_cumulative_energy_and_marks_the_break_even():
    lifecycle = pd.DataFrame([
        {"config_id": "m__fp32", "reference": "m__fp32", "step": "total", "setup_kwh": 0.0,
         "per_query_j": 1.5, "break_even_queries": "reference", "estimate": False, "method": "rapl"},
        {"config_id": "m__fp32__lora", "reference": "m__fp32", "step": "total", "setup_kwh": 10 / 3.6e6,
         "per_query_j": 1.0, "break_even_queries": "20", "estimate": True, "method": ESTIMATE}])
    fig = plots.fig8_lifecycle(lifecycle, ["m__fp32__lora"], (1, 1e4))
    ax = _visible_axes(fig)[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert sorted(line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")) == [
        "m__fp32 (reference)", "m__fp32__lora"]
    markers = [line for line in ax.get_lines() if line.get_marker() == "o"]
    assert len(markers) == 1 and markers[0].get_xdata()[0] == 20
    assert any("not a measurement" in t.get_text() for t in fig.texts)  # the estimate drawn as one


def test_fig3_lists_each_width_that_did_not_train_with_its_reason(tmp_path):
    from llm_energy.phases import ranking as rk
    from llm_energy.report.layout_check import layout_problems
    from llm_energy.tables.rows import record_config

    reason = ("bf16 training (forward + input backward): 30 GFLOP/s vs 40 fp32 on this CPU (no native kernel "
              "for it here), 1.3x slower, over device_limits.max_training_slowdown 1.2")
    record_config(tmp_path, "model-a__bf16__lora", MODELS[0], "bf16", "skipped",
                  reason + "; to run it anyway list it in device_limits.always_run", adapter="lora")
    record_config(tmp_path, "model-a__w8a8__lora", MODELS[0], "w8a8", "failed",
                  "RuntimeError: boom\nTraceback", adapter="lora")
    # no adapter: not Figure 3's
    record_config(tmp_path, "model-a__fp16", MODELS[0], "fp16", "skipped", "too slow")
    record_config(tmp_path, "model-a__nf4__lora", MODELS[0], "nf4", "ok", adapter="lora")
    missing = rk.not_trained(tmp_path)
    assert missing == [{"model": MODELS[0], "precision": "bf16", "reason": reason},
                       {"model": MODELS[0], "precision": "w8a8", "reason": "RuntimeError: boom"}]
    fig = plots.fig3_finetune_energy_loss(make_training(), "rapl", not_trained=missing)
    legend = " ".join(t.replace("\n", " ") for t in plots.figure_texts(fig))
    assert "bf16: not trained — bf16 training" in legend and "max_training_slowdown 1.2" in legend
    assert "w8a8: not trained — RuntimeError: boom" in legend and "Traceback" not in legend
    assert len(fig.axes[0].get_legend().get_texts()) == len(PRECISIONS) + 2
    assert not layout_problems(fig, "fig3 with missing widths")
    # a width that did train is not listed, however configs.csv reads; nothing trained still draws the reasons
    trained = plots.fig3_finetune_energy_loss(make_training(), "rapl",
                                              not_trained=[
                                                  {"model": MODELS[0], "precision": "nf4", "reason": "x"}])
    assert len(trained.axes[0].get_legend().get_texts()) == len(PRECISIONS)
    nothing = plots.fig3_finetune_energy_loss(make_training().iloc[:0], "rapl", not_trained=missing)
    assert plots.NO_DATA_TEXT not in plots.figure_texts(nothing)
    assert len(nothing.axes[0].get_legend().get_texts()) == 2


def test_fig7_without_method_says_not_recorded():
    fig = plots.fig7_ranking(make_ranking())
    assert "not recorded" in _joined(fig)


def _tick_precisions(ax):
    return [t.get_text().split("\n")[0] for t in ax.get_xticklabels() if t.get_text()]


def test_fig5_precisions_in_bit_order():
    fig = plots.fig5_quantization_impact(make_scores(), make_energy())
    for ax in _visible_axes(fig):
        assert _tick_precisions(ax) == ["fp32", "int8", "nf4"]


def test_fig4_precisions_in_bit_order():
    fig = plots.fig4_inference_energy_carbon(make_energy())
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["fp32", "int8", "nf4"]


def test_fig4_per_item_heights():
    energy = make_energy()
    fig = plots.fig4_inference_energy_carbon(energy)
    energy_axes = fig.axes[:len(MODELS)]  # the first row: energy, one panel per model
    unit = energy_axes[0].get_ylabel().split("(")[1].split("/")[0]
    scale = {"Wh": 1, "mWh": 1e3, "µWh": 1e6}[unit]
    rows = energy[(energy["phase"] == "inference") & (energy["pruning"] == "none")]
    expected = sorted(rows["energy_kwh"] * 1000 / rows["n_items"] * scale)
    heights = sorted(p.get_height() for ax in energy_axes for p in ax.patches)
    assert np.allclose(heights, expected)


def test_precision_order_helper():
    assert plots.precision_order(["fp4", "int8", "fp32", "bf16", "nf4", "fp16", "int8"]) == \
        ["fp32", "bf16", "fp16", "int8", "nf4", "fp4"]
    assert plots.precision_order(["q4_k_m", "fp32"]) == ["fp32", "q4_k_m"]


def test_fig6_category_labels():
    fig = plots.fig6_pruning(make_scores(), make_energy())
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == ["unpruned", "magnitude unstructured 50%", "wanda 2:4"]


def test_fig6_shows_each_target_unpruned_pruned_recovered():
    """A fine-tuned target: its unpruned config and each pruning on a line, the recovered config beside its
    pruned twin (an open diamond)."""
    energy, scores = make_energy(), make_scores()
    base = energy[energy["config_id"] == "a_fp32"]
    rows, score_rows = [], []
    for config_id, adapter, pruning in (("a_fp32_lora", "lora", "none"),
                                        ("a_fp32_lora_w", "lora", "wanda-2of4"),
                                        ("a_fp32_lora_w_rec", "lora+recovery", "wanda-2of4")):
        for _, row in base.iterrows():
            rows.append({**row.to_dict(), "config_id": config_id, "adapter": adapter, "pruning": pruning,
                         "phase": "inference" if pruning == "none" else "pruning"})
        for _, row in scores[scores["config_id"] == "a_fp32"].iterrows():
            score_rows.append({**row.to_dict(), "config_id": config_id})
    energy = pd.concat([energy, pd.DataFrame(rows)], ignore_index=True)
    scores = pd.concat([scores, pd.DataFrame(score_rows)], ignore_index=True)
    fig = plots.fig6_pruning(scores, energy)
    lora = [ax for ax in _visible_axes(fig) if "fp32 · lora" in ax.get_title().replace("\n", " ")]
    assert len(lora) == 2  # (a) task performance, (b) inference energy
    assert [t.get_text() for t in lora[0].get_yticklabels()] == ["unpruned", "wanda 2:4"]
    for ax in lora:
        recovered = [line for line in ax.get_lines() if line.get_marker() == "D"
                     and line.get_markerfacecolor() == "white"]
        assert recovered and all(np.allclose(line.get_ydata(), 1, atol=0.45) for line in recovered)
    assert "pruned + recovery LoRA" in _joined(fig)


def test_pruning_label():
    assert plots.pruning_label("none") == "none"
    assert plots.pruning_label(np.nan) == "none"
    assert plots.pruning_label("magnitude", "unstructured", 0.5) == "magnitude unstructured 50%"
    assert plots.pruning_label("wanda", "2:4", 0.5) == "wanda 2:4"
    assert plots.pruning_label("magnitude", np.nan, 0.3) == "magnitude 30%"
    # the runner's config labels read as words on the axis
    assert plots.pruning_label("magnitude-unstructured-50") == "magnitude unstructured 50%"
    assert plots.pruning_label("wanda-unstructured-37.5") == "wanda unstructured 37.5%"
    assert plots.pruning_label("wanda-2of4") == "wanda 2:4"
    assert plots.pruning_label("my-own-label") == "my-own-label"


def test_pareto_mask():
    energy = [1.0, 2.0, 3.0, 2.5, 1.0]
    rho = [0.5, 0.7, 0.9, 0.6, 0.4]
    assert plots.pareto_mask(energy, rho).tolist() == [True, True, True, False, False]


def test_fig7_uses_pareto_column_and_nearest_w():
    fig = plots.fig7_ranking(make_ranking(with_pareto=True), w=0.6, energy_method=MEASURED)
    assert "w = 0.50" in fig.axes[1].get_title()
    annotated = {t.get_text() for t in fig.axes[1].texts}
    assert annotated == {"a_fp32", "a_int8", "a_nf4"}


def test_fig7_computes_front():
    fig = plots.fig7_ranking(make_ranking(), energy_method=MEASURED)
    annotated = {t.get_text() for t in fig.axes[1].texts}
    assert annotated == {"a_fp32", "a_int8", "a_nf4"}


def test_fig1_mentions_tokenizer():
    fig = plots.fig1_token_lengths(make_token_lengths())
    assert "Qwen2.5" in _joined(fig)


@pytest.mark.parametrize("call,missing", [
    (lambda: plots.fig1_token_lengths(make_token_lengths().drop(columns=["n_tokens"])), "n_tokens"),
    (lambda: plots.fig3_finetune_energy_loss(make_training().drop(columns=["train_loss"]), ESTIMATE),
     "train_loss"),
    (lambda: plots.fig4_inference_energy_carbon(make_energy().drop(columns=["energy_method", "n_items"])),
     "energy_method"),
    (lambda: plots.fig5_quantization_impact(make_scores().drop(columns=["ci_low"]), make_energy()), "ci_low"),
    (lambda: plots.fig5_quantization_impact(make_scores(), make_energy().drop(columns=["precision"])),
     "precision"),
    (lambda: plots.fig6_pruning(make_scores(), make_energy().drop(columns=["sparsity_pattern"])),
     "sparsity_pattern"),
    (lambda: plots.fig7_ranking(make_ranking().drop(columns=["rho"])), "rho"),
])
def test_missing_columns_raise(call, missing):
    with pytest.raises(ValueError, match=missing):
        call()


def _assert_no_data(fig: Figure):
    assert isinstance(fig, Figure)
    assert plots.NO_DATA_TEXT in [t.get_text() for t in fig.texts]
    assert not fig.axes


@pytest.mark.parametrize("call", [
    lambda: plots.fig1_token_lengths(make_token_lengths().iloc[:0]),
    lambda: plots.fig3_finetune_energy_loss(make_training().iloc[:0], ESTIMATE),
    lambda: plots.fig4_inference_energy_carbon(make_energy().query("phase != 'inference'")),
    lambda: plots.fig5_quantization_impact(make_scores().iloc[:0], make_energy()),
    lambda: plots.fig6_pruning(make_scores(), make_energy().query("pruning == 'none'")),
    lambda: plots.fig7_ranking(make_ranking().iloc[:0]),
    lambda: plots.fig4_inference_energy_carbon(pd.DataFrame()),
])
def test_empty_gives_no_data_figure(call):
    _assert_no_data(call())


def test_save_figure_writes_png_and_pdf(tmp_path):
    fig = plots.fig4_inference_energy_carbon(make_energy())
    out = tmp_path / "figures" / "nested"
    paths = plots.save_figure(fig, out, "fig4")
    assert paths == [out / "fig4.png", out / "fig4.pdf"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths[1].read_bytes()[:5] == b"%PDF-"


def test_no_global_matplotlib_state_changed():
    import matplotlib

    before = dict(matplotlib.rcParams)
    all_figures()
    assert dict(matplotlib.rcParams) == before


def test_fig7_rings_the_configs_that_cannot_be_separated_from_the_top():
    ranking = make_ranking(with_pareto=True)
    ranking["p_best"] = np.where(ranking["config_id"].isin(["a_fp32", "a_int8"]), 0.45, 0.01)
    ranking["tied_with_top"] = ranking["p_best"] >= 0.05
    fig = plots.fig7_ranking(ranking, w=0.6, energy_method=MEASURED)
    text = _joined(fig)
    assert "cannot be separated from the top" in text and text.count("best in 45%") == 2


def test_figures_name_synthetic_data_and_the_qa_style():
    from llm_energy.report.figures import task_labels

    scores = pd.DataFrame({"config_id": ["a", "a", "a"], "task": ["rca", "qa", "rca_resolution"],
                           "metric": ["accuracy", "acc", "rouge_l"], "value": [0.5, 0.3, 0.2],
                           "data": ["synthetic", "teleqna", "synthetic"],
                           "style": ["labels", "options", "generation"]})
    assert task_labels(scores) == {"rca": "rca (SYNTHETIC tickets)", "qa": "qa (TeleQnA, options)",
                                   "rca_resolution": "rca_resolution (SYNTHETIC tickets)"}
    assert (task_labels(scores.drop(columns=["data", "style"]))
            == {"rca": "rca", "qa": "qa", "rca_resolution": "rca_resolution"})
