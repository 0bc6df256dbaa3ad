"""The floating-point work of a decoder's forward pass, counted from the model's configuration.

A window's achieved rate (GFLOP/s) set beside the throughput probe's rate for its precision says how
near the model ran to what this device's matmuls can do (``limit_share``). The count is the useful
work of the tokens that ran, in multiply-adds times two:

- every linear layer of the decoder: 2 x its weights per token (attention q, k, v, o and the gated
  MLP's gate, up and down projections, as the Llama, Mistral, Qwen2 and Gemma families have them);
- attention: 4 x (query heads x head size) per attended key position, per token and layer (QK^T and
  the weighted sum of V, 2 FLOPs per multiply-add each); a layer with a sliding window attends at
  most its window;
- the output projection (vocabulary logits): 2 x hidden size x vocabulary, only at the positions
  whose logits are computed (a scorer that keeps the last position's logits only pays for one).

Embedding look-ups, norms, rotary embeddings, activations and softmax are left out (well under 1% of
the work of the models studied here); so is padding, which runs but computes nothing asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def _heads(config: Any) -> tuple[int, int, int]:
    """(query heads, key/value heads, head size) of a decoder configuration."""
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return heads, kv_heads, head_dim


def decoder_linear_parameters(model_config: Any) -> int:
    """Weights of the decoder's linear layers (all layers; no embeddings, norms or output projection)."""
    heads, kv_heads, head_dim = _heads(model_config)
    d, inter = int(model_config.hidden_size), int(model_config.intermediate_size)
    attention = 2 * d * heads * head_dim + 2 * d * kv_heads * head_dim  # q and o, k and v
    mlp = 3 * d * inter  # gate, up, down
    return int(model_config.num_hidden_layers) * (attention + mlp)


def _layer_windows(config: Any) -> list[int | None]:
    """Per layer, the sliding attention window it attends within (None: the whole context)."""
    n = int(config.num_hidden_layers)
    window = getattr(config, "sliding_window", None)
    if not window or not getattr(config, "use_sliding_window", True):
        return [None] * n
    types = getattr(config, "layer_types", None)
    if types is None:  # a model with one window for every layer (Mistral)
        return [int(window)] * n
    return [int(window) if kind == "sliding_attention" else None for kind in types]


def forward_gflop(model_config: Any, tokens: int, logit_positions: int,
                  contexts: Sequence[int] | np.ndarray | None = None) -> float:
    """GFLOP of a forward pass over ``tokens`` tokens of a decoder with this configuration (a
    transformers ``PretrainedConfig`` or anything with the same attributes).

    ``logit_positions``: positions whose vocabulary logits were computed. ``contexts``: per token,
    how many key positions it attends to, itself included (a shared prefix's cache counts); None
    means the tokens ran as one causal sequence (token i attends to i + 1 positions).
    """
    if tokens < 0 or logit_positions < 0:
        raise ValueError(f"tokens and logit_positions must be >= 0; got {tokens} and {logit_positions}")
    if contexts is None:
        ctx = np.arange(1, tokens + 1, dtype=np.int64)
    else:
        ctx = np.asarray(contexts, dtype=np.int64)
        if ctx.shape != (tokens,):
            raise ValueError(f"contexts must give one count per token ({tokens}); got shape {ctx.shape}")
    heads, _, head_dim = _heads(model_config)
    attended = sum(int(np.minimum(ctx, w).sum()) if w else int(ctx.sum())
                   for w in _layer_windows(model_config))
    flops = (2.0 * decoder_linear_parameters(model_config) * tokens
             + 4.0 * heads * head_dim * attended
             + 2.0 * int(model_config.hidden_size) * int(model_config.vocab_size) * logit_positions)
    return flops / 1e9
