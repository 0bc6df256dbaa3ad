"""The fine-tuning phase (notebook ``02_finetune``): a LoRA adapter trained at one precision on the
task's training split, one measured energy window per epoch, saved for the inference phase.

The training itself (LoRA, k-bit training, QLoRA) is :mod:`llm_energy.methods.lora_training`; this module
reads the splits, puts the adapter where the study expects it and writes ``training.csv``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..config import FinetuneParams, validate_section
from ..items import TaskData
from ..layout import StudyLayout, config_id_for
from ..measure.meter import EnergyMeter
from ..methods.lora_training import FinetuneResult, finetune
from ..models.loading import LoadedModel
from ..report import figures
from ..tables.rows import record_training
from .evaluation import ConfigRun, probe_rate, record_idle_drift, training_splits

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

ADAPTER_NAME = "lora"


def parameters(run: ConfigRun, finetune_section: dict,
               config_id: str = "") -> tuple[ConfigRun, FinetuneParams]:
    """The notebook's `finetune` parameter validated, and the run's config id: ``config_id`` when the
    runner gave one, else <model>__<precision>__lora."""
    params = validate_section(FinetuneParams, finetune_section, "finetune")
    run = run.with_config_id(config_id or config_id_for(run.model.name, run.precision, adapter=ADAPTER_NAME))
    return run, params


def splits(run: ConfigRun, params: FinetuneParams) -> tuple[TaskData, TaskData]:
    """The task's whole training and validation splits (the spec samples from them)."""
    return training_splits(run, params.task)


def train(run: ConfigRun, params: FinetuneParams, loaded: LoadedModel, meter: EnergyMeter,
          train_split: TaskData, validation_split: TaskData) -> FinetuneResult:
    """Train and save the adapter under the study's adapters/<config id>/, then write its epochs."""
    limit = probe_rate(run)  # before the windows (a notebook run alone probes its precision here)
    result = finetune(loaded, train_split.items, validation_split.items, params, meter,
                      StudyLayout(run.study_dir).adapter(run.config_id), label_set=train_split.labels)
    record_training(run.study_dir, run.identity(adapter=ADAPTER_NAME), result, loaded.device, params.task,
                    limit=limit)
    record_idle_drift(run, meter, "finetune")  # loaded idle again, after the epochs: did it drift?
    return result


def epochs_table(result: FinetuneResult) -> pd.DataFrame:
    """One row per epoch: loss, time, energy and its method, examples and tokens, and the eval loss's
    own window (what training.csv holds)."""
    import dataclasses

    import pandas as pd

    rows = []
    for e in result.epochs:
        row = {f.name: getattr(e, f.name) for f in dataclasses.fields(e)
               if f.name not in ("record", "eval_record")}
        if e.eval_record is not None:
            row.update(eval_duration_s=e.eval_record.duration_s, eval_energy_kwh=e.eval_record.energy_kwh)
        rows.append(row)
    return pd.DataFrame(rows)


def epochs_figure(result: FinetuneResult, config_id: str = "") -> Figure:
    """This training run per epoch: training and validation loss, and the energy of each epoch's
    window against the loss it reached (the paper's Figure 3, for one config;
    :func:`llm_energy.report.figures.epochs_figure`)."""
    return figures.epochs_figure(result.epochs, config_id or str(result.adapter_dir.name))
