"""Hardware provenance (measure/hardware.py): the CPU's speed-deciding flags read from canned
/proc/cpuinfo text (an AMX Xeon, an AVX2-only Zen 3, an AVX-512 bf16 EPYC), the rest of the machine
from canned files, a fake NVML (MIG on, a field raising), the sentences the report puts beside the
throughput probe, and where the description lands: provenance.json, idle_baselines.csv, the report."""

from __future__ import annotations

import json

import pytest

from llm_energy.measure import hardware as hw

COMMON = ("fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 "
          "ht syscall nx lm constant_tsc pni ssse3 fma cx16 sse4_1 sse4_2 movbe popcnt aes xsave avx f16c")


def cpuinfo(model: str, vendor: str, flags: str, cores: list[tuple[int, int]], mhz: list[float]) -> str:
    """/proc/cpuinfo with one block per (physical id, core id) logical processor."""
    blocks = []
    for n, ((package, core), speed) in enumerate(zip(cores, mhz)):
        blocks.append(f"processor\t: {n}\nvendor_id\t: {vendor}\ncpu family\t: 6\nmodel name\t: {model}\n"
                      f"cpu MHz\t\t: {speed:.3f}\nphysical id\t: {package}\ncore id\t\t: {core}\n"
                      f"flags\t\t: {COMMON} {flags}\n")
    return "\n".join(blocks) + "\n"


# Sapphire Rapids, bare metal: 2 cores with 2 threads each (AMX tiles, bf16 and int8; AVX-512 fp16 and VNNI)
XEON_AMX = cpuinfo("Intel(R) Xeon(R) Platinum 8480+", "GenuineIntel",
                   "avx2 avx512f avx512dq avx512_bf16 avx512_fp16 avx512_vnni avx_vnni amx_bf16 amx_tile "
                   "amx_int8",
                   [(0, 0), (0, 1), (0, 0), (0, 1)], [2000.0, 3800.0, 2000.0, 3800.0])
# Zen 3 in a VM: AVX2 only, no AVX-512 at all
ZEN3 = cpuinfo("AMD EPYC 7763 64-Core Processor", "AuthenticAMD", "avx2 bmi2 hypervisor vaes",
               [(0, 0), (0, 1)], [2445.406, 2445.406])
# Zen 4 (Genoa) in a VM: AVX-512 with bf16 and VNNI, no AMX (this project's own VMs)
EPYC_BF16 = cpuinfo("AMD EPYC 9R14", "AuthenticAMD",
                    "avx2 avx512f avx512dq avx512_bf16 avx512_vnni avx512_vbmi2 hypervisor",
                    [(0, 0), (0, 1)], [2596.0, 2598.0])
ARM = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd bf16 i8mm sve\nCPU implementer\t: 0x41\n\n"
MEMINFO = "MemTotal:       16384000 kB\nMemFree:         1000 kB\nMemAvailable:    8192000 kB\n"


def reader(files: dict[str, str]):
    return files.get


def describe(cpu_text: str | None, **files: str):
    paths = {hw.CPUINFO: cpu_text, hw.MEMINFO: MEMINFO,
             **{getattr(hw, k.upper()): v for k, v in files.items()}}
    return hw.describe_cpu(read=reader({k: v for k, v in paths.items() if v is not None}),
                           getloadavg=lambda: (0.5, 0.25, 0.75), cpu_count=lambda: 4, kernel="6.1.0-test",
                           fallback_model="")


def test_an_amx_xeon_has_every_fast_path():
    cpu = describe(XEON_AMX, governor="performance\n")
    assert cpu.isa_flags == dict.fromkeys(hw.SPEED_FLAGS, True) | {"amx_fp16": False}
    assert cpu.present_flags == ["avx2", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "avx_vnni",
                                 "amx_bf16", "amx_int8", "amx_tile"]
    assert (cpu.model, cpu.vendor) == ("Intel(R) Xeon(R) Platinum 8480+", "GenuineIntel")
    assert (cpu.logical_cores, cpu.physical_cores) == (4, 2)  # two threads per core
    assert cpu.governor == "performance" and cpu.mhz == pytest.approx(2900.0)
    assert cpu.virtualisation == "none"  # no hypervisor flag: bare metal
    assert cpu.load_avg == (0.5, 0.25, 0.75)
    assert (cpu.memory_total_bytes, cpu.memory_available_bytes) == (16384000 * 1024, 8192000 * 1024)
    assert cpu.kernel == "6.1.0-test"


def test_a_zen3_vm_has_avx2_only_and_no_governor():
    cpu = describe(ZEN3)
    assert [f for f, on in cpu.isa_flags.items() if on] == ["avx2"]
    assert set(cpu.isa_flags) == set(hw.SPEED_FLAGS)  # every flag named, present or not
    assert cpu.governor == "unknown"  # no cpufreq in a VM
    assert cpu.virtualisation == "hypervisor"
    assert cpu.physical_cores == 2 and cpu.mhz == pytest.approx(2445.4)


def test_an_avx512_bf16_epyc_without_amx():
    cpu = describe(EPYC_BF16, hypervisor_type="kvm\n")
    assert cpu.present_flags == ["avx2", "avx512f", "avx512_bf16", "avx512_vnni"]
    assert not cpu.isa_flags["amx_bf16"] and not cpu.isa_flags["amx_tile"]
    assert cpu.virtualisation == "hypervisor (kvm)"
    assert cpu.mhz == pytest.approx(2597.0)


def test_another_architecture_or_no_proc_gives_unknowns_not_errors():
    arm = describe(ARM, cur_freq_khz="2100000\n")
    assert arm.isa_flags == {} and arm.vendor == "0x41" and arm.mhz == pytest.approx(2100.0)
    assert arm.virtualisation == "unknown"
    bare = hw.describe_cpu(read=reader({}), getloadavg=None, cpu_count=lambda: None, kernel="",
                           fallback_model="")
    assert bare.isa_flags == {} and bare.model == "" and bare.governor == "unknown"
    assert bare.mhz is None and bare.load_avg is None and bare.memory_total_bytes is None
    assert bare.logical_cores is None and bare.physical_cores is None and bare.virtualisation == "unknown"
    # the load average falls back to /proc/loadavg when os.getloadavg fails
    def broken():
        raise OSError("no load average")
    cpu = hw.describe_cpu(read=reader({hw.LOADAVG: "1.50 0.75 0.10 2/100 42\n"}), getloadavg=broken,
                          kernel="")
    assert cpu.load_avg == (1.5, 0.75, 0.1)


def test_this_machine_is_described_without_raising():
    cpu = hw.describe_cpu()
    assert cpu.logical_cores and cpu.governor
    assert hw.describe_gpus(nvml=FakeNvml(init_fails=True)) == []


class NvmlError(Exception):
    pass


class FakeNvml:
    """The pynvml calls describe_gpus makes, with MIG on and ECC not supported on GPU 0."""

    NVML_CLOCK_SM, NVML_CLOCK_MEM = 1, 2

    def __init__(self, init_fails: bool = False, bad: set[str] = frozenset({"ecc"})):
        self.init_fails, self.bad, self.shutdown = init_fails, set(bad), 0

    def nvmlInit(self):
        if self.init_fails:
            raise NvmlError("NVML_ERROR_DRIVER_NOT_LOADED")

    def nvmlShutdown(self):
        self.shutdown += 1

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlSystemGetDriverVersion(self):
        return b"550.54.15"  # older pynvml returns bytes

    def nvmlDeviceGetHandleByIndex(self, index):
        return f"h{index}"

    def _maybe(self, field, value):
        if field in self.bad:
            raise NvmlError("NVML_ERROR_NOT_SUPPORTED")
        return value

    def nvmlDeviceGetName(self, h):
        return self._maybe("name", "NVIDIA H100 80GB HBM3")

    def nvmlDeviceGetEnforcedPowerLimit(self, h):
        return self._maybe("power", 700000)  # mW

    def nvmlDeviceGetPowerManagementLimit(self, h):
        return self._maybe("power_fallback", 650000)

    def nvmlDeviceGetClockInfo(self, h, kind):
        return self._maybe("clock", {1: 1980, 2: 2619}[kind])

    def nvmlDeviceGetMaxClockInfo(self, h, kind):
        return {1: 1980, 2: 2619}[kind]

    def nvmlDeviceGetPersistenceMode(self, h):
        return self._maybe("persistence", 1)

    def nvmlDeviceGetMigMode(self, h):
        return self._maybe("mig", (1, 1))  # (current, pending): enabled

    def nvmlDeviceGetEccMode(self, h):
        return self._maybe("ecc", (1, 1))


def test_a_fake_nvml_with_mig_on_and_ecc_raising():
    nvml = FakeNvml()
    gpus = hw.describe_gpus(nvml=nvml)
    assert [g.index for g in gpus] == [0, 1] and nvml.shutdown == 1
    g = gpus[0]
    assert g.name == "NVIDIA H100 80GB HBM3" and g.driver_version == "550.54.15"
    assert g.power_limit_w == 700.0 and (g.sm_clock_mhz, g.memory_clock_mhz) == (1980, 2619)
    assert (g.max_sm_clock_mhz, g.max_memory_clock_mhz) == (1980, 2619)
    assert g.persistence_mode is True and g.mig_mode is True
    assert g.ecc_mode is None  # the one field that raised; the others stand


def test_every_gpu_field_may_fail_alone():
    nvml = FakeNvml(bad={"name", "power", "clock", "persistence", "mig", "ecc"})
    (g,) = hw.describe_gpus(nvml=nvml, indices=[1])
    assert g.index == 1 and g.driver_version == "550.54.15" and g.max_sm_clock_mhz == 1980
    assert ((g.name, g.sm_clock_mhz, g.persistence_mode, g.mig_mode, g.ecc_mode)
            == (None, None, None, None, None))
    assert g.power_limit_w == 650.0  # the enforced limit raised: the management limit answered
    (g,) = hw.describe_gpus(nvml=FakeNvml(bad={"power", "power_fallback"}), indices=[0])
    assert g.power_limit_w is None and g.name == "NVIDIA H100 80GB HBM3"


def test_a_job_on_cuda_describes_its_own_gpu(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    (g,) = hw.job_gpus("cuda:0", nvml=FakeNvml())
    assert g.index == 1
    assert hw.job_gpus("cpu", nvml=FakeNvml()) == []


@pytest.mark.parametrize("precision,factor,cpu,skipped,expected", [
    ("bf16", 25.0, ZEN3, True, "bf16 skipped: 25x slower than fp32 on this CPU, which has no avx512_bf16 or "
                               "amx_bf16"),
    ("bf16", 1 / 2.4, EPYC_BF16, False, "bf16: 2.4x faster than fp32 on this CPU, which has avx512_bf16"),
    ("bf16", 12.0, EPYC_BF16, True, "bf16 skipped: 12x slower than fp32 on this CPU, although it has "
                                    "avx512_bf16 (the kernel that ran here does not use it)"),
    ("fp16", 4.17, EPYC_BF16, False, "fp16: 4.2x slower than fp32 on this CPU, which has no avx512_fp16 or "
                                     "amx_fp16"),
    ("w8a8", 0.37, XEON_AMX, False, "w8a8: 2.7x faster than fp32 on this CPU, which has avx512_vnni, "
                                    "avx_vnni and amx_int8"),
    ("w8a8", 1.6, ZEN3, False, "w8a8: 1.6x slower than fp32 on this CPU, which has no avx512_vnni, avx_vnni "
                               "or amx_int8"),
    ("nf4", 1.3, ZEN3, False, "nf4: 1.3x slower than fp32 on this CPU"),  # no single flag decides 4-bit
    ("fp16", 1.02, XEON_AMX, False, "fp16: about as fast as fp32 on this CPU, which has avx512_fp16"),
])
def test_the_speed_sentence_names_the_flags_that_decide_it(precision, factor, cpu, skipped, expected):
    assert hw.speed_sentence(precision, factor, hw.isa_flags(cpu), skipped=skipped) == expected


def test_no_flag_is_named_on_a_gpu_or_when_the_flags_are_unknown():
    flags = hw.isa_flags(ZEN3)
    assert hw.speed_sentence("bf16", 0.5, flags, on_cpu=False) == "bf16: 2.0x faster than fp32 on this GPU"
    assert hw.speed_sentence("bf16", 25, {}, skipped=True) == "bf16 skipped: 25x slower than fp32 on this CPU"
    assert hw.speed_sentence("int8", None, flags, reason="no bitsandbytes") == (
        "int8: not measured on this CPU (no bitsandbytes)")


def test_job_columns_join_the_flags_present():
    cols = hw.job_columns(describe(EPYC_BF16), hw.describe_gpus(nvml=FakeNvml(), indices=[0]))
    assert cols["isa_flags"] == "avx2;avx512f;avx512_bf16;avx512_vnni"
    assert cols["cpu_model"] == "AMD EPYC 9R14" and cols["cpu_cores"] == 4 and cols["governor"] == "unknown"
    assert cols["load_avg_1m"] == 0.5 and cols["cpu_mhz"] == pytest.approx(2597.0)
    assert cols["gpu_name"] == "NVIDIA H100 80GB HBM3" and cols["gpu_power_limit_w"] == 700.0 and cols["host"]
    old_x86 = cpuinfo("Old", "GenuineIntel", "", [(0, 0)], [1000.0])
    assert hw.job_columns(describe(old_x86), [])["isa_flags"] == "none"  # flags listed, none of ours
    assert hw.job_columns(describe(ARM), [])["isa_flags"] is None  # no x86 flags: unknown
    assert hw.job_columns(describe(ARM), [])["gpu_name"] is None


def test_provenance_fields_keep_the_older_keys_and_read_back_as_sentences():
    fields = hw.provenance_fields(describe(XEON_AMX, governor="performance"),
                                  hw.describe_gpus(nvml=FakeNvml()))
    assert fields["cpu"] == "Intel(R) Xeon(R) Platinum 8480+" and fields["cpu_count"] == 4  # the older keys
    assert fields["isa_flags"]["amx_bf16"] is True and fields["governor"] == "performance"
    assert fields["load_avg"] == [0.5, 0.25, 0.75] and len(fields["gpus"]) == 2
    data = json.loads(json.dumps(fields, sort_keys=True))  # as provenance.json stores it
    text = hw.cpu_sentence(data)
    assert text.startswith("Intel(R) Xeon(R) Platinum 8480+ (GenuineIntel), 4 logical cores (2 physical); "
                           "speed-deciding flags: avx2, avx512f, avx512_bf16, avx512_fp16, avx512_vnni, "
                           "avx_vnni, amx_bf16, amx_int8, amx_tile (absent: amx_fp16); governor performance, "
                           "2900 MHz; load average 0.50 / 0.25 / 0.75")
    assert "memory 15.6 GiB, 7.8 GiB available" in text and "no hypervisor flag" in text
    assert hw.gpu_sentence(data["gpus"][0]) == (
        "GPU 0: NVIDIA H100 80GB HBM3, driver 550.54.15, power limit 700 W, SM clock 1980/1980 MHz "
        "(now/max), memory clock 2619/2619 MHz, persistence on, MIG on, ECC ?.")
    # an older provenance
    assert hw.cpu_sentence({"cpu": "Old CPU", "cpu_count": 2}) == "Old CPU, 2 logical cores."


def test_idle_baselines_rows_carry_the_jobs_hardware(tmp_path, monkeypatch):
    from llm_energy.measure.meter import IdleBaseline
    from llm_energy.tables import rows
    from llm_energy.tables import store as results

    monkeypatch.setattr(rows, "job_hardware", lambda device: hw.job_columns(describe(ZEN3), []))
    rows.record_idle_baselines(tmp_path, "m__fp32", "inference", "cpu",
                               IdleBaseline(10.0, 1.0, "x", "system"), IdleBaseline(12.0, 1.0, "x", "loaded"))
    table = results.read_table(tmp_path, "idle_baselines")
    assert list(table.columns[:7]) == results.required_columns(results.IdleRow)
    for column in ("host", "cpu_model", "isa_flags", "cpu_cores", "governor", "cpu_mhz", "load_avg_1m",
                   "gpu_name", "gpu_power_limit_w"):
        assert column in table.columns
    assert (set(table["isa_flags"]) == {"avx2"}
            and set(table["cpu_model"]) == {"AMD EPYC 7763 64-Core Processor"})
    assert set(table["governor"]) == {"unknown"} and table["load_avg_1m"].tolist() == [0.5, 0.5]


def test_a_failing_description_leaves_the_columns_blank(monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("no /proc")
    monkeypatch.setattr(hw, "describe_cpu", broken)
    assert hw.job_hardware("cpu") == {}


def test_the_study_provenance_holds_the_hardware(root, tmp_path):
    from llm_energy.config import load_study
    from llm_energy.runner.study import provenance

    prov = provenance(load_study(root / "params" / "smoke.yaml"), "cpu", tmp_path / "p.yaml")
    machine = prov["hardware"]
    assert {"cpu", "cpu_count", "gpu", "device", "cuda"} <= set(machine)  # the keys it always had
    assert {"cpu_vendor", "isa_flags", "physical_cores", "governor", "cpu_mhz", "load_avg",
            "memory_total_bytes", "memory_available_bytes", "kernel", "virtualisation", "gpus",
            "host"} <= set(machine)
    json.dumps(prov)


def _provenance(study, flags: dict[str, bool] | None, skipped: dict[str, str], device: str = "cpu") -> None:
    from llm_energy.layout import StudyLayout

    hardware = {"cpu": "AMD EPYC 7763 64-Core Processor", "cpu_count": 2, "host": "node1",
                "governor": "unknown", "cpu_mhz": 2445.4, "load_avg": [0.1, 0.2, 0.3], "gpus": []}
    if flags is not None:
        hardware["isa_flags"] = flags
    StudyLayout(study).provenance.write_text(json.dumps({"hardware": hardware, "throughput": {
        "device": device, "device_limits": {"max_slowdown": 8.0, "always_run": []},
        "precisions": {"fp32": {"gflop_per_s": 30.0}, "bf16": {"gflop_per_s": 1.2},
                       "w8a8": {"gflop_per_s": 60.0},
                       "nf4": {"gflop_per_s": None, "reason": "bitsandbytes not importable: x"}},
        "skipped_as_slow": skipped}}))


def test_the_report_puts_the_probe_beside_the_flags(tmp_path):
    from test_ranking_phase import summary, write_study

    from llm_energy.config import RankingSettings
    from llm_energy.phases import ranking as rk

    study = write_study(tmp_path / "s", {"fp32": (0.8, 0.7), "w8a8": (0.6, 0.5)},
                        {"fp32": 2e-6, "w8a8": 1e-6})
    _provenance(study, hw.isa_flags(ZEN3), {"bf16": "bf16: 1.2 GFLOP/s vs 30 fp32 ..."})
    lines = rk.device_lines(study)
    assert "- bf16 skipped: 25x slower than fp32 on this CPU, which has no avx512_bf16 or amx_bf16." in lines
    assert ("- w8a8: 2.0x faster than fp32 on this CPU, which has no avx512_vnni, avx_vnni or "
            "amx_int8.") in lines
    assert not any(line.startswith("- nf4") for line in lines)  # not measured: the first line says why
    text = summary(rk.rank_study(study, RankingSettings(bootstrap=10)))
    assert ("**Hardware.** The runner's machine (node1), where the throughput probe ran: AMD EPYC 7763 "
            "64-Core Processor, 2 logical cores; speed-deciding flags: avx2 (absent: ") in text
    assert text.index("**Hardware.**") < text.index("**Precisions on this device.**")
    _provenance(study, None, {"bf16": "x"})  # a provenance written before the flags: no flag named
    assert "- bf16 skipped: 25x slower than fp32 on this CPU." in rk.device_lines(study)
    _provenance(study, hw.isa_flags(ZEN3), {}, device="cuda:0")
    assert "- bf16: 25x slower than fp32 on this GPU." in rk.device_lines(study)


def test_the_report_says_where_each_job_ran(tmp_path):
    from llm_energy.phases import ranking as rk
    from llm_energy.tables import store as results

    _provenance(tmp_path, hw.isa_flags(ZEN3), {})
    base = {"phase": "inference", "power_w": 10.0, "duration_s": 1.0, "method": "x", "device": "cpu",
            "cpu_cores": 2, "governor": "unknown", "cpu_mhz": 2445.4, "gpu_name": None,
            "gpu_power_limit_w": None}
    zen3 = {"host": "node1", "cpu_model": "AMD EPYC 7763 64-Core Processor", "isa_flags": "avx2"}
    amx = {"host": "node2", "cpu_model": "Intel(R) Xeon(R) Platinum 8480+",
           "isa_flags": "avx2;avx512f;amx_bf16"}
    results.upsert_rows(tmp_path, "idle_baselines", [
        {**base, **zen3, "config_id": "a", "kind": "system", "load_avg_1m": 3.0},
        {**base, **zen3, "config_id": "a", "kind": "loaded", "load_avg_1m": 0.2},
        {**base, **amx, "config_id": "b", "kind": "loaded", "load_avg_1m": 1.5}])
    jobs = rk.job_hardware(tmp_path)
    # loaded rows
    assert jobs["config_id"].tolist() == ["a", "b"] and jobs["load_avg_1m"].tolist() == [0.2, 1.5]
    lines = rk.hardware_lines(tmp_path)
    assert lines[1] == "The 2 measured jobs ran on 2 machines (tables/idle_baselines.csv):"
    assert lines[2] == "- node1: AMD EPYC 7763 64-Core Processor, flags avx2: a (inference)"
    assert lines[3] == ("- node2: Intel(R) Xeon(R) Platinum 8480+, flags avx2;avx512f;amx_bf16 (other flags "
                        "than the probe's machine: its precisions' speeds may differ): b (inference)")
    assert lines[4] == ("Load average (1 min) when each job's idle baselines were taken: 0.20 to 1.50 "
                        "(highest: b, inference, on 2 logical cores).")
    one = tmp_path / "one"
    results.upsert_rows(one, "idle_baselines", [{**base, **zen3, "config_id": "a", "kind": "loaded",
                                                 "load_avg_1m": 0.2}])
    assert rk.hardware_lines(one)[0] == ("The one measured job ran on node1: AMD EPYC 7763 64-Core "
                                         "Processor, flags avx2 (tables/idle_baselines.csv).")
    old = tmp_path / "old"  # tables written before the hardware columns
    results.upsert_rows(old, "idle_baselines",
                        [{k: v for k, v in {**base, "config_id": "a", "kind": "loaded"}.items()
                          if k in results.required_columns(results.IdleRow)}])
    assert rk.job_hardware(old).empty and rk.hardware_lines(old) == []
