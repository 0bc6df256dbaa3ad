"""How fast this device runs each precision, measured before a study starts.

A precision can be supported and still be impractically slow: on a CPU without native fp16 a
half-precision matmul runs through a scalar fallback an order of magnitude slower than fp32, so a
default study would spend most of its time, and its energy budget, on one config that says more
about the fallback than about the precision. The probe times one representative workload per
precision, the forward of one linear layer of a small model's MLP (a batch of tokens through a
[out, in] weight, as ``nn.Linear`` stores it):

- fp32, bf16, fp16: ``torch.nn.functional.linear`` in that dtype;
- int8, nf4, fp4: the forward of bitsandbytes' ``Linear8bitLt`` / ``Linear4bit`` (the layers a
  quantized model runs), when bitsandbytes imports; else the precision is left unmeasured with the
  reason;
- w8a8: the forward of this package's ``W8A8Linear`` (per-token activation quantization included).

Each probe runs for about ``min_time_s`` after one untimed warm-up call and reports GFLOP/s
(2·M·K·N floating-point operations per call). The numbers rank precisions on this device and feed
the time estimates of ``llm-energy plan``; they are not a benchmark of the models themselves.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from ..config import BITSANDBYTES_PRECISIONS, DeviceLimits

DENSE_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
QUANTIZED = BITSANDBYTES_PRECISIONS
REFERENCE = "fp32"
# A small model's MLP projection (tokens x hidden -> intermediate; SmolLM2-135M: 576 -> 1536).
PROBE_SHAPE = (256, 576, 1536)  # M, K, N
# One LoRA step's frozen projection: a batch of 8 examples of ~190 tokens (the default study's RCA
# prompts) through the same layer. At 256 tokens a 4-bit layer's per-call dequantization would weigh
# several times what it weighs in training.
TRAINING_PROBE_SHAPE = (1536, 576, 1536)  # M, K, N
PASSES = 3  # probe_device: interleaved passes over the precisions, the fastest of each kept
ROUNDS = 3  # the best of three rounds: other processes on a shared machine only ever slow a round down


@dataclass(frozen=True)
class PrecisionThroughput:
    """One precision's measured throughput on a device; gflop_per_s is None when not measured."""

    precision: str
    device: str
    gflop_per_s: float | None
    calls: int
    duration_s: float
    method: str
    reason: str = ""  # why it was not measured

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def _time_calls(call: Any, device: str, flops_per_call: float, min_time_s: float,
                clock: Any = time.perf_counter) -> tuple[float, int, float]:
    """GFLOP/s (best of ROUNDS rounds of at least min_time_s / ROUNDS each, after one warm-up call),
    calls and seconds in all."""
    call()
    _sync(device)
    best, total_calls, total_s = 0.0, 0, 0.0
    for _ in range(ROUNDS):
        calls, start, elapsed = 0, clock(), 0.0
        while elapsed < min_time_s / ROUNDS or calls == 0:
            call()
            calls += 1
            _sync(device)
            elapsed = clock() - start
        best = max(best, flops_per_call * calls / elapsed / 1e9)
        total_calls, total_s = total_calls + calls, total_s + elapsed
    return best, total_calls, total_s


def _quantized_linear(precision: str, k: int, n: int, device: str) -> Any:
    import bitsandbytes as bnb
    import torch

    dense = torch.nn.Linear(k, n, bias=False)
    if precision == "int8":
        layer = bnb.nn.Linear8bitLt(k, n, bias=False, has_fp16_weights=False, threshold=6.0)
    else:
        compute = torch.bfloat16 if device.startswith("cuda") else torch.float32
        # block scales kept in float32, as the loader keeps them (bnb_4bit_use_double_quant=False)
        layer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=compute, quant_type=precision,
                                  compress_statistics=False)
    layer.load_state_dict(dense.state_dict())
    layer = layer.to(device)  # the weights are quantized when they reach the device
    if precision != "int8" and device == "cpu":
        from ..models.fourbit import dequantize_per_call

        dequantize_per_call(layer)  # the inference path a loaded 4-bit model takes on this CPU
    return layer


def _time_layer(forward: Any, x: Any, device: str, flops: float, min_time_s: float,
                training: bool) -> tuple[float, int, float]:
    """_time_calls of ``forward(x)``: under inference_mode, as scoring runs a layer, or (``training``)
    forward then the input's backward, as LoRA training runs a frozen layer (twice the FLOPs)."""
    import torch

    if not training:
        with torch.inference_mode():  # as scoring runs (bitsandbytes 4-bit takes a faster CPU path there)
            return _time_calls(lambda: forward(x), device, flops, min_time_s)
    x = x.detach().requires_grad_()
    grad = torch.randn_like(forward(x).detach())

    def step() -> None:
        x.grad = None
        forward(x).backward(grad)

    return _time_calls(step, device, 2.0 * flops, min_time_s)


def probe_precision(precision: str, device: str, shape: tuple[int, int, int] = PROBE_SHAPE,
                    min_time_s: float = 0.25, training: bool = False) -> PrecisionThroughput:
    """Measure one precision's matmul throughput on the device (never raises for an unsupported
    precision: the result says why it was not measured). ``training``: the layer frozen, forward and
    the input's backward, as fine-tuning runs it (use TRAINING_PROBE_SHAPE)."""
    import torch

    m, k, n = shape
    flops = 2.0 * m * k * n
    mode = ", forward + input backward" if training else ""
    if precision in DENSE_DTYPES:
        dtype = getattr(torch, DENSE_DTYPES[precision])
        method = f"torch linear {DENSE_DTYPES[precision]} [{m}x{k}] -> {n}{mode}"
        try:
            x = torch.randn(m, k, device=device).to(dtype)
            # weight stored [out, in] as nn.Linear keeps it: on a CPU the kernel chosen depends on
            # that layout (fp16 a@b of row-major [in, out] can be ~10x slower than the model's path)
            weight = torch.randn(n, k, device=device).to(dtype)
            gflops, calls, seconds = _time_layer(lambda a: torch.nn.functional.linear(a, weight), x, device,
                                                 flops, min_time_s, training)
        except Exception as exc:  # noqa: BLE001  (e.g. a dtype this device has no kernel for)
            return PrecisionThroughput(precision, device, None, 0, 0.0, method,
                                       f"{type(exc).__name__}: {exc}")
        return PrecisionThroughput(precision, device, gflops, calls, seconds, method)
    if precision in QUANTIZED:
        kind = "Linear8bitLt" if precision == "int8" else f"Linear4bit {precision}"
        method = f"bitsandbytes {kind} forward [{m}x{k}] -> {n}{mode}"
        try:
            layer = _quantized_linear(precision, k, n, device).requires_grad_(False)
            if not training and type(layer.forward).__name__ == "DequantizedForward":
                method += " (dequantized per call, bf16 GEMM)"
        except ImportError as exc:
            return PrecisionThroughput(precision, device, None, 0, 0.0, method,
                                       f"bitsandbytes not importable: {exc}")
        except Exception as exc:  # noqa: BLE001  (a broken or backend-less build must not stop the study)
            return PrecisionThroughput(precision, device, None, 0, 0.0, method,
                                       f"{type(exc).__name__}: {exc}")
        # the input dtype a quantized model feeds these layers (models.py: fp16 for int8, bf16 for 4-bit on a
        # GPU)
        gpu_dtype = torch.float16 if precision == "int8" else torch.bfloat16
        x = torch.randn(m, k, device=device).to(gpu_dtype if device.startswith("cuda") else torch.float32)
        try:
            gflops, calls, seconds = _time_layer(layer, x, device, flops, min_time_s, training)
        except Exception as exc:  # noqa: BLE001  (a layer that quantized but cannot run here)
            return PrecisionThroughput(precision, device, None, 0, 0.0, method,
                                       f"{type(exc).__name__}: {exc}")
        return PrecisionThroughput(precision, device, gflops, calls, seconds, method)
    if precision == "w8a8":
        method = f"llm_energy W8A8Linear forward [{m}x{k}] -> {n}{mode}"
        try:
            from ..models.quant8 import W8A8Linear

            layer = W8A8Linear.from_linear(torch.nn.Linear(k, n, bias=False).to(device))
            x = torch.randn(m, k, device=device)
            gflops, calls, seconds = _time_layer(layer, x, device, flops, min_time_s, training)
        except Exception as exc:  # noqa: BLE001  (no int8 matmul on this device)
            return PrecisionThroughput(precision, device, None, 0, 0.0, method,
                                       f"{type(exc).__name__}: {exc}")
        return PrecisionThroughput(precision, device, gflops, calls, seconds, method)
    return PrecisionThroughput(precision, device, None, 0, 0.0, "", f"unknown precision {precision!r}")


@dataclass(frozen=True)
class ProbeRate:
    """The probed matmul rate a measured window is set beside (its ``limit_share``) and where it came
    from; gflop_per_s is None when there is none (``source`` says why)."""

    gflop_per_s: float | None
    source: str  # "study probe" | "probed in this job (no study probe)" | "not probed: <why>"

    def share(self, achieved_gflop_per_s: float | None) -> float | None:
        """Achieved over probed: how near the workload ran to this device's matmul rate."""
        if not self.gflop_per_s or achieved_gflop_per_s is None or math.isnan(achieved_gflop_per_s):
            return None
        return achieved_gflop_per_s / self.gflop_per_s


def study_probe_rate(probe: Mapping[str, Any], precision: str, device: str) -> ProbeRate | None:
    """A precision's rate in a study's stored probe (provenance.json "throughput"), or None when the
    probe is missing, measured another device or did not measure that precision."""
    if str(probe.get("device", "")) != device:
        return None
    rate = ((probe.get("precisions") or {}).get(precision) or {}).get("gflop_per_s")
    return ProbeRate(float(rate), "study probe") if rate else None


def probe_device(precisions: Iterable[str], device: str, min_time_s: float = 0.25,
                 training: bool = False) -> dict[str, PrecisionThroughput]:
    """Every requested precision's throughput, fp32 (the reference) always included; ``training``:
    forward and input backward at TRAINING_PROBE_SHAPE (see probe_precision)."""
    import torch

    wanted = [REFERENCE] + [p for p in dict.fromkeys(precisions) if p != REFERENCE]
    shape = TRAINING_PROBE_SHAPE if training else PROBE_SHAPE
    best: dict[str, PrecisionThroughput] = {}
    with torch.random.fork_rng(devices=[]):  # the study's own random streams stay untouched
        torch.manual_seed(0)
        # PASSES interleaved passes over the precisions, the fastest pass of each kept: a busy
        # stretch of a shared machine that slows one precision's turn (a precision skipped as slow
        # on one noisy reading) must last through every pass to count
        for _ in range(PASSES):
            for p in wanted:
                result = probe_precision(p, device, shape, min_time_s / PASSES, training)
                kept = best.get(p)
                if kept is None or (result.gflop_per_s or 0.0) > (kept.gflop_per_s or 0.0):
                    best[p] = result
            if all(best[p].gflop_per_s is None for p in wanted
                   if p != REFERENCE) and best[REFERENCE].gflop_per_s:
                break  # nothing else measurable here: no point in passing again
    return best


def slowdown(probe: Mapping[str, PrecisionThroughput], precision: str) -> float | None:
    """How many times slower than fp32 a precision ran (None when either was not measured)."""
    ref, this = probe.get(REFERENCE), probe.get(precision)
    if ref is None or this is None or not ref.gflop_per_s or not this.gflop_per_s:
        return None
    return ref.gflop_per_s / this.gflop_per_s


def device_words(device: str) -> str:
    return "this GPU" if device.startswith("cuda") else "this CPU"


def slow_precisions(probe: Mapping[str, PrecisionThroughput], limits: DeviceLimits,
                    training: bool = False) -> dict[str, str]:
    """Precisions the study skips on this device, with the measured reason: more than
    limits.max_slowdown times slower than fp32 (``training``: a training probe, see probe_device,
    against limits.max_training_slowdown), unless that limit is null or the precision is in
    limits.always_run. fp32 itself, and precisions the probe could not measure, are never skipped
    here (whether they can run at all is the loader's question)."""
    limit = limits.max_training_slowdown if training else limits.max_slowdown
    if limit is None:
        return {}
    name = "max_training_slowdown" if training else "max_slowdown"
    what = " training (forward + input backward)" if training else ""
    skipped = {}
    ref = probe.get(REFERENCE)
    for precision, result in probe.items():
        if precision == REFERENCE or precision in limits.always_run:
            continue
        factor = slowdown(probe, precision)
        if factor is None or factor <= limit:
            continue
        assert ref is not None and ref.gflop_per_s and result.gflop_per_s
        native = " (no native kernel for it here)" if precision in DENSE_DTYPES else ""
        skipped[precision] = (
            f"{precision}{what}: {result.gflop_per_s:.3g} GFLOP/s vs {ref.gflop_per_s:.3g} fp32 on "
            f"{device_words(result.device)}{native}, {factor:.1f}x slower, over device_limits.{name} "
            f"{limit:g}; to run it anyway list it in device_limits.always_run or set "
            f"{name}: null (`llm-energy plan` estimates its time)")
    return skipped
