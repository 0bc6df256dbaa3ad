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
from llm_energy import config, data, layout, models, plots, results

study_dir = layout.resolve_study_dir(study_dir)
base = layout.resolve_study_dir(base_dir) if base_dir else layout.project_root()
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
adapter: str = ""  # LoRA adapter folder written by 02_finetune; empty means the base model
adapter_name: str = "none"  # how the adapter is named in the tables
'''),
    code('''
from llm_energy import evaluation, inference

run = evaluation.ConfigRun.from_parameters(
    study_dir=study_dir, config_id=config_id, model=model, precision=precision, device=device,
    tasks=tasks, energy=energy, seed=seed, base_dir=base_dir)
print(run.config_id, "->", run.study_dir)
'''),
    md("System idle power, measured in this process before the model is loaded (the loaded-idle power, "
       "measured once it is in memory, is what net energy subtracts)."),
    code('''
system_idle = evaluation.measure_system_idle(run)
print(f"system idle: {system_idle.power_w:.2f} W ({system_idle.method})")
''', nbval_skip=True),
    md("Load the weights at this precision (one function for every source and precision)."),
    code('''
loaded = inference.load(run, adapter)
print(f"{loaded.n_parameters:,} parameters, {loaded.memory_bytes / 2**20:.0f} MiB, compute {loaded.compute_dtype}")
print("weights:", loaded.weights_origin)
''', nbval_skip=True),
    md("How multiple-choice items are scored on this model (packed, or through a shared cache), chosen "
       "now, before anything is measured, and written with the config's row."),
    code('''
scoring_path = inference.prepare(run, loaded, adapter_name)
print("scoring path:", scoring_path.name, "-", scoring_path.reason)
''', nbval_skip=True),
    md("Score each task inside measured windows (CodeCarbon's offline tracker plus RAPL/NVML counters "
       "where they exist, with the study's idle baseline) and write the results."),
    code('''
with evaluation.open_meter(run, loaded.device, system_idle) as meter:
    print("sources:", meter.available_methods, "| loaded idle (W):", round(meter.idle.power_w, 2), meter.idle.method)
    summary = inference.evaluate(run, loaded, meter, adapter=adapter_name)
''', nbval_skip=True),
    code('''
import pandas as pd
pd.DataFrame(summary)
''', nbval_skip=True),
]


FINETUNE = [
    md("""# 02 — Fine-tuning: LoRA / QLoRA at one precision, energy and loss per epoch
Train a LoRA adapter on the task's training split at this precision (int8 and nf4 through
bitsandbytes k-bit training: QLoRA for nf4), one measured energy window per epoch, and write the
epochs into `training.csv`. The adapter is saved for the inference phase to evaluate."""),
    params('''
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
'''),
    code('''
from llm_energy import evaluation, finetune as ft, models

run = evaluation.ConfigRun.from_parameters(
    study_dir=study_dir, config_id=config_id, model=model, precision=precision, device=device,
    tasks=tasks, energy=energy, seed=seed, base_dir=base_dir)
run, params = ft.parameters(run, finetune, config_id)
print(run.config_id, params)
'''),
    md("The task's training and validation splits."),
    code('''
train, valid = ft.splits(run, params)
print(f"{len(train)} training items, {len(valid)} validation items; labels: {len(train.labels)}")
'''),
    md("Load the base model at this precision and train, one energy window per epoch."),
    code('''
system_idle = evaluation.measure_system_idle(run)
loaded = models.load_model(run.model, run.precision, run.device, base_dir=run.base_dir)
with evaluation.open_meter(run, loaded.device, system_idle, phase="finetune") as meter:
    result = ft.train(run, params, loaded, meter, train, valid)
print(f"trainable {result.trainable_parameters:,} of {result.total_parameters:,} parameters; adapter in {result.adapter_dir}")
''', nbval_skip=True),
    code('''
import pandas as pd
pd.DataFrame([e.__dict__ for e in result.epochs])
''', nbval_skip=True),
]

PRUNING = [
    md("""# 04 — Pruning: one method and pattern on one configuration
Prune the dense weights of the decoder's linear layers (magnitude or Wanda; unstructured or N:M),
record the measured sparsity next to the target, then evaluate both tasks and measure energy exactly
as the inference phase does. A fine-tuned configuration is pruned after its LoRA adapter is merged
into the weights (a quantized base is dequantized first, then quantized back after pruning, and every
pruned layer is checked again). With `recover`, a fresh LoRA adapter is trained on the pruned model
to win back quality, its energy per epoch recorded, and the recovered model evaluated too. Zeros save
energy only when a kernel skips them: on CUDA, 2:4 layers at fp16/bf16 run cuSPARSELt where a timing
on that GPU says sparse is faster (`llm_energy.sparse`); on a CPU no sparse kernel runs, pruned models
run dense, so energy is not expected to fall, and the quality cost is what this phase shows there."""),
    params('''
study_dir: str = ""  # output folder; empty means outputs/notebook-defaults of the project
config_id: str = ""  # row key; empty means <model>__<precision>__<pruning label>
model: dict = {"name": "tiny-random-llama"}  # a `models` entry
precision: str = "fp32"  # precision the pruned model runs at (quantized ones are pruned dense first)
device: str = "cpu"  # cpu | cuda
tasks: dict = {"rca": {"max_items": 6, "generation": {"new_tokens": 8, "max_items": 2}}, "qa": {"max_items": 6}}  # `tasks` section
energy: dict = {"idle_seconds": 1.0, "repeats": 1, "max_repeats": 1}  # the study's `energy` section
pruning: dict = {"method": "wanda", "pattern": "2:4", "sparsity": None, "calibration_samples": 16, "calibration_max_tokens": 128}  # one method
sparse_kernels: str = "auto"  # auto (cuSPARSELt for 2:4 at fp16/bf16 on CUDA where faster) | off
adapter: str = ""  # LoRA adapter folder of a fine-tuned target (merged before pruning); empty: the base model
adapter_name: str = "none"  # how the target's adapter is named in the tables
recover: dict = {}  # `pruning.recover` (epochs, learning_rate, ...); empty: no recovery fine-tuning
seed: int = 0
base_dir: str = ""  # folder relative data paths are read from; empty means the project root
'''),
    code('''
from llm_energy import evaluation, pruning as pr

run = evaluation.ConfigRun.from_parameters(
    study_dir=study_dir, config_id=config_id, model=model, precision=precision, device=device,
    tasks=tasks, energy=energy, seed=seed, base_dir=base_dir)
run, spec, recovery = pr.parameters(run, pruning, config_id, recover)
print(run.config_id, spec.label, "| recovery:", recovery)
'''),
    md("Calibration texts (Wanda) from the tasks' training splits; system idle before anything is loaded; "
       "then merge (a fine-tuned target), prune and check the pattern."),
    code('''
calibration = pr.calibration(run, spec)
system_idle = evaluation.measure_system_idle(run)
pruned = pr.prune(run, spec, calibration, adapter)
execution = pr.sparse_execution(run, pruned.loaded, pruned.outcome, sparse_kernels)
scoring_path = pr.record(run, pruned, execution, adapter_name)
outcome = pruned.outcome
print(f"target sparsity {outcome.target_sparsity:.3f}, measured {outcome.measured_sparsity:.4f}, "
      f"N:M verified: {outcome.verified_nm}, {len(outcome.layers)} layers, {outcome.duration_s:.1f} s")
if pruned.after_quantization:
    print(f"after quantization to {run.precision}: all {len(pruned.after_quantization)} layers checked again")
print(f"kernels: {execution.kernel} ({execution.note}); scoring path: {scoring_path.name}")
''', nbval_skip=True),
    md("Evaluate and measure exactly as the inference phase does; then, if asked, train a recovery "
       "adapter on the pruned model and evaluate that too."),
    code('''
with evaluation.open_meter(run, pruned.loaded.device, system_idle, phase="pruning") as meter:
    summary = pr.evaluate(run, pruned.loaded, meter, outcome, adapter_name)
    if recovery is not None:
        recovered = pr.recover(run, pruned, recovery, meter, adapter_name)  # None where LoRA cannot train
        if recovered is not None:
            summary += [{"config": "recovered", **row}
                        for row in pr.evaluate_recovered(recovered, meter, outcome, adapter_name)]
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
from llm_energy import config, layout, plots, ranking as rk

study_dir = layout.resolve_study_dir(study_dir)
settings = config.validate_section(config.RankingSettings, ranking, "ranking")
tables = rk.load_tables(study_dir)
outcome = rk.rank_study(study_dir, settings)
origin, skipped, failures = rk.config_notes(study_dir)
'''),
    code('''
display(Markdown(rk.summary_markdown(outcome, origin, skipped, failures,
                                         finetune_lines=rk.finetune_effect(tables["scores"], tables["energy"]))))
''', nbval_skip=True),
    md("## Ranking across w\nR for every configuration over the sweep of w, and the Pareto front of energy against quality at the chosen w (Figure 7)."),
    code('''
fig7 = plots.fig7_ranking(outcome.result.table, w=settings.w, energy_method=rk.figure_energy_method(outcome.methods))
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
if rk.empty(tables["training"]):
    display(Markdown("_The fine-tuning phase was not part of this study._"))
else:
    fig3 = plots.fig3_finetune_energy_loss(tables["training"], rk.figure_energy_method(outcome.methods) or "")
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
display(plots.as_image(fig5))
display(Markdown(rk.quality_changes(outcome, "quantization")))
''', nbval_skip=True),
    md("## Figure 6 — pruning"),
    code('''
if not (tables["energy"]["phase"] == "pruning").any():
    display(Markdown("_The pruning phase was not part of this study._"))
else:
    fig6 = plots.fig6_pruning(tables["scores"], tables["energy"])
    plots.save_figure(fig6, study_dir / "figures", "fig6_pruning")
    display(plots.as_image(fig6))
    display(Markdown(rk.pruning_kernels_markdown(study_dir)))
    display(Markdown(rk.recovery_markdown(study_dir)))
    display(Markdown(rk.quality_changes(outcome, "pruning")))
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
    write("02_finetune.ipynb", FINETUNE)
    write("03_inference.ipynb", INFERENCE)
    write("04_pruning.ipynb", PRUNING)
    write("05_ranking.ipynb", RANKING)
