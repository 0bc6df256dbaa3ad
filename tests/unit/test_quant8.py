"""w8a8: int8 weights per channel, int8 activations per token, exact int32 products (CPU)."""

import pytest
import torch

from llm_energy.config import ModelSettings, PruningSpec, study_from_dict
from llm_energy.measure import throughput
from llm_energy.methods.sparsify import check_pruned, is_quantized, measure_sparsity, prune_model
from llm_energy.models import quant8
from llm_energy.models.loading import load_model

TINY = ModelSettings(name="tiny-random-llama")


def test_rows_are_quantized_symmetrically_with_their_own_scale():
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [254.0, 127.0, -1.0]])
    q, scale = quant8.quantize_rows(x)
    assert q.dtype == torch.int8
    assert scale.flatten().tolist() == pytest.approx([2 / 127, 1.0, 2.0])
    assert q.tolist() == [[64, -127, 32], [0, 0, 0], [127, 64, 0]]  # round-half-to-even: 63.5 -> 64, 0.5 -> 0


def test_the_layer_computes_the_scaled_integer_product_exactly():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 24)
    layer = quant8.W8A8Linear.from_linear(linear)
    x = torch.randn(2, 5, 64)
    xq, xs = quant8.quantize_rows(x.reshape(-1, 64))
    wq, ws = quant8.quantize_rows(linear.weight)
    # by hand: integers multiplied in int64, then the two scales, then the bias
    expected = (xq.long() @ wq.long().t()).double() * xs.double() * ws.double().t() + linear.bias.double()
    out = layer(x)
    assert out.shape == (2, 5, 24) and out.dtype == torch.float32
    assert torch.allclose(out.reshape(-1, 24).double(), expected, rtol=1e-6, atol=1e-6)
    # and it is an approximation of the float layer, not something else
    ref = linear(x)
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_each_token_is_quantized_alone():
    """A token's output must not depend on the other tokens of the batch (per-token scales)."""
    torch.manual_seed(1)
    layer = quant8.W8A8Linear.from_linear(torch.nn.Linear(32, 8, bias=False))
    small = torch.randn(1, 32)
    huge = 1000 * torch.randn(1, 32)
    alone = layer(small)
    together = layer(torch.cat([small, huge]))[:1]
    assert torch.equal(alone, together)


def test_a_model_at_w8a8_has_int8_layers_and_scores(tmp_path):
    fp32 = load_model(TINY, "fp32")
    loaded = load_model(TINY, "w8a8")
    layers = [m for m in loaded.model.modules() if isinstance(m, quant8.W8A8Linear)]
    linears = [n for n, m in fp32.model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assert len(layers) == len(linears) > 0
    assert isinstance(loaded.model.lm_head, torch.nn.Linear)  # the output projection stays fp32
    assert loaded.memory_bytes < fp32.memory_bytes
    assert loaded.n_parameters == fp32.n_parameters  # the int8 weights are counted as weights
    assert "int8 activations (per token" in loaded.compute_description
    ids = loaded.tokenizer("Site down after mains failure", return_tensors="pt")
    with torch.inference_mode():
        logits = loaded.model(**ids).logits
        generated = loaded.model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert torch.isfinite(logits).all() and generated.shape[1] == ids["input_ids"].shape[1] + 3


def test_a_w8a8_model_is_not_pruned_directly_but_keeps_pruned_zeros(tmp_path):
    loaded = load_model(TINY, "w8a8")
    assert any(is_quantized(m) for m in loaded.model.modules())
    with pytest.raises(ValueError, match="W8A8Linear"):
        prune_model(loaded.model, PruningSpec("magnitude", "2:4"))
    # the pruning phase prunes fp32 weights, saves them, then loads them at w8a8: the pattern survives
    dense = load_model(TINY, "fp32")
    outcome = prune_model(dense.model, PruningSpec("magnitude", "2:4"))
    dense.model.save_pretrained(tmp_path)
    dense.tokenizer.save_pretrained(tmp_path)
    quantized = load_model(ModelSettings(name="tiny-pruned", source="local", path=str(tmp_path)), "w8a8")
    checks = check_pruned(quantized.model, outcome)
    assert checks and all(c.verified_nm for c in checks)
    assert all(layer.measured_sparsity >= 0.5 for layer in measure_sparsity(quantized.model).values())


def test_the_probe_measures_w8a8():
    result = throughput.probe_precision("w8a8", "cpu", shape=(32, 64, 48), min_time_s=0.03)
    assert result.gflop_per_s and result.gflop_per_s > 0 and "W8A8Linear" in result.method


def test_w8a8_is_an_inference_and_a_fine_tuning_precision():
    base = {"study": "s", "models": [{"name": "tiny-random-llama"}], "precisions": ["fp32", "w8a8"],
            "tasks": {"rca": {"data": "synthetic"}}}
    study = study_from_dict(base)
    assert study.precisions == ["fp32", "w8a8"]
    tuned = study_from_dict({**base, "phases": ["data", "finetune", "inference", "ranking"],
                             "finetune": {"precisions": ["w8a8"]}})
    assert tuned.finetune is not None and tuned.finetune.precisions == ["w8a8"]
    with pytest.raises(Exception, match="fp4 is not a fine-tuning precision.*w8a8, int8 or nf4"):
        study_from_dict({**base, "phases": ["data", "finetune", "inference", "ranking"],
                         "finetune": {"precisions": ["fp4"]}})


def test_every_nonzero_row_reaches_code_127_and_none_goes_beyond():
    """No clamp is needed: |x| / (max|x| / 127) rounds to at most 127 for any row."""
    torch.manual_seed(2)
    x = torch.randn(4000, 96) * torch.logspace(-30, 30, 4000)[:, None]
    q, _ = quant8.quantize_rows(x)
    assert q.abs().amax(dim=-1).eq(127).all()
    assert q.to(torch.int16).abs().max() <= 127


def _tiny_llama(layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=200)
    return LlamaForCausalLM(config).eval()


def test_siblings_share_one_quantized_input_and_give_the_outputs_of_each_layer_alone():
    import copy

    model = _tiny_llama()
    quant8.quantize_model(model)
    alone = copy.deepcopy(model)
    for layer in alone.modules():
        if isinstance(layer, quant8.W8A8Linear):
            layer.shared_input = None
    attention = model.model.layers[0].self_attn
    group = attention.q_proj.shared_input
    assert group is not None and group is attention.k_proj.shared_input is attention.v_proj.shared_input
    assert model.model.layers[0].mlp.gate_proj.shared_input is model.model.layers[0].mlp.up_proj.shared_input
    assert model.model.layers[0].mlp.down_proj.shared_input is None and attention.o_proj.shared_input is None
    # the layers' weights are views into the group's stacked matrix: one copy in memory
    storage = attention.k_proj.weight_int8.untyped_storage()
    assert storage.data_ptr() == group.weight.untyped_storage().data_ptr()
    calls = []
    real = quant8._int_matmul
    ids = torch.randint(0, 200, (3, 17))
    with torch.inference_mode():
        quant8._int_matmul = lambda xq, wq: (calls.append(wq.shape[0]), real(xq, wq))[1]
        try:
            shared = model(input_ids=ids).logits
        finally:
            quant8._int_matmul = real
        expected = alone(input_ids=ids).logits
    assert torch.equal(shared, expected)  # bit-identical: integer products are exact
    assert calls == [64 + 2 * 32, 64, 2 * 96, 64] * 2  # q|k|v, o, gate|up, down per layer
    assert group._input is None and group._acc is None  # nothing held once every sibling took its part


def test_a_replaced_weight_or_autograd_makes_each_sibling_run_alone():
    model = _tiny_llama(layers=1)
    quant8.quantize_model(model)
    attention = model.model.layers[0].self_attn
    x = torch.randn(5, 64)
    with torch.inference_mode():
        before = attention.k_proj(x)
    assert attention.k_proj.shared_input.ready()
    with torch.no_grad():
        attention.k_proj.weight_int8 = attention.k_proj.weight_int8.clone().neg_()
    assert not attention.k_proj.shared_input.ready()
    with torch.inference_mode():
        after = attention.k_proj(x)
    # the new (negated) weight is used: the output is the old one negated, up to its bias (none here)
    assert torch.equal(after, -before)
    fresh = _tiny_llama(layers=1)
    quant8.quantize_model(fresh)
    with torch.enable_grad():  # with autograd on, each layer runs alone: no product is held between calls
        fresh.model.layers[0].self_attn.q_proj(x)
    assert fresh.model.layers[0].self_attn.q_proj.shared_input._input is None


def test_the_input_gradient_is_the_integer_product_of_the_quantized_gradient():
    """Backward (LoRA on a w8a8 base): d/dx is g x (dequantized W), with g x s_w rounded per row to
    int8 and multiplied by the int8 weight exactly; the frozen weight and bias get nothing."""
    torch.manual_seed(3)
    linear = torch.nn.Linear(64, 24)
    layer = quant8.W8A8Linear.from_linear(linear)
    x = torch.randn(2, 5, 64, requires_grad=True)
    out = layer(x)
    with torch.no_grad():
        assert torch.equal(out, layer(x))  # the forward is the inference path, bit for bit
    g = torch.randn(2, 5, 24)
    out.backward(g)
    wq, ws = quant8.quantize_rows(linear.weight)
    gq, gs = quant8.quantize_rows(g.reshape(-1, 24) * ws.t())
    by_hand = (gq.long() @ wq.long()).double() * gs.double()  # integers in int64, then the row scale
    assert torch.allclose(x.grad.reshape(-1, 64).double(), by_hand, rtol=1e-6, atol=1e-7)
    # against the dequantized fp32 layer's exact gradient: the only error is the gradient's rounding
    reference = g.reshape(-1, 24) @ layer.dequantized_weight()
    error = (x.grad.reshape(-1, 64) - reference).abs().max()
    assert 0 < error < 0.01 * reference.abs().max()
    assert layer.bias.grad is None and not layer.bias.requires_grad and layer.weight_int8.grad is None


def test_gradients_reach_through_shared_siblings():
    """Autograd through a whole w8a8 model: q/k/v and gate/up still share one quantized input in the
    forward, and the input gradient equals the one each layer computes alone."""
    import copy

    model = _tiny_llama(layers=1)
    quant8.quantize_model(model)
    alone = copy.deepcopy(model)
    for layer in alone.modules():
        if isinstance(layer, quant8.W8A8Linear):
            layer.shared_input = None
    ids, grads, calls = torch.randint(0, 200, (2, 9)), [], []
    real = quant8._int_matmul
    for m in (model, alone):
        embeds = m.model.embed_tokens(ids).detach().requires_grad_()
        quant8._int_matmul = lambda xq, wq: (calls.append(wq.shape[0]), real(xq, wq))[1]
        try:
            loss = m(inputs_embeds=embeds).logits.float().pow(2).mean()
        finally:
            quant8._int_matmul = real
        loss.backward()
        grads.append(embeds.grad)
    assert calls[:4] == [64 + 2 * 32, 64, 2 * 96, 64]  # the shared forward: q|k|v, o, gate|up, down
    assert grads[0].abs().sum() > 0 and torch.equal(grads[0], grads[1])
