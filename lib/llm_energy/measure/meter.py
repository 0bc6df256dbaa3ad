"""One energy meter over every source this machine has.

A measured window is a context manager (try/finally) that synchronises the device at both edges and
yields a handle whose ``record`` is a frozen :class:`EnergyRecord` with units in its field names.
Each component (CPU, GPU, RAM) states how it was obtained:

- ``rapl``: the CPU package/DRAM energy counters in ``/sys/class/powercap`` (a measurement);
- ``nvml_counter``: the GPU's total-energy counter read through NVML (a measurement);
- ``nvml_power_integral``: the GPU's power readings through NVML, sampled and integrated (a measurement,
  coarser: where the counter cannot be read);
- ``codecarbon:<mode>``: CodeCarbon's figure; on a machine without RAPL its CPU power is an
  *estimate* from CPU load and a TDP guess (``codecarbon:cpu_load``) and RAM power is a model.

Source priority, per component: a hardware counter of the job's own device (``nvml_counter`` for
the job's GPUs, ``rapl`` for CPU packages and DRAM) beats CodeCarbon's reading of the same component
(``codecarbon:pynvml``, ``codecarbon:rapl``), which beats CodeCarbon's models (``codecarbon:cpu_load``,
``codecarbon:ram_power_model``, constants). CodeCarbon is read through its public API only
(``start_task``/``stop_task``, ``get_detected_hardware`` and its public probing functions); it is
told the job's GPU ids and its GPU figure is ignored for a CPU job.

Attribution: GPU energy is the job's own GPUs. CPU and RAM energy are whole-machine figures; they
count in a window's total only when the job is the only measured job on its node (``attribution:
machine``); with ``gpu_only`` (several measured jobs share the node) they are still recorded but left
out of the total, and ``scope`` says so.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import statistics
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol, Sequence, TypeVar

if TYPE_CHECKING:  # the settings are only annotations here: the meter's sources load without pydantic
    from ..config import EnergySettings
    from .disturbance import DisturbanceMonitor

logger = logging.getLogger(__name__)
J_PER_KWH = 3.6e6
ESTIMATE_MARKERS = ("cpu_load", "constant", "tdp", "estimate", "model")
T = TypeVar("T")


def is_estimate(method: object) -> bool:
    """True when a method string names an estimate rather than a hardware counter: the one rule that
    tables, figures and the report use."""
    text = str(method).lower()
    return any(marker in text for marker in ESTIMATE_MARKERS)


def estimated_components(methods: dict[str, str]) -> str:
    """The components whose energy is modelled rather than counted, e.g. "cpu;ram" (empty: all
    counted); ``methods`` maps component to method, "none" for a component not read."""
    return ";".join(c for c, m in methods.items() if m and m != "none" and is_estimate(m))


def component_methods(rows: Any) -> list[str]:
    """Every method behind the energy of these table rows (a DataFrame of energy.csv, training.csv or
    ranking.csv rows): per row its components' methods (cpu_method, gpu_method, ram_method; "none" and
    empty left out; a ";"-joined list split), or its energy_method when no component is recorded. What
    an "Energy method" sentence or a figure's estimate note must read: the GPU's counter alone would
    hide CodeCarbon's modelled CPU and RAM in the same totals. Unrecorded rows give "" (so a note can
    say so)."""
    out: list[str] = []
    columns = [c for c in ("cpu_method", "gpu_method", "ram_method") if c in getattr(rows, "columns", ())]
    for _, row in rows.iterrows():
        found = []
        for value in [row[c] for c in columns] or [row.get("energy_method")]:
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            found += [m for m in str(value).split(";") if m.strip() and m.strip() != "none"]
        if not found and columns and "energy_method" in rows.columns:
            value = row.get("energy_method")
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                found = [m for m in str(value).split(";") if m.strip() and m.strip() != "none"]
        out += found or [""]
    return out


# the project's own readings
HARDWARE_COUNTERS: tuple[str, ...] = ("nvml_counter", "nvml_power_integral", "rapl")
SCOPE_MACHINE = "machine"
SCOPE_GPU_ONLY = "gpu_only: shared node"


def method_priority(method: str) -> int:
    """0: the project's hardware counter; 1: another tool's reading of a counter; 2: a model."""
    if method in HARDWARE_COUNTERS:
        return 0
    return 2 if is_estimate(method) else 1


@dataclass(frozen=True)
class ComponentReading:
    energy_j: float
    method: str


@dataclass(frozen=True)
class EnergyRecord:
    """Energy of one measured window. Gross values; ``net`` subtracts the loaded-idle power."""

    name: str
    duration_s: float
    cpu_energy_kwh: float
    gpu_energy_kwh: float
    ram_energy_kwh: float
    emissions_kg: float
    cpu_method: str
    gpu_method: str
    ram_method: str
    idle_power_w: float = 0.0  # loaded-idle power of the same job (system idle when none; 0 when neither)
    calls: int = 1  # workload calls inside the window; energies and duration are per call
    scope: str = SCOPE_MACHINE  # what energy_kwh covers: the machine, or the job's GPUs only
    carbon_intensity_g_per_kwh: float = float("nan")
    country_iso_code: str = ""
    # what the disturbance witnesses said about this window (measure/disturbance.py; NaN: not read)
    canary_slowdown: float = float("nan")
    canary_vs_study: float = float("nan")
    foreign_cpu_share: float = float("nan")
    steal_share: float = float("nan")
    foreign_gpu_processes: int = 0
    contaminated: bool = False
    disturbance: str = ""  # the thresholds it passed, in words
    attempts: int = 1  # windows measured for this one (more than 1: contaminated ones measured again)

    @property
    def energy_kwh(self) -> float:
        """The window's total: every component, or only the GPU when the node is shared."""
        if self.scope == SCOPE_GPU_ONLY:
            return self.gpu_energy_kwh
        return self.cpu_energy_kwh + self.gpu_energy_kwh + self.ram_energy_kwh

    @property
    def energy_net_kwh(self) -> float:
        return self.energy_kwh - self.idle_power_w * self.duration_s / J_PER_KWH

    @property
    def energy_method(self) -> str:
        """The method of the dominant measured component: GPU when one was read, else CPU."""
        return self.gpu_method if self.gpu_method != "none" else self.cpu_method

    @property
    def estimated_components(self) -> str:
        """Components in the total whose energy is modelled, e.g. "cpu;ram" (empty: all counted)."""
        methods = {"cpu": self.cpu_method, "gpu": self.gpu_method, "ram": self.ram_method}
        counted = ("gpu",) if self.scope == SCOPE_GPU_ONLY else ("cpu", "gpu", "ram")
        return estimated_components({c: methods[c] for c in counted})

    @property
    def power_w(self) -> float:
        return self.energy_kwh * J_PER_KWH / self.duration_s if self.duration_s > 0 else 0.0

    def components(self) -> list[dict[str, Any]]:
        """The reading per component (cpu, gpu, ram): energy, mean power over the window, the method
        that gave it, whether that method is a model rather than a counter, whether the total counts it."""
        counted = ("gpu",) if self.scope == SCOPE_GPU_ONLY else ("cpu", "gpu", "ram")
        rows = []
        for component in ("cpu", "gpu", "ram"):
            energy_kwh = getattr(self, f"{component}_energy_kwh")
            method = getattr(self, f"{component}_method")
            rows.append({"component": component, "energy_j": energy_kwh * J_PER_KWH, "energy_kwh": energy_kwh,
                         "power_w": energy_kwh * J_PER_KWH / self.duration_s if self.duration_s > 0 else 0.0,
                         "method": method, "estimated": method != "none" and is_estimate(method),
                         "in_total": component in counted})
        return rows


@dataclass(frozen=True)
class IdleBaseline:
    """Power with nothing running: ``system`` (nothing loaded) or ``loaded`` (the model in memory,
    the device synchronised), measured in the job's own process."""

    power_w: float
    duration_s: float
    method: str
    kind: str = "system"
    disturbance: str = ""  # the thresholds the idle window passed (empty: clean or not checked)

    def as_dict(self) -> dict[str, Any]:
        return {"idle_power_w": self.power_w, "idle_duration_s": self.duration_s, "idle_method": self.method,
                "idle_kind": self.kind}


@dataclass(frozen=True)
class RepeatedMeasurement:
    """The measured windows of one workload, in one of two designs (``unit``):

    - ``"repeat"``: every window runs the whole workload (``result`` is what the first returned);
      the workload's energy is the mean over windows. Its spread (:meth:`std`, estimator
      ``sd_of_repeats``) is the standard deviation across windows: how much one full pass varies.
    - ``"chunk"``: one pass over the items, split into windows over disjoint chunks of items
      (``window_items`` per window; ``result`` is the list of every window's result, in window
      order). The energy is the sum over windows (one pass, no re-scoring). Its spread (:meth:`std`,
      estimator ``se_of_chunk_sum``) is the standard error of that sum: each window implies a
      whole-pass value (window energy x items / window items); the sum is (for equal chunks) their
      mean, so its standard error is their standard deviation / sqrt(windows). (The standard deviation
      of the implied values themselves would be sqrt(windows) times too large for the sum.)

    :meth:`se` is the standard error of the reported value in both designs.
    """

    records: tuple[EnergyRecord, ...]
    result: Any = field(compare=False, repr=False)
    unit: str = "repeat"
    window_items: tuple[int, ...] = ()
    # repeat design: the first ``pilot`` windows, whose count was fixed in advance, give the spread
    # (Stein's two-stage design: the windows after them were added because of the pilot's spread, so
    # including them would bias the spread; 0: every window)
    pilot: int = 0
    rate_tolerance: float = 0.15  # a window this much slower than the median window is a rate outlier
    # the useful GFLOP each window ran (measure/flops.py), as the caller counted it from the tokens; empty
    # when not counted. With it, each window's achieved rate beside the device's probed limit.
    window_gflop: tuple[float, ...] = ()

    @property
    def contaminated_windows(self) -> int:
        """Windows kept with the contaminated flag (measured again up to the limit, or flag-only)."""
        return sum(1 for r in self.records if r.contaminated)

    @property
    def remeasured_windows(self) -> int:
        """Contaminated windows discarded and measured again."""
        return sum(r.attempts - 1 for r in self.records)

    def worst(self, attr: str) -> float:
        """The largest value of a disturbance reading over the windows (NaN when none was read)."""
        values = [float(getattr(r, attr)) for r in self.records]
        values = [v for v in values if not math.isnan(v)]
        return max(values) if values else float("nan")

    def rate_vs_median(self) -> list[float]:
        """Per window, its items per second over the median window's (1.0 with one window): chunks are
        round-robin samples of the same items, so a window well below 1 ran on a slower machine."""
        if self.windows < 2:
            return [1.0] * self.windows
        items = self.window_items if self.unit == "chunk" else (1,) * self.windows
        rates = [n / r.duration_s if r.duration_s > 0 else float("nan") for n, r in zip(items, self.records)]
        median = statistics.median([r for r in rates if not math.isnan(r)] or [float("nan")])
        return [r / median if median and median > 0 else float("nan") for r in rates]

    def rate_outliers(self) -> list[bool]:
        """Windows whose rate is below the median's by more than ``rate_tolerance`` (three windows at
        least: with two, neither is the outlier of the other)."""
        if self.windows < 3:
            return [False] * self.windows
        return [bool(r < 1.0 / (1.0 + self.rate_tolerance)) for r in self.rate_vs_median()]

    def gflop(self) -> float:
        """The workload's useful GFLOP, as :meth:`total` adds up (NaN when not counted)."""
        if len(self.window_gflop) != len(self.records):
            return float("nan")
        return math.fsum(self.window_gflop) if self.unit == "chunk" else statistics.fmean(self.window_gflop)

    @property
    def repeats(self) -> int:
        return len(self.records)

    @property
    def windows(self) -> int:
        return len(self.records)

    @property
    def n_items(self) -> int:
        return sum(self.window_items)

    @property
    def std_estimator(self) -> str:
        """What :meth:`std` is: "sd_of_repeats", "sd_of_pilot_repeats" or "se_of_chunk_sum"."""
        if self.unit == "chunk":
            return "se_of_chunk_sum"
        return "sd_of_pilot_repeats" if self._pilot_only else "sd_of_repeats"

    @property
    def _pilot_only(self) -> bool:
        return self.unit == "repeat" and 2 <= self.pilot < len(self.records)

    def mean(self, attr: str) -> float:
        """Mean over windows (what one window measured on average)."""
        return statistics.fmean(getattr(r, attr) for r in self.records)

    def total(self, attr: str) -> float:
        """The workload's value: the mean of full-pass repeats, or the sum over chunk windows."""
        if self.unit == "chunk":
            return math.fsum(getattr(r, attr) for r in self.records)
        return self.mean(attr)

    def implied_totals(self, attr: str) -> list[float]:
        """Per window, the whole workload's value that window implies."""
        values = [getattr(r, attr) for r in self.records]
        if self.unit == "chunk":
            return [v * self.n_items / n for v, n in zip(values, self.window_items)]
        return values

    def spread(self, attr: str) -> float:
        """Standard deviation across windows of :meth:`implied_totals` (NaN with one window); of the
        pilot windows only when later ones were added because of the pilot's spread."""
        values = self.implied_totals(attr)
        if self._pilot_only:
            values = values[: self.pilot]
        return statistics.stdev(values) if len(values) > 1 else float("nan")

    def se(self, attr: str) -> float:
        """Standard error of :meth:`total`: spread / sqrt(windows), in both designs."""
        return self.spread(attr) / math.sqrt(self.windows) if self.windows > 1 else float("nan")

    def std(self, attr: str) -> float:
        """The uncertainty energy.csv reports beside the total (see :attr:`std_estimator`): the spread
        of full-pass repeats, or the standard error of a chunked pass's sum."""
        return self.se(attr) if self.unit == "chunk" else self.spread(attr)

    @property
    def rsd(self) -> float:
        mean = statistics.fmean(self.implied_totals("energy_kwh"))
        return self.spread("energy_kwh") / mean if mean > 0 and self.repeats > 1 else float("nan")


def windows_needed(pilot: Sequence[float], target_rsd: float, max_windows: int) -> int:
    """Windows in all for a relative standard error of the mean of ``target_rsd``, from the pilot
    windows' values (sd / mean / sqrt(n) <= target_rsd), between the pilot's count and max_windows."""
    n = len(pilot)
    if n < 2 or max_windows <= n:
        return n
    mean = statistics.fmean(pilot)
    if mean <= 0 or target_rsd <= 0:
        return max_windows
    rsd = statistics.stdev(pilot) / mean
    return int(min(max_windows, max(n, math.ceil((rsd / target_rsd) ** 2))))


def split_chunks(n_items: int, windows: int) -> list[list[int]]:
    """Item indices of each window: round-robin (item i goes to window i mod k), so that every window
    holds a like mix of a file-ordered, stratified sample; at most one window per item."""
    k = max(1, min(windows, n_items))
    return [list(range(j, n_items, k)) for j in range(k)]


class EnergySource(Protocol):
    """A source reports joules per component for the window between ``begin`` and ``end``."""

    name: str

    def begin(self, window: str) -> None: ...

    def end(self) -> dict[str, ComponentReading]: ...

    def close(self) -> None: ...


# --------------------------------------------------------------------------------------------------
# RAPL


class RaplSource:
    """CPU package and DRAM counters from /sys/class/powercap.

    A counter wraps at ``max_energy_range_uj`` (about 65 kJ on some AMD parts: under 5 minutes at
    250 W). A sampling thread reads every counter each ``sample_s`` seconds during a window and adds
    up the deltas, each corrected for one wrap, so a window of any length counts every wrap as long
    as a counter cannot wrap twice within ``sample_s``.
    """

    name = "rapl"

    def __init__(self, root: Path = Path("/sys/class/powercap"), sample_s: float | None = 1.0):
        self.domains = self.find_domains(root)
        if not self.domains:
            raise RuntimeError(f"no readable RAPL domains under {root}")
        self.sample_s = sample_s
        self._last: dict[Path, int] = {}
        self._total_uj: dict[Path, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

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

    def sample(self) -> None:
        """Read every counter once and add what it moved since the last read (one wrap corrected)."""
        with self._lock:
            for path, (_, max_range) in self.domains.items():
                now = int(path.read_text())
                delta = now - self._last[path]
                if delta < 0:  # wrapped since the last read
                    delta += max_range
                self._total_uj[path] += delta
                self._last[path] = now

    def _run(self) -> None:
        assert self.sample_s is not None
        while not self._stop.wait(self.sample_s):
            with contextlib.suppress(OSError, ValueError):
                self.sample()

    def begin(self, window: str) -> None:
        with self._lock:
            self._last = {path: int(path.read_text()) for path in self.domains}
            self._total_uj = {path: 0 for path in self.domains}
        if self.sample_s:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="rapl-sampler", daemon=True)
            self._thread.start()

    def end(self) -> dict[str, ComponentReading]:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        self.sample()
        totals: dict[str, float] = {}
        for path, (component, _) in self.domains.items():
            totals[component] = totals.get(component, 0.0) + self._total_uj[path] / 1e6
        return {c: ComponentReading(j, "rapl") for c, j in totals.items()}

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None


# --------------------------------------------------------------------------------------------------
# NVML


class NvmlSource:
    """The total-energy counter (mJ since driver load) of each visible GPU.

    The counter is test-read when the source is created: where it cannot be read (a board or driver
    without it, NVML_ERROR_NOT_SUPPORTED), the source falls back to integrating the GPU's power
    readings, sampled every ``sample_power_s`` (0.1 s unless given) by a thread during each window, and
    ``method`` (also the ``gpu_method`` of every record) says ``nvml_power_integral``;
    ``fallback_reason`` keeps why. When power cannot be read either, creating the source fails.

    ``sample_power_s`` with a readable counter samples power too: each window then leaves both
    readings, ``last_counter_j`` and ``last_power_integral_j`` (trapezoids over the samples, the
    window's edges included), so they can be compared; the counter is the one reported."""

    name = "nvml_counter"
    POWER_METHOD = "nvml_power_integral"

    def __init__(self, nvml: Any = None, device_indices: list[int] | None = None,
                 sample_power_s: float | None = None):
        if nvml is None:
            import pynvml as nvml  # from nvidia-ml-py
        self.nvml = nvml
        self.nvml.nvmlInit()
        count = self.nvml.nvmlDeviceGetCount()
        indices = device_indices if device_indices is not None else list(range(count))
        self.handles = [self.nvml.nvmlDeviceGetHandleByIndex(i) for i in indices]
        self._start: list[int] = []
        self.fallback_reason = ""
        try:
            self._read()
            self.method = "nvml_counter"
        except Exception as exc:  # noqa: BLE001  (pynvml raises its own NVMLError kinds)
            self.fallback_reason = f"energy counter unreadable ({type(exc).__name__}: {exc})"
            try:
                self._power_w()
            except Exception as power_exc:  # noqa: BLE001
                raise RuntimeError(f"NVML: {self.fallback_reason}; power unreadable too "
                                   f"({type(power_exc).__name__}: {power_exc})") from power_exc
            self.method = self.POWER_METHOD
            logger.warning("NVML %s: energy from sampled power instead (%s)", self.fallback_reason,
                           self.POWER_METHOD)
            sample_power_s = sample_power_s or 0.1
        self.name = self.method
        self.sample_power_s = sample_power_s
        self._samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_counter_j = float("nan")
        self.last_power_integral_j = float("nan")

    def _read(self) -> list[int]:
        return [self.nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self.handles]

    def _power_w(self) -> float:
        return sum(self.nvml.nvmlDeviceGetPowerUsage(h) for h in self.handles) / 1e3  # mW

    def _sample(self) -> None:
        with contextlib.suppress(Exception):
            self._samples.append((time.perf_counter(), self._power_w()))

    def _run(self) -> None:
        assert self.sample_power_s is not None
        while not self._stop.wait(self.sample_power_s):
            self._sample()

    def begin(self, window: str) -> None:
        if self.method == "nvml_counter":
            self._start = self._read()
        if self.sample_power_s:
            self._samples = []
            self._sample()
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="nvml-power-sampler", daemon=True)
            self._thread.start()

    def _integral_j(self) -> float:
        if self._thread is None:
            return float("nan")
        self._stop.set()
        self._thread.join()
        self._thread = None
        self._sample()
        points = self._samples
        if len(points) < 2:
            return float("nan")
        return sum((t1 - t0) * (p0 + p1) / 2 for (t0, p0), (t1, p1) in zip(points, points[1:]))

    def end(self) -> dict[str, ComponentReading]:
        counter_j = float("nan")
        if self.method == "nvml_counter":
            counter_j = sum(b - a for a, b in zip(self._start, self._read())) / 1e3
        self.last_counter_j = counter_j
        self.last_power_integral_j = self._integral_j()
        energy_j = counter_j if self.method == "nvml_counter" else self.last_power_integral_j
        return {"gpu": ComponentReading(energy_j, self.method)}

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        with contextlib.suppress(Exception):
            self.nvml.nvmlShutdown()


# --------------------------------------------------------------------------------------------------
# CodeCarbon


def probe_codecarbon_methods(tracker: Any) -> dict[str, str]:
    """What CodeCarbon measures each component with, found the way CodeCarbon itself decides (its
    public probing functions and ``get_detected_hardware``), not by reading its log.

    CPU: RAPL when its files are readable on Linux, else CPU load x TDP (psutil), else a constant.
    GPU: NVML power readings when it detected NVIDIA GPUs. RAM: its power model (this project never
    sets a RAM power by hand).
    """
    import platform

    from codecarbon.core import cpu as cc_cpu

    if platform.system() == "Linux" and cc_cpu.is_rapl_available():
        cpu = "codecarbon:rapl"
    elif cc_cpu.is_psutil_available():
        cpu = "codecarbon:cpu_load"
    else:
        cpu = "codecarbon:global_constant"
    gpu = "none"
    if (tracker.get_detected_hardware().get("gpu_count") or 0) > 0:
        from codecarbon.core.gpu_nvidia import is_nvidia_system

        gpu = "codecarbon:pynvml" if is_nvidia_system() else "codecarbon:amdsmi"
    return {"cpu": cpu, "gpu": gpu, "ram": "codecarbon:ram_power_model"}


def proc_cpu_model(path: Path = Path("/proc/cpuinfo")) -> str | None:
    """The CPU's brand string as the kernel lists it (``model name``), or None without one."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() or None
    except OSError:
        return None
    return None


def quicken_codecarbon_cpu_model(path: Path = Path("/proc/cpuinfo")) -> bool:
    """CodeCarbon names the CPU (to look its TDP up) by py-cpuinfo's ``brand_raw``, which py-cpuinfo
    reads in a fresh Python interpreter it starts: 1.1 s of every job on a 2-core VM, once per process.
    On Linux that string is the CPUID brand the kernel lists as ``model name``: CodeCarbon's
    ``detect_cpu_model`` is given it from /proc/cpuinfo instead (same string, same TDP and method).
    Without a ``model name`` line nothing changes. True when CodeCarbon now reads it from there."""
    model = proc_cpu_model(path)
    if model is None:
        return False
    import importlib

    def detect_cpu_model() -> str:
        return model

    changed = False
    for name in ("codecarbon.core.util", "codecarbon.core.cpu", "codecarbon.core.resource_tracker",
                 "codecarbon.external.hardware", "codecarbon.core.powermetrics"):
        try:
            module = importlib.import_module(name)
        except Exception:  # noqa: BLE001  (another CodeCarbon layout: its own detection stays)
            continue
        if hasattr(module, "detect_cpu_model"):
            module.detect_cpu_model = detect_cpu_model
            changed = True
    return changed


class CodeCarbonSource:
    """CodeCarbon's OfflineEmissionsTracker; one tracker, one task per window.

    ``gpu_ids`` are the NVML indices of the job's GPUs (CodeCarbon then reads only those); for a CPU
    job its GPU figure is dropped, since the job has no GPU.
    """

    name = "codecarbon"

    def __init__(self, settings: EnergySettings, tracker_factory: Callable[..., Any] | None = None,
                 gpu_ids: list[int] | None = None,
                 probe: Callable[[Any], dict[str, str]] = probe_codecarbon_methods):
        if tracker_factory is None:
            from codecarbon import OfflineEmissionsTracker as tracker_factory

            quicken_codecarbon_cpu_model()
        kwargs: dict[str, Any] = dict(
            country_iso_code=settings.country_iso_code,
            measure_power_secs=settings.measure_power_secs,
            tracking_mode=settings.tracking_mode,
            output_methods=[],  # nothing written to disk: the study's tables hold the numbers
            log_level="warning",
            allow_multiple_runs=True,
        )
        if gpu_ids:
            kwargs["gpu_ids"] = list(gpu_ids)
        self.reads_gpu = bool(gpu_ids)
        self.tracker = tracker_factory(**kwargs)
        logger = logging.getLogger("codecarbon")
        level = logger.level
        logger.setLevel(logging.ERROR)  # its start-up notes on fallbacks are what `methods` records
        try:
            self.tracker.start()
        finally:
            logger.setLevel(level)
        self.methods = probe(self.tracker)
        if not self.reads_gpu:
            self.methods["gpu"] = "none"
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
    """Measures named windows with every available source; per component, the source of highest
    priority wins (:func:`method_priority`). ``attribution`` is "machine" (the job is the only
    measured job on its node) or "gpu_only" (CPU and RAM are shared with other jobs: recorded, left
    out of the total)."""

    def __init__(
        self,
        settings: EnergySettings,
        device: str = "cpu",
        sources: list[EnergySource] | None = None,
        clock: Callable[[], float] = time.perf_counter,
        sleep: Callable[[float], None] = time.sleep,
        attribution: str = "machine",
        synchronize: Callable[[], None] | None = None,
        monitor: DisturbanceMonitor | None = None,
    ):
        if attribution not in ("machine", "gpu_only"):
            raise ValueError(f"attribution must be 'machine' or 'gpu_only'; got {attribution!r}")
        if attribution == "gpu_only" and not device.startswith("cuda"):
            raise ValueError("attribution 'gpu_only' needs a CUDA device: a CPU job's energy is all CPU and "
                             "RAM")
        self.settings = settings
        self.device = device
        # Both edges of a window wait for the device's queued work (a no-op on the CPU).
        self.synchronize = synchronize if synchronize is not None else (lambda: _synchronize(device))
        self.clock = clock
        self.sleep = sleep
        self.sources = sources if sources is not None else default_sources(settings, device)
        self.scope = SCOPE_GPU_ONLY if attribution == "gpu_only" else SCOPE_MACHINE
        self.idle: IdleBaseline | None = None  # the baseline net energy subtracts (loaded when measured)
        self.idle_system: IdleBaseline | None = None
        self.idle_loaded: IdleBaseline | None = None
        self._intensity_g_per_kwh = settings.carbon_intensity_g_per_kwh
        # reads machine speed, co-tenants and steal around every window (None: not checked)
        self.monitor = monitor
        # a wait for the machine to be clean ran out: later windows are measured again without waiting
        self.long_stretch = False

    @property
    def available_methods(self) -> list[str]:
        return [s.name for s in self.sources]

    @contextlib.contextmanager
    def window(self, name: str) -> Iterator[WindowHandle]:
        handle = WindowHandle(name)
        self.synchronize()
        # the witnesses' first reading (the canary's run among them) before the sources start
        witnessed = self.monitor.begin() if self.monitor is not None else None
        for source in self.sources:
            source.begin(name)
        start = self.clock()
        try:
            yield handle
        finally:
            self.synchronize()
            duration_s = self.clock() - start
            readings: dict[str, ComponentReading] = {}
            for source in self.sources:
                for component, reading in source.end().items():
                    current = readings.get(component)
                    if current is None or method_priority(reading.method) < method_priority(current.method):
                        readings[component] = reading
            record = self._make_record(name, duration_s, readings)
            if witnessed is not None:
                assert self.monitor is not None
                found = self.monitor.end(witnessed)
                record = replace(record, canary_slowdown=found.canary_slowdown,
                                 canary_vs_study=found.canary_vs_study,
                                 foreign_cpu_share=found.foreign_cpu_share, steal_share=found.steal_share,
                                 foreign_gpu_processes=found.foreign_gpu_processes,
                                 contaminated=found.contaminated, disturbance=found.reasons)
                if found.contaminated:
                    logger.warning("window %s disturbed: %s", name, found.reasons)
            handle.record = record

    def _make_record(self, name: str, duration_s: float,
                     readings: dict[str, ComponentReading]) -> EnergyRecord:
        def kwh(component: str) -> float:
            return readings[component].energy_j / J_PER_KWH if component in readings else 0.0

        def method(component: str) -> str:
            return readings[component].method if component in readings else "none"

        record = EnergyRecord(
            name=name,
            duration_s=duration_s,
            cpu_energy_kwh=kwh("cpu"),
            gpu_energy_kwh=kwh("gpu"),
            ram_energy_kwh=kwh("ram"),
            emissions_kg=0.0,
            cpu_method=method("cpu"),
            gpu_method=method("gpu"),
            ram_method=method("ram"),
            idle_power_w=self.idle.power_w if self.idle else 0.0,
            scope=self.scope,
            country_iso_code=self.settings.country_iso_code,
        )
        intensity = self.carbon_intensity_g_per_kwh()
        return replace(record, emissions_kg=record.energy_kwh * intensity / 1000.0,
                       carbon_intensity_g_per_kwh=intensity)

    def carbon_intensity_g_per_kwh(self) -> float:
        """Explicit parameter, else the intensity CodeCarbon applied for the country."""
        if self._intensity_g_per_kwh is not None:
            return self._intensity_g_per_kwh
        for source in self.sources:
            if isinstance(source, CodeCarbonSource) and source.last_energy_kwh > 0:
                self._intensity_g_per_kwh = source.last_emissions_kg * 1000.0 / source.last_energy_kwh
                return self._intensity_g_per_kwh
        return float("nan")

    def measure_idle_baseline(self, seconds: float | None = None, kind: str = "system") -> IdleBaseline:
        """Power with nothing running, measured now: ``system`` before anything is loaded, ``loaded``
        with the model in memory (the device synchronised). Net energy subtracts the loaded one."""
        if kind not in ("system", "loaded"):
            raise ValueError(f"idle kind must be 'system' or 'loaded'; got {kind!r}")
        seconds = self.settings.idle_seconds if seconds is None else seconds
        if seconds <= 0:
            baseline = IdleBaseline(0.0, 0.0, "none", kind)
        else:
            with self.window(f"idle:{kind}") as handle:
                self.sleep(seconds)
            record = handle.record
            assert record is not None
            baseline = IdleBaseline(record.power_w, record.duration_s, record.energy_method, kind,
                                    disturbance=record.disturbance)
        if kind == "system":
            self.idle_system = baseline
            if self.idle_loaded is None:
                self.idle = baseline
        else:
            self.idle_loaded = baseline
            self.idle = baseline
        return baseline

    def measure_idle_drift(self, seconds: float | None = None) -> tuple[IdleBaseline, float]:
        """Loaded idle measured again after the job's windows (kind ``loaded_after``) and its drift,
        (after - before) / before, against the loaded idle measured before them (NaN when there was
        none or it read zero). Net energy keeps subtracting the one measured before."""
        seconds = self.settings.idle_seconds if seconds is None else seconds
        before = self.idle_loaded
        if seconds <= 0:
            return IdleBaseline(0.0, 0.0, "none", "loaded_after"), float("nan")
        with self.window("idle:loaded_after") as handle:
            self.sleep(seconds)
        record = handle.record
        assert record is not None
        after = IdleBaseline(record.power_w, record.duration_s, record.energy_method, "loaded_after",
                             disturbance=record.disturbance)
        drift = ((after.power_w - before.power_w) / before.power_w if before and before.power_w > 0
                 else float("nan"))
        return after, drift

    def use_idle_baseline(self, baseline: IdleBaseline) -> None:
        if baseline.kind == "loaded":
            self.idle_loaded = baseline
        else:
            self.idle_system = baseline
        self.idle = self.idle_loaded or baseline

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
        if calls > 1:  # the disturbance readings are the window's own and stay as they are
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

    def measure_clean(self, fn: Callable[[], T], name: str) -> tuple[T, EnergyRecord]:
        """One window (:meth:`measure`); a contaminated one is measured again, as a whole, while
        ``energy.on_contaminated`` is ``remeasure`` and fewer than ``window_attempts`` (at most
        ``max_repeats``) attempts were made. Before measuring again the monitor polls the machine for at
        most ``energy.settle_s`` until it is clean (an attempt right after the window often lands in the
        same slow stretch); once a wait ran out in this meter (a stretch lasting longer), later windows are
        measured again without waiting. The last attempt is kept, with its flag when it was disturbed
        too (``attempts`` counts them)."""
        remeasure = getattr(self.settings, "on_contaminated", "flag") == "remeasure"
        limit = min(self.settings.max_repeats,
                    getattr(self.settings, "window_attempts", self.settings.max_repeats))
        settle_s = float(getattr(self.settings, "settle_s", 0.0))
        attempts = 0
        while True:
            attempts += 1
            result, record = self.measure(fn, name if attempts == 1 else f"{name}~{attempts}")
            if not (record.contaminated and remeasure and attempts < limit):
                return result, replace(record, attempts=attempts)
            if self.monitor is not None and settle_s > 0 and not self.long_stretch:
                if self.monitor.wait_until_clear(settle_s, sleep=self.sleep) is None:
                    self.long_stretch = True
                    logger.warning("%s: the machine was still disturbed %.0f s after the window (%s); "
                                   "measured again now, and later windows without waiting", name, settle_s,
                                   record.disturbance)
            logger.warning("measuring %s again (attempt %d of at most %d): %s", name, attempts + 1, limit,
                           record.disturbance)

    @property
    def _rate_tolerance(self) -> float:
        return float(getattr(self.settings, "canary_tolerance", 0.15))

    def measure_repeated(self, fn: Callable[[], T], name: str,
                         warmup: Callable[[], Any] | None = None) -> RepeatedMeasurement:
        """Full-pass windows in two stages (Stein's design): ``repeats`` pilot windows, then as many more
        as the pilot's spread says are needed for a relative standard error of ``target_rsd`` (at most
        ``max_repeats`` in all), decided once from the pilot. The energy is the mean of every window; the
        spread is the pilot's (its count was fixed in advance, so its variance is unbiased). Stopping
        whenever the running spread happens to be small picks small spreads and reports them (simulated:
        variance 8-18% low)."""
        if warmup is not None and self.settings.warmup:
            warmup()
        records: list[EnergyRecord] = []
        first: Any = None

        def one() -> None:
            nonlocal first
            result, record = self.measure_clean(fn, f"{name}#{len(records) + 1}")
            if not records:
                first = result
            records.append(record)

        pilot = max(1, min(self.settings.repeats, self.settings.max_repeats))
        for _ in range(pilot):
            one()
        for _ in range(windows_needed([r.energy_kwh for r in records], self.settings.target_rsd,
                                      self.settings.max_repeats) - len(records)):
            one()
        return RepeatedMeasurement(tuple(records), first, pilot=pilot, rate_tolerance=self._rate_tolerance)

    def measure_chunks(self, fns: list[Callable[[], T]], sizes: list[int], name: str,
                       warmup: Callable[[], Any] | None = None) -> RepeatedMeasurement:
        """One pass over a workload split into chunks: one window per chunk (``sizes``: items per chunk)."""
        if len(fns) != len(sizes) or not fns:
            raise ValueError("measure_chunks needs one size per chunk and at least one chunk")
        if warmup is not None and self.settings.warmup:
            warmup()
        results: list[Any] = []
        records: list[EnergyRecord] = []
        for index, fn in enumerate(fns):
            result, record = self.measure_clean(fn, f"{name}@{index + 1}/{len(fns)}")
            results.append(result)
            records.append(record)
        return RepeatedMeasurement(tuple(records), results, unit="chunk", window_items=tuple(sizes),
                                   rate_tolerance=self._rate_tolerance)

    def close(self) -> None:
        for source in self.sources:
            source.close()

    def __enter__(self) -> "EnergyMeter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def default_sources(settings: EnergySettings, device: str) -> list[EnergySource]:
    """CodeCarbon always (told the job's GPUs); RAPL when readable; NVML when measuring a CUDA device."""
    gpu_ids = nvml_indices(device) if device.startswith("cuda") else None
    sources: list[EnergySource] = [CodeCarbonSource(settings, gpu_ids=gpu_ids)]
    if RaplSource.find_domains(Path("/sys/class/powercap")):
        sources.append(RaplSource())
    if device.startswith("cuda"):
        sources.append(NvmlSource(device_indices=gpu_ids))
    return sources


def nvml_indices(device: str, nvml: Any = None) -> list[int]:
    """NVML indices of the GPU a job uses: its CUDA index mapped through CUDA_VISIBLE_DEVICES.

    NVML ignores CUDA_VISIBLE_DEVICES and enumerates in PCI order, so a numeric entry assumes
    CUDA_DEVICE_ORDER=PCI_BUS_ID (set by the runner's workers). An entry given as a GPU UUID
    ("GPU-...") is looked up in NVML; a MIG slice ("MIG-...") maps to its parent GPU, whose energy
    counter covers the whole GPU (every slice on it), which a warning says. An entry NVML cannot
    resolve is refused: metering another GPU than the job's would be worse than no reading."""
    cuda_index = int(device.split(":", 1)[1]) if ":" in device else 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if not visible:
        return [cuda_index]
    ids = [v.strip() for v in visible.split(",") if v.strip()]
    if cuda_index >= len(ids):
        raise ValueError(f"device {device} but CUDA_VISIBLE_DEVICES={visible!r} makes only {len(ids)} GPU(s) "
                         "visible")
    entry = ids[cuda_index]
    if entry.isdigit():
        return [int(entry)]
    if nvml is None:
        import pynvml as nvml

        nvml.nvmlInit()
    try:
        if entry.startswith("MIG-"):
            parent = nvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(nvml.nvmlDeviceGetHandleByUUID(entry))
            index = int(nvml.nvmlDeviceGetIndex(parent))
            logger.warning("CUDA_VISIBLE_DEVICES names MIG slice %s of GPU %d: its NVML energy counter "
                           "covers the whole GPU, every slice on it included", entry, index)
            return [index]
        return [int(nvml.nvmlDeviceGetIndex(nvml.nvmlDeviceGetHandleByUUID(entry)))]
    except Exception as exc:  # noqa: BLE001  (pynvml raises its own NVMLError kinds)
        raise ValueError(f"CUDA_VISIBLE_DEVICES entry {entry!r} (for {device}) is no GPU or MIG UUID NVML "
                         f"knows ({type(exc).__name__}: {exc}); use the GPU's index or its UUID from "
                         "nvidia-smi -L") from exc


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
