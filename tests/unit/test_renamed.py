"""The old names of renamed functions (issue 27, item 6) still work, warn, and call the new ones."""

import pytest

from llm_energy.methods import scoring
from llm_energy.models.loading import DeviceUnavailable, LoadedModel, PrecisionUnsupported
from llm_energy.phases import inference, pruning


def _recording(calls):
    def record(*args, **kwargs):
        calls.append((args, kwargs))
        return "done"
    return record


@pytest.mark.parametrize("module, old, new, args", [
    (scoring, "evaluate", "score_task", ("qa", "model", "tokenizer", "data")),
    (inference, "evaluate", "measure_config_tasks", ("run", "loaded", "meter")),
    (pruning, "evaluate", "measure_pruned_config", ("run", "loaded", "meter", "outcome")),
    (pruning, "evaluate_recovered", "measure_recovered_config", ("recovery", "meter", "outcome")),
])
def test_old_name_warns_and_delegates(monkeypatch, module, old, new, args):
    calls = []
    monkeypatch.setattr(module, new, _recording(calls))
    with pytest.warns(DeprecationWarning, match=new):
        assert getattr(module, old)(*args) == "done"
    assert len(calls) == 1 and calls[0][0][: len(args)] == args


def test_compute_dtype_is_the_compute_description():
    loaded = LoadedModel(model=None, tokenizer=None, name="m", precision="nf4", device="cpu",
                         weights_origin="", n_parameters=0, memory_bytes=0,
                         compute_description="nf4 weights, float32 compute", load_s=0.0)
    assert loaded.compute_dtype == loaded.compute_description == "nf4 weights, float32 compute"


def test_a_missing_device_is_still_a_precision_the_runner_skips():
    assert issubclass(DeviceUnavailable, PrecisionUnsupported)
