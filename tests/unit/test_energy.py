"""The meter against deterministic fakes: a fake clock, a fake NVML counter, a fake RAPL tree."""

from dataclasses import dataclass
from pathlib import Path

import pytest

from llm_energy.config import EnergySettings
from llm_energy.measure.meter import (
    ComponentReading,
    EnergyMeter,
    NvmlSource,
    RaplSource,
    describe_methods,
    is_estimate,
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
    return EnergyMeter(settings, device=device, sources=sources, clock=clock, sleep=clock.sleep,
                       synchronize=lambda: None)


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
    meter = make_meter(clock, [FakeEstimate(clock), NvmlSource(nvml=FakeNvml(clock, power_w=50.0))],
                       device="cpu")
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


def test_chunk_windows_measure_one_pass_and_its_spread():
    from llm_energy.measure.meter import split_chunks

    assert split_chunks(10, 4) == [[0, 4, 8], [1, 5, 9], [2, 6], [3, 7]]
    assert split_chunks(2, 4) == [[0], [1]]  # never an empty window
    clock = FakeClock()
    settings = EnergySettings(carbon_intensity_g_per_kwh=1.0, min_window_s=0.0, windows=3)
    meter = make_meter(clock, [NvmlSource(nvml=FakeNvml(clock, power_w=100.0))], settings)
    calls = []
    # 3 chunks of 4, 4 and 2 items at 1 s per item: 10 s in all at 100 W = 1000 J
    fns = [lambda n=n: (calls.append(n), clock.sleep(float(n)))[0] and f"chunk{n}" for n in (4, 4, 2)]
    m = meter.measure_chunks(fns, [4, 4, 2], "pass", warmup=lambda: calls.append("warm"))
    assert calls == ["warm", 4, 4, 2]  # each item once, after an unmeasured warm-up
    assert m.unit == "chunk" and m.windows == 3 and m.n_items == 10 and len(m.result) == 3
    assert m.total("energy_kwh") * 3.6e6 == pytest.approx(1000.0)  # the sum, not the mean
    assert m.total("duration_s") == pytest.approx(10.0)
    # every window implies 1000 J for the whole pass (same energy per item): no spread
    assert m.implied_totals("energy_kwh") == pytest.approx([1000 / 3.6e6] * 3)
    assert m.std("energy_kwh") == pytest.approx(0.0, abs=1e-15)
    # an uneven window (6 s for 2 items) shows up as spread of the implied totals
    m2 = meter.measure_chunks([lambda: clock.sleep(4.0), lambda: clock.sleep(4.0), lambda: clock.sleep(6.0)],
                              [4, 4, 2], "uneven")
    assert [t * 3.6e6 for t in m2.implied_totals("energy_kwh")] == pytest.approx([1000.0, 1000.0, 3000.0])
    assert m2.std("energy_kwh") > 0 and m2.rsd > 0.5
    repeats = meter.measure_repeated(lambda: clock.sleep(1.0), "full")
    assert repeats.unit == "repeat" and repeats.total("energy_kwh") == repeats.mean("energy_kwh")


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


# --- issue: the right counter per component, attribution on a shared node, RAPL wraps, window content ---

from llm_energy.measure.meter import SCOPE_GPU_ONLY, CodeCarbonSource, method_priority  # noqa: E402


class FakeTracker:
    """Stands in for CodeCarbon's OfflineEmissionsTracker: fixed powers per component, fake time."""

    def __init__(self, clock, cpu_w=40.0, gpu_w=300.0, ram_w=5.0, **kwargs):
        self.clock, self.kwargs = clock, kwargs
        self.cpu_w, self.gpu_w, self.ram_w = cpu_w, gpu_w, ram_w

    def start(self): pass
    def stop(self): pass
    def start_task(self, name): self.t0 = self.clock.now
    def get_detected_hardware(self): return {"gpu_count": 1}

    def stop_task(self):
        dt = self.clock.now - self.t0
        kwh = lambda w: w * dt / 3.6e6  # noqa: E731
        return type("Data", (), {"cpu_energy": kwh(self.cpu_w), "gpu_energy": kwh(self.gpu_w),
                                 "ram_energy": kwh(self.ram_w), "emissions": 0.0,
                                 "energy_consumed": kwh(self.cpu_w + self.gpu_w + self.ram_w)})()


class SteppedRapl:
    """A RAPL tree whose counters the test advances by joules, wrapping at max_range."""

    def __init__(self, root, max_range_uj=1_000_000):
        self.root, self.max = root, max_range_uj
        self.values = {"cpu": 0, "ram": 0}
        make_rapl_tree(root, 0, 0, max_range_uj)

    def add(self, cpu_j=0.0, ram_j=0.0):
        self.values["cpu"] = (self.values["cpu"] + int(cpu_j * 1e6)) % self.max
        self.values["ram"] = (self.values["ram"] + int(ram_j * 1e6)) % self.max
        make_rapl_tree(self.root, self.values["cpu"], self.values["ram"], self.max)


def test_own_counters_beat_codecarbon_readings_per_component(tmp_path):
    clock = FakeClock()
    probe = lambda tracker: {"cpu": "codecarbon:rapl", "gpu": "codecarbon:pynvml",
                             "ram": "codecarbon:ram_power_model"}  # noqa: E731
    codecarbon = CodeCarbonSource(SETTINGS, tracker_factory=lambda **kw: FakeTracker(clock, **kw),
                                  gpu_ids=[3], probe=probe)
    assert codecarbon.tracker.kwargs["gpu_ids"] == [3]  # CodeCarbon is told the job's GPU
    rapl_tree = SteppedRapl(tmp_path, max_range_uj=10**12)
    rapl = RaplSource(tmp_path, sample_s=None)
    nvml = NvmlSource(nvml=FakeNvml(clock, power_w=250.0))
    meter = make_meter(clock, [codecarbon, rapl, nvml], device="cuda:0")
    with meter.window("w") as handle:
        clock.sleep(10.0)
        rapl_tree.add(cpu_j=600.0, ram_j=30.0)
    r = handle.record
    assert (r.cpu_method, r.gpu_method, r.ram_method) == ("rapl", "nvml_counter", "rapl")
    assert r.gpu_energy_kwh * 3.6e6 == pytest.approx(2500.0)  # the NVML counter, not CodeCarbon's 3000 J
    assert r.cpu_energy_kwh * 3.6e6 == pytest.approx(600.0)
    assert r.ram_energy_kwh * 3.6e6 == pytest.approx(30.0)
    assert r.estimated_components == ""
    assert (method_priority("nvml_counter") < method_priority("codecarbon:pynvml")
            < method_priority("codecarbon:cpu_load"))


def test_codecarbon_gpu_figure_is_dropped_for_a_cpu_job():
    clock = FakeClock()
    probe = lambda tracker: {"cpu": "codecarbon:cpu_load", "gpu": "codecarbon:pynvml",
                             "ram": "codecarbon:ram_power_model"}  # noqa: E731
    codecarbon = CodeCarbonSource(SETTINGS, tracker_factory=lambda **kw: FakeTracker(clock, **kw),
                                  probe=probe)
    assert "gpu_ids" not in codecarbon.tracker.kwargs
    meter = make_meter(clock, [codecarbon])
    with meter.window("w") as handle:
        clock.sleep(2.0)
    r = handle.record
    assert r.gpu_method == "none" and r.gpu_energy_kwh == 0.0
    assert r.estimated_components == "cpu;ram"


def test_two_jobs_on_one_node_are_not_both_charged_the_machine(tmp_path):
    """Two GPU jobs side by side: each total is its own GPU; the shared CPU/RAM is recorded, not charged."""
    clock = FakeClock()
    rapl_tree = SteppedRapl(tmp_path, max_range_uj=10**12)
    meters = [
        make_meter(clock, [RaplSource(tmp_path, sample_s=None), NvmlSource(nvml=FakeNvml(clock, power_w=w))],
                   device=f"cuda:{i}") for i, w in enumerate((200.0, 100.0))]
    for meter in meters:
        meter.scope = SCOPE_GPU_ONLY
    with meters[0].window("a") as a, meters[1].window("b") as b:
        clock.sleep(10.0)
        rapl_tree.add(cpu_j=500.0, ram_j=50.0)  # the node's CPU and RAM, shared by both jobs
    ra, rb = a.record, b.record
    assert ra.energy_kwh * 3.6e6 == pytest.approx(2000.0) and rb.energy_kwh * 3.6e6 == pytest.approx(1000.0)
    assert (ra.energy_kwh + rb.energy_kwh) * 3.6e6 == pytest.approx(3000.0)  # no CPU/RAM counted twice
    assert ra.cpu_energy_kwh * 3.6e6 == pytest.approx(500.0)  # still recorded beside the total
    assert ra.scope == rb.scope == "gpu_only: shared node"
    with pytest.raises(ValueError, match="needs a CUDA device"):
        EnergyMeter(SETTINGS, device="cpu", sources=[], attribution="gpu_only")


def test_runner_decides_attribution_per_node(root):
    from llm_energy.config import load_study
    from llm_energy.runner.study import StudyRunError, energy_attribution

    study = load_study(root / "params" / "smoke.yaml")
    assert energy_attribution(study, "none", "cpu") == "machine"
    assert energy_attribution(study, "local", "cpu") == "machine"  # one worker for the CPU
    two = study.model_copy(update={"cluster": study.cluster.model_copy(update={"local_workers": 2})})
    assert energy_attribution(two, "local", "cuda") == "gpu_only"
    with pytest.raises(StudyRunError, match="measured CPU jobs would share a node"):
        energy_attribution(two, "local", "cpu")
    forced = two.model_copy(update={"energy": two.energy.model_copy(update={"attribution": "machine"})})
    with pytest.raises(StudyRunError, match="charged the whole machine"):
        energy_attribution(forced, "local", "cuda")
    assert energy_attribution(study, "slurm", "cuda") == "gpu_only"  # no --exclusive: the node is shared


def test_rapl_counter_wrapping_twice_in_one_window_is_counted(tmp_path):
    """65 kJ counters wrap every few minutes under load: the sampler sees each wrap."""
    tree = SteppedRapl(tmp_path, max_range_uj=1_000_000)  # wraps every 1 J
    source = RaplSource(tmp_path, sample_s=None)  # sampled by hand here; a thread does it in a study
    source.begin("long")
    for _ in range(5):  # 5 x 0.9 J: the counter wraps 4 times, at most once between two samples
        tree.add(cpu_j=0.9, ram_j=0.4)
        source.sample()
    readings = source.end()
    assert readings["cpu"].energy_j == pytest.approx(4.5)
    assert readings["ram"].energy_j == pytest.approx(2.0)
    # Without sampling, the same window reads less than 1 J: what the old single-wrap code did.
    naive = RaplSource(tmp_path, sample_s=None)
    naive.begin("long")
    for _ in range(5):
        tree.add(cpu_j=0.9)
    assert naive.end()["cpu"].energy_j < 1.0


def test_rapl_sampling_thread_reads_while_the_window_runs(tmp_path):
    tree = SteppedRapl(tmp_path, max_range_uj=1_000_000)
    source = RaplSource(tmp_path, sample_s=0.01)
    source.begin("threaded")
    import time as _time

    for _ in range(4):
        tree.add(cpu_j=0.9)
        _time.sleep(0.1)  # ten sampling periods: the thread reads between the test's updates
    assert source.end()["cpu"].energy_j == pytest.approx(3.6)


class RecordingMeter:
    """A meter that only notes which calls happen while its window is open."""

    def __init__(self, log):
        self.log = log
        self.settings = SETTINGS

    def measure_repeated(self, fn, name, warmup=None):
        from llm_energy.measure.meter import RepeatedMeasurement

        if warmup is not None:
            warmup()
        self.log.append("window:open")
        result = fn()
        self.log.append("window:close")
        record = EnergyMeter(SETTINGS, sources=[], clock=FakeClock())._make_record(name, 1.0, {})
        return RepeatedMeasurement((record,), result)


def test_windows_hold_only_the_model_work(tiny_model, monkeypatch):
    """Tokenising happens before the window, metrics and bootstrap after it: inside, forwards only."""
    from dataclasses import replace as dc_replace

    from llm_energy.config import TaskSettings
    from llm_energy.data.tasks import load_task_data
    from llm_energy.methods import scoring
    from llm_energy.phases import evaluation

    log: list[str] = []

    class Tokenizer:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, *args, **kwargs):
            log.append("tokenize")
            return self.inner(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    real_bootstrap = scoring.bootstrap_interval
    monkeypatch.setattr(scoring, "bootstrap_interval", lambda *a,
                        **k: (log.append("bootstrap"), real_bootstrap(*a, **k))[1])
    # the packed path runs the decoder (its vocabulary projection only where needed); the shared cache the
    # whole model
    handles = [module.register_forward_pre_hook(lambda *a: log.append("forward"))
               for module in (tiny_model.model, tiny_model.model.get_decoder())]
    try:
        loaded = dc_replace(tiny_model, tokenizer=Tokenizer(tiny_model.tokenizer))
        for task in ("qa", "rca"):
            log.clear()
            data = load_task_data(task, TaskSettings(max_items=4))
            result, _ = evaluation.measure_task(loaded, task, data, RecordingMeter(log))
            inside = log[log.index("window:open") + 1 : log.index("window:close")]
            assert inside and set(inside) == {"forward"}, inside
            assert ("tokenize" in log[: log.index("window:open")]
                    and "bootstrap" in log[log.index("window:close"):])
            assert result.n_items == 4
    finally:
        for handle in handles:
            handle.remove()


PROBE_SCRIPT = """
import json, logging
messages = []
class Capture(logging.Handler):
    def emit(self, record):
        messages.append(record.getMessage())
logger = logging.getLogger("codecarbon")
logger.addHandler(Capture(level=logging.INFO))
logger.setLevel(logging.INFO)
from codecarbon import OfflineEmissionsTracker
from llm_energy.measure.meter import probe_codecarbon_methods
tracker = OfflineEmissionsTracker(country_iso_code="FRA", output_methods=[], log_level="info", allow_multiple_runs=True)
tracker.start()
probed = probe_codecarbon_methods(tracker)
tracker.stop()
said = {}
for message in messages:
    for line in message.splitlines():
        for component in ("CPU", "GPU", "RAM"):
            prefix = component + " Tracking Method:"
            if line.strip().startswith(prefix):
                said[component.lower()] = line.strip()[len(prefix):].strip().lower().replace(" ", "_")
print(json.dumps({"probed": probed, "said": said}))
"""  # noqa: E501


def test_probe_agrees_with_what_codecarbon_says_it_uses():
    """The library learns CodeCarbon's methods by probing, not from its log; this test (in a fresh
    process, since CodeCarbon sets its hardware up once per process) checks the probe against the log."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", PROBE_SCRIPT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    probed, said = out["probed"], out["said"]
    assert said, "CodeCarbon logged no tracking-method lines to compare with"
    assert probed["cpu"] == "codecarbon:" + said["cpu"]
    assert (probed["gpu"] == "none") == (said.get("gpu", "unspecified") == "unspecified")
    assert "estimation" in said["ram"] and probed["ram"] == "codecarbon:ram_power_model"


def test_chunk_windows_score_every_item_once_with_the_same_results(tiny_model):
    """One pass in k windows gives exactly the scores of a full pass, in item order."""
    from llm_energy.config import TaskSettings
    from llm_energy.data.tasks import load_task_data
    from llm_energy.phases import evaluation

    clock = FakeClock()
    chunked = make_meter(clock, [NvmlSource(nvml=FakeNvml(clock, power_w=50.0))],
                         EnergySettings(carbon_intensity_g_per_kwh=1.0, min_window_s=0.0, windows=3,
                                        warmup=False))
    whole = make_meter(clock, [NvmlSource(nvml=FakeNvml(clock, power_w=50.0))],
                       EnergySettings(carbon_intensity_g_per_kwh=1.0, min_window_s=0.0, repeats=1,
                                      max_repeats=1, warmup=False))
    for task in ("qa", "rca"):
        data = load_task_data(task, TaskSettings(max_items=7))
        a, m = evaluation.measure_task(tiny_model, task, data, chunked)
        b, _ = evaluation.measure_task(tiny_model, task, data, whole)
        assert m.unit == "chunk" and m.window_items == (3, 2, 2)
        assert a.predictions == b.predictions and a.item_ids == b.item_ids and a.metrics == b.metrics
