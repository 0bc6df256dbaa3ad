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
# # 03 — Inference: energy, carbon and task quality of one model at one precision
# Load the model at the requested precision, score each task inside measured energy windows (warm-up,
# repeats, idle baseline), and write energy, scores and per-item results into the study's tables.

# %% tags=["parameters"]
study_dir: str = ""  # output folder; empty means outputs/notebook-defaults of the project
config_id: str = ""  # row key in the tables; empty means <model>__<precision>
model: dict = {"name": "tiny-random-llama"}  # a `models` entry: builtin name, or source local/hub + path
precision: str = "fp32"  # fp32 | bf16 | fp16 | int8 | nf4 | fp4
device: str = "cpu"  # cpu | cuda (the runner resolves auto)
tasks: dict = {"rca": {"max_items": 6, "generation": {"new_tokens": 8, "max_items": 2}}, "qa": {"max_items": 6}}  # `tasks` section
energy: dict = {"idle_seconds": 1.0, "repeats": 1, "max_repeats": 1, "measure_power_secs": 1.0}  # `energy` section
seed: int = 0  # seed for sampling and bootstrap intervals
base_dir: str = ""  # folder relative data paths are read from; empty means the project root
adapter: str = ""  # LoRA adapter folder written by 02_finetune; empty means the base model
adapter_name: str = "none"  # how the adapter is named in the tables

# %%
from llm_energy import layout

layout.refuse_study_parameters(globals(), "notebooks/03_inference.ipynb")  # a whole study's file stops here: see `llm-energy params`

# %%
from llm_energy import evaluation, inference

run = evaluation.ConfigRun.from_parameters(
    study_dir=study_dir, config_id=config_id, model=model, precision=precision, device=device,
    tasks=tasks, energy=energy, seed=seed, base_dir=base_dir)
print(run.config_id, "->", run.study_dir)

# %% [markdown]
# System idle power, measured in this process before the model is loaded (the loaded-idle power, measured once it is in memory, is what net energy subtracts).

# %% tags=["nbval-ignore-output"]
system_idle = evaluation.measure_system_idle(run)
print(f"system idle: {system_idle.power_w:.2f} W ({system_idle.method})")

# %% [markdown]
# Load the weights at this precision (one function for every source and precision).

# %% tags=["nbval-ignore-output"]
loaded = inference.load(run, adapter)
print(f"{loaded.n_parameters:,} parameters, {loaded.memory_bytes / 2**20:.0f} MiB, compute {loaded.compute_dtype}")
print("weights:", loaded.weights_origin)

# %% [markdown]
# How multiple-choice items are scored on this model (packed, or through a shared cache), chosen now, before anything is measured, and written with the config's row.

# %% tags=["nbval-ignore-output"]
scoring_path = inference.prepare(run, loaded, adapter_name)
print("scoring path:", scoring_path.name, "-", scoring_path.reason)

# %% [markdown]
# Score each task inside measured windows (CodeCarbon's offline tracker plus RAPL/NVML counters where they exist, with the study's idle baseline) and write the results.

# %% tags=["nbval-ignore-output"]
with evaluation.open_meter(run, loaded.device, system_idle) as meter:
    print("sources:", meter.available_methods, "| loaded idle (W):", round(meter.idle.power_w, 2), meter.idle.method)
    summary = inference.evaluate(run, loaded, meter, adapter=adapter_name)

# %% tags=["nbval-ignore-output"]
import pandas as pd
pd.DataFrame(summary)
