"""Task data: the built-in sample data and user files, validated record by record.

Formats (see DESIGN.md): multiple-choice QA as JSONL (``question``, ``choices``, ``answer`` as a
0-based index, a letter or the choice text, optional ``id``, ``category``, ``explanation``,
``split``); root-cause analysis as JSONL or CSV (``ticket``, ``root_cause``, optional ``resolution``,
``id``, ``split``; CSV columns can be mapped). A bad record fails with file, line and field.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Any, Iterator

from .config import TaskSettings, resolve_path
from .items import DataError, QAItem, RCAItem, TaskData, item_text
from .teleqna import read_teleqna

# The sample data shipped in the package (made by tools/make_sample_data.py).
DATA_DIR = Path(__file__).parent / "datasets"
BUILTIN_FILES = {"rca": DATA_DIR / "rca_tickets.jsonl", "qa": DATA_DIR / "qa_telecom.jsonl"}


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise DataError(path, f"is not valid UTF-8 text (byte {exc.start}): re-save it as UTF-8", line) from None


def _jsonl_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(path, f"is not valid JSON ({exc.msg} at column {exc.colno})", number) from None
        if not isinstance(record, dict):
            raise DataError(path, "expected a JSON object per line", number)
        yield number, record


def _csv_records(path: Path, columns: dict[str, str]) -> Iterator[tuple[int, dict[str, Any]]]:
    reader = csv.DictReader(_read_text(path).splitlines())
    rename = {theirs: ours for ours, theirs in columns.items()}
    missing = [theirs for theirs in columns.values() if theirs not in (reader.fieldnames or [])]
    if missing:
        raise DataError(path, f"mapped column(s) {missing} not in the header {reader.fieldnames}", 1)
    for index, row in enumerate(reader, start=2):  # line 1 is the header
        yield index, {rename.get(k, k): v for k, v in row.items()}


def _text_field(record: dict[str, Any], name: str, path: Path, line: int, required: bool = True) -> str:
    value = record.get(name)
    if value is None:
        if required:
            raise DataError(path, "is missing", line, name)
        return ""
    if not isinstance(value, str):
        raise DataError(path, f"must be text, got {type(value).__name__}", line, name)
    if required and not value.strip():
        raise DataError(path, "is empty", line, name)
    return value.strip()


def _parse_answer(value: Any, choices: list[str], path: Path, line: int) -> int:
    if isinstance(value, bool):
        raise DataError(path, "must be a 0-based index, a letter or the choice text", line, "answer")
    if isinstance(value, int):
        index = value
    elif isinstance(value, str) and len(value.strip()) == 1 and value.strip().isalpha():
        index = ord(value.strip().upper()) - ord("A")
    elif isinstance(value, str) and value.strip() in choices:
        index = choices.index(value.strip())
    elif isinstance(value, str) and value.strip().isdigit():
        index = int(value.strip())
    else:
        raise DataError(path, f"{value!r} is not an index, a letter or one of the choices", line, "answer")
    if not 0 <= index < len(choices):
        raise DataError(path, f"index {index} is out of range for {len(choices)} choices", line, "answer")
    return index


def _qa_item(record: dict[str, Any], path: Path, line: int, fallback_id: str) -> QAItem:
    question = _text_field(record, "question", path, line)
    choices = record.get("choices")
    if not isinstance(choices, list) or len(choices) < 2:
        raise DataError(path, "must be a list of at least 2 choices", line, "choices")
    if not all(isinstance(c, str) and c.strip() for c in choices):
        raise DataError(path, "every choice must be non-empty text", line, "choices")
    choices = [c.strip() for c in choices]
    if len(set(choices)) != len(choices):
        raise DataError(path, "choices repeat", line, "choices")
    if "answer" not in record:
        raise DataError(path, "is missing", line, "answer")
    answer = _parse_answer(record["answer"], choices, path, line)
    return QAItem(
        id=str(record.get("id") or fallback_id),
        question=question,
        choices=tuple(choices),
        answer=answer,
        category=str(record.get("category") or ""),
        explanation=str(record.get("explanation") or ""),
    )


def _rca_item(record: dict[str, Any], path: Path, line: int, fallback_id: str) -> RCAItem:
    return RCAItem(
        id=str(record.get("id") or fallback_id),
        ticket=_text_field(record, "ticket", path, line),
        root_cause=_text_field(record, "root_cause", path, line),
        resolution=_text_field(record, "resolution", path, line, required=False),
    )


def _detect_format(path: Path, declared: str) -> str:
    if declared != "auto":
        return declared
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return "jsonl"
    if suffix == ".csv":
        return "csv"
    if suffix in (".zip", ".json", ".txt"):
        return "teleqna"
    raise DataError(path, f"cannot tell the format from the extension {suffix!r}; set format: jsonl, csv or teleqna")


def read_records(task: str, path: Path, settings: TaskSettings) -> list[tuple[Any, str | None]]:
    """Parse and validate every record of a file: [(item, split or None)]."""
    fmt = _detect_format(path, settings.format)
    if fmt == "teleqna":
        if task != "qa":
            raise DataError(path, "TeleQnA data is multiple-choice QA; use it for the qa task")
        return [(item, None) for item in read_teleqna(path, settings.password)]
    if fmt == "csv":
        records = _csv_records(path, settings.columns)
    else:
        if settings.columns:
            raise DataError(path, "'columns' mapping applies to CSV files only")
        records = _jsonl_records(path)
    make = _qa_item if task == "qa" else _rca_item
    items: list[tuple[Any, str | None]] = []
    seen: dict[str, int] = {}
    label_set = set(settings.labels) if (task == "rca" and settings.labels) else None
    for line, record in records:
        item = make(record, path, line, f"{task}-{line}")
        if label_set is not None and item.root_cause not in label_set:
            raise DataError(path, f"{item.root_cause!r} is not in the label set {sorted(label_set)}", line, "root_cause")
        if item.id in seen:
            raise DataError(path, f"duplicate id {item.id!r} (first on line {seen[item.id]})", line, "id")
        seen[item.id] = line
        items.append((item, record.get("split") or None))
    if not items:
        raise DataError(path, "holds no records")
    return items


def load_task_data(task: str, settings: TaskSettings, split: str | None = None, base_dir: Path | None = None) -> TaskData:
    """Items of one task and split; ``max_items`` draws a seeded sample (in file order)."""
    split = split or settings.split
    path = BUILTIN_FILES[task] if settings.data == "builtin" else resolve_path(settings.data, base_dir or Path.cwd())
    if not path.is_file():
        raise DataError(path, "does not exist")
    records = read_records(task, path, settings)
    has_splits = any(s is not None for _, s in records)
    if has_splits:
        items = [item for item, s in records if s == split]
        if not items:
            found = sorted({s for _, s in records if s})
            raise DataError(path, f"has no items in split {split!r}; splits found: {found}", field="split")
    else:
        items = [item for item, _ in records]  # a file without splits is scored whole
    if settings.max_items is not None and settings.max_items < len(items):
        keep = sorted(random.Random(settings.sample_seed).sample(range(len(items)), settings.max_items))
        items = [items[i] for i in keep]
    labels = _label_set(task, settings, records)
    source = "builtin" if settings.data == "builtin" else str(path)
    return TaskData(task=task, source=source, split=split, items=tuple(items), labels=labels)


def _label_set(task: str, settings: TaskSettings, records: list[tuple[Any, str | None]]) -> tuple[str, ...]:
    if task != "rca":
        return ()
    return tuple(sorted(settings.labels or {it.root_cause for it, _ in records}))


def load_all_splits(task: str, settings: TaskSettings, base_dir: Path | None = None) -> dict[str, TaskData]:
    """Every split of a task's data, unsampled (for the data summary and Figure 1)."""
    whole = settings.model_copy(update={"max_items": None})
    path = BUILTIN_FILES[task] if settings.data == "builtin" else resolve_path(settings.data, base_dir or Path.cwd())
    records = read_records(task, path, whole)
    splits = sorted({s for _, s in records if s}) or ["all"]
    out = {}
    for split in splits:
        items = tuple(item for item, s in records if (s or "all") == split)
        labels = _label_set(task, settings, records)
        source = "builtin" if settings.data == "builtin" else str(path)
        out[split] = TaskData(task=task, source=source, split=split, items=items, labels=labels)
    return out


def summarise(task_sets: dict[str, dict[str, TaskData]]) -> "Any":
    """Counts per task and split, with label (RCA) or category (QA) balance, as a DataFrame."""
    import pandas as pd

    rows = []
    for task, splits in task_sets.items():
        for split, data in splits.items():
            classes: dict[str, int] = {}
            for item in data.items:
                key = item.root_cause if isinstance(item, RCAItem) else (item.category or "(none)")
                classes[key] = classes.get(key, 0) + 1
            for cls, count in sorted(classes.items()):
                rows.append({"task": task, "source": data.source, "split": split, "class": cls, "n_items": count})
    frame = pd.DataFrame(rows)
    return frame.pivot_table(index=["task", "class"], columns="split", values="n_items", fill_value=0, aggfunc="sum")


def token_length_rows(tokenizer: Any, tokenizer_name: str, task: str, data: TaskData) -> list[dict[str, Any]]:
    dataset = "builtin" if data.source == "builtin" else Path(data.source).name
    lengths = tokenizer([item_text(i) for i in data.items], add_special_tokens=False)["input_ids"]
    return [
        {"task": task, "dataset": dataset, "split": data.split, "item_id": item.id, "n_tokens": len(ids),
         "tokenizer": tokenizer_name}
        for item, ids in zip(data.items, lengths)
    ]
