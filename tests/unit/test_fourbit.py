"""bitsandbytes' 4-bit layers at inference on a CPU with native bf16: dequantized per call, bf16 GEMM."""

import pytest
import torch

from llm_energy.models import fourbit

bnb = pytest.importorskip("bitsandbytes")


def _layer(quant_type="nf4", bias=True, nested=False):
    """A 4-bit layer as the loader makes them (block scales not double-quantized, unless ``nested``)."""
    torch.manual_seed(0)
    dense = torch.nn.Linear(64, 48, bias=bias)
    layer = bnb.nn.Linear4bit(64, 48, bias=bias, compute_dtype=torch.float32, quant_type=quant_type,
                              compress_statistics=nested)
    layer.load_state_dict(dense.state_dict())
    return layer.to("cpu").eval()


class Holder(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.proj = layer


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_the_dequantized_forward_is_the_bf16_product_of_the_4bit_weight(monkeypatch, quant_type):
    monkeypatch.setattr(fourbit, "native_bf16_cpu", lambda: True)
    layer = _layer(quant_type)
    state = layer.weight.quant_state
    weight = bnb.functional.dequantize_4bit(layer.weight.data, state).float()  # the 4-bit weight, exactly
    model = Holder(layer)
    assert fourbit.dequantize_per_call(model) == 1
    assert isinstance(layer.forward, fourbit.DequantizedForward) and not layer.support_avx512bf16_for_cpu
    x = torch.randn(3, 5, 64)
    with torch.inference_mode():
        out = model.proj(x)
    rounded = [t.bfloat16().float() for t in (x, weight, layer.bias)]
    expected = torch.nn.functional.linear(*rounded)
    assert out.dtype == torch.float32 and out.shape == (3, 5, 48)
    # bf16 inputs and weights, float32 accumulation, the output rounded to bf16 once
    assert torch.allclose(out, expected, rtol=1e-2, atol=1e-2)
    assert torch.equal(out, out.bfloat16().float())
    # against float32 compute: within bf16's rounding of inputs and weights
    assert (out - torch.nn.functional.linear(x, weight, layer.bias)).abs().max() < 0.05
    # the weights stay 4-bit, in bitsandbytes' plain layout
    assert layer.weight.dtype == torch.uint8 and not getattr(state, "packing_format_for_cpu", False)


def test_training_takes_bitsandbytes_own_path(monkeypatch):
    monkeypatch.setattr(fourbit, "native_bf16_cpu", lambda: True)
    layer = _layer()
    fourbit.dequantize_per_call(Holder(layer))
    calls = []
    own = layer.forward.own_forward
    layer.forward.own_forward = lambda x: (calls.append(x.shape), own(x))[1]
    x = torch.randn(4, 64, requires_grad=True)
    out = layer(x)
    out.sum().backward()
    assert calls == [(4, 64)] and x.grad is not None and out.dtype == torch.float32


def test_double_quantized_block_scales_take_bitsandbytes_own_path(monkeypatch):
    monkeypatch.setattr(fourbit, "native_bf16_cpu", lambda: True)
    layer = _layer(nested=True)
    fourbit.dequantize_per_call(Holder(layer))
    calls = []
    own = layer.forward.own_forward
    layer.forward.own_forward = lambda x: (calls.append(x.shape), own(x))[1]
    with torch.inference_mode():
        layer(torch.randn(2, 64))
    assert calls == [(2, 64)]


def test_nothing_changes_without_native_bf16(monkeypatch):
    monkeypatch.setattr(fourbit, "native_bf16_cpu", lambda: False)
    layer = _layer()
    assert fourbit.dequantize_per_call(Holder(layer)) == 0
    assert not isinstance(layer.forward, fourbit.DequantizedForward)


def test_a_loaded_4bit_model_says_what_it_computes_in(monkeypatch):
    from llm_energy.config import ModelSettings
    from llm_energy.models.loading import load_model

    monkeypatch.setattr(fourbit, "native_bf16_cpu", lambda: True)
    loaded = load_model(ModelSettings(name="tiny-random-llama"), "nf4")
    layers = [m for m in loaded.model.modules() if type(m).__name__ == "Linear4bit"]
    assert layers and all(isinstance(m.forward, fourbit.DequantizedForward) for m in layers)
    assert loaded.compute_description.startswith("nf4 weights, bfloat16 compute at inference")
    for layer in layers:  # at inference the dequantized path runs, never bitsandbytes' own
        layer.forward.own_forward = None
    ids = loaded.tokenizer("Site down after mains failure", return_tensors="pt")
    with torch.inference_mode():
        assert torch.isfinite(loaded.model(**ids).logits).all()
    monkeypatch.setattr(fourbit, "native_bf16_cpu", lambda: False)
    plain = load_model(ModelSettings(name="tiny-random-llama"), "nf4")
    assert plain.compute_description == "nf4 weights, float32 compute"
