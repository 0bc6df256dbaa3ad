"""fp32 linear layers at a few rows run weight first (models.few_rows): the same products to float
rounding, only where the rule says, on plain fp32 layers only, and generation writes the same tokens."""

import pytest
import torch

from llm_energy.models import few_rows
from llm_energy.models.few_rows import FewRowsLinear, few_rows_linears, weight_first


@pytest.mark.parametrize("rows, out_features, expected", [
    (1, 64, True), (4, 2048, True), (5, 2048, False),           # a decoder layer: decode steps only
    (2, 49152, True), (8, 49152, True), (9, 49152, False),  # a vocabulary projection: a larger batch
    (2000, 262144, False),
])
def test_the_rule(rows, out_features, expected):
    assert weight_first(rows, torch.empty(out_features, 8)) is expected


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.int8])
def test_other_dtypes_run_as_before(dtype):
    assert not weight_first(1, torch.zeros(64, 8, dtype=dtype))
    x = torch.ones(2, 8, dtype=torch.bfloat16)
    w = torch.ones(64, 8, dtype=torch.bfloat16)
    assert few_rows.linear(x, w).shape == (2, 64)


@pytest.mark.parametrize("shape", [(1, 96), (3, 96), (2, 5, 96), (1, 1, 96), (8, 96), (300, 96), (0, 96)])
@pytest.mark.parametrize("bias", [False, True])
def test_the_same_product_as_f_linear(shape, bias):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=generator)
    w = torch.randn(20000, 96, generator=generator)  # a vocabulary-sized output: weight first to 8 rows
    b = torch.randn(20000, generator=generator) if bias else None
    got, want = few_rows.linear(x, w, b), torch.nn.functional.linear(x, w, b)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_swaps_plain_fp32_layers_and_restores_them():
    class Custom(torch.nn.Linear):
        pass

    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 8, bias=False),
                                torch.nn.Linear(8, 8).to(torch.bfloat16), Custom(8, 8))
    keys = list(model.state_dict())
    x = torch.randn(3, 8)
    with torch.no_grad():
        before = model[:2](x)
    with few_rows_linears(model) as n:
        assert n == 2
        assert [type(m) for m in model] == [FewRowsLinear, FewRowsLinear, torch.nn.Linear, Custom]
        with few_rows_linears(model) as inner:  # nested: nothing left to swap, nothing restored early
            assert inner == 0
        assert type(model[0]) is FewRowsLinear
        assert list(model.state_dict()) == keys
        with torch.no_grad():
            torch.testing.assert_close(model[:2](x), before, rtol=1e-6, atol=1e-6)
    assert [type(m) for m in model] == [torch.nn.Linear, torch.nn.Linear, torch.nn.Linear, Custom]


def test_restores_after_an_error():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with pytest.raises(RuntimeError), few_rows_linears(model):
        raise RuntimeError("inside")
    assert type(model[0]) is torch.nn.Linear


def test_tied_weights_stay_tied(tiny_model):
    model = tiny_model.model
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head.weight is embed.weight
    with few_rows_linears(model):
        assert type(head) is FewRowsLinear
        assert (head.weight is embed.weight) == tied
    assert type(head) is torch.nn.Linear


def test_generation_writes_the_same_tokens(tiny_model, monkeypatch):
    """Greedy generation on the tiny model, weight first (the default) and with every layer as before."""
    import contextlib

    from llm_energy.config import GenerationSpec
    from llm_energy.items import RCAItem
    from llm_energy.methods import generation

    items = [RCAItem(id=str(i), ticket=f"Alarm {i} on site {i * 7}: link down after maintenance.",
                     root_cause="fibre_cut", resolution="Spliced.") for i in range(4)]
    spec = GenerationSpec(new_tokens=6, batch_size=2)
    encoded = generation.encode_prompts(tiny_model.tokenizer, items, spec)
    chosen = []
    rule = few_rows.weight_first
    monkeypatch.setattr(few_rows, "weight_first", lambda rows, w: chosen.append(rule(rows, w)) or chosen[-1])
    fast = generation.generate_encoded(tiny_model.model, encoded)
    assert any(chosen) and not all(chosen)  # decode steps weight first, the prefill as before
    monkeypatch.setattr(few_rows, "few_rows_linears", lambda model: contextlib.nullcontext(0))
    plain = generation.generate_encoded(tiny_model.model, encoded)
    assert all(torch.equal(a, b) for a, b in zip(fast, plain))
