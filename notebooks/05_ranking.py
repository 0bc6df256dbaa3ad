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
# Which model, precision and pruning to deploy, given what each costs in energy and gives in task
# quality: every configuration ranked by **R = w·φ + (1−w)·ρ** (Tran, Jaumard and Delgado, *Energy-Aware
# LLMs*, 2025; φ energy efficiency, ρ mean task performance, both in [0, 1], w the weight given to
# energy). The answer first, then the evidence figure by figure, then the methods, then the tables.

# %% tags=["parameters"]
study_dir: str = ""  # a study folder with tables/ to rank; empty: a small example study built here (below)
example_dir: str = ""  # example study folder when study_dir is empty; empty: outputs/ranking-example
ranking: dict = {}  # the study's `ranking` section (w, w_grid, phi, metrics, missing, bootstrap)
amortize_over: float = 0  # > 0: rank at a life of N queries (setup / N + per query); 0: the study's setting

# %%
from llm_energy import layout

# a whole study's file stops here: see `llm-energy params`
layout.refuse_study_parameters(globals(), "notebooks/05_ranking.ipynb")

# %%
from IPython.display import HTML, Markdown, display

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
settings = config.validate_section(config.RankingSettings,
                                   {**ranking, **({"amortize_over": amortize_over} if amortize_over else {})},
                                   "ranking")
tables = rk.load_tables(study_dir)
outcome = rk.rank_study(study_dir, settings)
origin, skipped, failures = rk.config_notes(study_dir)

# %% [markdown]
# ## The answer

# %% tags=["nbval-ignore-output"]
display(Markdown(rk.answer_markdown(outcome)))

# %% [markdown]
# ## The evidence
# ### Figure 7 — ranking across w, and energy against quality
# How to read it: (a) R of every configuration as the weight on energy w goes from 0 (quality only) to 1
# (energy only); lines that cross swap places. (b) energy per item against ρ at the chosen w: the Pareto front
# joins the configurations no other beats on both; lower right is better (less energy, more quality).

# %% tags=["nbval-ignore-output"]
fig7 = plots.fig7_ranking(outcome.result.table, w=settings.w,
                          energy_method=rk.figure_energy_method(outcome.methods))
plots.save_figure(fig7, study_dir / "figures", "fig7_ranking")
plots.as_image(fig7)

# %% tags=["nbval-ignore-output"]
display(HTML(rk.collapsible(rk.ranking_view(outcome.result.table, settings.w),
                            f"Ranking at w = {settings.w:g}", open=True)))
display(HTML(rk.collapsible(outcome.stability.assign(config_id=outcome.stability["config_id"].map(rk.pretty_config))
                            if outcome.stability is not None else None,
                            "Rank stability", "Share of bootstrap resamples (items and energy repeats) in "
                            "which each configuration takes each rank.")))

# %% [markdown]
# ### Figure 4 — inference energy and carbon per precision
# How to read it: energy (top) and carbon (bottom) per item of every task, per precision, one panel per model;
# bars are means over the measured windows, whiskers their spread; a hatched or "estimated" note means
# CodeCarbon modelled the power rather than a counter measuring it.

# %% tags=["nbval-ignore-output"]
fig4 = plots.fig4_inference_energy_carbon(tables["energy"])
plots.save_figure(fig4, study_dir / "figures", "fig4_inference_energy_carbon")
plots.as_image(fig4)

# %% [markdown]
# ### Figure 5 — impact of the quantization level on each task metric
# How to read it: each panel one task metric, each line one model across precisions (fp32 → 4-bit); the band
# is its 95% interval. A drop beyond the band is a loss of quality the data can see; the sentences below say
# which differences are beyond noise.

# %% tags=["nbval-ignore-output"]
fig5 = plots.fig5_quantization_impact(tables["scores"], tables["energy"])
plots.save_figure(fig5, study_dir / "figures", "fig5_quantization_impact")
display(plots.as_image(fig5))
display(Markdown(rk.quality_changes(outcome, "quantization")))

# %% [markdown]
# ### Figure 6 — pruning
# How to read it: the pruned (and recovered) variants of each pruned configuration beside it unpruned: energy
# per item and the headline metric of each task. Pruning pays when energy falls and the metric does not fall
# beyond its interval.

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
# ### What it costs over its life (Figure 8)
# Making a variant costs energy once (fine-tuning, Wanda calibration, pruning, recovery fine-tuning); serving
# costs energy per query. The table gives each variant's setup energy, its energy per query, and after how
# many queries it pays for itself against its reference (its model at fp32, no adapter, no pruning), with its
# quality change beside it. Figure 8 draws setup + N × per query for the top set and the variants with a
# break-even count (fewest queries first), with their references: where a variant's line crosses below its
# reference's (●) it has paid for itself. To rank at a chosen life, set `amortize_over` in the parameters cell
# (e.g. `1e6`) and run the notebook again.

# %% tags=["nbval-ignore-output"]
display(Markdown(rk.lifecycle_markdown(outcome)))
fig8 = plots.fig8_lifecycle(outcome.lifecycle, rk.lifecycle_figure_configs(outcome),
                            settings.lifecycle_queries)
plots.save_figure(fig8, study_dir / "figures", "fig8_lifecycle")
plots.as_image(fig8)

# %% [markdown]
# ### Figure 1 — token lengths of the datasets
# How to read it: how many tokens each task's items take under the model's tokenizer, per split; energy per
# item follows the tokens an item runs, so a task with longer items costs more per item at every precision.

# %% tags=["nbval-ignore-output"]
fig1 = plots.fig1_token_lengths(tables["token_lengths"])
plots.save_figure(fig1, study_dir / "figures", "fig1_token_lengths")
plots.as_image(fig1)

# %% [markdown]
# ### Figure 3 — fine-tuning energy against training loss
# How to read it: per fine-tuned configuration, training and validation loss per epoch and the energy each
# epoch cost; a curve that flattens while energy keeps rising is where more epochs stop paying. A precision
# the study asked for that did not train here (skipped as too slow on this device, or failed) is listed in the
# legend with the reason.

# %% tags=["nbval-ignore-output"]
untrained = rk.not_trained(study_dir)  # fine-tuning configs skipped or failed, with why: Figure 3 says so
if rk.empty(tables["training"]) and not untrained:
    display(Markdown("_The fine-tuning phase was not part of this study._"))
else:
    fig3 = plots.fig3_finetune_energy_loss(tables["training"], rk.figure_energy_method(outcome.methods) or "",
                                           not_trained=untrained)
    plots.save_figure(fig3, study_dir / "figures", "fig3_finetune_energy_loss")
    display(plots.as_image(fig3))

# %% [markdown]
# ## Methods
# How the answer was reached: the formula and its scales, how stable the ranks are, how precise the scores
# are, the device and its hardware, disturbed measurements, the data, how energy was obtained (measured or
# estimated), where the weights came from, what was skipped or failed.

# %% tags=["nbval-ignore-output"]
display(Markdown(rk.methods_markdown(outcome, origin, skipped, failures,
                                     finetune_lines=rk.finetune_effect(tables["scores"], tables["energy"]))))

# %% [markdown]
# ## Tables
# Click a title to open its table. Every number is also in the study's `tables/` folder as CSV, in base units
# (kWh, s).

# %% tags=["nbval-ignore-output"]
display(HTML(rk.collapsible(rk.energy_view(tables["energy"]), "Energy per config, phase and task",
                            "mWh per item gross and net of the job's loaded-idle power, its standard error, "
                            "J per 1k tokens as they ran, mg CO2e per item, windows and those kept "
                            "contaminated, the method and which components it estimates.")))
display(
    HTML(rk.collapsible(rk.scores_view(tables["scores"]), "Scores", "Every metric of every configuration; "
                        "95% bootstrap intervals in tables/scores.csv.")))

# %% [markdown]
# Where each measured job ran (`tables/idle_baselines.csv`, read when its idle baselines were taken): host,
# CPU and the speed-deciding instruction flags it has, cores, frequency governor and clock, the 1-minute load
# average, GPU and its power limit. A job on another node (SLURM) shows its own machine; the machine the
# throughput probe ran on is in the Methods' **Hardware** paragraph (`provenance.json`).

# %% tags=["nbval-ignore-output"]
display(HTML(rk.collapsible(rk.job_hardware(study_dir), "Hardware per job")))

# %% [markdown]
# Was each measured job disturbed? Per job: the worst share of the machine's CPU time other processes took in
# one of its windows, the worst machine-speed canary against the job's and the study's start (1.0 = as fast),
# the worst hypervisor steal, its windows kept contaminated and those measured again, and its loaded-idle
# drift (after its windows against before; `drifted` beyond `energy.max_idle_drift`).

# %% tags=["nbval-ignore-output"]
display(HTML(rk.collapsible(rk.disturbance_table(study_dir), "Disturbance per job")))
