"""phases/reuse.py: the scoring path and tokenised requests a study's first job computes, reused by its
later jobs on the same model files, and recomputed whenever anything they depend on changes."""

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from llm_energy.config import ModelSettings
from llm_energy.items import QAItem, TaskData
from llm_energy.methods import scoring
from llm_energy.models.loading import load_model
from llm_energy.phases import reuse

SPEC = ModelSettings(name="tiny-random-llama")


def _qa_data(n: int = 3) -> TaskData:
    items = tuple(QAItem(id=f"q{i}", question=f"Which layer carries frame {i}?",
                         choices=("physical", "data link", "network"), answer=i % 3) for i in range(n))
    return TaskData(task="qa", source="test", split="test", items=items)


@pytest.fixture()
def fresh_model():
    """A model object of its own: the scoring decisions are kept per model object."""
    return load_model(SPEC, "fp32")


def test_the_first_job_checks_and_a_later_one_reuses(tmp_path, fresh_model, monkeypatch):
    path, reused = reuse.scoring_path(tmp_path, fresh_model, SPEC, None)
    assert not reused and path.name in ("packed", "shared_cache")
    saved = list((tmp_path / "state" / "reuse").glob("scoring_path-*.json"))
    assert len(saved) == 1
    decisions = json.loads(saved[0].read_text())["decisions"]
    assert decisions == scoring.scoring_decisions(fresh_model.model)

    later = load_model(SPEC, "fp32")
    assert scoring.scoring_decisions(later.model)["packed"] is None  # a new model object: undecided

    def no_probe(*args, **kwargs):
        raise AssertionError("the layout probes ran again")

    monkeypatch.setattr(reuse, "choose_scoring_path", no_probe)
    again, reused = reuse.scoring_path(tmp_path, later, SPEC, None)
    assert reused and again.name == path.name and "reused from state/reuse/" in again.reason
    assert scoring.scoring_decisions(later.model) == decisions


def test_another_precision_or_kernel_or_code_is_checked_again(tmp_path, fresh_model, monkeypatch):
    reuse.scoring_path(tmp_path, fresh_model, SPEC, None)
    bf16 = load_model(SPEC, "bf16")
    assert not reuse.scoring_path(tmp_path, bf16, SPEC, None)[1]
    assert not reuse.scoring_path(tmp_path, load_model(SPEC, "fp32"), SPEC, None, kernel="2:4 sparse")[1]
    assert len(list((tmp_path / "state" / "reuse").glob("scoring_path-*.json"))) == 3
    monkeypatch.setattr(reuse, "library_hash", lambda: "an edited library")
    assert not reuse.scoring_path(tmp_path, load_model(SPEC, "fp32"), SPEC, None)[1]


def test_a_fine_tuned_or_pruned_variant_takes_its_base_verdict(tmp_path, fresh_model, monkeypatch):
    """The probes check code paths, not weight values: a LoRA-wrapped model and a model with zeroed
    weights of the same architecture and precision reuse the base's verdict."""
    import torch
    from peft import LoraConfig, get_peft_model

    path, _ = reuse.scoring_path(tmp_path, fresh_model, SPEC, None)
    monkeypatch.setattr(reuse, "choose_scoring_path", lambda *a, **k: pytest.fail("probes ran again"))
    lora = load_model(SPEC, "fp32")
    wrapped = get_peft_model(lora.model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    lora = replace(lora, model=wrapped)
    again, reused = reuse.scoring_path(tmp_path, lora, SPEC, None)
    assert reused and again.name == path.name
    pruned = load_model(SPEC, "fp32")
    with torch.no_grad():
        for module in pruned.model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight[:, ::2] = 0
    assert reuse.scoring_path(tmp_path, pruned, SPEC, None)[1]
    # and the scores the reused verdict gives are the probes' own on that model
    monkeypatch.undo()
    fresh_pruned = load_model(SPEC, "fp32")
    fresh_pruned.model.load_state_dict(pruned.model.state_dict())
    assert scoring.choose_scoring_path(fresh_pruned.model, fresh_pruned.tokenizer).name == path.name


def test_a_damaged_record_is_ignored_and_rewritten(tmp_path, fresh_model):
    reuse.scoring_path(tmp_path, fresh_model, SPEC, None)
    (saved,) = (tmp_path / "state" / "reuse").glob("scoring_path-*.json")
    saved.write_text("{not json")
    path, reused = reuse.scoring_path(tmp_path, load_model(SPEC, "fp32"), SPEC, None)
    assert not reused and json.loads(saved.read_text())["name"] == path.name


def test_tokenised_requests_are_reused_across_precisions(tmp_path, fresh_model):
    data = _qa_data()
    first = reuse.prepared_task(tmp_path, fresh_model, SPEC, None, "qa", data, None, "options")
    direct = scoring.prepare_task("qa", fresh_model.tokenizer, data, None, "options")
    assert first == direct
    (saved,) = (tmp_path / "state" / "reuse").glob("tokens-*.pkl")
    stamp = saved.stat().st_mtime_ns
    again = reuse.prepared_task(tmp_path, load_model(SPEC, "bf16"), SPEC, None, "qa", data, None, "options")
    assert again == direct and saved.stat().st_mtime_ns == stamp  # read, not rewritten
    # other texts (another style, other items) are tokenised again, under another key
    reuse.prepared_task(tmp_path, fresh_model, SPEC, None, "qa", data, None, "cloze")
    reuse.prepared_task(tmp_path, fresh_model, SPEC, None, "qa", _qa_data(2), None, "options")
    assert len(list((tmp_path / "state" / "reuse").glob("tokens-*.pkl"))) == 3


def test_model_files_changing_invalidate(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"a": 1}')
    (folder / "weights.bin").write_bytes(b"1234")
    before = reuse.folder_fingerprint(folder)
    os.utime(folder / "weights.bin", ns=(1, 1))
    assert reuse.folder_fingerprint(folder) != before
    assert reuse.folder_fingerprint(Path("HuggingFaceTB/SmolLM2-135M")) is None  # a hub id: never reused


def test_the_first_items_a_reader_looks_at_are_the_tokenised_task_cut(tmp_path, fresh_model):
    """inference.first_items takes the study's tokenised requests (or makes them, for the job's windows
    too) and cuts them: the same requests as tokenising the first items alone."""
    from llm_energy.phases import inference
    from llm_energy.phases.evaluation import ConfigRun, load_task_sets

    run = ConfigRun.from_parameters(
        study_dir=str(tmp_path), config_id="tiny__fp32", model={"name": "tiny-random-llama"},
        precision="fp32", device="cpu", tasks={"rca": None, "qa": {"max_items": 6, "style": "options"}},
        energy={}, seed=0, base_dir="")
    look = inference.first_items(run, fresh_model, n=3)
    data = load_task_sets(run.tasks, run.base_dir)["qa"]
    few = replace(data, items=data.items[:3])
    alone = scoring.prepare_task("qa", fresh_model.tokenizer, few, None, "options")
    assert look.encoded == alone.encoded and look.data.items == few.items
    assert list((tmp_path / "state" / "reuse").glob("tokens-*.pkl"))  # kept for the job's windows
