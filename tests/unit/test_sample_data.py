"""Tests for the built-in RCA and telecom QA sample data and its generator (tools/make_sample_data.py)."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import re
from collections import Counter

import pytest

_TOOL = pathlib.Path(__file__).resolve().parents[2] / "tools" / "make_sample_data.py"
_spec = importlib.util.spec_from_file_location("make_sample_data", _TOOL)
sample_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sample_data)


@pytest.fixture(scope="module")
def rca() -> list[dict]:
    return sample_data.generate_rca()


@pytest.fixture(scope="module")
def qa() -> list[dict]:
    return sample_data.generate_qa()


def _load_jsonl(path: pathlib.Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


# ------------------------------------------------------------------------------------- RCA


def test_rca_count_and_fields(rca: list[dict]) -> None:
    assert len(rca) >= 400
    for rec in rca:
        assert list(rec) == ["id", "ticket", "root_cause", "resolution", "split"]
        assert all(isinstance(rec[k], str) and rec[k] for k in rec)


def test_rca_labels_and_balance(rca: list[dict]) -> None:
    assert len(sample_data.RCA_LABELS) == 8
    assert len(set(sample_data.RCA_LABELS)) == 8
    assert all(re.fullmatch(r"[a-z]+(_[a-z]+)*", lab) for lab in sample_data.RCA_LABELS)
    counts = Counter(rec["root_cause"] for rec in rca)
    assert set(counts) == set(sample_data.RCA_LABELS)
    mean = len(rca) / len(sample_data.RCA_LABELS)
    for label, n in counts.items():
        assert 0.7 * mean <= n <= 1.3 * mean, (label, n)


def test_rca_ids_and_tickets_unique(rca: list[dict]) -> None:
    ids = [rec["id"] for rec in rca]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"rca-\d{4}", i) for i in ids)
    tickets = [rec["ticket"] for rec in rca]
    assert len(set(tickets)) == len(tickets)


def test_no_test_resolution_appears_in_training_or_validation(rca: list[dict]) -> None:
    # A reference resolution seen word for word in training would reward memorising it.
    trained = {r["resolution"] for r in rca if r["split"] != "test"}
    leaked = sorted({r["resolution"] for r in rca if r["split"] == "test"} & trained)
    assert leaked == []
    shipped = _load_jsonl(sample_data.DATA_DIR / sample_data.RCA_FILENAME)
    assert not ({r["resolution"] for r in shipped if r["split"] == "test"}
                & {r["resolution"] for r in shipped if r["split"] != "test"})


def test_rca_splits_per_label(rca: list[dict]) -> None:
    by_label: dict[str, Counter] = {}
    for rec in rca:
        assert rec["split"] in sample_data.SPLITS
        by_label.setdefault(rec["root_cause"], Counter())[rec["split"]] += 1
    for label, splits in by_label.items():
        total = sum(splits.values())
        for split in sample_data.SPLITS:
            assert splits[split] > 0, (label, split)
        assert 0.5 <= splits["train"] / total <= 0.7, (label, splits)
        assert 0.1 <= splits["validation"] / total <= 0.2, (label, splits)
        assert 0.2 <= splits["test"] / total <= 0.3, (label, splits)


def test_rca_ticket_lengths_vary(rca: list[dict]) -> None:
    lengths = [len(rec["ticket"].split()) for rec in rca]
    assert min(lengths) <= 20
    assert max(lengths) >= 80


def test_rca_has_tickets_that_do_not_name_the_cause(rca: list[dict]) -> None:
    # At least 30% of the tickets must avoid naming their cause outright.
    unnamed = sum(
        1 for rec in rca
        if re.search(sample_data._RCA_FORBIDDEN[rec["root_cause"]], rec["ticket"], re.IGNORECASE) is None
    )
    assert unnamed / len(rca) >= 0.30


# -------------------------------------------------------------------------------------- QA


def test_qa_count_and_fields(qa: list[dict]) -> None:
    assert len(qa) >= 300
    for rec in qa:
        assert list(rec) == ["id", "question", "choices", "answer", "category", "explanation", "split"]
        assert isinstance(rec["answer"], int)
        assert rec["question"] and rec["explanation"]


def test_qa_categories_balanced(qa: list[dict]) -> None:
    counts = Counter(rec["category"] for rec in qa)
    assert set(counts) == set(sample_data.QA_CATEGORIES)
    mean = len(qa) / len(sample_data.QA_CATEGORIES)
    for cat, n in counts.items():
        assert 0.7 * mean <= n <= 1.3 * mean, (cat, n)


def test_qa_ids_and_questions_unique(qa: list[dict]) -> None:
    ids = [rec["id"] for rec in qa]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"qa-\d{4}", i) for i in ids)
    questions = [rec["question"].lower() for rec in qa]
    assert len(set(questions)) == len(questions)


def test_qa_choices_and_answer(qa: list[dict]) -> None:
    for rec in qa:
        choices = rec["choices"]
        assert len(choices) in (4, 5), rec["id"]
        assert all(isinstance(c, str) and c.strip() for c in choices)
        assert len({c.lower() for c in choices}) == len(choices), rec["id"]
        assert 0 <= rec["answer"] < len(choices), rec["id"]
    n_five = sum(len(rec["choices"]) == 5 for rec in qa)
    assert 0.1 <= n_five / len(qa) <= 0.3


def test_qa_answer_positions_roughly_uniform(qa: list[dict]) -> None:
    four = Counter(rec["answer"] for rec in qa if len(rec["choices"]) == 4)
    total = sum(four.values())
    for pos in range(4):
        assert abs(four[pos] / total - 0.25) < 0.08, four


def test_qa_splits_per_category(qa: list[dict]) -> None:
    by_cat: dict[str, Counter] = {}
    for rec in qa:
        assert rec["split"] in sample_data.SPLITS
        by_cat.setdefault(rec["category"], Counter())[rec["split"]] += 1
    for cat, splits in by_cat.items():
        total = sum(splits.values())
        for split in sample_data.SPLITS:
            assert splits[split] > 0, (cat, split)
        assert 0.5 <= splits["train"] / total <= 0.7, (cat, splits)


# ----------------------------------------------------------------------------- determinism


def test_generators_are_deterministic(rca: list[dict], qa: list[dict]) -> None:
    assert sample_data.generate_rca() == rca
    assert sample_data.generate_qa() == qa


def test_other_seed_gives_other_data(rca: list[dict], qa: list[dict]) -> None:
    assert sample_data.generate_rca(seed=1) != rca
    assert sample_data.generate_qa(seed=1) != qa


def test_shipped_files_match_fresh_generation(rca: list[dict], qa: list[dict]) -> None:
    rca_path = sample_data.DATA_DIR / sample_data.RCA_FILENAME
    qa_path = sample_data.DATA_DIR / sample_data.QA_FILENAME
    assert _load_jsonl(rca_path) == rca
    assert _load_jsonl(qa_path) == qa
    # Byte-identical, not just equal after parsing.
    assert rca_path.read_bytes() == sample_data.to_jsonl(rca).encode("utf-8")
    assert qa_path.read_bytes() == sample_data.to_jsonl(qa).encode("utf-8")


def test_write_builtin_to_other_folder(tmp_path: pathlib.Path) -> None:
    paths = sample_data.write_builtin(tmp_path)
    assert set(paths) == {"rca", "qa"}
    assert paths["rca"] == tmp_path / sample_data.RCA_FILENAME
    assert paths["qa"] == tmp_path / sample_data.QA_FILENAME
    shipped = sample_data.DATA_DIR
    assert paths["rca"].read_bytes() == (shipped / sample_data.RCA_FILENAME).read_bytes()
    assert paths["qa"].read_bytes() == (shipped / sample_data.QA_FILENAME).read_bytes()
