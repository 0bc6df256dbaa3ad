"""The meter against deterministic fakes: a fake clock, a fake NVML counter, a fake RAPL tree."""

from dataclasses import dataclass
from pathlib import Path

import pytest

from llm_energy.config import EnergySettings
from llm_energy.energy import (
    ComponentReading, EnergyMeter, NvmlSource, RaplSource, describe_methods, is_estimate,
)


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class FakeNvml:
    """Counter in mJ that advances by power * elapsed fake time."""

    def __init__(self, clock: FakeClock, power_w: float, start_mj: int = 5_000_000):
        self.clock, self.power_w, self.start_mj, self.t0 = clock, power_w, start_mj, clock.now

    def nvmlInit(self): pass
    def nvmlShutdown(self): pass
    def nvmlDeviceGetCount(self): return 1
    def nvmlDeviceGetHandleByIndex(self, i): return i

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        return int(self.start_mj + self.power_w * (self.clock.now - self.t0) * 1000)


@dataclass
class FakeEstimate:
    """Stands in for CodeCarbon: a cpu_load estimate at a fixed power."""

    clock: FakeClock
    cpu_w: float = 10.0
    ram_w: float = 2.0
    name: str = "codecarbon"

    def begin(self, window): self.t0 = self.clock.now
    def end(self):
        dt = self.clock.now - self.t0
        return {"cpu": ComponentReading(self.cpu_w * dt, "codecarbon:cpu_load"),
                "ram": ComponentReading(self.ram_w * dt, "codecarbon:ram_power_model")}
    def close(self): pass


SETTINGS = EnergySettings(idle_seconds=10, repeats=1, max_repeats=1, carbon_intensity_g_per_kwh=100.0,
                          min_window_s=0.0)


def make_meter(clock, sources, settings=SETTINGS, device="cpu"):
    return EnergyMeter(settings, device=device, sources=sources, clock=clock, sleep=clock.sleep)


def test_window_energy_exact_from_nvml_counter():
    clock = FakeClock()
    meter = make_meter(clock, [NvmlSource(nvml=FakeNvml(clock, power_w=250.0))])
    with meter.window("w") as handle:
        clock.sleep(36.0)
    record = handle.record
    assert record.duration_s == 36.0
    assert record.gpu_energy_kwh == pytest.approx(250 * 36 / 3.6e6)
    assert record.gpu_method == "nvml_counter"
    assert record.energy_method == "nvml_counter"
    assert record.emissions_kg == pytest.approx(record.energy_kwh * 100 / 1000)


def test_idle_baseline_gives_net_energy():
    clock = FakeClock()
    nvml = FakeNvml(clock, power_w=100.0)
    meter = make_meter(clock, [NvmlSource(nvml=nvml)])
    baseline = meter.measure_idle_baseline()
    assert baseline.power_w == pytest.approx(100.0)
    nvml.power_w = 300.0  # the counter now advances faster: a load
    nvml.start_mj = nvml.nvmlDeviceGetTotalEnergyConsumption(0)
    nvml.t0 = clock.now
    with meter.window("load") as handle:
        clock.sleep(10.0)
    assert handle.record.energy_kwh == pytest.approx(3000 / 3.6e6)
    assert handle.record.energy_net_kwh == pytest.approx(2000 / 3.6e6)


def test_hardware_counter_replaces_estimate_of_same_component():
    clock = FakeClock()
    meter = make_meter(clock, [FakeEstimate(clock), NvmlSource(nvml=FakeNvml(clock, power_w=50.0))], device="cpu")
    with meter.window("w") as handle:
        clock.sleep(2.0)
    r = handle.record
    assert r.cpu_method == "codecarbon:cpu_load" and r.gpu_method == "nvml_counter"
    assert r.cpu_energy_kwh * 3.6e6 == pytest.approx(20.0)
    assert r.ram_energy_kwh * 3.6e6 == pytest.approx(4.0)
    assert r.gpu_energy_kwh * 3.6e6 == pytest.approx(100.0)


def make_rapl_tree(root: Path, package_uj: int, dram_uj: int, max_range: int = 1_000_000) -> None:
    for zone, name, value in (("intel-rapl:0", "package-0", package_uj), ("intel-rapl:0:0", "dram", dram_uj)):
        folder = root / zone
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "name").write_text(name + "\n")
        (folder / "energy_uj").write_text(f"{value}\n")
        (folder / "max_energy_range_uj").write_text(f"{max_range}\n")


def test_rapl_reads_package_and_dram_with_wraparound(tmp_path):
    make_rapl_tree(tmp_path, package_uj=900_000, dram_uj=10)
    # intel-rapl:0:0 sits beside intel-rapl:0 in sysfs's class view; both are found by the glob.
    source = RaplSource(tmp_path)
    source.begin("w")
    make_rapl_tree(tmp_path, package_uj=100_000, dram_uj=500_010)  # the package counter wrapped
    readings = source.end()
    assert readings["cpu"].energy_j == pytest.approx((1_000_000 - 900_000 + 100_000) / 1e6)
    assert readings["ram"].energy_j == pytest.approx(0.5)
    assert readings["cpu"].method == "rapl"


def test_unreadable_rapl_tree_is_not_a_source(tmp_path):
    assert RaplSource.find_domains(tmp_path / "absent") == {}
    with pytest.raises(RuntimeError, match="no readable RAPL domains"):
        RaplSource(tmp_path)


def test_repeats_stop_at_target_spread_or_max():
    clock = FakeClock()
    settings = EnergySettings(repeats=2, max_repeats=5, target_rsd=0.05, carbon_intensity_g_per_kwh=1.0,
                              min_window_s=0.0)
    meter = make_meter(clock, [NvmlSource(nvml=FakeNvml(clock, power_w=100.0))], settings)
    durations = iter([1.0, 1.0])
    steady = meter.measure_repeated(lambda: clock.sleep(next(durations)) or "done", "steady")
    assert steady.repeats == 2 and steady.result == "done"
    assert steady.std("energy_kwh") == 0.0
    # 9, 1: spread too high; 9, 1, 1, 1, 1 still too high -> capped at max_repeats = 5.
    durations = iter([9.0, 1.0, 1.0, 1.0, 1.0])
    noisy = meter.measure_repeated(lambda: clock.sleep(next(durations)), "noisy")
    assert noisy.repeats == 5 and noisy.rsd > 0.05
    # 2, 2.05: within 5% after the minimum two repeats.
    durations = iter([2.0, 2.05])
    close = meter.measure_repeated(lambda: clock.sleep(next(durations)), "close")
    assert close.repeats == 2


def test_warmup_runs_unmeasured():
    clock = FakeClock()
    meter = make_meter(clock, [NvmlSource(nvml=FakeNvml(clock, power_w=10.0))])
    calls = []
    m = meter.measure_repeated(lambda: calls.append("measured"), "x", warmup=lambda: calls.append("warm"))
    assert calls == ["warm", "measured"] and m.repeats == 1


def test_method_words():
    assert is_estimate("codecarbon:cpu_load") and not is_estimate("nvml_counter") and not is_estimate("rapl")
    text = describe_methods({"codecarbon:cpu_load", "nvml_counter"})
    assert "ESTIMATED" in text and "codecarbon:cpu_load" in text and "nvml_counter" in text


def test_real_codecarbon_window_on_this_cpu():
    """CodeCarbon's offline tracker, for real: method recorded, energy positive for a busy second."""
    meter = EnergyMeter(EnergySettings(measure_power_secs=1.0), device="cpu")
    try:
        with meter.window("busy") as handle:
            x = 0
            for i in range(3_000_000):
                x += i
        r = handle.record
    finally:
        meter.close()
    assert r.duration_s > 0
    assert r.energy_kwh > 0
    assert r.cpu_method.startswith(("codecarbon:", "rapl"))
    assert r.ram_method != "none"
    assert r.emissions_kg > 0


def test_too_short_window_is_lengthened_by_repetition_not_zero():
    """A 20 ms call under an NVML counter that only moves every 100 ms: repeated, then divided."""
    clock = FakeClock()

    class CoarseNvml(FakeNvml):
        def nvmlDeviceGetTotalEnergyConsumption(self, handle):
            elapsed = clock.now - self.t0
            return int(self.start_mj + self.power_w * (elapsed // 0.1) * 0.1 * 1000)  # 100 ms steps

    settings = EnergySettings(repeats=1, max_repeats=1, carbon_intensity_g_per_kwh=1.0, min_window_s=1.0)
    meter = make_meter(clock, [NvmlSource(nvml=CoarseNvml(clock, power_w=200.0))], settings)
    calls = []
    _, record = meter.measure(lambda: calls.append(clock.sleep(0.02)), "short")
    assert len(calls) in (50, 51) and record.calls == len(calls)  # 50 x 0.02 s, give or take float rounding
    assert record.duration_s == pytest.approx(0.02)
    assert record.gpu_energy_kwh * 3.6e6 == pytest.approx(200.0 * 0.02, rel=0.1)  # 4 J per call, not 0
    unrepeated = make_meter(clock, [NvmlSource(nvml=CoarseNvml(clock, power_w=200.0))], SETTINGS)
    _, zero = unrepeated.measure(lambda: clock.sleep(0.02), "short")
    assert zero.gpu_energy_kwh in (0.0, pytest.approx(200.0 * 0.1 / 3.6e6))  # what a naive window reads
