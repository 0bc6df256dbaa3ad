"""What a study or a job ran on: the machine's description for provenance.json and idle_baselines.csv.

A precision's speed on a CPU is decided by a handful of instructions: bf16 is fast only where the CPU
has ``avx512_bf16`` or AMX (``amx_bf16``), 8-bit integer matmuls (w8a8) only with VNNI
(``avx512_vnni``, ``avx_vnni``) or ``amx_int8``; without them PyTorch falls back to converting
kernels that can run many times slower than fp32. The throughput probe
(:mod:`.throughput`) measures the speed; this module says which of those instructions the CPU has,
so a report can say why ("bf16 skipped: 25x slower than fp32 on this CPU, which has no avx512_bf16").

Beside the flags: the CPU's model, vendor, cores, frequency governor and current clock, the load
average when the description was taken, memory, kernel and a virtualisation hint (the ``hypervisor``
flag a virtual machine's CPU shows); on a GPU, through NVML: name, driver, power limit, current and
maximum SM and memory clocks, persistence mode, MIG and ECC.

Every reading is defensive: a file that is absent (a VM has no cpufreq, macOS has no /proc) or an
NVML call that raises gives ``None`` (``"unknown"`` for the governor) for that field alone. The
functions take their sources as arguments (a file reader, an NVML module), so the unit tests run on
canned /proc text and a fake NVML.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# The CPU flags (as /proc/cpuinfo spells them) that decide how fast a precision runs on a CPU.
SPEED_FLAGS: tuple[str, ...] = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "avx_vnni",
                                "amx_bf16", "amx_fp16", "amx_int8", "amx_tile")
# precision -> the flags any one of which gives it a native CPU kernel (fp32 needs none; nf4/fp4 are
# dequantized to a float type for every matmul, so no single flag decides them)
FAST_FLAGS: dict[str, tuple[str, ...]] = {
    "bf16": ("avx512_bf16", "amx_bf16"),
    "fp16": ("avx512_fp16", "amx_fp16"),
    "int8": ("avx512_vnni", "avx_vnni", "amx_int8"),
    "w8a8": ("avx512_vnni", "avx_vnni", "amx_int8"),
}
CPUINFO = "/proc/cpuinfo"
MEMINFO = "/proc/meminfo"
LOADAVG = "/proc/loadavg"
GOVERNOR = "/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"
CUR_FREQ_KHZ = "/sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq"
HYPERVISOR_TYPE = "/sys/hypervisor/type"

Reader = Callable[[str], "str | None"]


def read_text(path: str) -> str | None:
    """A file's text, or None when it is absent or unreadable."""
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError):
        return None


@dataclass(frozen=True)
class CpuDescription:
    """The CPU side of a machine. ``isa_flags`` holds every SPEED_FLAGS name, present or not; it is
    empty when the CPU lists no x86 flags (another architecture, or no /proc/cpuinfo)."""

    model: str
    vendor: str
    isa_flags: dict[str, bool]
    logical_cores: int | None
    physical_cores: int | None
    governor: str  # cpu0's cpufreq governor; "unknown" without cpufreq (as on most VMs)
    mhz: float | None  # mean "cpu MHz" over the cores (else cpu0's cpufreq current frequency)
    load_avg: tuple[float, float, float] | None  # 1, 5 and 15 minutes, when the description was taken
    memory_total_bytes: int | None
    memory_available_bytes: int | None
    kernel: str
    # "hypervisor" (the CPU's hypervisor flag; with /sys/hypervisor/type when known), "none", "unknown"
    virtualisation: str

    @property
    def present_flags(self) -> list[str]:
        return [f for f in SPEED_FLAGS if self.isa_flags.get(f)]

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["load_avg"] = list(self.load_avg) if self.load_avg is not None else None
        return data


@dataclass(frozen=True)
class GpuDescription:
    """One GPU as NVML describes it; a field NVML could not give is None."""

    index: int
    name: str | None = None
    driver_version: str | None = None
    power_limit_w: float | None = None
    sm_clock_mhz: int | None = None
    memory_clock_mhz: int | None = None
    max_sm_clock_mhz: int | None = None
    max_memory_clock_mhz: int | None = None
    persistence_mode: bool | None = None
    mig_mode: bool | None = None
    ecc_mode: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _cpuinfo_blocks(text: str) -> list[dict[str, str]]:
    """/proc/cpuinfo as one key -> value mapping per processor block."""
    blocks: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if current:
                blocks.append(current)
                current = {}
            continue
        key, sep, value = line.partition(":")
        if sep:
            current.setdefault(key.strip(), value.strip())
    if current:
        blocks.append(current)
    return blocks


def isa_flags(cpuinfo: str | None) -> dict[str, bool]:
    """Which of SPEED_FLAGS the CPU has (every name, True or False); empty when cpuinfo lists no x86 flags."""
    for block in _cpuinfo_blocks(cpuinfo or ""):
        if "flags" in block:
            present = set(block["flags"].split())
            return {flag: flag in present for flag in SPEED_FLAGS}
    return {}


def _meminfo_bytes(text: str | None, key: str) -> int | None:
    for line in (text or "").splitlines():
        name, _, value = line.partition(":")
        if name.strip() == key:
            parts = value.split()
            try:
                return int(parts[0]) * (1024 if parts[1:2] == ["kB"] else 1)
            except (IndexError, ValueError):
                return None
    return None


def _load_avg(read: Reader,
              getloadavg: Callable[[], Sequence[float]] | None) -> tuple[float, float, float] | None:
    try:
        if getloadavg is not None:
            one, five, fifteen = getloadavg()
            return round(float(one), 2), round(float(five), 2), round(float(fifteen), 2)
    except (OSError, AttributeError, ValueError):
        pass
    text = read(LOADAVG)
    try:
        one, five, fifteen = (round(float(v), 2) for v in (text or "").split()[:3])
        return one, five, fifteen
    except ValueError:
        return None


def describe_cpu(read: Reader = read_text, getloadavg: Callable[[], Sequence[float]] | None = os.getloadavg,
                 cpu_count: int | None | Callable[[], int | None] = os.cpu_count,
                 kernel: str | None = None, fallback_model: str | None = None) -> CpuDescription:
    """The CPU, its speed-deciding flags, cores, governor and clock, the load average now, memory,
    kernel and virtualisation hint. ``read(path)`` gives a file's text or None (tests pass canned
    /proc text); nothing here raises for a missing source."""
    cpuinfo = read(CPUINFO)
    blocks = _cpuinfo_blocks(cpuinfo or "")
    processors = [b for b in blocks if "processor" in b] or blocks
    first = processors[0] if processors else {}
    model = (first.get("model name") or first.get("Model") or first.get("Hardware") or first.get("cpu model")
             or (fallback_model if fallback_model is not None else platform.processor()) or "")
    vendor = first.get("vendor_id") or first.get("CPU implementer") or ""
    flags = isa_flags(cpuinfo)
    try:
        logical = cpu_count() if callable(cpu_count) else cpu_count
    except Exception:  # noqa: BLE001
        logical = None
    if logical is None and processors and "processor" in first:
        logical = len(processors)
    cores = {(b.get("physical id", "0"), b["core id"]) for b in processors if "core id" in b}
    physical = len(cores) or None
    mhz_values = []
    for block in processors:
        try:
            mhz_values.append(float(block["cpu MHz"]))
        except (KeyError, ValueError):
            pass
    mhz: float | None = sum(mhz_values) / len(mhz_values) if mhz_values else None
    if mhz is None:
        try:
            mhz = float((read(CUR_FREQ_KHZ) or "").strip()) / 1000.0
        except ValueError:
            mhz = None
    governor = (read(GOVERNOR) or "").strip() or "unknown"
    if not flags and not cpuinfo:
        virtualisation = "unknown"
    else:
        has_flag = "hypervisor" in (next((b["flags"] for b in blocks if "flags" in b), "")).split()
        kind = (read(HYPERVISOR_TYPE) or "").strip()
        virtualisation = (f"hypervisor ({kind})" if kind else "hypervisor") if (has_flag or kind) else (
            "none" if flags else "unknown")
    meminfo = read(MEMINFO)
    return CpuDescription(
        model=model, vendor=vendor, isa_flags=flags, logical_cores=logical, physical_cores=physical,
        governor=governor, mhz=round(mhz, 1) if mhz is not None else None,
        load_avg=_load_avg(read, getloadavg), memory_total_bytes=_meminfo_bytes(meminfo, "MemTotal"),
        memory_available_bytes=_meminfo_bytes(meminfo, "MemAvailable"),
        kernel=kernel if kernel is not None else platform.release(), virtualisation=virtualisation)


def _field(call: Callable[[], Any], convert: Callable[[Any], Any] = lambda v: v) -> Any:
    """One NVML reading, or None when the call (or the conversion) raises: a field NVML does not
    support on this GPU (MIG on a consumer card, ECC on most) must not lose the others."""
    try:
        return convert(call())
    except Exception:  # noqa: BLE001  (pynvml raises its own NVMLError kinds)
        return None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _current(value: Any) -> bool:
    """NVML's (current, pending) pair for MIG and ECC, or a plain value: is the current one on?"""
    current = value[0] if isinstance(value, (tuple, list)) else value
    return bool(int(current))


def describe_gpu(nvml: Any, index: int, driver: str | None = None) -> GpuDescription:
    """One GPU by its NVML index (NVML already initialised)."""
    handle = _field(lambda: nvml.nvmlDeviceGetHandleByIndex(index))
    if handle is None:
        return GpuDescription(index=index, driver_version=driver)
    sm, mem = getattr(nvml, "NVML_CLOCK_SM", 1), getattr(nvml, "NVML_CLOCK_MEM", 2)

    def power_limit() -> float:
        try:
            return nvml.nvmlDeviceGetEnforcedPowerLimit(handle)
        except Exception:  # noqa: BLE001
            return nvml.nvmlDeviceGetPowerManagementLimit(handle)

    return GpuDescription(
        index=index,
        name=_field(lambda: nvml.nvmlDeviceGetName(handle), _text),
        driver_version=driver,
        power_limit_w=_field(power_limit, lambda mw: round(float(mw) / 1000.0, 1)),
        sm_clock_mhz=_field(lambda: nvml.nvmlDeviceGetClockInfo(handle, sm), int),
        memory_clock_mhz=_field(lambda: nvml.nvmlDeviceGetClockInfo(handle, mem), int),
        max_sm_clock_mhz=_field(lambda: nvml.nvmlDeviceGetMaxClockInfo(handle, sm), int),
        max_memory_clock_mhz=_field(lambda: nvml.nvmlDeviceGetMaxClockInfo(handle, mem), int),
        persistence_mode=_field(lambda: nvml.nvmlDeviceGetPersistenceMode(handle), _current),
        mig_mode=_field(lambda: nvml.nvmlDeviceGetMigMode(handle), _current),
        ecc_mode=_field(lambda: nvml.nvmlDeviceGetEccMode(handle), _current),
    )


def describe_gpus(nvml: Any = None, indices: Sequence[int] | None = None) -> list[GpuDescription]:
    """The GPUs NVML sees (or those of ``indices``); empty when NVML is absent or will not start.
    ``nvml``: the pynvml module, or a fake with its functions (tests)."""
    if nvml is None:
        try:
            import pynvml as nvml  # from nvidia-ml-py
        except ImportError:
            return []
    try:
        nvml.nvmlInit()
    except Exception:  # noqa: BLE001  (no driver: a CPU machine)
        return []
    try:
        if indices is None:
            count = _field(nvml.nvmlDeviceGetCount, int) or 0
            indices = range(count)
        driver = _field(nvml.nvmlSystemGetDriverVersion, _text)
        return [describe_gpu(nvml, int(i), driver) for i in indices]
    finally:
        _field(nvml.nvmlShutdown)


def job_gpus(device: str, nvml: Any = None) -> list[GpuDescription]:
    """The GPU(s) a job on ``device`` uses (none on a CPU); on a failure to map the device, every GPU."""
    if not device.startswith("cuda"):
        return []
    from .meter import nvml_indices

    try:
        indices: list[int] | None = nvml_indices(device, nvml)
    except Exception:  # noqa: BLE001  (an unresolvable CUDA_VISIBLE_DEVICES entry: describe them all)
        indices = None
    return describe_gpus(nvml, indices)


def provenance_fields(cpu: CpuDescription, gpus: Sequence[GpuDescription]) -> dict[str, Any]:
    """provenance.json's "hardware" keys beside the older cpu / cpu_count / gpu / device / cuda."""
    data = cpu.as_dict()
    return {
        "host": platform.node(), "cpu": data.pop("model"), "cpu_count": data.pop("logical_cores"),
        "cpu_vendor": data.pop("vendor"), "cpu_mhz": data.pop("mhz"), **data,
        "speed_flags_present": cpu.present_flags, "gpus": [g.as_dict() for g in gpus],
    }


def job_columns(cpu: CpuDescription, gpus: Sequence[GpuDescription]) -> dict[str, Any]:
    """A job's hardware in a few columns (idle_baselines.csv): where it ran, so a job that ran on
    another node (SLURM) shows its own machine."""
    gpu = gpus[0] if gpus else None
    return {
        "host": platform.node(), "cpu_model": cpu.model,
        "isa_flags": ";".join(cpu.present_flags) or ("none" if cpu.isa_flags else None),
        "cpu_cores": cpu.logical_cores, "governor": cpu.governor, "cpu_mhz": cpu.mhz,
        "load_avg_1m": cpu.load_avg[0] if cpu.load_avg else None,
        "gpu_name": gpu.name if gpu else None, "gpu_power_limit_w": gpu.power_limit_w if gpu else None,
    }


def job_hardware(device: str) -> dict[str, Any]:
    """:func:`job_columns` of this machine for a job on ``device``; empty (the columns stay blank)
    should describing it fail: provenance never stops a measurement."""
    try:
        return job_columns(describe_cpu(), job_gpus(device))
    except Exception:  # noqa: BLE001
        return {}


# --- words for the report -------------------------------------------------------------------------

def _times(factor: float) -> str:
    return f"{factor:.0f}x" if factor >= 10 else f"{factor:.1f}x"


def _join(names: Sequence[str], word: str) -> str:
    """a; a or b; a, b or c."""
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + f" {word} " + names[-1]


def speed_sentence(precision: str, factor: float | None, flags: Mapping[str, bool] | None,
                   on_cpu: bool = True, skipped: bool = False, reference: str = "fp32",
                   reason: str = "") -> str:
    """One precision's measured speed beside the CPU flags that decide it, e.g. "bf16 skipped: 25x
    slower than fp32 on this CPU, which has no avx512_bf16 or amx_bf16". ``factor``: how many times
    slower than the reference it ran (None: not measured, ``reason`` says why); ``flags``: the CPU's
    SPEED_FLAGS (empty or None when unknown, or on a GPU: then no flag is named)."""
    where = "this CPU" if on_cpu else "this GPU"
    head = f"{precision} skipped" if skipped else precision
    if factor is None:
        return f"{head}: not measured on {where}" + (f" ({reason})" if reason else "")
    if abs(factor - 1.0) < 0.05:
        speed = f"about as fast as {reference}"
    elif factor > 1:
        speed = f"{_times(factor)} slower than {reference}"
    else:
        speed = f"{_times(1 / factor)} faster than {reference}"
    sentence = f"{head}: {speed} on {where}"
    needed = FAST_FLAGS.get(precision)
    if not on_cpu or not flags or not needed:
        return sentence
    have = [f for f in needed if flags.get(f)]
    if not have:
        return f"{sentence}, which has no {_join(needed, 'or')}"
    if factor > 1 and skipped:
        return f"{sentence}, although it has {_join(have, 'and')} (the kernel that ran here does not use it)"
    return f"{sentence}, which has {_join(have, 'and')}"


def _gib(n: int | None) -> str:
    return f"{n / 2**30:.1f} GiB" if n else "?"


def cpu_sentence(hw: Mapping[str, Any]) -> str:
    """provenance.json's "hardware" in one sentence (model, vendor, cores, flags, governor, clock, load,
    memory, kernel, virtualisation); tolerant of an older provenance holding only cpu and cpu_count."""
    model = hw.get("cpu") or "unknown CPU"
    vendor = hw.get("cpu_vendor")
    cores = f"{hw['cpu_count']} logical cores" if hw.get("cpu_count") else "cores unknown"
    if hw.get("physical_cores"):
        cores += f" ({hw['physical_cores']} physical)"
    parts = [f"{model}" + (f" ({vendor})" if vendor else "") + f", {cores}"]
    flags = hw.get("isa_flags")
    if flags:
        present = [f for f in SPEED_FLAGS if flags.get(f)]
        absent = [f for f in SPEED_FLAGS if f in flags and not flags.get(f)]
        parts.append("speed-deciding flags: " + (", ".join(present) or "none")
                     + (f" (absent: {', '.join(absent)})" if absent else ""))
    elif "isa_flags" in hw:
        parts.append("no x86 flags listed")
    if "governor" in hw:
        parts.append(f"governor {hw.get('governor') or 'unknown'}"
                     + (f", {hw['cpu_mhz']:.0f} MHz" if hw.get("cpu_mhz") else ""))
    load = hw.get("load_avg")
    if load:
        parts.append(f"load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min) at the "
                     "start")
    if hw.get("memory_total_bytes"):
        parts.append(f"memory {_gib(hw.get('memory_total_bytes'))}, {_gib(hw.get('memory_available_bytes'))} "
                     "available")
    if hw.get("kernel"):
        parts.append(f"kernel {hw['kernel']}")
    virt = hw.get("virtualisation")
    if virt and virt.startswith("hypervisor"):
        parts.append(f"a virtual machine ({virt} flag)" if virt == "hypervisor"
                     else f"a virtual machine ({virt})")
    elif virt == "none":
        parts.append("no hypervisor flag")
    return "; ".join(parts) + "."


def gpu_sentence(gpu: Mapping[str, Any]) -> str:
    """One GPU from provenance.json in a sentence; a field NVML did not give reads "?"."""
    def on(value: Any) -> str:
        return "?" if value is None else ("on" if value else "off")

    def mhz(now: Any, top: Any) -> str:
        return f"{now if now is not None else '?'}/{top if top is not None else '?'} MHz"

    power = gpu.get("power_limit_w")
    return (f"GPU {gpu.get('index', '?')}: {gpu.get('name') or '?'}, driver "
            f"{gpu.get('driver_version') or '?'}, power limit "
            f"{f'{power:g} W' if power is not None else '?'}, SM clock "
            f"{mhz(gpu.get('sm_clock_mhz'), gpu.get('max_sm_clock_mhz'))} (now/max), memory clock "
            f"{mhz(gpu.get('memory_clock_mhz'), gpu.get('max_memory_clock_mhz'))}, persistence "
            f"{on(gpu.get('persistence_mode'))}, MIG {on(gpu.get('mig_mode'))}, ECC "
            f"{on(gpu.get('ecc_mode'))}.")
