"""Random-weight models of real architectures, for measuring energy and kernels where model files cannot
travel (the lent GPU machine: 64 MiB per call, no model hub).

The shapes are the real models' (every matmul, the vocabulary, the attention layout), so time and
energy per token are those of the real model at that precision; the weights are random (seeded), so
quality is not: every table, figure and report built on them must say ``RANDOM_NOTE``.

- ``smollm2-135m``: SmolLM2-135M's config (576 wide, 30 layers, 9 heads / 3 KV heads, 49,152 tokens,
  tied embeddings), with the real SmolLM2 tokenizer when a folder holding it is given;
- ``llama-3.2-1b``: Llama-3.2-1B's config (2048 wide, 16 layers, 32 / 8 heads, 128,256 tokens, RoPE
  scaling llama3) with an untied output head: 1.50 B parameters, the model of
  ../shared/notes/h100-measurements.md (Llama-3.2-1B ties it: 1.24 B parameters, the same matmuls per
  token). SmolLM2's token ids (< 49,152) are valid inside its vocabulary;
- ``tiny``: 64 wide, 2 layers, SmolLM2's vocabulary (rehearsals on a CPU).

    python -m llm_energy.models.random_shapes --preset smollm2-135m --tokenizer DIR --out FOLDER
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

RANDOM_NOTE = "random weights: quality not meaningful; energy and kernels are"

PRESETS: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=8192,
                         rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                         tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
                         pad_token_id=128001),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=49152, max_position_embeddings=2048,
                 rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
                 bos_token_id=1, eos_token_id=2, pad_token_id=2),
}


def llama_config(preset: str) -> Any:
    from transformers import LlamaConfig

    values = dict(PRESETS[preset])
    rope_theta = values.pop("rope_theta")
    rope_scaling = values.pop("rope_scaling", None)
    config = LlamaConfig(**values, attn_implementation="sdpa")
    # transformers 5 keeps RoPE settings in rope_parameters; older releases read rope_theta/rope_scaling
    params = {"rope_type": "default", "rope_theta": rope_theta}
    if rope_scaling:
        params.update(rope_scaling)
    if hasattr(config, "rope_parameters"):
        config.rope_parameters = params
    else:
        config.rope_theta = rope_theta
        if rope_scaling:
            config.rope_scaling = dict(rope_scaling)
    return config


def build_model(preset: str, dtype: Any = None, device: str = "cpu", seed: int = 0) -> Any:
    """The preset's LlamaForCausalLM with seeded random weights, built on ``device`` (fast on a GPU)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(llama_config(preset))
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def origin(preset: str, seed: int, n_parameters: int) -> str:
    return f"{preset} architecture, {RANDOM_NOTE} (seed {seed}, {n_parameters:,} parameters)"


def save_folder(preset: str, out: Path, tokenizer: Path | None = None, seed: int = 0,
                dtype: str = "bfloat16") -> Path:
    """A Hugging Face model folder (config, safetensors, tokenizer files, ORIGIN.json) that
    ``source: local`` loads; weights saved at ``dtype`` (half the bytes; they are random anyway)."""
    import torch

    model = build_model(preset, getattr(torch, dtype), "cpu", seed)
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        for item in Path(tokenizer).iterdir():
            if item.is_file() and item.name != "config.json":
                shutil.copyfile(item, out / item.name)
    n = sum(p.numel() for p in model.parameters())
    (out / "ORIGIN.json").write_text(json.dumps({"origin": origin(preset, seed, n), "preset": preset,
                                                 "random_weights": True, "note": RANDOM_NOTE}))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a random-weight model folder of a real architecture.")
    parser.add_argument("--preset", choices=sorted(PRESETS), required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, help="a folder with the SmolLM2 tokenizer files")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    folder = save_folder(args.preset, args.out, args.tokenizer, args.seed)
    print(f"{folder}: {json.loads((folder / 'ORIGIN.json').read_text())['origin']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
