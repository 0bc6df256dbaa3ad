"""One energy meter over every source this machine has.

A measured window is a context manager (try/finally) that synchronises the device at both edges and
yields a handle whose ``record`` is a frozen :class:`EnergyRecord` with units in its field names.
Each component (CPU, GPU, RAM) states how it was obtained:

- ``rapl``: the CPU package/DRAM energy counters in ``/sys/class/powercap`` (a measurement);
- ``nvml_counter``: the GPU's total-energy counter read through NVML (a measurement);
- ``codecarbon:<mode>``: CodeCarbon's figure; on a machine without RAPL its CPU power is an
  *estimate* from CPU load and a TDP guess (``codecarbon:cpu_load``) and RAM power is a model.

CodeCarbon is read through its public API only (``start_task``/``stop_task`` and its log lines).
"""

from __future__ import annotations

import contextlib
import logging
import os
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol, TypeVar

if TYPE_CHECKING:  # the settings are only annotations here: the meter's sources load without pydantic
    from .config import EnergySettings

J_PER_KWH = 3.6e6
ESTIMATE_MARKERS = ("cpu_load", "constant", "tdp", "estimate", "model")
T = TypeVar("T")


def is_estimate(method: object) -> bool:
    """True when a method string names an estimate rather than a hardware counter: the one rule that
    tables, figures and the report use."""
    text = str(method).lower()
    return any(marker in text for marker in ESTIMATE_MARKERS)


@dataclass(frozen=True)
class ComponentReading:
    energy_j: float
    method: str


@dataclass(frozen=True)
class EnergyRecord:
    """Energy of one measured window. Gross values; ``net`` subtracts the idle baseline."""

    name: str
    duration_s: float
    cpu_energy_kwh: float
    gpu_energy_kwh: float
    ram_energy_kwh: float
    emissions_kg: float
    cpu_method: str
    gpu_method: str
    ram_method: str
    idle_power_w: float = 0.0  # idle baseline power of the same run (0 when none was measured)
    calls: int = 1  # workload calls inside the window; energies and duration are per call

    @property
    def energy_kwh(self) -> float:
        return self.cpu_energy_kwh + self.gpu_energy_kwh + self.ram_energy_kwh

    @property
    def energy_net_kwh(self) -> float:
        return self.energy_kwh - self.idle_power_w * self.duration_s / J_PER_KWH

    @property
    def energy_method(self) -> str:
        """The method of the dominant measured component: GPU when one was read, else CPU."""
        return self.gpu_method if self.gpu_method != "none" else self.cpu_method

    @property
    def power_w(self) -> float:
        return self.energy_kwh * J_PER_KWH / self.duration_s if self.duration_s > 0 else 0.0


@dataclass(frozen=True)
class IdleBaseline:
    power_w: float
    duration_s: float
    method: str

    def as_dict(self) -> dict[str, Any]:
        return {"idle_power_w": self.power_w, "idle_duration_s": self.duration_s, "idle_method": self.method}


@dataclass(frozen=True)
class RepeatedMeasurement:
    """Several windows of the same workload; ``result`` is what the first repeat returned."""

    records: tuple[EnergyRecord, ...]
    result: Any = field(compare=False, repr=False)

    @property
    def repeats(self) -> int:
        return len(self.records)

    def mean(self, attr: str) -> float:
        return statistics.fmean(getattr(r, attr) for r in self.records)

    def std(self, attr: str) -> float:
        values = [getattr(r, attr) for r in self.records]
        return statistics.stdev(values) if len(values) > 1 else float("nan")

    @property
    def rsd(self) -> float:
        mean = self.mean("energy_kwh")
        return self.std("energy_kwh") / mean if mean > 0 and self.repeats > 1 else float("nan")


class EnergySource(Protocol):
    """A source reports joules per component for the window between ``begin`` and ``end``."""

    name: str

    def begin(self, window: str) -> None: ...

    def end(self) -> dict[str, ComponentReading]: ...

    def close(self) -> None: ...


# --------------------------------------------------------------------------------------------------
# RAPL


class RaplSource:
    """CPU package and DRAM counters from /sys/class/powercap, with wrap-around handled."""

    name = "rapl"

    def __init__(self, root: Path = Path("/sys/class/powercap")):
        self.domains = self.find_domains(root)
        if not self.domains:
            raise RuntimeError(f"no readable RAPL domains under {root}")
        self._start: dict[Path, int] = {}

    @staticmethod
    def find_domains(root: Path) -> dict[Path, tuple[str, int]]:
        """Readable top-level package domains and their dram subdomains: path -> (component, range)."""
        domains: dict[Path, tuple[str, int]] = {}
        if not root.is_dir():
            return domains
        for zone in sorted(root.glob("intel-rapl:*")):
            energy = zone / "energy_uj"
            try:
                name = (zone / "name").read_text().strip()
                int(energy.read_text())
                max_range = int((zone / "max_energy_range_uj").read_text())
            except (OSError, ValueError):
                continue
            if name.startswith("package"):
                domains[energy] = ("cpu", max_range)
            elif name == "dram":
                domains[energy] = ("ram", max_range)
        return domains

    def begin(self, window: str) -> None:
        self._start = {path: int(path.read_text()) for path in self.domains}

    def end(self) -> dict[str, ComponentReading]:
        totals: dict[str, float] = {}
        for path, (component, max_range) in self.domains.items():
            now = int(path.read_text())
            delta = now - self._start[path]
            if delta < 0:  # the counter wrapped once during the window
                delta += max_range
            totals[component] = totals.get(component, 0.0) + delta / 1e6
        return {c: ComponentReading(j, "rapl") for c, j in totals.items()}

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------------------------------
# NVML


class NvmlSource:
    """The total-energy counter (mJ since driver load) of each visible GPU."""

    name = "nvml_counter"

    def __init__(self, nvml: Any = None, device_indices: list[int] | None = None):
        if nvml is None:
            import pynvml as nvml  # from nvidia-ml-py
        self.nvml = nvml
        self.nvml.nvmlInit()
        count = self.nvml.nvmlDeviceGetCount()
        indices = device_indices if device_indices is not None else list(range(count))
        self.handles = [self.nvml.nvmlDeviceGetHandleByIndex(i) for i in indices]
        self._start: list[int] = []

    def _read(self) -> list[int]:
        return [self.nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self.handles]

    def begin(self, window: str) -> None:
        self._start = self._read()

    def end(self) -> dict[str, ComponentReading]:
        total_mj = sum(b - a for a, b in zip(self._start, self._read()))
        return {"gpu": ComponentReading(total_mj / 1e3, "nvml_counter")}

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.nvml.nvmlShutdown()


# --------------------------------------------------------------------------------------------------
# CodeCarbon


class _MethodLogCapture(logging.Handler):
    """Reads the tracking methods CodeCarbon announces in its log when it starts."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.methods: dict[str, str] = {}

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        for line in text.splitlines():
            line = line.strip()
            for component in ("CPU", "GPU", "RAM"):
                prefix = f"{component} Tracking Method:"
                if line.startswith(prefix):
                    self.methods[component.lower()] = line[len(prefix) :].strip()


def _codecarbon_method(raw: str | None, component: str) -> str:
    if not raw or raw.lower() == "unspecified":
        return "none" if component == "gpu" else f"codecarbon:{component}_unknown_estimate"
    slug = raw.strip().lower().replace(" ", "_")
    if component == "ram" and "estimation" in slug:
        return "codecarbon:ram_power_model"
    return f"codecarbon:{slug}"


class CodeCarbonSource:
    """CodeCarbon's OfflineEmissionsTracker; one tracker, one task per window."""

    name = "codecarbon"

    def __init__(self, settings: EnergySettings, tracker_factory: Callable[..., Any] | None = None):
        if tracker_factory is None:
            from codecarbon import OfflineEmissionsTracker as tracker_factory
        kwargs: dict[str, Any] = dict(
            country_iso_code=settings.country_iso_code,
            measure_power_secs=settings.measure_power_secs,
            tracking_mode=settings.tracking_mode,
            output_methods=[],  # nothing written to disk: the study's tables hold the numbers
            log_level="warning",
            allow_multiple_runs=True,
        )
        self.tracker = tracker_factory(**kwargs)
        capture = _MethodLogCapture()
        logger = logging.getLogger("codecarbon")
        # Hear CodeCarbon's INFO lines (they name its methods) without printing them.
        previous = (logger.level, list(logger.handlers), logger.propagate)
        logger.handlers, logger.propagate = [capture], False
        logger.setLevel(logging.INFO)
        try:
            self.tracker.start()
        finally:
            logger.setLevel(previous[0])
            logger.handlers, logger.propagate = previous[1], previous[2]
        self.methods = {c: _codecarbon_method(capture.methods.get(c), c) for c in ("cpu", "gpu", "ram")}
        self.last_emissions_kg = 0.0
        self.last_energy_kwh = 0.0

    def begin(self, window: str) -> None:
        self.tracker.start_task(window)

    def end(self) -> dict[str, ComponentReading]:
        data = self.tracker.stop_task()
        self.last_emissions_kg = float(data.emissions)
        self.last_energy_kwh = float(data.energy_consumed)
        readings = {
            "cpu": ComponentReading(float(data.cpu_energy) * J_PER_KWH, self.methods["cpu"]),
            "ram": ComponentReading(float(data.ram_energy) * J_PER_KWH, self.methods["ram"]),
        }
        if self.methods["gpu"] != "none":
            readings["gpu"] = ComponentReading(float(data.gpu_energy) * J_PER_KWH, self.methods["gpu"])
        return readings

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.tracker.stop()


# --------------------------------------------------------------------------------------------------
# The meter


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


@dataclass
class WindowHandle:
    name: str
    record: EnergyRecord | None = None


class EnergyMeter:
    """Measures named windows with every available source; hardware counters win over estimates."""

    def __init__(
        self,
        settings: EnergySettings,
        device: str = "cpu",
        sources: list[EnergySource] | None = None,
        clock: Callable[[], float] = time.perf_counter,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.settings = settings
        self.device = device
        self.clock = clock
        self.sleep = sleep
        self.sources = sources if sources is not None else default_sources(settings, device)
        self.idle: IdleBaseline | None = None
        self._intensity_g_per_kwh = settings.carbon_intensity_g_per_kwh

    @property
    def available_methods(self) -> list[str]:
        return [s.name for s in self.sources]

    @contextlib.contextmanager
    def window(self, name: str) -> Iterator[WindowHandle]:
        handle = WindowHandle(name)
        _synchronize(self.device)
        for source in self.sources:
            source.begin(name)
        start = self.clock()
        try:
            yield handle
        finally:
            _synchronize(self.device)
            duration_s = self.clock() - start
            readings: dict[str, ComponentReading] = {}
            for source in self.sources:
                for component, reading in source.end().items():
                    # A hardware counter (rapl, nvml) replaces an estimate of the same component.
                    current = readings.get(component)
                    if current is None or (is_estimate(current.method) and not is_estimate(reading.method)):
                        readings[component] = reading
            handle.record = self._make_record(name, duration_s, readings)

    def _make_record(self, name: str, duration_s: float, readings: dict[str, ComponentReading]) -> EnergyRecord:
        def kwh(component: str) -> float:
            return readings[component].energy_j / J_PER_KWH if component in readings else 0.0

        def method(component: str) -> str:
            return readings[component].method if component in readings else "none"

        total_kwh = kwh("cpu") + kwh("gpu") + kwh("ram")
        return EnergyRecord(
            name=name,
            duration_s=duration_s,
            cpu_energy_kwh=kwh("cpu"),
            gpu_energy_kwh=kwh("gpu"),
            ram_energy_kwh=kwh("ram"),
            emissions_kg=total_kwh * self.carbon_intensity_g_per_kwh() / 1000.0,
            cpu_method=method("cpu"),
            gpu_method=method("gpu"),
            ram_method=method("ram"),
            idle_power_w=self.idle.power_w if self.idle else 0.0,
        )

    def carbon_intensity_g_per_kwh(self) -> float:
        """Explicit parameter, else the intensity CodeCarbon applied for the country."""
        if self._intensity_g_per_kwh is not None:
            return self._intensity_g_per_kwh
        for source in self.sources:
            if isinstance(source, CodeCarbonSource) and source.last_energy_kwh > 0:
                self._intensity_g_per_kwh = source.last_emissions_kg * 1000.0 / source.last_energy_kwh
                return self._intensity_g_per_kwh
        return float("nan")

    def measure_idle_baseline(self, seconds: float | None = None) -> IdleBaseline:
        """Power with the device idle, measured now; later windows subtract it for net energy."""
        seconds = self.settings.idle_seconds if seconds is None else seconds
        if seconds <= 0:
            self.idle = IdleBaseline(0.0, 0.0, "none")
            return self.idle
        with self.window("idle") as handle:
            self.sleep(seconds)
        record = handle.record
        assert record is not None
        self.idle = IdleBaseline(record.power_w, record.duration_s, record.energy_method)
        return self.idle

    def use_idle_baseline(self, baseline: IdleBaseline) -> None:
        self.idle = baseline

    def measure(self, fn: Callable[[], T], name: str) -> tuple[T, EnergyRecord]:
        """One window around ``fn``; a call shorter than ``min_window_s`` is repeated inside the window
        and the record is divided by the number of calls, so short workloads never read as zero."""
        calls = 0
        with self.window(name) as handle:
            start = self.clock()
            result = fn()
            calls = 1
            while self.clock() - start < self.settings.min_window_s:
                fn()
                calls += 1
        record = handle.record
        assert record is not None
        if calls > 1:
            record = replace(
                record,
                duration_s=record.duration_s / calls,
                cpu_energy_kwh=record.cpu_energy_kwh / calls,
                gpu_energy_kwh=record.gpu_energy_kwh / calls,
                ram_energy_kwh=record.ram_energy_kwh / calls,
                emissions_kg=record.emissions_kg / calls,
                calls=calls,
            )
        return result, record

    def measure_repeated(self, fn: Callable[[], T], name: str, warmup: Callable[[], Any] | None = None) -> RepeatedMeasurement:
        """Repeat until the energy spread is under ``target_rsd`` or ``max_repeats`` is reached."""
        if warmup is not None and self.settings.warmup:
            warmup()
        records: list[EnergyRecord] = []
        first: Any = None
        for index in range(self.settings.max_repeats):
            result, record = self.measure(fn, f"{name}#{index + 1}")
            if index == 0:
                first = result
            records.append(record)
            if len(records) >= self.settings.repeats:
                values = [r.energy_kwh for r in records]
                mean = statistics.fmean(values)
                if len(values) < 2 or (mean > 0 and statistics.stdev(values) / mean <= self.settings.target_rsd):
                    break
        return RepeatedMeasurement(tuple(records), first)

    def close(self) -> None:
        for source in self.sources:
            source.close()

    def __enter__(self) -> "EnergyMeter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def default_sources(settings: EnergySettings, device: str) -> list[EnergySource]:
    """CodeCarbon always; RAPL when readable; NVML when measuring a CUDA device."""
    sources: list[EnergySource] = [CodeCarbonSource(settings)]
    if RaplSource.find_domains(Path("/sys/class/powercap")):
        sources.append(RaplSource())
    if device.startswith("cuda"):
        sources.append(NvmlSource(device_indices=nvml_indices(device)))
    return sources


def nvml_indices(device: str) -> list[int]:
    """NVML indices of the GPU a job uses: its CUDA index mapped through CUDA_VISIBLE_DEVICES.

    NVML ignores CUDA_VISIBLE_DEVICES and enumerates in PCI order, so the mapping assumes
    CUDA_DEVICE_ORDER=PCI_BUS_ID (set by the runner's workers) when GPUs are hidden.
    """
    cuda_index = int(device.split(":", 1)[1]) if ":" in device else 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible:
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        if all(v.isdigit() for v in ids) and cuda_index < len(ids):
            return [int(ids[cuda_index])]
    return [cuda_index]


def rapl_available(root: Path = Path("/sys/class/powercap")) -> bool:
    return bool(RaplSource.find_domains(root))


def nvml_available() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        return True
    except Exception:
        return False


def describe_methods(methods: set[str]) -> str:
    """A sentence for the report saying which numbers are measurements and which are estimates."""
    estimates = sorted(m for m in methods if is_estimate(m))
    measured = sorted(m for m in methods if m != "none" and not is_estimate(m))
    parts = []
    if measured:
        parts.append("measured by hardware counters: " + ", ".join(measured))
    if estimates:
        parts.append(
            "ESTIMATED, not measured: "
            + ", ".join(estimates)
            + " (CodeCarbon models power from CPU load and a TDP guess when no RAPL counter is"
            " readable; RAM power is a model of installed memory)"
        )
    return "; ".join(parts) if parts else "no energy method recorded"
