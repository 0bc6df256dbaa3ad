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
#     display_name: Python 3
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
finetune: dict = {"epochs": 2, "max_train_items": 16, "max_eval_items": 8, "max_length": 320, "learning_rate": 0.001}  # `finetune` section
seed: int = 0
base_dir: str = ""  # folder relative data paths are read from; empty means the project root

# %%
from llm_energy import layout

layout.refuse_study_parameters(globals(), "notebooks/02_finetune.ipynb")  # a whole study's file stops here: see `llm-energy params`

# %%
from llm_energy import evaluation, finetune as ft, models

run = evaluation.ConfigRun.from_parameters(
    study_dir=study_dir, config_id=config_id, model=model, precision=precision, device=device,
    tasks=tasks, energy=energy, seed=seed, base_dir=base_dir)
run, params = ft.parameters(run, finetune, config_id)
print(run.config_id, params)

# %% [markdown]
# The task's training and validation splits.

# %%
train, valid = ft.splits(run, params)
print(f"{len(train)} training items, {len(valid)} validation items; labels: {len(train.labels)}")

# %% [markdown]
# Load the base model at this precision and train, one energy window per epoch.

# %% tags=["nbval-ignore-output"]
system_idle = evaluation.measure_system_idle(run)
loaded = models.load_model(run.model, run.precision, run.device, base_dir=run.base_dir)
with evaluation.open_meter(run, loaded.device, system_idle, phase="finetune") as meter:
    result = ft.train(run, params, loaded, meter, train, valid)
print(f"trainable {result.trainable_parameters:,} of {result.total_parameters:,} parameters; adapter in {result.adapter_dir}")

# %% tags=["nbval-ignore-output"]
import pandas as pd
pd.DataFrame([e.__dict__ for e in result.epochs])
