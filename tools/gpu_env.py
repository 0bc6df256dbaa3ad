"""Step a of tools/gpu_check.sh: the GPU, its driver, power limit and clocks, the versions, and the
energy readings the rest of the check relies on.

- NVML: name, driver, power limit (enforced), SM and memory clocks (current and max), temperature;
  the total-energy counter read twice ``--gap-s`` apart (5 s) with the power reading beside each, so
  the counter's average power over the gap can be set against the power readings;
- the meter's own NVML source created as the study creates it (it test-reads the counter and falls back
  to integrated power, recording the method) and one window measured with both readings;
- versions: Python, torch (CUDA, cuSPARSELt), transformers, peft, accelerate, nvidia-ml-py; whether
  the payload's packages import (pydantic, codecarbon, papermill) is the install step's to say.

Writes ``--out`` (JSON) and prints one line per finding; runs on the image's bare Python (torch and
pynvml only). ``--fake-nvml``: a stand-in NVML (the CPU rehearsal).
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))


def version(distribution: str) -> str:
    """Installed version, read from the package's metadata (importing transformers or peft takes seconds)."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "missing"


def attempt(fn: Any, *args: Any) -> Any:
    try:
        value = fn(*args)
        return value.decode() if isinstance(value, bytes) else value
    except Exception as exc:  # noqa: BLE001
        return f"unreadable ({type(exc).__name__}: {exc})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--gap-s", type=float, default=5.0)
    parser.add_argument("--window-s", type=float, default=1.0, help="the meter's test window")
    parser.add_argument("--fake-nvml", action="store_true")
    args = parser.parse_args(argv)
    env: dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine()}
    import torch

    env.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        env.update(gpu=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                   memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
                   cusparselt=attempt(torch.backends.cusparselt.version))
    for distribution in ("transformers", "peft", "accelerate", "nvidia-ml-py", "numpy", "pandas", "pydantic",
                         "codecarbon", "papermill"):
        env[f"{distribution}_version"] = version(distribution)
    if args.fake_nvml:
        from llm_energy.measure.fake_nvml import FakeNvml

        nvml: Any = FakeNvml(power_w=100.0)
    else:
        import pynvml as nvml
    ok = True
    try:
        nvml.nvmlInit()
        handle = nvml.nvmlDeviceGetHandleByIndex(0)
        env["nvml"] = {
            "name": attempt(nvml.nvmlDeviceGetName, handle),
            "driver": attempt(nvml.nvmlSystemGetDriverVersion),
            "power_limit_w": attempt(lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1e3),
            "sm_clock_mhz": attempt(nvml.nvmlDeviceGetClockInfo, handle, nvml.NVML_CLOCK_SM),
            "sm_clock_max_mhz": attempt(nvml.nvmlDeviceGetMaxClockInfo, handle, nvml.NVML_CLOCK_SM),
            "mem_clock_mhz": attempt(nvml.nvmlDeviceGetClockInfo, handle, nvml.NVML_CLOCK_MEM),
            "mem_clock_max_mhz": attempt(nvml.nvmlDeviceGetMaxClockInfo, handle, nvml.NVML_CLOCK_MEM),
            "temperature_c": attempt(nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU),
        }
        reads = []
        for _ in range(2):
            reads.append({"t": time.perf_counter(),
                          "counter_mj": attempt(nvml.nvmlDeviceGetTotalEnergyConsumption, handle),
                          "power_w": attempt(lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1e3)})
            if len(reads) == 1:
                time.sleep(args.gap_s)
        counter_w = None
        if all(isinstance(r["counter_mj"], int) for r in reads):
            counter_w = (reads[1]["counter_mj"] - reads[0]["counter_mj"]) / 1e3 / (
                reads[1]["t"] - reads[0]["t"])
        env["nvml"]["counter_reads"] = reads
        env["nvml"]["counter_average_power_w"] = counter_w
    except Exception as exc:  # noqa: BLE001
        env["nvml_error"] = f"{type(exc).__name__}: {exc}"
        ok = False
    # The meter's NVML source as a study creates it: test-read, fallback, and one window of 1 s.
    try:
        from llm_energy.measure.meter import NvmlSource

        source = NvmlSource(nvml=nvml if args.fake_nvml else None, device_indices=[0], sample_power_s=0.05)
        source.begin("env")
        time.sleep(args.window_s)
        reading = source.end()["gpu"]
        env["meter_nvml"] = {"method": source.method, "fallback_reason": source.fallback_reason,
                             "window_j": reading.energy_j, "counter_j": source.last_counter_j,
                             "power_integral_j": source.last_power_integral_j}
        source.close()
    except Exception as exc:  # noqa: BLE001
        env["meter_nvml"] = {"method": "none", "error": f"{type(exc).__name__}: {exc}"}
        ok = False
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(env, indent=1, default=str))
    for key, value in env.items():
        print(f"{key}: {value}")
    print(f"env={'ok' if ok else 'incomplete'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
