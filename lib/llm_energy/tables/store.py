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
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import pandas as pd

from ..analysis.ranking_math import RANKING_COLUMNS
from ..layout import StudyLayout


@dataclass(frozen=True)
class EnergyRow:
    """One row of energy.csv: one config x phase x task (an inference task's measured windows summed
    or averaged into one row, or a fine-tuning run's epochs). Its columns are this type's fields, in
    order; every writer builds one of these, so the table has one definition."""

    config_id: str
    phase: str  # inference | pruning (evaluations of a config) | finetune | recovery (training)
    model: str
    precision: str
    adapter: str = "none"
    pruning: str = "none"
    sparsity_pattern: str | None = None
    target_sparsity: float = 0.0
    measured_sparsity: float | None = None
    task: str = ""
    n_items: int = 0
    n_tokens: int = 0  # tokens as they ran through the model (a shared few-shot prefix once per call)
    duration_s: float | None = None
    energy_kwh: float | None = None  # gross: everything the meter read in the windows
    energy_net_kwh: float | None = None  # net of the job's loaded-idle power over the same time
    cpu_energy_kwh: float | None = None
    gpu_energy_kwh: float | None = None
    ram_energy_kwh: float | None = None
    emissions_kg: float | None = None
    energy_method: str | None = None  # the first component's method (see cpu/gpu/ram_method)
    device: str | None = None
    repeats: int = 1  # measured windows
    # the uncertainty of energy_kwh that energy_std_estimator names (see RepeatedMeasurement.std)
    energy_kwh_std: float | None = None
    cpu_method: str | None = None
    gpu_method: str | None = None
    ram_method: str | None = None
    estimated_components: str | None = None
    energy_scope: str | None = None
    country_iso_code: str | None = None
    carbon_intensity_g_per_kwh: float | None = None
    # how the energy was windowed: every window a full pass (repeat), or one pass in chunks (chunk)
    windows: int | None = None
    window_unit: str | None = None
    energy_std_estimator: str | None = None  # what energy_kwh_std is (sd_of_repeats | se_of_chunk_sum)
    energy_kwh_se: float | None = None  # standard error of energy_kwh (both designs)
    # net energy at or below zero: the windows drew no more than the loaded-idle baseline (noise)
    net_at_or_below_idle: bool | None = None
    idle_power_w: float | None = None
    idle_loaded_power_w: float | None = None
    idle_system_power_w: float | None = None
    duration_s_std: float | None = None
    energy_kwh_per_item: float | None = None
    n_tokens_prompted: int | None = None  # tokens of every prompt as written (the shared prefix per item)
    energy_kwh_per_1k_tokens: float | None = None  # per 1k tokens as they ran (n_tokens)
    energy_kwh_per_correct: float | None = None  # per correct answer under the task's headline metric
    # the compute in words (LoadedModel.compute_description), not a dtype; the column keeps its name
    compute_dtype: str | None = None
    memory_bytes: int | None = None
    n_generated_tokens: int | None = None
    energy_kwh_per_1k_generated_tokens: float | None = None
    # energy per token in the field's units (J), gross and net of loaded idle: input tokens of a scoring
    # window (as they ran), output tokens of a generation window (basis in output_token_basis)
    j_per_input_token: float | None = None
    j_per_input_token_net: float | None = None
    j_per_output_token: float | None = None
    j_per_output_token_net: float | None = None
    output_token_basis: str | None = None
    # disturbed windows (measure/disturbance.py): the kept windows' worst readings, how many kept
    # windows carry the contaminated flag, how many were discarded and measured again, how many ran
    # well below the median window's rate
    canary_slowdown: float | None = None
    canary_vs_study: float | None = None
    foreign_cpu_share: float | None = None
    steal_share: float | None = None
    foreign_gpu_processes: int | None = None
    contaminated: bool | None = None
    contaminated_windows: int | None = None
    remeasured_windows: int | None = None
    rate_outlier_windows: int | None = None
    # how near the device's limit the work ran (measure/flops.py, measure/throughput.py): the useful
    # GFLOP of the tokens as they ran (training: forward and backward), over duration_s, and that rate
    # over the throughput probe's for this precision (probe_gflop_per_s; limit_basis: whose probe)
    gflop: float | None = None
    gflop_per_s: float | None = None
    limit_share: float | None = None
    probe_gflop_per_s: float | None = None
    limit_basis: str | None = None


def required_columns(row_type: type) -> list[str]:
    """A row type's required columns: its fields without a default, in order."""
    return [f.name for f in fields(row_type) if f.default is MISSING and f.default_factory is MISSING]


def as_rows(*records: Any) -> list[dict[str, Any]]:
    """Rows for :func:`upsert_rows` from typed rows (every field a column)."""
    return [asdict(r) for r in records]


@dataclass(frozen=True)
class ScoreRow:
    """scores.csv: one metric of one task of one config, with its 95% bootstrap interval."""

    config_id: str
    task: str
    metric: str
    value: float
    ci_low: float
    ci_high: float
    n_items: int
    data: str = ""  # the data it was scored on (synthetic says so)
    style: str = ""  # how it was scored (QA: cloze | options; RCA: labels; generation)
    fewshot: int = 0  # worked examples shown before every item
    fewshot_ids: str = ""


@dataclass(frozen=True)
class ItemScoreRow:
    """item_scores.csv: one item's value of one metric (what the resampling and the paired tests use)."""

    config_id: str
    task: str
    metric: str
    item_id: str
    value: float


@dataclass(frozen=True)
class WindowRow:
    """energy_repeats.csv: one measured window of a config x phase x task."""

    config_id: str
    phase: str
    task: str
    repeat: int
    duration_s: float
    energy_kwh: float
    energy_net_kwh: float
    n_items: int  # the window's items (a chunk's, or every item for a full-pass repeat)
    window_unit: str = "repeat"  # repeat | chunk
    task_items: int | None = None  # the items the task scored in all
    # what the disturbance witnesses read around this window (NaN: not read), its flag and why,
    # how many windows were measured for it (more than 1: contaminated ones measured again), and its
    # items per second over the median window's
    canary_slowdown: float | None = None
    canary_vs_study: float | None = None
    foreign_cpu_share: float | None = None
    steal_share: float | None = None
    foreign_gpu_processes: int | None = None
    contaminated: bool | None = None
    disturbance: str = ""
    attempts: int = 1
    rate_vs_median: float | None = None
    rate_outlier: bool | None = None
    gflop: float | None = None  # the window's useful work, its rate and that rate over the probe's
    gflop_per_s: float | None = None
    limit_share: float | None = None


@dataclass(frozen=True)
class TrainingRow:
    """training.csv: one epoch of a fine-tuning (or recovery) run."""

    config_id: str
    model: str
    precision: str
    adapter: str
    epoch: int
    train_loss: float
    eval_loss: float
    duration_s: float
    energy_kwh: float
    emissions_kg: float
    cpu_method: str | None
    gpu_method: str | None
    ram_method: str | None
    estimated_components: str | None
    energy_scope: str | None
    country_iso_code: str | None
    carbon_intensity_g_per_kwh: float | None
    phase: str = "finetune"  # finetune | recovery
    energy_method: str | None = None
    n_examples: int = 0
    n_tokens: int = 0
    energy_net_kwh: float | None = None
    gflop: float | None = None  # the epoch's useful work, forward and backward (lora_training.training_gflop)
    gflop_per_s: float | None = None
    # the eval loss after the epoch, computed in a window of its own (not in the epoch's duration_s)
    eval_duration_s: float | None = None
    eval_energy_kwh: float | None = None
    eval_energy_net_kwh: float | None = None


@dataclass(frozen=True)
class SetupRow:
    """setup_energy.csv: one measured step that made a config (the pruning phase's load, calibration,
    prune, quantize)."""

    config_id: str
    step: str
    order: int
    duration_s: float
    energy_kwh: float
    energy_net_kwh: float
    emissions_kg: float
    energy_method: str
    model: str = ""
    precision: str = ""
    adapter: str = "none"
    pruning: str = "none"
    device: str = ""
    net_at_or_below_idle: bool = False
    note: str = ""
    cpu_method: str | None = None
    gpu_method: str | None = None
    ram_method: str | None = None
    estimated_components: str | None = None
    energy_scope: str | None = None
    country_iso_code: str | None = None
    carbon_intensity_g_per_kwh: float | None = None


@dataclass(frozen=True)
class ConfigRow:
    """configs.csv: every config, ok / skipped / failed, and what it is made of and runs."""

    config_id: str
    model: str
    precision: str
    adapter: str
    pruning: str
    status: str
    reason: str
    weights_origin: str
    scoring_path: str
    kernel: str = ""
    kernel_note: str = ""
    data: str = ""
    # the SLURM job the config's job ran in (empty when not under SLURM), and what SLURM gave it:
    # OverSubscribe=NO is a node of its own (the runner's energy attribution follows it)
    slurm_job_id: str = ""
    slurm_oversubscribe: str = ""


@dataclass(frozen=True)
class IdleRow:
    """idle_baselines.csv: a job's system or loaded idle power."""

    config_id: str
    phase: str
    kind: str
    power_w: float
    duration_s: float
    method: str
    device: str
    # where the job ran (measure/hardware.py), read when its baselines were recorded: a job on another
    # node (SLURM) shows its own machine; isa_flags: the speed-deciding CPU flags present, ";"-joined
    host: str | None = None
    cpu_model: str | None = None
    isa_flags: str | None = None
    cpu_cores: int | None = None
    governor: str | None = None
    cpu_mhz: float | None = None
    load_avg_1m: float | None = None
    gpu_name: str | None = None
    gpu_power_limit_w: float | None = None
    disturbance: str = ""  # thresholds the idle window passed (measure/disturbance.py)
    # loaded_after rows: (after - before) / before against the loaded idle before the job's windows,
    # and whether that passes energy.max_idle_drift
    idle_drift: float | None = None
    drifted: bool | None = None


ENERGY_ALL_COLUMNS: list[str] = [f.name for f in fields(EnergyRow)]
# the columns every energy row must have (the rest may be empty for a training row)
ENERGY_COLUMNS = ENERGY_ALL_COLUMNS[: ENERGY_ALL_COLUMNS.index("carbon_intensity_g_per_kwh") + 1]


SCORES_COLUMNS = required_columns(ScoreRow)
TRAINING_COLUMNS = required_columns(TrainingRow)
# ranking.csv: the arithmetic's columns (ranking_math.rank_configs), then how separable the top is
# (rank.add_top_uncertainty: p_best, tied_with_top)
RANKING_TABLE_COLUMNS = RANKING_COLUMNS + ["p_best", "tied_with_top"]

# table name -> (required columns in order, key columns that identify a row)
TABLES: dict[str, tuple[list[str], list[str]]] = {
    "energy": (ENERGY_COLUMNS, ["config_id", "phase", "task"]),
    "scores": (SCORES_COLUMNS, ["config_id", "task", "metric"]),
    "training": (TRAINING_COLUMNS, ["config_id", "epoch"]),
    "ranking": (RANKING_TABLE_COLUMNS, ["config_id", "w"]),
    "item_scores": (required_columns(ItemScoreRow), ["config_id", "task", "metric", "item_id"]),
    "energy_repeats": (required_columns(WindowRow), ["config_id", "phase", "task", "repeat"]),
    "token_lengths": (["task", "dataset", "split", "item_id", "n_tokens", "tokenizer"],
                      ["task", "dataset", "split", "item_id"]),
    "pruning_layers": (
        ["config_id", "pruning", "method", "sparsity_pattern", "target_sparsity", "layer", "out_features",
         "in_features", "n_weights", "n_zero", "measured_sparsity", "verified_nm"],
        ["config_id", "layer"],
    ),
    "comparisons": (
        ["config_a", "config_b", "task", "metric", "diff", "ci_low", "ci_high", "p_value", "test", "n_items",
         "family", "p_adjusted"],
        ["config_a", "config_b", "task", "metric"],
    ),
    "sparse_plan": (
        ["config_id", "shape", "layers", "convert", "alg_id", "min_tokens", "best_speedup", "reason",
         "tokens", "dense_ms", "sparse_ms", "speedup"],
        ["config_id", "shape", "tokens"],
    ),
    "idle_baselines": (required_columns(IdleRow), ["config_id", "phase", "kind"]),
    "configs": (required_columns(ConfigRow), ["config_id"]),
    # what making a config cost, per measured setup step (the pruning phase: load, calibration, prune,
    # quantize)
    "setup_energy": (required_columns(SetupRow), ["config_id", "step"]),
    # the ranking phase: every config's setup energy by step, energy per query, break-even against its
    # reference
    "lifecycle": (
        ["config_id", "reference", "step", "source_config", "setup_kwh", "setup_net_kwh", "setup_g_co2e",
         "method", "estimate", "per_query_j", "break_even_queries"],
        ["config_id", "step", "source_config"],
    ),
    # the data phase: every item's split (from the file, or the seeded assignment) and whether it is scored
    "splits": (["task", "source", "item_id", "class", "split", "assigned_by", "scored"], ["task", "item_id"]),
    # records that `invalid_records: skip` left out, with where and why
    "skipped_records": (["task", "source", "file", "line", "record", "field", "reason"],
                        ["task", "file", "record"]),
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
                new[key] = (new[key].astype(str) if key in ("config_id", "item_id", "task", "metric")
                            else new[key])
            if len(old):  # (whole columns compared, not a Python join per row: tables reach 10^4 rows)
                replaced = pd.MultiIndex.from_frame(old[keys].astype(str)).isin(
                    pd.MultiIndex.from_frame(new[keys].astype(str)))
                old = old[~replaced]
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
