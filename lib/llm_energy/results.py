"""The study's tables: one writer for all of them.

Rows are upserted by key under a file lock and written to a temporary file that replaces the table
in one rename, so a table is never half written, never holds duplicate keys, and a rerun of a
config replaces its own rows without touching the others.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import pandas as pd

from .layout import StudyLayout

ENERGY_COLUMNS = [
    "config_id", "phase", "model", "precision", "adapter", "pruning", "sparsity_pattern",
    "target_sparsity", "measured_sparsity", "task", "n_items", "n_tokens", "duration_s",
    "energy_kwh", "energy_net_kwh", "cpu_energy_kwh", "gpu_energy_kwh", "ram_energy_kwh",
    "emissions_kg", "energy_method", "device", "repeats", "energy_kwh_std",
    "cpu_method", "gpu_method", "ram_method", "estimated_components", "energy_scope", "country_iso_code",
    "carbon_intensity_g_per_kwh",
]
SCORES_COLUMNS = ["config_id", "task", "metric", "value", "ci_low", "ci_high", "n_items"]
TRAINING_COLUMNS = [
    "config_id", "model", "precision", "adapter", "epoch", "train_loss", "eval_loss", "duration_s",
    "energy_kwh", "emissions_kg",
    "cpu_method", "gpu_method", "ram_method", "estimated_components", "energy_scope", "country_iso_code",
    "carbon_intensity_g_per_kwh",
]
RANKING_COLUMNS = [
    "config_id", "model", "precision", "adapter", "pruning", "energy_kwh_per_item", "phi", "rho", "w",
    "R", "rank",
]
# ranking.csv: the arithmetic's columns (rank.rank_configs), then how separable the top is
# (rank.add_top_uncertainty: p_best, tied_with_top)
RANKING_TABLE_COLUMNS = RANKING_COLUMNS + ["p_best", "tied_with_top"]

# table name -> (required columns in order, key columns that identify a row)
TABLES: dict[str, tuple[list[str], list[str]]] = {
    "energy": (ENERGY_COLUMNS, ["config_id", "phase", "task"]),
    "scores": (SCORES_COLUMNS, ["config_id", "task", "metric"]),
    "training": (TRAINING_COLUMNS, ["config_id", "epoch"]),
    "ranking": (RANKING_TABLE_COLUMNS, ["config_id", "w"]),
    "item_scores": (["config_id", "task", "metric", "item_id", "value"], ["config_id", "task", "metric", "item_id"]),
    "energy_repeats": (
        ["config_id", "phase", "task", "repeat", "duration_s", "energy_kwh", "energy_net_kwh", "n_items"],
        ["config_id", "phase", "task", "repeat"],
    ),
    "token_lengths": (["task", "dataset", "split", "item_id", "n_tokens", "tokenizer"], ["task", "dataset", "split", "item_id"]),
    "pruning_layers": (
        ["config_id", "pruning", "method", "sparsity_pattern", "target_sparsity", "layer", "out_features",
         "in_features", "n_weights", "n_zero", "measured_sparsity", "verified_nm"],
        ["config_id", "layer"],
    ),
    "comparisons": (
        ["config_a", "config_b", "task", "metric", "diff", "ci_low", "ci_high", "p_value"],
        ["config_a", "config_b", "task", "metric"],
    ),
    "sparse_plan": (
        ["config_id", "shape", "layers", "convert", "alg_id", "min_tokens", "best_speedup", "reason", "tokens",
         "dense_ms", "sparse_ms", "speedup"],
        ["config_id", "shape", "tokens"],
    ),
    "idle_baselines": (
        ["config_id", "phase", "kind", "power_w", "duration_s", "method", "device"],
        ["config_id", "phase", "kind"],
    ),
    "configs": (
        ["config_id", "model", "precision", "adapter", "pruning", "status", "reason", "weights_origin",
         "scoring_path"],
        ["config_id"],
    ),
    # the data phase: every item's split (from the file, or the seeded assignment) and whether it is scored
    "splits": (["task", "source", "item_id", "class", "split", "assigned_by", "scored"], ["task", "item_id"]),
    # records that `invalid_records: skip` left out, with where and why
    "skipped_records": (["task", "source", "file", "line", "record", "field", "reason"], ["task", "file", "record"]),
}


def tables_dir(study_dir: str | Path) -> Path:
    return StudyLayout(Path(study_dir)).tables


def table_path(study_dir: str | Path, name: str) -> Path:
    return StudyLayout(Path(study_dir)).table(name)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(path.suffix + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_table(study_dir: str | Path, name: str) -> pd.DataFrame:
    """A table as a DataFrame (empty, with its columns, when it does not exist yet)."""
    columns, _ = TABLES[name]
    path = table_path(study_dir, name)
    if not path.exists():
        return pd.DataFrame(columns=columns)
    text_columns = ("config_id", "item_id", "task", "metric", "adapter", "pruning", "model", "precision")
    # Ids such as "001" must stay text, so these columns are never parsed as numbers.
    return pd.read_csv(path, dtype={c: str for c in text_columns})


def upsert_rows(study_dir: str | Path, name: str, rows: Iterable[Mapping[str, Any]],
                replace_where: Mapping[str, Any] | None = None) -> Path:
    """Insert rows, replacing rows with the same key; optionally first drop rows matching a filter
    (e.g. every row of one config, so a rerun leaves no stale rows behind)."""
    columns, keys = TABLES[name]
    new = pd.DataFrame(list(rows))
    missing = [c for c in columns if c not in new.columns] if len(new) else []
    if missing:
        raise ValueError(f"rows for table '{name}' lack required columns {missing}")
    path = table_path(study_dir, name)
    with _locked(path):
        old = read_table(study_dir, name)
        if replace_where and len(old):
            drop = pd.Series(True, index=old.index)
            for column, value in replace_where.items():
                drop &= old[column].astype(str) == str(value)
            old = old[~drop]
        if len(new):
            for key in keys:
                new[key] = new[key].astype(str) if key in ("config_id", "item_id", "task", "metric") else new[key]
            if len(old):
                merged_keys = new[keys].astype(str).agg("\x1f".join, axis=1)
                old_keys = old[keys].astype(str).agg("\x1f".join, axis=1)
                old = old[~old_keys.isin(set(merged_keys))]
            frames = [f for f in (old, new) if len(f)]
            table = pd.concat(frames, ignore_index=True) if frames else new
        else:
            table = old
        ordered = columns + [c for c in table.columns if c not in columns]
        table = table.reindex(columns=ordered)
        atomic_write_text(path, table.to_csv(index=False))
    return path


def write_table(study_dir: str | Path, name: str, frame: pd.DataFrame) -> Path:
    """Replace a whole table (derived tables such as ranking.csv)."""
    columns, _ = TABLES[name]
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"table '{name}' lacks required columns {missing}")
    path = table_path(study_dir, name)
    ordered = columns + [c for c in frame.columns if c not in columns]
    with _locked(path):
        atomic_write_text(path, frame.reindex(columns=ordered).to_csv(index=False))
    return path
