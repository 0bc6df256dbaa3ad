"""The smoke study through the runner (papermill, every notebook), then resume and refusal paths."""

import json
import subprocess
import sys

import pandas as pd
import pytest

from llm_energy.tables import store as results

pytestmark = pytest.mark.slow
PRECISIONS = ["fp32", "bf16", "fp16", "int8", "w8a8", "nf4", "fp4"]


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "llm_energy.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=900)


@pytest.fixture(scope="module")
def smoke_run(smoke_study):
    return smoke_study


def test_outputs_follow_the_contract(smoke_run):
    out, _ = smoke_run
    for name in ("params.resolved.yaml", "provenance.json", "report.html", "tables/energy.csv",
                 "tables/scores.csv", "tables/ranking.csv", "tables/training.csv",
                 "tables/pruning_layers.csv"):
        assert (out / name).is_file(), name
    executed = sorted(p.name for p in (out / "notebooks").glob("*.ipynb"))
    expected = ["01_data__study.ipynb", "05_ranking__study.ipynb"]
    expected += [f"03_inference__tiny-random-llama__{p}.ipynb" for p in PRECISIONS]
    expected += [f"02_finetune__tiny-random-llama__{p}__lora.ipynb" for p in ("fp32", "nf4")]
    expected += [f"03_inference__tiny-random-llama__{p}__lora.ipynb" for p in ("fp32", "nf4")]
    pruned = [name for name in executed if name.startswith("04_pruning__")]
    assert len(pruned) == 2 and any(name.endswith("__wanda-2of4.ipynb") for name in pruned)
    assert sorted(set(executed) - set(pruned)) == sorted(expected)
    for fig in ("fig1_token_lengths", "fig3_finetune_energy_loss", "fig4_inference_energy_carbon",
                "fig5_quantization_impact", "fig6_pruning", "fig7_ranking", "fig8_lifecycle"):
        assert (out / "figures" / f"{fig}.png").is_file() and (out / "figures" / f"{fig}.pdf").is_file(), fig


def test_the_lifecycle_view_counts_every_setup_step(smoke_run):
    out, _ = smoke_run
    setup = results.read_table(out, "setup_energy")
    pruned = sorted({c for c in setup["config_id"]})
    assert (len(pruned) == 2 and {"load", "prune"} <= set(setup["step"])
            and "calibration" in set(setup["step"]))
    lifecycle = results.read_table(out, "lifecycle")
    totals = lifecycle[lifecycle["step"] == "total"].set_index("config_id")
    assert totals.loc["tiny-random-llama__fp32", "break_even_queries"] == "reference"
    for config_id in pruned:  # made from the fp32 adapter: its fine-tuning, then its own pruning steps
        steps = lifecycle[(lifecycle["config_id"] == config_id) & (lifecycle["step"] != "total")]
        assert "fine-tuning" in set(steps["step"]) and {"load", "prune"} <= set(steps["step"])
        assert totals.loc[config_id, "break_even_queries"] != ""
    energy = results.read_table(out, "energy")
    scoring = energy[energy["task"].isin(["rca", "qa"]) & energy["phase"].isin(["inference", "pruning"])]
    assert scoring["j_per_input_token"].gt(0).all()
    assert energy.loc[energy["task"] == "rca_resolution", "j_per_output_token"].gt(0).all()
    report = (out / "report.html").read_text()
    assert "What it costs over its life" in report and "break-even" in report


def test_energy_rows_for_every_precision_and_task(smoke_run):
    out, _ = smoke_run
    energy = results.read_table(out, "energy")
    base = energy[(energy["phase"] == "inference") & (energy["adapter"] == "none")]
    assert sorted(zip(base["precision"], base["task"])) == sorted(
        (p, t) for p in PRECISIONS for t in ("qa", "rca", "rca_resolution"))
    assert set(energy.columns) >= set(results.ENERGY_COLUMNS)
    measured = energy[energy["phase"].isin(["inference", "pruning"])]
    assert measured["energy_method"].notna().all() and (measured["repeats"] == 2).all()
    assert (energy["phase"] == "idle").sum() == 0  # idle baselines are per job now: idle_baselines.csv
    idles = results.read_table(out, "idle_baselines")
    # each job's own baselines; a recovered config is measured in its pruning job, with that job's meter
    measured_ids = {c for c in energy.loc[energy["phase"] != "idle", "config_id"]
                    if not c.endswith("__recovered")}
    before = idles[idles["kind"].isin(["system", "loaded"])]
    assert (set(before["config_id"]) == measured_ids
            and set(idles["kind"]) == {"system", "loaded", "loaded_after"})
    # loaded idle again after every evaluation's windows (a recovered config's too): its drift
    after = idles[idles["kind"] == "loaded_after"]
    evaluated = set(energy.loc[energy["phase"].isin(["inference", "pruning"]), "config_id"])
    assert evaluated <= set(after["config_id"]) and after["idle_drift"].notna().all()
    # every evaluation window was read by the disturbance witnesses (the tests run it beside another
    # pytest process: flagged or not, each reading is there)
    windows = results.read_table(out, "energy_repeats")
    assert windows["canary_slowdown"].notna().all() and windows["foreign_cpu_share"].between(0, 1).all()
    assert windows["attempts"].eq(1).all()  # smoke: on_contaminated is flag, nothing measured again
    for column in ("cpu_method", "gpu_method", "ram_method", "estimated_components", "energy_scope",
                   "country_iso_code", "carbon_intensity_g_per_kwh"):
        assert energy.loc[energy["phase"] != "idle", column].notna().all(), column
    assert (measured["estimated_components"] == "cpu;ram").all()  # no RAPL here: CodeCarbon's models
    assert (measured["energy_scope"] == "machine").all() and (measured["country_iso_code"] == "FRA").all()
    training = results.read_table(out, "training")
    assert (training["estimated_components"] == "cpu;ram").all() and training["cpu_method"].notna().all()
    assert (energy["phase"] == "finetune").sum() == 2
    assert len(energy[(energy["phase"] == "inference") & (energy["adapter"] == "lora")]) == 6
    pruned = energy[energy["phase"] == "pruning"]
    assert len(pruned) == 12  # two methods and their recovered configs, three tasks each
    assert (energy["phase"] == "recovery").sum() == 2  # the recovery training of each pruned config
    assert ((pruned["measured_sparsity"] - pruned["target_sparsity"]).abs() <= 0.02).all()
    generated = energy[energy["task"] == "rca_resolution"]
    assert (generated["n_generated_tokens"] == 2 * 8).all()  # 2 items x exactly 8 new tokens
    scores = results.read_table(out, "scores")
    assert len(scores) == 13 * 6  # 7 precisions, 2 adapters, 2 pruned and 2 recovered configs; 6 metrics each
    ranking = results.read_table(out, "ranking")
    assert len(ranking) == 13 * 11
    assert ranking["phi"].between(0, 1).all() and ranking["rho"].between(0, 1).all()
    for w, group in ranking.groupby("w"):
        ordered = group.sort_values("rank")
        assert ordered["R"].is_monotonic_decreasing


def test_training_table_has_two_epochs_per_precision(smoke_run):
    training = results.read_table(smoke_run[0], "training")
    training = training[training["phase"] == "finetune"]  # recovery epochs are checked with the pruning
    assert sorted(training.groupby("precision")["epoch"].apply(list).to_dict().items()) == [
        ("fp32", [1, 2]), ("nf4", [1, 2])]
    assert (training["energy_kwh"] > 0).all() and training["train_loss"].notna().all()


def test_pruning_layers_are_recorded_and_nm_verified(smoke_run):
    layers = results.read_table(smoke_run[0], "pruning_layers")
    layers = layers[~layers["config_id"].str.endswith("__recovered")]  # recovered configs: their own test
    wanda = layers[layers["pruning"] == "wanda-2of4"]
    assert len(wanda) == 2 * 7  # two decoder blocks x seven projections
    assert wanda["verified_nm"].eq("yes").all()
    assert layers[layers["pruning"] == "magnitude-unstructured-50"]["verified_nm"].eq("not N:M").all()
    assert (wanda["measured_sparsity"] == 0.5).all()


def test_pruned_configs_say_which_kernels_ran(smoke_run):
    configs = results.read_table(smoke_run[0], "configs")
    pruned = configs[(configs["pruning"] != "none") & (configs["adapter"] == "lora")].set_index("pruning")
    assert set(pruned["kernel"]) == {"dense"}  # CPU: no sparse kernel anywhere
    assert "no sparse tensor-core kernel" in pruned.loc["magnitude-unstructured-50", "kernel_note"]
    html = (smoke_run[0] / "report.html").read_text()
    assert "Kernels of the pruned configurations" in html


def test_provenance_and_resolved_parameters(smoke_run):
    out, _ = smoke_run
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["packages"]["torch"] and prov["params_hash"] and prov["finished_at"]
    assert {b["kind"] for b in prov["idle_baselines"]} == {"system", "loaded", "loaded_after"}
    assert (out / "state" / "canary.json").is_file()  # the machine-speed canary at the study's start
    assert prov["energy_methods_available"]["codecarbon"] is True
    # every job's kernel was forked from the study's warm kernel server (imports done), none plain
    warm = prov["warm_kernels"]
    assert warm["used"] is True and warm["plain"] == 0, warm
    assert warm["forked"] >= 14, warm


def test_report_states_origin_and_estimates(smoke_run):
    html = (smoke_run[0] / "report.html").read_text()
    assert "randomly initialised Llama" in html
    assert "ESTIMATED" in html or "measured by hardware counters" in html
    assert "<script" not in html.split("<body", 1)[1] or "data:image/png;base64" in html


def test_rerun_resumes_without_duplicates(smoke_run, root):
    out, _ = smoke_run
    before = results.read_table(out, "energy")
    proc = cli("run", str(root / "params" / "smoke.yaml"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "resumed (already done): 14" in proc.stdout
    after = results.read_table(out, "energy")
    pd.testing.assert_frame_equal(before, after)


def test_changed_parameters_are_refused(smoke_run, root, tmp_path):
    out, _ = smoke_run
    changed = tmp_path / "smoke.yaml"
    changed.write_text((root / "params" / "smoke.yaml").read_text().replace("max_items: 6", "max_items: 7"))
    proc = cli("run", str(changed), "--out", str(out))
    assert proc.returncode == 2
    assert "written with different parameters" in proc.stderr


def test_no_resume_needs_force(smoke_run, root):
    out, _ = smoke_run
    proc = cli("run", str(root / "params" / "smoke.yaml"), "--out", str(out), "--no-resume")
    assert proc.returncode == 2 and "--force" in proc.stderr


def test_every_evaluated_config_records_its_scoring_path(smoke_run):
    out, _ = smoke_run
    configs = results.read_table(out, "configs")
    ok = configs[configs["status"] == "ok"]
    assert len(ok) == 13 and set(ok["scoring_path"]) <= {"packed", "shared_cache"}
    # The tiny Llama (sdpa attention) passes the packed check at every precision.
    assert (ok["scoring_path"] == "packed").all()


def test_the_fine_tuned_target_is_pruned_then_recovered(smoke_run):
    """The paper's pipeline: prune the fine-tuned config (adapter merged), recover, compare in Figure 6."""
    out, _ = smoke_run
    configs = results.read_table(out, "configs").set_index("config_id")
    for label in ("magnitude-unstructured-50", "wanda-2of4"):
        pruned = configs.loc[f"tiny-random-llama__fp32__lora__{label}"]
        assert (pruned["status"] == "ok" and pruned["adapter"] == "lora"
                and "merged" in pruned["weights_origin"])
        recovered = configs.loc[f"tiny-random-llama__fp32__lora__{label}__recovered"]
        assert recovered["status"] == "ok" and recovered["adapter"] == "lora+recovery"
    layers = results.read_table(out, "pruning_layers")
    recovered_layers = layers[layers["config_id"].str.endswith("__recovered")]
    assert len(recovered_layers) == 28 and recovered_layers["measured_sparsity_after"].notna().all()
    training = results.read_table(out, "training")
    assert set(training["phase"]) == {"finetune", "recovery"}
    scores = results.read_table(out, "scores")
    assert {f"tiny-random-llama__fp32__lora__{label}{suffix}"
            for label in ("magnitude-unstructured-50", "wanda-2of4")
            for suffix in ("", "__recovered")} <= set(scores["config_id"])
    ranking = results.read_table(out, "ranking")
    assert ranking["config_id"].str.endswith("__recovered").sum() > 0  # ranked with every other config


def test_rankings_say_what_they_cannot_separate(smoke_run):
    """comparisons.csv (paired, same items) and ranking.csv's p_best / tied_with_top, and the report's
    headline."""
    out, _ = smoke_run
    comparisons = results.read_table(out, "comparisons")
    assert (set(comparisons.columns)
            >= {"config_a", "config_b", "task", "metric", "diff", "ci_low", "ci_high", "p_value"})
    assert (comparisons["p_value"].between(0, 1).all()
            and (comparisons["ci_low"] <= comparisons["ci_high"]).all())
    assert "mcnemar_exact" in set(comparisons["test"]) <= {"mcnemar_exact", "paired_bootstrap"}
    ranking = results.read_table(out, "ranking")
    at_w = ranking[ranking["w"] == 0.5]
    assert at_w["p_best"].between(0, 1).all() and at_w["tied_with_top"].astype(bool).any()
    html = (out / "report.html").read_text()
    assert ("No single best configuration at w = 0.5" in html) or ("Best at w = 0.5" in html)
    assert "Quantization against fp32, paired on the same items" in html


def test_the_shared_report_opens_with_the_answer_and_leaks_nothing(smoke_run):
    """Answer, then the evidence figure by figure, then methods, then tables; no warning, traceback or
    local path anywhere in it (stderr kept in logs/report-warnings.log instead)."""
    from llm_energy.report.html import leaks

    out, _ = smoke_run
    html = (out / "report.html").read_text()
    assert leaks(html) == []
    assert str(out) not in html
    order = [html.index(marker) for marker in ("The answer", "The evidence", "Figure 7", "Figure 4",
                                               "Methods", "Energy method",
                                               "Energy per config, phase and task")]
    assert order == sorted(order), order
    assert "How to read it" in html
    assert "tiny-random-llama · fp32" in html  # config ids as model · precision · adapter · pruning


def test_the_smoke_report_prints_to_pdf(smoke_run, tmp_path):
    """What `llm-energy report DIR --pdf` does after rendering (tests/unit/test_report_sharing.py checks
    the flag's wiring and the message without Chromium)."""
    import shutil

    from llm_energy.report.html import find_chromium, render_pdf

    if find_chromium() is None:
        pytest.skip("no chromium on this machine (Debian package 'chromium'); .ci/run installs it")
    out, _ = smoke_run
    shutil.copy(out / "report.html", tmp_path / "report.html")
    pdf = render_pdf(tmp_path / "report.html")
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 100_000  # the figures are in it
