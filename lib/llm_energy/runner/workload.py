"""What a study's jobs will compute, counted before anything runs: the useful GFLOP of every measured
window, warm-up, training epoch and evaluation-loss pass, from the study's own data tokenised by each
model's tokenizer and the model's configuration (no weights are loaded). The same counts as the
windows record once they ran (``methods/scoring.call_gflop``, ``methods/generation.generation_gflop``,
``methods/lora_training.training_gflop``; ``measure/flops.forward_gflop`` under them all), so
``llm-energy plan`` (:mod:`llm_energy.runner.estimate`) and the tables speak of the same work.

Scoring assumes the model shares the few-shot prefix once per window call (both builtin models do;
a model whose check fails at run time runs it with every item, and takes longer than planned).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import FinetuneSpec, ModelSettings, Study
from ..data.tasks import load_task_data
from ..measure.flops import decoder_linear_parameters
from ..measure.meter import split_chunks
from ..methods.generation import encode_prompts, generation_gflop
from ..methods.lora_training import TRAINING_FORWARDS, sampled_examples, training_gflop
from ..methods.scoring import call_gflop, prepare_task

log = logging.getLogger(__name__)

WARMUP_ITEMS = 2  # the unmeasured pass before a scoring task's windows (phases/evaluation.measure_task)
GENERATION_WARMUP_ITEMS = 1  # and before generation's (one prompt)


@dataclass(frozen=True)
class TaskWork:
    """One evaluated task of one model: the GFLOP of each measured window (a chunk of the items, or the
    whole pass for a repeat), how many passes the windows make, and the warm-up's GFLOP."""

    task: str
    kind: str  # "scoring" | "generation"
    items: int
    window_gflop: tuple[float, ...]
    passes: int  # 1 for chunk windows (each item once); the repeats for full-pass windows
    warmup_gflop: float

    @property
    def gflop(self) -> float:
        return sum(self.window_gflop) * self.passes


@dataclass(frozen=True)
class TrainingWork:
    """One fine-tuning (or recovery) run of one model: per epoch, the training GFLOP (forward and
    backward) and the evaluation-loss forward after it."""

    epochs: int
    examples: int
    epoch_gflop: float
    eval_gflop: float


@dataclass(frozen=True)
class ModelWork:
    """Everything one model's jobs compute, and its size."""

    name: str
    parameters: float  # every weight: decoder linear layers, embeddings, the output projection if untied
    decoder_linear: float
    tasks: dict[str, TaskWork]
    finetune: TrainingWork | None = None
    recovery: TrainingWork | None = None
    calibration_texts: int = 0  # Wanda's calibration texts (every task's training split)
    note: str = ""  # why something is not counted

    @property
    def megaparameters(self) -> float:
        return self.parameters / 1e6


@dataclass(frozen=True)
class StudyWork:
    models: dict[str, ModelWork] = field(default_factory=dict)
    unknown: dict[str, str] = field(default_factory=dict)  # model -> why its work is not counted


def model_parameters(model_config: Any) -> float:
    """A decoder's weights from its configuration: the linear layers, the embeddings, and the output
    projection when it is not tied to them (norms left out)."""
    embeddings = int(model_config.vocab_size) * int(model_config.hidden_size)
    tied = bool(getattr(model_config, "tie_word_embeddings", True))
    return float(decoder_linear_parameters(model_config) + embeddings * (1 if tied else 2))


def _model_files(spec: ModelSettings, base_dir: Path) -> tuple[Any, Any]:
    """The model's configuration and tokenizer (the builtin models dequantized once if not cached)."""
    from transformers import AutoConfig

    from ..models.loading import load_tokenizer, resolve_weights

    if spec.source == "hub" and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise RuntimeError("a hub model and the hub is offline")
    weights, _ = resolve_weights(spec, base_dir)
    config = AutoConfig.from_pretrained(weights)
    config = getattr(config, "text_config", None) or config  # a multimodal wrapper's decoder
    tokenizer, _ = load_tokenizer(spec, base_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return config, tokenizer


def _windows(study: Study, n: int) -> tuple[list[list[int]], int]:
    """The items of each measured window and the passes over them, as the meter splits them."""
    if study.energy.windows:
        return split_chunks(n, study.energy.windows), 1
    return [list(range(n))], max(1, min(study.energy.repeats, study.energy.max_repeats))


def _task_work(study: Study, config: Any, tokenizer: Any, base_dir: Path) -> dict[str, TaskWork]:
    tasks: dict[str, TaskWork] = {}
    for name, settings in study.tasks.enabled().items():
        data = load_task_data(name, settings, base_dir=base_dir)
        prepared = prepare_task(name, tokenizer, data, settings.prompt, settings.style)
        chunks, passes = _windows(study, len(prepared.encoded))
        windows = tuple(call_gflop(config, [prepared.encoded[i] for i in chunk]) for chunk in chunks)
        warmup = call_gflop(config, prepared.encoded[:WARMUP_ITEMS]) if study.energy.warmup else 0.0
        tasks[name] = TaskWork(name, "scoring", len(prepared.encoded), windows, passes, warmup)
        generation = settings.generation if name == "rca" else None
        if generation is not None:
            items = list(data.items)[: generation.max_items] if generation.max_items else list(data.items)
            encoded = encode_prompts(tokenizer, items, generation)
            groups, passes = _windows(study, len(encoded.batches))
            windows = tuple(generation_gflop(config, _batches(encoded, group)) for group in groups)
            first = encode_prompts(tokenizer, items[:GENERATION_WARMUP_ITEMS], generation)
            warm = generation_gflop(config, first)
            tasks["rca_resolution"] = TaskWork("rca_resolution", "generation", len(items), windows, passes,
                                               warm if study.energy.warmup else 0.0)
    return tasks


def _batches(encoded: Any, group: list[int]) -> Any:
    from dataclasses import replace

    return replace(encoded, batches=tuple(encoded.batches[i] for i in group))


def _training_work(spec: FinetuneSpec, config: Any, tokenizer: Any, study: Study,
                   base_dir: Path) -> TrainingWork:
    settings = study.tasks.enabled().get(spec.task)
    if settings is None:
        raise ValueError(f"fine-tuning task {spec.task!r} is not one of the study's tasks")
    full = settings.model_copy(update={"max_items": None})
    train = load_task_data(spec.task, full, split="train", base_dir=base_dir)
    valid = load_task_data(spec.task, full, split="validation", base_dir=base_dir)
    examples = sampled_examples(train.items, tokenizer, spec, spec.max_train_items, train.labels)
    evaluated = sampled_examples(valid.items, tokenizer, spec, spec.max_eval_items, train.labels)
    return TrainingWork(spec.epochs, len(examples), training_gflop(config, examples),
                        training_gflop(config, evaluated) / TRAINING_FORWARDS)


def _calibration_texts(study: Study, base_dir: Path) -> int:
    """Wanda's calibration texts: a sample of each task's training split (phases/pruning.calibration)."""
    if study.pruning is None:
        return 0
    total = 0
    for name, settings in study.tasks.enabled().items():
        train = load_task_data(name, settings.model_copy(update={"max_items": None}), split="train",
                               base_dir=base_dir)
        total += min(study.pruning.calibration_samples, len(train.items))
    return total


def _work_as_json(work: StudyWork) -> dict[str, Any]:
    return dataclasses.asdict(work)


def _work_from_json(data: dict[str, Any]) -> StudyWork:
    def training(value: dict[str, Any] | None) -> TrainingWork | None:
        return TrainingWork(**value) if value is not None else None

    models = {}
    for name, model in data["models"].items():
        tasks = {task: TaskWork(**{**value, "window_gflop": tuple(value["window_gflop"])})
                 for task, value in model["tasks"].items()}
        models[name] = ModelWork(**{**model, "tasks": tasks, "finetune": training(model["finetune"]),
                                    "recovery": training(model["recovery"])})
    return StudyWork(models=models, unknown=dict(data["unknown"]))


def study_work(study: Study, base_dir: Path) -> StudyWork:
    """Every model's work in the study (a model whose files cannot be read offline is listed in
    ``unknown`` with the reason). Kept on disk for the next plan of the same inputs when every model
    was counted (runner.inputs_cache: the count reads every model's tokenizer and tokenises every
    scored item)."""
    from .inputs_cache import cached, inputs_key

    return cached("work", inputs_key(study, base_dir, "work"), lambda: _count_work(study, base_dir),
                  dump=_work_as_json, load=_work_from_json, keep=lambda work: not work.unknown)


def _count_work(study: Study, base_dir: Path) -> StudyWork:
    work = StudyWork()
    for spec in study.models:
        try:
            config, tokenizer = _model_files(spec, base_dir)
            finetune = recovery = None
            chosen = study.finetune.models if study.finetune is not None else None
            if ("finetune" in study.phases and study.finetune is not None
                    and (chosen is None or spec.name in chosen)):
                finetune = _training_work(study.finetune, config, tokenizer, study, base_dir)
            if "pruning" in study.phases and study.pruning is not None and study.pruning.recover is not None:
                recovery = _training_work(study.pruning.recover.spec(study.seed), config, tokenizer, study,
                                          base_dir)
            work.models[spec.name] = ModelWork(
                name=spec.name, parameters=model_parameters(config),
                decoder_linear=float(decoder_linear_parameters(config)),
                tasks=_task_work(study, config, tokenizer, base_dir), finetune=finetune, recovery=recovery,
                calibration_texts=_calibration_texts(study, base_dir) if "pruning" in study.phases else 0)
        except Exception as exc:  # noqa: BLE001  (a model that cannot be read fails its own jobs, saying why)
            log.warning("plan: the work of %s is not counted: %s", spec.name, exc)
            work.unknown[spec.name] = f"{type(exc).__name__}: {exc}"
    return work
