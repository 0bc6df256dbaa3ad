"""benchmarks/precision_limits.py's attention ceiling: the bound it computes, and the attention it times
in a real packed scoring pass (the tiny model, a few TeleQnA items of the default study's qa section)."""

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "precision_limits.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("precision_limits", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_ceiling_is_the_share_with_only_the_attention_and_the_linear_layers_at_the_probe(bench):
    # 100 GFLOP, 10 of them attention: attention at the probe's rate too leaves the probe's rate itself
    assert bench.attention_ceiling(100.0, 10.0, 10.0 / 50.0, 50.0) == pytest.approx(1.0)
    # 90 GFLOP at 100 GFLOP/s take 0.9 s; with 1 s of attention: 100 GFLOP in 1.9 s, of a 100 GFLOP/s probe
    assert bench.attention_ceiling(100.0, 10.0, 1.0, 100.0) == pytest.approx(100 / 1.9 / 100)
    # slower attention, lower ceiling
    assert bench.attention_ceiling(100.0, 10.0, 2.0, 100.0) < bench.attention_ceiling(100.0, 10.0, 1.0, 100.0)


def test_attention_is_timed_inside_a_real_pass_and_counted_from_the_tokens(bench, tiny_model, monkeypatch):
    from llm_energy.measure.flops import forward_gflop
    from llm_energy.methods import scoring

    settings, data = bench.qa_task(bench.ROOT / "params" / "default.yaml", 6)
    prepared = scoring.prepare_task("qa", tiny_model.tokenizer, data, settings.prompt, settings.style)
    parts = [replace(prepared, encoded=chunk) for chunk in bench.split(prepared.encoded, 2)]
    assert scoring.choose_scoring_path(tiny_model.model, tiny_model.tokenizer).name == "packed"
    scores = [scoring.score_prepared(tiny_model.model, tiny_model.tokenizer, part) for part in parts]

    inner = scoring._prefix_attention
    attention_s, wall_s = bench.timed_attention(tiny_model, parts)
    assert 0.0 < attention_s < wall_s
    assert scoring._prefix_attention is inner  # put back

    attention = bench.attention_gflop_of(tiny_model.model.config, parts, scores)
    total = sum(scoring.scoring_gflop(tiny_model.model.config, p.encoded, s) for p, s in zip(parts, scores))
    assert 0.0 < attention < total
    # the count's attention term: 4 x heads x head size per attended key, the prefix's keys included
    config = tiny_model.model.config
    heads, size = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    tokens = sum(x.tokens_run for s in scores for x in s)
    logits = sum(scoring.logit_positions(r) for p in parts for r in p.encoded)
    assert total - forward_gflop(config, tokens, logits, [0] * tokens) == pytest.approx(attention)
    assert attention * 1e9 % (4 * heads * size) == pytest.approx(0.0, abs=1e-3)
