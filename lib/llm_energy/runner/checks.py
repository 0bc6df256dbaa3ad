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

from ..config import Problem, Study, TaskSettings
from ..data.tasks import Records, load_all_splits, load_task_data, read_records, split_entries, task_file
from ..items import DataError

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
                {"train": "recovery fine-tuning trains on",
                 "validation": "recovery fine-tuning validates on"})
    return uses


def _record_problems(task: str, settings: TaskSettings,
                     base_dir: Path) -> tuple[list[Problem], Records | None]:
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
                                    f"{s.reason} (set tasks.{task}.invalid_records: skip to leave such "
                                    "records out)"))
    return problems, records


def _split_problems(task: str, settings: TaskSettings, records: Records,
                    uses: dict[str, str]) -> list[Problem]:
    path = str(records.path)
    problems = []
    if settings.split in uses:
        problems.append(Problem(path, None, _where(task, "split"),
                                f"the scored split {settings.split!r} is the one {uses[settings.split]}: "
                                "training or calibrating on the scored items would inflate their scores; "
                                "score 'test'"))
    try:
        entries = split_entries(records, settings)
    except DataError as exc:
        return problems + [_problem(exc, task)]
    sizes = {name: sum(1 for _, s, _ in entries if s == name) for name in {settings.split, *uses}}
    for name, size in sorted(sizes.items()):
        if size == 0:
            why = "it is scored" if name == settings.split else f"{uses[name]} it"
            problems.append(Problem(path, None, _where(task, "split"),
                                    f"split {name!r} is empty, but {why} (check the file's split field or "
                                    "split_fractions)"))
    return problems


def _context_length(model: Any) -> int | None:
    config = getattr(model, "config", model)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def request_length(request: Any) -> int:
    """Tokens a scored request needs at once: its context and its longest continuation."""
    return len(request.context) + max(len(c) for c in request.continuations)


# Tokenising a context and a continuation apart may differ from tokenising them together by a token
# or two at the seam: items this close to the limit are measured exactly (as scoring encodes them).
_SEAM_MARGIN = 8


def _model_limits(study: Study, base_dir: Path) -> tuple[list[tuple[str, Any, int]], list[Problem]]:
    """(model name, tokenizer, context length) of every model whose limits can be read offline."""
    from transformers import AutoConfig

    from ..models.loading import load_tokenizer, resolve_weights

    limits, problems = [], []
    for spec in study.models:
        if spec.source == "hub" and os.environ.get("HF_HUB_OFFLINE") == "1":
            log.info("validate: %s is a hub model and the hub is offline; its context length is not checked",
                     spec.name)
            continue
        try:
            weights, _ = resolve_weights(spec, base_dir)
            context = _context_length(AutoConfig.from_pretrained(weights))
            tokenizer, _ = load_tokenizer(spec, base_dir)
        except Exception as exc:  # noqa: BLE001  a model that cannot load fails its own jobs, with its own message
            log.warning("validate: the context length of %s is not checked: %s", spec.name, exc)
            continue
        if context is not None:
            limits.append((spec.name, tokenizer, context))
    return limits, problems


def over_context(task: str, settings: TaskSettings, data: Any,
                 limits: list[tuple[str, Any, int]]) -> dict[str, str]:
    """{item id: why} for the items whose scored prompt with its longest continuation (or, for RCA
    resolutions, its generation prompt plus the new tokens) does not fit a model's context. Batched:
    fast enough for every record of a 10,000-question file."""
    from ..methods.generation import build_prompt, uses_chat
    from ..methods.scoring import encode_requests, request_texts, special_prefix

    found: dict[str, str] = {}
    if not data.items:
        return found
    requests = request_texts(task, data, settings.prompt, settings.style)
    for name, tokenizer, context in limits:
        prefix = len(special_prefix(tokenizer))
        ctx_lengths = [len(ids) for ids in tokenizer([c for c, _ in requests],
                                                     add_special_tokens=False)["input_ids"]]
        conts = sorted({c for _, cs in requests for c in cs})
        cont_length = dict(
            zip(conts, (len(ids) for ids in tokenizer(conts, add_special_tokens=False)["input_ids"])))
        for item, request, n_ctx in zip(data.items, requests, ctx_lengths):
            n = prefix + n_ctx + max(cont_length[c] for c in request[1])
            if n > context - _SEAM_MARGIN:
                n = request_length(encode_requests(tokenizer, [request])[0])
            if n > context and item.id not in found:
                found[item.id] = (f"its prompt and longest choice are {n} tokens, over {name}'s context of "
                                  f"{context}")
        generation = settings.generation if task == "rca" else None
        if generation is not None:
            chat = uses_chat(generation, tokenizer)
            prompts = [build_prompt(item, generation, tokenizer) for item in data.items]
            for item, ids in zip(data.items, tokenizer(prompts, add_special_tokens=not chat)["input_ids"]):
                n = len(ids) + generation.new_tokens
                if n > context and item.id not in found:
                    found[item.id] = (f"its resolution prompt plus {generation.new_tokens} new tokens is {n} "
                                      f"tokens, over {name}'s context of {context}")
    return found


def records_over_context(study: Study, base_dir: Path,
                         tasks: dict[str, TaskSettings]) -> dict[str, dict[str, str]]:
    """{task: {record id: why}}: every record of ``tasks`` (all their splits) too long for one of the
    study's models' context (:func:`over_context`); a task whose data cannot be read is left out
    (validation reports it). Kept on disk for the next run of the same inputs (runner.inputs_cache:
    it reads every model's tokenizer)."""
    from .inputs_cache import cached, inputs_key

    def compute() -> dict[str, dict[str, str]]:
        limits, _ = _model_limits(study, base_dir)
        out: dict[str, dict[str, str]] = {}
        for name, settings in tasks.items():
            try:
                everything = load_all_splits(name, settings, base_dir)
            except (DataError, OSError):
                continue
            found: dict[str, str] = {}
            for split in everything.values():
                found.update(over_context(name, settings, split, limits))
            out[name] = found
        return out

    return cached("context", inputs_key(study, base_dir, "context", sorted(tasks)), compute)


def with_context_exclusions(study: Study, base_dir: Path) -> tuple[Study, dict[str, int]]:
    """The study with, for every task under ``invalid_records: skip``, the records too long for one of
    its models' context added to ``exclude_records`` (so every job leaves out the same records before
    sampling), and how many per task. A task whose data cannot be read is left as it is (validation
    reports it)."""
    tasks = {name: s for name, s in study.tasks.enabled().items() if s.invalid_records == "skip"}
    if not tasks:
        return study, {}
    updates: dict[str, TaskSettings] = {}
    counts: dict[str, int] = {}
    for name, found in records_over_context(study, base_dir, tasks).items():
        if found:
            settings = tasks[name]
            updates[name] = settings.model_copy(
                update={"exclude_records": {**settings.exclude_records, **found}})
            counts[name] = len(found)
    if not updates:
        return study, counts
    return study.model_copy(update={"tasks": study.tasks.model_copy(update=updates)}), counts


def _length_problems(study: Study, base_dir: Path, scored: dict[str, Any]) -> list[Problem]:
    """Under ``invalid_records: error``: every scored item too long for a model's context."""
    tasks = {task: study.tasks.enabled()[task] for task in scored
             if study.tasks.enabled()[task].invalid_records != "skip"}  # skip: with_context_exclusions
    if not tasks:
        return []
    over = records_over_context(study, base_dir, tasks)
    problems = []
    for task, data in scored.items():
        found = over.get(task, {})
        for item in data.items:
            if item.id in found:
                problems.append(Problem(str(task_file(task, tasks[task], base_dir)), None,
                                        _where(task, f"item {item.id}"),
                                        f"{found[item.id]} (set tasks.{task}.invalid_records: skip to leave "
                                        "such records out)"))
    return problems


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
