"""What a study's inputs alone decide is kept on disk (runner.inputs_cache): the context check and the
plan's work count read no tokenizer on the next run of the same inputs, and any change computes again."""

import json

import pytest

from llm_energy.config import study_from_dict
from llm_energy.runner import checks, inputs_cache, workload
from llm_energy.runner.checks import with_context_exclusions


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(inputs_cache.CACHE_ENV, str(tmp_path / "cache"))


def _study(path, models=None, skip=True):
    rca = {"data": str(path), "split_fractions": [0, 0], **({"invalid_records": "skip"} if skip else {})}
    return study_from_dict({"study": "s", "models": models or [{"name": "tiny-random-llama"}],
                            "precisions": ["fp32"], "tasks": {"rca": rca, "qa": None}})


def _tickets(path, long_ticket="fibre alarm " * 1500):
    records = [{"id": f"t{i}", "ticket": f"alarm {i} on ring",
                "root_cause": ("fibre_cut", "power_failure")[i % 2]} for i in range(12)]
    records[0]["ticket"] = long_ticket
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def _counting_limits(monkeypatch):
    calls = []
    real = checks._model_limits

    def counted(study, base_dir):
        calls.append(1)
        return real(study, base_dir)

    monkeypatch.setattr(checks, "_model_limits", counted)
    return calls


def test_the_next_check_of_the_same_inputs_reads_no_tokenizer(tmp_path, monkeypatch):
    path = _tickets(tmp_path / "rca.jsonl")
    calls = _counting_limits(monkeypatch)
    first, counts = with_context_exclusions(_study(path), tmp_path)
    assert counts == {"rca": 1} and len(calls) == 1
    again, counts_again = with_context_exclusions(_study(path), tmp_path)
    assert len(calls) == 1  # from disk
    assert counts_again == counts and again.tasks.rca.exclude_records == first.tasks.rca.exclude_records
    # under invalid_records: error the check of the scored items is another entry, refused the same way
    problems = checks.data_problems(_study(path, skip=False), tmp_path)
    assert [p.key for p in problems] == ["tasks.rca (item t0)"] and len(calls) == 2
    problems = checks.data_problems(_study(path, skip=False), tmp_path)
    assert [p.key for p in problems] == ["tasks.rca (item t0)"]
    assert len(calls) == 2


def test_a_changed_data_file_is_checked_again(tmp_path, monkeypatch):
    path = _tickets(tmp_path / "rca.jsonl")
    calls = _counting_limits(monkeypatch)
    assert with_context_exclusions(_study(path), tmp_path)[1] == {"rca": 1}
    _tickets(path, long_ticket="fibre alarm")  # nothing too long any more
    assert with_context_exclusions(_study(path), tmp_path)[1] == {}
    assert len(calls) == 2


def test_an_unreadable_entry_is_computed_again(tmp_path, monkeypatch, caplog):
    path = _tickets(tmp_path / "rca.jsonl")
    calls = _counting_limits(monkeypatch)
    with_context_exclusions(_study(path), tmp_path)
    [entry] = inputs_cache.cache_dir().glob("context-*.json")
    entry.write_text("{not json")
    assert with_context_exclusions(_study(path), tmp_path)[1] == {"rca": 1}
    assert len(calls) == 2 and "unreadable" in caplog.text
    assert list(json.loads(entry.read_text())["rca"]) == ["t0"]  # stored again


def test_what_the_key_holds(tmp_path, monkeypatch):
    path = _tickets(tmp_path / "rca.jsonl")
    study = _study(path)
    key = inputs_cache.inputs_key(study, tmp_path, "context")
    assert key is not None and key == inputs_cache.inputs_key(study, tmp_path, "context")
    assert inputs_cache.inputs_key(study, tmp_path, "work") != key
    assert inputs_cache.inputs_key(_study(path, skip=False), tmp_path, "context") != key  # the settings
    monkeypatch.setattr(inputs_cache, "source_digest", lambda: "other code")
    assert inputs_cache.inputs_key(study, tmp_path, "context") != key
    hub = _study(path, models=[{"name": "m", "source": "hub", "path": "org/model"}])
    assert inputs_cache.inputs_key(hub, tmp_path, "context") is None  # not local: never cached
    assert inputs_cache.inputs_key(_study(tmp_path / "missing.jsonl"), tmp_path, "context") is None


def test_the_plans_work_count_round_trips(tmp_path, monkeypatch):
    path = _tickets(tmp_path / "rca.jsonl", long_ticket="fibre alarm")
    study = study_from_dict({"study": "s", "models": [{"name": "tiny-random-llama"}], "precisions": ["fp32"],
                             "phases": ["data", "finetune", "inference", "ranking"],
                             "tasks": {"rca": {"data": str(path), "split_fractions": [0.5, 0.2],
                                               "generation": {"new_tokens": 4, "max_items": 2}}, "qa": None},
                             "finetune": {"task": "rca", "precisions": ["fp32"], "max_train_items": 4,
                                          "max_eval_items": 2}})
    counted = []
    real = workload._count_work
    monkeypatch.setattr(workload, "_count_work", lambda s, b: counted.append(1) or real(s, b))
    first = workload.study_work(study, tmp_path)
    assert first.models["tiny-random-llama"].finetune is not None and not first.unknown
    again = workload.study_work(study, tmp_path)
    assert again == first and len(counted) == 1
