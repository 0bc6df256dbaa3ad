"""bitsandbytes' 4-bit layers (nf4, fp4) at inference on a CPU with native bf16: the weight dequantized
to bf16 at each call and multiplied by torch's (oneDNN's) bf16 GEMM.

bitsandbytes runs a 4-bit layer on a CPU in one of two ways. Where the CPU has ``avx512_bf16`` it
repacks the weight at the first inference call and multiplies with its own fused kernel, which casts
the input to bf16 whatever compute dtype the layer was given (so its compute is bf16 there, not
the float32 the loader asks for on a CPU); elsewhere it dequantizes the weight to the input's dtype and
calls torch's ``linear``. Measured on the 2-vCPU AMD EPYC (AVX-512 bf16, no AMX), one thread, an
nf4 576 -> 1536 layer (benchmarks/results/2026-12-05-cpu-precision_limits.md):

=========================  ==========  ===========
rows                       2 (a step)  2048 (scoring)
bitsandbytes' fused kernel  0.09 ms     25.9 ms
dequantize, bf16 GEMM       0.30 ms     18.5 ms (0.26 ms of it dequantizing)
dequantize, fp32 GEMM       0.32 ms     36.5 ms
=========================  ==========  ===========

Scoring runs thousands of rows per call, so :func:`dequantize_per_call` gives every 4-bit layer of a
model on such a CPU the second path at inference (autograd off): the same product as the fused kernel
(bf16 inputs and weights, float32 accumulation) up to rounding (the fused kernel rounds the block
scales to bf16 first), from weights that stay 4-bit in memory (one layer's bf16 copy lives during its
call), on the GEMM the bf16 throughput probe measures: on a CPU with AMX, oneDNN's bf16 GEMM runs on
the tile units, which the fused kernel does not use. A few-row call (a generation step) pays the
dequantization (0.2 ms a layer here). Training (autograd on) keeps bitsandbytes' own path, in float32.
"""

from __future__ import annotations

from typing import Any

COMPUTE = "bfloat16"  # the dtype 4-bit layers compute in at inference where dequantize_per_call applies


def native_bf16_cpu() -> bool:
    """Whether this CPU multiplies bf16 natively (``avx512_bf16`` or AMX), by its /proc/cpuinfo flags."""
    from ..measure.hardware import CPUINFO, FAST_FLAGS, isa_flags, read_text

    flags = isa_flags(read_text(CPUINFO))
    return any(flags.get(flag) for flag in FAST_FLAGS["bf16"])


def canary_precision(precision: str, device: str) -> str:
    """The kernel a precision's machine-speed canary times (measure/disturbance.make_canary): its own,
    except nf4/fp4 on a CPU with native bf16, which run a bf16 GEMM there (dequantize_per_call)."""
    if precision in ("nf4", "fp4") and not device.startswith("cuda"):
        return "bf16" if native_bf16_cpu() else precision
    return precision


class DequantizedForward:
    """The forward a 4-bit layer takes at inference: its weight dequantized to bf16 by bitsandbytes'
    own dequantization op, then ``torch.nn.functional.linear`` in bf16; the output in the input's dtype.
    With autograd on, or a weight in a layout this does not read (double-quantized block scales, or
    already repacked for the fused kernel), the layer's own forward runs."""

    def __init__(self, layer: Any) -> None:
        self.layer = layer
        self.own_forward = layer.forward

    def __call__(self, x: Any) -> Any:
        import torch

        layer = self.layer
        state = layer.weight.quant_state
        if torch.is_grad_enabled() or state.nested or getattr(state, "packing_format_for_cpu", False):
            return self.own_forward(x)
        weight = torch.ops.bitsandbytes.dequantize_4bit.default(
            layer.weight.data, state.absmax, state.blocksize, state.quant_type, state.shape, torch.bfloat16)
        bias = layer.bias.to(torch.bfloat16) if layer.bias is not None else None
        return torch.nn.functional.linear(x.to(torch.bfloat16), weight, bias).to(x.dtype)


def dequantize_per_call(model: Any) -> int:
    """Give every bitsandbytes 4-bit layer of a model on a CPU the :class:`DequantizedForward` at
    inference, where the CPU has native bf16; returns how many layers (0: nothing changed, the CPU has
    no native bf16 or the model no 4-bit layer). Their weights are kept in bitsandbytes' plain layout
    (its fused CPU kernel's repacking is turned off)."""
    if not native_bf16_cpu():
        return 0
    count = 0
    for module in model.modules():
        if type(module).__name__ not in ("Linear4bit", "LinearNF4", "LinearFP4"):
            continue
        if module.weight.device.type != "cpu" or isinstance(module.forward, DequantizedForward):
            continue
        module.support_avx512bf16_for_cpu = False  # bitsandbytes repacks only where this is set
        module.forward = DequantizedForward(module)
        count += 1
    return count
