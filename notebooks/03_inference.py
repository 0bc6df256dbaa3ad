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
# # 03 — Inference: what one model at one precision costs, and what it gives
#
# The study asks which model, precision and pruning to deploy for a downstream task, weighing what
# each option costs in **energy** (kWh) and **carbon** (kg CO₂-eq) against what it gives in **task
# quality**, as in Tran, Jaumard and Delgado, *Energy-Aware LLMs: A step towards sustainable AI for
# downstream applications* (2025). This notebook is the paper's inference measurement for **one
# configuration**: the model at one precision (fp32, bf16/fp16, bitsandbytes int8 and nf4/fp4
# quantization, or this package's CPU-native w8a8), optionally with a LoRA adapter from `02_finetune`. Lower
# precision shrinks memory and may save energy per item; it may also cost accuracy. Both are measured here, on
# the same items:
#
# * **energy** of the forward passes only (items are tokenised before a window opens, metrics computed
#   after it closes), gross and net of the idle power, per component (CPU, GPU, RAM) with the method
#   that gave each number: a hardware counter (RAPL, NVML) or a model (CodeCarbon's estimates);
# * **carbon**, the energy times the grid's carbon intensity for the study's country;
# * **quality**: RCA root-cause accuracy and macro-F1, QA accuracy (`acc`, `acc_norm`) by the
#   log-likelihood of each choice, each with a 95% bootstrap interval.
#
# The ranking phase (`05_ranking`) turns these into φ (energy efficiency) and ρ (quality) for every
# configuration. **To run your own model**, edit only the parameters cell below: e.g.
# `model = {"name": "my-model", "source": "local", "path": "/path/to/hf-folder"}` and a precision;
# results go to `study_dir` (by default `outputs/notebook-defaults/` at the repository root).

# %% tags=["parameters"]
study_dir: str = ""  # output folder; empty means outputs/notebook-defaults of the project
config_id: str = ""  # row key in the tables; empty means <model>__<precision>
model: dict = {"name": "tiny-random-llama"}  # a `models` entry: builtin name, or source local/hub + path
precision: str = "fp32"  # fp32 | bf16 | fp16 | int8 | w8a8 | nf4 | fp4
device: str = "cpu"  # cpu | cuda (the runner resolves auto)
tasks: dict = {"rca": {"max_items": 6, "generation": {"new_tokens": 8, "max_items": 2}},
               "qa": {"max_items": 6}}  # `tasks` section
energy: dict = {"idle_seconds": 1.0, "repeats": 1, "max_repeats": 1,
                "measure_power_secs": 1.0}  # `energy` section
seed: int = 0  # seed for sampling and bootstrap intervals
base_dir: str = ""  # folder relative data paths are read from; empty means the project root
adapter: str = ""  # LoRA adapter folder written by 02_finetune; empty means the base model
adapter_name: str = "none"  # how the adapter is named in the tables

# %% [markdown]
# ## 1. Parameters, validated
# A whole study file given to papermill (`-f params/default.yaml`) stops here: a notebook runs one
# job; `llm-energy params STUDY.yaml --job JOB_ID -o job.yaml` writes one job's parameters.

# %%
from llm_energy import layout

# a whole study's file stops here: see `llm-energy params`
layout.refuse_study_parameters(globals(), "notebooks/03_inference.ipynb")

# %%
from llm_energy import items
from llm_energy.phases import evaluation, inference
from llm_energy.report import figures as plots

run = evaluation.ConfigRun.from_parameters(
    study_dir=study_dir, config_id=config_id, model=model, precision=precision, device=device,
    tasks=tasks, energy=energy, seed=seed, base_dir=base_dir)
print(run.config_id, "->", run.study_dir)

# %% [markdown]
# ## 2. System idle
# The machine's power with nothing loaded, measured in this process (a reference; net energy
# subtracts the *loaded* idle, measured once the model is in memory).

# %% tags=["nbval-ignore-output"]
system_idle = evaluation.measure_system_idle(run)
print(f"system idle: {system_idle.power_w:.2f} W ({system_idle.method})")

# %% [markdown]
# ## 3. Load the model at this precision
# One function for every source (builtin, local folder, hub) and precision.

# %% tags=["nbval-ignore-output"]
loaded = inference.load(run, adapter)
print(f"{loaded.n_parameters:,} parameters, {loaded.memory_bytes / 2**20:.0f} MiB, compute "
      f"{loaded.compute_description}")
print("weights:", loaded.weights_origin)

# %% [markdown]
# ## 4. Look at a few items
# The first items the phase scores, tokenised now, outside any measured window. QA: a question and
# its choices; RCA: a fault ticket, scored against every root-cause label.

# %%
look = inference.first_items(run, loaded, n=2)  # QA when the study scores it, else RCA
for item in look.data.items:
    print(f"[{look.task} {item.id}]", items.item_text(item), "\n")

# %% [markdown]
# How multiple-choice items are scored on this model (packed, or through a shared cache), chosen
# before anything is measured, and written with the config's row. Within a study the first job on
# these model files, precision and adapter runs the layout checks; later ones reuse its verdict
# (`state/reuse/`), as they reuse the tokenised items.

# %% tags=["nbval-ignore-output"]
scoring_path = inference.prepare(run, loaded, adapter_name)
print("scoring path:", scoring_path.name, "-", scoring_path.reason)

# %% [markdown]
# ## 5. Measure
# The job's meter opens with the model in memory (it measures the loaded idle first). Inside it: one
# window by hand, `with meter.window(...)`, around the forward passes of the few items above (written
# nowhere), then the phase's own measurement of every task: a warm-up, repeated windows until their
# spread is small, rows written to the study's tables. Leaving the `with` block, even on an error,
# stops the trackers.

# %% tags=["nbval-ignore-output"]
with evaluation.open_meter(run, loaded.device, system_idle) as meter:
    print("sources:", meter.available_methods, "| loaded idle:", round(meter.idle.power_w, 2), "W,",
          meter.idle.method)
    with meter.window(f"look: {len(look.encoded)} {look.task} items") as window:
        look_scores = inference.score(loaded, look)
    summary = inference.measure_config_tasks(run, loaded, meter, adapter=adapter_name)

# %% [markdown]
# ## 6. Inspect the reading
# The hand-measured window, per component: energy, mean power, and the method behind each number.
# `estimated` marks a modelled figure (e.g. CPU power from load and a TDP guess), not a counter.

# %% tags=["nbval-ignore-output"]
import pandas as pd

reading = window.record
print(f"{reading.name}: {reading.duration_s * 1000:.0f} ms, {reading.energy_kwh * 3.6e6:.2f} J gross, "
      f"{reading.energy_net_kwh * 3.6e6:.2f} J net of {reading.idle_power_w:.1f} W idle, "
      f"{reading.emissions_kg * 1e6:.3f} mg CO2-eq at {reading.carbon_intensity_g_per_kwh:.0f} g/kWh")
pd.DataFrame(reading.components()).set_index("component")

# %% [markdown]
# ## 7. Score
# What the model chose on the items above, then the phase's scores of every task (with the mean
# energy of its windows).

# %%
inference.answers(look, look_scores)

# %% tags=["nbval-ignore-output"]
pd.DataFrame(summary)

# %% [markdown]
# ## 8. This configuration at a glance
# Energy per item for each task and every metric with its 95% interval, read back from the tables.

# %% tags=["nbval-ignore-output"]
plots.as_image(inference.config_figure(run))
