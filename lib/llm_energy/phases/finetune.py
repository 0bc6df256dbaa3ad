"""The fine-tuning phase (notebook ``02_finetune``): a LoRA adapter trained at one precision on the
task's training split, one measured energy window per epoch, saved for the inference phase.

The training itself (LoRA, k-bit training, QLoRA) is :mod:`llm_energy.methods.lora_training`; this module reads the
splits, puts the adapter where the study expects it and writes ``training.csv``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ..config import FinetuneParams, validate_section
from ..items import TaskData
from ..layout import StudyLayout, config_id_for
from ..measure.meter import EnergyMeter
from ..methods.lora_training import FinetuneResult, finetune
from ..models.loading import LoadedModel
from ..tables.rows import record_training
from .evaluation import ConfigRun, training_splits

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

ADAPTER_NAME = "lora"


def parameters(run: ConfigRun, finetune_section: dict, config_id: str = "") -> tuple[ConfigRun, FinetuneParams]:
    """The notebook's `finetune` parameter validated, and the run's config id: ``config_id`` when the
    runner gave one, else <model>__<precision>__lora."""
    params = validate_section(FinetuneParams, finetune_section, "finetune")
    run = run.with_config_id(config_id or config_id_for(run.model.name, run.precision, adapter=ADAPTER_NAME))
    return run, params


def splits(run: ConfigRun, params: FinetuneParams) -> tuple[TaskData, TaskData]:
    """The task's whole training and validation splits (the spec samples from them)."""
    return training_splits(run, params.task)


def train(run: ConfigRun, params: FinetuneParams, loaded: LoadedModel, meter: EnergyMeter, train_split: TaskData,
          validation_split: TaskData) -> FinetuneResult:
    """Train and save the adapter under the study's adapters/<config id>/, then write its epochs."""
    result = finetune(loaded, train_split.items, validation_split.items, params, meter,
                      StudyLayout(run.study_dir).adapter(run.config_id), label_set=train_split.labels)
    record_training(run.study_dir, run.identity(adapter=ADAPTER_NAME), result, loaded.device, params.task)
    return result


def epochs_table(result: FinetuneResult) -> pd.DataFrame:
    """One row per epoch: loss, time, energy and its method, examples and tokens (what training.csv holds)."""
    import dataclasses

    import pandas as pd

    return pd.DataFrame([{f.name: getattr(e, f.name) for f in dataclasses.fields(e) if f.name != "record"}
                         for e in result.epochs])


def epochs_figure(result: FinetuneResult, config_id: str = "") -> Figure:
    """This training run per epoch: training and validation loss, and the energy of each epoch's
    window against the loss it reached (the paper's Figure 3, for one config)."""
    from matplotlib.figure import Figure

    epochs = [e.epoch for e in result.epochs]
    fig = Figure(figsize=(9, 3.2))
    left, right = fig.subplots(1, 2)
    left.plot(epochs, [e.train_loss for e in result.epochs], "o-", label="training")
    left.plot(epochs, [e.eval_loss for e in result.epochs], "s--", label="validation")
    left.set_xlabel("epoch")
    left.set_ylabel("loss (nats per answer token)")
    left.set_xticks(epochs)
    left.legend(fontsize=8)
    cumulative_kwh = 0.0
    points = []
    for epoch in result.epochs:
        cumulative_kwh += epoch.energy_kwh
        points.append((cumulative_kwh * 3.6e3, epoch.train_loss if math.isnan(epoch.eval_loss) else epoch.eval_loss))
    right.plot([x for x, _ in points], [y for _, y in points], "o-", color="#55a868")
    for epoch, (x, y) in zip(epochs, points):
        right.annotate(f"epoch {epoch}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    right.set_xlabel(f"energy spent so far (kJ, {result.final.energy_method})")
    right.set_ylabel("loss reached")
    for axis in (left, right):
        axis.ticklabel_format(axis="y", useOffset=False)
    fig.suptitle(config_id or str(result.adapter_dir.name), fontsize=10)
    fig.tight_layout()
    return fig
