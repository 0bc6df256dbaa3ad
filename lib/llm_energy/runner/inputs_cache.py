"""What a study's inputs alone decide, kept on disk between runs: the records too long for a model's
context (:func:`.checks.records_over_context`) and the plan's count of each model's work
(:func:`.workload.study_work`).

Both read every model's tokenizer: importing transformers and parsing Gemma 3's 262k-entry vocabulary
took about 8 s of every ``llm-energy run`` of the default study before its first step (2-core AMD
EPYC), and the count tokenises every scored item again. The key holds the study's settings, the
content of every task's data file, the name, size and modification time of every file beside each
model's weights (configuration, tokenizer) and of its tokenizer's folder, the content of this
package's Python sources and the installed transformers' version: any change computes again. A hub
model's files are not local: a study with one is never cached. Entries are small JSON files under
the model cache (``models.loading.cache_root()/inputs``, or ``LLM_ENERGY_INPUTS_CACHE``); deleting
that folder clears them, and an unreadable entry is computed again.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ..config import Study

log = logging.getLogger(__name__)

T = TypeVar("T")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")  # not read by a tokenizer or a config


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """sha256 of this package's Python sources (their content: a fresh clone of the same commit agrees)."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _stamps(folder: Path) -> list[tuple[str, int, int]]:
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()
                  if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES))


def inputs_key(study: Study, base_dir: Path, kind: str, extra: Any = None) -> str | None:
    """The key of ``kind`` computed from ``study`` (``extra``: anything else it depends on), or None
    when an input cannot be named here (a hub model, a missing file): not cached then."""
    from importlib.metadata import PackageNotFoundError, version

    from ..data.tasks import task_file
    from ..models.loading import file_sha256, resolve_weights, tokenizer_folder

    try:
        models = []
        for spec in study.models:
            if spec.source == "hub":
                return None
            weights = Path(resolve_weights(spec, base_dir)[0])
            tokenizer = tokenizer_folder(spec, base_dir)
            models.append([spec.name, _stamps(weights), _stamps(tokenizer) if tokenizer else None])
        data = [[task, file_sha256(task_file(task, settings, base_dir))]
                for task, settings in sorted(study.tasks.enabled().items())]
        transformers = version("transformers")
    except (OSError, RuntimeError, ValueError, PackageNotFoundError) as exc:
        log.debug("inputs cache: %s not cached (%s)", kind, exc)
        return None
    text = json.dumps({"kind": kind, "study": study.model_dump(mode="json"), "base_dir": str(base_dir),
                       "models": models, "data": data, "extra": extra, "source": source_digest(),
                       "transformers": transformers}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


CACHE_ENV = "LLM_ENERGY_INPUTS_CACHE"  # another folder for the entries (the tests use their own)


def cache_dir() -> Path:
    from ..models.loading import cache_root

    return Path(os.environ[CACHE_ENV]) if os.environ.get(CACHE_ENV) else cache_root() / "inputs"


def cached(kind: str, key: str | None, compute: Callable[[], T], dump: Callable[[T], Any] = lambda v: v,
           load: Callable[[Any], T] = lambda v: v, keep: Callable[[T], bool] = lambda v: True) -> T:
    """``compute()``'s result for ``key``, from disk when an earlier run stored it (``load`` of what
    ``dump`` wrote, JSON), else computed and stored when ``keep(result)``; key None: computed, not
    stored."""
    if key is None:
        return compute()
    path = cache_dir() / f"{kind}-{key}.json"
    try:
        return load(json.loads(path.read_text()))
    except FileNotFoundError:
        pass
    except (OSError, ValueError, TypeError, KeyError) as exc:  # unreadable or from another layout
        log.warning("inputs cache: %s is unreadable (%s); computing it again", path, exc)
    value = compute()
    if keep(value):
        from ..tables.store import atomic_write_json

        try:
            atomic_write_json(path, dump(value))
        except OSError as exc:  # a read-only cache: the next run computes it again
            log.debug("inputs cache: %s not stored (%s)", path, exc)
    return value
