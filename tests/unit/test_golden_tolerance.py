"""The golden snapshot's comparison off the machine that wrote it (tests/e2e/test_smoke_unchanged.py):
integers and texts exact, floats within the stated tolerance, and a change beyond it still caught."""

import importlib.util
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("smoke_unchanged",
                                              ROOT / "tests" / "e2e" / "test_smoke_unchanged.py")
golden = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = golden  # dataclasses look their module up while the class is built
spec.loader.exec_module(golden)


@pytest.fixture()
def study(tmp_path, monkeypatch):
    """A 'study' whose tables are the snapshot's, compared as on another CPU."""
    tables = tmp_path / "tables"
    tables.mkdir()
    for name in golden.TABLES:
        shutil.copy(golden.GOLDEN / f"{name}.csv", tables / f"{name}.csv")
    monkeypatch.setattr(golden, "machine_signature",
                        lambda: {"machine": "x86_64", "torch": "2.13.0", "isa": ["avx2"]})
    return tmp_path


def _edit(study: Path, name: str, edit) -> None:
    path = study / "tables" / f"{name}.csv"
    frame = pd.read_csv(path, dtype=str)
    edit(frame)
    frame.to_csv(path, index=False)


def _first(frame: pd.DataFrame, config_id: str, task: str, metric: str) -> pd.Index:
    return frame.index[(frame["config_id"] == config_id) & (frame["task"] == task) & (frame["metric"]
                                                                                      == metric)]


def test_the_snapshot_matches_itself_off_its_machine(study):
    assert golden.compare(study) == []


def test_one_flipped_item_of_a_reduced_precision_is_within_the_tolerance(study):
    cid = "tiny-random-llama__bf16"
    rows = _first(pd.read_csv(study / "tables" / "item_scores.csv", dtype=str), cid, "qa", "acc")
    n = len(rows)

    def flip(frame):
        frame.loc[rows[0], "value"] = str(1.0 - float(frame.loc[rows[0], "value"]))

    def move_mean(frame):
        index = _first(frame, cid, "qa", "acc")[0]
        frame.loc[index, "value"] = str(float(frame.loc[index, "value"]) + 1.0 / n)

    _edit(study, "item_scores", flip)
    _edit(study, "scores", move_mean)
    assert golden.compare(study) == []


def test_more_flips_than_allowed_or_a_moved_loss_are_caught(study):
    cid = "tiny-random-llama__fp32"
    rows = _first(pd.read_csv(study / "tables" / "item_scores.csv", dtype=str), cid, "qa", "acc")

    def flip_three(frame):
        for index in rows[:3]:
            frame.loc[index, "value"] = str(1.0 - float(frame.loc[index, "value"]))

    def move_loss(frame):
        frame.loc[0, "train_loss"] = str(float(frame.loc[0, "train_loss"]) * 1.01)

    _edit(study, "item_scores", flip_three)
    _edit(study, "training", move_loss)
    problems = golden.compare(study)
    assert any("item_scores: tiny-random-llama__fp32 qa acc: 3 of" in p for p in problems), problems
    assert any(p.startswith("training.train_loss") for p in problems), problems


def test_integers_and_texts_stay_exact_off_the_machine(study):
    def edit(frame):
        frame.loc[0, "n_tokens"] = str(int(frame.loc[0, "n_tokens"]) + 1)

    _edit(study, "energy", edit)
    assert any(p.startswith("energy.n_tokens") for p in golden.compare(study))
