"""How near each window ran to the device's limit (issue 29, item 1): the useful GFLOP of the tokens as
they ran (a shared few-shot prefix once per call, logits only where scored, padding never), the
window's rate, and that rate over the throughput probe's for its precision."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from test_energy import FakeClock, FakeNvml, make_meter
from test_verdicts import _identity, _record, _result

from llm_energy.config import EnergySettings, TaskSettings
from llm_energy.measure.flops import forward_gflop
from llm_energy.measure.meter import NvmlSource, RepeatedMeasurement
from llm_energy.measure.throughput import ProbeRate, study_probe_rate
from llm_energy.methods import scoring
from llm_energy.methods.generation import EncodedPrompts, generation_gflop
from llm_energy.methods.lora_training import TRAINING_FORWARDS, TrainingExample, training_gflop
from llm_energy.tables import store as results
from llm_energy.tables.rows import record_task

PREFIX = "Worked example: the backbone link failed and was restored by the night shift. " * 2


def _scored(tiny_model, requests):
    encoded = scoring.encode_requests(tiny_model.tokenizer, requests)
    return encoded, scoring.score_encoded(tiny_model.model, tiny_model.tokenizer, encoded)


def test_one_item_with_a_one_token_answer_costs_its_context_run_causally_and_one_logit(tiny_model):
    config = tiny_model.model.config
    encoded, scores = _scored(tiny_model, [("Root cause of the outage:", [" A"])])
    assert len(encoded[0].continuations[0]) == 1
    expected = forward_gflop(config, len(encoded[0].context), 1)
    assert scoring.scoring_gflop(config, encoded, scores) == pytest.approx(expected, rel=1e-12)


def test_a_shared_prefix_counts_once_per_call(tiny_model):
    """Scored together, three items run their shared prefix once: the work is that of each item run
    alone less two causal runs of the prefix (which no logit is asked of)."""
    config = tiny_model.model.config
    requests = [(PREFIX + f"Question {k}: which layer failed?\nAnswer:", [" fibre", " power supply"])
                for k in range(3)]
    encoded, together = _scored(tiny_model, requests)
    shared = scoring.shared_prefix_length(encoded)
    assert shared >= scoring.MIN_SHARED_PREFIX and scoring._prefix_sharing_ok(tiny_model.model)
    assert sum(s.tokens_run for s in together) == sum(r.n_tokens for r in encoded) - 2 * shared
    alone = [_scored(tiny_model, [request])[1][0] for request in requests]
    assert all(s.tokens_run == r.n_tokens for s, r in zip(alone, encoded))
    each_alone = scoring.scoring_gflop(config, encoded, alone)
    assert scoring.scoring_gflop(config, encoded, together) == pytest.approx(
        each_alone - 2 * forward_gflop(config, shared, 0), rel=1e-12)


def test_the_forward_is_told_every_token_as_it_ran(tiny_model, monkeypatch):
    seen = {}

    def spy(config, tokens, logits, contexts=None):
        seen.update(tokens=tokens, logits=logits, contexts=np.asarray(contexts))
        return 0.0

    monkeypatch.setattr(scoring, "forward_gflop", spy)
    requests = [(PREFIX + f"Q{k}?\nAnswer:", [" yes", " no, never"]) for k in range(4)]
    encoded, scores = _scored(tiny_model, requests)
    scoring.scoring_gflop(tiny_model.model.config, encoded, scores)
    assert seen["tokens"] == sum(s.tokens_run for s in scores) == len(seen["contexts"])
    # logits once per predicting position: the context's last (every continuation's first token), then
    # each continuation's tokens but its last
    assert seen["logits"] == sum(1 + sum(len(c) - 1 for c in r.continuations) for r in encoded)
    assert seen["logits"] < sum(len(c) for r in encoded for c in r.continuations)
    longest = max(len(r.context) + max(len(c) for c in r.continuations) - 1 for r in encoded)
    assert seen["contexts"].min() >= 1 and seen["contexts"].max() == longest


def test_chunk_windows_count_their_own_work(tiny_model):
    """One pass in three windows: each window's work, summed, is the whole pass's (RCA prompts share
    no prefix long enough to run once), and the energy row adds it up."""
    from llm_energy.data.tasks import load_task_data
    from llm_energy.phases import evaluation

    clock = FakeClock()
    settings = EnergySettings(carbon_intensity_g_per_kwh=1.0, min_window_s=0.0, windows=3, warmup=False)
    chunked = make_meter(clock, [NvmlSource(nvml=FakeNvml(clock, power_w=50.0))], settings)
    whole = make_meter(clock, [NvmlSource(nvml=FakeNvml(clock, power_w=50.0))],
                       settings.model_copy(update={"windows": None, "repeats": 2, "max_repeats": 2}))
    data = load_task_data("rca", TaskSettings(max_items=7))
    _, by_chunk = evaluation.measure_task(tiny_model, "rca", data, chunked)
    _, by_pass = evaluation.measure_task(tiny_model, "rca", data, whole)
    assert len(by_chunk.window_gflop) == 3 and all(g > 0 for g in by_chunk.window_gflop)
    assert by_pass.window_gflop[0] == by_pass.window_gflop[1] == pytest.approx(by_pass.gflop())
    assert by_chunk.gflop() == pytest.approx(sum(by_chunk.window_gflop))
    assert by_chunk.gflop() == pytest.approx(by_pass.gflop(), rel=1e-12)


def test_generation_counts_each_prompt_without_its_padding():
    import torch
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])  # left-padded: prompts of 3 and 5 tokens
    encoded = EncodedPrompts(((torch.zeros_like(mask), mask),), new_tokens=4, pad_token_id=0, n_items=2)
    # each row is one causal sequence: its prompt, then 3 of its 4 new tokens fed back; 4 logits each
    expected = forward_gflop(config, 3 + 3, 4) + forward_gflop(config, 5 + 3, 4)
    assert generation_gflop(config, encoded) == pytest.approx(expected, rel=1e-12)


def test_a_training_pass_is_two_forwards_of_each_example():
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100)
    examples = [TrainingExample("a", tuple(range(7)), 5), TrainingExample("b", tuple(range(4)), 3)]
    expected = TRAINING_FORWARDS * (forward_gflop(config, 7, 2) + forward_gflop(config, 4, 1))
    assert TRAINING_FORWARDS == 2.0  # frozen base weights: no weight gradients but the adapters'
    assert training_gflop(config, examples) == pytest.approx(expected, rel=1e-12)


def test_rows_carry_the_work_its_rate_and_the_share_of_the_probe(tmp_path):
    records = tuple(_record(1.0, seconds=s) for s in (2.0, 2.0, 1.0, 1.0))
    windows = RepeatedMeasurement(records, None, unit="chunk", window_items=(3, 3, 2, 2),
                                  window_gflop=(100.0, 100.0, 60.0, 60.0))
    record_task(tmp_path, _identity(), "inference", _result(10), windows, "cpu", "float32", 0,
                limit=ProbeRate(80.0, "study probe"))
    energy = results.read_table(tmp_path, "energy").iloc[0]
    assert energy["gflop"] == pytest.approx(320.0) and energy["gflop_per_s"] == pytest.approx(320.0 / 6.0)
    assert energy["limit_share"] == pytest.approx(320.0 / 6.0 / 80.0)
    assert energy["probe_gflop_per_s"] == 80.0 and energy["limit_basis"] == "study probe"
    per_window = results.read_table(tmp_path, "energy_repeats").sort_values("repeat")
    assert per_window["gflop_per_s"].tolist() == pytest.approx([50.0, 50.0, 60.0, 60.0])
    assert per_window["limit_share"].tolist() == pytest.approx([0.625, 0.625, 0.75, 0.75])


def test_work_not_counted_or_no_probe_leaves_the_columns_empty(tmp_path):
    two = tuple(_record(1.0) for _ in range(2))
    uncounted = RepeatedMeasurement(two, None, unit="chunk", window_items=(5, 5))
    record_task(tmp_path, _identity("a"), "inference", _result(10), uncounted, "cpu", "float32", 0,
                limit=ProbeRate(80.0, "study probe"))
    counted = RepeatedMeasurement(two, None, unit="chunk", window_items=(5, 5), window_gflop=(4.0, 4.0))
    record_task(tmp_path, _identity("b"), "inference", _result(10), counted, "cpu", "float32", 0,
                limit=ProbeRate(None, "not probed: bitsandbytes not importable"))
    energy = results.read_table(tmp_path, "energy").set_index("config_id")
    assert math.isnan(energy.loc["a", "gflop"]) and math.isnan(energy.loc["a", "limit_share"])
    assert energy.loc["b", "gflop_per_s"] == pytest.approx(4.0) and math.isnan(energy.loc["b", "limit_share"])
    assert energy.loc["b", "limit_basis"].startswith("not probed: bitsandbytes")


def test_a_job_reads_the_study_probe_and_probes_itself_only_without_one(tmp_path):
    from llm_energy.layout import StudyLayout
    from llm_energy.phases.evaluation import ConfigRun, probe_rate

    run = ConfigRun.from_parameters(
        study_dir=str(tmp_path), config_id="", model={"name": "tiny-random-llama"}, precision="fp32",
        device="cpu", tasks={}, energy={}, seed=0, base_dir="")
    alone = probe_rate(run)
    assert alone.source == "probed in this job (no study probe)" and alone.gflop_per_s > 0
    probe = {"device": "cpu", "precisions": {"fp32": {"gflop_per_s": 123.0}, "nf4": {"gflop_per_s": None}}}
    StudyLayout(tmp_path).provenance.write_text(json.dumps({"throughput": probe}))
    assert probe_rate(run) == ProbeRate(123.0, "study probe")
    assert study_probe_rate(probe, "nf4", "cpu") is None and study_probe_rate(probe, "fp32", "cuda") is None


def _windows_study(tmp_path):
    """Two configs: fp32 (scoring windows at 0.4-0.6 of its probe, one generation window at 0.1) and a
    bf16 adapter whose fine-tuning windows are not inference."""
    energy = [{"config_id": "m__fp32", "phase": "inference", "task": t, "precision": "fp32",
               "probe_gflop_per_s": 100.0} for t in ("rca", "rca_resolution")]
    energy.append({"config_id": "m__bf16__lora", "phase": "finetune", "task": "rca", "precision": "bf16",
                   "probe_gflop_per_s": 300.0})
    repeats = [{"config_id": "m__fp32", "phase": "inference", "task": "rca", "repeat": k,
                "gflop_per_s": 100.0 * s, "limit_share": s} for k, s in enumerate((0.4, 0.5, 0.6), 1)]
    repeats.append({"config_id": "m__fp32", "phase": "inference", "task": "rca_resolution", "repeat": 1,
                    "gflop_per_s": 10.0, "limit_share": 0.1})
    repeats.append({"config_id": "m__bf16__lora", "phase": "finetune", "task": "rca", "repeat": 1,
                    "gflop_per_s": 90.0, "limit_share": 0.3})
    tables = tmp_path / "tables"
    tables.mkdir()
    import pandas as pd

    pd.DataFrame(energy).to_csv(tables / "energy.csv", index=False)
    pd.DataFrame(repeats).to_csv(tables / "energy_repeats.csv", index=False)
    return pd.DataFrame(energy), pd.DataFrame(repeats)


def test_each_precision_gets_the_median_of_its_inference_windows(tmp_path):
    from llm_energy.analysis.limits import precision_limits
    from llm_energy.phases.ranking import achieved_sentence

    energy, repeats = _windows_study(tmp_path)
    limits = precision_limits(energy, repeats).set_index("precision")
    assert list(limits.index) == ["fp32"]  # the bf16 windows are fine-tuning, not inference
    row = limits.loc["fp32"]
    assert row["windows"] == 4 and row["limit_share"] == pytest.approx(0.45)
    assert row["scoring_limit_share"] == pytest.approx(0.5)
    assert row["generation_limit_share"] == pytest.approx(0.1)
    assert row["gflop_per_s"] == pytest.approx(45.0) and row["probe_gflop_per_s"] == 100.0
    assert "fp32 45 GFLOP/s, 0.45 of its probe (scoring 0.50, generation 0.10)" in achieved_sentence(tmp_path)
    assert precision_limits(energy, repeats.drop(columns=["gflop_per_s"])).empty  # a study from before
