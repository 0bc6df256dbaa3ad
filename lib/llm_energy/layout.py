"""Names and places: config ids, the project's folders, and the layout of a study's output folder.

Every path a phase, the runner or the report reads or writes is built here, so the output contract
(DESIGN.md) has one home. Nothing here touches the file system except :func:`project_root`, which
looks for the project above the working directory.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The phase notebooks, in run order.
NOTEBOOKS: dict[str, str] = {"data": "01_data.ipynb", "finetune": "02_finetune.ipynb",
                             "inference": "03_inference.ipynb", "pruning": "04_pruning.ipynb",
                             "ranking": "05_ranking.ipynb"}


# Keys only a whole study file has: a notebook given them was handed a study, not one of its jobs.
STUDY_ONLY_KEYS = ("study", "description", "phases", "models", "precisions", "cluster")


class StudyParametersGiven(ValueError):
    """A phase notebook was given a study's parameters file instead of one job's parameters."""


def refuse_study_parameters(namespace: Mapping[str, Any],
                            notebook: str = "notebooks/03_inference.ipynb") -> None:
    """Stop a notebook that papermill gave a whole study file (``-f params/default.yaml``): its
    ``models`` and ``precisions`` match no parameter, so it would otherwise run its defaults."""
    given = [key for key in STUDY_ONLY_KEYS if key in namespace]
    if given:
        raise StudyParametersGiven(
            f"these parameters describe a whole study (keys {', '.join(given)}), but a notebook runs one job "
            "of a study. Write one job's parameters with `llm-energy params STUDY.yaml --job JOB_ID -o "
            "job.yaml` (list the job ids with `llm-energy jobs STUDY.yaml`), then run "
            f"`papermill {notebook} out.ipynb -f job.yaml`; or run the whole study with `llm-energy run "
            "STUDY.yaml`.")


def config_id_for(model: str, precision: str, adapter: str = "none", pruning: str = "none") -> str:
    """The row key of a config in every table: model__precision[__adapter][__pruning]."""
    parts = [model, precision]
    if adapter != "none":
        parts.append(adapter)
    if pruning != "none":
        parts.append(pruning)
    return "__".join(parts)


# a recovered config's id: its pruned config's id + "__recovered"
RECOVERED_SUFFIX = "recovered"

# the pruning labels the runner writes into config ids: "magnitude-unstructured-50", "wanda-2of4"
_RUNNER_PRUNING = r"([a-z_]+)-(?:unstructured-([\d.]+)|(\d+)of(\d+))"


def pruning_words(label: str) -> str | None:
    """A runner pruning label as words ("wanda 2:4", "magnitude unstructured 50%"); None for any other."""
    import re

    found = re.fullmatch(_RUNNER_PRUNING, label)
    if not found:
        return None
    method, percent, kept, group = found.groups()
    return f"{method} {kept}:{group}" if kept else f"{method} unstructured {percent}%"


def config_words(config_id: object, drop_model: bool = False) -> str:
    """A config id as a person reads it, the parts of its grammar (:func:`config_id_for`) that are set:
    "m__fp32__lora__wanda-2of4__recovered" -> "m · fp32 · lora · wanda 2:4 · recovered" (``drop_model``:
    without the model, for a figure of one model). The one wording of config ids in the report, its
    tables and its figures."""
    parts = [p for p in str(config_id).split("__") if p]
    words = [(pruning_words(p) or p) if i > 1 else p for i, p in enumerate(parts)]
    if drop_model and len(words) > 1:
        words = words[1:]
    return " · ".join(words)


def parent_config_id(config_id: str, adapter: str = "none", pruning: str = "none") -> str | None:
    """The config a config was made from, by the grammar of :func:`config_id_for`: a recovered config's
    pruned one, a pruned config's target (its id without the pruning label), a fine-tuned config's base
    model at its precision; None for a base config."""
    if config_id.endswith(f"__{RECOVERED_SUFFIX}"):
        return config_id.removesuffix(f"__{RECOVERED_SUFFIX}")
    if pruning != "none" and config_id.endswith(f"__{pruning}"):
        return config_id.removesuffix(f"__{pruning}")
    if adapter != "none" and config_id.endswith(f"__{adapter}"):
        return config_id.removesuffix(f"__{adapter}")
    return None


def project_root(start: Path | None = None) -> Path:
    """The folder holding pyproject.toml above the working directory (notebooks run in notebooks/)."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "notebooks").is_dir():
            return folder
    return here


def notebooks_dir() -> Path:
    """The phase notebooks: the project's notebooks/ folder (installed editable from the repo)."""
    here = Path(__file__).resolve().parents[2] / "notebooks"
    if here.is_dir():
        return here
    return project_root() / "notebooks"


def resolve_study_dir(study_dir: str | Path) -> Path:
    """Empty means outputs/notebook-defaults of the project, wherever the notebook runs from; a
    relative path is read from the project root."""
    if not study_dir:
        return project_root() / "outputs" / "notebook-defaults"
    path = Path(study_dir).expanduser()
    return path if path.is_absolute() else (project_root() / path)


@dataclass(frozen=True)
class StudyLayout:
    """Where everything of one study run lives (``outputs/<study>/`` by default)."""

    root: Path

    @property
    def tables(self) -> Path:
        return self.root / "tables"

    def table(self, name: str) -> Path:
        return self.tables / f"{name}.csv"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def notebooks(self) -> Path:
        return self.root / "notebooks"

    def executed_notebook(self, phase: str, config_id: str | None) -> Path:
        """The papermill output of one job: <notebook stem>__<config id, or 'study'>.ipynb."""
        return self.notebooks / f"{Path(NOTEBOOKS[phase]).stem}__{config_id or 'study'}.ipynb"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def log(self, job_key: str) -> Path:
        return self.logs / f"{job_key}.log"

    @property
    def state(self) -> Path:
        return self.root / "state"

    def done_marker(self, job_key: str) -> Path:
        return self.state / f"{job_key}.done"

    def adapter(self, config_id: str) -> Path:
        """The LoRA adapter a fine-tuning job saves (and the inference phase evaluates)."""
        return self.root / "adapters" / config_id

    def pruned_weights(self, config_id: str) -> Path:
        """Pruned dense weights on their way to a quantized precision."""
        return self.root / "pruned" / config_id

    @property
    def failures(self) -> Path:
        return self.root / "failures.json"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    @property
    def params_resolved(self) -> Path:
        return self.root / "params.resolved.yaml"

    @property
    def provenance(self) -> Path:
        return self.root / "provenance.json"


def done_seconds(marker: Path) -> list[float]:
    """Every run's wall seconds a job's done marker (:meth:`StudyLayout.done_marker`) records, earlier
    runs first (``earlier_runs_s``: a job the re-measure stage ran again), the last run last; [] without
    a readable marker."""
    import json

    try:
        record = json.loads(marker.read_text() or "{}")
    except (OSError, ValueError):
        return []
    return [float(s) for s in record.get("earlier_runs_s", [])] + (
        [float(record["seconds"])] if "seconds" in record else [])
