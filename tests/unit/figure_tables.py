"""Table sets for the figure tests: the finished smoke study's tables (tests/unit/fixtures/smoke_tables,
copied from a smoke run) and constructed studies of any size, e.g. params/paper.yaml's factorial.

A constructed study has the columns the figures read, with plausible values: energy per item falls
with the bits, pruned configs spend a little less and score a little lower, recovery wins part of it
back. Deterministic (seeded by the config id).
"""

from __future__ import annotations

import itertools
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from llm_energy.report.figures import pareto_mask

SMOKE = Path(__file__).resolve().parent / "fixtures" / "smoke_tables"
METHOD = "codecarbon:cpu_load;codecarbon:ram_power_model"
TASKS = {"rca": ("accuracy", "macro_f1"), "qa": ("acc", "acc_norm"),
         "rca_resolution": ("rouge_l", "embedding_similarity")}
DATA = {"rca": ("synthetic", "labels"), "qa": ("teleqna", "options"),
        "rca_resolution": ("synthetic", "generation")}
PAPER_PRECISIONS = ("fp32", "bf16", "fp16", "int8", "w8a8", "nf4", "fp4")
PAPER_METHODS = ("magnitude-unstructured-50", "magnitude-2of4", "magnitude-4of8", "wanda-unstructured-50",
                 "wanda-2of4", "wanda-4of8")
_BITS = {"fp32": 32, "bf16": 16, "fp16": 16, "int8": 8, "w8a8": 8, "nf4": 4, "fp4": 4}


def smoke_tables() -> dict[str, pd.DataFrame]:
    return {path.stem: pd.read_csv(path) for path in sorted(SMOKE.glob("*.csv"))}


def _rng(*parts: object) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32("|".join(map(str, parts)).encode()))


def _pattern(pruning: str) -> tuple[str, float]:
    method, rest = pruning.split("-", 1)
    if rest.startswith("unstructured"):
        return "unstructured", float(rest.rsplit("-", 1)[1]) / 100
    kept, group = rest.split("of")
    return f"{kept}:{group}", 1 - int(kept) / int(group)


def study_tables(models: tuple[str, ...], precisions: tuple[str, ...], *,
                 finetune: tuple[tuple[str, str], ...] = (),
                 prune_targets: tuple[tuple[str, str, str], ...] = (),
                 prune_methods: tuple[str, ...] = (), recover: bool = False,
                 tasks: dict[str, tuple[str, ...]] = TASKS) -> dict[str, pd.DataFrame]:
    """energy, scores, ranking, training, token_lengths and lifecycle of a constructed study.

    ``finetune``: (model, precision) pairs with a LoRA; ``prune_targets``: (model, precision, adapter)
    pruned with every one of ``prune_methods`` (runner labels, e.g. "wanda-2of4"), each also recovered
    when ``recover``.
    """
    configs = []  # (config_id, model, precision, adapter, pruning, phase)
    for model, precision in itertools.product(models, precisions):
        configs.append((f"{model}__{precision}", model, precision, "none", "none", "inference"))
    for model, precision in finetune:
        configs.append((f"{model}__{precision}__lora", model, precision, "lora", "none", "inference"))
    for (model, precision, adapter), pruning in itertools.product(prune_targets, prune_methods):
        base = f"{model}__{precision}" + ("" if adapter == "none" else f"__{adapter}")
        configs.append((f"{base}__{pruning}", model, precision, adapter, pruning, "pruning"))
        if recover:
            rec = "recovery" if adapter == "none" else f"{adapter}+recovery"
            configs.append((f"{base}__{pruning}__recovered", model, precision, rec, pruning, "pruning"))

    energy_rows, score_rows, training_rows = [], [], []
    per_item = {}
    quality = {}
    for config_id, model, precision, adapter, pruning, phase in configs:
        size = 1.0 + models.index(model) * 0.9
        bits = _BITS.get(precision, 16)
        pattern, sparsity = _pattern(pruning) if pruning != "none" else (np.nan, 0.0)
        energy_factor = size * (0.35 + bits / 40) * (1 - 0.25 * sparsity)
        quality_factor = (
            0.75 - 0.04 * (32 - bits) / 8 - 0.3 * sparsity * (0.4 if "recovery" in adapter else 1)
                          + (0.05 if "lora" in adapter else 0) + 0.05 * models.index(model))
        rng = _rng(config_id)
        kwh_items = []
        for task, metrics in tasks.items():
            n_items = 64
            task_scale = 8.0 if task == "rca_resolution" else 1.0
            kwh = 1e-5 * energy_factor * task_scale * rng.uniform(0.9, 1.1) * n_items
            se = kwh * rng.uniform(0.02, 0.08)
            energy_rows.append({
                "config_id": config_id, "phase": phase, "model": model, "precision": precision,
                "adapter": adapter, "pruning": pruning, "sparsity_pattern": pattern,
                "target_sparsity": sparsity, "measured_sparsity": sparsity if pruning != "none" else np.nan,
                "task": task, "n_items": n_items, "n_tokens": n_items * 120, "duration_s": 30.0,
                "energy_kwh": kwh, "energy_net_kwh": kwh * 0.6, "emissions_kg": kwh * 0.056,
                "energy_method": "codecarbon:cpu_load", "device": "cpu", "repeats": 3,
                "energy_kwh_std": se * np.sqrt(3), "energy_kwh_se": se, "cpu_method": "codecarbon:cpu_load",
                "gpu_method": "none", "ram_method": "codecarbon:ram_power_model",
                "estimated_components": "cpu;ram"})
            kwh_items.append(kwh / n_items)
            source, style = DATA.get(task, ("synthetic", "labels"))
            for metric in metrics:
                value = float(np.clip(quality_factor * rng.uniform(0.85, 1.05) - (0.3 if task == "qa" else 0),
                                      0.01, 0.99))
                half = rng.uniform(0.03, 0.12)
                score_rows.append({"config_id": config_id, "task": task, "metric": metric, "value": value,
                                   "ci_low": max(value - half, 0.0), "ci_high": min(value + half, 1.0),
                                   "n_items": n_items, "data": source, "style": style})
        per_item[config_id] = float(np.mean(kwh_items))
        quality[config_id] = float(np.mean([r["value"] for r in score_rows[-sum(map(len, tasks.values())):]]))
        if adapter != "none" and pruning == "none" or "recovery" in adapter:
            for epoch in (1, 2, 3):
                training_rows.append({
                    "config_id": config_id, "model": model, "precision": precision, "adapter": adapter,
                    "epoch": epoch, "train_loss": 2.5 / epoch + 0.05 * (32 - bits) / 8 + rng.uniform(0, 0.05),
                    "eval_loss": 2.6 / epoch + 0.05 * (32 - bits) / 8, "duration_s": 100.0,
                    "energy_kwh": 0.002 * energy_factor * rng.uniform(0.9, 1.1), "energy_kwh_std": 0.0001,
                    "phase": "recovery" if "recovery" in adapter else "finetune",
                    "energy_method": "codecarbon:cpu_load"})

    ids = [c[0] for c in configs]
    e = np.array([per_item[c] for c in ids])
    rho = np.array([quality[c] for c in ids])
    phi = (e.max() - e) / (e.max() - e.min()) if e.max() > e.min() else np.ones_like(e)
    front = pareto_mask(e, rho)
    ranking_rows = []
    for w in np.round(np.linspace(0, 1, 11), 2):
        r = w * phi + (1 - w) * rho
        order = np.argsort(-r)
        rank = np.empty(len(ids), dtype=int)
        rank[order] = np.arange(1, len(ids) + 1)
        p_best = np.zeros(len(ids))
        p_best[order[:3]] = [0.6, 0.3, 0.1][: min(3, len(ids))]
        for i, config_id in enumerate(ids):
            _, model, precision, adapter, pruning, _ = configs[i]
            ranking_rows.append({
                "config_id": config_id, "model": model, "precision": precision, "adapter": adapter,
                "pruning": pruning, "energy_kwh_per_item": e[i], "phi": phi[i], "rho": rho[i], "w": w,
                "R": r[i], "rank": rank[i], "p_best": p_best[i], "tied_with_top": p_best[i] >= 0.05,
                "pareto": front[i], "energy_kwh_per_item_std": e[i] * 0.05, "energy_method": METHOD})

    token_rows = []
    for task, (dataset, split, mean) in {"rca": ("synthetic", "test", 90), "qa": ("teleqna", "test", 400),
                                          "rca_resolution": ("synthetic", "test", 90)}.items():
        if task in tasks:
            for i, n in enumerate(_rng(task).normal(mean, mean / 4, 120).clip(5).astype(int)):
                token_rows.append(
                    {"task": task, "dataset": dataset, "split": split, "item_id": i, "n_tokens": n,
                     "tokenizer": "SmolLM2-135M tokenizer"})

    lifecycle_rows = []
    for i, (config_id, model, precision, adapter, pruning, _) in enumerate(configs):
        reference = f"{model}__fp32"
        setup = 0.0 if adapter == "none" and pruning == "none" else 0.006 * (1 + (pruning != "none"))
        per_query = e[i] * 3.6e6
        ref_query = per_item.get(reference, e[i]) * 3.6e6
        if config_id == reference:
            verdict = "reference"
        elif per_query >= ref_query:
            verdict = "never"
        elif setup == 0:
            verdict = "immediately"
        else:
            verdict = str(int(np.ceil(setup * 3.6e6 / (ref_query - per_query))))
        lifecycle_rows.append({"config_id": config_id, "reference": reference, "step": "total",
                               "source_config": config_id, "setup_kwh": setup, "method": METHOD,
                               "estimate": True, "per_query_j": per_query, "break_even_queries": verdict})

    return {"energy": pd.DataFrame(energy_rows), "scores": pd.DataFrame(score_rows),
            "ranking": pd.DataFrame(ranking_rows), "training": pd.DataFrame(training_rows),
            "token_lengths": pd.DataFrame(token_rows), "lifecycle": pd.DataFrame(lifecycle_rows)}


def two_config_tables() -> dict[str, pd.DataFrame]:
    return study_tables(("smollm2-135m-instruct",), ("fp32", "nf4"))


def default_study_tables() -> dict[str, pd.DataFrame]:
    """params/default.yaml's 12 configs: 2 models x 4 precisions, 2 LoRA, 2 prunings of the top config."""
    return study_tables(("smollm2-135m-instruct", "gemma-3-270m"), ("fp32", "bf16", "w8a8", "nf4"),
                        finetune=(("smollm2-135m-instruct", "fp32"), ("smollm2-135m-instruct", "nf4")),
                        prune_targets=(("smollm2-135m-instruct", "nf4", "lora"),),
                        prune_methods=("magnitude-unstructured-50", "wanda-2of4"))


def paper_study_tables() -> dict[str, pd.DataFrame]:
    """params/paper.yaml's factorial (~100 configs): 2 models x 7 precisions, LoRA at 4 precisions for both,
    6 pruning targets x 6 methods, each recovered."""
    models = ("smollm2-135m-instruct", "gemma-3-270m")
    finetune = tuple(itertools.product(models, ("fp32", "bf16", "int8", "nf4")))
    targets = tuple((m, p, a) for m in models
                    for p, a in (("fp32", "none"), ("bf16", "none"), ("fp32", "lora")))
    return study_tables(models, PAPER_PRECISIONS, finetune=finetune, prune_targets=targets,
                        prune_methods=PAPER_METHODS, recover=True)


def figure_calls(tables: dict[str, pd.DataFrame], w: float = 0.5) -> dict[str, object]:
    """Each paper figure's builder over ``tables``, as zero-argument callables (as notebook 05 calls them)."""
    from llm_energy.report import figures as plots

    lifecycle = tables["lifecycle"]
    totals = lifecycle[lifecycle["step"] == "total"]
    ranked = tables["ranking"][np.isclose(tables["ranking"]["w"], w)].sort_values("R", ascending=False)
    top = list(ranked.loc[ranked["tied_with_top"].astype(bool), "config_id"])
    counted = sorted((int(v), c) for c, v in zip(totals["config_id"], totals["break_even_queries"])
                     if str(v).isdigit())
    fig8_configs = (top + [c for _, c in counted if c not in top])[:max(6, len(top))]
    return {
        "fig1_token_lengths": lambda: plots.fig1_token_lengths(tables["token_lengths"]),
        "fig3_finetune_energy_loss": lambda: plots.fig3_finetune_energy_loss(tables["training"], METHOD),
        "fig4_inference_energy_carbon": lambda: plots.fig4_inference_energy_carbon(tables["energy"]),
        "fig5_quantization_impact": lambda: plots.fig5_quantization_impact(tables["scores"],
                                                                           tables["energy"]),
        "fig6_pruning": lambda: plots.fig6_pruning(tables["scores"], tables["energy"]),
        "fig7_ranking": lambda: plots.fig7_ranking(tables["ranking"], w=w, energy_method=METHOD),
        "fig8_lifecycle": lambda: plots.fig8_lifecycle(lifecycle, fig8_configs, (1, 1e6)),
    }


TABLE_SETS = {"two_configs": two_config_tables, "smoke": smoke_tables, "default12": default_study_tables,
              "paper100": paper_study_tables}
