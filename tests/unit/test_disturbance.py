"""Disturbed windows: machine-speed canary, co-tenants, steal, idle drift, the re-measure stage.

The tests marked ``quiet`` plant a real CPU load beside a real window (and measure the same window
alone), so they need the machine to themselves: tools/parallel_tests.py runs them after both groups,
alone."""

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace

import pandas as pd
import pytest

from llm_energy.config import EnergySettings
from llm_energy.measure.disturbance import (
    DisturbanceMonitor,
    Thresholds,
    foreign_cpu_seconds,
    judge,
    make_canary,
    own_pids,
    read_proc_stat,
    read_study_canary,
    write_study_canary,
)
from llm_energy.measure.meter import ComponentReading, EnergyMeter, RepeatedMeasurement
from llm_energy.runner.jobs import Job
from llm_energy.runner.study import remeasure_candidates


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


@dataclass
class PowerSource:
    """A CPU estimate at a power the test sets, over the fake clock."""

    clock: FakeClock
    power_w: float = 10.0
    name: str = "codecarbon"

    def begin(self, window):
        self.t0 = self.clock.now

    def end(self):
        return {"cpu": ComponentReading(self.power_w * (self.clock.now - self.t0), "codecarbon:cpu_load")}

    def close(self):
        pass


def fake_monitor(clock, canary_times, foreign=None, steal=None, **kw):
    """A monitor whose canary returns the given times in turn (the last one repeats), whose process
    accounting and /proc/stat advance as the test says per window."""
    times = list(canary_times)
    state = {"cpu": 0.0, "steal": 0.0, "total": 0.0}

    def canary():
        return times.pop(0) if len(times) > 1 else times[0]

    def cpu_seconds():
        return {999_999: state["cpu"]}

    def proc_stat():
        return state["steal"], state["total"]

    monitor = DisturbanceMonitor(Thresholds(), canary=canary, cpu_seconds=cpu_seconds,
                                 mine=lambda: {os.getpid()}, proc_stat=proc_stat, cpu_count=2, clock=clock,
                                 **kw)
    return monitor, state


def meter_with(clock, monitor, **settings):
    values = dict(idle_seconds=1.0, repeats=1, max_repeats=3, carbon_intensity_g_per_kwh=100.0,
                  min_window_s=0.0)
    values.update(settings)
    return EnergyMeter(EnergySettings(**values), device="cpu", sources=[PowerSource(clock)], clock=clock,
                       sleep=clock.sleep, synchronize=lambda: None, monitor=monitor)


def test_judge_names_every_threshold_passed():
    clean = judge(1.05, 0.02, 0.0, 0, Thresholds())
    assert not clean.contaminated and clean.reasons == ""
    bad = judge(1.5, 0.4, 0.2, 1, Thresholds())
    assert bad.contaminated
    assert bad.reasons == "slowed 1.50x; foreign CPU 40%; steal 20%; 1 foreign GPU process(es)"


def test_a_slowed_canary_marks_the_window_slowed_with_its_factor_and_flag_only_keeps_it():
    clock = FakeClock()
    # job start 10 ms; before the window 15 ms, after it 15 ms: 1.5x slower
    monitor, _ = fake_monitor(clock, [0.010, 0.015, 0.015])
    meter = meter_with(clock, monitor, on_contaminated="flag")
    _, record = meter.measure_clean(lambda: clock.sleep(2.0), "w")
    assert record.contaminated and record.attempts == 1
    assert record.canary_slowdown == pytest.approx(1.5)
    assert "slowed 1.50x" in record.disturbance


def test_a_contaminated_window_is_measured_again_and_the_clean_one_kept():
    clock = FakeClock()
    # first attempt slowed (before 0.014, after 0.016), the second as fast as at the start
    monitor, _ = fake_monitor(clock, [0.010, 0.014, 0.016, 0.010, 0.010])
    meter = meter_with(clock, monitor, on_contaminated="remeasure")
    _, record = meter.measure_clean(lambda: clock.sleep(2.0), "w")
    assert not record.contaminated and record.attempts == 2
    assert record.canary_slowdown == pytest.approx(1.0)


def test_a_job_that_started_in_a_slow_stretch_is_caught_against_the_study_start():
    clock = FakeClock()
    monitor, _ = fake_monitor(clock, [0.020, 0.020, 0.020], study_canary_s=0.010)
    meter = meter_with(clock, monitor, on_contaminated="flag")
    _, record = meter.measure_clean(lambda: clock.sleep(1.0), "w")
    assert record.canary_slowdown == pytest.approx(1.0)  # as fast as when its meter opened...
    assert record.canary_vs_study == pytest.approx(2.0)  # ...but twice as slow as at the study's start
    assert record.contaminated and "against the study's start" in record.disturbance


def test_a_contaminated_window_is_measured_at_most_window_attempts_times():
    clock = FakeClock()
    monitor, _ = fake_monitor(clock, [0.010, 0.020])  # slowed 2x for good: a slow stretch
    meter = meter_with(clock, monitor, on_contaminated="remeasure", max_repeats=5, window_attempts=2,
                       settle_s=0)
    _, record = meter.measure_clean(lambda: clock.sleep(1.0), "w")
    assert record.attempts == 2 and record.contaminated  # kept with its flag for the re-measure stage


def test_a_window_is_measured_again_only_once_the_machine_is_back_to_speed():
    clock = FakeClock()
    # reference 10 ms; the window slowed (20 ms both edges); the machine polled: 20, 20, then 10 ms
    monitor, _ = fake_monitor(clock, [0.010, 0.020, 0.020, 0.020, 0.020, 0.010, 0.010])
    meter = meter_with(clock, monitor, on_contaminated="remeasure", window_attempts=2, settle_s=4.0)
    start = clock.now
    _, record = meter.measure_clean(lambda: clock.sleep(1.0), "w")
    assert record.attempts == 2 and not record.contaminated
    # two windows of 1 s and three polls of 0.25 s between them
    assert clock.now - start == pytest.approx(2.0 + 3 * 0.25)


def test_a_slow_stretch_that_outlasts_the_wait_is_measured_again_and_later_windows_do_not_wait():
    clock = FakeClock()
    monitor, _ = fake_monitor(clock, [0.010, 0.020])  # slowed 2x for good
    meter = meter_with(clock, monitor, on_contaminated="remeasure", max_repeats=5, window_attempts=2,
                       settle_s=2.0)
    start = clock.now
    _, first = meter.measure_clean(lambda: clock.sleep(1.0), "w1")
    assert first.attempts == 2 and first.contaminated and meter.long_stretch
    # the window, the wait (8 polls), the window again
    assert clock.now - start == pytest.approx(1.0 + 2.0 + 1.0)
    start = clock.now
    _, second = meter.measure_clean(lambda: clock.sleep(1.0), "w2")
    assert second.attempts == 2 and second.contaminated and clock.now - start == pytest.approx(2.0)  # no wait


def test_the_wait_also_waits_for_co_tenants_to_leave():
    clock = FakeClock()
    monitor, state = fake_monitor(clock, [0.010])

    def neighbour_then_quiet():
        clock.sleep(1.0)
        state["cpu"] += 1.5  # another process took 75% of 2 CPUs during the window

    meter = meter_with(clock, monitor, on_contaminated="remeasure", window_attempts=2, settle_s=4.0)
    calls = []

    def workload():
        calls.append(clock.now)
        if len(calls) == 1:
            neighbour_then_quiet()
        else:
            clock.sleep(1.0)

    _, record = meter.measure_clean(workload, "w")
    assert record.attempts == 2 and not record.contaminated


def test_a_blip_at_one_edge_of_the_window_is_not_a_slowdown():
    clock = FakeClock()
    # before: as fast as at the start; after: a thread waking up, 3x slower for one reading
    monitor, _ = fake_monitor(clock, [0.010, 0.010, 0.030, 0.010])
    _, record = meter_with(clock, monitor, on_contaminated="flag").measure_clean(
        lambda: clock.sleep(1.0), "w")
    assert record.canary_slowdown == pytest.approx(1.0) and not record.contaminated


def test_foreign_cpu_share_and_steal_share_are_shares_of_the_machines_cpu_time():
    clock = FakeClock()
    monitor, state = fake_monitor(clock, [0.010])
    meter = meter_with(clock, monitor, on_contaminated="flag")

    def busy_neighbour():
        clock.sleep(4.0)  # 4 s of wall time on 2 cores: 8 CPU-seconds
        state["cpu"] += 2.0  # a foreign process ran 2 of them: 25%
        state["steal"] += 40.0  # of 400 jiffies of the machine: 10%
        state["total"] += 400.0

    _, record = meter.measure_clean(busy_neighbour, "w")
    assert record.foreign_cpu_share == pytest.approx(0.25)
    assert record.steal_share == pytest.approx(0.10)
    assert (record.contaminated and "foreign CPU 25%" in record.disturbance
            and "steal 10%" in record.disturbance)


def test_foreign_gpu_processes_come_from_nvml_on_the_jobs_gpu():
    class Nvml:
        def nvmlDeviceGetHandleByIndex(self, i):
            return i

        def nvmlDeviceGetComputeRunningProcesses(self, handle):
            return [SimpleNamespace(pid=os.getpid()), SimpleNamespace(pid=424242)] if handle == 1 else []

    clock = FakeClock()
    monitor, _ = fake_monitor(clock, [0.010], nvml=Nvml(), gpu_indices=[1])
    _, record = meter_with(clock, monitor, on_contaminated="flag").measure_clean(
        lambda: clock.sleep(1.0), "w")
    assert record.foreign_gpu_processes == 1 and record.contaminated


def test_repeated_and_chunked_measurements_report_their_flags():
    clock = FakeClock()
    monitor, _ = fake_monitor(clock, [0.010])
    meter = meter_with(clock, monitor, windows=3)
    durations = iter([1.0, 1.0, 2.0])
    measurement = meter.measure_chunks([lambda: clock.sleep(next(durations))] * 3, [4, 4, 4], "w")
    assert measurement.contaminated_windows == 0 and measurement.remeasured_windows == 0
    # the third window ran at half the others' rate: a rate outlier (evidence, not a re-measure)
    assert measurement.rate_vs_median() == pytest.approx([1.0, 1.0, 0.5])
    assert measurement.rate_outliers() == [False, False, True]
    assert measurement.worst("canary_slowdown") == pytest.approx(1.0)


def test_rate_outliers_need_three_windows():
    records = tuple(SimpleNamespace(duration_s=d) for d in (1.0, 3.0))
    assert (RepeatedMeasurement(records, None, unit="chunk", window_items=(2, 2)).rate_outliers()
            == [False, False])


def test_idle_drift_is_the_change_of_loaded_idle_after_the_windows():
    clock = FakeClock()
    meter = EnergyMeter(EnergySettings(idle_seconds=2.0, carbon_intensity_g_per_kwh=1.0), device="cpu",
                        sources=[source := PowerSource(clock, power_w=10.0)], clock=clock, sleep=clock.sleep,
                        synchronize=lambda: None)
    meter.measure_idle_baseline(kind="loaded")
    source.power_w = 12.5
    after, drift = meter.measure_idle_drift()
    assert after.kind == "loaded_after" and after.power_w == pytest.approx(12.5)
    assert drift == pytest.approx(0.25)
    assert meter.idle.power_w == pytest.approx(10.0)  # net energy keeps the baseline measured before


def test_idle_drift_is_flagged_in_idle_baselines(tmp_path):
    from llm_energy.measure.meter import IdleBaseline
    from llm_energy.tables import store
    from llm_energy.tables.rows import record_idle_baselines

    record_idle_baselines(tmp_path, "c", "inference", "cpu", IdleBaseline(12.5, 2.0, "m", "loaded_after"),
                          drift=0.25, max_drift=0.10)
    record_idle_baselines(tmp_path, "d", "inference", "cpu", IdleBaseline(10.2, 2.0, "m", "loaded_after"),
                          drift=0.02, max_drift=0.10)
    rows = store.read_table(tmp_path, "idle_baselines").set_index("config_id")
    assert bool(rows.loc["c", "drifted"]) and not bool(rows.loc["d", "drifted"])
    assert rows.loc["c", "idle_drift"] == pytest.approx(0.25)


def test_the_study_canary_counts_only_on_its_own_host(tmp_path, monkeypatch):
    write_study_canary(tmp_path, 0.012)
    assert read_study_canary(tmp_path) == pytest.approx(0.012)
    monkeypatch.setattr("socket.gethostname", lambda: "another-node")
    assert read_study_canary(tmp_path) is None


def test_proc_stat_steal_is_read():
    stat = read_proc_stat()
    if stat is None:
        pytest.skip("no /proc/stat here")
    steal, total = stat
    assert 0 <= steal <= total


def test_remeasure_candidates_map_flagged_configs_to_their_jobs():
    energy = pd.DataFrame(
        {"config_id": ["a__fp32", "a__fp32", "a__bf16", "a__fp32__wanda", "a__fp32__wanda__recovered"],
         "task": ["rca", "qa", "rca", "rca", "rca"], "contaminated_windows": [0, 2, 0, 0, 1]})
    jobs = [Job("inference", "a__fp32", {}), Job("inference", "a__bf16", {}),
            Job("pruning", "a__fp32__wanda", {}), Job("finetune", "a__fp32", {})]
    assert remeasure_candidates(energy, jobs) == {"inference__a__fp32": ["a__fp32"],
                                                  "pruning__a__fp32__wanda": ["a__fp32__wanda__recovered"]}
    assert remeasure_candidates(energy.drop(columns="contaminated_windows"), jobs) == {}


# --------------------------------------------------------------------------------------------------
# A real co-tenant beside a real window


SPIN = "import time\nend = time.time() + 60\nwhile time.time() < end:\n    pass\n"


def start_cotenant():
    """A process spinning one core that is not this job's: started through a shell that exits at once,
    so the spinner is re-parented away from the test process (as another user's process would be)."""
    out = subprocess.run(["sh", "-c", f'"{sys.executable}" -c "$0" >/dev/null 2>&1 & echo $!', SPIN],
                         capture_output=True, text=True, check=True)
    pid = int(out.stdout.strip())
    time.sleep(0.3)
    assert pid not in own_pids()
    return pid


def real_meter(**settings):
    """A meter with the real witnesses. The canary's tolerance is wide here: these tests are about a
    co-tenant, and a VM's own speed strays by up to ~1.25x over minutes with nothing else running (the
    canary's thresholds are tested above with a fake canary)."""
    values = dict(repeats=1, max_repeats=2, carbon_intensity_g_per_kwh=100.0, min_window_s=0.0,
                  on_contaminated="remeasure", canary_tolerance=1.0)
    values.update(settings)
    clock = FakeClock()
    return EnergyMeter(EnergySettings(**values), device="cpu", sources=[PowerSource(clock)],
                       synchronize=lambda: None,
                       monitor=DisturbanceMonitor(Thresholds.from_settings(EnergySettings(**values))))


def workload(seconds: float = 1.0):
    import torch

    a = torch.randn(384, 384)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        a @ a


@pytest.mark.quiet
def test_a_window_beside_a_planted_cpu_load_is_contaminated_measured_again_and_flagged():
    pid = start_cotenant()
    try:
        # the neighbour stays: the wait runs out, the window is measured again
        meter = real_meter(settle_s=1.0)
        measurement = meter.measure_repeated(workload, "beside-a-load")
    finally:
        os.kill(pid, signal.SIGKILL)
    record = measurement.records[0]
    assert record.contaminated, record
    # the neighbour spins one of two cores while the workload's two threads compete with it: its share
    # was 0.29-0.5 of the machine's CPU time across runs, always well past the 0.10 threshold
    assert record.foreign_cpu_share > 2 * meter.monitor.thresholds.max_foreign_cpu_share
    assert record.attempts == 2 and measurement.remeasured_windows == 1  # measured again, then kept flagged
    assert meter.long_stretch
    assert measurement.contaminated_windows == 1


@pytest.mark.quiet
def test_the_same_window_alone_is_clean():
    meter = real_meter()
    measurement = meter.measure_repeated(workload, "alone")
    record = measurement.records[0]
    assert not record.contaminated, record.disturbance
    assert record.attempts == 1
    assert record.foreign_cpu_share < 0.10 and not math.isnan(record.canary_slowdown)
    assert record.canary_slowdown < 2.0  # and the machine not twice as slow as when the meter opened


def test_the_remeasure_stage_runs_a_flagged_job_again_once_per_study(tmp_path):
    from llm_energy.layout import StudyLayout
    from llm_energy.runner.study import StudyOutcome, _remeasure_stage
    from llm_energy.tables import store

    layout = StudyLayout(tmp_path)
    layout.state.mkdir(parents=True)
    path = store.table_path(tmp_path, "energy")
    path.parent.mkdir(parents=True)
    pd.DataFrame({"config_id": ["m__fp32", "m__bf16"], "phase": "inference", "task": "qa",
                  "contaminated_windows": [1, 0]}).to_csv(path, index=False)
    energy = SimpleNamespace(on_contaminated="remeasure", detect_disturbance=True)
    run = SimpleNamespace(study=SimpleNamespace(energy=energy), layout=layout,
                          outcome=StudyOutcome(out_dir=tmp_path))
    jobs = [Job("inference", "m__fp32", {}), Job("inference", "m__bf16", {})]
    assert [j.key for j in _remeasure_stage(run, jobs)] == ["inference__m__fp32"]
    assert run.outcome.remeasured == ["inference__m__fp32"]
    assert _remeasure_stage(run, jobs) == []  # still flagged after its second run: it stands, flags included
    energy.on_contaminated = "flag"
    (layout.state / "remeasured.json").unlink()
    assert _remeasure_stage(run, jobs) == []


def test_ranking_excludes_contaminated_configs_when_asked():
    from llm_energy.phases.ranking import contaminated_configs

    energy = pd.DataFrame({"config_id": ["a", "a", "b"], "phase": ["inference", "inference", "inference"],
                           "contaminated_windows": [0, 1, 0]})
    assert contaminated_configs(energy) == {"a"}
    assert contaminated_configs(energy.drop(columns="contaminated_windows")) == set()


def test_the_study_runner_on_this_host_is_not_a_cotenant(monkeypatch):
    import socket

    from llm_energy.measure.disturbance import RUNNER_ENV

    pid = start_cotenant()  # stands for a runner that did not launch this job (a SLURM job's driver)
    try:
        assert pid not in own_pids()
        monkeypatch.setenv(RUNNER_ENV, f"{socket.gethostname()}:{pid}")
        assert pid in own_pids()
        monkeypatch.setenv(RUNNER_ENV, f"another-node:{pid}")
        assert pid not in own_pids()
    finally:
        os.kill(pid, signal.SIGKILL)


def test_a_slowdown_only_the_jobs_precision_feels_flags_the_window():
    clock = FakeClock()
    # fp32 canary as fast as at the start; the w8a8 canary 1.5x slower at both edges of the window
    w8a8 = iter([0.020, 0.030, 0.030])
    monitor, _ = fake_monitor(clock, [0.010], precision="w8a8", precision_canary=lambda: next(w8a8))
    meter = meter_with(clock, monitor, on_contaminated="flag")
    _, record = meter.measure_clean(lambda: clock.sleep(1.0), "w")
    assert record.contaminated and record.canary_slowdown == pytest.approx(1.5)
    assert "slowed 1.50x" in record.disturbance


def test_the_precision_canary_runs_that_precisions_kernel():
    for precision in ("fp32", "bf16", "w8a8"):
        canary = make_canary("cpu", precision)
        assert canary is not None and 0 < canary(1) < 5.0, precision
    assert make_canary("cpu", "int8") is None  # bitsandbytes int8: the fp32 canary alone


def test_nf4_and_fp4_canaries_time_the_gemm_they_run():
    from llm_energy.models.fourbit import canary_precision, native_bf16_cpu

    assert canary_precision("nf4", "cpu") == ("bf16" if native_bf16_cpu() else "nf4")
    assert canary_precision("nf4", "cuda:0") == "nf4" and canary_precision("w8a8", "cpu") == "w8a8"


def test_windows_are_compared_with_the_machines_sustained_speed_not_its_boost():
    clock = FakeClock()
    # the job's reference read at a boosted 10 ms; under sustained load the study measured 12 ms
    monitor, _ = fake_monitor(clock, [0.010, 0.0125, 0.0125], sustained={"fp32": 0.012})
    meter = meter_with(clock, monitor, on_contaminated="flag")
    _, record = meter.measure_clean(lambda: clock.sleep(1.0), "w")
    assert not record.contaminated and record.canary_slowdown == pytest.approx(0.0125 / 0.012)
    # a neighbour or a slow host still shows: 1.5x the sustained speed
    monitor, _ = fake_monitor(clock, [0.010, 0.018, 0.018], sustained={"fp32": 0.012})
    meter = meter_with(clock, monitor, on_contaminated="flag")
    _, record = meter.measure_clean(lambda: clock.sleep(1.0), "w")
    assert record.contaminated and record.canary_slowdown == pytest.approx(1.5)


def test_a_job_that_started_inside_a_disturbance_is_held_to_the_sustained_speed_not_its_own():
    """Measured by hand: a neighbour spinning a core while a job started made its own reference 5x
    slow, and with the slower-of-the-two rule its later windows read 0.19x: any slowdown under 5x hid.
    A job reference beyond the tolerance of the sustained speed is a disturbed one: the sustained
    speed is the reference."""
    clock = FakeClock()
    monitor, _ = fake_monitor(clock, [0.050, 0.020, 0.020], sustained={"fp32": 0.012})
    assert monitor.job_reference_disturbed and monitor.job_canary_s == pytest.approx(0.012)
    meter = meter_with(clock, monitor, on_contaminated="flag")
    _, record = meter.measure_clean(lambda: clock.sleep(1.0), "w")
    assert record.contaminated and record.canary_slowdown == pytest.approx(0.020 / 0.012)
    # within the tolerance of the sustained speed, the slower of the two stands (the boost-clock rule)
    monitor, _ = fake_monitor(clock, [0.013, 0.013], sustained={"fp32": 0.012})
    assert not monitor.job_reference_disturbed and monitor.job_canary_s == pytest.approx(0.013)


def test_foreign_cpu_counts_a_process_that_exited_in_between_from_the_machines_busy_time():
    before, after, mine = {1: 10.0, 2: 5.0, 3: 7.0}, {1: 12.0, 2: 5.5}, {1}
    # pid 3 left: without the machine's busy time only pid 2's half second is seen
    assert foreign_cpu_seconds(before, after, mine) == pytest.approx(0.5)
    # the machine was busy 4.0 s: 2.0 mine, 0.5 pid 2, 1.5 nobody alive accounts for (pid 3's)
    assert foreign_cpu_seconds(before, after, mine, 100.0, 104.0) == pytest.approx(2.0)
    # busy time that the living processes account for entirely adds nothing
    assert foreign_cpu_seconds(before, after, mine, 100.0, 102.4) == pytest.approx(0.5)


def spin_for(seconds: float) -> int:
    """A neighbour that spins one core for ``seconds`` and exits, reaped at once by its own parent (a
    shell not this job's, which then idles): once reaped, its CPU time is in no living process's own
    times. Returns the shell's pid."""
    code = f"import time\nend = time.time() + {seconds}\nwhile time.time() < end:\n    pass\n"
    script = """sh -c '"$PYEXE" -c "$SPIN_CODE"; sleep 5' >/dev/null 2>&1 & echo $!"""
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYEXE": sys.executable, "SPIN_CODE": code})
    pid = int(out.stdout.strip())
    assert pid not in own_pids()
    return pid


@pytest.mark.quiet
def test_a_cotenant_that_leaves_during_the_window_is_still_seen():
    """A neighbour spinning a core that exits halfway through the window: its CPU time leaves the
    per-process accounting with it, the machine's busy time keeps it."""
    pid = spin_for(1.5)  # Python's start (~0.1 s), then 1.5 s of spinning: it leaves inside a 2 s window
    time.sleep(0.2)
    try:
        meter = real_meter(on_contaminated="flag")
        measurement = meter.measure_repeated(lambda: workload(2.0), "a-neighbour-leaves")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    record = measurement.records[0]
    # (by the per-process accounting alone this window read 0.0% foreign: measured by hand)
    assert record.contaminated and record.foreign_cpu_share > 0.10, record


def test_the_study_records_each_kernels_sustained_canary_for_its_host(tmp_path, monkeypatch):
    from llm_energy.measure.disturbance import read_sustained_canaries, sustained_canaries

    times = sustained_canaries("cpu", ["w8a8", "bf16", "int8"], burn_s=0.05)
    assert set(times) == {"fp32", "w8a8", "bf16"} and all(t > 0 for t in times.values())
    write_study_canary(tmp_path, times["fp32"], times)
    assert read_sustained_canaries(tmp_path) == pytest.approx(times)
    monkeypatch.setattr("socket.gethostname", lambda: "another-node")
    assert read_sustained_canaries(tmp_path) == {}


def test_the_burn_outlasts_the_studys_own_work_beside_it(monkeypatch):
    """The warm kernel server imports beside the burn: the burn lasts burn_s, and at least until the
    server has settled, then AFTER_BUSY_S on its own, before the canaries are read."""
    from llm_energy.measure import disturbance

    now = [0.0]
    rounds: list[tuple[float, int]] = []  # (time, rounds) of every canary call

    def fake_canary(device, precision="fp32"):
        def canary(rounds_: int = 1) -> float:
            rounds.append((now[0], rounds_))
            now[0] += 0.5
            return 0.01
        return canary

    monkeypatch.setattr(disturbance, "make_canary", fake_canary)
    disturbance.sustained_canaries("cpu", [], burn_s=10.0, clock=lambda: now[0])
    assert max(t for t, r in rounds if r == 1) < 10.0 <= rounds[-1][0]  # burn_s alone, as before
    rounds.clear()
    now[0] = 0.0
    disturbance.sustained_canaries("cpu", [], burn_s=10.0, clock=lambda: now[0], busy=lambda: now[0] < 3.0)
    assert rounds[-1][0] >= 10.0 and max(t for t, r in rounds if r == 1) < 10.0  # busy ended early: burn_s
    rounds.clear()
    now[0] = 0.0
    disturbance.sustained_canaries("cpu", [], burn_s=10.0, clock=lambda: now[0], busy=lambda: now[0] < 30.0)
    assert rounds[-1][0] >= 30.0 + disturbance.AFTER_BUSY_S  # busy past burn_s: then AFTER_BUSY_S alone
    assert rounds[-1][1] == disturbance.REFERENCE_ROUNDS


def test_a_job_run_again_keeps_its_first_runs_seconds_in_its_done_marker(tmp_path):
    """The re-measure stage's second run replaces the done marker's seconds but keeps the first run's
    (`earlier_runs_s`): the calibration leaves them out of the runner's own time. A job run again on a
    later invocation (the ranking on every resume) keeps nothing from before."""
    from llm_energy.layout import StudyLayout, done_seconds
    from llm_energy.runner.study import StudyOutcome, _Run

    layout = StudyLayout(tmp_path)
    layout.state.mkdir(parents=True)
    run = _Run.__new__(_Run)
    run.layout, run.failures, run.outcome = layout, [], StudyOutcome(out_dir=tmp_path)
    job = Job("inference", "m__fp32", {})
    run.settle(job, {"ok": True, "error": "", "seconds": 80.0})
    assert done_seconds(layout.done_marker(job.key)) == [80.0]
    run.settle(job, {"ok": True, "error": "", "seconds": 70.0}, again=True)
    assert json.loads(layout.done_marker(job.key).read_text()) == {"seconds": 70.0, "earlier_runs_s": [80.0]}
    assert done_seconds(layout.done_marker(job.key)) == [80.0, 70.0]
    run.settle(job, {"ok": True, "error": "", "seconds": 60.0})
    assert done_seconds(layout.done_marker(job.key)) == [60.0]
    assert done_seconds(layout.done_marker("missing")) == []
