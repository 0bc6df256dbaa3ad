# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (llm-energy)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 — Fine-tuning: what adapting a model to the task costs, epoch by epoch
#
# In the paper's terms (Tran, Jaumard and Delgado, *Energy-Aware LLMs*, 2025), fine-tuning is an
# energy cost paid once to raise task quality at inference. This notebook trains a **LoRA** adapter
# on the RCA training split at one precision: fp32 or bf16/fp16 (plain LoRA), int8 (bitsandbytes k-bit
# training) or nf4 (**QLoRA**). Each epoch is one measured energy window (kWh, carbon, and the method
# per component); training and validation loss per epoch go to `training.csv` (Figure 3: energy against
# loss). The saved adapter is then evaluated by `03_inference`, so its quality gain can be weighed
# against the energy the training spent.
#
# Steps: parameters, the training and validation splits, system idle, load the base model, train
# (one window per epoch), the epochs as a table. Edit only the parameters cell to train your model.

# %% tags=["parameters"]
study_dir: str = ""  # output folder; empty means outputs/notebook-defaults of the project
config_id: str = ""  # row key; empty means <model>__<precision>__lora
model: dict = {"name": "tiny-random-llama"}  # a `models` entry
precision: str = "fp32"  # fp32 | bf16 | fp16 | int8 | nf4
device: str = "cpu"  # cpu | cuda
tasks: dict = {"rca": {}, "qa": {}}  # the study's `tasks` section (data files)
energy: dict = {"idle_seconds": 1.0}  # the study's `energy` section
finetune: dict = {"epochs": 2, "max_train_items": 16, "max_eval_items": 8, "max_length": 320,
                  "learning_rate": 0.001}  # `finetune` section
seed: int = 0
base_dir: str = ""  # folder relative data paths are read from; empty means the project root

# %%
from llm_energy import layout

# a whole study's file stops here: see `llm-energy params`
layout.refuse_study_parameters(globals(), "notebooks/02_finetune.ipynb")

# %%
from llm_energy import items
from llm_energy.models import loading as models
from llm_energy.phases import evaluation
from llm_energy.phases import finetune as ft
from llm_energy.report import figures as plots

run = evaluation.ConfigRun.from_parameters(
    study_dir=study_dir, config_id=config_id, model=model, precision=precision, device=device,
    tasks=tasks, energy=energy, seed=seed, base_dir=base_dir)
run, params = ft.parameters(run, finetune, config_id)
print(run.config_id, params)

# %% [markdown]
# ## Look at the training data
# The task's training and validation splits, and a few examples: the text the model reads and the
# answer it learns to give.

# %%
train, valid = ft.splits(run, params)
print(f"{len(train)} training items, {len(valid)} validation items; labels: {len(train.labels)}")
for item in train.items[:3]:
    print(f"[{item.id}] {items.item_text(item)[:160]}\n  -> {items.item_answer(item)}")

# %% [markdown]
# ## Train, one measured window per epoch
# System idle first, then the base model at this precision; the meter measures the loaded idle, then
# each epoch's training steps in one window (validation loss is computed outside it). Leaving the
# `with` block, even on an error, stops the trackers.

# %% tags=["nbval-ignore-output"]
system_idle = evaluation.measure_system_idle(run)
loaded = models.load_model(run.model, run.precision, run.device, base_dir=run.base_dir)
with evaluation.open_meter(run, loaded.device, system_idle, phase="finetune") as meter:
    result = ft.train(run, params, loaded, meter, train, valid)
print(f"trainable {result.trainable_parameters:,} of {result.total_parameters:,} parameters; adapter in "
      f"{result.adapter_dir}")

# %% [markdown]
# ## Inspect the last epoch's reading
# Per component: energy, mean power, and the method behind the number (`estimated`: a model, not a
# counter).

# %% tags=["nbval-ignore-output"]
import pandas as pd

last = result.final.record
pd.DataFrame(last.components()).set_index("component") if last is not None else "no meter"

# %% [markdown]
# ## Epochs
# Loss and energy of every epoch (written to `training.csv`), and the loss reached against the energy
# spent.

# %% tags=["nbval-ignore-output"]
ft.epochs_table(result)

# %% tags=["nbval-ignore-output"]
plots.as_image(ft.epochs_figure(result, run.config_id))
