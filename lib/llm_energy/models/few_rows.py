"""fp32 linear layers fed a few rows, computed weight first: ``(W @ x^T)^T`` instead of ``x @ W^T``.

On a CPU, torch's float32 ``F.linear(x, W)`` (MKL's sgemm, the weight as the transposed operand) runs
far below what memory allows when ``x`` has a few rows, as every decode step of generation has (rows =
the batch). The same product with the weight as the first operand streams the weight once. Measured on
the 2-core AVX-512 AMD kind (``benchmarks/few_rows_linear.py`` prints both per shape on the machine it
runs on): Gemma 3's vocabulary projection [262144 x 640] at 2 rows 140 ms -> 26 ms, at 8 rows 108 -> 87
ms; SmolLM2's [49152 x 576] at 2 rows 23 -> 4 ms; decoder layers at 1-4 rows 0.9-1.4x. From 8 rows on a
decoder layer, and from ~32 on a vocabulary projection once its log-softmax is counted (scoring's
positions: hundreds), the usual form is as fast or faster, so it is kept there. Gemma 3 270M's greedy
generation of the default study's 8 resolutions: 13.9 s -> 5.6 s.

The two forms compute every output element as the same fp32 dot product, summed in another order: the
results agree to float rounding (greedy generation wrote the same tokens in every configuration tried).
Only plain ``nn.Linear`` layers with fp32 weights on a CPU are affected; quantized layers (W8A8,
bitsandbytes) and other dtypes run as they did.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

DECODE_ROWS = 4  # up to this many rows every fp32 layer runs weight first (a decode step of a small batch)
VOCAB_OUTPUTS = 16384  # a layer with at least this many outputs is a vocabulary projection...
VOCAB_ROWS = 8  # ...and runs weight first up to this many rows


def weight_first(rows: int, weight: torch.Tensor) -> bool:
    """Whether a product of ``rows`` input rows with ``weight`` ([out, in]) runs weight first."""
    if weight.dtype != torch.float32 or weight.device.type != "cpu" or weight.dim() != 2:
        return False
    return rows <= DECODE_ROWS or (weight.shape[0] >= VOCAB_OUTPUTS and rows <= VOCAB_ROWS)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, weight first where :func:`weight_first` says so."""
    rows = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
    if not rows or x.dtype != weight.dtype or not weight_first(rows, weight):
        return torch.nn.functional.linear(x, weight, bias)
    out = torch.mm(weight, x.reshape(rows, x.shape[-1]).t()).t()
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


class FewRowsLinear(torch.nn.Linear):
    """An ``nn.Linear`` whose forward is :func:`linear` (set as a module's class by :func:`few_rows_linears`:
    parameters, tied weights and state dict keys stay as they are)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 (nn.Linear's name)
        return linear(input, self.weight, self.bias)


@contextlib.contextmanager
def few_rows_linears(model: Any) -> Iterator[int]:
    """Within the block, the model's plain fp32 ``nn.Linear`` layers on a CPU run through :func:`linear`;
    yields how many. Their class is restored on exit; a layer already swapped (a nested block) is left
    to the block that swapped it."""
    swapped = [m for m in model.modules()
               if type(m) is torch.nn.Linear and m.weight.dtype == torch.float32
               and m.weight.device.type == "cpu"]
    for module in swapped:
        module.__class__ = FewRowsLinear
    try:
        yield len(swapped)
    finally:
        for module in swapped:
            module.__class__ = torch.nn.Linear
