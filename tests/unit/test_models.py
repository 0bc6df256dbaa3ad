"""One loading function, every precision, on the tiny random model (CPU)."""

import pytest
import torch

from llm_energy.config import ModelSettings
from llm_energy.models import PrecisionUnsupported, load_model, precision_support, resolve_device

TINY = ModelSettings(name="tiny-random-llama")


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_torch_dtypes(precision, dtype):
    loaded = load_model(TINY, precision)
    assert next(loaded.model.parameters()).dtype == dtype
    assert "random" in loaded.weights_origin and "not a real model" in loaded.weights_origin


@pytest.mark.parametrize("precision, layer_class", [("int8", "Linear8bitLt"), ("nf4", "Linear4bit"), ("fp4", "Linear4bit")])
def test_bitsandbytes_precisions_quantize_the_linear_layers(precision, layer_class):
    loaded = load_model(TINY, precision)
    classes = {type(m).__name__ for m in loaded.model.modules()}
    assert layer_class in classes
    fp32 = load_model(TINY, "fp32")
    assert loaded.memory_bytes < fp32.memory_bytes
    ids = loaded.tokenizer("Site down after mains failure", return_tensors="pt")
    with torch.inference_mode():
        logits = loaded.model(**ids).logits
    assert torch.isfinite(logits).all()


def test_random_weights_are_seeded():
    a = load_model(TINY, "fp32").model.state_dict()
    b = load_model(TINY, "fp32").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_precision_and_missing_gpu():
    with pytest.raises(PrecisionUnsupported, match="unknown precision 'int3'"):
        load_model(TINY, "int3")
    assert precision_support("fp32", "cpu") is None
    if not torch.cuda.is_available():
        with pytest.raises(PrecisionUnsupported, match="no CUDA GPU is visible"):
            resolve_device("cuda")


def test_local_folder_without_config(tmp_path):
    spec = ModelSettings(name="mine", source="local", path=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_model(spec, "fp32")


def test_hub_refused_when_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = ModelSettings(name="remote", source="hub", path="someone/some-model")
    with pytest.raises(RuntimeError, match="needs the network but HF_HUB_OFFLINE=1"):
        load_model(spec, "fp32")
