"""Figures of the study, drawn from the saved CSV tables.

Every ``fig*`` function takes pandas DataFrames, returns a ``matplotlib.figure.Figure`` and
never reads files. Figures are built with the object-oriented API (``Figure`` objects, no
pyplot), so nothing here touches global matplotlib state: the functions work headless, in
notebooks and in parallel test runs alike.

Honesty rule: a figure that shows energy says so in a visible note when any of its numbers
comes from an estimate (e.g. CodeCarbon's CPU-load x TDP model) rather than a measurement
(RAPL, NVML energy counters).
"""

from __future__ import annotations

import contextlib
import re
import textwrap
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..analysis.ranking_math import TIED_WITH_TOP_SHARE, pareto_optimal
from ..config import PRECISION_BITS, PRECISIONS
from ..measure.meter import J_PER_KWH, component_methods, is_estimate

PRECISION_ORDER: tuple[str, ...] = PRECISIONS
NO_DATA_TEXT = "no data for this figure (phase not run)"

FIGSIZE_IN = (10.0, 4.5)
_NOTE_COLOR = "#a40000"
_PARETO_COLOR = "#d62728"


# --------------------------------------------------------------------------------------------
# Energy-method honesty
# --------------------------------------------------------------------------------------------


def _describe_estimate(method: str) -> str:
    text = method.lower()
    if "cpu_load" in text:
        return "CodeCarbon estimate from CPU load x TDP (no RAPL)"
    if "constant" in text:
        return "constant-power estimate"
    if "tdp" in text:
        return "estimate from TDP"
    return "estimate"


def energy_note(methods: Iterable[object]) -> str | None:
    """The annotation a figure must carry for these energy methods, or None if all are measured.

    Missing methods count against the figure: an unrecorded method cannot be claimed as a
    measurement.
    """
    seen: list[str] = []
    unrecorded = False
    for method in methods:
        if method is None or (isinstance(method, float) and np.isnan(method)) or str(method).strip() == "":
            unrecorded = True
            continue
        for part in str(method).split(";"):  # a config's joined component methods
            if part.strip() and part.strip() not in seen:
                seen.append(part.strip())
    estimates = [m for m in seen if is_estimate(m)]
    measured = [m for m in seen if not is_estimate(m)]
    parts: list[str] = []
    if estimates:
        listed = "; ".join(f"{m} = {_describe_estimate(m)}" for m in estimates)
        parts.append(f"Energy: ESTIMATE, not a measurement — {listed}")
    if unrecorded:
        parts.append("Energy method not recorded for some rows — may be an estimate")
    if not parts:
        return None
    if measured:
        parts.append(f"measured: {', '.join(measured)}")
    return " | ".join(parts)


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _require(df: pd.DataFrame, columns: Sequence[str], table: str, figure: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{figure}: {table} table is missing columns {missing}")


def _carries_nothing(df: pd.DataFrame) -> bool:
    # A phase that never ran tends to come back as pd.DataFrame() (no CSV, no header); that is
    # "no data", not a schema error.
    return df.empty and len(df.columns) == 0


def _is_none(values: pd.Series) -> pd.Series:
    text = values.astype("string").str.strip().str.lower()
    return values.isna() | text.isin(["none", "", "nan"]).fillna(True)


def _as_bool(values: pd.Series) -> pd.Series:
    # CSV round-trips can turn booleans into strings.
    if values.dtype == bool:
        return values
    text = values.astype("string").str.strip().str.lower()
    return text.isin(["true", "1", "yes"]).fillna(False).astype(bool)


def precision_order(precisions: Iterable[str]) -> list[str]:
    """Distinct precisions present, ordered by bits descending (fp32 first); unknown ones last."""
    present = {str(p) for p in precisions if pd.notna(p)}
    known = [p for p in PRECISION_ORDER if p in present]
    return known + sorted(present - set(known))


def _precision_tick(precision: str) -> str:
    bits = PRECISION_BITS.get(precision)
    return f"{precision}\n{bits}-bit" if bits else precision


def _precision_colors(precisions: Sequence[str]) -> dict[str, tuple[float, float, float]]:
    import seaborn as sns

    # Colour follows the fixed precision order, so fp16 has the same colour in every figure.
    palette = sns.color_palette("colorblind", len(PRECISION_ORDER) + len(precisions))
    colors = {}
    extra = len(PRECISION_ORDER)
    for p in precisions:
        if p in PRECISION_ORDER:
            colors[p] = palette[PRECISION_ORDER.index(p)]
        else:
            colors[p] = palette[extra]
            extra += 1
    return colors


def _short_model(name: object) -> str:
    return str(name).rsplit("/", 1)[-1]


def pruning_label(pruning: object, pattern: object = None, sparsity: object = None) -> str:
    """Category label of a pruning setting, e.g. ``none``, ``magnitude unstructured 50%``, ``wanda 2:4``."""
    if _is_none(pd.Series([pruning])).iloc[0]:
        return "none"
    label = str(pruning)
    runner = re.fullmatch(r"([a-z_]+)-(?:unstructured-([\d.]+)|(\d+)of(\d+))", label)
    if runner:  # the runner's labels: "magnitude-unstructured-50", "wanda-2of4"
        method, percent, kept, group = runner.groups()
        return f"{method} {kept}:{group}" if kept else f"{method} unstructured {percent}%"
    if "-" in label:  # some other label with its own spelling: shown as it is
        return label
    has_pattern = not _is_none(pd.Series([pattern])).iloc[0]
    if has_pattern:
        label += f" {pattern}"
    # An N:M pattern fixes the sparsity, so a percentage would only repeat it.
    if not (has_pattern and ":" in str(pattern)) and sparsity is not None and pd.notna(sparsity):
        fraction = float(sparsity)
        percent = fraction * 100 if fraction <= 1 else fraction
        label += f" {percent:.0f}%"
    return label


def pareto_mask(energy: Sequence[float], quality: Sequence[float]) -> np.ndarray:
    """Pareto-optimal points for low energy and high quality (:func:`llm_energy.analysis.ranking_math.pareto_optimal`)."""
    return pareto_optimal(energy, quality)


def figure_texts(fig: Figure) -> list[str]:
    """Every text string in a figure (suptitle, figure texts, axes titles, labels, texts, legends)."""
    texts = [t.get_text() for t in fig.texts]
    if fig.get_suptitle() and fig.get_suptitle() not in texts:
        texts.append(fig.get_suptitle())
    for leg in fig.legends:
        texts += [t.get_text() for t in leg.get_texts()]
    for ax in fig.axes:
        texts += [ax.get_title(), ax.get_xlabel(), ax.get_ylabel()]
        texts += [t.get_text() for t in ax.texts]
        legend = ax.get_legend()
        if legend is not None:
            texts += [t.get_text() for t in legend.get_texts()]
    return texts


@contextlib.contextmanager
def _style() -> Iterator[None]:
    import seaborn as sns

    # A context, not sns.set_theme(): the caller's rcParams stay untouched.
    with sns.axes_style("whitegrid"):
        yield


def _new_figure(nrows: int = 1, ncols: int = 1, *, height_in: float | None = None, note: bool = False,
                **kwargs: object) -> tuple[Figure, np.ndarray]:
    height = height_in if height_in is not None else FIGSIZE_IN[1]
    fig = Figure(figsize=(FIGSIZE_IN[0], height), layout="constrained")
    if note:
        # Keep a strip at the bottom free for the energy-method note (fig.text is not laid out).
        fig.get_layout_engine().set(rect=(0, 0.4 / height, 1, 1 - 0.4 / height))
    axes = fig.subplots(nrows, ncols, squeeze=False, **kwargs)
    return fig, axes


def _finish(fig: Figure, title: str, note: str | None) -> Figure:
    fig.suptitle(title, fontsize=13, fontweight="bold")
    if note:
        fig.text(0.5, 0.012, textwrap.fill(note, 150), ha="center", va="bottom", fontsize=8.5,
                 color=_NOTE_COLOR,
                 bbox={"boxstyle": "round,pad=0.3", "facecolor": "#fff4f4", "edgecolor": _NOTE_COLOR})
    return fig


def _no_data_figure(title: str) -> Figure:
    fig = Figure(figsize=FIGSIZE_IN)
    fig.suptitle(title, fontsize=13, fontweight="bold")
    fig.text(0.5, 0.5, NO_DATA_TEXT, ha="center", va="center", fontsize=14, color="0.4")
    return fig


def _errorbars(ax: Axes, x: Sequence[float], y: Sequence[float], *, yerr: object = None,
               xerr: object = None, color: object = "0.2") -> None:
    """Error bars only where the spread is known and non-zero (NaN/0 std draws nothing)."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)

    def _as2(err: object) -> np.ndarray | None:
        if err is None:
            return None
        arr = np.asarray(err, dtype=float)
        return np.vstack([arr, arr]) if arr.ndim == 1 else arr

    ye, xe = _as2(yerr), _as2(xerr)
    keep = np.isfinite(x) & np.isfinite(y)
    for err in (ye, xe):
        if err is not None:
            keep &= np.isfinite(err).all(axis=0) & (err.sum(axis=0) > 0)
    if not keep.any():
        return
    ax.errorbar(x[keep], y[keep],
                yerr=None if ye is None else np.clip(ye[:, keep], 0, None),
                xerr=None if xe is None else np.clip(xe[:, keep], 0, None),
                fmt="none", ecolor=color, elinewidth=1, capsize=3, zorder=3)


def _grouped_bars(ax: Axes, groups: Sequence[str], series: Sequence[str], values: pd.DataFrame,
                  errors: pd.DataFrame | None, colors: dict[str, object] | None = None) -> None:
    """Bars for ``values`` (index: groups, columns: series), one cluster per group."""
    x = np.arange(len(groups))
    width = 0.8 / max(len(series), 1)
    for i, name in enumerate(series):
        offsets = x - 0.4 + width * (i + 0.5)
        heights = values.reindex(index=groups)[name].to_numpy(dtype=float) if name in values else np.full(len(groups), np.nan)
        color = None if colors is None else colors.get(name)
        ax.bar(offsets, np.nan_to_num(heights), width=width * 0.95, label=str(name), color=color, zorder=2)
        if errors is not None and name in errors:
            _errorbars(ax, offsets, heights, yerr=errors.reindex(index=groups)[name].to_numpy(dtype=float))
    ax.set_xticks(x, groups)


def _base_rows(df: pd.DataFrame) -> pd.DataFrame:
    return df[_is_none(df["adapter"]) & _is_none(df["pruning"])]


def _config_meta(energy: pd.DataFrame) -> pd.DataFrame:
    # Every row of a config carries the same model/precision/adapter/pruning; the first will do.
    keep = [c for c in ("config_id", "model", "precision", "adapter", "pruning", "sparsity_pattern",
                        "target_sparsity", "measured_sparsity", "energy_method") if c in energy.columns]
    return energy.drop_duplicates("config_id")[keep]


def _join_meta(scores: pd.DataFrame, energy: pd.DataFrame) -> pd.DataFrame:
    meta = _config_meta(energy)
    scores = scores.drop(columns=[c for c in meta.columns if c != "config_id" and c in scores.columns])
    return scores.merge(meta, on="config_id", how="inner")


def _per_item(energy: pd.DataFrame) -> pd.DataFrame:
    """Add per-item energy (Wh) and emissions (gCO2e) with their standard errors (energy_kwh_se: the
    standard error of the row's energy in either window design; energy_kwh_std for older tables)."""
    out = energy.copy()
    n = out["n_items"].astype(float).where(out["n_items"].astype(float) > 0)
    std_kwh = out["energy_kwh_std"].astype(float) if "energy_kwh_std" in out else pd.Series(np.nan, index=out.index)
    if "energy_kwh_se" in out:
        std_kwh = out["energy_kwh_se"].astype(float).where(out["energy_kwh_se"].notna(), std_kwh)
    out["wh_per_item"] = out["energy_kwh"].astype(float) * 1000 / n
    out["wh_per_item_std"] = std_kwh * 1000 / n
    out["g_per_item"] = out["emissions_kg"].astype(float) * 1000 / n
    # Emissions are energy times one carbon intensity, so they share the energy's relative spread.
    ratio = out["emissions_kg"].astype(float) / out["energy_kwh"].astype(float).where(out["energy_kwh"] != 0)
    out["g_per_item_std"] = std_kwh * ratio * 1000 / n
    return out


def _legend_outside(ax: Axes, title: str | None = None, **kwargs: object) -> None:
    ax.legend(title=title, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8,
              title_fontsize=8, frameon=False, **kwargs)


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------


def save_figure(fig: Figure, figures_dir: Path, name: str) -> list[Path]:
    """Write ``<name>.png`` (150 dpi) and ``<name>.pdf`` into ``figures_dir``; return both paths."""
    figures_dir = Path(figures_dir)
    figures_dir.mkdir(parents=True, exist_ok=True)
    png = figures_dir / f"{name}.png"
    pdf = figures_dir / f"{name}.pdf"
    fig.savefig(png, dpi=150)
    fig.savefig(pdf)
    return [png, pdf]


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------

FIG1_TITLE = "Figure 1 — Distribution of token lengths in datasets"
FIG3_TITLE = "Figure 3 — Fine-tuning energy vs training loss per epoch"
FIG4_TITLE = "Figure 4 — Inference energy and carbon per precision"
FIG5_TITLE = "Figure 5 — Impact of quantization level on task performance"
FIG6_TITLE = "Figure 6 — Pruning: task performance and inference energy"
FIG7_TITLE = "Figure 7 — Energy-aware ranking"
FIG8_TITLE = "Figure 8 — Cumulative energy over queries served"


def task_labels(scores: pd.DataFrame) -> dict[str, str]:
    """Per task, how figures name it: the task with its data and QA style when scores.csv says them,
    e.g. "rca (SYNTHETIC tickets)" or "qa (TeleQnA, options)" (synthetic data is always said)."""
    labels: dict[str, str] = {}
    if "task" not in scores:
        return labels
    for task, rows in scores.groupby(scores["task"].astype(str)):
        source = str(rows["data"].dropna().iloc[0]) if "data" in rows and rows["data"].notna().any() else ""
        style = str(rows["style"].dropna().iloc[0]) if "style" in rows and rows["style"].notna().any() else ""
        words = {"synthetic": "SYNTHETIC data", "teleqna": "TeleQnA"}.get(source, Path(source).name if source else "")
        if task in ("rca", "rca_resolution") and source == "synthetic":
            words = "SYNTHETIC tickets"
        extra = ", ".join(x for x in (words, style if task == "qa" else "") if x)
        labels[task] = f"{task} ({extra})" if extra else task
    return labels


def fig1_token_lengths(token_lengths: pd.DataFrame) -> Figure:
    """Token-length histograms, one panel per task, one step histogram per dataset/split."""
    if _carries_nothing(token_lengths):
        return _no_data_figure(FIG1_TITLE)
    _require(token_lengths, ["task", "dataset", "split", "item_id", "n_tokens"], "token lengths",
             "fig1_token_lengths")
    df = token_lengths.dropna(subset=["n_tokens"])
    if df.empty:
        return _no_data_figure(FIG1_TITLE)
    tasks = sorted(df["task"].astype(str).unique())
    with _style():
        fig, axes = _new_figure(1, len(tasks))
        for ax, task in zip(axes[0], tasks):
            sub = df[df["task"].astype(str) == task]
            tokens = sub["n_tokens"].astype(float)
            # Shared bins per panel so the datasets are comparable bar for bar.
            bins = np.histogram_bin_edges(tokens, bins=min(40, max(10, int(np.sqrt(len(tokens))))))
            for (dataset, split), part in sub.groupby(["dataset", "split"], sort=True):
                n = part["n_tokens"].astype(float)
                label = f"{dataset}/{split} (n={len(n)}, median={n.median():.0f})"
                ax.hist(n, bins=bins, histtype="stepfilled", alpha=0.35, label=label)
                ax.axvline(n.median(), color="0.3", linestyle=":", linewidth=1)
            ax.set_title(f"Task: {task}")
            xlabel = "Tokens per item"
            if "tokenizer" in sub.columns and sub["tokenizer"].notna().any():
                names = ", ".join(sorted(sub["tokenizer"].dropna().astype(str).unique()))
                xlabel += f" (tokenizer: {names})"
            ax.set_xlabel(xlabel)
            ax.set_ylabel("Items")
            # Below the panel: histograms fill the plot area, so any inside spot would hide bars.
            ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
    return _finish(fig, FIG1_TITLE, None)


def fig3_finetune_energy_loss(training: pd.DataFrame, energy_method: str, *,
                              cumulative: bool = True) -> Figure:
    """Training loss against fine-tuning energy, one line per run (coloured by precision).

    ``energy_method`` comes from energy.csv (training.csv does not record it). With
    ``cumulative`` the x position of epoch k is the energy of epochs 1..k, so each line reads
    as "loss reached for energy spent"; spreads then add in quadrature, treating epochs as
    independent windows.
    """
    if _carries_nothing(training):
        return _no_data_figure(FIG3_TITLE)
    _require(training, ["config_id", "model", "precision", "adapter", "epoch", "train_loss", "energy_kwh"],
             "training", "fig3_finetune_energy_loss")
    df = training.dropna(subset=["energy_kwh", "train_loss"])
    if "phase" in df.columns:  # recovery adapters trained on pruned models belong to Figure 6
        df = df[df["phase"].fillna("finetune") == "finetune"]
    if df.empty:
        return _no_data_figure(FIG3_TITLE)
    precisions = precision_order(df["precision"])
    colors = _precision_colors(precisions)
    models = sorted(df["model"].astype(str).unique())
    adapters = sorted(df["adapter"].astype(str).unique())
    linestyles = ["-", "--", "-.", ":"]
    note = energy_note([energy_method])
    with _style():
        fig, axes = _new_figure(note=note is not None)
        ax = axes[0, 0]
        runs = sorted(df.groupby("config_id"),
                      key=lambda kv: (str(kv[1]["model"].iloc[0]), precisions.index(str(kv[1]["precision"].iloc[0]))))
        for config_id, run in runs:
            run = run.sort_values("epoch")
            precision = str(run["precision"].iloc[0])
            model = str(run["model"].iloc[0])
            kwh = run["energy_kwh"].astype(float).to_numpy()
            std = (run["energy_kwh_std"].astype(float).to_numpy() if "energy_kwh_std" in run
                   else np.full(len(run), np.nan))
            if cumulative:
                kwh = np.cumsum(kwh)
                std = np.sqrt(np.cumsum(std ** 2))
            loss = run["train_loss"].astype(float).to_numpy()
            label = precision
            if len(models) > 1:
                label = f"{_short_model(model)} {label}"
            if len(adapters) > 1:
                label += f" ({run['adapter'].iloc[0]})"
            ax.plot(kwh, loss, marker="o", color=colors[precision],
                    linestyle=linestyles[models.index(model) % len(linestyles)], label=label, zorder=2)
            _errorbars(ax, kwh, loss, xerr=std, color=colors[precision])
            for epoch, x, y in zip(run["epoch"], kwh, loss):
                ax.annotate(f"{epoch:g}" if isinstance(epoch, (int, float)) else str(epoch), (x, y),
                            textcoords="offset points", xytext=(5, 4), fontsize=8, color="0.25")
        ax.set_xlabel("Cumulative fine-tuning energy (kWh)" if cumulative else "Fine-tuning energy per epoch (kWh)")
        ax.set_ylabel("Training loss")
        ax.set_title("Each marker is one epoch (number next to it)", fontsize=9)
        _legend_outside(ax, title="precision")
    return _finish(fig, FIG3_TITLE, note)


def fig4_inference_energy_carbon(energy: pd.DataFrame) -> Figure:
    """Energy (Wh/item) and emissions (gCO2e/item) of the base models per precision and task."""
    if _carries_nothing(energy):
        return _no_data_figure(FIG4_TITLE)
    _require(energy, ["phase", "model", "precision", "adapter", "pruning", "task", "n_items", "energy_kwh",
                      "emissions_kg", "energy_method"], "energy", "fig4_inference_energy_carbon")
    df = _base_rows(energy[energy["phase"] == "inference"])
    if df.empty:
        return _no_data_figure(FIG4_TITLE)
    df = _per_item(df)
    precisions = precision_order(df["precision"])
    colors = _precision_colors(precisions)
    several_models = df["model"].nunique() > 1
    df["group"] = df["task"].astype(str)
    if several_models:
        df["group"] = df["group"] + "\n" + df["model"].map(_short_model)
    groups = sorted(df["group"].unique())
    # Repeated (group, precision) rows are averaged; spreads likewise, as a typical window spread.
    agg = df.groupby(["group", "precision"])[["wh_per_item", "wh_per_item_std", "g_per_item",
                                              "g_per_item_std"]].mean()
    note = energy_note(component_methods(df))
    panels = [("wh_per_item", "Energy per item (Wh/item, ± s.e.)", "(a) Energy"),
              ("g_per_item", "Emissions per item (gCO2e/item, ± s.e.)", "(b) Carbon")]
    with _style():
        fig, axes = _new_figure(1, 2, note=note is not None)
        for ax, (column, ylabel, title) in zip(axes[0], panels):
            values = agg[column].unstack("precision")
            errors = agg[f"{column}_std"].unstack("precision")
            _grouped_bars(ax, groups, precisions, values, errors, colors)
            ax.set_ylabel(ylabel)
            ax.set_xlabel("task / model" if several_models else "task")
            ax.set_title(title)
        handles, labels = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels, title="precision", loc="outside right upper", fontsize=8, title_fontsize=8,
                   frameon=False)
    return _finish(fig, FIG4_TITLE, note)


def fig5_quantization_impact(scores: pd.DataFrame, energy: pd.DataFrame) -> Figure:
    """Metric value (with CI) per precision for the base models, one panel per task x metric."""
    if _carries_nothing(scores) or _carries_nothing(energy):
        return _no_data_figure(FIG5_TITLE)
    _require(scores, ["config_id", "task", "metric", "value", "ci_low", "ci_high"], "scores",
             "fig5_quantization_impact")
    _require(energy, ["config_id", "model", "precision", "adapter", "pruning"], "energy",
             "fig5_quantization_impact")
    df = _base_rows(_join_meta(scores, energy)).dropna(subset=["value"])
    if df.empty:
        return _no_data_figure(FIG5_TITLE)
    precisions = precision_order(df["precision"])
    models = sorted(df["model"].astype(str).unique())
    panels = sorted(df.groupby(["task", "metric"]).groups)
    ncols = min(len(panels), 3)
    nrows = int(np.ceil(len(panels) / ncols))
    x_of = {p: i for i, p in enumerate(precisions)}
    with _style():
        fig, axes = _new_figure(nrows, ncols, height_in=0.9 + 3.6 * nrows)
        for ax in axes.flat[len(panels):]:
            ax.set_visible(False)
        for ax, (task, metric) in zip(axes.flat, panels):
            sub = df[(df["task"] == task) & (df["metric"] == metric)]
            for i, model in enumerate(models):
                rows = sub[sub["model"].astype(str) == model].groupby("precision")[["value", "ci_low", "ci_high"]].mean()
                rows = rows.reindex([p for p in precisions if p in rows.index])
                # Dodge models sideways so their CI bars do not sit on top of each other.
                x = np.array([x_of[p] for p in rows.index], dtype=float) + (i - (len(models) - 1) / 2) * 0.08
                y = rows["value"].to_numpy(dtype=float)
                line = ax.plot(x, y, marker="o", label=_short_model(model), zorder=2)[0]
                yerr = np.vstack([y - rows["ci_low"].to_numpy(dtype=float), rows["ci_high"].to_numpy(dtype=float) - y])
                _errorbars(ax, x, y, yerr=yerr, color=line.get_color())
            # Names only: with bits added, six ticks per panel run into each other; the bits are in the label.
            ax.set_xticks(range(len(precisions)), precisions, fontsize=9)
            ax.set_xlim(-0.5, len(precisions) - 0.5)
            ax.set_title(f"{task_labels(sub).get(str(task), task)}: {metric}")
            ax.set_ylabel(str(metric))
        bits = " > ".join(dict.fromkeys(f"{PRECISION_BITS[p]}" for p in precisions if p in PRECISION_BITS))
        for ax in axes[-1]:
            ax.set_xlabel(f"precision (bits: {bits})" if bits else "precision")
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, title="model", loc="outside right upper", fontsize=8, title_fontsize=8,
                   frameon=False)
    return _finish(fig, FIG5_TITLE, None)


def fig6_pruning(scores: pd.DataFrame, energy: pd.DataFrame) -> Figure:
    """Pruned configs against the unpruned model of the same model+precision: metrics and energy/item."""
    if _carries_nothing(scores) or _carries_nothing(energy):
        return _no_data_figure(FIG6_TITLE)
    _require(scores, ["config_id", "task", "metric", "value", "ci_low", "ci_high"], "scores", "fig6_pruning")
    _require(energy, ["config_id", "phase", "model", "precision", "adapter", "pruning", "sparsity_pattern",
                      "target_sparsity", "task", "n_items", "energy_kwh", "emissions_kg", "energy_method"],
             "energy", "fig6_pruning")
    meta = _config_meta(energy)
    meta["adapter"] = meta["adapter"].where(~_is_none(meta["adapter"]), "none").astype(str)
    meta["recovered"] = meta["adapter"].str.endswith("recovery")
    # The config each row belongs to: a pruned or recovered config's target (its adapter without the
    # recovery one), which is its own unpruned twin.
    meta["target_adapter"] = meta["adapter"].str.replace(r"\+?recovery$", "", regex=True).replace("", "none")
    meta["pruned"] = ~_is_none(meta["pruning"])
    targets = meta.loc[meta["pruned"], ["model", "precision", "target_adapter"]].drop_duplicates()
    meta = meta[meta["pruned"] | (meta["adapter"] == meta["target_adapter"])]
    meta = meta.merge(targets, on=["model", "precision", "target_adapter"], how="inner")
    if meta.empty:
        return _no_data_figure(FIG6_TITLE)
    meta["category"] = [("unpruned" if not r.pruned else pruning_label(r.pruning, r.sparsity_pattern, r.target_sparsity))
                        + (" + recovery" if r.recovered else "") for r in meta.itertuples()]
    target_names = (meta["model"].map(_short_model) + " " + meta["precision"].astype(str)
                    + meta["target_adapter"].map(lambda a: "" if a == "none" else f" + {a}"))
    single_target = target_names.nunique() == 1
    if not single_target:
        meta["category"] = target_names + "\n" + meta["category"]
    # Per target: unpruned, then each pruning, each followed by its recovered config.
    meta["order"] = meta["pruned"].astype(int) + meta["recovered"].astype(int)
    meta["base_category"] = meta["category"].str.replace(" + recovery", "", regex=False)
    meta = meta.sort_values(["model", "precision", "target_adapter", "pruned", "base_category", "order"])
    categories = list(dict.fromkeys(meta["category"]))

    sc = scores.drop(columns=[c for c in meta.columns if c != "config_id" and c in scores.columns])
    sc = sc.merge(meta[["config_id", "category"]], on="config_id").dropna(subset=["value"])
    names = task_labels(sc)
    sc["series"] = sc["task"].astype(str).map(lambda t: names.get(t, t)) + ": " + sc["metric"].astype(str)
    sc["err_low"] = sc["value"] - sc["ci_low"]
    sc["err_high"] = sc["ci_high"] - sc["value"]

    # Pruned configs are evaluated in the pruning phase, their unpruned twins in the inference phase.
    en = energy[energy["phase"].isin(["inference", "pruning"])]
    en = _per_item(en.merge(meta[["config_id", "category"]], on="config_id"))
    if sc.empty and en.empty:
        return _no_data_figure(FIG6_TITLE)
    note = energy_note(component_methods(en)) if not en.empty else None
    # Wrap each line of a label so neighbouring categories never run into each other.
    labels = ["\n".join(textwrap.fill(line, 13) for line in c.split("\n")) for c in categories]
    tick_size = 8 if len(categories) <= 4 else 7
    with _style():
        fig, axes = _new_figure(1, 2, note=note is not None)
        ax_s, ax_e = axes[0]
        series = sorted(sc["series"].unique())
        values = sc.groupby(["category", "series"])["value"].mean().unstack("series")
        _grouped_bars(ax_s, categories, series, values, None)
        lows = sc.groupby(["category", "series"])["err_low"].mean().unstack("series")
        highs = sc.groupby(["category", "series"])["err_high"].mean().unstack("series")
        width = 0.8 / max(len(series), 1)
        for i, name in enumerate(series):
            if name not in values:
                continue
            x = np.arange(len(categories)) - 0.4 + width * (i + 0.5)
            yerr = np.vstack([lows.reindex(index=categories)[name].to_numpy(dtype=float),
                              highs.reindex(index=categories)[name].to_numpy(dtype=float)])
            _errorbars(ax_s, x, values.reindex(index=categories)[name].to_numpy(dtype=float), yerr=yerr)
        ax_s.set_title("(a) Task performance (CI)")
        ax_s.set_ylabel("metric value")
        tasks = sorted(en["task"].astype(str).unique())
        agg = en.groupby(["category", "task"])[["wh_per_item", "wh_per_item_std"]].mean()
        _grouped_bars(ax_e, categories, tasks, agg["wh_per_item"].unstack("task"),
                      agg["wh_per_item_std"].unstack("task"))
        ax_e.set_title("(b) Inference energy")
        ax_e.set_ylabel("Energy per item (Wh/item, ± s.e.)")
        for ax, title in ((ax_s, "task: metric"), (ax_e, "task")):
            ax.set_xticks(range(len(categories)), labels, fontsize=tick_size,
                          rotation=30 if len(categories) > 6 else 0, ha="right" if len(categories) > 6 else "center")
            if single_target:
                ax.set_xlabel(f"pruned config: {target_names.iloc[0]}", fontsize=9)
            handles = ax.get_legend_handles_labels()[0]
            if handles:
                # Legend under the axes (below the category labels): it never covers a bar or a tick.
                lines = max(label.count("\n") + 1 for label in labels) + (1 if single_target else 0)
                ax.legend(title=title, fontsize=8, title_fontsize=8, loc="upper center", ncol=min(len(handles), 3),
                          bbox_to_anchor=(0.5, -0.1 - 0.065 * lines), frameon=False)
    return _finish(fig, FIG6_TITLE, note)


def fig7_ranking(ranking: pd.DataFrame, w: float = 0.5, energy_method: str | None = None) -> Figure:
    """(a) Ranking score R against the weight w per config; (b) energy/item vs rho Pareto front at w.

    ranking.csv does not say how its energy was obtained: pass ``energy_method`` (or add an
    ``energy_method`` column), otherwise the figure says the method is not recorded.
    """
    if _carries_nothing(ranking):
        return _no_data_figure(FIG7_TITLE)
    _require(ranking, ["config_id", "energy_kwh_per_item", "rho", "w", "R"], "ranking", "fig7_ranking")
    df = ranking.dropna(subset=["w", "R"])
    if df.empty:
        return _no_data_figure(FIG7_TITLE)
    methods = list(df["energy_method"]) if "energy_method" in df.columns else [energy_method]
    note = energy_note(methods)
    ws = np.sort(df["w"].astype(float).unique())
    w_used = float(ws[np.argmin(np.abs(ws - w))])
    at_w = df[np.isclose(df["w"].astype(float), w_used)].drop_duplicates("config_id").copy()
    x = at_w["energy_kwh_per_item"].astype(float).to_numpy() * 1000
    y = at_w["rho"].astype(float).to_numpy()
    if "pareto" in at_w.columns:
        front = _as_bool(at_w["pareto"]).to_numpy()
    else:
        front = pareto_mask(x, y)
    config_ids = [str(c) for c in at_w["config_id"]]
    optimal_ids = {c for c, f in zip(config_ids, front) if f}
    with _style():
        fig, axes = _new_figure(1, 2, note=note is not None)
        ax_r, ax_p = axes[0]
        for config_id, rows in sorted(df.groupby("config_id"), key=lambda kv: str(kv[0])):
            rows = rows.sort_values("w")
            highlight = str(config_id) in optimal_ids
            # The colour cycle repeats after 10; a new line style keeps configs 11+ distinguishable.
            style = ["-", "--", ":", "-."][(len(ax_r.lines) // 10) % 4]
            ax_r.plot(rows["w"].astype(float), rows["R"].astype(float), marker=".", linestyle=style,
                      linewidth=2.2 if highlight else 1.2, label=str(config_id) + (" *" if highlight else ""))
        ax_r.axvline(w_used, color="0.4", linestyle=":", linewidth=1)
        ax_r.set_xlabel("weight w")
        ax_r.set_ylabel("ranking score R")
        ax_r.set_title("(a) R against w (* = Pareto-optimal)")

        xerr = (at_w["energy_kwh_per_item_std"].astype(float).to_numpy() * 1000
                if "energy_kwh_per_item_std" in at_w.columns else None)
        yerr = None
        if {"rho_ci_low", "rho_ci_high"} <= set(at_w.columns):
            yerr = np.vstack([y - at_w["rho_ci_low"].astype(float).to_numpy(),
                              at_w["rho_ci_high"].astype(float).to_numpy() - y])
        if xerr is not None or yerr is not None:
            _errorbars(ax_p, x, y, xerr=xerr, yerr=yerr, color="0.5")
        ax_p.scatter(x[~front], y[~front], color="0.55", s=30, zorder=3, label="dominated")
        ax_p.scatter(x[front], y[front], color=_PARETO_COLOR, s=55, zorder=4, label="Pareto-optimal")
        order = np.argsort(x[front])
        ax_p.step(x[front][order], y[front][order], where="post", color=_PARETO_COLOR, linewidth=1.5, zorder=3)
        for cid, xi, yi in zip(np.array(config_ids)[front], x[front], y[front]):
            ax_p.annotate(cid, (xi, yi), textcoords="offset points", xytext=(5, -10), fontsize=8,
                          color=_PARETO_COLOR)
        if "p_best" in at_w.columns and at_w["p_best"].notna().any():
            # Uncertainty of the top: the configs the resampling cannot separate, ringed, with how often
            # each comes out best.
            tied = (_as_bool(at_w["tied_with_top"]).to_numpy() if "tied_with_top" in at_w.columns
                    else at_w["p_best"].fillna(0).to_numpy() >= TIED_WITH_TOP_SHARE)
            ax_p.scatter(x[tied], y[tied], s=190, facecolors="none", edgecolors="black", linewidths=1.2, zorder=5,
                         label="cannot be separated from the top")
            for xi, yi, p in zip(x[tied], y[tied], at_w["p_best"].to_numpy()[tied]):
                if pd.notna(p):
                    ax_p.annotate(f"best in {p:.0%}", (xi, yi), textcoords="offset points", xytext=(5, 6),
                                  fontsize=7, color="black")
        ax_p.set_xlabel("Energy per item (Wh/item, ± s.e.)")
        # Tiny Wh values print as long decimals that collide; a few ticks in scientific notation.
        ax_p.xaxis.set_major_locator(MaxNLocator(nbins=5))
        ax_p.ticklabel_format(axis="x", style="sci", scilimits=(-2, 3))
        ax_p.set_ylabel("ρ (quality)")
        ax_p.set_title(f"(b) Pareto front at w = {w_used:.2f}")
        ax_p.legend(fontsize=8, loc="best")
        _legend_outside(ax_r, title="config", ncol=2 if df["config_id"].nunique() > 16 else 1)
    return _finish(fig, FIG7_TITLE, note)


def fig8_lifecycle(lifecycle: pd.DataFrame, configs: Sequence[str], queries: Sequence[float],
                   energy_method: str | None = None) -> Figure:
    """Cumulative energy (setup + N x per query, kWh) against queries served N, log-log: one line per
    config of ``configs`` and each one's reference, the break-even point of each marked. Lines of
    configs whose energy is an estimate are dashed, and the note says so."""
    if _carries_nothing(lifecycle):
        return _no_data_figure(FIG8_TITLE)
    _require(lifecycle, ["config_id", "reference", "step", "setup_kwh", "per_query_j", "break_even_queries",
                         "estimate"], "lifecycle", "fig8_lifecycle")
    totals = lifecycle[lifecycle["step"] == "total"].drop_duplicates("config_id").set_index("config_id")
    shown = [c for c in configs if c in totals.index]
    shown += [r for r in dict.fromkeys(str(totals.loc[c, "reference"]) for c in shown)
              if r and r in totals.index and r not in shown]
    if not shown:
        return _no_data_figure(FIG8_TITLE)
    grid = np.logspace(np.log10(min(queries)), np.log10(max(queries)), 200)
    methods = [energy_method] if energy_method else list(totals.loc[shown, "method"])
    note = energy_note(methods)
    with _style():
        fig, axes = _new_figure(1, 1, height_in=5.0, note=note is not None)
        ax = axes[0, 0]
        for config_id in shown:
            row = totals.loc[config_id]
            setup, per_query = float(row["setup_kwh"]), float(row["per_query_j"]) / J_PER_KWH
            total = setup + grid * per_query
            estimate = bool(row["estimate"]) or (note is not None and "ESTIMATE" in note)
            line, = ax.plot(grid, total, linestyle="--" if estimate else "-", linewidth=1.6,
                            label=config_id + (" (reference)" if row["break_even_queries"] == "reference" else ""))
            verdict = str(row["break_even_queries"])
            if verdict.isdigit() and float(verdict) <= grid[-1]:
                n = float(verdict)
                ax.plot([n], [setup + n * per_query], marker="o", markersize=7, color=line.get_color(),
                        markeredgecolor="black", zorder=5)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("queries served (scored items)")
        ax.set_ylabel("cumulative energy (kWh): setup + queries x per query")
        ax.set_title("break-even against the reference: ●; dashed: estimated energy", fontsize=9)
        _legend_outside(ax, "config")
    return _finish(fig, FIG8_TITLE, note)


def config_figure(energy: pd.DataFrame, scores: pd.DataFrame, config_id: str) -> Figure:
    """One config's inference rows (notebook 03): energy per item for each task (J; hatched where a
    component is estimated, not counted) and each metric with its 95% interval; the estimate note as
    every energy figure carries it."""
    energy = energy[(energy["config_id"] == config_id) & (energy["phase"] == "inference")]
    scores = scores[scores["config_id"] == config_id]
    note = energy_note(component_methods(energy)) if len(energy) else None
    with _style():
        fig, axes = _new_figure(1, 2, height_in=3.6, note=note is not None)
        left, right = axes[0]
        per_item_j = energy["energy_kwh"].astype(float) / energy["n_items"].astype(float) * J_PER_KWH
        bars = left.bar(energy["task"].astype(str), per_item_j, color="#4c72b0")
        for bar, estimated in zip(bars, energy["estimated_components"].fillna("") if "estimated_components" in energy
                                  else [""] * len(energy)):
            if estimated:
                bar.set_hatch("//")
        left.set_ylabel("energy per item (J)")
        left.set_title("gross energy per item" + (" (hatched: estimated)" if note else ""), fontsize=9)
        labels = [f"{t}: {m}" for t, m in zip(scores["task"], scores["metric"])]
        low = (scores["value"] - scores["ci_low"]).clip(lower=0)
        high = (scores["ci_high"] - scores["value"]).clip(lower=0)
        right.errorbar(scores["value"], labels, xerr=[low, high], fmt="o", color="#dd8452", capsize=4)
        right.set_xlim(-0.05, 1.05)
        right.invert_yaxis()
        right.set_xlabel("score (95% bootstrap interval)")
        right.tick_params(axis="y", labelsize=8)
    return _finish(fig, config_id, note)


def epochs_figure(epochs: Sequence[Any], title: str) -> Figure:
    """One training run per epoch (notebook 02): training and validation loss, and the energy spent so
    far against the loss reached (the paper's Figure 3 for one config); ``epochs`` are the run's
    EpochRecords (epoch, train_loss, eval_loss, energy_kwh, energy_method)."""
    numbers = [e.epoch for e in epochs]
    note = energy_note([e.energy_method for e in epochs if e.energy_method != "none"] or [None])
    with _style():
        fig, axes = _new_figure(1, 2, height_in=3.6, note=note is not None)
        left, right = axes[0]
        left.plot(numbers, [e.train_loss for e in epochs], "o-", label="training")
        left.plot(numbers, [e.eval_loss for e in epochs], "s--", label="validation")
        left.set_xlabel("epoch")
        left.set_ylabel("loss (nats per answer token)")
        left.set_xticks(numbers)
        left.legend(fontsize=8)
        spent = np.cumsum([e.energy_kwh for e in epochs]) * J_PER_KWH / 1000
        reached = [e.train_loss if np.isnan(e.eval_loss) else e.eval_loss for e in epochs]
        right.plot(spent, reached, "o-", color="#55a868")
        for epoch, x, y in zip(numbers, spent, reached):
            right.annotate(f"epoch {epoch}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        right.set_xlabel("energy spent so far (kJ)")
        right.set_ylabel("loss reached")
        for axis in (left, right):
            axis.ticklabel_format(axis="y", useOffset=False)
    return _finish(fig, title, note)


def layers_figure(layers: Sequence[Any], target_sparsity: float, title: str) -> Figure:
    """Measured sparsity of every pruned layer against the target, in module order (notebook 04);
    ``layers`` carry name and measured_sparsity."""
    names = [layer.name.removeprefix("model.").replace("layers.", "L").replace("self_attn.", "").replace("mlp.", "")
             for layer in layers]
    with _style():
        fig, axes = _new_figure(1, 1, height_in=3.6)
        axis = axes[0, 0]
        axis.bar(range(len(names)), [layer.measured_sparsity for layer in layers], color="#8172b3")
        axis.axhline(target_sparsity, color="black", linestyle="--", linewidth=1, label=f"target {target_sparsity:.2f}")
        axis.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
        axis.set_ylim(0, 1)
        axis.set_ylabel("measured sparsity")
        _legend_outside(axis)
    return _finish(fig, title, None)


def as_image(fig: Figure, dpi: int = 110) -> "object":
    """The figure as an inline PNG for notebooks and the HTML report (no pyplot state needed)."""
    import io

    from IPython.display import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return Image(data=buffer.getvalue(), format="png")
