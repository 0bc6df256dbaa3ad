"""The pruning phase (notebook ``04_pruning``): one method and pattern on one config, the measured
sparsity next to the target, the kernels the pruned layers will run, then the same evaluation and
measurement as the inference phase.

The algorithms (magnitude, Wanda; unstructured, N:M) are :mod:`llm_energy.methods.sparsify`; the cuSPARSELt
layers are :mod:`llm_energy.models.sparse_kernels`. Zeros save energy only where a kernel skips them: on a CPU
no sparse kernel exists, so pruned models run dense there, and :func:`sparse_execution` says why.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from ..config import (
    BITSANDBYTES_PRECISIONS,
    DENSE_PRECISIONS,
    PruningSpec,
    RecoverySettings,
    validate_section,
)
from ..layout import RECOVERED_SUFFIX, StudyLayout, config_id_for
from ..measure.meter import EnergyMeter, EnergyRecord
from ..methods.lora_training import FINETUNE_PRECISIONS, finetune, load_adapter
from ..methods.scoring import ScoringPath
from ..methods.sparsify import (
    LayerCheck,
    PruningResult,
    calibration_texts,
    check_pruned,
    dequantized_weight,
    is_quantized,
    prune_model,
)
from ..models.loading import LoadedModel, load_model
from ..report import figures
from ..tables.rows import record_config, record_pruned_layers, record_setup_steps, record_training
from . import reuse
from .evaluation import ConfigRun, data_description, evaluate_config, full_split, probe_rate, training_splits

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def parameters(run: ConfigRun, pruning_section: dict, config_id: str = "",
               recover_section: dict | None = None) -> tuple[ConfigRun, PruningSpec, RecoverySettings | None]:
    """The notebook's `pruning` parameter as a spec, its `recover` parameter (empty: no recovery), and
    the run's config id: ``config_id`` when the runner gave one, else <model>__<precision>__<label>."""
    spec = PruningSpec(**pruning_section)
    recovery = validate_section(RecoverySettings, recover_section, "recover") if recover_section else None
    run = run.with_config_id(config_id or config_id_for(run.model.name, run.precision, pruning=spec.label))
    return run, spec, recovery


def calibration(run: ConfigRun, spec: PruningSpec) -> list[str]:
    """Calibration texts (Wanda) from the training split of every task, a seeded sample of each."""
    texts: list[str] = []
    for name, settings in run.tasks.enabled().items():
        train = full_split(name, settings, "train", run.base_dir)
        texts += calibration_texts(train.items, min(spec.calibration_samples, len(train)), seed=run.seed)
    return texts


@dataclass
class PrunedModel:
    """A pruned config ready to evaluate: the model at the run's precision, what pruning measured on
    the dense weights, the same layers checked again after quantization (empty when the run's
    precision is dense, so nothing changed after pruning), and the measured energy of each setup step
    (empty without a meter)."""

    loaded: LoadedModel
    outcome: PruningResult
    after_quantization: list[LayerCheck]
    setup: list[tuple[str, EnergyRecord]] = field(default_factory=list)


# What each setup step of a pruned config is, in the order they run (tables/setup_energy.csv).
SETUP_STEPS: dict[str, str] = {
    "load": "loading the dense weights (and, for a fine-tuned target, its quantized base dequantized and the "
            "adapter merged)",
    "calibration": "Wanda's calibration forward passes (input norms of every pruned layer)",
    "prune": "scoring and masking the weights",
    "quantize": "saving the pruned weights and loading them back at the run's precision, every layer checked",
}


def prune(run: ConfigRun, spec: PruningSpec, texts: list[str], adapter_dir: str = "",
          meter: EnergyMeter | None = None) -> PrunedModel:
    """Prune the config's dense weights, then load them at the run's precision.

    A fine-tuned config (``adapter_dir``) is pruned after its LoRA adapter is merged into the weights:
    at fp32/bf16/fp16 directly; at int8/nf4/fp4 the quantized base is dequantized first (the adapter
    was trained on it), merged and pruned in fp32, then quantized back to the run's precision. After
    quantization every pruned layer is measured again, so a pattern the quantizer broke is caught.
    With a ``meter`` (see :func:`~llm_energy.phases.evaluation.setup_meter`) each step of
    :data:`SETUP_STEPS` that runs is one measured window: what making this config cost
    (``PrunedModel.setup``; :func:`record` writes it to setup_energy.csv).
    """
    setup: list[tuple[str, EnergyRecord]] = []

    @contextlib.contextmanager
    def step(name: str) -> Iterator[None]:
        if meter is None:
            yield
            return
        with meter.window(f"setup:{name}") as handle:
            yield
        setup.append((name, handle.record))

    dense_precision = run.precision if run.precision in DENSE_PRECISIONS else "fp32"
    with step("load"):
        dense = load_model(run.model, dense_precision, run.device, base_dir=run.base_dir)
        origin = dense.weights_origin
        if adapter_dir:
            if dense_precision != run.precision:  # the adapter was trained on the quantized base
                quantized_base = load_model(run.model, run.precision, run.device, base_dir=run.base_dir)
                copied = _copy_dequantized(quantized_base.model, dense.model)
                del quantized_base
                origin += f"; dequantized from {run.precision} ({copied} layers)"
            merged = load_adapter(dense, adapter_dir).merge_and_unload()
            dense = replace(dense, model=merged)
            origin += f"; LoRA adapter {adapter_dir} merged"
    outcome = prune_model(dense.model, spec, calibration=texts, tokenizer=dense.tokenizer, step=step)
    if dense_precision == run.precision:
        return PrunedModel(replace(dense, weights_origin=f"{origin}; pruned ({spec.label})"), outcome, [],
                           setup)
    # bitsandbytes (and w8a8) quantize at load time, so the pruned weights go through a folder first.
    with step("quantize"):
        folder = StudyLayout(run.study_dir).pruned_weights(run.config_id)
        folder.mkdir(parents=True, exist_ok=True)
        dense.model.save_pretrained(folder, safe_serialization=True)
        dense.tokenizer.save_pretrained(folder)
        pruned_settings = run.model.model_copy(update={"source": "local", "path": str(folder)})
        quantized = load_model(pruned_settings, run.precision, run.device, base_dir=run.base_dir)
        origin = f"{origin}; pruned ({spec.label}) then quantized to {run.precision}"
        checks = check_pruned(quantized.model, outcome)
    broken = [c.name for c in checks if c.verified_nm is False]
    if broken:
        raise RuntimeError(f"quantizing to {run.precision} broke the {spec.pattern} pattern in {broken[:3]} "
                           f"({len(broken)} layers): the pruned config would not be what it claims")
    return PrunedModel(replace(quantized, name=run.model.name, weights_origin=origin), outcome, checks, setup)


def _copy_dequantized(quantized: Any, dense: Any) -> int:
    """Write the dequantized weights of every bitsandbytes layer of ``quantized`` into the same layer
    of ``dense`` (in place); returns how many layers were copied."""
    import torch

    dense_modules = dict(dense.named_modules())
    copied = 0
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if is_quantized(module):
                target = dense_modules[name]
                target.weight.copy_(dequantized_weight(module).reshape(target.weight.shape).to(target.weight.dtype))
                copied += 1
    return copied


@dataclass
class SparseExecution:
    """Which kernels a pruned config runs: ``kernel`` is "cusparselt" when any layer runs sparse."""

    kernel: str
    note: str
    converted: list[str]
    plan_rows: list[dict[str, Any]]


def sparse_execution(run: Any, loaded: LoadedModel, outcome: PruningResult, mode: str = "auto",
                     token_counts: tuple[int, ...] = (256, 1024, 4096)) -> SparseExecution:
    """Route 2:4 layers through cuSPARSELt where a timing on this GPU says it is faster (see
    ``llm_energy.models.sparse_kernels``); say in one sentence why not everywhere else (CPU, other patterns,
    quantized precisions, ``off``). ``run`` needs ``precision``, ``config_id`` and ``seed``."""
    import torch

    from ..models import sparse_kernels as sparse
    nm = outcome.spec.nm
    if mode == "off":
        return SparseExecution("dense", "sparse kernels turned off (pruning.sparse_kernels: off)", [], [])
    if nm is None or (nm.kept, nm.group) != (2, 4):
        return SparseExecution("dense", f"pattern {outcome.spec.pattern} has no sparse tensor-core kernel "
                                        "(only 2:4 does): zeros are multiplied by dense kernels", [], [])
    if run.precision not in ("fp16", "bf16"):
        if run.precision in BITSANDBYTES_PRECISIONS:
            why = "bitsandbytes kernels are dense"
        elif run.precision == "w8a8":
            why = "its int8 matmul (torch._int_mm) is dense"
        else:
            why = "2:4 sparse kernels run fp16/bf16 only"
        return SparseExecution("dense", f"{run.precision}: {why}", [], [])
    dtype = torch.float16 if run.precision == "fp16" else torch.bfloat16
    reason = sparse.support_reason(loaded.device, dtype)
    if reason is not None:
        return SparseExecution("dense", reason, [], [])
    plans = sparse.plan(loaded.model, token_counts)
    total = sum(len(p.layers) for p in plans)
    rows = [{"config_id": run.config_id, **row} for row in sparse.plan_rows(plans)]
    need = max((p.min_tokens for p in plans if p.convert), default=0)
    if need:
        # A probe that takes the sparse path: rows of 256 random tokens, at least `need` in all.
        gen = torch.Generator(device=loaded.device).manual_seed(run.seed)
        vocab = loaded.model.get_input_embeddings().num_embeddings
        probe = torch.randint(0, vocab, (max(1, -(-need // 256)), 256), device=loaded.device, generator=gen)

        def forward() -> Any:
            with torch.inference_mode():
                return loaded.model(input_ids=probe, use_cache=False).logits[:, -8:]

        converted, check = sparse.convert_and_verify(loaded.model, plans, forward)
        if converted:
            note = (f"{len(converted)} of {total} 2:4 layers run cuSPARSELt (shapes measured faster sparse; "
                    f"dense below their crossover token count); {check.reason}")
            return SparseExecution("cusparselt", note, converted, rows)
        return SparseExecution("dense", f"sparse conversion refused, running dense: {check.reason}", [], rows)
    best = max((p.best_speedup for p in plans), default=0.0)
    return SparseExecution("dense", "no layer shape ran faster sparse on this GPU at "
                                    f"{', '.join(map(str, token_counts))} tokens (best {best:.2f}x): all "
                                    f"{total} layers run dense", [], rows)


def record(run: ConfigRun, pruned: PrunedModel, execution: SparseExecution,
           adapter: str = "none") -> ScoringPath:
    """Per-layer sparsity rows (and the same layers after quantization) and the config's row: where its
    weights came from, which kernels it runs, and the scoring path (chosen here, before anything is
    measured)."""
    record_pruned_layers(run.study_dir, run.config_id, pruned.outcome, execution.plan_rows,
                         pruned.after_quantization)
    record_setup_steps(run.study_dir, run.identity(adapter, pruned.outcome.spec.label), pruned.setup,
                       pruned.loaded.device, notes=SETUP_STEPS)
    path, _ = reuse.scoring_path(run.study_dir, pruned.loaded, run.model, run.base_dir, execution.kernel)
    record_config(run.study_dir, run.config_id, run.model.name, run.precision, "ok",
                  weights_origin=pruned.loaded.weights_origin, adapter=adapter,
                  pruning=pruned.outcome.spec.label, kernel=execution.kernel, kernel_note=execution.note,
                  scoring_path=path.name, data=data_description(run.tasks, run.base_dir))
    return path


def measure_pruned_config(run: ConfigRun, loaded: LoadedModel, meter: EnergyMeter, outcome: PruningResult,
                          adapter: str = "none") -> list[dict[str, Any]]:
    """Every task of the pruned config measured and written to the tables exactly as the inference
    phase does (phase ``pruning``, with the pruning label and the measured sparsity)."""
    return evaluate_config(run, loaded, meter, phase="pruning", adapter=adapter, pruning=outcome.spec.label,
                           sparsity=outcome)


def evaluate(run: ConfigRun, loaded: LoadedModel, meter: EnergyMeter, outcome: PruningResult,
             adapter: str = "none") -> list[dict[str, Any]]:
    """Deprecated alias of :func:`measure_pruned_config`."""
    warnings.warn("llm_energy.phases.pruning.evaluate is deprecated: use measure_pruned_config",
                  DeprecationWarning, stacklevel=2)
    return measure_pruned_config(run, loaded, meter, outcome, adapter)




def recovered_adapter(adapter: str) -> str:
    """The adapter column of a recovered config: its target's adapter plus the recovery adapter."""
    return "recovery" if adapter == "none" else f"{adapter}+recovery"


@dataclass
class Recovery:
    """A pruned config with a recovery LoRA adapter trained on it (the pruned weights untouched)."""

    run: ConfigRun  # named <pruned config id>__recovered
    loaded: LoadedModel
    checks: list[LayerCheck]  # the pruned layers after training: the mask must not have moved


def recover(run: ConfigRun, pruned: PrunedModel, settings: RecoverySettings, meter: EnergyMeter,
            adapter: str = "none") -> Recovery | None:
    """Train a fresh LoRA adapter on the pruned model (the task's training split only), one energy
    window per epoch into training.csv (phase ``recovery``). The adapter is not merged: the pruned
    weights keep their zeros, which is checked layer by layer after training."""
    recovered = run.with_config_id(f"{run.config_id}__{RECOVERED_SUFFIX}")
    if run.precision not in FINETUNE_PRECISIONS:  # None: recorded as skipped, with the reason
        record_config(run.study_dir, recovered.config_id, run.model.name, run.precision, "skipped",
                      f"no recovery fine-tuning at {run.precision}: LoRA trains at "
                      f"{', '.join(FINETUNE_PRECISIONS)} (4-bit QLoRA uses nf4)",
                      adapter=recovered_adapter(adapter), pruning=pruned.outcome.spec.label)
        return None
    spec = settings.spec(run.seed)
    train, valid = training_splits(run, spec.task)
    limit = probe_rate(run)
    result = finetune(pruned.loaded, train.items, valid.items, spec, meter,
                      StudyLayout(run.study_dir).adapter(recovered.config_id), label_set=train.labels)
    identity = recovered.identity(adapter=recovered_adapter(adapter), pruning=pruned.outcome.spec.label)
    record_training(run.study_dir, identity, result, pruned.loaded.device, spec.task, phase="recovery",
                    limit=limit)
    checks = check_pruned(result.model, pruned.outcome)
    moved = [c.name for c, layer in zip(checks, pruned.outcome.layers)
             if abs(c.measured_sparsity - layer.measured_sparsity) > 1e-9 or c.verified_nm is False]
    if moved:
        raise RuntimeError(f"recovery training changed the pruned weights of {moved[:3]}: the mask must stay "
                           "fixed")
    loaded = replace(pruned.loaded, model=result.model,
                     weights_origin=f"{pruned.loaded.weights_origin}; recovery LoRA adapter "
                                    f"({spec.epochs} epoch(s) on {spec.task} train, not merged)")
    record_pruned_layers(run.study_dir, recovered.config_id, pruned.outcome, after=checks)
    path, _ = reuse.scoring_path(run.study_dir, loaded, run.model, run.base_dir)
    record_config(run.study_dir, recovered.config_id, run.model.name, run.precision, "ok",
                  weights_origin=loaded.weights_origin, adapter=identity.adapter, pruning=identity.pruning,
                  kernel="dense", kernel_note="the recovery adapter runs beside the pruned weights (not "
                                              "merged)",
                  scoring_path=path.name, data=data_description(run.tasks, run.base_dir))
    return Recovery(recovered, loaded, checks)


def measure_recovered_config(recovery: Recovery, meter: EnergyMeter, outcome: PruningResult,
                             adapter: str = "none") -> list[dict[str, Any]]:
    """The recovered config measured and written like every pruned config."""
    return evaluate_config(recovery.run, recovery.loaded, meter, phase="pruning",
                           adapter=recovered_adapter(adapter), pruning=outcome.spec.label, sparsity=outcome)


def evaluate_recovered(recovery: Recovery, meter: EnergyMeter, outcome: PruningResult,
                       adapter: str = "none") -> list[dict[str, Any]]:
    """Deprecated alias of :func:`measure_recovered_config`."""
    warnings.warn("llm_energy.phases.pruning.evaluate_recovered is deprecated: use measure_recovered_config",
                  DeprecationWarning, stacklevel=2)
    return measure_recovered_config(recovery, meter, outcome, adapter)


def layers_figure(outcome: PruningResult, config_id: str = "") -> Figure:
    """Measured sparsity of every pruned layer against the target, in module order
    (:func:`llm_energy.report.figures.layers_figure`)."""
    title = (f"{config_id or outcome.spec.label}: {outcome.measured_sparsity:.4f} overall"
             + ("" if outcome.verified_nm is None else f", N:M verified: {outcome.verified_nm}"))
    return figures.layers_figure(outcome.layers, outcome.target_sparsity, title)
