"""The inference phase (notebook ``03_inference``): one model at one precision, optionally with a
LoRA adapter from the fine-tuning phase, scored on every task inside measured energy windows.

Steps, in the order the notebook runs them: :func:`load`, :func:`prepare` (scoring path chosen
before anything is measured, config row written), then :func:`evaluate` with a meter from
:func:`llm_energy.evaluation.open_meter`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from .evaluation import ConfigRun, data_description, evaluate_config
from .energy import EnergyMeter
from .lora import load_adapter
from .models import LoadedModel, load_model
from .records import record_config
from .scoring import ScoringPath, choose_scoring_path


def load(run: ConfigRun, adapter_dir: str = "") -> LoadedModel:
    """The model at the run's precision, with the LoRA adapter from ``adapter_dir`` on it if given."""
    loaded = load_model(run.model, run.precision, run.device, base_dir=run.base_dir)
    if adapter_dir:
        model = load_adapter(loaded, adapter_dir)
        loaded = replace(loaded, model=model, weights_origin=f"{loaded.weights_origin}; LoRA adapter {adapter_dir}")
    return loaded


def prepare(run: ConfigRun, loaded: LoadedModel, adapter: str = "none") -> ScoringPath:
    """Choose the scoring path before any measured window and write the config's row (status ok,
    where its weights came from, the scoring path)."""
    path = choose_scoring_path(loaded.model, loaded.tokenizer)
    record_config(run.study_dir, run.config_id, run.model.name, run.precision, "ok",
                  weights_origin=loaded.weights_origin, adapter=adapter, scoring_path=path.name,
                  data=data_description(run.tasks, run.base_dir))
    return path


def evaluate(run: ConfigRun, loaded: LoadedModel, meter: EnergyMeter, adapter: str = "none") -> list[dict[str, Any]]:
    """Every task measured and written to the tables, as an inference-phase config."""
    return evaluate_config(run, loaded, meter, phase="inference", adapter=adapter)
