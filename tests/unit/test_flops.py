"""forward_gflop counts what a decoder's forward computes: checked against torch's own FLOP counter on
small random Llama and Gemma 3 models, and by hand for causal contexts and sliding windows."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from llm_energy.measure.flops import decoder_linear_parameters, forward_gflop


def _llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=300, attn_implementation="eager")


def _gemma_config():
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(hidden_size=64, intermediate_size=80, num_hidden_layers=4, num_attention_heads=2,
                            num_key_value_heads=1, head_dim=48, vocab_size=300, sliding_window=16,
                            layer_types=["sliding_attention"] * 3 + ["full_attention"],
                            attn_implementation="eager")


def _counted_flops(model, tokens: int) -> int:
    ids = torch.randint(0, model.config.vocab_size, (1, tokens))
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(input_ids=ids, use_cache=False)
    return counter.get_total_flops()


@pytest.mark.parametrize("make_config", [_llama_config, _gemma_config])
def test_the_linear_weights_are_those_of_the_models_decoder_layers(make_config):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(make_config())
    linear = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    assert decoder_linear_parameters(model.config) == linear


@pytest.mark.parametrize("make_config", [_llama_config, _gemma_config])
def test_a_forward_counts_what_torchs_flop_counter_counts(make_config):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_config()).eval()
    tokens = 12  # within Gemma's window: eager attention computes every key position, masked or not
    counted = _counted_flops(model, tokens)
    # eager attention multiplies the whole [tokens x tokens] score matrix; logits at every position
    counted_here = forward_gflop(model.config, tokens, tokens, [tokens] * tokens) * 1e9
    assert counted_here == pytest.approx(counted, rel=1e-12)


def test_the_causal_default_and_the_logit_positions_by_hand():
    config = _llama_config()
    linear = decoder_linear_parameters(config)
    tokens = 10
    attended = tokens * (tokens + 1) // 2  # token i attends to i + 1 positions
    expected = 2 * linear * tokens + 4 * 4 * 16 * 3 * attended + 2 * 64 * 300 * 1
    assert forward_gflop(config, tokens, 1) * 1e9 == pytest.approx(expected, rel=1e-12)
    # each extra logit position costs one vocabulary projection
    extra = forward_gflop(config, tokens, 5) - forward_gflop(config, tokens, 1)
    assert extra * 1e9 == pytest.approx(4 * 2 * 64 * 300)


def test_a_sliding_window_caps_the_attended_positions_of_its_layers_only():
    config = _gemma_config()  # 3 sliding layers (window 16), 1 full layer; 2 heads of 48
    contexts = [4, 16, 40]
    without_attention = forward_gflop(config, 3, 0, [0, 0, 0])
    attention = (forward_gflop(config, 3, 0, contexts) - without_attention) * 1e9
    assert attention == pytest.approx(4 * 2 * 48 * (3 * (4 + 16 + 16) + 1 * (4 + 16 + 40)))


def test_bad_counts_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="one count per token"):
        forward_gflop(_llama_config(), 3, 1, [1, 2])
    with pytest.raises(ValueError, match=">= 0"):
        forward_gflop(_llama_config(), -1, 0)
