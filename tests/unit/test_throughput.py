"""The device throughput probe, the skipping of precisions too slow on the device, and `llm-energy plan`."""

from __future__ import annotations

import sys

import pytest

from llm_energy.config import DeviceLimits, load_study
from llm_energy.measure import throughput
from llm_energy.measure.throughput import PrecisionThroughput

SMALL = (16, 32, 48)


def fake_probe(rates: dict[str, float | None], device: str = "cpu") -> dict[str, PrecisionThroughput]:
    return {p: PrecisionThroughput(p, device, r, 3 if r else 0, 0.3 if r else 0.0, f"fake {p}",
                                   "" if r else "bitsandbytes not importable: no module")
            for p, r in rates.items()}


# --- the probe on this CPU ------------------------------------------------------------------------


def test_dense_precisions_are_measured_on_the_cpu_quickly():
    import time

    start = time.perf_counter()
    result = throughput.probe_device(["bf16", "fp16"], "cpu", min_time_s=0.03)
    assert list(result) == ["fp32", "bf16", "fp16"]  # fp32, the reference, always comes first
    for precision, r in result.items():
        assert r.gflop_per_s is not None and r.gflop_per_s > 0 and r.calls >= throughput.ROUNDS, precision
        assert r.method.startswith(f"torch linear {throughput.DENSE_DTYPES[precision]}")
        assert r.reason == ""
    assert time.perf_counter() - start < 10


def test_quantized_precisions_are_measured_or_say_why():
    result = throughput.probe_precision("nf4", "cpu", shape=SMALL, min_time_s=0.02)
    assert result.method.startswith("bitsandbytes Linear4bit nf4 forward")
    assert (result.gflop_per_s is not None and result.gflop_per_s > 0) or result.reason


def test_without_bitsandbytes_a_quantized_precision_is_skipped_with_the_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    result = throughput.probe_precision("int8", "cpu", shape=SMALL, min_time_s=0.01)
    assert result.gflop_per_s is None and result.calls == 0
    assert result.reason.startswith("bitsandbytes not importable:")
    assert throughput.probe_precision("fp8", "cpu").reason == "unknown precision 'fp8'"


def test_timing_takes_the_best_round_with_a_fake_clock():
    ticks = iter([0.0, 0.4, 1.0, 1.2, 2.0, 2.5])  # rounds of 0.4 s, 0.2 s, 0.5 s (one call each)
    gflops, calls, seconds = throughput._time_calls(lambda: None, "cpu", 2e9, 0.3, clock=lambda: next(ticks))
    assert gflops == pytest.approx(2 / 0.2) and calls == 3 and seconds == pytest.approx(1.1)


# --- which precisions a study skips ---------------------------------------------------------------


def test_slow_precisions_are_skipped_with_the_measured_reason():
    probe = fake_probe({"fp32": 29.8, "bf16": 1.2, "fp16": 20.0, "int8": None})
    skipped = throughput.slow_precisions(probe, DeviceLimits())
    assert list(skipped) == ["bf16"]  # 24.8x; fp16 1.5x; int8 not measured: never skipped here
    assert skipped["bf16"].startswith("bf16: 1.2 GFLOP/s vs 29.8 fp32 on this CPU (no native kernel for it "
                                      "here), 24.8x slower, over device_limits.max_slowdown 8")
    assert "device_limits.always_run" in skipped["bf16"] and "max_slowdown: null" in skipped["bf16"]
    assert throughput.slow_precisions(probe, DeviceLimits(max_slowdown=30)) == {}
    assert throughput.slow_precisions(probe, DeviceLimits(max_slowdown=None)) == {}
    assert throughput.slow_precisions(probe, DeviceLimits(always_run=["bf16"])) == {}
    assert ("this GPU" in throughput.slow_precisions(fake_probe({"fp32": 100.0, "fp16": 1.0}, "cuda"),
                                                     DeviceLimits())["fp16"])


def test_device_limits_are_validated():
    with pytest.raises(ValueError, match="greater than 1"):
        DeviceLimits(max_slowdown=1.0)
    with pytest.raises(ValueError, match="always_run"):
        DeviceLimits(always_run=["fp8"])


def test_the_runner_skips_a_slow_precision_unless_it_already_ran(root, tmp_path):
    from llm_energy.runner import study as runner

    study = load_study(root / "params" / "smoke.yaml")
    assert study.device_limits.max_slowdown is None  # the smoke study runs every precision
    slow = {"fp16": "fp16: 1 GFLOP/s vs 30 fp32 on this CPU"}
    jobs, skipped = runner.expand(study, tmp_path, root / "params", "cpu", slow=slow)
    assert (skipped
            == [{"config_id": "tiny-random-llama__fp16", "model": "tiny-random-llama", "precision": "fp16",
                 "reason": "fp16: 1 GFLOP/s vs 30 fp32 on this CPU", "adapter": "none", "pruning": "none"}])
    assert "inference__tiny-random-llama__fp16" not in [j.key for j in jobs]
    # resuming a folder where it already finished keeps it (a noisy probe must not orphan results)
    marker = runner.StudyLayout(tmp_path).done_marker("inference__tiny-random-llama__fp16")
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("{}")
    jobs, skipped = runner.expand(study, tmp_path, root / "params", "cpu", slow=slow)
    assert skipped == [] and "inference__tiny-random-llama__fp16" in [j.key for j in jobs]
    assert runner.probed_precisions(study) == ["fp32", "bf16", "fp16", "int8", "w8a8", "nf4", "fp4"]


def test_the_default_study_skips_what_is_too_slow(root, tmp_path, monkeypatch):
    from llm_energy.runner import study as runner

    monkeypatch.setattr(throughput, "probe_device",
                        lambda precisions, device, **_: fake_probe({"fp32": 30.0, "bf16": 25.0, "fp16": 1.0,
                                                                    "int8": 10.0, "nf4": 9.0, "fp4": 9.0}))
    study = load_study(root / "params" / "default.yaml")
    assert study.device_limits.max_slowdown == 8.0
    probe, slow = runner.slow_precisions(study, "cpu")
    assert list(slow) == ["fp16"] and set(probe) == {"fp32", "bf16", "fp16", "int8", "nf4", "fp4"}


# --- llm-energy plan ------------------------------------------------------------------------------


def test_plan_prints_jobs_probe_skips_and_estimates(root, tmp_path, monkeypatch, capsys):
    from llm_energy import cli

    monkeypatch.setattr(throughput, "probe_device",
                        lambda precisions, device,
                        **_: fake_probe({p: 30.0 for p in precisions} | {"fp32": 30.0, "bf16": 1.5,
                                                                                                   "fp4":
                                                                         None}))
    params = tmp_path / "study.yaml"
    params.write_text((root / "params" / "smoke.yaml").read_text().replace("  max_slowdown: null ",
                                                                           "  max_slowdown: 8 "))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["plan", str(params)]) == 0
    out = capsys.readouterr().out
    assert "study 'smoke' on cpu:" in out
    assert "  bf16      1.50 GFLOP/s (20.0x slower than fp32)  [fake bf16]" in out
    assert "  fp4   not measured: bitsandbytes not importable: no module" in out
    assert "device_limits.max_slowdown: 8 (always_run: none)" in out
    assert ("  SKIPPED bf16: 1.5 GFLOP/s vs 30 fp32 on this CPU (no native kernel for it here), 20.0x "
            "slower") in out
    assert "inference__tiny-random-llama__fp32 " in out and "inference__tiny-random-llama__bf16 " not in out
    assert "ESTIMATED time each" in out and "Estimated total: ~" in out
    assert not (tmp_path / "outputs").exists()  # a plan writes nothing


# --- fine-tuning's own limit ----------------------------------------------------------------------


def test_the_training_probe_times_forward_and_input_backward():
    for precision in ("fp32", "w8a8"):
        result = throughput.probe_precision(precision, "cpu", shape=SMALL, min_time_s=0.02, training=True)
        assert result.gflop_per_s and result.gflop_per_s > 0, result.reason
        assert result.method.endswith("[16x32] -> 48, forward + input backward"), result.method
    # a training batch, not a scoring call
    assert throughput.TRAINING_PROBE_SHAPE[0] > throughput.PROBE_SHAPE[0]


def test_fine_tuning_skips_a_precision_over_its_own_limit_with_the_measured_reason():
    probe = fake_probe({"fp32": 40.0, "bf16": 90.0, "w8a8": 70.0, "nf4": 30.0, "int8": 4.0})
    skipped = throughput.slow_precisions(probe, DeviceLimits(), training=True)
    assert list(skipped) == ["int8"]  # 10x; nf4 1.33x is within the default 1.5
    assert skipped["int8"].startswith("int8 training (forward + input backward): 4 GFLOP/s vs 40 fp32 on "
                                      "this CPU, 10.0x slower, over device_limits.max_training_slowdown 1.5")
    assert "max_training_slowdown: null" in skipped["int8"]
    assert (list(throughput.slow_precisions(probe, DeviceLimits(max_training_slowdown=1.2), training=True))
            == ["nf4",
                                                                                                          "int8"])
    assert throughput.slow_precisions(probe, DeviceLimits(max_training_slowdown=None), training=True) == {}
    assert throughput.slow_precisions(probe, DeviceLimits(always_run=["int8"]), training=True) == {}
    # inference: its own limit (8x)
    assert list(throughput.slow_precisions(probe, DeviceLimits())) == ["int8"]


def test_the_runner_skips_fine_tuning_at_a_slow_precision_but_still_scores_it(root, tmp_path, monkeypatch):
    from llm_energy.runner import study as runner

    study = load_study(root / "params" / "default.yaml")
    study = study.model_copy(
        update={"finetune": study.finetune.model_copy(update={"precisions": ["fp32", "bf16"]})})
    seen = {}

    def probe_device(precisions, device, **kwargs):
        seen[kwargs.get("training", False)] = list(precisions)
        return fake_probe({"fp32": 40.0, "bf16": 20.0})

    monkeypatch.setattr(throughput, "probe_device", probe_device)
    probe, slow_training = runner.slow_training_precisions(study, "cpu")
    assert seen == {True: ["fp32", "bf16"]} and list(slow_training) == ["bf16"]
    jobs, skipped = runner.expand(study, tmp_path, root / "params", "cpu", slow={},
                                  slow_training=slow_training)
    keys = [j.key for j in jobs]
    assert "finetune__smollm2-135m-instruct__bf16__lora" not in keys
    assert ("finetune__smollm2-135m-instruct__fp32__lora" in keys
            and "inference__smollm2-135m-instruct__bf16" in keys)
    assert skipped == [{"config_id": "smollm2-135m-instruct__bf16__lora", "model": "smollm2-135m-instruct",
                        "precision": "bf16", "reason": slow_training["bf16"], "adapter": "lora",
                        "pruning": "none"}]
    assert "2.0x slower, over device_limits.max_training_slowdown 1.5" in slow_training["bf16"]
    from llm_energy.phases.ranking import not_trained

    runner._record_skipped(tmp_path, skipped)  # configs.csv, as the runner writes it before the first job
    assert not_trained(tmp_path) == [{"model": "smollm2-135m-instruct", "precision": "bf16",
                                      "reason": slow_training["bf16"].split("; ")[0]}]  # what Figure 3 lists
    unlimited = study.model_copy(update={"device_limits": DeviceLimits(max_training_slowdown=None)})
    assert runner.slow_training_precisions(unlimited, "cpu") == ({}, {})  # nothing probed without a limit
