"""What a deployment costs over its life (issue 25): setup energy by step along a config's lineage,
break-even query counts against the reference, the ranking at a chosen life, energy per token, and the
pruning phase's metered setup steps."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml
from test_ranking_phase import energy_row, write_study

from llm_energy.analysis.lifecycle import break_even, lifecycle_table
from llm_energy.config import PruningSpec, RankingSettings, StudyValidationError, load_study
from llm_energy.layout import parent_config_id
from llm_energy.measure.meter import J_PER_KWH, EnergyRecord, RepeatedMeasurement
from llm_energy.methods.scoring import TaskResult
from llm_energy.phases import ranking as rk
from llm_energy.tables import store as results
from llm_energy.tables.rows import ConfigIdentity, record_task

J = 1 / J_PER_KWH  # one joule in kWh


def test_break_even_counts():
    assert break_even(10.0, 1.0, 0.0, 1.5) == "20"  # 10 + 20 x 1 = 20 x 1.5
    assert break_even(10.0, 1.5, 0.0, 1.5) == "never"  # equal per query: the setup never pays back
    assert break_even(10.0, 2.0, 0.0, 1.5) == "never"
    assert break_even(0.0, 1.0, 0.0, 1.5) == "immediately"  # no setup, cheaper per query
    assert break_even(0.0, 1.5, 0.0, 1.5) == "immediately"  # no setup, per query not higher
    assert break_even(0.0, 1.6, 0.0, 1.5) == "never"
    assert break_even(10.0, 1.0, 4.0, 1.5) == "12"  # the reference's own setup counts too


def test_config_ids_name_their_parent():
    assert parent_config_id("m__fp32__lora__wanda-2of4__recovered", "lora+recovery", "wanda-2of4") == \
        "m__fp32__lora__wanda-2of4"
    assert parent_config_id("m__fp32__lora__wanda-2of4", "lora", "wanda-2of4") == "m__fp32__lora"
    assert parent_config_id("m__fp32__lora", "lora", "none") == "m__fp32"
    assert parent_config_id("m__fp32") is None


def _energy_rows():
    """fp32 base (1.5 J per query), its LoRA adapter (10 J of training; 1 J per query), two pruned configs
    made from the adapter (setup measured; 1 J per query), one recovered config."""
    rows = []
    for config_id, adapter, pruning, per_query in (
            ("m__fp32", "none", "none", 1.5), ("m__fp32__lora", "lora", "none", 1.0),
            ("m__fp32__lora__magnitude", "lora", "magnitude", 1.0),
            ("m__fp32__lora__wanda", "lora", "wanda", 1.0),
            ("m__fp32__lora__wanda__recovered", "lora+recovery", "wanda", 0.5)):
        row = energy_row(config_id, "rca", per_query * 10 * J, 10)
        row.update(adapter=adapter, pruning=pruning, model="m", precision="fp32",
                   phase="inference" if pruning == "none" else "pruning", cpu_method="rapl",
                   ram_method="rapl", energy_method="rapl", estimated_components="")
        rows.append(row)
    train = energy_row("m__fp32__lora", "rca", 10 * J, 8)
    train.update(phase="finetune", adapter="lora", model="m", precision="fp32",
                 cpu_method="codecarbon:cpu_load", ram_method="codecarbon:ram_power_model",
                 energy_method="codecarbon:cpu_load", estimated_components="cpu;ram")
    recovery = energy_row("m__fp32__lora__wanda__recovered", "rca", 3 * J, 8)
    recovery.update(phase="recovery", adapter="lora+recovery", pruning="wanda", model="m", precision="fp32",
                    cpu_method="rapl", energy_method="rapl", estimated_components="")
    return pd.DataFrame(rows + [train, recovery])


def _setup_rows(*config_ids):
    return pd.DataFrame([{"config_id": c, "step": step, "order": i, "duration_s": 1.0, "energy_kwh": kwh,
                          "energy_net_kwh": kwh / 2, "emissions_kg": 0.0, "energy_method": "rapl",
                          "cpu_method": "rapl", "gpu_method": "none", "ram_method": "rapl"}
                         for c in config_ids
                         for i, (step, kwh) in enumerate((("load", 2 * J), ("prune", 1 * J)))])


def _lifecycle(setup=None):
    from llm_energy.analysis import ranking_math as rank

    energy = _energy_rows()
    configs = rank.config_energy(energy)
    setup = _setup_rows("m__fp32__lora__magnitude", "m__fp32__lora__wanda") if setup is None else setup
    return lifecycle_table(configs, energy, setup)


def test_setup_by_step_along_the_lineage_with_the_shared_adapter_counted_once():
    table = _lifecycle()
    totals = table[table["step"] == "total"].set_index("config_id")
    assert totals.loc["m__fp32", "break_even_queries"] == "reference"
    assert totals.loc["m__fp32__lora", "setup_kwh"] == pytest.approx(10 * J)
    assert totals.loc["m__fp32__lora", "break_even_queries"] == "20"  # 10 J / (1.5 - 1.0) J per query
    # the pruned config: its own load and prune steps, plus its target's fine-tuning (once)
    steps = table[(table["config_id"] == "m__fp32__lora__wanda") & (table["step"] != "total")]
    assert sorted(zip(steps["step"], steps["source_config"])) == [
        ("fine-tuning", "m__fp32__lora"), ("load", "m__fp32__lora__wanda"), ("prune", "m__fp32__lora__wanda")]
    assert totals.loc["m__fp32__lora__wanda", "setup_kwh"] == pytest.approx(13 * J)
    assert totals.loc["m__fp32__lora__wanda", "break_even_queries"] == "26"
    recovered = table[(table["config_id"] == "m__fp32__lora__wanda__recovered") & (table["step"] != "total")]
    assert sorted(recovered["step"]) == ["fine-tuning", "load", "prune", "recovery fine-tuning"]
    assert totals.loc["m__fp32__lora__wanda__recovered", "break_even_queries"] == "16"  # 16 J / 1 J per query
    # the adapter's training is shared: each row that counts it names the others
    shared = table[(table["step"] == "fine-tuning") & (table["config_id"] == "m__fp32__lora")]
    assert shared["shared_with"].iloc[0].split() == ["m__fp32__lora__magnitude", "m__fp32__lora__wanda",
                                                     "m__fp32__lora__wanda__recovered"]


def test_estimate_flags_are_carried_through():
    table = _lifecycle()
    step = table[(table["config_id"] == "m__fp32__lora__wanda") & (table["step"] == "fine-tuning")].iloc[0]
    assert bool(step["estimate"]) and "codecarbon:cpu_load" in step["method"]
    load = table[(table["config_id"] == "m__fp32__lora__wanda") & (table["step"] == "load")].iloc[0]
    assert not bool(load["estimate"])
    totals = table[table["step"] == "total"].set_index("config_id")
    assert bool(totals.loc["m__fp32__lora__wanda", "estimate"])  # one estimated step makes the total one


def test_a_step_not_measured_gives_unknown_with_the_reason_never_a_number():
    table = _lifecycle(setup=_setup_rows("m__fp32__lora__magnitude"))  # wanda's pruning setup is missing
    totals = table[table["step"] == "total"].set_index("config_id")
    verdict = totals.loc["m__fp32__lora__wanda", "break_even_queries"]
    assert verdict.startswith("unknown: the pruning setup of m__fp32__lora__wanda was not measured")
    assert totals.loc["m__fp32__lora__wanda__recovered", "break_even_queries"].startswith("unknown")


def test_the_ranking_phase_writes_lifecycle_and_ranks_at_a_chosen_life(tmp_path):
    study = write_study(tmp_path / "s", {"fp32": (0.6, 0.5), "bf16": (0.6, 0.5)},
                        {"fp32": 2e-6, "bf16": 1e-6})
    energy = results.read_table(study, "energy")
    energy["model"] = "m"
    for c in ("fp32", "bf16"):  # config ids in the grammar: m__fp32 is bf16's reference
        energy.loc[energy["config_id"] == c, "config_id"] = f"m__{c}"
    results.write_table(study, "energy", energy)
    for name in ("scores", "item_scores", "energy_repeats"):
        frame = results.read_table(study, name)
        frame["config_id"] = "m__" + frame["config_id"].astype(str)
        results.write_table(study, name, frame)
    results.upsert_rows(study, "setup_energy",
                        [{"config_id": "m__bf16", "step": "quantize", "order": 0, "duration_s": 1,
                                                  "energy_kwh": 0.5, "energy_net_kwh": 0.4,
                          "emissions_kg": 0.0, "energy_method": "rapl"}])
    outcome = rk.rank_study(study, RankingSettings(bootstrap=20))
    lifecycle = results.read_table(study, "lifecycle")
    assert "break_even_queries" in lifecycle
    total = lifecycle[(lifecycle["step"] == "total")].set_index("config_id")
    # 0.5 kWh of setup against a saving of 1e-6 kWh per item: 500,000 queries
    assert total.loc["m__bf16", "break_even_queries"] == "500000"
    text = rk.lifecycle_markdown(outcome)
    assert "| m__bf16 | 1.8e+03 kJ | 3.6 J | 500000 |" in text
    per_query = outcome.result.table.set_index(["config_id", "w"])
    assert per_query.loc[("m__bf16", 1.0), "rank"] == 1  # per query, bf16 is the cheaper one
    amortized = rk.rank_study(study, RankingSettings(bootstrap=20, amortize_over=1000))
    at = amortized.result.table.set_index(["config_id", "w"])
    assert at.loc[("m__bf16", 1.0), "rank"] == 2  # over 1,000 queries its setup outweighs the saving
    assert "amortised over a life of 1000 queries" in rk.summary_markdown(amortized, {}, [], [])


def test_bad_lifecycle_settings_are_refused_with_file_line_and_key(root, tmp_path):
    params = yaml.safe_load((root / "params" / "smoke.yaml").read_text())
    for bad, key in (({"lifecycle_queries": [100, 0]}, "lifecycle_queries"),
                     ({"amortize_over": -5}, "amortize_over")):
        params["ranking"] = {**params["ranking"], **bad}
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(params, sort_keys=False))
        with pytest.raises(StudyValidationError) as caught:
            load_study(path)
        text = str(caught.value)
        assert str(path) in text and f"ranking.{key}" in text
        line = next(i for i, line in enumerate(path.read_text().splitlines(), 1)
                    if line.strip().startswith(key))
        assert f":{line}:" in text
        params["ranking"].pop(key)


def _record(kwh: float, net: float) -> EnergyRecord:
    return EnergyRecord(name="w", duration_s=1.0, cpu_energy_kwh=kwh, gpu_energy_kwh=0.0, ram_energy_kwh=0.0,
                        emissions_kg=0.0, cpu_method="rapl", gpu_method="none", ram_method="none",
                        idle_power_w=(kwh - net) * J_PER_KWH)


def test_energy_per_token_in_the_fields_units(tmp_path):
    m = RepeatedMeasurement((_record(100 * J, 60 * J),), None)
    scoring = TaskResult("rca", {"accuracy": 1.0}, {"accuracy": (1, 1)}, {"accuracy": np.ones(2)}, ("a", "b"),
                         (0, 0), n_items=2, n_tokens=50, n_tokens_prompted=80)
    record_task(tmp_path, ConfigIdentity("c", "m", "fp32"), "inference", scoring, m, "cpu", "float32", 0)
    generated = TaskResult("rca_resolution", {"rouge_l": 0.5}, {"rouge_l": (0, 1)}, {"rouge_l": np.ones(2)},
                           ("a", "b"), (), n_items=2, n_tokens=90)
    record_task(tmp_path, ConfigIdentity("c", "m", "fp32"), "inference", generated, m, "cpu", "float32", 0,
                generated_tokens=20)
    energy = results.read_table(tmp_path, "energy").set_index("task")
    assert energy.loc["rca", "j_per_input_token"] == pytest.approx(2.0)  # 100 J over the 50 tokens that ran
    assert energy.loc["rca", "j_per_input_token_net"] == pytest.approx(60 / 50)
    assert energy.loc["rca", "n_tokens_prompted"] == 80
    assert energy.loc["rca_resolution", "j_per_output_token"] == pytest.approx(5.0)
    assert energy.loc["rca_resolution", "j_per_output_token_net"] == pytest.approx(3.0)
    assert "prefill not split" in energy.loc["rca_resolution", "output_token_basis"]
    tokens = rk.token_energy(results.read_table(tmp_path, "energy")).set_index("config_id")
    assert tokens.loc["c", "j_per_input_token"] == pytest.approx(2.0)
    assert tokens.loc["c", "j_per_output_token"] == pytest.approx(5.0)


def test_the_pruning_phase_meters_each_setup_step(tmp_path, root):
    from test_pruning_phase import make_run

    from llm_energy.phases import evaluation, pruning

    run = make_run(tmp_path, root).with_config_id("tiny-random-llama__fp32__wanda-2of4")
    texts = ["link down at the core router after a power cut"] * 4
    with evaluation.setup_meter(run) as meter:
        pruned = pruning.prune(run, PruningSpec("wanda", "2:4", calibration_samples=4), texts, meter=meter)
    assert [name for name, _ in pruned.setup] == ["load", "calibration", "prune"]
    assert all(record.duration_s > 0 for _, record in pruned.setup)
    pruning.record(run, pruned, pruning.sparse_execution(run, pruned.loaded, pruned.outcome, "off"))
    setup = results.read_table(tmp_path, "setup_energy")
    assert list(setup["step"]) == ["load", "calibration", "prune"]
    assert (setup["config_id"] == run.config_id).all() and setup["note"].str.len().gt(0).all()
