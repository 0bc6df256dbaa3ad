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


def test_attention_is_timed_inside_a_real_pass_and_counted_from_the_tokens(bench, tiny_model):
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

    config = tiny_model.model.config
    total = sum(scoring.scoring_gflop(config, p.encoded, s) for p, s in zip(parts, scores))
    attention = bench.attention_gflop_of(config, parts, scores, total)
    # counted by hand: 4 x query heads x head size per attended key (each token's own item up to itself
    # and, after a call's first item, the prefix the call shares), in every layer
    heads = config.num_attention_heads
    size = getattr(config, "head_dim", None) or config.hidden_size // heads
    keys = sum(int(scoring.request_contexts(request, s.n_tokens - s.tokens_run).sum())
               for part, part_scores in zip(parts, scores) for request, s in zip(part.encoded, part_scores))
    assert attention == pytest.approx(4 * heads * size * config.num_hidden_layers * keys / 1e9)
    assert 0.0 < attention < total
