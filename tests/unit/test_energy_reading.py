"""A window's reading per component, as the inference notebook shows it: energy, mean power, the
method, whether it is an estimate, whether the total counts it."""

import pytest

from llm_energy.measure.meter import SCOPE_GPU_ONLY, EnergyRecord


def record(**changes) -> EnergyRecord:
    values = {"name": "look", "duration_s": 2.0, "cpu_energy_kwh": 30 / 3.6e6, "gpu_energy_kwh": 100 / 3.6e6,
              "ram_energy_kwh": 6 / 3.6e6, "emissions_kg": 0.0, "cpu_method": "codecarbon:cpu_load",
              "gpu_method": "nvml_counter", "ram_method": "codecarbon:ram_power_model"}
    return EnergyRecord(**{**values, **changes})


def test_components_carry_energy_power_method_and_estimate_flag():
    rows = {row["component"]: row for row in record().components()}
    assert rows["cpu"]["energy_j"] == pytest.approx(30) and rows["cpu"]["power_w"] == pytest.approx(15)
    assert rows["gpu"]["energy_j"] == pytest.approx(100) and rows["gpu"]["power_w"] == pytest.approx(50)
    assert rows["ram"]["energy_kwh"] == pytest.approx(6 / 3.6e6)
    assert [rows[c]["estimated"] for c in ("cpu", "gpu", "ram")] == [True, False, True]
    assert all(row["in_total"] for row in rows.values())
    assert sum(row["energy_kwh"] for row in rows.values()) == pytest.approx(record().energy_kwh)


def test_a_shared_node_counts_only_the_gpu_and_a_missing_component_is_no_estimate():
    rows = {row["component"]: row for row in record(scope=SCOPE_GPU_ONLY).components()}
    assert [rows[c]["in_total"] for c in ("cpu", "gpu", "ram")] == [False, True, False]
    cpu_only = {row["component"]: row for row in record(gpu_energy_kwh=0.0, gpu_method="none").components()}
    assert cpu_only["gpu"]["estimated"] is False and cpu_only["gpu"]["energy_j"] == 0.0
    assert record(duration_s=0.0).components()[0]["power_w"] == 0.0
