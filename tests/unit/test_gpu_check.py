"""The one-command GPU check, rehearsed on the CPU: the dry run of tools/gpu_check.sh (fake NVML, tiny
shapes, a one-wheel payload, the study cut to a few items), and the pieces it relies on: the NVML
source's test-read and fallback, its power integral, the Hopper kernel names, the search's failures,
the install's manifest check."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llm_energy.measure.fake_nvml import FakeNvml
from llm_energy.measure.meter import EnergyMeter, NvmlSource, method_priority
from llm_energy.models import sparse_kernels as sparse
from llm_energy.models.random_shapes import PRESETS, RANDOM_NOTE, build_model

ROOT = Path(__file__).resolve().parents[2]


def test_nvml_source_reads_the_counter_and_integrates_power_beside_it():
    source = NvmlSource(nvml=FakeNvml(power_w=200.0), device_indices=[0], sample_power_s=0.02)
    assert source.method == "nvml_counter" and source.fallback_reason == ""
    source.begin("w")
    time.sleep(0.3)
    reading = source.end()["gpu"]
    assert reading.method == "nvml_counter" and reading.energy_j == pytest.approx(60.0, rel=0.2)
    assert source.last_power_integral_j == pytest.approx(source.last_counter_j, rel=0.05)


def test_nvml_source_falls_back_to_integrated_power_and_records_the_method():
    source = NvmlSource(nvml=FakeNvml(power_w=150.0, counter=False), device_indices=[0])
    assert source.method == "nvml_power_integral" and "Not Supported" in source.fallback_reason
    meter = EnergyMeter(type("S", (), {"country_iso_code": "FRA", "carbon_intensity_g_per_kwh": 50.0})(),
                        sources=[source])
    with meter.window("w") as handle:
        time.sleep(0.3)
    assert handle.record.gpu_method == "nvml_power_integral"
    assert handle.record.gpu_energy_kwh * 3.6e6 == pytest.approx(45.0, rel=0.2)
    assert method_priority("nvml_power_integral") < method_priority("codecarbon:pynvml")


def test_nvml_source_refuses_when_neither_counter_nor_power_reads():
    class Dead(FakeNvml):
        def nvmlDeviceGetPowerUsage(self, handle):
            raise RuntimeError("gone")

    with pytest.raises(RuntimeError, match="power unreadable"):
        NvmlSource(nvml=Dead(counter=False), device_indices=[0])


@pytest.mark.parametrize("name", [
    "sm90_xmma_sparse_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off",
    "cutlass3x_sm90_sptensorop_s64x128x32spgemm_f16_f16_f32_f16_f16_128x128x64_2x1x1_0_tnn_align8_warpspecialized",
    "sm80_xmma_sparse_gemm_f16f16_f16f32_f32_nt_n_tilesize128x128x64_stage4_warpsize2x2x1_sptensor16x8x32",
])
def test_sparse_kernel_names_of_ampere_and_hopper_are_recognised(name):
    assert sparse.sparse_kernel_names({name: 1.0}) == [name]


@pytest.mark.parametrize("name", ["ampere_fp16_s16816gemm_fp16_256x128_ldg8_f2f_stages_64x3_tn",
                                  "void splitKreduce_kernel<32, 16, int, float, __half, float>",
                                  "nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_NNT",
                                  "sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1"])
def test_dense_kernel_names_are_not_taken_for_sparse_ones(name):
    assert sparse.sparse_kernel_names({name: 1.0}) == []


@pytest.mark.parametrize("error",
                         [NotImplementedError("no search"), ValueError("bad"), RuntimeError("cuSPARSELt")])
def test_a_failed_algorithm_search_keeps_the_default_algorithm(error):
    class Failing(sparse.ReferenceBackend):
        def search(self, packed, x2d, bias):
            raise error

    weight = torch.zeros(32, 64)
    t = sparse.time_shape(weight, 16, Failing(), timer=lambda fn, iters, warmup: 1.0)
    assert t.alg_id == 0 and t.sparse_s == t.sparse_default_alg_s


def test_random_shapes_are_the_real_models_shapes():
    llama = build_model("llama-3.2-1b", device="meta")
    assert llama.config.vocab_size == 128256 and sum(p.numel() for p in llama.parameters()) == 1_498_482_688
    smol = build_model("smollm2-135m", device="meta")
    assert sum(p.numel() for p in smol.parameters()) == 134_515_008
    assert (PRESETS["tiny"]["vocab_size"] == PRESETS["smollm2-135m"]["vocab_size"]
            <= PRESETS["llama-3.2-1b"]["vocab_size"])
    assert "random weights" in RANDOM_NOTE


def test_install_refuses_a_damaged_payload_by_step(tmp_path):
    payload = tmp_path / "payload"
    subprocess.run([sys.executable, "tools/gpu_install.py", "--make-fake", str(payload)], cwd=ROOT,
                   check=True)
    wheel = next((payload / "wheels").glob("*.whl"))
    wheel.write_bytes(wheel.read_bytes() + b"x")
    done = subprocess.run([sys.executable, "tools/gpu_install.py", "--payload", str(payload), "--site",
                           str(tmp_path / "site"), "--no-kernel"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 1
    assert "install step=fake status=failed" in done.stdout and "damaged" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "install=failed steps=fake"


# papermill end to end (~60 s); beside_smoke: in make test's smoke-study process, which (with warm kernels
# since 2026-12-06) finished 156 s before "everything else" (457 s against 613 s)
@pytest.mark.slow
@pytest.mark.beside_smoke
def test_gpu_check_dry_run_passes_every_step_within_its_limits(tmp_path):
    """`bash tools/gpu_check.sh --dry-run`: steps a-e on the CPU, the result folder's layout checked."""
    results = tmp_path / "results"
    env = {**os.environ, "GPU_CHECK_WORK": str(tmp_path / "work" / "gpu-check"), "GPU_PYTHON": sys.executable}
    start = time.perf_counter()
    done = subprocess.run(["bash", "tools/gpu_check.sh", "--dry-run", str(results)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    seconds = time.perf_counter() - start
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "dry_run=ok steps=5"
    files = sorted(p.relative_to(results) for p in results.rglob("*") if p.is_file())
    assert len(files) <= 8 and all(len(f.parts) <= 3 for f in files)
    assert {"summary.md", "gpu-check.tar.gz", "steps.tsv"} <= {str(f) for f in files}
    summary = (results / "summary.md").read_text()
    assert RANDOM_NOTE in summary and "NVML counter J" in summary and "prefill_speedup=" in summary
    steps = [line.split("\t") for line in (results / "steps.tsv").read_text().splitlines()[1:]]
    assert [s[0] for s in steps] == ["env", "install", "gpu_tests", "sparse24", "energy", "study"]
    assert all(s[1] == "ok" and float(s[3]) <= float(s[4]) for s in steps)
    print(f"dry run: {seconds:.0f} s")
