"""Metrics on hand-computed cases, with a fake model whose next-token distribution is known."""

import math

import numpy as np
import pytest
import torch

from llm_energy.data import QAItem, RCAItem, TaskData
from llm_energy.scoring import (
    bootstrap_interval, evaluate_qa, evaluate_rca, macro_f1, score_continuations, score_continuations_unshared,
)


class CharTokenizer:
    """One token per character; ids are code points (< 256 here)."""

    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 2

    def __call__(self, text, add_special_tokens=False):
        if isinstance(text, list):
            return {"input_ids": [[ord(c) for c in t] for t in text]}
        return {"input_ids": [ord(c) for c in text]}


class FavouriteCharModel(torch.nn.Module):
    """Predicts every next token with probability p for `favourite`, the rest spread evenly."""

    def __init__(self, favourite: str, p: float = 0.5, vocab: int = 256):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        probs = torch.full((vocab,), (1 - p) / (vocab - 1))
        probs[ord(favourite)] = p
        self.logits_row = probs.log()

    def forward(self, input_ids, attention_mask=None, **kwargs):
        batch, width = input_ids.shape
        return Output(logits=self.logits_row.expand(batch, width, -1).clone(), cache=FakeCache())


class FakeCache:
    def batch_repeat_interleave(self, repeats):
        pass


class Output(dict):
    """Like transformers' ModelOutput: keys and attributes."""

    __getattr__ = dict.__getitem__


def test_score_continuations_exact_loglik():
    model, tok = FavouriteCharModel("a", p=0.5), CharTokenizer()
    scores = score_continuations(model, tok, "Q:", [" a", " ab"])
    other = math.log(0.5 / 255)
    # " a": ' ' is not the favourite, 'a' is. " ab": one more non-favourite token.
    assert scores.loglik[0] == pytest.approx(other + math.log(0.5))
    assert scores.loglik[1] == pytest.approx(2 * other + math.log(0.5))
    assert list(scores.continuation_chars) == [2, 3]
    # the context once, then each continuation minus its last token
    assert scores.n_tokens == 2 + 1 + 2
    reference = score_continuations_unshared(model, tok, "Q:", [" a", " ab"])
    assert reference.loglik == pytest.approx(scores.loglik)


def test_trailing_space_moves_to_continuation():
    model, tok = FavouriteCharModel("a"), CharTokenizer()
    a = score_continuations(model, tok, "Q: ", ["a"])
    b = score_continuations(model, tok, "Q:", [" a"])
    assert a.loglik[0] == pytest.approx(b.loglik[0])


def test_acc_and_acc_norm_differ_as_defined():
    # Favourite 'b': choice "bbbb" gets the best summed loglik only per char; "b" the best sum.
    model, tok = FavouriteCharModel("b", p=0.9), CharTokenizer()
    item = QAItem(id="1", question="q", choices=("xy", "bbbb", "b"), answer=1)
    result = evaluate_qa(model, tok, TaskData("qa", "t", "test", (item,)), prompt="{question}")
    lls = score_continuations(model, tok, "q", [" xy", " bbbb", " b"]).loglik
    assert int(np.argmax(lls)) == 2  # the short one wins on the sum
    assert int(np.argmax(lls / np.array([2, 4, 1]))) == 1  # the long one per character of the choice
    assert result.metrics == {"acc": 0.0, "acc_norm": 1.0}


def test_rca_predicts_by_normalised_loglik_and_scores_macro_f1():
    model, tok = FavouriteCharModel("f", p=0.9), CharTokenizer()
    items = (
        RCAItem("1", "t1", "fff_fff"),
        RCAItem("2", "t2", "fff_fff"),
        RCAItem("3", "t3", "power"),
    )
    data = TaskData("rca", "t", "test", items, labels=("fff_fff", "power"))
    result = evaluate_rca(model, tok, data, prompt="{ticket} {labels}:")
    assert result.predictions == (0, 0, 0)
    assert result.metrics["accuracy"] == pytest.approx(2 / 3)
    # label 0: tp=2 fp=1 fn=0 -> F1 0.8; label 1: tp=0 fn=1 -> 0.
    assert result.metrics["macro_f1"] == pytest.approx(0.4)


def test_macro_f1_hand_case():
    assert macro_f1([0, 0, 1, 1], [0, 1, 1, 1], 2) == pytest.approx((2 / 3 + 0.8) / 2)
    assert macro_f1([0, 1], [0, 1], 3) == 1.0  # labels absent from both are not averaged


def test_bootstrap_interval_brackets_mean_and_is_seeded():
    values = np.array([1.0] * 30 + [0.0] * 10)
    low, high = bootstrap_interval(values, seed=3)
    assert low < 0.75 < high
    assert (low, high) == bootstrap_interval(values, seed=3)
    assert bootstrap_interval(np.ones(5)) == (1.0, 1.0)


def test_shared_context_matches_unshared_on_a_real_model(tiny_model):
    context = "Network fault ticket:\nLOS on 6 sites of ring R4 at 02:14\nRoot cause:"
    labels = [" fibre cut", " power failure", " congestion", " hardware fault"]
    shared = score_continuations(tiny_model.model, tiny_model.tokenizer, context, labels)
    unshared = score_continuations_unshared(tiny_model.model, tiny_model.tokenizer, context, labels)
    assert shared.loglik == pytest.approx(unshared.loglik, abs=1e-4)
    assert shared.n_tokens < unshared.n_tokens
