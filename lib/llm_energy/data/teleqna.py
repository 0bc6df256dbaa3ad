"""TeleQnA's own format: a JSON object of questions with "option N" keys, in an AES-encrypted zip.

Maatouk et al., "TeleQnA: A Benchmark Dataset to Assess Large Language Models Telecommunications
Knowledge" (MIT licence). The zip's password is public (upstream README); pass it as a parameter.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

from ..items import DataError, QAItem

_OPTION = re.compile(r"^option (\d+)$")
_ANSWER = re.compile(r"^option (\d+)\s*:")


def _decode(raw: bytes, path: Path, member: str | None = None) -> dict[str, Any]:
    name = f"{path}!{member}" if member else str(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(name, f"is not valid UTF-8 text (byte {exc.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(name, f"is not valid TeleQnA JSON ({exc.msg})", exc.lineno) from None
    if not isinstance(data, dict):
        raise DataError(name, "expected a JSON object mapping 'question N' to questions")
    return data


def read_teleqna_json(path: Path, password: str | None = None) -> dict[str, Any]:
    if path.suffix.lower() != ".zip":
        return _decode(path.read_bytes(), path)
    import pyzipper

    with pyzipper.AESZipFile(path) as archive:
        members = [n for n in archive.namelist() if n.lower().endswith((".txt", ".json"))]
        if not members:
            raise DataError(path, "holds no .txt or .json member")
        if password:
            archive.setpassword(password.encode())
        try:
            raw = archive.read(members[0])
        except RuntimeError as exc:
            hint = "set tasks.qa.password" if not password else "the password is wrong"
            raise DataError(path, f"cannot be decrypted ({exc}); {hint}", field="password") from None
    return _decode(raw, path, members[0])


def _teleqna_item(key: str, record: Any, where: str) -> QAItem:
    if not isinstance(record, dict):
        raise DataError(where, "expected an object")
    options = sorted(
        ((int(m.group(1)), str(v).strip()) for k, v in record.items() if (m := _OPTION.match(k))),
        key=lambda pair: pair[0],
    )
    if len(options) < 2:
        raise DataError(where, "needs at least two 'option N' keys", field="options")
    empty = [f"option {n}" for n, text in options if not text]
    if empty:
        raise DataError(where, f"{empty[0]} is empty", field="options")
    texts = [text for _, text in options]
    repeated = sorted({t for t in texts if texts.count(t) > 1})
    if repeated:
        raise DataError(where, f"the choice {repeated[0]!r} appears more than once", field="options")
    question = str(record.get("question") or "").strip()
    if not question:
        raise DataError(where, "is empty", field="question")
    match = _ANSWER.match(str(record.get("answer") or ""))
    if not match:
        raise DataError(where, f"expected 'option N: text', got {record.get('answer')!r}", field="answer")
    numbers = [n for n, _ in options]
    answer_number = int(match.group(1))
    if answer_number not in numbers:
        raise DataError(where, f"names option {answer_number}, which does not exist", field="answer")
    return QAItem(
        id=key,
        question=question,
        choices=tuple(texts),
        answer=numbers.index(answer_number),
        category=str(record.get("category") or ""),
        explanation=str(record.get("explanation") or ""),
    )


def iter_teleqna(path: Path, password: str | None = None) -> Iterator[tuple[str, QAItem | DataError]]:
    """Every TeleQnA record in file order: (its key, the item, or the DataError that rejects it), so that
    a caller can stop on the first bad record or skip and list them."""
    for key, record in read_teleqna_json(path, password).items():
        try:
            yield key, _teleqna_item(key, record, f"{path} [{key}]")
        except DataError as exc:
            yield key, exc
