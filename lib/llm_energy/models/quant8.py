"""W8A8: a CPU-native 8-bit precision (int8 weights, int8 activations, int32 accumulation).

bitsandbytes' LLM.int8 (precision ``int8``, the paper's 8-bit) has no int8 kernel on a CPU: it casts
every layer's inputs to fp16 and runs several times slower than fp32 there, so on a CPU it measures
the fallback more than the precision. ``w8a8`` is a distinct precision that a CPU runs natively:

- weights: symmetric int8 per output channel (scale = max|w| / 127 of each row), quantized once at
  load time;
- activations: symmetric int8 per token, quantized dynamically at every call (scale = max|x| / 127 of
  each row of the layer's input);
- the product: ``torch._int_mm`` (int8 x int8 -> int32; oneDNN's VNNI/AVX2 kernels on a CPU), then
  rescaled to fp32 by the two scales; the bias (if any) is added in fp32.

There is no outlier handling (LLM.int8 keeps input features above a threshold in fp16): models with
large activation outliers lose more quality under W8A8 than under LLM.int8, which is what scoring the
two side by side shows. A token with a massive activation (SmolLM2's attention sinks reach 3,000, the
median token 2.6) is rounded in steps of 3,000/127, so a last-bit difference of its input, such as
another but equally exact order of float additions in a different batch layout, can flip a code and
move a continuation's log-likelihood by a nat; near-tied choices then flip. Scores at w8a8 are
therefore exact for the layout they ran in, and the scorer's layout checks run with activations
unquantized (:func:`exact_activations`). The output projection (``lm_head``) stays fp32 by default, as in common W8A8
recipes; embeddings and norms are untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch

QMAX = 127
DESCRIPTION = "int8 weights (per channel) x int8 activations (per token, dynamic), int32 accumulate"


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: (int8 values, fp32 scales of shape [rows, 1]); an all-zero row gets scale 1."""
    x = x.float()
    amax = x.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    q = torch.round(x / scale).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def _int_matmul(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """int8 [M, K] x int8 [N, K]^T -> the exact product as fp32 [M, N]."""
    m, k = xq.shape
    n = wq.shape[0]
    # CUDA's _int_mm wants M > 16 and K, N multiples of 8; a CPU takes any shape
    if xq.device.type == "cpu" or (m > 16 and k % 8 == 0 and n % 8 == 0):
        return torch._int_mm(xq, wq.t()).float()
    return xq.float() @ wq.float().t()  # exact while K * 127^2 < 2^24; a rounding of 1e-7 beyond


class W8A8Linear(torch.nn.Module):
    """A drop-in for ``nn.Linear`` at inference: int8 weights and per-token dynamic int8 activations."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device: Any = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, 1, dtype=torch.float32, device=device))
        self.bias = torch.nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None
        self.exact_activations = False  # see exact_activations()

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear) -> W8A8Linear:
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    device=linear.weight.device)
        q, scale = quantize_rows(linear.weight.detach())
        layer.weight_int8.copy_(q)
        layer.weight_scale.copy_(scale)
        if linear.bias is not None:
            assert layer.bias is not None
            layer.bias.data.copy_(linear.bias.detach().float())
        return layer

    def dequantized_weight(self) -> torch.Tensor:
        """The weight this layer multiplies by, in fp32 (what pruning checks read back)."""
        return self.weight_int8.float() * self.weight_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        if self.exact_activations:
            out = rows.float() @ self.dequantized_weight().t()
        else:
            xq, x_scale = quantize_rows(rows)
            out = _int_matmul(xq, self.weight_int8)
            out.mul_(x_scale).mul_(self.weight_scale.t())
        if self.bias is not None:
            out.add_(self.bias)
        return out.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, w8a8"


@contextlib.contextmanager
def exact_activations(model: torch.nn.Module) -> Iterator[int]:
    """Within the block, the model's W8A8 layers multiply unquantized fp32 activations by their
    dequantized int8 weights (yields how many layers). For checks of the scorer's layouts only:
    per-token int8 rounding turns a last-bit difference of an input (a different but equally exact
    order of float additions) into a whole code step, and the model's scores can swing by a nat,
    which hides whether two layouts compute the same thing. Never used inside a measured window."""
    layers = [m for m in model.modules() if isinstance(m, W8A8Linear)]
    for layer in layers:
        layer.exact_activations = True
    try:
        yield len(layers)
    finally:
        for layer in layers:
            layer.exact_activations = False


def quantize_model(model: torch.nn.Module, skip: Iterable[str] = ("lm_head",)) -> int:
    """Replace every ``nn.Linear`` whose name does not end with one of ``skip`` by a
    :class:`W8A8Linear`, in place; returns how many were replaced (0 is an error: nothing was quantized)."""
    skip = tuple(skip)
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and not any(name == s or name.endswith("." + s) for s in skip)]
    if not targets:
        raise ValueError("w8a8: the model has no nn.Linear layer to quantize")
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, W8A8Linear.from_linear(linear))
    return len(targets)


def count_parameters(model: torch.nn.Module) -> int:
    """Parameters plus the int8 weights W8A8 keeps as buffers (the model's size in weights)."""
    total = sum(p.numel() for p in model.parameters())
    return total + sum(m.weight_int8.numel() for m in model.modules() if isinstance(m, W8A8Linear))
