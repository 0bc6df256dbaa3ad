"""What one job of a study computes before its windows and the study's later jobs reuse.

Every inference job used to spend seconds outside its measured windows redoing work whose result
cannot differ from one job to the next of the same study:

- the **scoring path** (:func:`llm_energy.methods.scoring.choose_scoring_path`): layout probes that run
  the model a dozen times to check that the packed forward and the shared few-shot prefix give the
  scores of the plain one. They check code paths (how the model's attention takes a ready 4D mask and
  continues a cache, in the kernels of its precision), not weight values, so the verdict is kept per
  (architecture, precision, device, kernels): the base model's, its fine-tuned variants' (a LoRA
  adapter adds per-token matmuls beside the linear layers and passes the mask and the cache through
  untouched) and its pruned variants' (the same layers, some weights zero) jobs share one;
- the **tokenised requests** of every task (:func:`llm_energy.methods.scoring.prepare_task`): the same
  texts through the same tokenizer, whatever the precision, so they are kept per (tokenizer, texts).

Both live in the study's ``state/reuse/`` folder, one file per key, the key a SHA-256 of everything
the result depends on: this package's source (any edit of the library invalidates them), torch's,
transformers' and bitsandbytes' versions, and for the tokens the model folder's files (names, sizes,
modification times and ``config.json``), for the scoring path its ``config.json`` (the architecture),
the precision, the device and the kernels the linear layers run (dense, or a sparse kernel). A model
without a local folder (a hub id) is never reused. A notebook run alone has its
own study folder and computes them itself the first time. A damaged file is ignored and rewritten.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

from ..items import TaskData
from ..layout import StudyLayout
from ..methods.scoring import (
    PreparedTask,
    ScoringPath,
    adopt_scoring_decisions,
    choose_scoring_path,
    prepare_task,
    request_texts,
    scoring_decisions,
)
from ..models.loading import LoadedModel, resolve_weights

log = logging.getLogger(__name__)

FOLDER = "reuse"
PACKAGE = Path(__file__).resolve().parent.parent


@functools.lru_cache(maxsize=1)
def library_hash() -> str:
    """SHA-256 of every Python source file of this package (its 'version' for reuse)."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*.py")):
        digest.update(str(path.relative_to(PACKAGE)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _versions() -> dict[str, str]:
    from importlib import metadata

    found = {}
    for name in ("torch", "transformers", "bitsandbytes", "tokenizers"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


def folder_fingerprint(folder: str | Path) -> dict[str, Any] | None:
    """Each file's name, size and modification time, and config.json's text; None for a path that
    is not a folder (a hub id: nothing to fingerprint, so nothing is reused)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    files = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = path.stat()
        files.append([str(path.relative_to(folder)), stat.st_size, stat.st_mtime_ns])
    config = folder / "config.json"
    return {"files": files, "config": config.read_text() if config.is_file() else ""}


def _key(kind: str, parts: dict[str, Any]) -> str:
    text = json.dumps({"kind": kind, "library": library_hash(), "versions": _versions(), **parts},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _path(study_dir: Path, kind: str, key: str, suffix: str) -> Path:
    return StudyLayout(study_dir).state / FOLDER / f"{kind}-{key}{suffix}"


def _write_atomic(path: Path, data: bytes) -> None:
    """Write through a temporary sibling and rename (jobs running side by side may race: both
    write the same content, the last rename wins, no reader sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def architecture_fingerprint(loaded: LoadedModel, spec: Any, base_dir: Path | None,
                             kernel: str = "dense") -> dict[str, Any] | None:
    """What the scoring path's verdict depends on, or None when the model has no local folder."""
    weights, _ = resolve_weights(spec, base_dir)
    config = Path(weights) / "config.json"
    if not config.is_file():
        return None
    return {"architecture": config.read_text(), "precision": loaded.precision, "device": loaded.device,
            "kernel": kernel}


def scoring_path(study_dir: Path, loaded: LoadedModel, spec: Any, base_dir: Path | None,
                 kernel: str = "dense") -> tuple[ScoringPath, bool]:
    """The model's scoring path: a verdict an earlier job of the study reached on the same
    architecture, precision, device and kernels (True: reused, no probe ran), else
    :func:`choose_scoring_path` now, kept for the later jobs (False). ``spec`` is the base model's
    settings (a fine-tuned or pruned variant is checked as its base's architecture)."""
    fingerprint = architecture_fingerprint(loaded, spec, base_dir, kernel)
    if fingerprint is None:
        return choose_scoring_path(loaded.model, loaded.tokenizer), False
    path = _path(Path(study_dir), "scoring_path", _key("scoring_path", fingerprint), ".json")
    try:
        saved = json.loads(path.read_text())
        adopt_scoring_decisions(loaded.model, saved["decisions"])
        reason = (saved["reason"] + " (checked by an earlier job of this study on this architecture and "
                  f"precision, reused from state/{FOLDER}/{path.name})")
        return ScoringPath(saved["name"], reason), True
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("reuse: %s unreadable (%s); choosing the scoring path again", path, exc)
    chosen = choose_scoring_path(loaded.model, loaded.tokenizer)
    record = {"name": chosen.name, "reason": chosen.reason, "decisions": scoring_decisions(loaded.model)}
    _write_atomic(path, json.dumps(record, indent=1).encode())
    return chosen, False


def prepared_task(study_dir: Path, loaded: LoadedModel, spec: Any, base_dir: Path | None, task: str,
                  data: TaskData, prompt: str | None, style: str) -> PreparedTask:
    """A task's tokenised requests: from an earlier job of the study that tokenised the same texts
    with the same tokenizer (any precision), else tokenised now and kept for the later jobs."""
    weights, _ = resolve_weights(spec, base_dir)
    tokenizer_files = folder_fingerprint(weights)
    if tokenizer_files is None:
        return prepare_task(task, loaded.tokenizer, data, prompt, style)
    texts = request_texts(task, data, prompt, style)
    key = _key("tokens", {"tokenizer": tokenizer_files, "task": task, "style": style, "texts": texts})
    path = _path(Path(study_dir), "tokens", key, ".pkl")
    try:
        encoded = tuple(pickle.loads(path.read_bytes()))
        if task == "qa":
            return PreparedTask("qa", data, encoded, style=style)
        return PreparedTask(task, data, encoded, tuple(data.labels))
    except FileNotFoundError:
        pass
    except Exception as exc:  # noqa: BLE001  (a damaged or foreign pickle: tokenise again)
        log.warning("reuse: %s unreadable (%s); tokenising again", path, exc)
    prepared = prepare_task(task, loaded.tokenizer, data, prompt, style)
    _write_atomic(path, pickle.dumps(list(prepared.encoded), protocol=pickle.HIGHEST_PROTOCOL))
    return prepared
