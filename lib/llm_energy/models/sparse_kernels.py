"""Running 2:4 pruned linear layers through sparse tensor-core kernels (cuSPARSELt), only where it pays.

Zeros in a weight matrix save nothing unless a kernel skips them. On CUDA (compute capability 8.0
or newer) cuSPARSELt multiplies a 2:4 compressed weight with a dense activation. Whether that is
faster than the dense GEMM depends on the shape: on an H100 it wins only for large matrices with
many tokens (see ../shared/notes/h100-measurements.md: 1.5x for 8192x8192 at 8192 tokens, but
0.1x for 2048x2048 and for any decode-sized token count). Converting every layer of a model with
``torch.sparse.to_sparse_semi_structured`` therefore makes a small model slower, for four reasons
this module addresses one by one:

1. shapes that lose: ``plan`` times dense against sparse for each distinct layer shape at the
   token count the workload uses and converts only the shapes that win by ``min_speedup``;
2. the default algorithm: ``plan`` asks cuSPARSELt to search its algorithms (``alg_id``) per shape;
3. per-call overhead: the tensor subclass reaches the kernel through ``__torch_dispatch__`` and a
   Python custom op on every call; ``Sparse24Linear`` calls ``torch._cslt_sparse_mm`` directly, with
   the activation passed as a column-major view and the result asked for transposed (row-major),
   so no copy is made either way;
4. small token counts (decode): each converted layer keeps its dense weight and runs the dense
   kernel below the token count where sparse was measured to win.

On a CPU there is no such kernel: pruned models run dense there (the report says so).

The kernel calls go through a small backend object so that the module's plumbing (reshapes,
padding, bias, dispatch on token count, call counts) is tested on CPU with a reference backend;
the cuSPARSELt backend itself runs only on a GPU.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

# cuSPARSELt pads the dense operand's token dimension to a multiple of this for fp16/bf16.
TOKEN_MULTIPLE = 8
# Both weight dimensions must be multiples of this for fp16/bf16 2:4 compression.
WEIGHT_MULTIPLE = 16
# A sparse kernel's name, as the profiler reports it: cuSPARSELt's on Ampere ("sm80_xmma_sparse_gemm_...",
# "..._sptensor16x8x32_...") and on Hopper (CUTLASS 3 style: "sm90_xmma_sparse_...", "..._sptensorop_...",
# "..._spgemm_...", "gmma_sp..."), and PyTorch's own wrappers ("_cslt_sparse_mm", "cusparseLt").
SPARSE_KERNEL_PATTERN = re.compile(r"sparse|cusparselt|cslt|spmma|sp_?gemm|sptensor|gmma_?sp|xmma_sp",
                                   re.IGNORECASE)


# --------------------------------------------------------------------------------------------------
# Where sparse kernels can run


def support_reason(device: Any, dtype: Any = None) -> str | None:
    """None when 2:4 sparse kernels can run on ``device`` at ``dtype``, else why not (one sentence)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return (f"no sparse kernel on {device.type}: 2:4 pruned weights run through dense kernels, "
                "so energy is not expected to fall")
    if not torch.cuda.is_available():
        return "CUDA was requested but no CUDA GPU is visible"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"compute capability {major}.{minor}: 2:4 sparse tensor cores need 8.0 or newer"
    if not torch.backends.cusparselt.is_available():
        return "this PyTorch build has no cuSPARSELt"
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
        return f"2:4 sparse kernels run fp16 and bf16 here, not {str(dtype).replace('torch.', '')}"
    return None


# --------------------------------------------------------------------------------------------------
# Kernel backends


class CusparseltBackend:
    """cuSPARSELt through PyTorch's private ops (``torch._cslt_*``)."""

    name = "cusparselt"

    def compress(self, weight: Any) -> Any:
        import torch

        return torch._cslt_compress(weight.contiguous())

    def matmul(self, packed: Any, x2d: Any, bias: Any, alg_id: int) -> Any:
        """x2d (tokens, in), row-major -> (tokens, out), row-major.

        ``x2d.t()`` is a column-major (in, tokens) view: no copy. With ``transpose_result`` the
        library writes W·xᵀ transposed, i.e. x·Wᵀ in row-major order, again without a copy.
        """
        import torch

        return torch._cslt_sparse_mm(packed, x2d.t(), bias=bias, transpose_result=True, alg_id=alg_id)

    def search(self, packed: Any, x2d: Any, bias: Any) -> int:
        import torch

        return int(torch._cslt_sparse_mm_search(packed, x2d.t(), bias=bias, transpose_result=True))


class ReferenceBackend:
    """The same contract computed densely (for tests and for checking outputs on any device)."""

    name = "reference"

    def compress(self, weight: Any) -> Any:
        return weight.detach().clone()

    def matmul(self, packed: Any, x2d: Any, bias: Any, alg_id: int) -> Any:
        import torch.nn.functional as F

        return F.linear(x2d, packed, bias)

    def search(self, packed: Any, x2d: Any, bias: Any) -> int:
        return 0


# --------------------------------------------------------------------------------------------------
# The layer


class Sparse24Linear(torch.nn.Module):
    """A linear layer whose 2:4 weight runs through a sparse kernel at ``min_tokens`` tokens or more.

    Below ``min_tokens`` (decode, small batches) the dense weight runs the dense kernel, because
    there the sparse kernel is slower; ``keep_dense=False`` drops the dense copy (less memory) and
    pads small inputs instead. ``sparse_calls``/``dense_calls`` count which path ran.
    """

    def __init__(self, linear: Any, backend: Any = None, alg_id: int = 0, min_tokens: int = 1,
                 keep_dense: bool = True):
        super().__init__()
        weight = linear.weight.detach()
        out_features, in_features = weight.shape
        if out_features % WEIGHT_MULTIPLE or in_features % WEIGHT_MULTIPLE:
            raise ValueError(f"a {out_features}x{in_features} weight cannot be compressed 2:4: both "
                             f"dimensions must be multiples of {WEIGHT_MULTIPLE}")
        self.in_features = in_features
        self.out_features = out_features
        self.backend = backend or CusparseltBackend()
        self.alg_id = int(alg_id)
        self.min_tokens = max(1, int(min_tokens))
        self.register_buffer("packed", self.backend.compress(weight), persistent=False)
        self.weight = linear.weight if keep_dense else None
        self.bias = linear.bias
        self.sparse_calls = 0
        self.dense_calls = 0

    def forward(self, x: Any) -> Any:
        import torch.nn.functional as F

        lead = x.shape[:-1]
        x2d = x.reshape(-1, self.in_features)
        tokens = x2d.shape[0]
        if tokens < self.min_tokens and self.weight is not None:
            self.dense_calls += 1
            return F.linear(x, self.weight, self.bias)
        self.sparse_calls += 1
        pad = (-tokens) % TOKEN_MULTIPLE
        if pad:
            x2d = F.pad(x2d, (0, 0, 0, pad))
        if not x2d.is_contiguous():
            x2d = x2d.contiguous()
        out = self.backend.matmul(self.packed, x2d, self.bias, self.alg_id)
        if pad:
            out = out[:tokens]
        return out.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"backend={self.backend.name}, alg_id={self.alg_id}, min_tokens={self.min_tokens}, "
                f"dense_copy={self.weight is not None}")


# --------------------------------------------------------------------------------------------------
# Which layers to convert


@dataclass
class ShapeTiming:
    """Dense against sparse for one weight shape at one token count (seconds per call)."""

    out_features: int
    in_features: int
    tokens: int
    dense_s: float
    sparse_s: float
    alg_id: int = 0
    sparse_default_alg_s: float | None = None

    @property
    def speedup(self) -> float:
        return self.dense_s / self.sparse_s if self.sparse_s > 0 else 0.0


@dataclass
class ShapePlan:
    out_features: int
    in_features: int
    layers: list[str]
    convert: bool
    alg_id: int
    min_tokens: int
    best_speedup: float
    reason: str
    timings: list[ShapeTiming] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        return {"shape": f"{self.out_features}x{self.in_features}", "layers": len(self.layers),
                "convert": self.convert, "alg_id": self.alg_id, "min_tokens": self.min_tokens,
                "best_speedup": round(self.best_speedup, 3), "reason": self.reason}


def candidate_layers(model: Any, include: Sequence[str] | None = None) -> dict[tuple[int, int], list[str]]:
    """Plain linear layers whose weights are exactly 2:4 and compressible, grouped by (out, in)."""
    import torch

    from ..methods.sparsify import verify_nm

    groups: dict[tuple[int, int], list[str]] = {}
    for name, module in model.named_modules():
        if type(module) is not torch.nn.Linear:
            continue
        if include is not None and not any(name == s or name.endswith("." + s) for s in include):
            continue
        out_features, in_features = module.weight.shape
        if out_features % WEIGHT_MULTIPLE or in_features % WEIGHT_MULTIPLE:
            continue
        if not verify_nm(module.weight.detach(), 2, 4):
            continue
        groups.setdefault((out_features, in_features), []).append(name)
    return groups


def plan_from_timings(groups: dict[tuple[int, int], list[str]], timings: Iterable[ShapeTiming],
                      min_speedup: float = 1.05) -> list[ShapePlan]:
    """Convert a shape when sparse beats dense by ``min_speedup`` at some measured token count;
    it then runs sparse from the smallest such count up (and dense below it)."""
    by_shape: dict[tuple[int, int], list[ShapeTiming]] = {}
    for t in timings:
        by_shape.setdefault((t.out_features, t.in_features), []).append(t)
    plans = []
    for shape, layers in sorted(groups.items()):
        measured = sorted(by_shape.get(shape, []), key=lambda t: t.tokens)
        if not measured:
            plans.append(ShapePlan(*shape, layers, False, 0, 0, 0.0, "not measured"))
            continue
        best = max(measured, key=lambda t: t.speedup)
        winning = [t for t in measured if t.speedup >= min_speedup]
        # Sparse must keep winning above the crossover: take the smallest count from which every
        # larger measured count also wins.
        start = None
        for i, t in enumerate(measured):
            if all(u.speedup >= min_speedup for u in measured[i:]):
                start = t
                break
        if start is None:
            reason = (f"dense is faster or within {min_speedup:.2f}x at every measured token count "
                      f"(best {best.speedup:.2f}x at {best.tokens} tokens)")
            plans.append(ShapePlan(*shape, layers, False, 0, 0, best.speedup, reason, measured))
            continue
        alg = max(winning, key=lambda t: t.tokens).alg_id
        reason = (f"sparse {best.speedup:.2f}x faster at {best.tokens} tokens; sparse from {start.tokens} "
                  "tokens up")
        plans.append(ShapePlan(*shape, layers, True, alg, start.tokens, best.speedup, reason, measured))
    return plans


def wall_time(fn: Callable[[], Any], iters: int, warmup: int) -> float:
    """Seconds per call by the wall clock (CPU work; for a GPU use the default CUDA-event timer)."""
    import time

    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def _cuda_time(fn: Callable[[], Any], iters: int, warmup: int) -> float:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / 1e3 / iters


def time_shape(weight: Any, tokens: int, backend: Any = None, iters: int = 20, warmup: int = 5,
               bias: Any = None, timer: Callable[[Callable[[], Any], int, int],
                                                 float] = _cuda_time) -> ShapeTiming:
    """Time the dense GEMM and the sparse kernel (default and searched algorithm) for one weight."""
    import torch
    import torch.nn.functional as F

    backend = backend or CusparseltBackend()
    out_features, in_features = weight.shape
    gen = torch.Generator(device=weight.device).manual_seed(0)
    x = torch.randn(tokens, in_features, device=weight.device, dtype=weight.dtype, generator=gen)
    packed = backend.compress(weight)
    dense_s = timer(lambda: F.linear(x, weight, bias), iters, warmup)
    default_s = timer(lambda: backend.matmul(packed, x, bias, 0), iters, warmup)
    # The search is an optimisation: whatever it raises (RuntimeError, NotImplementedError, an
    # AcceleratorError on some builds), the default algorithm still runs.
    try:
        alg = backend.search(packed, x, bias)
    except Exception:  # noqa: BLE001
        alg = 0
    sparse_s = default_s if alg == 0 else timer(lambda: backend.matmul(packed, x, bias, alg), iters, warmup)
    if sparse_s > default_s:  # the search is a heuristic; keep what was measured faster
        alg, sparse_s = 0, default_s
    return ShapeTiming(out_features, in_features, tokens, dense_s, sparse_s, alg, default_s)


def plan(model: Any, token_counts: Sequence[int], min_speedup: float = 1.05, backend: Any = None,
         include: Sequence[str] | None = None, iters: int = 20, warmup: int = 5,
         timer: Callable[[Callable[[], Any], int, int], float] | None = None) -> list[ShapePlan]:
    """Measure every 2:4 layer shape of ``model`` at each token count and decide what to convert.
    ``timer(fn, iters, warmup)`` returns seconds per call (default: CUDA events)."""
    groups = candidate_layers(model, include)
    modules = dict(model.named_modules())
    timings = []
    for shape, names in sorted(groups.items()):
        first = modules[names[0]]
        for tokens in sorted(set(int(t) for t in token_counts)):
            tokens += (-tokens) % TOKEN_MULTIPLE
            timings.append(time_shape(first.weight.detach(), tokens, backend, iters, warmup, first.bias,
                                      timer=timer or _cuda_time))
    return plan_from_timings(groups, timings, min_speedup)


def _set_module(model: Any, name: str, module: Any) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def apply(model: Any, plans: Sequence[ShapePlan], backend: Any = None, keep_dense: bool = True) -> list[str]:
    """Swap the planned layers for ``Sparse24Linear``; returns the converted layer names."""
    backend = backend or CusparseltBackend()
    converted = []
    for p in plans:
        if not p.convert:
            continue
        for name in p.layers:
            linear = model.get_submodule(name)
            _set_module(model, name, Sparse24Linear(linear, backend, p.alg_id, p.min_tokens, keep_dense))
            converted.append(name)
    return converted


def revert(model: Any) -> list[str]:
    """Swap every ``Sparse24Linear`` back to a plain linear layer (needs the dense copy)."""
    reverted = []
    for name, module in list(model.named_modules()):
        if isinstance(module, Sparse24Linear):
            if module.weight is None:
                raise ValueError(f"{name} kept no dense weight (keep_dense=False): it cannot be reverted")
            linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                     device=module.weight.device, dtype=module.weight.dtype)
            linear.weight = module.weight
            if module.bias is not None:
                linear.bias = module.bias
            _set_module(model, name, linear)
            reverted.append(name)
    return reverted


@dataclass
class Verification:
    """Outputs of the converted model against the same weights through dense kernels."""

    ok: bool
    rel_l2: float
    top1_agreement: float
    sparse_calls: int
    sparse_kernels: list[str]
    reason: str


def convert_and_verify(model: Any, plans: Sequence[ShapePlan], forward: Callable[[], Any],
                       backend: Any = None, tolerance: float = 2e-2,
                       check_kernels: bool = True) -> tuple[list[str], Verification]:
    """Apply ``plans``, run ``forward`` (a probe large enough for the sparse path) before and after,
    and keep the conversion only if the outputs match within ``tolerance`` (relative L2), the sparse
    path ran and (``check_kernels``, CUDA) the profiler saw a sparse kernel; otherwise revert to the
    dense layers and say why."""
    reference = forward()
    converted = apply(model, plans, backend)
    if not converted:
        return [], Verification(True, 0.0, 1.0, 0, [], "nothing converted")
    reset_counts(model)
    kernels = kernels_run(forward) if check_kernels else {}
    reset_counts(model)
    check = compare_outputs(reference, forward())
    calls = call_counts(model)["sparse_calls"]
    seen = sparse_kernel_names(kernels)
    problems = []
    if not check["rel_l2"] <= tolerance:
        problems.append(f"outputs differ from the dense model by {check['rel_l2']:.2e} (relative L2 > "
                        f"{tolerance:g})")
    if calls == 0:
        problems.append("the probe never reached the sparse path")
    if check_kernels and not seen:
        problems.append("the profiler saw no sparse kernel (top: " + ", ".join(list(kernels)[:3]) + ")")
    if problems:
        revert(model)
        return ([], Verification(False, check["rel_l2"], check["top1_agreement"], calls, seen,
                                 "; ".join(problems)))
    return converted, Verification(True, check["rel_l2"], check["top1_agreement"], calls, seen,
                                   f"outputs match dense (relative L2 {check['rel_l2']:.1e}); "
                                   f"sparse kernel: {seen[0][:60] if seen else 'not checked'}")


def call_counts(model: Any) -> dict[str, int]:
    """How many forward calls went through the sparse and the dense path of converted layers."""
    sparse = dense = layers = 0
    for module in model.modules():
        if isinstance(module, Sparse24Linear):
            layers += 1
            sparse += module.sparse_calls
            dense += module.dense_calls
    return {"layers": layers, "sparse_calls": sparse, "dense_calls": dense}


def reset_counts(model: Any) -> None:
    for module in model.modules():
        if isinstance(module, Sparse24Linear):
            module.sparse_calls = module.dense_calls = 0


def kernels_run(fn: Callable[[], Any]) -> dict[str, float]:
    """CUDA kernel names and their total time (ms) while ``fn`` runs, from the PyTorch profiler."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    totals: dict[str, float] = {}
    for event in prof.events():
        if getattr(event, "device_type", None) == torch.autograd.DeviceType.CUDA:
            totals[event.name] = totals.get(event.name, 0.0) + event.device_time_total / 1e3
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def sparse_kernel_names(kernels: dict[str, float]) -> list[str]:
    return [name for name in kernels if SPARSE_KERNEL_PATTERN.search(name)]


def compare_outputs(reference: Any, candidate: Any) -> dict[str, float]:
    """Relative L2 error and top-1 agreement of two logit tensors (candidate against reference)."""
    import torch

    ref = reference.float()
    cand = candidate.float()
    rel = (torch.linalg.vector_norm(cand - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-12)).item()
    top1 = (cand.argmax(-1) == ref.argmax(-1)).float().mean().item()
    return {"rel_l2": rel, "top1_agreement": top1, "max_abs": (cand - ref).abs().max().item()}


def plan_rows(plans: Sequence[ShapePlan]) -> list[dict[str, Any]]:
    rows = []
    for p in plans:
        for t in p.timings:
            rows.append({**p.row(), "tokens": t.tokens, "dense_ms": t.dense_s * 1e3,
                         "sparse_ms": t.sparse_s * 1e3,
                         "sparse_default_alg_ms": None if t.sparse_default_alg_s is None
                         else t.sparse_default_alg_s * 1e3, "searched_alg_id": t.alg_id,
                         "speedup": t.speedup})
        if not p.timings:
            rows.append({**p.row(), "tokens": None, "dense_ms": None, "sparse_ms": None,
                         "sparse_default_alg_ms": None, "searched_alg_id": None, "speedup": None})
    return rows
