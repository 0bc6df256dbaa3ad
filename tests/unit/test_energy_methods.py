"""One rule says which energy numbers are estimates; tables, figures and the report all follow it."""

import pytest

from llm_energy.measure.meter import describe_methods, estimated_components, is_estimate
from llm_energy.report import figures as plots

METHODS = [
    ("codecarbon:cpu_load", True), ("codecarbon:ram_power_model", True), ("codecarbon:tdp", True),
    ("constant", True), ("my_estimate", True), ("rapl", False), ("nvml_counter", False),
    ("codecarbon:rapl", False), ("codecarbon:pynvml", False),
]


@pytest.mark.parametrize("method,estimate", METHODS)
def test_tables_figures_and_report_agree(method, estimate):
    assert is_estimate(method) is estimate
    # tables: the energy row's estimated_components
    assert (estimated_components({"cpu": method, "gpu": "none", "ram": "rapl"}) == "cpu") is estimate
    assert (estimated_components({"cpu": "rapl", "gpu": method, "ram": "rapl"}) == "gpu") is estimate
    # figures: an estimate gets the red note, a measurement none
    note = plots.energy_note([method])
    assert (note is not None and "ESTIMATE" in note and method in note) is estimate
    # report: the sentence lists it as estimated or as measured
    sentence = describe_methods({method})
    assert ("ESTIMATED" in sentence) is estimate and method in sentence


def test_the_figures_use_the_same_rule_object():
    assert plots.is_estimate is is_estimate


def test_all_counted_leaves_estimated_components_empty():
    assert estimated_components({"cpu": "rapl", "gpu": "nvml_counter", "ram": "rapl"}) == ""
    assert estimated_components({"cpu": "codecarbon:cpu_load", "gpu": "none",
                                 "ram": "codecarbon:ram_power_model"}) == "cpu;ram"
