"""What `llm-energy validate` finds in a study's data before any job starts.

Every record of every task is read (all the malformed ones are listed, not just the first); the
splits the study scores, trains on and calibrates on must be non-empty and must not be the same
split; and every scored prompt, with its longest continuation (or its generated tokens), must fit
each model's context. Each problem names the file, the line (or the record) and the field.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from .config import Problem, Study, TaskSettings
from .data import Records, load_task_data, read_records, split_entries, task_file
from .items import DataError

log = logging.getLogger(__name__)

# Which splits train or calibrate (never the scored one).
TRAINING_SPLITS: tuple[str, ...] = ("train", "validation")


def _where(task: str, field: str = "") -> str:
    return f"tasks.{task}" + (f" ({field})" if field else "")


def _problem(exc: DataError, task: str) -> Problem:
    file = exc.file
    return Problem(file, exc.line, _where(task, exc.field or ""), exc.reason)


def split_uses(study: Study) -> dict[str, dict[str, str]]:
    """{task: {split: what reads it}} for the splits a study trains, validates or calibrates on."""
    uses: dict[str, dict[str, str]] = {}
    if "finetune" in study.phases and study.finetune is not None:
        uses.setdefault(study.finetune.task, {}).update(
            {"train": "fine-tuning trains on", "validation": "fine-tuning validates on"})
    pruning = study.pruning if "pruning" in study.phases else None
    if pruning is not None:
        if any(m.method == "wanda" for m in pruning.methods):
            for task in study.tasks.enabled():
                uses.setdefault(task, {}).setdefault("train", "Wanda calibrates on")
        if pruning.recover is not None:
            uses.setdefault(pruning.recover.task, {}).update(
                {"train": "recovery fine-tuning trains on", "validation": "recovery fine-tuning validates on"})
    return uses


def _record_problems(task: str, settings: TaskSettings, base_dir: Path) -> tuple[list[Problem], Records | None]:
    path = task_file(task, settings, base_dir)
    if not path.is_file():
        return [Problem(str(path), None, _where(task, "data"), "data file does not exist")], None
    try:
        # Read with skip to list every bad record; under the study's own policy 'error' each is a problem.
        records = read_records(task, path, settings.model_copy(update={"invalid_records": "skip"}))
    except DataError as exc:
        return [_problem(exc, task)], None
    problems = []
    if settings.invalid_records == "error":
        for s in records.skipped:
            where = s.file if s.line is not None else f"{s.file} [{s.record}]"
            problems.append(Problem(where, s.line, _where(task, s.field),
                                    f"{s.reason} (set tasks.{task}.invalid_records: skip to leave such records out)"))
    return problems, records


def _split_problems(task: str, settings: TaskSettings, records: Records, uses: dict[str, str]) -> list[Problem]:
    path = str(records.path)
    problems = []
    if settings.split in uses:
        problems.append(Problem(path, None, _where(task, "split"),
                                f"the scored split {settings.split!r} is the one {uses[settings.split]}: "
                                "training or calibrating on the scored items would inflate their scores; score 'test'"))
    try:
        entries = split_entries(records, settings)
    except DataError as exc:
        return problems + [_problem(exc, task)]
    sizes = {name: sum(1 for _, s, _ in entries if s == name) for name in {settings.split, *uses}}
    for name, size in sorted(sizes.items()):
        if size == 0:
            why = "it is scored" if name == settings.split else f"{uses[name]} it"
            problems.append(Problem(path, None, _where(task, "split"),
                                    f"split {name!r} is empty, but {why} (check the file's split field or split_fractions)"))
    return problems


def _context_length(model: Any) -> int | None:
    config = getattr(model, "config", model)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _length_problems(study: Study, base_dir: Path, scored: dict[str, Any]) -> list[Problem]:
    """Scored prompts (with their longest continuation, or their generated tokens) that do not fit a
    model's context."""
    from transformers import AutoConfig

    from .generation import build_prompt
    from .models import load_tokenizer, resolve_weights
    from .scoring import prepare_task

    problems = []
    for spec in study.models:
        if spec.source == "hub" and os.environ.get("HF_HUB_OFFLINE") == "1":
            log.info("validate: %s is a hub model and the hub is offline; its context length is not checked", spec.name)
            continue
        try:
            weights, _ = resolve_weights(spec, base_dir)
            context = _context_length(AutoConfig.from_pretrained(weights))
            tokenizer, _ = load_tokenizer(spec, base_dir)
        except Exception as exc:  # a model that cannot load is the run's error, with its own message
            problems.append(Problem(str(spec.path or spec.name), None, f"models ({spec.name})", f"cannot be read: {exc}"))
            continue
        if context is None:
            continue
        for task, data in scored.items():
            settings = study.tasks.enabled()[task]
            prepared = prepare_task(task, tokenizer, data, settings.prompt, settings.style)
            for item, request in zip(data.items, prepared.encoded):
                n = request_length(request)
                if n > context:
                    problems.append(Problem(str(task_file(task, settings, base_dir)), None, _where(task, f"item {item.id}"),
                                            f"its prompt and longest choice are {n} tokens, over {spec.name}'s context "
                                            f"of {context}"))
            generation = settings.generation if task == "rca" else None
            if generation is not None:
                items = list(data.items)[: generation.max_items] if generation.max_items else list(data.items)
                for item in items:
                    n = len(tokenizer(build_prompt(item, generation, tokenizer))["input_ids"]) + generation.new_tokens
                    if n > context:
                        problems.append(Problem(str(task_file(task, settings, base_dir)), None,
                                                _where(task, f"item {item.id}"),
                                                f"its resolution prompt plus {generation.new_tokens} new tokens is {n} "
                                                f"tokens, over {spec.name}'s context of {context}"))
    return problems


def request_length(request: Any) -> int:
    """Tokens a scored request needs at once: its context and its longest continuation."""
    return len(request.context) + max(len(c) for c in request.continuations)


def data_problems(study: Study, base_dir: Path, check_lengths: bool = True) -> list[Problem]:
    """Every problem of the study's data, or [] when it can run."""
    uses = split_uses(study)
    problems: list[Problem] = []
    scored: dict[str, Any] = {}
    for task, settings in study.tasks.enabled().items():
        found, records = _record_problems(task, settings, base_dir)
        problems += found
        if records is None:
            continue
        split_found = _split_problems(task, settings, records, uses.get(task, {}))
        problems += split_found
        if not found and not split_found:
            try:
                scored[task] = load_task_data(task, settings, base_dir=base_dir)
            except DataError as exc:
                problems.append(_problem(exc, task))
    if check_lengths and scored and not problems:
        problems += _length_problems(study, base_dir, scored)
    return problems
