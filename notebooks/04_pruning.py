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
# # 04 — Pruning: one method and pattern on one configuration
#
# The study asks of sparsity what Tran, Jaumard and Delgado (*Energy-Aware LLMs*, 2025) ask of
# precision: does it save energy at inference, and what quality does it cost? This notebook prunes
# the dense weights of the decoder's linear layers (**magnitude** or **Wanda**; unstructured or
# **N:M**), records the measured sparsity next to the target, then evaluates both tasks and measures
# energy exactly as `03_inference` does, so pruned and unpruned rows compare (Figure 6).
#
# A fine-tuned configuration is pruned after its LoRA adapter is merged into the weights (a quantized
# base is dequantized first, then quantized back after pruning, and every pruned layer is checked
# again). With `recover`, a fresh LoRA adapter is trained on the pruned model to win back quality, its
# energy per epoch recorded, and the recovered model evaluated too. Zeros save energy only when a
# kernel skips them: on CUDA, 2:4 layers at fp16/bf16 run cuSPARSELt where a timing on that GPU says
# sparse is faster (`llm_energy.models.sparse_kernels`); on a CPU no sparse kernel runs, pruned models run
# dense, so energy is not expected to fall, and the quality cost is what this phase shows there.

# %% tags=["parameters"]
study_dir: str = ""  # output folder; empty means outputs/notebook-defaults of the project
config_id: str = ""  # row key; empty means <model>__<precision>__<pruning label>
model: dict = {"name": "tiny-random-llama"}  # a `models` entry
precision: str = "fp32"  # precision the pruned model runs at (quantized ones are pruned dense first)
device: str = "cpu"  # cpu | cuda
tasks: dict = {"rca": {"max_items": 6, "generation": {"new_tokens": 8, "max_items": 2}},
               "qa": {"max_items": 6}}  # `tasks` section
energy: dict = {"idle_seconds": 1.0, "repeats": 1, "max_repeats": 1}  # the study's `energy` section
pruning: dict = {"method": "wanda", "pattern": "2:4", "sparsity": None, "calibration_samples": 16,
                 "calibration_max_tokens": 128}  # one method
sparse_kernels: str = "auto"  # auto (cuSPARSELt for 2:4 at fp16/bf16 on CUDA where faster) | off
adapter: str = ""  # LoRA adapter folder of a fine-tuned target (merged before pruning); empty: the base model
adapter_name: str = "none"  # how the target's adapter is named in the tables
recover: dict = {}  # `pruning.recover` (epochs, learning_rate, ...); empty: no recovery fine-tuning
seed: int = 0
base_dir: str = ""  # folder relative data paths are read from; empty means the project root

# %%
from llm_energy import layout

# a whole study's file stops here: see `llm-energy params`
layout.refuse_study_parameters(globals(), "notebooks/04_pruning.ipynb")

# %%
from llm_energy.phases import evaluation
from llm_energy.phases import pruning as pr
from llm_energy.report import figures as plots

run = evaluation.ConfigRun.from_parameters(
    study_dir=study_dir, config_id=config_id, model=model, precision=precision, device=device,
    tasks=tasks, energy=energy, seed=seed, base_dir=base_dir)
run, spec, recovery = pr.parameters(run, pruning, config_id, recover)
print(run.config_id, spec.label, "| recovery:", recovery)

# %% [markdown]
# **Calibrate.** Calibration texts (Wanda) from the tasks' training splits, a seeded sample of each; then the
# system's idle power, before anything is loaded (net setup energy subtracts it).

# %% tags=["nbval-ignore-output"]
calibration = pr.calibration(run, spec)
system_idle = evaluation.measure_system_idle(run)
print(f"{len(calibration)} calibration texts; system idle {system_idle.power_w:.1f} W ({system_idle.method})")

# %% [markdown]
# **Prune.** Load the dense weights (a fine-tuned target: its adapter merged first), compute Wanda's input
# norms, mask the weights, and quantize back where the precision needs it. Each step is one measured energy
# window: what making this configuration cost (`tables/setup_energy.csv`; the ranking's lifecycle view
# amortises it over queries served).

# %% tags=["nbval-ignore-output"]
from llm_energy.measure.meter import J_PER_KWH

with evaluation.setup_meter(run, system_idle) as setup:
    pruned = pr.prune(run, spec, calibration, adapter, meter=setup)
outcome = pruned.outcome
for name, record in pruned.setup:
    print(f"setup step {name}: {record.duration_s:.1f} s, {record.energy_kwh * J_PER_KWH:.1f} J "
          f"({record.energy_method})")

# %% [markdown]
# **Check the pattern.** The measured sparsity next to the target; an N:M pattern verified group by group;
# after quantization every pruned layer is measured again.

# %% tags=["nbval-ignore-output"]
print(f"target sparsity {outcome.target_sparsity:.3f}, measured {outcome.measured_sparsity:.4f}, "
      f"N:M verified: {outcome.verified_nm}, {len(outcome.layers)} layers, {outcome.duration_s:.1f} s")
if pruned.after_quantization:
    print(f"after quantization to {run.precision}: all {len(pruned.after_quantization)} layers checked again")

# %% [markdown]
# **Kernels.** Which kernels the pruned layers will run (cuSPARSELt for 2:4 at fp16/bf16 on CUDA where a
# timing says it is faster; dense elsewhere, with the reason), then the config's rows: layers, setup energy,
# where its weights came from, its scoring path.

# %% tags=["nbval-ignore-output"]
execution = pr.sparse_execution(run, pruned.loaded, pruned.outcome, sparse_kernels)
scoring_path = pr.record(run, pruned, execution, adapter_name)
print(f"kernels: {execution.kernel} ({execution.note}); scoring path: {scoring_path.name}")

# %% [markdown]
# Measured sparsity of each pruned layer against the target.

# %% tags=["nbval-ignore-output"]
plots.as_image(pr.layers_figure(outcome, run.config_id))

# %% [markdown]
# Evaluate and measure exactly as the inference phase does; then, if asked, train a recovery adapter on the
# pruned model and evaluate that too.

# %% tags=["nbval-ignore-output"]
with evaluation.open_meter(run, pruned.loaded.device, system_idle, phase="pruning") as meter:
    summary = pr.measure_pruned_config(run, pruned.loaded, meter, outcome, adapter_name)
    if recovery is not None:
        recovered = pr.recover(run, pruned, recovery, meter, adapter_name)  # None where LoRA cannot train
        if recovered is not None:
            summary += [{"config": "recovered", **row}
                        for row in pr.measure_recovered_config(recovered, meter, outcome, adapter_name)]

# %% tags=["nbval-ignore-output"]
import pandas as pd

pd.DataFrame(summary)
