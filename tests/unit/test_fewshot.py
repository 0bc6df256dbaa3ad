"""qa.fewshot: worked examples from the train split before every question, their tokens run once."""

import json

import numpy as np
import pytest

from llm_energy.config import TaskSettings, TasksSettings
from llm_energy.data.tasks import load_task_data
from llm_energy.items import DataError, QAItem, TaskData
from llm_energy.methods import scoring
from llm_energy.methods.scoring import (
    encode_requests,
    fewshot_prefix,
    prepare_task,
    request_texts,
    score_continuations_unshared,
    score_encoded,
    shared_prefix_length,
)

TELEQNA = dict(data="teleqna", invalid_records="skip", max_items=40, sample_seed=0, style="options")


def test_examples_come_from_the_train_split_seeded_and_never_scored():
    data = load_task_data("qa", TaskSettings(**TELEQNA, fewshot=5))
    assert len(data.fewshot) == 5
    train_ids = {i.id for i in load_task_data("qa",
                                              TaskSettings(**{**TELEQNA, "max_items": None},
                                                           split="train")).items}
    assert {e.id for e in data.fewshot} <= train_ids
    assert not {e.id for e in data.fewshot} & {i.id for i in data.items}
    again = load_task_data("qa", TaskSettings(**TELEQNA, fewshot=5))
    other = load_task_data("qa", TaskSettings(**{**TELEQNA, "sample_seed": 1}, fewshot=5))
    assert [e.id for e in again.fewshot] == [e.id for e in data.fewshot]
    assert [e.id for e in other.fewshot] != [e.id for e in data.fewshot]
    assert load_task_data("qa", TaskSettings(**TELEQNA)).fewshot == ()


def test_the_prefix_shows_each_example_with_its_answer_then_a_blank_line():
    a = QAItem("a", "Which node anchors the user plane?", ("AMF", "UPF"), 1)
    b = QAItem("b", "What does RRC stand for?", ("Radio Resource Control", "Random Radio Cell"), 0)
    options = fewshot_prefix([a, b], scoring.DEFAULT_QA_OPTIONS_PROMPT, "options")
    assert options == ("Question: Which node anchors the user plane?\nA. AMF\nB. UPF\nAnswer: B\n\n"
                       "Question: What does RRC stand for?\nA. Radio Resource Control\nB. Random Radio "
                       "Cell\nAnswer: A\n\n")
    cloze = fewshot_prefix([a], scoring.DEFAULT_QA_PROMPT, "cloze")
    assert cloze == "Question: Which node anchors the user plane?\nAnswer: UPF\n\n"
    scored = QAItem("q", "Which channel carries DCI?", ("PDCCH", "PDSCH"), 0)
    data = TaskData("qa", "x", "test", (scored,), fewshot=(a, b))
    (context, continuations), = request_texts("qa", data, style="options")
    assert context == options + "Question: Which channel carries DCI?\nA. PDCCH\nB. PDSCH\nAnswer:"
    assert continuations == [" A", " B"]


def test_fewshot_is_refused_where_it_cannot_work(tmp_path):
    with pytest.raises(ValueError, match="rca.fewshot"):
        TasksSettings(rca=TaskSettings(fewshot=3), qa=None)
    with pytest.raises(ValueError, match="the train split, which is the scored split"):
        TasksSettings(rca=None, qa=TaskSettings(fewshot=3, split="train"))
    path = tmp_path / "qa.jsonl"
    rows = [{"question": f"q{i}", "choices": ["a", "b"], "answer": 0, "split": "train" if i < 2 else "test"}
            for i in range(6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"field 'fewshot' fewshot 3 needs 3 items in split 'train'.*it has "
                                        r"2"):
        load_task_data("qa", TaskSettings(data=str(path), fewshot=3))


def _requests(n=6):
    examples = tuple(QAItem(f"e{i}", f"Example question number {i} about alarms on site {i}?",
                            ("fibre cut", "power outage", "routing loop"), i % 3) for i in range(3))
    items = tuple(QAItem(f"q{i}", "Which fault explains " + "a lost link " * (1 + i) + "?",
                         ("fibre cut", "power outage", "a misconfigured routing table"), i % 3)
                  for i in range(n))
    return TaskData("qa", "x", "test", items, fewshot=examples)


@pytest.mark.parametrize("style", ["options", "cloze"])
@pytest.mark.parametrize("packed", [True, False])
def test_scores_after_the_shared_prefix_equal_whole_contexts(tiny_model, monkeypatch, style, packed):
    model, tok = tiny_model.model, tiny_model.tokenizer
    monkeypatch.setattr(scoring, "_PACKED_VERIFIED", scoring.weakref.WeakKeyDictionary())
    monkeypatch.setattr(scoring, "_PREFIX_VERIFIED", scoring.weakref.WeakKeyDictionary())
    if not packed:
        scoring._PACKED_VERIFIED[model] = False
    prepared = prepare_task("qa", tok, _requests(), None, style)
    shared = shared_prefix_length(prepared.encoded)
    assert shared >= scoring.MIN_SHARED_PREFIX
    scoring.choose_scoring_path(model, tok)  # its checks run a probe prefix of their own first
    runs = []
    real = scoring._PrefixCache.run
    monkeypatch.setattr(scoring._PrefixCache, "run", classmethod(
        lambda cls, m, ids: (runs.append(len(ids)), real.__func__(cls, m, ids))[1]))
    got = score_encoded(model, tok, prepared.encoded, max_tokens=64)
    assert runs == [shared]  # the examples ran once, for every row
    assert scoring._prefix_sharing_ok(model)
    for (context, continuations), scores in zip(request_texts("qa", prepared.data, style=style), got):
        alone = score_continuations_unshared(model, tok, context, continuations).loglik
        assert scores.loglik == pytest.approx(alone, abs=1e-4)


def test_a_prefix_path_that_disagrees_is_not_used(tiny_model, monkeypatch):
    model, tok = tiny_model.model, tiny_model.tokenizer
    monkeypatch.setattr(scoring, "_PACKED_VERIFIED", scoring.weakref.WeakKeyDictionary())
    monkeypatch.setattr(scoring, "_PREFIX_VERIFIED", scoring.weakref.WeakKeyDictionary())
    monkeypatch.setattr(scoring._PrefixCache, "fresh", lambda self, batch: {})  # forgets the prefix
    scoring.choose_scoring_path(model, tok)
    assert not scoring._prefix_sharing_ok(model)
    prepared = prepare_task("qa", tok, _requests(), None, "options")
    got = score_encoded(model, tok, prepared.encoded)
    for (context, continuations), scores in zip(request_texts("qa", prepared.data, style="options"), got):
        assert (scores.loglik
                == pytest.approx(score_continuations_unshared(model, tok, context, continuations).loglik,
                                 abs=1e-4))


def test_no_prefix_is_shared_below_the_minimum_or_for_one_request(tiny_model):
    tok = tiny_model.tokenizer
    one = encode_requests(tok, [("Question: a long shared header " * 5 + "x?\nAnswer:", [" A", " B"])])
    assert shared_prefix_length(one) == 0
    short = encode_requests(tok, [("Question: x?\nAnswer:", [" A"]), ("Question: y?\nAnswer:", [" A"])])
    assert shared_prefix_length(short) == 0
    long = encode_requests(tok, [("Q " * 40 + "x?\nAnswer:", [" A"]), ("Q " * 40 + "y?\nAnswer:", [" A"])])
    assert shared_prefix_length(long) >= scoring.MIN_SHARED_PREFIX
    assert all(len(r.context) > shared_prefix_length(long) for r in long)
    assert np.isfinite(shared_prefix_length(long))
