"""The unmeasured warm-up before a task's windows: skipped when a reader's look at a few items of the
same task has just run on the model, and short (a few tokens) before generation windows."""

from __future__ import annotations

from dataclasses import replace

from test_energy import FakeClock, FakeNvml, make_meter

from llm_energy.config import EnergySettings, GenerationParams, TaskSettings
from llm_energy.data.tasks import load_task_data
from llm_energy.measure.meter import NvmlSource
from llm_energy.models.loading import load_model


def _meter(windows: int = 2):
    clock = FakeClock()
    settings = EnergySettings(carbon_intensity_g_per_kwh=1.0, min_window_s=0.0, windows=windows, warmup=True)
    return make_meter(clock, [NvmlSource(nvml=FakeNvml(clock, power_w=50.0))], settings)


def test_a_look_at_the_task_is_its_warm_up(monkeypatch):
    from llm_energy.config import ModelSettings
    from llm_energy.methods.scoring import prepare_task
    from llm_energy.phases import evaluation, inference

    loaded = load_model(ModelSettings(name="tiny-random-llama"), "fp32")  # a model object of its own
    calls: list[int] = []
    real = evaluation.score_prepared

    def counted(model, tokenizer, part):
        calls.append(len(part.encoded))
        return real(model, tokenizer, part)

    monkeypatch.setattr(evaluation, "score_prepared", counted)
    data = load_task_data("rca", TaskSettings(max_items=6))
    evaluation.measure_task(loaded, "rca", data, _meter())
    assert calls == [2, 3, 3]  # the warm-up's two items, then two windows
    calls.clear()
    look = prepare_task("rca", loaded.tokenizer, data)
    look = replace(look, encoded=look.encoded[:2])
    inference.score(loaded, look)
    evaluation.measure_task(loaded, "rca", data, _meter())
    assert calls == [3, 3]  # no warm-up: the look was it
    other = load_model(ModelSettings(name="tiny-random-llama"), "fp32")
    evaluation.measure_task(other, "rca", data, _meter())
    assert calls == [3, 3, 2, 3, 3]  # another model object warms up as before


def test_the_generation_warm_up_writes_a_few_tokens(tiny_model, monkeypatch):
    from llm_energy.phases import evaluation

    lengths: list[int] = []
    real = evaluation.generate_encoded
    monkeypatch.setattr(evaluation, "generate_encoded",
                        lambda model, encoded: lengths.append(encoded.new_tokens) or real(model, encoded))
    monkeypatch.setattr(evaluation, "score_resolutions", lambda *a, **k: None)
    monkeypatch.setattr(evaluation, "Embedder", lambda: None)
    data = load_task_data("rca", TaskSettings(max_items=4))
    params = GenerationParams(new_tokens=12, max_items=4, batch_size=2)
    evaluation.measure_generation(tiny_model, data, params, _meter())
    assert lengths == [evaluation.WARMUP_NEW_TOKENS, 12, 12]
