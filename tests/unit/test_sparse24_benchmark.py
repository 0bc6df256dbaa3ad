"""benchmarks/sparse24_gpu.py end to end on the CPU (--dry-run-cpu: reference backend, tiny preset),
so the script a GPU session runs has had every step executed before it gets there."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "sparse24_gpu.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("sparse24_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # over 5 s (a real model, a recorded study): make test-fast skips it, make test runs it
def test_dry_run_goes_through_every_step(bench, tmp_path, capsys):
    out = tmp_path / "sparse24.jsonl"
    rc = bench.main(["--dry-run-cpu", "--presets", "tiny", "--dtypes", "fp32", "--batch", "2", "--seq", "32",
                     "--repeats", "2", "--min-seconds", "0.02", "--idle-seconds", "0", "--min-speedup", "0",
                     "--decode-tokens", "4", "--decode-batch", "2", "--out", str(out)])
    assert rc == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("prefill_speedup=") and "preset=tiny dtype=fp32" in last
    assert "energy_per_token_ratio=nan" in last and "target_met=False" in last  # no energy on a dry run
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["kind"] for r in records] == ["environment", "kernels", "prefill"]
    prefill = records[-1]
    assert prefill["converted_layers"] == prefill["candidate_layers"] == 14  # min_speedup 0: every shape
    assert prefill["verified"] and prefill["rel_l2_hidden"] < 1e-5
    assert prefill["sparse_calls"] > 0
    assert prefill["decode"]["dense"]["tokens_per_s"] > 0 and prefill["decode"]["planned"]["tokens_per_s"] > 0
    shapes = {row["shape"] for row in records[1]["plan"]}
    assert shapes == {"64x64", "32x64", "128x64", "64x128"}


def test_without_a_gpu_it_says_why_and_exits_3(bench, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible")
    assert bench.main(["--presets", "llama-1b"]) == 3
    assert "cannot run here" in capsys.readouterr().out


def test_unknown_preset_is_refused(bench):
    with pytest.raises(SystemExit):
        bench.main(["--presets", "llama-3b"])


def test_budget_skips_the_cases_left_and_still_prints_the_summary(bench, tmp_path, capsys):
    out = tmp_path / "sparse24.jsonl"
    rc = bench.main(["--dry-run-cpu", "--presets", "tiny", "--dtypes", "fp32,fp32", "--batch", "2", "--seq",
                     "16", "--repeats", "1", "--min-seconds", "0.01", "--idle-seconds", "0",
                     "--decode-tokens", "0", "--budget-s", "0", "--out", str(out)])
    assert rc == 1  # nothing measured
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("prefill_speedup=nan")
    kinds = [json.loads(line)["kind"] for line in out.read_text().splitlines()]
    assert kinds == ["environment", "skipped", "skipped"]


class WallClockNvml:
    """A pynvml stand-in: a total-energy counter (mJ) that rises at a constant power in wall time."""

    def __init__(self, power_w: float):
        import time

        self.power_w, self.time, self.t0 = power_w, time, time.perf_counter()

    def nvmlInit(self): pass
    def nvmlShutdown(self): pass
    def nvmlDeviceGetCount(self): return 1
    def nvmlDeviceGetHandleByIndex(self, i): return i

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        return int((self.time.perf_counter() - self.t0) * self.power_w * 1000)


def test_dry_run_energy_path_through_a_fake_nvml(bench, tmp_path, capsys):
    """The NVML energy arithmetic (gross, net of idle, mJ per token) runs end to end on the CPU."""
    out = tmp_path / "sparse24.jsonl"
    # One repeat: its tokens/s and its mJ/token come from the same window, so they must agree.
    rc = bench.main(["--dry-run-cpu", "--presets", "tiny", "--dtypes", "fp32", "--batch", "2", "--seq", "32",
                     "--repeats", "1", "--min-seconds", "0.05", "--idle-seconds", "0.2", "--min-speedup", "0",
                     "--decode-tokens", "0", "--out", str(out)], nvml_module=WallClockNvml(power_w=100.0))
    assert rc == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "energy_per_token_ratio=nan" not in last
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records[0]["idle_power_w"] == pytest.approx(100.0, rel=0.05)
    prefill = records[-1]
    # the model in memory, nothing running
    assert prefill["loaded_idle_power_w"] == pytest.approx(100.0, rel=0.05)
    for kind in ("dense", "planned"):
        m = prefill[kind]
        assert m["energy_method"] == "nvml_counter"
        # 100 W at the measured throughput: mJ/token = 100 J/s * 1000 / (tokens/s), within timing noise.
        assert m["mj_per_token"] == pytest.approx(100.0 * 1000 / m["tokens_per_s"], rel=0.1)
        # all of it is "idle" power
        assert m["mj_per_token_net"] == pytest.approx(0.0, abs=0.1 * m["mj_per_token"])
