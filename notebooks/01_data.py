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
# # 01 — Data: what the study scores
#
# Before any energy is measured, the items themselves. The study follows Tran, Jaumard and Delgado,
# *Energy-Aware LLMs* (2025), on two telecom downstream tasks: **root-cause analysis** (RCA) of
# network fault tickets (pick the root-cause label) and **telecom multiple-choice QA**. Energy per
# item grows with the tokens a model reads, so the paper's Figure 1, the distribution of token lengths
# under the model's tokenizer, is what makes energy figures comparable across tasks and models.
#
# Steps: read and validate every split of every task (counts per split, label balance), count tokens
# per item, draw Figure 1. Defaults use the built-in synthetic sample data and the tiny random model's
# tokenizer; edit the parameters cell (e.g. `tasks = {"qa": {"data": "/path/questions.jsonl"}}`) for yours.

# %% tags=["parameters"]
study_dir: str = ""  # output folder; empty means outputs/notebook-defaults of the project
model: dict = {"name": "tiny-random-llama"}  # a `models` entry: its tokenizer counts the tokens
tasks: dict = {"rca": {}, "qa": {}}  # the study's `tasks` section (data, split, max_items, ...)
base_dir: str = ""  # folder relative data paths are read from; empty means the project root

# %%
from llm_energy import layout

# a whole study's file stops here: see `llm-energy params`
layout.refuse_study_parameters(globals(), "notebooks/01_data.ipynb")

# %%
from llm_energy import config, layout
from llm_energy.data import tasks as data
from llm_energy.models import loading as models
from llm_energy.report import figures as plots
from llm_energy.tables import store as results

study_dir = layout.resolve_study_dir(study_dir)
base = layout.resolve_study_dir(base_dir) if base_dir else layout.project_root()
model_settings = config.validate_section(config.ModelSettings, model, "model")
task_settings = config.validate_section(config.TasksSettings, tasks, "tasks")

# %% [markdown]
# Every split of every task, read and validated record by record.

# %%
task_sets = {name: data.load_all_splits(name, settings, base)
             for name, settings in task_settings.enabled().items()}
data.summarise(task_sets)

# %% [markdown]
# Where each item's split came from: the file's own `split` field, or (for a file without one, such as
# TeleQnA) a seeded assignment stratified by label or category, so that training and Wanda
# calibration never read a scored item. Every item is listed in `tables/splits.csv`, with whether the
# scored sample holds it. Records left out under `invalid_records: skip` (an empty question, a repeated
# choice, an answer out of range) are listed with file, line and reason in `tables/skipped_records.csv`.

# %%
skipped = []
for name, settings in task_settings.enabled().items():  # each task's rows replace that task's old ones
    results.upsert_rows(study_dir, "splits", data.split_rows(name, settings, base),
                        replace_where={"task": name})
    skipped += data.skipped_rows(name, settings, base)
    results.upsert_rows(study_dir, "skipped_records", data.skipped_rows(name, settings, base),
                        replace_where={"task": name})
splits = results.read_table(study_dir, "splits")
print({name: data.describe_source(data.source_name(name, settings, base))
       for name, settings in task_settings.enabled().items()})
print(f"{len(skipped)} record(s) skipped as invalid")
splits.groupby(["task", "split", "assigned_by"])["scored"].agg(["count", "sum"])

# %% [markdown]
# Token lengths of each item (the ticket, or the question with its choices) under the model's tokenizer.

# %%
tokenizer, tokenizer_name = models.load_tokenizer(model_settings, base)
rows = [row for name, splits in task_sets.items() for split in splits.values()
        for row in data.token_length_rows(tokenizer, tokenizer_name, name, split)]
results.upsert_rows(study_dir, "token_lengths", rows)
lengths = results.read_table(study_dir, "token_lengths")
lengths.groupby(["task", "split"])["n_tokens"].describe()[["count", "mean", "50%", "max"]]

# %% tags=["nbval-ignore-output"]
fig1 = plots.fig1_token_lengths(lengths)
plots.save_figure(fig1, study_dir / "figures", "fig1_token_lengths")
plots.as_image(fig1)
