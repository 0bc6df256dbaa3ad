"""Writes the phase notebooks (committed without outputs). Run after editing a notebook's story:
python tools/build_notebooks.py  — the .ipynb files are the source users open; this keeps them tidy."""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent.parent / "notebooks"


def params(text: str):
    cell = new_code_cell(text.strip())
    cell.metadata["tags"] = ["parameters"]
    return cell


def code(text: str, hide: bool = False, nbval_skip: bool = False):
    cell = new_code_cell(text.strip())
    tags = []
    if nbval_skip:
        tags.append("nbval-ignore-output")
    if tags:
        cell.metadata["tags"] = tags
    return cell


def md(text: str):
    return new_markdown_cell(text.strip())


def write(name: str, cells: list) -> None:
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for index, cell in enumerate(nb.cells):
        cell["id"] = f"{name[:2]}-{index:02d}"
    nbformat.write(nb, HERE / name)


DATA = [
    md("""# 01 — Data: what the study scores
Counts per task and split, label balance, and Figure 1: the distribution of token lengths under the
model's tokenizer. Defaults use the built-in sample data; the runner passes the study's own values."""),
    params('''
study_dir: str = ""  # output folder; empty means outputs/notebook-defaults of the project
model: dict = {"name": "tiny-random-llama"}  # a `models` entry: its tokenizer counts the tokens
tasks: dict = {"rca": {}, "qa": {}}  # the study's `tasks` section (data, split, max_items, ...)
base_dir: str = ""  # folder relative data paths are read from; empty means the project root
'''),
    code('''
from llm_energy import config, data, inference, models, plots, results

study_dir = inference.resolve_study_dir(study_dir)
base = inference.resolve_study_dir(base_dir) if base_dir else inference.project_root()
model_settings = config.validate_section(config.ModelSettings, model, "model")
task_settings = config.validate_section(config.TasksSettings, tasks, "tasks")
'''),
    md("Every split of every task, read and validated record by record."),
    code('''
task_sets = {name: data.load_all_splits(name, settings, base) for name, settings in task_settings.enabled().items()}
data.summarise(task_sets)
'''),
    md("Token lengths of each item (the ticket, or the question with its choices) under the model's tokenizer."),
    code('''
tokenizer, tokenizer_name = models.load_tokenizer(model_settings, base)
rows = [row for name, splits in task_sets.items() for split in splits.values()
        for row in data.token_length_rows(tokenizer, tokenizer_name, name, split)]
results.upsert_rows(study_dir, "token_lengths", rows)
lengths = results.read_table(study_dir, "token_lengths")
lengths.groupby(["task", "split"])["n_tokens"].describe()[["count", "mean", "50%", "max"]]
''', nbval_skip=False),
    code('''
fig1 = plots.fig1_token_lengths(lengths)
plots.save_figure(fig1, study_dir / "figures", "fig1_token_lengths")
plots.as_image(fig1)
''', nbval_skip=True),
]

INFERENCE = [
    md("""# 03 — Inference: energy, carbon and task quality of one model at one precision
Load the model at the requested precision, score each task inside measured energy windows (warm-up,
repeats, idle baseline), and write energy, scores and per-item results into the study's tables."""),
    params('''
study_dir: str = ""  # output folder; empty means outputs/notebook-defaults of the project
config_id: str = ""  # row key in the tables; empty means <model>__<precision>
model: dict = {"name": "tiny-random-llama"}  # a `models` entry: builtin name, or source local/hub + path
precision: str = "fp32"  # fp32 | bf16 | fp16 | int8 | nf4 | fp4
device: str = "cpu"  # cpu | cuda (the runner resolves auto)
tasks: dict = {"rca": {"max_items": 6, "generation": {"new_tokens": 8, "max_items": 2}}, "qa": {"max_items": 6}}  # `tasks` section
energy: dict = {"idle_seconds": 1.0, "repeats": 1, "max_repeats": 1, "measure_power_secs": 1.0}  # `energy` section
seed: int = 0  # seed for sampling and bootstrap intervals
base_dir: str = ""  # folder relative data paths are read from; empty means the project root
'''),
    code('''
from llm_energy import inference, models

run = inference.InferenceRun.from_parameters(
    study_dir=study_dir, config_id=config_id, model=model, precision=precision, device=device,
    tasks=tasks, energy=energy, seed=seed, base_dir=base_dir)
print(run.config_id, "->", run.study_dir)
'''),
    md("Load the weights at this precision (one function for every source and precision)."),
    code('''
loaded = models.load_model(run.model, run.precision, run.device, base_dir=run.base_dir)
inference.record_config(run.study_dir, run.config_id, run.model.name, run.precision, "ok",
                        weights_origin=loaded.weights_origin)
print(f"{loaded.n_parameters:,} parameters, {loaded.memory_bytes / 2**20:.0f} MiB, compute {loaded.compute_dtype}")
print("weights:", loaded.weights_origin)
''', nbval_skip=True),
    md("The energy meter: CodeCarbon's offline tracker plus RAPL/NVML counters where they exist, with the study's idle baseline."),
    code('''
meter = inference.open_meter(run.study_dir, run.energy, loaded.device)
print("sources:", meter.available_methods, "| idle power (W):", round(meter.idle.power_w, 2), meter.idle.method)
''', nbval_skip=True),
    md("Score each task inside measured windows and write the results."),
    code('''
task_sets = inference.load_task_sets(run.tasks, run.base_dir)
summary = []
for name, task_data in task_sets.items():
    result, measurement = inference.measure_task(loaded, name, task_data, meter, run.tasks.enabled()[name].prompt, run.seed)
    inference.record_task(run, loaded, result, measurement)
    summary.append({"task": name, "n_items": result.n_items, **result.metrics,
                    "energy_kwh": measurement.mean("energy_kwh"), "repeats": measurement.repeats,
                    "method": measurement.records[0].energy_method})
rca = run.tasks.rca
if rca is not None and rca.generation is not None and "rca" in task_sets:
    result, measurement, output = inference.measure_generation(loaded, task_sets["rca"], rca.generation, meter, run.seed)
    inference.record_task(run, loaded, result, measurement, generated_tokens=output.n_new_tokens)
    summary.append({"task": "rca_resolution", "n_items": result.n_items, **result.metrics,
                    "energy_kwh": measurement.mean("energy_kwh"), "repeats": measurement.repeats,
                    "method": measurement.records[0].energy_method})
meter.close()
''', nbval_skip=True),
    code('''
import pandas as pd
pd.DataFrame(summary)
''', nbval_skip=True),
]

RANKING = [
    md("""# Energy-aware deployment study — report
This report is the executed ranking notebook: it reads only the study's saved tables, ranks every
configuration by R = w·φ + (1−w)·ρ (φ energy efficiency, ρ mean task performance, both in [0, 1]),
and renders the paper's figures."""),
    params('''
study_dir: str = ""  # output folder with tables/; empty means outputs/notebook-defaults of the project
ranking: dict = {}  # the study's `ranking` section (w, w_grid, phi, metrics, missing, bootstrap)
'''),
    code('''
from IPython.display import Markdown, display
from llm_energy import config, inference, plots, report, results

study_dir = inference.resolve_study_dir(study_dir)
settings = config.validate_section(config.RankingParams, ranking, "ranking")
tables = report.load_tables(study_dir)
outcome = report.rank_study(study_dir, settings)
origin, skipped, failures = report.config_notes(study_dir)
'''),
    code('''
display(Markdown(report.summary_markdown(outcome, origin, skipped, failures)))
''', nbval_skip=True),
    md("## Ranking across w\nR for every configuration over the sweep of w, and the Pareto front of energy against quality at the chosen w (Figure 7)."),
    code('''
fig7 = plots.fig7_ranking(outcome.result.table, w=settings.w, energy_method=report.figure_energy_method(outcome.methods))
plots.save_figure(fig7, study_dir / "figures", "fig7_ranking")
plots.as_image(fig7)
''', nbval_skip=True),
    code('''
at_w = outcome.result.table[outcome.result.table["w"].round(6) == round(settings.w, 6)]
at_w[["rank", "config_id", "R", "phi", "rho", "energy_kwh_per_item", "pareto"]].set_index("rank")
''', nbval_skip=True),
    md("Rank stability: share of bootstrap resamples (items and energy repeats) in which each configuration takes each rank."),
    code('''
outcome.stability if outcome.stability is not None else "no per-item scores to resample"
''', nbval_skip=True),
    md("## Figure 1 — token lengths of the datasets"),
    code('''
fig1 = plots.fig1_token_lengths(tables["token_lengths"])
plots.save_figure(fig1, study_dir / "figures", "fig1_token_lengths")
plots.as_image(fig1)
''', nbval_skip=True),
    md("## Figure 3 — fine-tuning energy against training loss"),
    code('''
if report.empty(tables["training"]):
    display(Markdown("_The fine-tuning phase was not part of this study._"))
else:
    fig3 = plots.fig3_finetune_energy_loss(tables["training"], report.figure_energy_method(outcome.methods) or "")
    plots.save_figure(fig3, study_dir / "figures", "fig3_finetune_energy_loss")
    display(plots.as_image(fig3))
''', nbval_skip=True),
    md("## Figure 4 — inference energy and carbon per precision"),
    code('''
fig4 = plots.fig4_inference_energy_carbon(tables["energy"])
plots.save_figure(fig4, study_dir / "figures", "fig4_inference_energy_carbon")
plots.as_image(fig4)
''', nbval_skip=True),
    md("## Figure 5 — impact of the quantization level on each task metric"),
    code('''
fig5 = plots.fig5_quantization_impact(tables["scores"], tables["energy"])
plots.save_figure(fig5, study_dir / "figures", "fig5_quantization_impact")
plots.as_image(fig5)
''', nbval_skip=True),
    md("## Figure 6 — pruning"),
    code('''
if not (tables["energy"]["phase"] == "pruning").any():
    display(Markdown("_The pruning phase was not part of this study._"))
else:
    fig6 = plots.fig6_pruning(tables["scores"], tables["energy"])
    plots.save_figure(fig6, study_dir / "figures", "fig6_pruning")
    display(plots.as_image(fig6))
''', nbval_skip=True),
    md("## Tables\nEnergy per measured window (gross, net of the idle baseline, spread over repeats, method) and task scores with 95% bootstrap intervals."),
    code('''
energy_view = tables["energy"][["config_id", "phase", "task", "n_items", "n_tokens", "duration_s", "energy_kwh",
                                "energy_net_kwh", "energy_kwh_std", "repeats", "emissions_kg", "energy_method"]]
energy_view
''', nbval_skip=True),
    code('''
tables["scores"].pivot_table(index="config_id", columns=["task", "metric"], values="value").round(3)
''', nbval_skip=True),
]

if __name__ == "__main__":
    write("01_data.ipynb", DATA)
    write("03_inference.ipynb", INFERENCE)
    write("05_ranking.ipynb", RANKING)
