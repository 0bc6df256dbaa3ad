"""Was a measured window disturbed? Three witnesses, read around every window.

A shared machine (a lab server, a cluster node, a cloud VM with neighbours) can slow a job for
minutes while per-process accounting sees nothing: the neighbour runs on the host's cores, outside
this kernel. So each window gets three readings, none of which is trusted alone:

- **Machine speed** (``canary_slowdown``, ``canary_vs_study``): a fixed small workload (the throughput
  probe's fp32 matmul, [256 x 576] -> 1536, best of five rounds, about 60 ms) timed just before and
  just after the window. The faster of the two (a slowdown that lasts through the window shows in
  both; a blip at one edge, such as a thread waking after an idle window, in one; back-to-back
  windows share the reading between them) over the same canary when the job's first meter opened
  (its system-idle one): ``canary_slowdown`` (1.0 = as fast; 1.4 = 40%
  slower; "slowed" beyond ``energy.canary_tolerance``). And over the canary when the study started, in
  the runner on the same host: ``canary_vs_study``, which catches a job that started inside a slow
  stretch (same tolerance). It catches what no counter attributes: a neighbour on the host's shared
  cores or memory, a lowered clock. On a quiet 2-core AMD EPYC VM a default study's bf16 job read
  1.16-1.22x against the study's start in every window, and the same job run again alone an hour
  later took 16% less energy on QA: the canary had seen the slow stretch.
- **Co-tenants** (``foreign_cpu_share``): the CPU time of every process that is not this job, its
  children or the processes that launched it (papermill, the runner: the study's own harness), from
  the kernel's per-process accounting (psutil), as a share of the machine's CPU time in the window;
  plus the machine's user and system time (``/proc/stat``) that no process alive at the window's end
  accounts for: a neighbour that left during the window (its time leaves the per-process accounting
  with it; one spinning a core and exiting mid-window read 0.5% foreign without this).
  On a GPU, ``foreign_gpu_processes``: other compute processes NVML lists on the job's GPUs.
- **Hypervisor** (``steal_share``): the ``steal`` time of ``/proc/stat`` over the machine's CPU time
  in the window (0 outside a VM).

A window past any threshold (``energy.canary_tolerance``, ``energy.max_foreign_cpu_share``,
``energy.max_steal_share``, any foreign GPU process) is ``contaminated``; :class:`..meter.EnergyMeter`
measures it again (``energy.on_contaminated: remeasure``) or keeps it with the flag (``flag``).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

log = logging.getLogger(__name__)

CANARY_SHAPE = (256, 576, 1536)  # the throughput probe's shape (measure/throughput.PROBE_SHAPE)
CANARY_CALLS = 4  # calls per round (about 10 ms a round at 190 GFLOP/s)
CANARY_ROUNDS = 5  # the best round: a busy moment only ever slows a round down
REFERENCE_ROUNDS = 10  # the job's reference, read once: more rounds, a steadier minimum
# A window that opens this soon after the previous one closed takes that window's closing canary as
# its opening one (back-to-back windows: the machine's speed read 0.1 s apart is the same reading).
ADJACENT_S = 0.5
# After a contaminated window, the machine is polled this often (a canary and the processes' CPU
# time each time) until it is clean again, for at most ``energy.settle_s``, before the window is
# measured again.
SETTLE_POLL_S = 0.25
# Seconds the canaries run back to back before their sustained-load times are read (sustained_canaries;
# a study sets its own: energy.sustained_burn_s).
SUSTAINED_BURN_S = 24.0
AFTER_BUSY_S = 6.0  # the burn's last seconds with nothing of the study's own beside it (sustained_canaries)
# The job's reference per device, read by the job's first monitor: its system-idle meter and its
# main meter compare against one speed, and the reference is not paid twice.
_JOB_REFERENCE: dict[str, float] = {}


@dataclass(frozen=True)
class Disturbance:
    """What the three witnesses said about one window (NaN: not read)."""

    canary_slowdown: float = math.nan
    foreign_cpu_share: float = math.nan
    steal_share: float = math.nan
    foreign_gpu_processes: int = 0
    contaminated: bool = False
    reasons: str = ""  # e.g. "slowed 1.42x; foreign CPU 48%"
    canary_vs_study: float = math.nan  # the window's canary over the study's start canary (same host)


CLEAN = Disturbance()


@dataclass(frozen=True)
class Thresholds:
    canary_tolerance: float = 0.15  # slower than 1 + this is "slowed"
    max_foreign_cpu_share: float = 0.10
    max_steal_share: float = 0.05

    @classmethod
    def from_settings(cls, settings: Any) -> "Thresholds":
        return cls(canary_tolerance=getattr(settings, "canary_tolerance", cls.canary_tolerance),
                   max_foreign_cpu_share=getattr(settings, "max_foreign_cpu_share",
                                                 cls.max_foreign_cpu_share),
                   max_steal_share=getattr(settings, "max_steal_share", cls.max_steal_share))


def judge(slowdown: float, foreign: float, steal: float, gpu_processes: int, thresholds: Thresholds,
          vs_study: float = math.nan) -> Disturbance:
    """The window's flag and, in words, every threshold it passed."""
    reasons = []
    if not math.isnan(slowdown) and slowdown > 1.0 + thresholds.canary_tolerance:
        reasons.append(f"slowed {slowdown:.2f}x")
    elif not math.isnan(vs_study) and vs_study > 1.0 + thresholds.canary_tolerance:
        reasons.append(f"slowed {vs_study:.2f}x against the study's start")
    if not math.isnan(foreign) and foreign > thresholds.max_foreign_cpu_share:
        reasons.append(f"foreign CPU {foreign:.0%}")
    if not math.isnan(steal) and steal > thresholds.max_steal_share:
        reasons.append(f"steal {steal:.0%}")
    if gpu_processes > 0:
        reasons.append(f"{gpu_processes} foreign GPU process(es)")
    return Disturbance(slowdown, foreign, steal, gpu_processes, bool(reasons), "; ".join(reasons), vs_study)


# --------------------------------------------------------------------------------------------------
# The witnesses


def make_canary(device: str = "cpu", precision: str = "fp32") -> Callable[..., float] | None:
    """The machine-speed canary: seconds of one round of the probe's matmul (best of ``rounds``,
    default CANARY_ROUNDS, after two warm-up calls), on the job's device, in the kernel a precision
    runs: fp32 (the default; the study's start canary), bf16/fp16 (torch's linear in that dtype),
    w8a8 (this package's W8A8Linear: the activation quantization and int8 matmul). None for any other
    precision (bitsandbytes int8 and 4-bit: the caller passes "bf16" for nf4/fp4 where they run a bf16
    GEMM, phases/evaluation.canary_precision); their windows have the fp32 one only.

    A slow stretch does not slow every kernel alike: on the 2-core AMD EPYC VM, in one stretch the fp32
    canary read 1.17-1.22x, the w8a8 one 1.47-1.64x and the job's own w8a8 scoring 1.48-1.56x."""
    import torch

    m, k, n = CANARY_SHAPE
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        x = torch.randn(m, k, device=device)
        weight = torch.randn(n, k, device=device)
    if precision == "fp32":
        def call() -> Any:
            return torch.nn.functional.linear(x, weight)
    elif precision in ("bf16", "fp16"):
        dtype = torch.float16 if precision == "fp16" else torch.bfloat16
        x_low, weight_low = x.to(dtype), weight.to(dtype)

        def call() -> Any:
            return torch.nn.functional.linear(x_low, weight_low)
    elif precision == "w8a8":
        from ..models.quant8 import W8A8Linear

        layer = torch.nn.Linear(k, n, bias=False, device=device)
        with torch.no_grad():
            layer.weight.copy_(weight)
        quantized = W8A8Linear.from_linear(layer)

        def call() -> Any:
            return quantized(x)
    else:
        return None

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)

    def canary(rounds: int = CANARY_ROUNDS) -> float:
        best = math.inf
        with torch.inference_mode():
            for _ in range(2):  # warm caches and wake the threads
                call()
            sync()
            for _ in range(rounds):
                start = time.perf_counter()
                for _ in range(CANARY_CALLS):
                    call()
                sync()
                best = min(best, time.perf_counter() - start)
        return best

    return canary


RUNNER_ENV = "LLM_ENERGY_RUNNER"  # "host:pid" of the study's runner, set by `llm-energy run`


def runner_pid() -> int | None:
    """The study runner's process when it runs on this host (``LLM_ENERGY_RUNNER``): on SLURM the job
    is not its child, yet its Dask scheduler is the study's own harness, not a co-tenant."""
    host, _, pid = os.environ.get(RUNNER_ENV, "").rpartition(":")
    return int(pid) if pid.isdigit() and host == socket.gethostname() else None


def own_pids(pid: int | None = None) -> set[int]:
    """This job: the process, its descendants, and its ancestors (the harness that launched it:
    papermill, the runner, a Dask worker, slurmstepd), with the study's runner and its children when
    it runs on this host but did not launch the job (a SLURM job)."""
    import psutil

    pids: set[int] = set()
    roots = [pid or os.getpid()] + ([runner_pid()] if runner_pid() else [])
    for index, root in enumerate(roots):
        try:
            proc = psutil.Process(root)
        except psutil.Error:
            pids.add(root)
            continue
        pids.add(proc.pid)
        try:
            pids.update(p.pid for p in proc.children(recursive=True))
        except psutil.Error:
            pass
        if index == 0:
            try:
                pids.update(p.pid for p in proc.parents())
            except psutil.Error:
                pass
    return pids


def process_cpu_seconds() -> dict[int, float]:
    """CPU seconds (user + system) of every process the kernel lists."""
    import psutil

    out: dict[int, float] = {}
    for proc in psutil.process_iter(["cpu_times"]):
        times = proc.info.get("cpu_times")
        if times is not None:
            out[proc.pid] = float(times.user + times.system)
    return out


def read_proc_stat(path: Path = Path("/proc/stat")) -> tuple[float, float] | None:
    """(steal, total) jiffies of the machine's aggregate ``cpu`` line; None where there is none."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith("cpu "):
                values = [float(v) for v in line.split()[1:]]
                # user nice system idle iowait irq softirq steal [guest guest_nice: inside user/nice]
                return (values[7] if len(values) > 7 else 0.0), sum(values[:8])
    except (OSError, ValueError):
        pass
    return None


def read_busy_seconds(path: Path = Path("/proc/stat")) -> float | None:
    """The machine's user + nice + system CPU seconds (all CPUs) from ``/proc/stat``: what per-process
    accounting also counts (irq, softirq, steal and guest time are left out); None where unreadable."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith("cpu "):
                values = [float(v) for v in line.split()[1:4]]
                return sum(values) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        pass
    return None


def foreign_cpu_seconds(before: dict[int, float], after: dict[int, float], mine: set[int],
                        busy_before: float | None = None, busy_after: float | None = None) -> float:
    """Other processes' CPU seconds between two scans: each process not the job's that is alive at the
    second (all its time for one born since), plus the machine's busy time that no living process
    accounts for (a process that exited in between, the job's or not: none of the job's windows starts
    one), when the machine's busy seconds are given."""
    foreign = mine_s = 0.0
    for pid, seconds in after.items():
        delta = max(0.0, seconds - before.get(pid, 0.0))
        if pid in mine:
            mine_s += delta
        else:
            foreign += delta
    if busy_before is not None and busy_after is not None:
        foreign += max(0.0, (busy_after - busy_before) - mine_s - foreign)
    return foreign


def foreign_gpu_processes(nvml: Any, indices: Iterable[int], mine: set[int]) -> int:
    """Compute processes on the job's GPUs that are not the job's."""
    count = 0
    for index in indices:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle) or []:
            if int(proc.pid) not in mine:
                count += 1
    return count


# --------------------------------------------------------------------------------------------------
# The monitor


@dataclass
class _Start:
    canary_s: float
    cpu: dict[int, float]
    stat: tuple[float, float] | None
    clock: float
    precision_canary_s: float = math.nan  # the job's precision's canary (NaN: none)
    busy: float | None = None  # the machine's busy CPU seconds (read_busy_seconds; None: not read)


def _reference(canary: Callable[..., float]) -> float:
    try:
        return canary(REFERENCE_ROUNDS)
    except TypeError:  # a canary that takes no rounds (tests)
        return canary()


def _job_reference(key: str, canary: Callable[..., float], real: bool) -> float:
    """A canary's reference, read once per process and key for the real canaries (the job's system-idle
    meter and its main meter compare against one speed); an injected canary is read every time."""
    if real and key in _JOB_REFERENCE:
        return _JOB_REFERENCE[key]
    seconds = _reference(canary)
    if real:
        _JOB_REFERENCE[key] = seconds
    return seconds


class DisturbanceMonitor:
    """Reads the three witnesses around a window: ``begin()`` before the meter starts its sources,
    ``end(start)`` after they stop (so neither the canary nor the process scan is in the energy).

    The machine's speed is read by the fp32 canary and, for a job at another precision, by a canary in
    that precision's kernel too (:func:`make_canary`); ``canary_slowdown`` is the larger of the two
    slowdowns. Every reader is injectable (tests plant a slow canary or a co-tenant).
    ``study_canary_s`` is the fp32 canary's time when the study started, used only on the host that
    measured it."""

    def __init__(self, thresholds: Thresholds, device: str = "cpu",
                 canary: Callable[[], float] | None = None,
                 cpu_seconds: Callable[[], dict[int, float]] = process_cpu_seconds,
                 mine: Callable[[], set[int]] = own_pids,
                 proc_stat: Callable[[], tuple[float, float] | None] = read_proc_stat,
                 cpu_count: int | None = None,
                 nvml: Any = None, gpu_indices: Iterable[int] = (),
                 clock: Callable[[], float] = time.perf_counter,
                 study_canary_s: float | None = None,
                 precision: str = "fp32",
                 precision_canary: Callable[[], float] | None = None,
                 sustained: dict[str, float] | None = None,
                 machine_busy: Callable[[], float | None] | None = None):
        self.thresholds = thresholds
        # the machine's busy seconds go with the real per-process accounting (a planted one has no
        # machine behind it); an injected reader is used as given
        if machine_busy is None and cpu_seconds is process_cpu_seconds:
            machine_busy = read_busy_seconds
        self.machine_busy: Callable[[], float | None] = machine_busy or (lambda: None)
        real = canary is None
        self.canary = canary if canary is not None else make_canary(device)
        if precision_canary is None and real and precision != "fp32":
            precision_canary = make_canary(device, precision)
        self.precision_canary = precision_canary
        self.precision = precision
        self.cpu_seconds, self.mine, self.proc_stat = cpu_seconds, mine, proc_stat
        self.cpu_count = cpu_count or os.cpu_count() or 1
        self.nvml, self.gpu_indices = nvml, list(gpu_indices)
        self.clock = clock
        self.job_canary_s = _job_reference(device, self.canary, real)
        self.job_precision_canary_s = (_job_reference(f"{device}:{precision}", self.precision_canary, real)
                                       if self.precision_canary is not None else math.nan)
        # the machine's speed under sustained load (the study's start, same host): a window is compared
        # with the slower of the job's reference and it, so the host's boost clock is not a disturbance
        sustained = sustained or {}
        self.job_reference_disturbed = False
        if sustained.get("fp32"):
            self.job_canary_s = self._against_sustained(self.job_canary_s, sustained["fp32"])
        if self.precision_canary is not None and sustained.get(precision):
            self.job_precision_canary_s = self._against_sustained(self.job_precision_canary_s,
                                                                  sustained[precision])
        self.study_canary_s = study_canary_s
        # (clock, fp32 canary seconds, precision canary seconds) of the last end()
        self._last_end: tuple[float, float, float] | None = None

    def _against_sustained(self, own: float, sustained: float) -> float:
        """The job's reference given the machine's sustained speed: the slower of the two (the host's
        boost clock is not a disturbance), unless the job's own reading is slower than the sustained
        one beyond the tolerance: then the job started inside a disturbance (a neighbour at its start
        read 5x), which must not become the speed its windows are held to, and the sustained speed is."""
        if own > sustained * (1.0 + self.thresholds.canary_tolerance):
            self.job_reference_disturbed = True
            log.warning("the job's canary read %.2fx the machine's sustained speed when it started: it "
                        "started inside a disturbance; its windows are compared with the sustained speed",
                        own / sustained)
            return sustained
        return max(own, sustained)

    def _read_canaries(self) -> tuple[float, float]:
        precision_s = self.precision_canary() if self.precision_canary is not None else math.nan
        return self.canary(), precision_s

    def _slowdown(self, canary_s: float, precision_s: float) -> float:
        """The larger of the fp32 canary's and the precision canary's slowdowns against the job's start."""
        slowdown = canary_s / self.job_canary_s
        if not math.isnan(precision_s) and self.job_precision_canary_s > 0:
            slowdown = max(slowdown, precision_s / self.job_precision_canary_s)
        return slowdown

    def begin(self) -> _Start:
        last = self._last_end
        if last is not None and self.clock() - last[0] <= ADJACENT_S:
            # the previous window closed just now: its closing canaries are this one's opening ones
            canary_s, precision_s = last[1], last[2]
        else:
            canary_s, precision_s = self._read_canaries()
        return _Start(canary_s, self.cpu_seconds(), self.proc_stat(), self.clock(), precision_s,
                      self.machine_busy())

    def wait_until_clear(self, timeout_s: float, sleep: Callable[[float], None] = time.sleep,
                         poll_s: float = SETTLE_POLL_S) -> float | None:
        """After a contaminated window, before it is measured again: poll the machine until the canaries
        are back within tolerance (against the job's and the study's start) and other processes and the
        hypervisor are under their shares again, for at most ``timeout_s``. The seconds waited when it
        cleared; None when it did not (a slow stretch lasting longer: measuring the window again inside
        it would only repeat the flag)."""
        began = self.clock()
        tolerance = 1.0 + self.thresholds.canary_tolerance
        while True:
            cpu_before, stat_before, t0 = self.cpu_seconds(), self.proc_stat(), self.clock()
            busy_before = self.machine_busy()
            sleep(poll_s)
            mine = self.mine()
            wall = self.clock() - t0
            cpu_after, stat_after = self.cpu_seconds(), self.proc_stat()
            foreign_s = foreign_cpu_seconds(cpu_before, cpu_after, mine, busy_before, self.machine_busy())
            foreign = foreign_s / (wall * self.cpu_count) if wall > 0 else 0.0
            steal = 0.0
            if stat_before is not None and stat_after is not None and stat_after[1] > stat_before[1]:
                steal = (stat_after[0] - stat_before[0]) / (stat_after[1] - stat_before[1])
            canary_s, precision_s = self._read_canaries()
            slow = self._slowdown(canary_s, precision_s)
            vs_study = canary_s / self.study_canary_s if self.study_canary_s else 1.0
            if (slow <= tolerance and vs_study <= tolerance
                    and foreign <= self.thresholds.max_foreign_cpu_share
                    and steal <= self.thresholds.max_steal_share):
                self._last_end = (self.clock(), canary_s, precision_s)
                return self.clock() - began
            if self.clock() - began >= timeout_s:
                return None

    def end(self, start: _Start) -> Disturbance:
        wall = self.clock() - start.clock
        cpu_after = self.cpu_seconds()
        busy_after = self.machine_busy()
        stat_after = self.proc_stat()
        mine = self.mine()
        foreign_s = foreign_cpu_seconds(start.cpu, cpu_after, mine, start.busy, busy_after)
        foreign = foreign_s / (wall * self.cpu_count) if wall > 0 else math.nan
        steal = math.nan
        if start.stat is not None and stat_after is not None:
            total = stat_after[1] - start.stat[1]
            steal = (stat_after[0] - start.stat[0]) / total if total > 0 else 0.0
        gpu = 0
        if self.nvml is not None and self.gpu_indices:
            try:
                gpu = foreign_gpu_processes(self.nvml, self.gpu_indices, mine)
            except Exception:  # noqa: BLE001  (an NVML without process listing: not read)
                gpu = 0
        closing, closing_precision = self._read_canaries()
        self._last_end = (self.clock(), closing, closing_precision)
        fastest = min(start.canary_s, closing)
        fastest_precision = (min(start.precision_canary_s, closing_precision)
                             if not math.isnan(closing_precision) else math.nan)
        vs_study = fastest / self.study_canary_s if self.study_canary_s else math.nan
        return judge(self._slowdown(fastest, fastest_precision), min(foreign, 1.0), steal, gpu,
                     self.thresholds, vs_study)


def study_canary_path(study_dir: Path) -> Path:
    return Path(study_dir) / "state" / "canary.json"


def sustained_canaries(device: str, kernels: Iterable[str], burn_s: float = SUSTAINED_BURN_S,
                       clock: Callable[[], float] = time.perf_counter,
                       busy: Callable[[], bool] | None = None) -> dict[str, float]:
    """Each canary kernel's time (best of REFERENCE_ROUNDS) once the machine has run them back to back
    for ``burn_s``: its speed under sustained load, the state a study's windows run in. A VM or a
    laptop can run faster for the first seconds of load (a boost clock the host takes away): on the
    2-core AMD EPYC VM a canary run back to back read 0.99x for 4-22 s, then 1.18-1.21x until the
    machine idled ~10 s. A job's own reference, read after its idle window, has the boosted clock;
    its windows are compared with the slower of the two (:class:`DisturbanceMonitor`), so the machine's
    own sustained clock is not a disturbance, and a neighbour or a slow host still is.

    ``busy()``: True while other work of the study's own runs beside the burn (the warm kernel server's
    imports, :meth:`..runner.warm_kernels.WarmKernels.begin`); the burn lasts at least until it is
    False, then ``AFTER_BUSY_S`` more on its own, so the times read at its end see the machine alone."""
    canaries = {"fp32": make_canary(device)}
    for kernel in kernels:
        if kernel not in canaries:
            made = make_canary(device, kernel)
            if made is not None:
                canaries[kernel] = made
    start = clock()
    alone_since = None if busy is not None else start
    while True:
        now = clock()
        if alone_since is None and not busy():  # type: ignore[misc]
            alone_since = now
        if alone_since is not None and now - start >= burn_s and now - alone_since >= AFTER_BUSY_S:
            break
        for canary in canaries.values():
            canary(1)
    return {kernel: canary(REFERENCE_ROUNDS) for kernel, canary in canaries.items()}


def write_study_canary(study_dir: Path, seconds: float, sustained: dict[str, float] | None = None) -> None:
    """The canary's time at the study's start, with the host that measured it, and each canary
    kernel's time under sustained load (:func:`sustained_canaries`) when measured."""
    import json

    path = study_canary_path(study_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"seconds": seconds, "host": socket.gethostname(), "sustained": sustained or {}}
    path.write_text(json.dumps(record))


def read_sustained_canaries(study_dir: Path | None) -> dict[str, float]:
    """The study's sustained-load canary times per kernel when measured on this host; empty otherwise."""
    import json

    if study_dir is None:
        return {}
    try:
        data = json.loads(study_canary_path(study_dir).read_text())
    except (OSError, ValueError):
        return {}
    if data.get("host") != socket.gethostname():
        return {}
    return {str(k): float(v) for k, v in (data.get("sustained") or {}).items() if v}


def read_study_canary(study_dir: Path | None) -> float | None:
    """The study's start canary when it was measured on this host; None otherwise."""
    import json

    if study_dir is None:
        return None
    try:
        data = json.loads(study_canary_path(study_dir).read_text())
    except (OSError, ValueError):
        return None
    if data.get("host") != socket.gethostname():
        return None  # another node's speed says nothing about this one
    seconds = data.get("seconds")
    return float(seconds) if seconds else None
