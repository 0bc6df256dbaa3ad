"""The pruning phase (notebook ``04_pruning``): one method and pattern on one config, the measured
sparsity next to the target, the kernels the pruned layers will run, then the same evaluation and
measurement as the inference phase.

The algorithms (magnitude, Wanda; unstructured, N:M) are :mod:`llm_energy.prune`; the cuSPARSELt
layers are :mod:`llm_energy.sparse`. Zeros save energy only where a kernel skips them: on a CPU no
sparse kernel exists, so pruned models run dense there, and :func:`sparse_execution` says why.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from .config import DENSE_PRECISIONS, PruningSpec
from .energy import EnergyMeter
from .evaluation import ConfigRun, evaluate_config, full_split
from .layout import StudyLayout, config_id_for
from .models import LoadedModel, load_model
from .prune import PruningResult, calibration_texts, prune_model
from .records import record_config, record_pruned_layers
from .scoring import ScoringPath, choose_scoring_path


def parameters(run: ConfigRun, pruning_section: dict, config_id: str = "") -> tuple[ConfigRun, PruningSpec]:
    """The notebook's `pruning` parameter as a spec, and the run's config id: ``config_id`` when the
    runner gave one, else <model>__<precision>__<pruning label>."""
    spec = PruningSpec(**pruning_section)
    run = run.with_config_id(config_id or config_id_for(run.model.name, run.precision, pruning=spec.label))
    return run, spec


def calibration(run: ConfigRun, spec: PruningSpec) -> list[str]:
    """Calibration texts (Wanda) from the training split of every task, a seeded sample of each."""
    texts: list[str] = []
    for name, settings in run.tasks.enabled().items():
        train = full_split(name, settings, "train", run.base_dir)
        texts += calibration_texts(train.items, min(spec.calibration_samples, len(train)), seed=run.seed)
    return texts


def prune(run: ConfigRun, spec: PruningSpec, texts: list[str]) -> tuple[LoadedModel, PruningResult]:
    """Prune the dense weights, then load them at the run's precision (quantizing after pruning)."""
    dense_precision = run.precision if run.precision in DENSE_PRECISIONS else "fp32"
    dense = load_model(run.model, dense_precision, run.device, base_dir=run.base_dir)
    outcome = prune_model(dense.model, spec, calibration=texts, tokenizer=dense.tokenizer)
    if dense_precision == run.precision:
        return dense, outcome
    # bitsandbytes quantizes at load time, so the pruned weights go through a folder first.
    folder = StudyLayout(run.study_dir).pruned_weights(run.config_id)
    folder.mkdir(parents=True, exist_ok=True)
    dense.model.save_pretrained(folder, safe_serialization=True)
    dense.tokenizer.save_pretrained(folder)
    pruned_settings = run.model.model_copy(update={"source": "local", "path": str(folder)})
    quantized = load_model(pruned_settings, run.precision, run.device, base_dir=run.base_dir)
    origin = f"{dense.weights_origin}; pruned ({spec.label}) then quantized to {run.precision}"
    return replace(quantized, name=run.model.name, weights_origin=origin), outcome


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
    ``llm_energy.sparse``); say in one sentence why not everywhere else (CPU, other patterns,
    quantized precisions, ``off``). ``run`` needs ``precision``, ``config_id`` and ``seed``."""
    import torch

    from . import sparse

    nm = outcome.spec.nm
    if mode == "off":
        return SparseExecution("dense", "sparse kernels turned off (pruning.sparse_kernels: off)", [], [])
    if nm is None or (nm.kept, nm.group) != (2, 4):
        return SparseExecution("dense", f"pattern {outcome.spec.pattern} has no sparse tensor-core kernel "
                                        "(only 2:4 does): zeros are multiplied by dense kernels", [], [])
    if run.precision not in ("fp16", "bf16"):
        if run.precision in ("int8", "nf4", "fp4"):
            why = "bitsandbytes kernels are dense"
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
    return SparseExecution("dense", f"no layer shape ran faster sparse on this GPU at {', '.join(map(str, token_counts))} "
                                    f"tokens (best {best:.2f}x): all {total} layers run dense", [], rows)


def record(run: ConfigRun, loaded: LoadedModel, outcome: PruningResult, execution: SparseExecution) -> ScoringPath:
    """Per-layer sparsity rows and the config's row: where its weights came from, which kernels it
    runs, and the scoring path (chosen here, before anything is measured)."""
    record_pruned_layers(run.study_dir, run.config_id, outcome, execution.plan_rows)
    path = choose_scoring_path(loaded.model, loaded.tokenizer)
    record_config(run.study_dir, run.config_id, run.model.name, run.precision, "ok",
                  weights_origin=loaded.weights_origin, pruning=outcome.spec.label, kernel=execution.kernel,
                  kernel_note=execution.note, scoring_path=path.name)
    return path


def evaluate(run: ConfigRun, loaded: LoadedModel, meter: EnergyMeter, outcome: PruningResult) -> list[dict[str, Any]]:
    """Every task measured and written to the tables exactly as the inference phase does."""
    return evaluate_config(run, loaded, meter, phase="pruning", pruning=outcome.spec.label, sparsity=outcome)
