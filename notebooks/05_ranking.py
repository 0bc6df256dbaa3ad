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
# # Energy-aware deployment study — report
#
# This report is the executed ranking notebook. It reads only the study's saved tables and ranks every
# configuration, as Tran, Jaumard and Delgado (*Energy-Aware LLMs*, 2025) propose, by
# **R = w·φ + (1−w)·ρ**: φ is energy efficiency and ρ mean task performance, both in [0, 1], and w the
# weight a deployment gives to energy. R is shown over a sweep of w, with the Pareto front of energy
# against quality, the stability of ranks under resampling, and the paper's figures.

# %% tags=["parameters"]
study_dir: str = ""  # a study folder with tables/ to rank; empty: a small example study built here (below)
example_dir: str = ""  # where that example study is built when study_dir is empty; empty: outputs/ranking-example
ranking: dict = {}  # the study's `ranking` section (w, w_grid, phi, metrics, missing, bootstrap)
amortize_over: float = 0  # > 0: rank at a life of this many queries (setup / N + per query); 0: the study's setting

# %%
from llm_energy import layout

layout.refuse_study_parameters(globals(), "notebooks/05_ranking.ipynb")  # a whole study's file stops here: see `llm-energy params`

# %%
from IPython.display import Markdown, display

from llm_energy import config, layout
from llm_energy.phases import ranking as rk
from llm_energy.report import figures as plots

if study_dir:
    study_dir = layout.resolve_study_dir(study_dir)
else:  # run alone: rank a small study of our own rather than whatever another notebook left behind
    study_dir = rk.example_study(example_dir)
    print(f"No study_dir given: ranking a small example study (tiny random Llama at "
          f"{' and '.join(rk.EXAMPLE_PRECISIONS)}, 20 items per task, measured here) in {study_dir}. "
          "Set study_dir to a study's output folder, e.g. outputs/default, to rank it.")
settings = config.validate_section(config.RankingSettings, {**ranking, **({"amortize_over": amortize_over} if amortize_over else {})}, "ranking")
tables = rk.load_tables(study_dir)
outcome = rk.rank_study(study_dir, settings)
origin, skipped, failures = rk.config_notes(study_dir)

# %% tags=["nbval-ignore-output"]
display(Markdown(rk.summary_markdown(outcome, origin, skipped, failures,
                                         finetune_lines=rk.finetune_effect(tables["scores"], tables["energy"]))))

# %% [markdown]
# ## Ranking across w
# R for every configuration over the sweep of w, and the Pareto front of energy against quality at the chosen w (Figure 7).

# %% tags=["nbval-ignore-output"]
fig7 = plots.fig7_ranking(outcome.result.table, w=settings.w, energy_method=rk.figure_energy_method(outcome.methods))
plots.save_figure(fig7, study_dir / "figures", "fig7_ranking")
plots.as_image(fig7)

# %% tags=["nbval-ignore-output"]
at_w = outcome.result.table[outcome.result.table["w"].round(6) == round(settings.w, 6)]
at_w[["rank", "config_id", "R", "phi", "rho", "energy_kwh_per_item", "pareto"]].set_index("rank")

# %% [markdown]
# Rank stability: share of bootstrap resamples (items and energy repeats) in which each configuration takes each rank.

# %% tags=["nbval-ignore-output"]
outcome.stability if outcome.stability is not None else "no per-item scores to resample"

# %% [markdown]
# ## Figure 1 — token lengths of the datasets

# %% tags=["nbval-ignore-output"]
fig1 = plots.fig1_token_lengths(tables["token_lengths"])
plots.save_figure(fig1, study_dir / "figures", "fig1_token_lengths")
plots.as_image(fig1)

# %% [markdown]
# ## Figure 3 — fine-tuning energy against training loss

# %% tags=["nbval-ignore-output"]
if rk.empty(tables["training"]):
    display(Markdown("_The fine-tuning phase was not part of this study._"))
else:
    fig3 = plots.fig3_finetune_energy_loss(tables["training"], rk.figure_energy_method(outcome.methods) or "")
    plots.save_figure(fig3, study_dir / "figures", "fig3_finetune_energy_loss")
    display(plots.as_image(fig3))

# %% [markdown]
# ## Figure 4 — inference energy and carbon per precision

# %% tags=["nbval-ignore-output"]
fig4 = plots.fig4_inference_energy_carbon(tables["energy"])
plots.save_figure(fig4, study_dir / "figures", "fig4_inference_energy_carbon")
plots.as_image(fig4)

# %% [markdown]
# ## Figure 5 — impact of the quantization level on each task metric

# %% tags=["nbval-ignore-output"]
fig5 = plots.fig5_quantization_impact(tables["scores"], tables["energy"])
plots.save_figure(fig5, study_dir / "figures", "fig5_quantization_impact")
display(plots.as_image(fig5))
display(Markdown(rk.quality_changes(outcome, "quantization")))

# %% [markdown]
# ## Figure 6 — pruning

# %% tags=["nbval-ignore-output"]
if not (tables["energy"]["phase"] == "pruning").any():
    display(Markdown("_The pruning phase was not part of this study._"))
else:
    fig6 = plots.fig6_pruning(tables["scores"], tables["energy"])
    plots.save_figure(fig6, study_dir / "figures", "fig6_pruning")
    display(plots.as_image(fig6))
    display(Markdown(rk.pruning_kernels_markdown(study_dir)))
    display(Markdown(rk.recovery_markdown(study_dir)))
    display(Markdown(rk.quality_changes(outcome, "pruning")))

# %% [markdown]
# ## What it costs over its life
# Making a variant costs energy once (fine-tuning, Wanda calibration, pruning, recovery fine-tuning); serving costs energy per query. The table gives each variant's setup energy, its energy per query, and after how many queries it pays for itself against its reference (its model at fp32, no adapter, no pruning), with its quality change beside it. Figure 8 draws setup + N × per query for the top set and the variants with a break-even count (fewest queries first), with their references: where a variant's line crosses below its reference's (●) it has paid for itself. To rank at a chosen life, set `amortize_over` in the parameters cell (e.g. `1e6`) and run the notebook again.

# %% tags=["nbval-ignore-output"]
display(Markdown(rk.lifecycle_markdown(outcome)))
fig8 = plots.fig8_lifecycle(outcome.lifecycle, rk.lifecycle_figure_configs(outcome), settings.lifecycle_queries)
plots.save_figure(fig8, study_dir / "figures", "fig8_lifecycle")
plots.as_image(fig8)

# %% [markdown]
# ## Tables
# Energy per config, phase and task (gross, net of the idle baseline, its uncertainty and which estimator it is, whether net energy fell to idle or below, tokens as run and as prompted, method) and task scores with 95% bootstrap intervals.

# %% tags=["nbval-ignore-output"]
energy_view = tables["energy"].reindex(columns=[
    "config_id", "phase", "task", "n_items", "n_tokens", "n_tokens_prompted", "duration_s", "energy_kwh",
    "energy_net_kwh", "net_at_or_below_idle", "energy_kwh_std", "energy_std_estimator", "repeats", "emissions_kg",
    "energy_method", "estimated_components"])
energy_view

# %% [markdown]
# Where each measured job ran (`tables/idle_baselines.csv`, read when its idle baselines were taken): host, CPU and the speed-deciding instruction flags it has, cores, frequency governor and clock, the 1-minute load average, GPU and its power limit. A job on another node (SLURM) shows its own machine; the machine the throughput probe ran on is in the summary's **Hardware** paragraph (`provenance.json`).

# %% tags=["nbval-ignore-output"]
job_hardware = rk.job_hardware(study_dir)
job_hardware if not job_hardware.empty else "no per-job hardware columns (tables written before they existed)"

# %% [markdown]
# Was each measured job disturbed? Per job: the worst share of the machine's CPU time other processes took in one of its windows, the worst machine-speed canary against the job's and the study's start (1.0 = as fast), the worst hypervisor steal, its windows kept contaminated and those measured again, and its loaded-idle drift (after its windows against before; `drifted` beyond `energy.max_idle_drift`).

# %% tags=["nbval-ignore-output"]
disturbance = rk.disturbance_table(study_dir)
disturbance.round(3) if not disturbance.empty else "no disturbance readings (tables written before they existed)"

# %% tags=["nbval-ignore-output"]
tables["scores"].pivot_table(index="config_id", columns=["task", "metric"], values="value").round(3)
