"""Pruning: N:M exactness, sparsity accounting, Wanda scoring by hand, refusals, untouched layers."""

import numpy as np
import pytest
import torch

from llm_energy.config import ModelSettings, PruningSpec, TaskSettings, parse_nm_pattern
from llm_energy.data.tasks import load_task_data
from llm_energy.items import QAItem, RCAItem
from llm_energy.methods.sparsify import (
    calibration_texts,
    measure_sparsity,
    prune_model,
    verify_nm,
)
from llm_energy.models.loading import load_model

TINY = ModelSettings(name="tiny-random-llama")
N_TINY_LAYERS = 2 * 7  # decoder blocks x projections


@pytest.fixture
def tiny():
    """A fresh tiny random Llama per test: pruning works in place, the session fixture must stay dense."""
    return load_model(TINY, "fp32")


@pytest.fixture(scope="module")
def rca_texts():
    return calibration_texts(load_task_data("rca", TaskSettings(split="train")).items, n=4, seed=0)


def zeros_per_group(weight: torch.Tensor, m: int) -> np.ndarray:
    # Independent of verify_nm: numpy, row-major flattening into consecutive groups of m.
    array = weight.detach().float().numpy()
    assert array.shape[1] % m == 0
    return (array.reshape(-1, m) == 0).sum(axis=1)


# --------------------------------------------------------------------------------------------------
# N:M


@pytest.mark.parametrize("pattern, n_kept, group", [("2:4", 2, 4), ("4:8", 4, 8)])
@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_nm_pattern_is_exact_on_every_layer(tiny, rca_texts, method, pattern, n_kept, group):
    spec = PruningSpec(method=method, pattern=pattern, calibration_samples=4)
    result = prune_model(tiny.model, spec, calibration=rca_texts, tokenizer=tiny.tokenizer)
    assert result.verified_nm is True and spec.sparsity == 0.5
    assert len(result.layers) == N_TINY_LAYERS
    modules = dict(tiny.model.named_modules())
    for layer in result.layers:
        # Random weights have no zeros of their own, so every group has exactly M - N.
        assert (zeros_per_group(modules[layer.name].weight, group) == group - n_kept).all(), layer.name
    assert result.measured_sparsity == pytest.approx(0.5)


def test_verify_nm_rejects_a_violating_weight():
    good = torch.tensor([[0.0, 1.0, 0.0, 2.0, 3.0, 0.0, 0.0, 4.0]])
    bad = torch.tensor([[0.0, 1.0, 5.0, 2.0, 3.0, 0.0, 0.0, 4.0]])  # first group has one zero
    assert verify_nm(good, 2, 4) is True
    assert verify_nm(bad, 2, 4) is False
    assert verify_nm(bad, 3, 4) is True  # 3:4 needs one zero per group
    with pytest.raises(ValueError, match="not a multiple of m=4"):
        verify_nm(torch.ones(2, 6), 2, 4)


def test_nm_keeps_the_largest_in_each_group():
    model = torch.nn.Sequential()
    model.add_module("up_proj", torch.nn.Linear(8, 1, bias=False))
    model.up_proj.weight.data = torch.tensor([[0.1, -5.0, 0.2, 3.0, 7.0, 1.0, -2.0, 0.5]])
    prune_model(model, PruningSpec("magnitude", "2:4", include=("up_proj",)))
    assert model.up_proj.weight.tolist() == [[0.0, -5.0, 0.0, 3.0, 7.0, 0.0, -2.0, 0.0]]


# --------------------------------------------------------------------------------------------------
# Sparsity accounting


@pytest.mark.parametrize("sparsity", [0.5, 0.3])
@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_measured_sparsity_matches_target(tiny, rca_texts, method, sparsity):
    spec = PruningSpec(method=method, pattern="unstructured", sparsity=sparsity, calibration_samples=4)
    result = prune_model(tiny.model, spec, calibration=rca_texts, tokenizer=tiny.tokenizer)
    assert abs(result.measured_sparsity - sparsity) <= 0.02
    assert result.target_sparsity == sparsity and result.verified_nm is None
    assert sum(layer.n_zero for layer in result.layers) == result.n_zero
    assert sum(layer.n_weights for layer in result.layers) == result.n_weights
    # Counted again from the state dict, independently of the result.
    state = tiny.model.state_dict()
    weights = [state[layer.name + ".weight"] for layer in result.layers]
    assert result.n_zero == sum(int((w == 0).sum()) for w in weights)
    assert result.n_weights == sum(w.numel() for w in weights)
    assert {name: layer.n_zero for name, layer in measure_sparsity(tiny.model).items()} == {
        layer.name: layer.n_zero for layer in result.layers
    }
    if method == "wanda":
        assert result.n_calibration_texts == 4 and result.n_calibration_tokens > 4


def test_as_rows_one_row_per_layer(tiny):
    result = prune_model(tiny.model, PruningSpec("magnitude", sparsity=0.5))
    rows = result.as_rows("tiny__fp32__magnitude-unstructured-50")
    assert len(rows) == N_TINY_LAYERS
    assert rows[0]["config_id"] == "tiny__fp32__magnitude-unstructured-50"
    assert rows[0]["pruning"] == "magnitude-unstructured-50" and rows[0]["sparsity_pattern"] == "unstructured"
    assert sum(r["n_zero"] for r in rows) == result.n_zero
    assert (rows[0]["out_features"], rows[0]["in_features"]) == result.layers[0].shape


def test_magnitude_ties_are_broken_by_position():
    model = torch.nn.Sequential()
    model.add_module("q_proj", torch.nn.Linear(4, 2, bias=False))
    model.q_proj.weight.data.fill_(1.0)
    prune_model(model, PruningSpec("magnitude", sparsity=0.5, include=("q_proj",)))
    assert model.q_proj.weight.tolist() == [[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]


def test_half_precision_weights_keep_their_dtype():
    model = torch.nn.Sequential()
    model.add_module("v_proj", torch.nn.Linear(16, 8, bias=False).to(torch.bfloat16))
    result = prune_model(model, PruningSpec("magnitude", "2:4", include=("v_proj",)))
    assert model.v_proj.weight.dtype == torch.bfloat16
    assert result.verified_nm is True and result.measured_sparsity == pytest.approx(0.5)


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_wanda_on_half_precision_models(rca_texts, precision, dtype):
    loaded = load_model(TINY, precision)
    spec = PruningSpec("wanda", "2:4", calibration_samples=4)
    result = prune_model(loaded.model, spec, calibration=rca_texts, tokenizer=loaded.tokenizer)
    assert result.verified_nm is True and result.measured_sparsity == pytest.approx(0.5)
    assert all(p.dtype == dtype for p in loaded.model.parameters())


# --------------------------------------------------------------------------------------------------
# Wanda by hand


class ToyLM(torch.nn.Module):
    """One q_proj fed by a fixed vector per token, so its calibration inputs are known exactly."""

    def __init__(self, weight: torch.Tensor, token_vectors: torch.Tensor):
        super().__init__()
        self.register_buffer("table", token_vectors)
        self.q_proj = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        self.q_proj.weight.data = weight.clone()

    def forward(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.q_proj(self.table[input_ids])


class LetterTokenizer:
    """'a' -> token 0, 'b' -> token 1, one token per letter."""

    def __call__(self, text: str, return_tensors: str = "pt") -> dict:
        return {"input_ids": torch.tensor([[ord(c) - ord("a") for c in text]])}


W = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
# Token a = [3, 1, 0, 1], token b = [4, 0, 1, 0]: sum of squares per input feature [25, 1, 1, 1],
# so ||X_j|| = [5, 1, 1, 1].
TOKENS = torch.tensor([[3.0, 1.0, 0.0, 1.0], [4.0, 0.0, 1.0, 0.0]])


def test_wanda_mask_computed_by_hand():
    # Scores |W| * ||X||: row 0 = [5, 2, 3, 4] -> drop columns 1, 2; row 1 = [20, 3, 2, 1] -> drop 2, 3.
    model = ToyLM(W, TOKENS)
    spec = PruningSpec("wanda", sparsity=0.5, include=("q_proj",), calibration_samples=2)
    result = prune_model(model, spec, calibration=["a", "b"], tokenizer=LetterTokenizer())
    assert model.q_proj.weight.tolist() == [[1.0, 0.0, 0.0, 4.0], [4.0, 3.0, 0.0, 0.0]]
    assert result.n_calibration_tokens == 2 and result.layers[0].n_zero == 4


def test_wanda_and_magnitude_choose_differently():
    # Magnitude over the whole layer drops the four smallest |W| (1, 1, 2, 2): row 0 keeps columns 2, 3.
    # Wanda keeps column 0 of row 0 instead (small weight, large input) and drops column 2.
    magnitude = ToyLM(W, TOKENS)
    prune_model(magnitude, PruningSpec("magnitude", sparsity=0.5, include=("q_proj",)))
    assert magnitude.q_proj.weight.tolist() == [[0.0, 0.0, 3.0, 4.0], [4.0, 3.0, 0.0, 0.0]]
    wanda = ToyLM(W, TOKENS)
    spec = PruningSpec("wanda", "2:4", include=("q_proj",), calibration_samples=2)
    prune_model(wanda, spec, calibration=["a", "b"], tokenizer=LetterTokenizer())
    assert wanda.q_proj.weight.tolist() == [[1.0, 0.0, 0.0, 4.0], [4.0, 3.0, 0.0, 0.0]]


def test_wanda_norms_accumulate_over_texts_of_any_length():
    # "ab" then "b" vs "a" then "bb": different lengths, the same tokens overall -> the same mask.
    one, two = ToyLM(W, TOKENS), ToyLM(W, TOKENS)
    spec = PruningSpec("wanda", sparsity=0.5, include=("q_proj",), calibration_samples=2)
    prune_model(one, spec, calibration=["ab", "b"], tokenizer=LetterTokenizer())
    prune_model(two, spec, calibration=["a", "bb"], tokenizer=LetterTokenizer())
    assert torch.equal(one.q_proj.weight, two.q_proj.weight)


# --------------------------------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "wanda", "pattern": "2:4", "sparsity": 0.3}, r"'2:4'.*sparsity 0\.5; got sparsity=0\.3"),
        ({"method": "magnitude", "pattern": "4:2"}, r"'4:2' needs 0 < N < M"),
        ({"method": "magnitude", "pattern": "4:4"}, r"'4:4' needs 0 < N < M"),
        ({"method": "magnitude", "pattern": "x:y"}, r"'x:y' is not 'unstructured' or 'N:M'"),
        ({"method": "magnitude", "pattern": "0:4"}, r"needs 0 < N < M"),
        ({"method": "magnitude"}, r"unstructured pruning needs a sparsity"),
        ({"method": "magnitude", "sparsity": 1.0}, r"strictly between 0 and 1; got 1\.0"),
        ({"method": "magnitude", "sparsity": -0.1}, r"strictly between 0 and 1"),
        ({"method": "sparsegpt", "sparsity": 0.5}, r"method must be one of magnitude, wanda; got "
                                                   r"'sparsegpt'"),
        ({"method": "wanda", "sparsity": 0.5, "calibration_samples": 0},
         r"calibration_samples must be a positive"),
        ({"method": "wanda", "sparsity": 0.5, "include": "q_proj"}, r"include must be a non-empty tuple"),
        ({"method": "wanda", "sparsity": 0.5, "include": ()}, r"include must be a non-empty tuple"),
    ],
)
def test_inconsistent_specs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PruningSpec(**kwargs)


def test_nm_sparsity_is_implied_and_labels_are_file_safe():
    assert PruningSpec("wanda", "2:4").sparsity == 0.5
    assert PruningSpec("wanda", "2:4", sparsity=0.5) == PruningSpec("wanda", "2:4")
    assert PruningSpec("magnitude", "1:4").sparsity == 0.75
    assert PruningSpec("wanda", "2:4").label == "wanda-2of4"
    assert PruningSpec("magnitude", "4:8").label == "magnitude-4of8"
    assert PruningSpec("magnitude", sparsity=0.5).label == "magnitude-unstructured-50"
    assert PruningSpec("wanda", sparsity=0.375).label == "wanda-unstructured-37.5"
    nm = parse_nm_pattern("4:8")
    assert (nm.kept, nm.group, nm.zeroed, nm.sparsity) == (4, 8, 4, 0.5)


def test_wanda_without_calibration_is_refused(tiny):
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    with pytest.raises(ValueError, match="wanda needs calibration texts and the model's tokenizer"):
        prune_model(tiny.model, PruningSpec("wanda", sparsity=0.5))
    with pytest.raises(ValueError, match="wanda needs calibration texts"):
        prune_model(tiny.model, PruningSpec("wanda", sparsity=0.5), calibration=["a ticket"])
    with pytest.raises(ValueError, match="asks for 64 calibration texts but 1 were given"):
        prune_model(tiny.model, PruningSpec("wanda", sparsity=0.5), calibration=["a ticket"],
                    tokenizer=tiny.tokenizer)
    assert all(torch.equal(before[k], v) for k, v in tiny.model.state_dict().items())


class Linear4bit(torch.nn.Linear):
    """Stands in for bitsandbytes.nn.Linear4bit: refusal goes by class name."""


def test_quantized_models_are_refused():
    fake = torch.nn.Sequential()
    fake.add_module("q_proj", Linear4bit(8, 4))
    with pytest.raises(ValueError, match=r"q_proj \(Linear4bit\).*prune the dense model, then quantize"):
        prune_model(fake, PruningSpec("magnitude", sparsity=0.5, include=("q_proj",)))
    bnb = pytest.importorskip("bitsandbytes")
    real = torch.nn.Sequential()
    real.add_module("q_proj", bnb.nn.Linear8bitLt(8, 4, has_fp16_weights=False))
    with pytest.raises(ValueError, match=r"Linear8bitLt.*prune the dense model, then quantize"):
        prune_model(real, PruningSpec("magnitude", sparsity=0.5, include=("q_proj",)))


def test_indivisible_input_dimension_is_refused_before_any_change():
    model = torch.nn.Sequential()
    model.add_module("k_proj", torch.nn.Linear(8, 4))
    model.add_module("o_proj", torch.nn.Linear(6, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"o_proj has weight shape \(4, 6\).*not a multiple of M=4.*'2:4'"):
        prune_model(model, PruningSpec("magnitude", "2:4", include=("k_proj", "o_proj")))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unknown_layer_names_and_wrong_objects_are_refused(tiny):
    with pytest.raises(ValueError, match=r"\['qkv_proj'\] match no module"):
        prune_model(tiny.model, PruningSpec("magnitude", sparsity=0.5, include=("qkv_proj",)))
    with pytest.raises(ValueError, match=r"model.embed_tokens \(Embedding\) is not a torch.nn.Linear"):
        prune_model(tiny.model, PruningSpec("magnitude", sparsity=0.5, include=("embed_tokens",)))
    with pytest.raises(TypeError, match=r"pass loaded.model, not the LoadedModel"):
        prune_model(tiny, PruningSpec("magnitude", sparsity=0.5))


# --------------------------------------------------------------------------------------------------
# Nothing else is touched


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_only_included_layers_change(tiny, rca_texts, method):
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    spec = PruningSpec(method, sparsity=0.5, include=("q_proj",), calibration_samples=4)
    result = prune_model(tiny.model, spec, calibration=rca_texts, tokenizer=tiny.tokenizer)
    after = tiny.model.state_dict()
    assert before.keys() == after.keys()
    pruned = {layer.name + ".weight" for layer in result.layers}
    assert pruned == {f"model.layers.{i}.self_attn.q_proj.weight" for i in range(2)}
    for key in before:
        if key in pruned:
            assert not torch.equal(before[key], after[key]), key
        else:
            assert torch.equal(before[key], after[key]), key  # embeddings, lm_head, norms, other projections


# --------------------------------------------------------------------------------------------------
# Calibration texts and the prune-then-quantize route


def test_calibration_texts_are_a_seeded_sample():
    rca = load_task_data("rca", TaskSettings(split="train")).items
    qa = load_task_data("qa", TaskSettings(split="train")).items
    texts = calibration_texts(rca + qa, n=20, seed=3)
    assert texts == calibration_texts(rca + qa, n=20, seed=3)
    assert texts != calibration_texts(rca + qa, n=20, seed=4)
    assert len(set(texts)) == 20
    item = QAItem(id="q", question="Which port?", choices=("22", "830"), answer=1)
    assert calibration_texts([item], n=1, seed=0) == ["Which port?\n22\n830"]
    assert calibration_texts([RCAItem(id="r", ticket="Site down", root_cause="x")], 1, 0) == ["Site down"]
    with pytest.raises(ValueError, match="asked for 5 calibration texts but only 1 items"):
        calibration_texts([item], n=5, seed=0)
    with pytest.raises(TypeError, match="expected RCAItem or QAItem items"):
        calibration_texts(["plain text"], n=1, seed=0)


def test_sparsity_survives_quantization_after_pruning(tiny, tmp_path):
    prune_model(tiny.model, PruningSpec("magnitude", "2:4"))
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    quantized = load_model(ModelSettings(name="tiny-pruned", source="local", path=str(tmp_path)), "nf4")
    layers = measure_sparsity(quantized.model)
    assert len(layers) == N_TINY_LAYERS
    # A zero stays zero in NF4; small weights may round to zero as well.
    assert all(layer.measured_sparsity >= 0.5 for layer in layers.values())
    assert all(layer.shape == tuple(tiny.model.get_submodule(name).weight.shape)
               for name, layer in layers.items())
