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
unquantized (:func:`exact_activations`). The output projection (``lm_head``) stays fp32 by default, as in
common W8A8 recipes; embeddings and norms are untouched.

At inference, layers that read one input (attention's q, k and v; the MLP's gate and up) quantize it
once and run one integer matmul over their stacked weights (:class:`SharedInput`); integer products
are exact, so their outputs are bit-identical to each layer run alone.
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
    amax = x.abs().amax(dim=-1, keepdim=True)  # (vector_norm(inf) and aminmax take 15-20x longer on a CPU)
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    # |x| / scale <= 127 up to the one rounding of the scale (127 * (1 + 2^-23) at most), which rounds
    # to 127: no code needs clamping
    q = torch.div(x, scale).round_().to(torch.int8)
    return q, scale


def _int_matmul(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """int8 [M, K] x int8 [N, K]^T -> the exact product [M, N]: int32 from ``torch._int_mm``, fp32 from
    the fallback (the caller's scaling promotes either to fp32)."""
    m, k = xq.shape
    n = wq.shape[0]
    # CUDA's _int_mm wants M > 16 and K, N multiples of 8; a CPU takes any shape
    if xq.device.type == "cpu" or (m > 16 and k % 8 == 0 and n % 8 == 0):
        return torch._int_mm(xq, wq.t())
    return xq.float() @ wq.float().t()  # exact while K * 127^2 < 2^24; a rounding of 1e-7 beyond


def _rescale(acc: torch.Tensor, x_scale: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """The integer product back to fp32: acc x (token scale) x (channel scale), in that order, as a new
    contiguous tensor. (``torch.mul(acc, x_scale)`` would promote int32 inside the product, but
    mixed-dtype elementwise products take a slower casting loop on a CPU: 1.4x the time.)"""
    return acc.float().mul_(x_scale).mul_(weight_scale.t())


class W8A8Linear(torch.nn.Module):
    """A drop-in for ``nn.Linear`` at inference: int8 weights and per-token dynamic int8 activations."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device: Any = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8",
                             torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, 1, dtype=torch.float32, device=device))
        self.bias = (torch.nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias
                     else None)
        self.exact_activations = False  # see exact_activations()
        self.shared_input: SharedInput | None = None  # see share_inputs()

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
        if torch.is_grad_enabled() and x.requires_grad:  # training through the frozen layer (LoRA)
            return W8A8LinearFunction.apply(x, self)
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        if self.exact_activations:
            out = rows.float() @ self.dequantized_weight().t()
        elif self.shared_input is not None and not torch.is_grad_enabled() and self.shared_input.ready():
            acc, x_scale = self.shared_input.product(self, x)
            out = _rescale(acc, x_scale, self.weight_scale)
        else:
            xq, x_scale = quantize_rows(rows)
            out = _rescale(_int_matmul(xq, self.weight_int8), x_scale, self.weight_scale)
        if self.bias is not None:
            out.add_(self.bias)
        return out.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, w8a8")


# Sibling projections that read one input in the decoder families this package scores (Llama, Mistral,
# Qwen2/3, Gemma, Granite, OLMo): attention's query, key and value; the gated MLP's gate and up.
SIBLINGS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class SharedInput:
    """Sibling W8A8 layers that read one input (see SIBLINGS), run together at inference: the input is
    quantized once and multiplied by the siblings' int8 weights stacked in one matrix, in one integer
    matmul, and each layer rescales its own columns. Integer products are exact and each column is
    rescaled as the layer alone rescales it, so every output is bit-identical to the layer run alone;
    the work is one quantization and one larger matmul instead of one of each per layer.

    The layers' weights become views into the stacked matrix (one copy in memory). Where a layer's
    weight was replaced since (moved to another device, reassigned), the group stands aside and each
    layer runs alone. An input's product is kept until every sibling has taken its columns, then let
    go: the siblings must read the same, unchanged tensor, as the families above do within a forward.
    Used only without autograd (scoring, generation); with gradients enabled each layer runs alone."""

    def __init__(self, layers: list[W8A8Linear]) -> None:
        self.weight = torch.cat([layer.weight_int8 for layer in layers])
        self.slices: dict[int, slice] = {}
        self._pointers: list[tuple[W8A8Linear, int]] = []
        start = 0
        for layer in layers:
            stop = start + layer.out_features
            layer.weight_int8 = self.weight[start:stop]  # a view: the buffer stays the layer's own
            self.slices[id(layer)] = slice(start, stop)
            self._pointers.append((layer, layer.weight_int8.data_ptr()))
            start = stop
        self._input: torch.Tensor | None = None
        self._acc: torch.Tensor | None = None
        self._scale: torch.Tensor | None = None
        self._taken: set[int] = set()

    def ready(self) -> bool:
        """Whether every sibling still multiplies by its view of the stacked weights."""
        return all(layer.weight_int8.data_ptr() == pointer for layer, pointer in self._pointers)

    def product(self, layer: W8A8Linear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's columns of the integer product of ``x``, the token scales of ``x``)."""
        key = id(layer)
        if self._input is not x or key in self._taken:  # a new input: quantize and multiply once
            xq, self._scale = quantize_rows(x.reshape(-1, x.shape[-1]))
            self._acc = _int_matmul(xq, self.weight)
            self._input, self._taken = x, set()
        assert self._acc is not None and self._scale is not None
        acc, scale = self._acc[:, self.slices[key]], self._scale
        self._taken.add(key)
        if len(self._taken) == len(self.slices):  # every sibling served: hold nothing between calls
            self._input = self._acc = self._scale = None
        return acc, scale


def share_inputs(model: torch.nn.Module) -> int:
    """Put each set of sibling W8A8 layers (SIBLINGS) of the model under one :class:`SharedInput`;
    returns how many sets were found (0 is fine: layers then run alone)."""
    groups = 0
    for module in list(model.modules()):
        for names in SIBLINGS:
            layers = [getattr(module, name, None) for name in names]
            if not all(isinstance(layer, W8A8Linear) for layer in layers):
                continue
            if len({(layer.in_features, layer.weight_int8.device) for layer in layers}) != 1:
                continue
            group = SharedInput(layers)  # type: ignore[arg-type]
            for layer in layers:
                layer.shared_input = group
            groups += 1
    return groups


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


class W8A8LinearFunction(torch.autograd.Function):
    """A W8A8 layer with a backward for its input, for adapters trained on a frozen W8A8 model (LoRA).

    Forward: the layer's own int8 forward (run without autograd, so exactly what scoring runs).
    Backward: the gradient of the input, in int8 as well (:func:`input_gradient`); the int8 weight
    and the bias are frozen and get none. Rounding has no useful derivative, so the gradient is that
    of the dequantized layer (a straight-through estimate, as bitsandbytes' LLM.int8 and 4-bit
    backward take it) with the output gradient quantized per row, as SwitchBack (Wortsman et al.,
    2023) does for the same product.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: W8A8Linear) -> torch.Tensor:
        ctx.layer = layer
        return layer.forward(x)  # no autograd in here: the inference path (not the module's hooks again)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:
        return input_gradient(grad_out, ctx.layer), None


def input_gradient(grad_out: torch.Tensor, layer: W8A8Linear) -> torch.Tensor:
    """d(loss)/d(input) of a W8A8 layer from d(loss)/d(output), as an int8 product.

    grad_in[m, k] = sum_n g[m, n] * s_w[n] * q_w[n, k]: the channel scale s_w is folded into the
    gradient first (the sum runs over the channels), each row of that is quantized to int8 with its
    own scale, and one integer matmul by the int8 weight [N, K] as stored gives the sum exactly. The
    only error is the gradient's rounding, at most half a step (max |row| / 254) per element; a
    fp32 matmul by the dequantized weight takes 2-3x longer on a CPU with VNNI (README, Fine-tuning).
    """
    shape = grad_out.shape
    scaled = grad_out.reshape(-1, shape[-1]).float() * layer.weight_scale.t()
    gq, g_scale = quantize_rows(scaled)
    # _int_matmul multiplies by the transpose of its second argument: the weight's transpose gives the weight
    grad_in = torch.mul(_int_matmul(gq, layer.weight_int8.t()), g_scale)
    return grad_in.reshape(*shape[:-1], layer.in_features).to(grad_out.dtype)


def quantize_model(model: torch.nn.Module, skip: Iterable[str] = ("lm_head",)) -> int:
    """Replace every ``nn.Linear`` whose name does not end with one of ``skip`` by a
    :class:`W8A8Linear`, in place; returns how many were replaced (0 is an error: nothing was quantized)."""
    skip = tuple(skip)
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear)
               and not any(name == s or name.endswith("." + s) for s in skip)]
    if not targets:
        raise ValueError("w8a8: the model has no nn.Linear layer to quantize")
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, W8A8Linear.from_linear(linear))
    share_inputs(model)  # siblings reading one input quantize it once (bit-identical outputs)
    return len(targets)


def count_parameters(model: torch.nn.Module) -> int:
    """Parameters plus the int8 weights W8A8 keeps as buffers (the model's size in weights)."""
    total = sum(p.numel() for p in model.parameters())
    return total + sum(m.weight_int8.numel() for m in model.modules() if isinstance(m, W8A8Linear))
