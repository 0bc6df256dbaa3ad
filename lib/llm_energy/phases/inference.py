"""The inference phase (notebook ``03_inference``): one model at one precision, optionally with a
LoRA adapter from the fine-tuning phase, scored on every task inside measured energy windows.

Steps, in the order the notebook runs them: :func:`load`, :func:`prepare` (scoring path chosen
before anything is measured, config row written), then :func:`measure_config_tasks` with a meter from
:func:`llm_energy.phases.evaluation.open_meter`. For a reader stepping through the notebook:
:func:`first_items` and :func:`score` (a few items in one window by hand, written nowhere),
:func:`answers` (what the model chose), :func:`config_figure` (this config's energy and scores).
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..items import QAItem, item_text
from ..measure.meter import EnergyMeter
from ..methods.lora_training import load_adapter
from ..methods.scoring import (
    ChoiceScores,
    PreparedTask,
    ScoringPath,
    score_prepared,
    task_result,
)
from ..models.loading import LoadedModel, load_model
from ..report import figures
from ..tables import store as results
from ..tables.rows import record_config
from . import reuse
from .evaluation import ConfigRun, data_description, evaluate_config, load_task_sets, mark_warm

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure


def load(run: ConfigRun, adapter_dir: str = "") -> LoadedModel:
    """The model at the run's precision, with the LoRA adapter from ``adapter_dir`` on it if given."""
    loaded = load_model(run.model, run.precision, run.device, base_dir=run.base_dir)
    if adapter_dir:
        model = load_adapter(loaded, adapter_dir)
        loaded = replace(loaded, model=model,
                         weights_origin=f"{loaded.weights_origin}; LoRA adapter {adapter_dir}")
    return loaded


def prepare(run: ConfigRun, loaded: LoadedModel, adapter: str = "none") -> ScoringPath:
    """Choose the scoring path before any measured window and write the config's row (status ok,
    where its weights came from, the scoring path). An earlier job of the study on the same
    architecture, precision and device (with or without an adapter) has chosen it already: its verdict
    is taken over and no layout probe runs (:mod:`llm_energy.phases.reuse`): the verdict does not
    depend on an adapter's weights."""
    path, _ = reuse.scoring_path(run.study_dir, loaded, run.model, run.base_dir)
    record_config(run.study_dir, run.config_id, run.model.name, run.precision, "ok",
                  weights_origin=loaded.weights_origin, adapter=adapter, scoring_path=path.name,
                  data=data_description(run.tasks, run.base_dir))
    return path


def measure_config_tasks(run: ConfigRun, loaded: LoadedModel, meter: EnergyMeter,
                         adapter: str = "none") -> list[dict[str, Any]]:
    """Every task measured and written to the tables, as an inference-phase config."""
    return evaluate_config(run, loaded, meter, phase="inference", adapter=adapter)


def evaluate(run: ConfigRun, loaded: LoadedModel, meter: EnergyMeter,
             adapter: str = "none") -> list[dict[str, Any]]:
    """Deprecated alias of :func:`measure_config_tasks` (the old name said nothing of the measuring)."""
    warnings.warn("llm_energy.phases.inference.evaluate is deprecated: use measure_config_tasks",
                  DeprecationWarning, stacklevel=2)
    return measure_config_tasks(run, loaded, meter, adapter)


def first_items(run: ConfigRun, loaded: LoadedModel, task: str | None = None, n: int = 2) -> PreparedTask:
    """The first ``n`` scored items of a task (default: qa if the study scores it, else its first
    task), tokenised as the phase prepares them, outside any measured window: the task's requests an
    earlier job of the study tokenised (or tokenised now, for this job's windows too), cut to ``n``."""
    task_sets = load_task_sets(run.tasks, run.base_dir)
    task = task or ("qa" if "qa" in task_sets else next(iter(task_sets)))
    data = task_sets[task]
    settings = run.tasks.enabled()[task]
    prepared = reuse.prepared_task(run.study_dir, loaded, run.model, run.base_dir, task, data,
                                   settings.prompt, settings.style)
    return replace(prepared, data=replace(data, items=tuple(data.items[:n])), encoded=prepared.encoded[:n])


def score(loaded: LoadedModel, prepared: PreparedTask) -> list[ChoiceScores]:
    """The forward passes over prepared items, and nothing else (what a measured window holds). They
    warm the model for the task: the phase's windows that follow skip their own warm-up."""
    scores = score_prepared(loaded.model, loaded.tokenizer, prepared)
    mark_warm(loaded.model, prepared.task, prepared.style)
    return scores


def answers(prepared: PreparedTask, scores: list[ChoiceScores], width: int = 70) -> pd.DataFrame:
    """Per item: the text (shortened), the gold answer, the model's choice, and whether they agree."""
    import pandas as pd

    result = task_result(prepared, scores, n_boot=10)
    rows = []
    for item, chosen in zip(prepared.data.items, result.predictions):
        options = item.choices if isinstance(item, QAItem) else prepared.labels
        gold = item.choices[item.answer] if isinstance(item, QAItem) else item.root_cause
        text = " ".join(item_text(item).split())
        rows.append({"id": item.id, "text": text if len(text) <= width else text[: width - 1] + "…",
                     "gold": gold, "chosen": options[chosen], "correct": options[chosen] == gold})
    return pd.DataFrame(rows).set_index("id")


def config_figure(run: ConfigRun) -> Figure:
    """This config's inference rows from the study's tables: energy per item for each task (hatched
    where a component is estimated, not counted) and each metric with its 95% interval
    (:func:`llm_energy.report.figures.config_figure`)."""
    return figures.config_figure(results.read_table(run.study_dir, "energy"),
                                 results.read_table(run.study_dir, "scores"), run.config_id)
