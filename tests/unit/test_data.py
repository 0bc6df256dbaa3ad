import json

import pytest

from llm_energy.config import TaskSettings
from llm_energy.data import load_all_splits, load_task_data
from llm_energy.items import DataError


def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


QA = [
    {"id": "q1", "question": "Which NF handles sessions?", "choices": ["AMF", "SMF", "UPF"], "answer": 1},
    {"id": "q2", "question": "Bits per 16-QAM symbol?", "choices": ["2", "4", "6"], "answer": "B"},
    {"id": "q3", "question": "User plane function?", "choices": ["AMF", "UPF"], "answer": "UPF"},
]


def test_qa_answers_as_index_letter_or_text(tmp_path):
    data = load_task_data("qa", TaskSettings(data=str(write_jsonl(tmp_path / "qa.jsonl", QA))))
    assert [i.answer for i in data.items] == [1, 1, 1]
    assert data.split == "test" and len(data) == 3  # a file without splits is used whole


@pytest.mark.parametrize(
    "record, message",
    [
        ({"question": "q", "choices": ["a", "b"], "answer": 2}, r"qa.jsonl:2: field 'answer' index 2 is out of range for 2 choices"),
        ({"question": "  ", "choices": ["a", "b"], "answer": 0}, r"qa.jsonl:2: field 'question' is empty"),
        ({"question": "q", "choices": ["a"], "answer": 0}, r"field 'choices' must be a list of at least 2 choices"),
        ({"question": "q", "choices": ["a", "a"], "answer": 0}, r"field 'choices' choices repeat"),
        ({"question": "q", "choices": ["a", "b"]}, r"field 'answer' is missing"),
        ({"id": "q1", "question": "q", "choices": ["a", "b"], "answer": 0}, r"duplicate id 'q1' \(first on line 1\)"),
    ],
)
def test_qa_errors_name_file_line_field(tmp_path, record, message):
    path = write_jsonl(tmp_path / "qa.jsonl", [QA[0], record])
    with pytest.raises(DataError, match=message):
        load_task_data("qa", TaskSettings(data=str(path)))


def test_broken_json_line(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps(QA[0]) + "\n{not json\n")
    with pytest.raises(DataError, match=r"qa.jsonl:2: is not valid JSON"):
        load_task_data("qa", TaskSettings(data=str(path)))


def test_undecodable_text(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_bytes(json.dumps(QA[0]).encode() + b"\n\xff\xfe bad\n")
    with pytest.raises(DataError, match=r"qa.jsonl:2: is not valid UTF-8"):
        load_task_data("qa", TaskSettings(data=str(path)))


def test_rca_csv_with_column_mapping(tmp_path):
    path = tmp_path / "tickets.csv"
    path.write_text("desc,cause,fix\nLOS on ring,fibre_cut,spliced\nmains off,power_failure,genset\n")
    data = load_task_data("rca", TaskSettings(data=str(path), columns={"ticket": "desc", "root_cause": "cause",
                                                                        "resolution": "fix"}))
    assert [i.root_cause for i in data.items] == ["fibre_cut", "power_failure"]
    assert data.labels == ("fibre_cut", "power_failure")
    with pytest.raises(DataError, match=r"mapped column\(s\) \['nope'\] not in the header"):
        load_task_data("rca", TaskSettings(data=str(path), columns={"ticket": "nope"}))


def test_rca_missing_label(tmp_path):
    path = write_jsonl(tmp_path / "rca.jsonl", [{"ticket": "site down"}])
    with pytest.raises(DataError, match=r"rca.jsonl:1: field 'root_cause' is missing"):
        load_task_data("rca", TaskSettings(data=str(path)))


def test_split_selection_and_seeded_sample(tmp_path):
    records = [dict(QA[0], id=f"q{i}", split="test" if i % 2 else "train") for i in range(20)]
    path = write_jsonl(tmp_path / "qa.jsonl", records)
    a = load_task_data("qa", TaskSettings(data=str(path), max_items=4, sample_seed=1))
    b = load_task_data("qa", TaskSettings(data=str(path), max_items=4, sample_seed=1))
    assert [i.id for i in a.items] == [i.id for i in b.items] and len(a) == 4
    assert all(int(i.id[1:]) % 2 for i in a.items)
    with pytest.raises(DataError, match=r"no items in split 'validation'; splits found: \['test', 'train'\]"):
        load_task_data("qa", TaskSettings(data=str(path), split="validation"))
    assert set(load_all_splits("qa", TaskSettings(data=str(path)))) == {"test", "train"}


def test_builtin_data_has_splits_for_both_tasks():
    for task in ("rca", "qa"):
        splits = load_all_splits(task, TaskSettings())
        assert {"train", "validation", "test"} <= set(splits)
        assert all(len(d) > 0 for d in splits.values())


def test_rca_label_outside_label_set(tmp_path):
    path = write_jsonl(tmp_path / "rca.jsonl", [{"ticket": "LOS ring 4", "root_cause": "fibre_cut"},
                                                {"ticket": "ghosts", "root_cause": "gremlins"}])
    with pytest.raises(DataError, match=r"rca.jsonl:2: field 'root_cause' 'gremlins' is not in the label set \['fibre_cut', 'power_failure'\]"):
        load_task_data("rca", TaskSettings(data=str(path), labels=["fibre_cut", "power_failure"]))
    data = load_task_data("rca", TaskSettings(data=str(path)))
    assert data.labels == ("fibre_cut", "gremlins")
