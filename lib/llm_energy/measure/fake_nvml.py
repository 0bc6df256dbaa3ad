"""A pynvml stand-in for rehearsals without a GPU (``tools/gpu_check.sh --dry-run``, the tests).

It answers the calls this project makes: a total-energy counter (mJ) that rises at ``power_w`` in
wall time, the power reading (mW), the name, driver, power limit, clocks and temperature. With
``counter=False`` the energy counter raises as on a board without one, so the meter's fallback to
integrated power runs. Nothing here is a measurement.
"""

from __future__ import annotations

import time

NVML_CLOCK_GRAPHICS = 0
NVML_CLOCK_SM = 1
NVML_CLOCK_MEM = 2
NVML_TEMPERATURE_GPU = 0


class NVMLError(Exception):
    """What pynvml raises (its NVMLError kinds derive from Exception)."""


class FakeNvml:
    NVML_CLOCK_GRAPHICS = NVML_CLOCK_GRAPHICS
    NVML_CLOCK_SM = NVML_CLOCK_SM
    NVML_CLOCK_MEM = NVML_CLOCK_MEM
    NVML_TEMPERATURE_GPU = NVML_TEMPERATURE_GPU
    NVMLError = NVMLError

    def __init__(self, power_w: float = 100.0, counter: bool = True,
                 name: str = "Fake GPU (dry run, no GPU)"):
        self.power_w = float(power_w)
        self.counter = counter
        self.name = name
        self.t0 = time.perf_counter()

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        if index != 0:
            raise NVMLError(f"no GPU {index}")
        return index

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: int) -> int:
        if not self.counter:
            raise NVMLError("Not Supported")
        return int((time.perf_counter() - self.t0) * self.power_w * 1000)

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        return int(self.power_w * 1000)

    def nvmlDeviceGetName(self, handle: int) -> str:
        return self.name

    def nvmlSystemGetDriverVersion(self) -> str:
        return "0.0 (fake)"

    def nvmlDeviceGetPowerManagementLimit(self, handle: int) -> int:
        return 700_000

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: int) -> int:
        return 700_000

    def nvmlDeviceGetClockInfo(self, handle: int, kind: int) -> int:
        return {NVML_CLOCK_GRAPHICS: 1980, NVML_CLOCK_SM: 1980, NVML_CLOCK_MEM: 2619}.get(kind, 0)

    def nvmlDeviceGetMaxClockInfo(self, handle: int, kind: int) -> int:
        return self.nvmlDeviceGetClockInfo(handle, kind)

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        return 35
