"""TeleQnA's own format: a small file made here, and the real benchmark shipped in the package."""

import json

import pytest

from llm_energy.config import TaskSettings, load_study
from llm_energy.data.tasks import TELEQNA_ZIP, load_all_splits, load_task_data, skipped_rows
from llm_energy.items import DataError


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
    items = load_task_data("qa", TaskSettings(data=str(path), split_fractions=(0, 0))).items
    assert [i.answer for i in items] == [0, 2]
    assert items[1].choices == ("15", "16", "17") and items[0].category == "Lexicon"


def test_teleqna_answer_naming_a_missing_option(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"question 0": {"question": "q", "option 1": "a", "option 2": "b",
                                               "answer": "option 5: e"}}))
    with pytest.raises(DataError, match=r"\[question 0\]: field 'answer' names option 5, which does not "
                                        r"exist"):
        load_task_data("qa", TaskSettings(data=str(path)))


def test_teleqna_ships_in_the_package_with_its_licence_and_citation():
    folder = TELEQNA_ZIP.parent
    assert TELEQNA_ZIP.is_file() and (folder / "LICENSE").is_file() and (folder / "CITATION.txt").is_file()
    assert ("MIT License" in (folder / "LICENSE").read_text()
            and "2310.15051" in (folder / "CITATION.txt").read_text())
    assert not list(folder.glob("*.txt*")) or [p.name for p in folder.glob("*.txt")] == ["CITATION.txt"]


def test_packaged_teleqna_reads_with_its_public_password(root):
    # The published file has 17 questions whose choices repeat: refused by default, listed with skip.
    with pytest.raises(DataError, match=r"TeleQnA.zip \[question 390\]: field 'options' the choice .* "
                                        r"appears more than once"):
        load_task_data("qa", TaskSettings(data="teleqna"))
    settings = TaskSettings(data="teleqna", invalid_records="skip")
    skipped = skipped_rows("qa", settings)
    assert len(skipped) == 17 and {r["field"] for r in skipped} == {"options"}
    splits = load_all_splits("qa", settings)
    sizes = {name: len(data) for name, data in splits.items()}
    assert sum(sizes.values()) == 10_000 - 17 and 2900 < sizes["test"] < 3100
    test_ids = {i.id for i in splits["test"].items}
    assert not test_ids & {i.id for i in splits["train"].items}
    sample = load_task_data("qa", settings.model_copy(update={"max_items": 200}))
    assert len(sample) == 200 and {i.id for i in sample.items} <= test_ids and sample.source == "teleqna"
    shares = {c: sum(i.category == c for i in sample.items) for c in {i.category for i in sample.items}}
    assert shares["Research publications"] == 90 and shares["Lexicon"] == 10  # 45% and 5% of TeleQnA


def test_teleqna_zip_by_path_needs_the_password():
    with pytest.raises(DataError, match="cannot be decrypted.*set tasks.qa.password"):
        load_task_data("qa", TaskSettings(data=str(TELEQNA_ZIP)))
    with pytest.raises(DataError, match="the password is wrong"):
        load_task_data("qa", TaskSettings(data=str(TELEQNA_ZIP), password="nope"))


def test_teleqna_study_file_needs_nothing_outside_the_repository(root):
    study = load_study(root / "params" / "teleqna.yaml")
    assert study.tasks.rca is None and study.tasks.qa.data == "teleqna" and study.tasks.qa.max_items >= 200
