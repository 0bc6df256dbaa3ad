"""Tests that look at the figures (issue 28): every paper figure, built from the smoke study's tables and
from constructed studies of 2, 12 and ~100 configs (params/paper.yaml's factorial), is drawn and its
rendered extents checked with llm_energy.report.layout_check: every panel at least 120x90 px, no two
texts (tick labels, point labels, titles, legends, notes) on top of each other, no legend over a data
point, nothing outside the canvas; and no Python warning while building or drawing it."""

from __future__ import annotations

import warnings

import pytest
from figure_tables import TABLE_SETS, figure_calls, paper_study_tables
from matplotlib.figure import Figure

from llm_energy.report import figures as plots
from llm_energy.report.layout_check import layout_problems

FIGURES = ("fig1_token_lengths", "fig3_finetune_energy_loss", "fig4_inference_energy_carbon",
           "fig5_quantization_impact", "fig6_pruning", "fig7_ranking", "fig8_lifecycle")
_CACHE: dict[str, dict] = {}


def _tables(name: str) -> dict:
    if name not in _CACHE:
        _CACHE[name] = TABLE_SETS[name]()
    return _CACHE[name]


@pytest.mark.parametrize("table_set", list(TABLE_SETS))
@pytest.mark.parametrize("figure", FIGURES)
def test_figure_is_legible(table_set, figure):
    call = figure_calls(_tables(table_set))[figure]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "constrained_layout not applied because axes sizes collapsed"
        fig = call()
        problems = layout_problems(fig, f"{figure} [{table_set}]")
    assert isinstance(fig, Figure)
    assert not problems, "\n".join(problems)
    if table_set in ("smoke", "paper100") and figure not in ("fig1_token_lengths",
                                                             "fig3_finetune_energy_loss"):
        assert plots.NO_DATA_TEXT not in plots.figure_texts(fig), f"{figure} [{table_set}] drew no data"


def test_the_paper_sized_set_has_about_a_hundred_configs():
    assert 90 <= paper_study_tables()["ranking"]["config_id"].nunique() <= 110


def test_figures_grow_with_their_content_within_bounds():
    small = figure_calls(_tables("smoke"))["fig6_pruning"]()
    large = figure_calls(_tables("paper100"))["fig6_pruning"]()
    assert large.get_figheight() > 2 * small.get_figheight()
    for table_set in TABLE_SETS:
        for figure, call in figure_calls(_tables(table_set)).items():
            width, height = call().get_size_inches()
            assert width <= 15 and height <= 30, f"{figure} [{table_set}] is {width:.1f}x{height:.1f} in"


def test_many_configs_name_only_the_top_set_and_the_front():
    ranking = _tables("paper100")["ranking"]
    fig = plots.fig7_ranking(ranking, w=0.5, energy_method="rapl")
    at_w = ranking[ranking["w"] == 0.5]
    named = set(at_w.loc[at_w["pareto"] | at_w["tied_with_top"], "config_id"])
    labels = [t.get_text() for t in fig.axes[1].texts]
    assert 0 < len(labels) <= len(named)
    legend_texts = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    assert any(text.endswith("other configs") for text in legend_texts)


def test_checker_reports_overlapping_tick_labels_and_a_covering_legend():
    fig = Figure(figsize=(3, 2))
    ax = fig.subplots()
    ax.plot([0, 1, 2], [0, 1, 2], "o", label="points")
    ax.set_xticks([0, 1, 2], ["a very long tick label", "another very long one", "and a third"])
    ax.legend(loc="center")
    ax.set_title("a title far too long for so narrow a figure, running off both of its sides")
    problems = "\n".join(layout_problems(fig, "demo"))
    assert "demo: axes 0" in problems and "x tick label 'a very long tick label' overlaps" in problems
    assert "legend 'points' covers 1 data point(s)" in problems
    assert "reaches outside the canvas" in problems
