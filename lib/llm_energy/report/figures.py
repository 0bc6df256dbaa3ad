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
import math
import re
import textwrap
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter
from matplotlib.transforms import ScaledTranslation

from ..analysis.ranking_math import TIED_WITH_TOP_SHARE, pareto_optimal
from ..config import PRECISION_BITS, PRECISIONS
from ..layout import config_words, pruning_words
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
    runner = pruning_words(label)  # the runner's labels: "magnitude-unstructured-50", "wanda-2of4"
    if runner:
        return runner
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
    """Pareto-optimal points for low energy and high quality
    (:func:`llm_energy.analysis.ranking_math.pareto_optimal`)."""
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


# The figure grows with its content, within these bounds (inches).
_MIN_SIZE_IN = (6.0, 3.0)
_MAX_SIZE_IN = (15.0, 30.0)


def _note_chars(width_in: float) -> int:
    """Characters of the 8.5 pt note that fit on one line of a figure ``width_in`` wide."""
    return max(60, int(width_in * 14.5))


def _note_height_in(note: str | None, width_in: float) -> float:
    if not note:
        return 0.0
    return 0.2 + 0.16 * len(textwrap.wrap(note, _note_chars(width_in)))


def _sized_figure(width_in: float, height_in: float, note: str | None | bool = None) -> Figure:
    """A constrained-layout figure of about this size (clamped to the sane bounds), with a strip at the
    bottom kept free for the energy-method note when there is one (fig.text is not laid out)."""
    width = float(np.clip(width_in, _MIN_SIZE_IN[0], _MAX_SIZE_IN[0]))
    strip = _note_height_in(note, width) if isinstance(note, str) else (0.4 if note else 0.0)
    height = float(np.clip(height_in + strip, _MIN_SIZE_IN[1], _MAX_SIZE_IN[1]))
    fig = Figure(figsize=(width, height), layout="constrained")
    if strip:
        fig.get_layout_engine().set(rect=(0, strip / height, 1, 1 - strip / height))
    return fig


def _new_figure(nrows: int = 1, ncols: int = 1, *, height_in: float | None = None,
                note: bool | str | None = False, width_in: float | None = None,
                **kwargs: object) -> tuple[Figure, np.ndarray]:
    height = height_in if height_in is not None else FIGSIZE_IN[1]
    fig = _sized_figure(width_in if width_in is not None else FIGSIZE_IN[0], height, note)
    axes = fig.subplots(nrows, ncols, squeeze=False, **kwargs)
    return fig, axes


def _finish(fig: Figure, title: str, note: str | None) -> Figure:
    fig.suptitle(title, fontsize=13, fontweight="bold")
    if note:
        fig.text(0.5, 0.012, textwrap.fill(note, _note_chars(fig.get_figwidth())), ha="center", va="bottom",
                 fontsize=8.5, color=_NOTE_COLOR,
                 bbox={"boxstyle": "round,pad=0.3", "facecolor": "#fff4f4", "edgecolor": _NOTE_COLOR})
    return fig


def _wrap(text: object, width: int) -> str:
    """``text`` broken into lines of at most ``width`` characters, at spaces and after underscores
    ("rca_resolution" -> "rca_" / "resolution"); existing line breaks are kept."""
    lines: list[str] = []
    for line in str(text).split("\n"):
        current = ""
        for piece in re.findall(r"[^ _]+[ _]*|[ _]+", line):
            if current and len((current + piece).rstrip()) > width:
                lines.append(current.rstrip())
                current = piece
            else:
                current += piece
        lines.append(current.rstrip())
    return "\n".join(lines)


_UNIT_PREFIXES = (("", 1.0), ("m", 1e3), ("µ", 1e6), ("n", 1e9))


def _unit_scale(values: Iterable[float], unit: str) -> tuple[float, str]:
    """The factor and unit that put the largest of ``values`` (in ``unit``) between 1 and 1000, so axes
    read "0.38 mWh" and not "0.000380" under a "1e-3" offset that collides with the axis label."""
    finite = np.abs(np.asarray([v for v in values if v is not None], dtype=float))
    finite = finite[np.isfinite(finite) & (finite > 0)]
    if not finite.size:
        return 1.0, unit
    top = finite.max()
    for prefix, factor in _UNIT_PREFIXES:
        if top * factor >= 1:
            return factor, prefix + unit
    prefix, factor = _UNIT_PREFIXES[-1]
    return factor, prefix + unit


config_label = config_words  # a config id as words (layout.config_words: the one wording)


def _legend_in(ax: Axes, handles: Sequence[object], labels: Sequence[str], *, title: str | None = None,
               ncol: int = 1, loc: str = "upper center") -> None:
    """A legend drawn in an axes of its own (axis off), e.g. a gridspec row under the panels: it takes
    its own room in the layout and never covers a panel."""
    ax.set_axis_off()
    if handles:
        ax.legend(handles, labels, title=title, loc=loc, ncol=ncol, fontsize=8, title_fontsize=8,
                  frameon=False, borderaxespad=0.0)


def _legend_rows_in(n_entries: int, ncol: int, title: bool = True) -> float:
    """Height (inches) a legend of ``n_entries`` in ``ncol`` columns needs at 8 pt."""
    return 0.1 + 0.19 * (int(np.ceil(n_entries / max(ncol, 1))) + (1 if title else 0))


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
        heights = (values.reindex(index=groups)[name].to_numpy(dtype=float) if name in values
                   else np.full(len(groups), np.nan))
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
    std_kwh = (out["energy_kwh_std"].astype(float) if "energy_kwh_std" in out
               else pd.Series(np.nan, index=out.index))
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
    """Write ``<name>.png`` (150 dpi, trimmed to its content) and ``<name>.pdf`` into ``figures_dir``;
    return both paths. A later :func:`as_image` of the figure shows the PNG scaled down instead of
    drawing the figure a third time."""
    figures_dir = Path(figures_dir)
    figures_dir.mkdir(parents=True, exist_ok=True)
    png = figures_dir / f"{name}.png"
    pdf = figures_dir / f"{name}.pdf"
    fig.savefig(png, dpi=SAVED_DPI, bbox_inches="tight")
    fig.savefig(pdf)
    fig._llm_energy_saved_png = png  # type: ignore[attr-defined]  (read by as_image)
    return [png, pdf]


SAVED_DPI = 150


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
        words = {"synthetic": "SYNTHETIC data", "teleqna": "TeleQnA"}.get(source,
                                                                          Path(source).name if source else "")
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
        fig, axes = _new_figure(1, len(tasks), width_in=max(FIGSIZE_IN[0], 3.6 * len(tasks)))
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
                xlabel += "\n" + _wrap(f"(tokenizer: {names})", 40)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("Items")
            # Below the panel: histograms fill the plot area, so any inside spot would hide bars.
            # Its top a fixed distance (inches) under the axes: clear of the tick labels and x label.
            below = ScaledTranslation(0, -(0.3 + 0.18 * (xlabel.count("\n") + 1)), fig.dpi_scale_trans)
            ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, 0),
                      bbox_transform=ax.transAxes + below, frameon=False)
    return _finish(fig, FIG1_TITLE, None)


def fig3_finetune_energy_loss(training: pd.DataFrame, energy_method: str, *,
                              cumulative: bool = True,
                              not_trained: Sequence[Mapping[str, str]] = ()) -> Figure:
    """Training loss against fine-tuning energy, one line per run (coloured by precision).

    ``energy_method`` comes from energy.csv (training.csv does not record it). With
    ``cumulative`` the x position of epoch k is the energy of epochs 1..k, so each line reads
    as "loss reached for energy spent"; spreads then add in quadrature, treating epochs as
    independent windows. ``not_trained``: the study's fine-tuning configs that did not train
    ({"model", "precision", "reason"} each, e.g. skipped as too slow here, or failed): listed in
    the legend with their reason, so a missing width says why.
    """
    if _carries_nothing(training) and not not_trained:
        return _no_data_figure(FIG3_TITLE)
    if _carries_nothing(training):
        training = pd.DataFrame(columns=["config_id", "model", "precision", "adapter", "epoch", "train_loss",
                                         "energy_kwh"])
    _require(training, ["config_id", "model", "precision", "adapter", "epoch", "train_loss", "energy_kwh"],
             "training", "fig3_finetune_energy_loss")
    df = training.dropna(subset=["energy_kwh", "train_loss"])
    if "phase" in df.columns:  # recovery adapters trained on pruned models belong to Figure 6
        df = df[df["phase"].fillna("finetune") == "finetune"]
    trained = {(str(m), str(p)) for m, p in zip(df["model"], df["precision"])}
    missing = [row for row in not_trained if (str(row["model"]), str(row["precision"])) not in trained]
    if df.empty and not missing:
        return _no_data_figure(FIG3_TITLE)
    precisions = precision_order(list(df["precision"]) + [row["precision"] for row in missing])
    colors = _precision_colors(precisions)
    models = sorted(set(df["model"].astype(str)) | {str(row["model"]) for row in missing})
    adapters = sorted(df["adapter"].astype(str).unique())
    linestyles = ["-", "--", "-.", ":"]
    note = energy_note([energy_method])
    with _style():
        fig, axes = _new_figure(note=note is not None)
        ax = axes[0, 0]
        runs = sorted(df.groupby("config_id"),
                      key=lambda kv: (str(kv[1]["model"].iloc[0]),
                                      precisions.index(str(kv[1]["precision"].iloc[0]))))
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
        for row in sorted(missing, key=lambda r: (str(r["model"]), precisions.index(str(r["precision"])))):
            label = (str(row["precision"]) if len(models) == 1
                     else f"{_short_model(row['model'])} {row['precision']}")
            # an empty handle in the precision's colour: the width the figure would have drawn, and why not
            ax.plot([], [], color=colors[str(row["precision"])], linestyle=":", alpha=0.5,
                    label=_wrap(f"{label}: not trained — {row['reason']}", 48))
        ax.set_xlabel("Cumulative fine-tuning energy (kWh)" if cumulative
                      else "Fine-tuning energy per epoch (kWh)")
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
    # One column of panels per model (facets, not a crowded "task / model" axis); rows: energy, carbon.
    df["model_name"] = df["model"].map(_short_model)
    models = sorted(df["model_name"].unique())
    tasks = sorted(df["task"].astype(str).unique())
    # Repeated (model, task, precision) rows are averaged; spreads likewise, as a typical window spread.
    agg = df.groupby(["model_name", "task", "precision"])[["wh_per_item", "wh_per_item_std", "g_per_item",
                                                           "g_per_item_std"]].mean()
    note = energy_note(component_methods(df))
    e_scale, e_unit = _unit_scale(agg["wh_per_item"], "Wh")
    g_scale, g_unit = _unit_scale(agg["g_per_item"], "g")
    panels = [("wh_per_item", e_scale, f"Energy per item\n({e_unit}/item, ± s.e.)", "(a) Energy"),
              ("g_per_item", g_scale, f"Emissions per item\n({g_unit}CO2e/item, ± s.e.)", "(b) Carbon")]
    group_in = max(1.1, 0.16 * len(precisions) + 0.3)  # one task's cluster of bars
    panel_in = max(2.6, 0.3 + group_in * len(tasks))
    ncols = len(models)
    with _style():
        fig = _sized_figure(1.2 + ncols * panel_in + 1.2, 0.7 + 2 * 2.7, note)
        axes = fig.subplots(2, ncols, squeeze=False, sharey="row")
        for row, (column, scale, ylabel, title) in enumerate(panels):
            for col, model in enumerate(models):
                ax = axes[row, col]
                sub = agg.loc[model] * scale
                values = sub[column].unstack("precision")
                errors = sub[f"{column}_std"].unstack("precision")
                _grouped_bars(ax, tasks, precisions, values, errors, colors)
                ax.set_xticks(range(len(tasks)), [_wrap(t, max(6, int(group_in * 11))) for t in tasks],
                              fontsize=9)
                if col == 0:
                    ax.set_ylabel(ylabel)
                ax.set_title(_wrap(f"{title} — {model}", int(panel_in * 10)), fontsize=10)
        for ax in axes[-1]:
            ax.set_xlabel("task")
        handles, labels = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels, title="precision", loc="outside right center", fontsize=8,
                   title_fontsize=8, frameon=False)
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
    panel_in = max(2.8, 0.6 + 0.4 * len(precisions))  # every precision name readable side by side
    legend_in = 0.4 + 0.075 * max(len(_short_model(m)) for m in models)
    names = task_labels(df)
    with _style():
        fig = _sized_figure(0.6 + ncols * panel_in + legend_in, 0.7 + 3.3 * nrows)
        axes = fig.subplots(nrows, ncols, squeeze=False)
        for ax in axes.flat[len(panels):]:
            ax.set_visible(False)
        for ax, (task, metric) in zip(axes.flat, panels):
            sub = df[(df["task"] == task) & (df["metric"] == metric)]
            for i, model in enumerate(models):
                rows = (sub[sub["model"].astype(str) == model]
                        .groupby("precision")[["value", "ci_low", "ci_high"]].mean())
                rows = rows.reindex([p for p in precisions if p in rows.index])
                # Dodge models sideways so their CI bars do not sit on top of each other.
                x = np.array([x_of[p] for p in rows.index], dtype=float) + (i - (len(models) - 1) / 2) * 0.08
                y = rows["value"].to_numpy(dtype=float)
                line = ax.plot(x, y, marker="o", label=_short_model(model), zorder=2)[0]
                yerr = np.vstack(
                    [y - rows["ci_low"].to_numpy(dtype=float), rows["ci_high"].to_numpy(dtype=float) - y])
                _errorbars(ax, x, y, yerr=yerr, color=line.get_color())
            # Names only: with bits added, six ticks per panel run into each other; the bits are in the label.
            ax.set_xticks(range(len(precisions)), precisions, fontsize=9)
            ax.set_xlim(-0.5, len(precisions) - 0.5)
            # Two lines (the task and its data; the metric), each wrapped to the panel: titles of
            # neighbouring panels never run into each other.
            chars = int(panel_in * 11)
            ax.set_title(_wrap(names.get(str(task), str(task)), chars) + "\n" + _wrap(str(metric), chars),
                         fontsize=10)
            ax.set_ylabel(str(metric))
        bits = " > ".join(dict.fromkeys(f"{PRECISION_BITS[p]}" for p in precisions if p in PRECISION_BITS))
        for col in range(ncols):
            # The lowest visible panel of each column carries the x label.
            shown = [axes[r, col] for r in range(nrows) if axes[r, col].get_visible()]
            if shown:
                shown[-1].set_xlabel(_wrap(f"precision (bits: {bits})" if bits else "precision", chars))
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, title="model", loc="outside right center", fontsize=8, title_fontsize=8,
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
    meta["setting"] = ["unpruned" if not r.pruned
                       else pruning_label(r.pruning, r.sparsity_pattern, r.target_sparsity)
                       for r in meta.itertuples()]
    meta["target"] = (meta["model"].map(_short_model) + " · " + meta["precision"].astype(str)
                      + meta["target_adapter"].map(lambda a: "" if a == "none" else f" · {a}"))
    meta = meta.sort_values(["model", "precision", "target_adapter", "pruned", "setting", "recovered"])
    targets = list(dict.fromkeys(meta["target"]))
    # One row of panels per target; in it one line per setting (unpruned, then each pruning), where a
    # recovered config sits beside its pruned twin (open diamond) instead of taking a line of its own.
    settings = {t: list(dict.fromkeys(meta.loc[meta["target"] == t, "setting"])) for t in targets}
    keys = ["config_id", "target", "setting", "recovered"]

    sc = scores.drop(columns=[c for c in meta.columns if c != "config_id" and c in scores.columns])
    sc = sc.merge(meta[keys], on="config_id").dropna(subset=["value"])
    names = task_labels(sc)
    sc["series"] = sc["task"].astype(str).map(lambda t: names.get(t, t)) + ": " + sc["metric"].astype(str)

    # Pruned configs are evaluated in the pruning phase, their unpruned twins in the inference phase.
    en = energy[energy["phase"].isin(["inference", "pruning"])]
    en = _per_item(en.merge(meta[keys], on="config_id"))
    if sc.empty and en.empty:
        return _no_data_figure(FIG6_TITLE)
    note = energy_note(component_methods(en)) if not en.empty else None
    e_scale, e_unit = _unit_scale(en["wh_per_item"], "Wh")
    en["x"] = en["wh_per_item"] * e_scale
    en["x_err"] = (en["wh_per_item_std"] * e_scale).fillna(0.0)
    sc["x"] = sc["value"]
    sc["x_low"] = (sc["value"] - sc["ci_low"]).clip(lower=0).fillna(0.0)
    sc["x_high"] = (sc["ci_high"] - sc["value"]).clip(lower=0).fillna(0.0)
    series = sorted(sc["series"].unique())
    tasks = sorted(en["task"].astype(str).unique())
    any_recovered = bool(meta["recovered"].any())

    import seaborn as sns
    from matplotlib.lines import Line2D

    series_colors = dict(zip(series, sns.color_palette("colorblind", max(len(series), 1))))
    task_colors = dict(zip(tasks, sns.color_palette("dark", max(len(tasks), 1))))
    label_in = 0.35 + 0.07 * max(len(s) for t in targets for s in settings[t])
    panel_in = 4.0
    lines_in = max(0.28, 0.045 * max(len(series), len(tasks)))
    row_in = [0.7 + lines_in * len(settings[t]) for t in targets]
    series_chars = max([len(s) for s in series] or [10])
    ncol_s = max(1, int(panel_in // (0.5 + 0.065 * series_chars)))
    kinds = [Line2D([], [], marker="o", color="0.3", linestyle="none", label="unpruned / pruned")]
    if any_recovered:
        kinds.append(Line2D([], [], marker="D", color="0.3", markerfacecolor="white", linestyle="none",
                            label="pruned + recovery LoRA"))
    legend_in = max(_legend_rows_in(len(series), ncol_s), _legend_rows_in(len(tasks) + len(kinds), 1))
    room = _MAX_SIZE_IN[1] - 1.1 - legend_in - _note_height_in(note, 12.0)
    if sum(row_in) > room:  # many targets: the rows get tighter rather than the figure taller than the cap
        row_in = [h * room / sum(row_in) for h in row_in]
    height = 0.6 + sum(row_in) + 0.5 + legend_in
    with _style():
        fig = _sized_figure(label_in + 2 * panel_in + 0.9, height, note)
        grid = fig.add_gridspec(len(targets) + 1, 2, height_ratios=[*row_in, legend_in])
        first_e = None
        for r, target in enumerate(targets):
            ax_s = fig.add_subplot(grid[r, 0])
            # One energy scale for every target, so rows compare at a glance.
            ax_e = fig.add_subplot(grid[r, 1], sharey=ax_s, sharex=first_e)
            first_e = first_e or ax_e
            y_of = {s: i for i, s in enumerate(settings[target])}
            panels = ((ax_s, sc, series, "series", series_colors), (ax_e, en, tasks, "task", task_colors))
            for ax, table, names_, column, colors in panels:
                rows = table[table["target"] == target]
                band = 0.8 / max(len(names_), 1)
                for j, name in enumerate(names_):
                    part = rows[rows[column].astype(str) == name]
                    for recovered, shift in ((False, -0.2), (True, 0.2)):
                        sel = part[part["recovered"] == recovered]
                        if column == "task":  # repeated rows of one config and task: averaged
                            sel = sel.groupby("setting", as_index=False)[["x", "x_err"]].mean()
                        else:
                            sel = sel.groupby("setting", as_index=False)[["x", "x_low", "x_high"]].mean()
                        if sel.empty:
                            continue
                        y = (sel["setting"].map(y_of).to_numpy(dtype=float) - 0.4 + band * (j + 0.5)
                             + (shift * band if any_recovered else 0.0))
                        xerr = (sel["x_err"].to_numpy() if column == "task"
                                else np.vstack([sel["x_low"].to_numpy(), sel["x_high"].to_numpy()]))
                        ax.errorbar(sel["x"].to_numpy(dtype=float), y, xerr=xerr,
                                    fmt="D" if recovered else "o", color=colors[name],
                                    markerfacecolor="white" if recovered else colors[name], markersize=4.5,
                                    elinewidth=1, capsize=2, zorder=3)
            ax_s.set_yticks(range(len(settings[target])), settings[target], fontsize=9)
            ax_s.set_ylim(len(settings[target]) - 0.5, -0.5)
            ax_e.tick_params(axis="y", labelleft=False)
            if sc["x"].between(0, 1).all():
                ax_s.set_xlim(-0.03, 1.03)
            positive = en.loc[en["x"] > 0, "x"]
            if len(positive) and positive.max() / positive.min() > 30:
                ax_e.set_xscale("log")
                # Plain numbers at 1-2-5 steps; no minor labels (they run into each other).
                ax_e.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                ax_e.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                ax_e.xaxis.set_minor_formatter(NullFormatter())
            chars = int(panel_in * 13)
            ax_s.set_title(_wrap(f"(a) task performance — {target}", chars), fontsize=10)
            ax_e.set_title(_wrap(f"(b) inference energy — {target}", chars), fontsize=10)
            if r == len(targets) - 1:
                ax_s.set_xlabel("metric value (95% interval)")
                ax_e.set_xlabel(f"energy per item ({e_unit}/item, ± s.e.)")
        dot = {"marker": "o", "linestyle": "none"}
        _legend_in(fig.add_subplot(grid[-1, 0]),
                   [Line2D([], [], color=series_colors[s], **dot) for s in series], series,
                   title="(a) task: metric", ncol=ncol_s)
        _legend_in(fig.add_subplot(grid[-1, 1]),
                   [Line2D([], [], color=task_colors[t], **dot) for t in tasks] + kinds,
                   tasks + [k.get_label() for k in kinds], title="(b) task; marker")
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
    one_model = "model" not in at_w.columns or at_w["model"].nunique() <= 1
    label_of = {c: config_label(c, drop_model=one_model) for c in map(str, df["config_id"].unique())}
    tied = np.zeros(len(at_w), dtype=bool)
    has_p_best = "p_best" in at_w.columns and at_w["p_best"].notna().any()
    if has_p_best:
        tied = (_as_bool(at_w["tied_with_top"]).to_numpy() if "tied_with_top" in at_w.columns
                else at_w["p_best"].fillna(0).to_numpy() >= TIED_WITH_TOP_SHARE)
    # Which configs get a colour, a legend entry and a label: all of them when few; else the top set
    # at w, then the Pareto front, then the best R, up to _MOST_NAMED.
    by_r = list(at_w.sort_values("R", ascending=False)["config_id"].astype(str))
    if len(by_r) <= _MOST_NAMED:
        named = by_r
    else:
        first = [c for c, t in zip(config_ids, tied) if t] + [c for c in by_r if c in optimal_ids]
        named = list(dict.fromkeys(first + by_r))[:max(_MOST_NAMED, len(set(first)))]
    others = df["config_id"].astype(str).nunique() - len(named)
    e_scale, e_unit = _unit_scale(x, "Wh")
    x = x * e_scale
    label_chars = max(len(label_of[c]) for c in named) + 2
    panel_in = 4.6
    ncol = max(1, min(3, int(2 * panel_in // (0.6 + 0.068 * label_chars))))
    legend_in = max(_legend_rows_in(len(named) + (1 if others else 0), ncol), _legend_rows_in(3, 1))
    with _style():
        fig = _sized_figure(2 * panel_in + 1.4, 0.7 + 3.8 + legend_in + 0.2, note)
        grid = fig.add_gridspec(2, 2, height_ratios=[3.8, legend_in])
        ax_r, ax_p = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
        import seaborn as sns

        palette = sns.color_palette("tab10" if len(named) <= 10 else "tab20", len(named))
        color_of = dict(zip(named, palette))
        for config_id, rows in df.groupby(df["config_id"].astype(str)):
            if config_id not in color_of:
                ax_r.plot(rows.sort_values("w")["w"].astype(float), rows.sort_values("w")["R"].astype(float),
                          color="0.8", linewidth=0.8, zorder=1)
        for i, config_id in enumerate(named):
            rows = df[df["config_id"].astype(str) == config_id].sort_values("w")
            highlight = config_id in optimal_ids
            ax_r.plot(rows["w"].astype(float), rows["R"].astype(float), marker=".", color=color_of[config_id],
                      linestyle=["-", "--"][i // 10 % 2], linewidth=2.2 if highlight else 1.2, zorder=2,
                      label=label_of[config_id] + (" *" if highlight else ""))
        ax_r.axvline(w_used, color="0.4", linestyle=":", linewidth=1)
        ax_r.set_xlabel("weight w")
        ax_r.set_ylabel("ranking score R")
        ax_r.set_title("(a) R against w (* = Pareto-optimal)", fontsize=10)

        xerr = (at_w["energy_kwh_per_item_std"].astype(float).to_numpy() * 1000 * e_scale
                if "energy_kwh_per_item_std" in at_w.columns else None)
        yerr = None
        if {"rho_ci_low", "rho_ci_high"} <= set(at_w.columns):
            yerr = np.vstack([y - at_w["rho_ci_low"].astype(float).to_numpy(),
                              at_w["rho_ci_high"].astype(float).to_numpy() - y])
        if xerr is not None or yerr is not None:
            _errorbars(ax_p, x, y, xerr=xerr, yerr=yerr, color="0.7")
        ax_p.scatter(x[~front], y[~front], color="0.55", s=30, zorder=3, label="dominated")
        ax_p.scatter(x[front], y[front], color=_PARETO_COLOR, s=55, zorder=4, label="Pareto-optimal")
        order = np.argsort(x[front])
        ax_p.step(x[front][order], y[front][order], where="post", color=_PARETO_COLOR, linewidth=1.5,
                  zorder=3)
        if has_p_best:
            # Uncertainty of the top: the configs the resampling cannot separate, ringed, with how often
            # each comes out best.
            ax_p.scatter(x[tied], y[tied], s=190, facecolors="none", edgecolors="black", linewidths=1.2,
                         zorder=5, label="cannot be separated from the top")
        ax_p.set_xlabel(f"Energy per item ({e_unit}/item, ± s.e.)")
        ax_p.xaxis.set_major_locator(MaxNLocator(nbins=5))
        ax_p.set_ylabel("ρ (quality)")
        ax_p.set_title(f"(b) Pareto front at w = {w_used:.2f}", fontsize=10)
        ax_p.margins(x=0.08, y=0.12)

        handles, labels = ax_r.get_legend_handles_labels()
        if others:
            from matplotlib.lines import Line2D

            handles.append(Line2D([], [], color="0.8", linewidth=0.8))
            labels.append(f"{others} other configs")
        legend_grid = grid[1, :].subgridspec(1, 2, width_ratios=[2, 1])
        _legend_in(fig.add_subplot(legend_grid[0, 0]), handles, labels, title="(a) config", ncol=ncol)
        point_handles, point_labels = ax_p.get_legend_handles_labels()
        _legend_in(fig.add_subplot(legend_grid[0, 1]), point_handles, point_labels, title="(b) points")

        # Labels: the Pareto front and the top set (with how often each comes out best), placed where
        # they collide with nothing; one that finds no free spot is left out (the legend names it).
        p_best = at_w["p_best"].to_numpy() if has_p_best else np.full(len(at_w), np.nan)
        wanted = []
        for i, config_id in enumerate(config_ids):
            if front[i] or tied[i]:
                text = label_of[config_id]
                if tied[i] and pd.notna(p_best[i]):
                    text += f" (best in {p_best[i]:.0%})"
                wanted.append((0 if tied[i] else 1, -y[i], text, x[i], y[i],
                               _PARETO_COLOR if front[i] else "black"))
        _place_labels(fig, ax_p, [(t, xi, yi, c) for *_, t, xi, yi, c in sorted(wanted)],
                      np.column_stack([x, y]))
    return _finish(fig, FIG7_TITLE, note)


_MOST_NAMED = 10


def _place_labels(fig: Figure, ax: Axes, labels: Sequence[tuple[str, float, float, object]],
                  points: np.ndarray) -> list[str]:
    """Annotate each (text, x, y, color) next to its point at the first of a ring of offsets where the
    text stays inside the axes and overlaps no placed label and no other point; further rings get a
    leader line. Returns the texts that found no place (not drawn)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if not labels:
        return []
    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    fig.canvas.draw()  # fixes the layout: the labels are kept out of it (in_layout False)
    renderer = fig.canvas.get_renderer()
    shown = ax.transData.transform(points[np.isfinite(points).all(axis=1)])
    placed: list[Any] = []
    dropped: list[str] = []
    directions = [(1, 0.3), (1, -1), (-1, 0.3), (-1, -1), (0, 1), (0, -1.6), (1, 1), (-1, 1)]
    for text, xi, yi, color in labels:
        anchor = ax.transData.transform((xi, yi))
        ann = ax.annotate(text, (xi, yi), textcoords="offset points", xytext=(0, 0), fontsize=7.5,
                          color=color, zorder=6, annotation_clip=False)
        ann.set_in_layout(False)
        done = False
        # First where it hides no other point; failing that, anywhere it hides no other label.
        tries = [(strict, r, d) for strict in (True, False) for r in (1, 2, 3.5) for d in directions]
        for strict, ring, (dx, dy) in tries:
            ann.set_position((dx * 7 * ring, dy * 7 * ring))
            ann.set_horizontalalignment("left" if dx > 0 else "right" if dx < 0 else "center")
            ann.set_verticalalignment("center" if dy == 0.3 and dx else "bottom" if dy > 0 else "top")
            box = ann.get_window_extent(renderer)
            if not (ax.bbox.x0 < box.x0 and box.x1 < ax.bbox.x1 and ax.bbox.y0 < box.y0
                    and box.y1 < ax.bbox.y1):
                continue
            grown = box.expanded(1.0, 1.0).padded(2)
            if any(grown.overlaps(other) for other in placed):
                continue
            near = shown[(np.abs(shown - anchor) > 0.5).any(axis=1)]  # every point but its own
            if strict and len(near) and ((near[:, 0] > grown.x0 - 4) & (near[:, 0] < grown.x1 + 4)
                              & (near[:, 1] > grown.y0 - 4) & (near[:, 1] < grown.y1 + 4)).any():
                continue
            if ring > 1:  # far from its point: the same label again, with a leader line
                final = ax.annotate(text, (xi, yi), textcoords="offset points", xytext=ann.get_position(),
                                    fontsize=7.5, color=color, zorder=6, annotation_clip=False,
                                    ha=ann.get_horizontalalignment(), va=ann.get_verticalalignment(),
                                    arrowprops={"arrowstyle": "-", "color": color, "linewidth": 0.6,
                                                "shrinkA": 0, "shrinkB": 4})
                final.set_in_layout(False)
                ann.remove()
            placed.append(grown)
            done = True
            break
        if not done:
            ann.remove()
            dropped.append(text)
    return dropped


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
                            label=config_id
                            + (" (reference)" if row["break_even_queries"] == "reference" else ""))
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
        for bar, estimated in zip(bars,
                                  energy["estimated_components"].fillna("")
                                  if "estimated_components" in energy
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
        # every epoch labelled up to 6; beyond, the first, the last and every k-th, so labels never crowd
        step = 1 if len(numbers) <= 6 else math.ceil(len(numbers) / 5)
        for index, (epoch, x, y) in enumerate(zip(numbers, spent, reached)):
            if index % step == 0 or index == len(numbers) - 1:
                right.annotate(f"epoch {epoch}", (x, y), textcoords="offset points", xytext=(4, 4),
                               fontsize=8)
        right.set_xlabel("energy spent so far (kJ)")
        right.set_ylabel("loss reached")
        for axis in (left, right):
            axis.ticklabel_format(axis="y", useOffset=False)
    return _finish(fig, title, note)


def layers_figure(layers: Sequence[Any], target_sparsity: float, title: str) -> Figure:
    """Measured sparsity of every pruned layer against the target, in module order (notebook 04);
    ``layers`` carry name and measured_sparsity."""
    names = [layer.name.removeprefix("model.").replace("layers.", "L").replace("self_attn.",
                                                                               "").replace("mlp.", "")
             for layer in layers]
    with _style():
        fig, axes = _new_figure(1, 1, height_in=3.6)
        axis = axes[0, 0]
        axis.bar(range(len(names)), [layer.measured_sparsity for layer in layers], color="#8172b3")
        axis.axhline(target_sparsity, color="black", linestyle="--", linewidth=1,
                     label=f"target {target_sparsity:.2f}")
        axis.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
        axis.set_ylim(0, 1)
        axis.set_ylabel("measured sparsity")
        _legend_outside(axis)
    return _finish(fig, title, None)


def as_image(fig: Figure, dpi: int = 110) -> "object":
    """The figure as an inline PNG for notebooks and the HTML report (no pyplot state needed): the PNG
    :func:`save_figure` wrote, scaled to ``dpi``, when it was saved (show a figure right after saving
    it: a change made after the save is not seen), else drawn now."""
    import io

    from IPython.display import Image

    buffer = io.BytesIO()
    saved = getattr(fig, "_llm_energy_saved_png", None)
    if saved is not None and Path(saved).is_file() and dpi < SAVED_DPI:
        from PIL import Image as Picture

        with Picture.open(saved) as picture:
            size = (round(picture.width * dpi / SAVED_DPI), round(picture.height * dpi / SAVED_DPI))
            scaled = picture.convert("RGB").resize(size, Picture.Resampling.LANCZOS)
            # a 256-colour palette: these figures' few flat colours survive it, and the report stays small
            scaled.quantize(256, method=Picture.Quantize.FASTOCTREE).save(buffer, format="png")
    else:
        fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return Image(data=buffer.getvalue(), format="png")
