"""Pruning of the linear layers inside the decoder blocks of a causal LM: magnitude and Wanda,
unstructured or N:M.

Only ``torch.nn.Linear`` modules whose names end with one of ``PruningSpec.include`` are pruned (for a
Llama: q/k/v/o_proj and gate/up/down_proj in ``model.model.layers[i]``); embeddings and ``lm_head``
stay dense unless their names are included. Pruning zeroes weights in place; shapes and dtypes do
not change, so the saving in energy comes only from kernels that exploit zeros (N:M on sparse
tensor cores) or from compressing the zeros later.

Conventions:

- ``sparsity`` is the fraction of weights set to zero.
- An N:M pattern ("2:4") keeps N weights out of every group of M consecutive weights along the input
  dimension (the columns of ``weight``, whose rows are output features) and zeroes the other M - N,
  as in NVIDIA's 2:4 sparsity. Its sparsity is (M - N) / M: 0.5 for 2:4 and for 4:8.
- Magnitude scores a weight by |W_ij|; unstructured magnitude pruning ranks all weights of a layer.
- Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models")
  scores a weight by |W_ij| * ||X_j||_2, the norm of input feature j over every calibration token.
  Unstructured Wanda ranks the weights of each output row separately, as in the paper.

The input norms come from one pass of the dense model over the calibration texts. The paper's
reference code instead re-runs each decoder block after pruning the blocks before it, so later blocks
see pruned inputs; the one-pass version is simpler and differs little at moderate sparsity.

Quantized (bitsandbytes) models are refused: prune the dense model, save it, then quantize it.
"""

from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Sequence

from ..config import DEFAULT_INCLUDE, PruningSpec
from ..items import QAItem, RCAItem, item_text

if TYPE_CHECKING:
    import torch

# bitsandbytes layers subclass nn.Linear, so they are recognised by class name (bitsandbytes itself
# need not be importable to refuse them).
QUANTIZED_LINEAR_CLASSES: tuple[str, ...] = ("Linear8bitLt", "Linear4bit", "LinearNF4", "LinearFP4",
                                             "W8A8Linear")

@dataclass(frozen=True)
class LayerSparsity:
    """Zeros in one layer's weight."""

    name: str  # module name, e.g. model.layers.0.self_attn.q_proj
    shape: tuple[int, ...]  # (out_features, in_features) for a Linear
    n_weights: int
    n_zero: int

    @property
    def measured_sparsity(self) -> float:
        return self.n_zero / self.n_weights if self.n_weights else 0.0


@dataclass(frozen=True)
class PruningResult:
    """What prune_model did: per-layer zero counts, the N:M check and how long it took."""

    spec: PruningSpec
    layers: tuple[LayerSparsity, ...]  # every pruned layer, in module order
    # True when every layer was checked to follow the N:M pattern; None if unstructured
    verified_nm: bool | None
    duration_s: float  # calibration and pruning, wall clock
    n_calibration_texts: int = 0  # texts run through the model (Wanda only)
    n_calibration_tokens: int = 0  # tokens over which the input norms were taken (Wanda only)

    @property
    def n_weights(self) -> int:
        return sum(layer.n_weights for layer in self.layers)

    @property
    def n_zero(self) -> int:
        return sum(layer.n_zero for layer in self.layers)

    @property
    def measured_sparsity(self) -> float:
        """Zeros over weights, all pruned layers together."""
        return self.n_zero / self.n_weights if self.n_weights else 0.0

    @property
    def target_sparsity(self) -> float:
        return float(self.spec.sparsity or 0.0)

    @property
    def pattern(self) -> str:
        return self.spec.pattern

    def as_rows(self, config_id: str) -> list[dict[str, Any]]:
        """One row per pruned layer, for a table (e.g. pandas.DataFrame(result.as_rows(cid)))."""
        return [
            {
                "config_id": config_id,
                "pruning": self.spec.label,
                "method": self.spec.method,
                "sparsity_pattern": self.pattern,
                "target_sparsity": self.target_sparsity,
                "layer": layer.name,
                "out_features": layer.shape[0],
                "in_features": layer.shape[1] if len(layer.shape) > 1 else 1,
                "n_weights": layer.n_weights,
                "n_zero": layer.n_zero,
                "measured_sparsity": layer.measured_sparsity,
                "verified_nm": self.verified_nm,
            }
            for layer in self.layers
        ]


# --------------------------------------------------------------------------------------------------
# Choosing layers


def is_quantized(module: Any) -> bool:
    """A bitsandbytes layer (recognised by class name: bitsandbytes need not be importable), or a
    W8A8 layer of this package (quant8.py)."""
    return any(cls.__name__ in QUANTIZED_LINEAR_CLASSES for cls in type(module).__mro__)


def _matches(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def _matching_modules(model: Any, include: Sequence[str]) -> list[tuple[str, Any]]:
    """Modules whose names end with an include suffix, in module order; every suffix must match."""
    import torch

    if not isinstance(model, torch.nn.Module):
        hint = " (pass loaded.model, not the LoadedModel)" if hasattr(model, "model") else ""
        raise TypeError(f"expected a torch.nn.Module{hint}; got {type(model).__name__}")
    found = [(name, module) for name, module in model.named_modules()
             if any(_matches(name, s) for s in include)]
    unmatched = [s for s in include if not any(_matches(name, s) for name, _ in found)]
    if unmatched:
        examples = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)][:3]
        raise ValueError(
            f"include suffix(es) {unmatched} match no module of the model; "
            f"Linear layers there are named like {examples}"
        )
    return found


def _layers_to_prune(model: Any, spec: PruningSpec) -> list[tuple[str, Any]]:
    import torch

    layers = _matching_modules(model, spec.include)
    quantized = [f"{name} ({type(m).__name__})" for name, m in model.named_modules() if is_quantized(m)]
    if quantized:
        raise ValueError(
            f"the model has bitsandbytes-quantized layers, e.g. {quantized[0]}; pruning needs dense weights: "
            "prune the dense model, then quantize (load it at fp32, bf16 or fp16)"
        )
    for name, module in layers:
        if not isinstance(module, torch.nn.Linear):
            raise ValueError(f"{name} ({type(module).__name__}) is not a torch.nn.Linear; only Linear layers "
                             "can be pruned")
        if not module.weight.dtype.is_floating_point:
            raise ValueError(f"{name} stores {module.weight.dtype} weights; pruning needs fp32, bf16 or fp16 "
                             "weights")
    nm = spec.nm
    if nm is not None:
        for name, module in layers:  # checked before anything is zeroed, so a refusal leaves the model intact
            if module.in_features % nm.group:
                raise ValueError(
                    f"{name} has weight shape {tuple(module.weight.shape)} (out, in): its input dimension "
                    f"{module.in_features} is not a multiple of M={nm.group} needed by pattern "
                    f"'{spec.pattern}'"
                )
    return layers


# --------------------------------------------------------------------------------------------------
# Calibration (Wanda)


def _collect_input_sq_sums(model: Any, layers: list[tuple[str, Any]], tokenizer: Any, texts: Sequence[str],
                           max_tokens: int) -> tuple[dict[str, "torch.Tensor"], int]:
    """Sum over all calibration tokens of x_j^2 for each input feature j of each layer, and the token
    count."""
    import torch

    # float64 sums over texts of any length: sqrt(sum) is the norm over all tokens at once.
    sums = {name: torch.zeros(module.in_features, dtype=torch.float64, device=module.weight.device)
            for name, module in layers}

    def hook_for(name: str):
        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = args[0] if args else kwargs["input"]
            sums[name] += x.detach().reshape(-1, x.shape[-1]).to(torch.float64).pow(2).sum(dim=0)
        return hook

    handles = [module.register_forward_pre_hook(hook_for(name), with_kwargs=True) for name, module in layers]
    device = next(model.parameters()).device
    was_training = model.training
    n_tokens = 0
    try:
        model.eval()  # no dropout in the activations
        for text in texts:
            # One text per forward pass: no padding tokens enter the norms.
            ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :max_tokens].to(device)
            if ids.shape[1] == 0:
                raise ValueError(f"calibration text {text[:40]!r} tokenizes to no tokens")
            model(input_ids=ids)
            n_tokens += int(ids.shape[1])
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    silent = [name for name, total in sums.items() if not bool(total.any())]
    if silent:
        raise RuntimeError(
            f"layer(s) {silent[:3]} saw no nonzero calibration input; are they on the model's forward path?"
        )
    return sums, n_tokens


def _calibration_subset(calibration: Sequence[str] | None, tokenizer: Any, spec: PruningSpec) -> list[str]:
    if calibration is None or tokenizer is None:
        raise ValueError(
            "wanda needs calibration texts and the model's tokenizer: "
            "prune_model(model, spec, calibration=texts, tokenizer=tokenizer) "
            "(calibration_texts(items, n, seed) draws texts from a training split)"
        )
    if isinstance(calibration, str) or not all(isinstance(t, str) and t.strip() for t in calibration):
        raise ValueError("calibration must be a sequence of non-empty texts (a list of str, not one str)")
    if len(calibration) < spec.calibration_samples:
        raise ValueError(
            f"the spec asks for {spec.calibration_samples} calibration texts but {len(calibration)} were "
            "given (give more texts or lower calibration_samples)"
        )
    keep = sorted(random.Random(spec.seed).sample(range(len(calibration)), spec.calibration_samples))
    return [calibration[i] for i in keep]


# --------------------------------------------------------------------------------------------------
# Masks (True = keep). Ties are broken by position through stable sorts, so masks are reproducible.


def _keep_lowest_zeroed(scores: "torch.Tensor", n_zeroed: int, dim: int) -> "torch.Tensor":
    """Zero the n_zeroed lowest scores along dim (each slice separately)."""
    import torch

    order = torch.sort(scores, dim=dim, stable=True).indices
    keep = torch.ones_like(scores, dtype=torch.bool)
    return keep.scatter_(dim, order.narrow(dim, 0, n_zeroed), False)


def _keep_mask(scores: "torch.Tensor", spec: PruningSpec) -> "torch.Tensor":
    n_out, n_in = scores.shape
    nm = spec.nm
    if nm is not None:
        grouped = scores.reshape(n_out, n_in // nm.group, nm.group)
        return _keep_lowest_zeroed(grouped, nm.zeroed, dim=-1).reshape(n_out, n_in)
    sparsity = float(spec.sparsity or 0.0)
    if spec.method == "wanda":  # the paper compares weights within each output row
        return _keep_lowest_zeroed(scores, round(sparsity * n_in), dim=1)
    flat = scores.reshape(-1)
    return _keep_lowest_zeroed(flat, round(sparsity * flat.numel()), dim=0).reshape(n_out, n_in)


def _scores(weight: "torch.Tensor", input_sq_sum: "torch.Tensor | None") -> "torch.Tensor":
    import torch

    scores = weight.detach().to(torch.float32).abs()  # float32 even for bf16/fp16 weights
    if input_sq_sum is not None:
        scores = scores * input_sq_sum.sqrt().to(torch.float32).unsqueeze(0)
    return scores


# --------------------------------------------------------------------------------------------------
# Public functions


def verify_nm(weight: "torch.Tensor", n: int, m: int) -> bool:
    """Whether every group of m consecutive weights along the input dim (columns) has at least m - n zeros,
    i.e. at most n nonzeros."""
    if weight.dim() != 2:
        raise ValueError(f"verify_nm expects a 2-D weight (out, in); got shape {tuple(weight.shape)}")
    if not 0 < n < m:
        raise ValueError(f"verify_nm needs 0 < n < m (n nonzeros allowed per group of m); got n={n}, m={m}")
    if weight.shape[1] % m:
        raise ValueError(f"weight shape {tuple(weight.shape)}: input dimension {weight.shape[1]} is not a "
                         f"multiple of m={m}")
    zeros_per_group = (weight.reshape(weight.shape[0], -1, m) == 0).sum(dim=-1)
    return bool((zeros_per_group >= m - n).all())


def _dense_weight(module: Any) -> "torch.Tensor":
    """A weight whose zeros are the layer's zeros, for quantized layers too."""
    module = getattr(module, "base_layer", module)  # a LoRA-wrapped layer: its frozen weight
    if hasattr(module, "weight_int8"):  # W8A8: zero codes are exactly the zero weights
        return module.dequantized_weight()
    weight = module.weight
    if any(cls.__name__ == "Linear4bit" for cls in type(module).__mro__) and getattr(weight, "quant_state",
                                                                                     None):
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, weight.quant_state)
    # int8 (LLM.int8) codes are zero exactly where the dequantized weight is zero.
    return weight.data


def dequantized_weight(module: Any) -> "torch.Tensor":
    """The real-valued weight of a layer in float32: a bitsandbytes 4-bit or LLM.int8 layer
    dequantized, any other layer's weight as it is."""
    module = getattr(module, "base_layer", module)
    if hasattr(module, "weight_int8"):  # W8A8 (quant8.py)
        return module.dequantized_weight().detach().float()
    if is_quantized(module):
        from peft.utils.integrations import dequantize_module_weight

        return dequantize_module_weight(module).detach().float()
    return module.weight.detach().float()


@dataclass(frozen=True)
class LayerCheck:
    """A pruned layer looked at again after a round trip (quantization, or recovery training)."""

    name: str
    measured_sparsity: float
    verified_nm: bool | None  # None for unstructured pruning


def check_pruned(model: Any, outcome: PruningResult) -> list[LayerCheck]:
    """Measure again, in ``model`` (quantized, or carrying a recovery adapter), every layer that
    ``outcome`` pruned: its sparsity and, for N:M, the exact pattern. Layers are found by the end of
    their names, so a model wrapped by peft is checked too."""
    modules = dict(model.named_modules())
    nm = outcome.spec.nm
    checks = []
    for layer in outcome.layers:
        found = [m for n, m in modules.items() if n == layer.name or n.endswith("." + layer.name)]
        if not found:
            raise ValueError(f"layer {layer.name} pruned earlier is not in this model")
        weight = _dense_weight(found[0])
        zero = int((weight == 0).sum())
        verified = verify_nm(weight.reshape(layer.shape), nm.kept, nm.group) if nm is not None else None
        checks.append(LayerCheck(layer.name, zero / weight.numel(), verified))
    return checks


def measure_sparsity(model: Any, include: Sequence[str] = DEFAULT_INCLUDE) -> dict[str, LayerSparsity]:
    """Zeros of every module whose name ends with an include suffix: {module name: LayerSparsity}.

    Works on any model, quantized ones included (4-bit weights are dequantized to count). Overall
    sparsity: sum(l.n_zero for l in layers.values()) / sum(l.n_weights for l in layers.values()).
    """
    import torch

    out: dict[str, LayerSparsity] = {}
    with torch.no_grad():
        for name, module in _matching_modules(model, tuple(include)):
            if not isinstance(getattr(module, "weight", getattr(module, "weight_int8", None)), torch.Tensor):
                continue  # a container (e.g. 'mlp') has no weight of its own
            weight = _dense_weight(module)
            out[name] = LayerSparsity(name, tuple(weight.shape), weight.numel(), int((weight == 0).sum()))
    return out


def prune_model(model: Any, spec: PruningSpec, calibration: Sequence[str] | None = None,
                tokenizer: Any = None,
                step: Callable[[str], ContextManager[Any]] | None = None) -> PruningResult:
    """Prune the included Linear layers of a model in place and report the zeros per layer.

    Wanda needs ``calibration`` texts (at least ``spec.calibration_samples``) and the model's
    ``tokenizer``; magnitude ignores both. Raises ValueError, before changing any weight, for a
    quantized model, an include suffix that matches nothing, or an N:M group size that does not
    divide a layer's input dimension. ``step(name)`` wraps each step ("calibration" for Wanda's
    forward passes, "prune" for scoring and masking the weights), e.g. in a measured energy window.
    """
    import torch

    step = step or (lambda name: contextlib.nullcontext())

    if not isinstance(spec, PruningSpec):
        raise TypeError(f"spec must be a PruningSpec; got {type(spec).__name__}")
    start = time.perf_counter()
    layers = _layers_to_prune(model, spec)
    texts: list[str] = []
    n_tokens = 0
    sq_sums: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        if spec.method == "wanda":
            texts = _calibration_subset(calibration, tokenizer, spec)
            with step("calibration"):
                sq_sums, n_tokens = _collect_input_sq_sums(model, layers, tokenizer, texts,
                                                           spec.calibration_max_tokens)
        with step("prune"):
            for name, module in layers:
                keep = _keep_mask(_scores(module.weight, sq_sums.get(name)), spec)
                module.weight.data.mul_(keep.to(module.weight.dtype))
    verified: bool | None = None
    nm = spec.nm
    if nm is not None:
        broken = [name for name, module in layers if not verify_nm(module.weight.data, nm.kept, nm.group)]
        if broken:
            raise RuntimeError(f"N:M check failed after pruning to '{spec.pattern}' in {broken[:3]} (a bug)")
        verified = True
    counts = measure_sparsity(model, spec.include)
    pruned = tuple(counts[name] for name, _ in layers)
    return PruningResult(
        spec=spec,
        layers=pruned,
        verified_nm=verified,
        duration_s=time.perf_counter() - start,
        n_calibration_texts=len(texts),
        n_calibration_tokens=n_tokens,
    )


def calibration_texts(task_data_items: Sequence[Any], n: int, seed: int = 0) -> list[str]:
    """A seeded sample of n texts (in the items' order): RCA tickets, or QA questions with their choices."""
    items = list(task_data_items)
    wrong = [type(i).__name__ for i in items if not isinstance(i, (RCAItem, QAItem))]
    if wrong:
        raise TypeError(f"expected RCAItem or QAItem items (TaskData.items); got {wrong[0]}")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive integer; got {n!r}")
    if n > len(items):
        raise ValueError(f"asked for {n} calibration texts but only {len(items)} items were given")
    keep = sorted(random.Random(seed).sample(range(len(items)), n))
    return [item_text(items[i]) for i in keep]
