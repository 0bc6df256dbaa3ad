"""Typed, validated study parameters.

A study file (YAML) is validated completely before anything runs: every problem is collected and
reported with the file, the line, the key path and what was expected. Unknown keys are errors.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Precision = Literal["fp32", "bf16", "fp16", "int8", "nf4", "fp4"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16", "int8", "nf4", "fp4")
PRECISION_BITS: dict[str, int] = {"fp32": 32, "bf16": 16, "fp16": 16, "int8": 8, "nf4": 4, "fp4": 4}
Phase = Literal["data", "inference", "ranking"]
PHASES: tuple[str, ...] = ("data", "finetune", "inference", "pruning", "ranking")
IMPLEMENTED_PHASES: tuple[str, ...] = PHASES
BUILTIN_MODELS: tuple[str, ...] = ("smollm2-135m-instruct", "tiny-random-llama")
TASK_NAMES: tuple[str, ...] = ("rca", "qa")

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


class GenerationParams(_Strict):
    """RCA resolution writing: fixed-length greedy generation scored by ROUGE-L and MiniLM similarity."""

    new_tokens: int = Field(32, gt=0)  # min = max new tokens, so energy per token compares like with like
    max_items: int | None = Field(16, gt=0)  # items generated for (the first of the scored sample)
    chat: bool = True  # wrap the prompt in the model's chat template (instruct models)
    batch_size: int = Field(8, gt=0)


class TaskSettings(_Strict):
    """One downstream task: where its data is and how much of it is scored."""

    data: str = "builtin"  # "builtin" or a path (.jsonl, .csv, TeleQnA .json/.txt or .zip)
    format: Literal["auto", "jsonl", "csv", "teleqna"] = "auto"
    split: str = "test"  # split scored in the inference phase (builtin: train, validation, test)
    max_items: int | None = Field(None, gt=0)  # cap on scored items (a seeded sample); null = all
    prompt: str | None = None  # template; null = the task's default
    columns: dict[str, str] = {}  # CSV column mapping: {our_name: their_name}
    password: str | None = None  # for an encrypted zip (TeleQnA's)
    sample_seed: int = 0  # seed of the max_items sample
    labels: list[str] | None = None  # rca: the label set; a record outside it is an error (null = labels found)
    generation: GenerationParams | None = None  # rca only: also write resolutions (null = skip)


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
        return self

    def enabled(self) -> dict[str, TaskSettings]:
        return {name: getattr(self, name) for name in TASK_NAMES if getattr(self, name) is not None}


class EnergySettings(_Strict):
    """How energy is measured. Every number carries its method; see lib/llm_energy/energy.py."""

    country_iso_code: str = "FRA"  # ISO 3166-1 alpha-3, sets the grid's carbon intensity
    carbon_intensity_g_per_kwh: float | None = Field(None, gt=0)  # explicit intensity overrides country
    measure_power_secs: float = Field(1.0, gt=0)  # CodeCarbon sampling period, seconds
    tracking_mode: Literal["machine", "process"] = "machine"  # CodeCarbon: whole machine or this process
    idle_seconds: float = Field(5.0, ge=0)  # idle baseline window, seconds (0 = no baseline)
    warmup: bool = True  # one unmeasured pass before measuring
    repeats: int = Field(3, ge=1)  # minimum measured repeats per workload
    max_repeats: int = Field(5, ge=1)  # stop repeating here even if the spread stays high
    target_rsd: float = Field(0.05, gt=0)  # stop once std/mean of the repeats is below this
    min_window_s: float = Field(0.25, ge=0)  # shorter workloads are repeated inside one window (NVML
    # counters update every ~20-100 ms; a window shorter than that would read as zero)

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


class RankingParams(_Strict):
    """R = w*phi + (1-w)*rho over the configs of the study."""

    w: float = Field(0.5, ge=0, le=1)  # weight of energy efficiency in the headline ranking
    w_grid: list[float] = [round(i / 10, 1) for i in range(11)]  # sweep shown in the report
    phi: Literal["minmax", "ratio"] = "minmax"  # minmax of energy per item, or E_min/E
    metrics: list[str] | None = None  # "task:metric" pairs counted in rho; null = all
    missing: Literal["error", "exclude"] = "error"  # a config lacking a metric: fail, or drop it
    bootstrap: int = Field(200, ge=0)  # resamples for rank stability

    @field_validator("w_grid")
    @classmethod
    def _grid(cls, values: list[float]) -> list[float]:
        if not values:
            raise ValueError("needs at least one w")
        bad = [v for v in values if not 0 <= v <= 1]
        if bad:
            raise ValueError(f"every w must lie in [0, 1]; got {bad}")
        return values


class FinetuneParams(_Strict):
    """LoRA / QLoRA fine-tuning, energy per epoch (Figure 3); adapters are evaluated in inference."""

    precisions: list[Precision] = ["fp32", "bf16", "int8", "nf4"]  # fp4 is not trained
    task: Literal["rca", "qa"] = "rca"
    rank: int = Field(8, gt=0)  # LoRA rank
    alpha: int = Field(16, gt=0)  # LoRA alpha (update scaled by alpha / rank)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "v_proj"]  # linear layers that get adapters
    learning_rate: float = Field(2e-4, gt=0)
    epochs: int = Field(2, gt=0)
    batch_size: int = Field(8, gt=0)
    max_length: int = Field(256, ge=2)  # tokens per example; a longer prompt is an error
    max_train_items: int | None = Field(None, gt=0)  # seeded sample of the training split; null = all
    max_eval_items: int | None = Field(None, gt=0)  # seeded sample of the validation split; null = all
    seed: int = 0

    @field_validator("precisions")
    @classmethod
    def _no_fp4(cls, values: list[str]) -> list[str]:
        if "fp4" in values:
            raise ValueError("fp4 is not a fine-tuning precision (QLoRA trains on nf4); use fp32, bf16, fp16, int8 or nf4")
        if len(set(values)) != len(values):
            raise ValueError("precisions must not repeat")
        return values


class PruningMethodParams(_Strict):
    method: Literal["magnitude", "wanda"]
    pattern: str = "unstructured"  # unstructured, or N:M such as 2:4 and 4:8 (keep N of every M)
    sparsity: float | None = None  # fraction zeroed; N:M implies (M-N)/M and refuses anything else

    @model_validator(mode="after")
    def _consistent(self) -> "PruningMethodParams":
        from .prune import PruningSpec

        PruningSpec(method=self.method, pattern=self.pattern, sparsity=self.sparsity)  # raises with the reason
        return self


class PruningParams(_Strict):
    """Pruning of the best configs (Figure 6)."""

    targets: list[str] | None = None  # "model:precision" to prune; null = the top_k of the inference ranking
    top_k: int = Field(1, gt=0)  # how many of the inference ranking's best base configs (at ranking.w)
    methods: list[PruningMethodParams] = Field(min_length=1)
    calibration_samples: int = Field(64, gt=0)  # Wanda: texts from the task's training split
    calibration_max_tokens: int = Field(256, gt=0)
    include: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    # auto: on CUDA, 2:4 layers at fp16/bf16 run cuSPARSELt where a timing says it is faster (dense
    # elsewhere, and always on CPU); off: pruned models always run dense kernels.
    sparse_kernels: Literal["auto", "off"] = "auto"

    @field_validator("targets")
    @classmethod
    def _targets(cls, values: list[str] | None) -> list[str] | None:
        for value in values or []:
            model, _, precision = value.partition(":")
            if not model or precision not in PRECISIONS:
                raise ValueError(f"target {value!r} must be 'model:precision' with a precision in {', '.join(PRECISIONS)}")
        return values


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


class Study(_Strict):
    """A whole study: models x precisions, tasks, measurement and ranking."""

    study: str  # name; results go to outputs/<study>/
    description: str = ""
    seed: int = 0  # seed for sampling and any randomness in the study
    device: Literal["cpu", "cuda", "auto"] = "cpu"  # auto resolves after validation, recorded
    phases: list[str] = ["data", "inference", "ranking"]  # any of data, finetune, inference, pruning, ranking
    models: list[ModelSettings] = Field(min_length=1)
    precisions: list[Precision] = Field(min_length=1)  # fp32 | bf16 | fp16 | int8 | nf4 | fp4
    tasks: TasksSettings = TasksSettings()
    energy: EnergySettings = EnergySettings()
    ranking: RankingParams = RankingParams()
    finetune: FinetuneParams | None = None  # needed when phases include finetune
    pruning: PruningParams | None = None  # needed when phases include pruning
    cluster: ClusterSettings = ClusterSettings()  # used only with --cluster local|slurm

    @model_validator(mode="after")
    def _phase_sections(self) -> "Study":
        if "finetune" in self.phases and self.finetune is None:
            raise ValueError("phase 'finetune' needs a 'finetune' section")
        if "pruning" in self.phases and self.pruning is None:
            raise ValueError("phase 'pruning' needs a 'pruning' section")
        if self.pruning is not None and self.pruning.targets:
            names = {m.name for m in self.models}
            for target in self.pruning.targets:
                model, _, precision = target.partition(":")
                if model not in names:
                    raise ValueError(f"pruning target {target!r} names model {model!r}, which is not in models")
        if "pruning" in self.phases and not (self.pruning and self.pruning.targets) and "inference" not in self.phases:
            raise ValueError("pruning without explicit targets ranks the inference phase's configs: add phase 'inference'")
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
            if value not in IMPLEMENTED_PHASES:
                raise ValueError(
                    f"phase {value!r} is not available in this version; available: "
                    + ", ".join(IMPLEMENTED_PHASES)
                )
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


def _raw_file_problems(raw: dict[str, Any], file: str, root: yaml.Node | None, base_dir: Path) -> list[Problem]:
    """Missing data files and model folders, found even when other keys are invalid."""
    problems = []
    tasks = raw.get("tasks")
    for name, task in (tasks.items() if isinstance(tasks, dict) else []):
        data = task.get("data") if isinstance(task, dict) else None
        if isinstance(data, str) and data != "builtin" and not resolve_path(data, base_dir).exists():
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
    """The validated study with every default filled in, as plain data (for params.resolved.yaml)."""
    return study.model_dump(mode="json")


def study_hash(study: Study) -> str:
    payload = json.dumps(resolved_dict(study), sort_keys=True).encode()
    return hashlib.sha256(payload).hexdigest()[:16]


def validate_section(model: type[BaseModel], raw: Any, section: str) -> Any:
    """Validate one section passed to a notebook as a literal (same rules as the study file)."""
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        problems = _problems_from_validation(err, f"notebook parameter '{section}'", None)
        raise StudyValidationError(problems) from None
