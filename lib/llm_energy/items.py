"""What the study scores: one multiple-choice question, one fault ticket, a task's items, and the
error every reader raises with file, line and field. The readers are in :mod:`llm_energy.data.tasks`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """A data problem, located: file, line (1-based) and field."""

    def __init__(self, file: str | Path, message: str, line: int | None = None, field: str | None = None):
        where = f"{file}" + (f":{line}" if line is not None else "")
        what = f" field '{field}'" if field else ""
        super().__init__(f"{where}:{what} {message}".replace(": ", ": ", 1))
        self.file, self.line, self.field, self.reason = str(file), line, field, message


@dataclass(frozen=True)
class QAItem:
    id: str
    question: str
    choices: tuple[str, ...]
    answer: int  # 0-based index into choices
    category: str = ""
    explanation: str = ""


@dataclass(frozen=True)
class RCAItem:
    id: str
    ticket: str
    root_cause: str
    resolution: str = ""


@dataclass(frozen=True)
class TaskData:
    task: str  # "rca" or "qa"
    source: str  # "synthetic", "teleqna" (the copies in the package) or the file path
    split: str
    items: tuple[Any, ...]
    labels: tuple[str, ...] = ()  # RCA label set (sorted)
    fewshot: tuple[Any, ...] = ()  # QA: worked examples shown before every item (from the train split)

    def __len__(self) -> int:
        return len(self.items)


def label_text(label: str) -> str:
    """How a label is read by the model: 'fibre_cut' -> 'fibre cut'."""
    return label.replace("_", " ").strip()


def item_answer(item: Any) -> str:
    """The answer an item is trained towards: an RCA ticket's root cause, a QA item's correct choice."""
    if isinstance(item, RCAItem):
        return item.root_cause
    return item.choices[item.answer]


def item_text(item: Any) -> str:
    """The text of an item a model reads (ticket, or question with its choices)."""
    if isinstance(item, RCAItem):
        return item.ticket
    return item.question + "\n" + "\n".join(item.choices)
