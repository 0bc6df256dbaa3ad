import json

import pytest

from llm_energy.config import TaskSettings
from llm_energy.data.tasks import (
    assign_splits,
    load_all_splits,
    load_task_data,
    skipped_rows,
    split_rows,
    stratified_sample,
)
from llm_energy.items import DataError, QAItem, RCAItem


def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


QA = [
    {"id": "q1", "question": "Which NF handles sessions?", "choices": ["AMF", "SMF", "UPF"], "answer": 1},
    {"id": "q2", "question": "Bits per 16-QAM symbol?", "choices": ["2", "4", "6"], "answer": "B"},
    {"id": "q3", "question": "User plane function?", "choices": ["AMF", "UPF"], "answer": "UPF"},
]


WHOLE = {"split_fractions": (0, 0)}  # a file without splits, all of it in the test split


def test_qa_answers_as_index_letter_or_text(tmp_path):
    data = load_task_data("qa", TaskSettings(data=str(write_jsonl(tmp_path / "qa.jsonl", QA)), **WHOLE))
    assert [i.answer for i in data.items] == [1, 1, 1]
    assert data.split == "test" and len(data) == 3


@pytest.mark.parametrize(
    "record, message",
    [
        ({"question": "q", "choices": ["a", "b"], "answer": 2},
         r"qa.jsonl:2: field 'answer' index 2 is out of range for 2 choices"),
        ({"question": "  ", "choices": ["a", "b"], "answer": 0}, r"qa.jsonl:2: field 'question' is empty"),
        ({"question": "q", "choices": ["a"], "answer": 0},
         r"field 'choices' must be a list of at least 2 choices"),
        ({"question": "q", "choices": ["a", "a"], "answer": 0}, r"field 'choices' choices repeat"),
        ({"question": "q", "choices": ["a", "b"]}, r"field 'answer' is missing"),
        ({"id": "q1", "question": "q", "choices": ["a", "b"], "answer": 0},
         r"duplicate id 'q1' \(first on line 1\)"),
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
    data = load_task_data("rca", TaskSettings(data=str(path),
                                              columns={"ticket": "desc", "root_cause": "cause",
                                                                        "resolution": "fix"}, **WHOLE))
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
    with pytest.raises(DataError, match=r"rca.jsonl:2: field 'root_cause' 'gremlins' is not in the label set "
                                        r"\['fibre_cut', 'power_failure'\]"):
        load_task_data("rca", TaskSettings(data=str(path), labels=["fibre_cut", "power_failure"]))
    data = load_task_data("rca", TaskSettings(data=str(path), **WHOLE))
    assert data.labels == ("fibre_cut", "gremlins")


def _qa_items(n_per_category: dict[str, int]) -> list[QAItem]:
    return [QAItem(id=f"{cat}-{i}", question=f"q {cat} {i}", choices=("a", "b"), answer=0, category=cat)
            for cat, n in n_per_category.items() for i in range(n)]


def test_split_assignment_is_seeded_stratified_and_disjoint():
    items = _qa_items({"lexicon": 50, "standards": 200, "research": 750})
    a = assign_splits(items, (0.6, 0.1), seed=3)
    assert a == assign_splits(items, (0.6, 0.1), seed=3)
    assert a != assign_splits(items, (0.6, 0.1), seed=4)
    assert set(a) == {i.id for i in items}  # every item in exactly one split
    for cat, n in {"lexicon": 50, "standards": 200, "research": 750}.items():
        mine = [a[i.id] for i in items if i.category == cat]
        assert mine.count("train") == round(0.6 * n) and mine.count("validation") == round(0.1 * n)
        assert mine.count("test") == n - round(0.6 * n) - round(0.1 * n)


def test_file_without_splits_gets_disjoint_assigned_splits(tmp_path):
    records = [{"id": f"t{i}", "ticket": f"alarm {i}", "root_cause": ("fibre_cut", "power_failure")[i % 2]}
               for i in range(40)]
    path = write_jsonl(tmp_path / "rca.jsonl", records)
    settings = TaskSettings(data=str(path), split_fractions=(0.5, 0.25))
    splits = load_all_splits("rca", settings)
    ids = {name: {i.id for i in data.items} for name, data in splits.items()}
    assert set(ids) == {"train", "validation", "test"}
    assert (not (ids["train"] & ids["test"]) and not (ids["validation"] & ids["test"])
            and not (ids["train"] & ids["validation"]))
    assert (sum(len(v) for v in ids.values()) == 40 and len(ids["train"]) == 20
            and len(ids["validation"]) == 10)
    scored = load_task_data("rca", settings.model_copy(update={"max_items": 4}))
    assert {i.id for i in scored.items} <= ids["test"]
    rows = split_rows("rca", settings.model_copy(update={"max_items": 4}))
    assert {r["assigned_by"] for r in rows} == {"assigned"} and sum(r["scored"] for r in rows) == 4
    assert all(r["split"] == "test" for r in rows if r["scored"])


def test_stratified_sample_keeps_class_shares():
    items = _qa_items({"lexicon": 50, "standards": 200, "research": 750})
    sample = stratified_sample(items, 100, seed=0)
    counts = {cat: sum(i.category == cat for i in sample) for cat in ("lexicon", "standards", "research")}
    assert counts == {"lexicon": 5, "standards": 20, "research": 75}
    assert sample == stratified_sample(items, 100, seed=0)
    assert [items.index(i) for i in sample] == sorted(items.index(i) for i in sample)  # file order


def test_invalid_records_skip_lists_each_with_line_field_and_reason(tmp_path):
    good = [dict(QA[0], id=f"q{i}") for i in range(5)]
    bad = [{"id": "b1", "question": "", "choices": ["a", "b"], "answer": 0},
           {"id": "b2", "question": "q", "choices": ["a", "a"], "answer": 0},
           {"id": "b3", "question": "q", "choices": ["a", "b"], "answer": 7}]
    path = write_jsonl(tmp_path / "qa.jsonl", good[:2] + bad + good[2:])
    with pytest.raises(DataError, match=r"qa.jsonl:3: field 'question' is empty"):
        load_task_data("qa", TaskSettings(data=str(path), **WHOLE))
    settings = TaskSettings(data=str(path), invalid_records="skip", **WHOLE)
    data = load_task_data("qa", settings)
    assert [i.id for i in data.items] == [f"q{i}" for i in range(5)]
    rows = skipped_rows("qa", settings)
    assert ([(r["line"], r["record"], r["field"]) for r in rows]
            == [(3, "b1", "question"), (4, "b2", "choices"),
                (5, "b3", "answer")])
    assert "out of range" in rows[2]["reason"] and rows[0]["file"] == str(path)


def test_a_file_of_only_invalid_records_is_an_error_even_when_skipping(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "", "choices": ["a", "b"], "answer": 0}])
    with pytest.raises(DataError, match="holds no valid records"):
        load_task_data("qa", TaskSettings(data=str(path), invalid_records="skip"))


def test_rca_strata_are_root_causes():
    items = [RCAItem(id=f"r{i}", ticket="t", root_cause=("a", "b", "c", "d")[i % 4]) for i in range(40)]
    assignment = assign_splits(items, (0.5, 0.0), seed=0)
    for cause in "abcd":
        assert [assignment[i.id] for i in items if i.root_cause == cause].count("train") == 5


def test_a_file_whose_every_record_is_invalid_says_why_for_the_first_ones(tmp_path):
    from llm_energy.config import TaskSettings
    from llm_energy.data.tasks import load_task_data
    from llm_energy.items import DataError

    path = tmp_path / "qa.jsonl"
    path.write_text('{"question": "q1", "choices": ["a", "b"], "answer": 5}\n'
                    '{"question": "q2", "choices": ["a", "a"], "answer": 0}\n'
                    '{"question": "q3", "choices": "ab", "answer": 0}\n')
    # Failed before: only "holds no valid records", with no line, field or reason.
    with pytest.raises(DataError, match=r"all 3 were left out as invalid.*line 1 field 'answer': index 5 is "
                                        r"out of range.*line 2 field 'choices'.*line 3 field 'choices'"):
        load_task_data("qa", TaskSettings(data=str(path), invalid_records="skip"))
