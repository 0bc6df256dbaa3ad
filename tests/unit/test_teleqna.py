"""TeleQnA's own format: a small file made here, and the real benchmark when ../shared has it."""

import json

import pytest

from llm_energy.config import TaskSettings, load_study
from llm_energy.data import load_task_data
from llm_energy.items import DataError

SHARED_ZIP = None


def teleqna_zip(root):
    path = root.parent / "shared" / "datasets" / "teleqna" / "TeleQnA.zip"
    return path if path.is_file() else None


def test_teleqna_json_is_read(tmp_path):
    data = {
        "question 0": {"question": "What does UPF stand for?", "option 1": "User Plane Function",
                       "option 2": "Unified Policy Framework", "answer": "option 1: User Plane Function",
                       "explanation": "", "category": "Lexicon"},
        "question 1": {"question": "Which release?", "option 1": "15", "option 2": "16", "option 3": "17",
                       "answer": "option 3: 17", "category": "Standards overview"},
    }
    path = tmp_path / "TeleQnA.txt"
    path.write_text(json.dumps(data))
    items = load_task_data("qa", TaskSettings(data=str(path))).items
    assert [i.answer for i in items] == [0, 2]
    assert items[1].choices == ("15", "16", "17") and items[0].category == "Lexicon"


def test_teleqna_answer_naming_a_missing_option(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"question 0": {"question": "q", "option 1": "a", "option 2": "b",
                                               "answer": "option 5: e"}}))
    with pytest.raises(DataError, match=r"\[question 0\]: field 'answer' names option 5, which does not exist"):
        load_task_data("qa", TaskSettings(data=str(path)))


def test_real_teleqna_zip(root):
    path = teleqna_zip(root)
    if path is None:
        pytest.skip("../shared/datasets/teleqna/TeleQnA.zip is absent (shared folder not beside the repo)")
    with pytest.raises(DataError, match="cannot be decrypted.*set tasks.qa.password"):
        load_task_data("qa", TaskSettings(data=str(path)))
    with pytest.raises(DataError, match="the password is wrong"):
        load_task_data("qa", TaskSettings(data=str(path), password="nope"))
    data = load_task_data("qa", TaskSettings(data=str(path), password="teleqnadataset"))
    assert len(data) == 10_000
    assert {i.category for i in data.items} >= {"Lexicon", "Standards specifications", "Research publications"}
    assert all(0 <= i.answer < len(i.choices) for i in data.items)
    sample = load_task_data("qa", TaskSettings(data=str(path), password="teleqnadataset", max_items=200))
    assert len(sample) == 200
    study = load_study(root / "params" / "teleqna.yaml")
    assert study.tasks.rca is None and study.tasks.qa.max_items == 200
