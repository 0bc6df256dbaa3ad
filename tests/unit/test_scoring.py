"""Metrics on hand-computed cases, with a fake model whose next-token distribution is known."""

import math

import numpy as np
import pytest
import torch

from llm_energy.items import QAItem, RCAItem, TaskData
from llm_energy.methods import scoring
from llm_energy.methods.scoring import (
    bootstrap_interval,
    evaluate_qa,
    evaluate_rca,
    macro_f1,
    score_continuations,
    score_continuations_unshared,
    score_many,
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


# --- the one-forward packed layout against the reference, on the tiny random Llama ------------------

RCA_CONTEXT = "Network fault ticket:\nLOS on 6 sites of ring R4 at 02:14\nRoot cause:"
PACKED_CASES = {
    # choices of different token lengths (one of them a single token)
    "different_lengths": (RCA_CONTEXT,
                          [" fibre cut", " power failure", " a", " congestion on the aggregation ring"]),
    # every continuation a single token: only the context is fed
    "single_tokens": ("Q: which fails?\nA:", [" a", " b"]),
    "one_single_token": ("Q: which fails?\nA:", [" b"]),
    # the trailing space moves into each continuation
    "trailing_space": ("Question: what fails?\nAnswer: ", ["fibre cut", "power", "hardware fault"]),
}


def _fed_tokens(tokenizer, context, continuations):
    ctx, conts = scoring._encode_item(tokenizer, context, continuations)
    return ctx, conts, len(ctx) + sum(len(c) - 1 for c in conts)


@pytest.fixture
def fresh_verification(monkeypatch):
    """An empty per-model verification record, so that a test sees (and leaves) no earlier state."""
    record = scoring.weakref.WeakKeyDictionary()
    monkeypatch.setattr(scoring, "_PACKED_VERIFIED", record)
    monkeypatch.setattr(scoring, "_PREFIX_VERIFIED", scoring.weakref.WeakKeyDictionary())
    return record


@pytest.mark.parametrize("case", sorted(PACKED_CASES))
def test_packed_matches_unshared_reference(tiny_model, case):
    model, tok = tiny_model.model, tiny_model.tokenizer
    context, continuations = PACKED_CASES[case]
    ctx, conts, fed = _fed_tokens(tok, context, continuations)
    if case == "single_tokens" or case == "one_single_token":
        assert all(len(c) == 1 for c in conts)
    if case == "different_lengths":
        assert len({len(c) for c in conts}) >= 3 and min(len(c) for c in conts) == 1
    reference = score_continuations_unshared(model, tok, context, continuations)
    packed = scoring._score_packed_rows(model, [[(ctx, conts)]])[0][0]
    assert packed == pytest.approx(list(reference.loglik), abs=1e-4)
    scores = score_continuations(model, tok, context, continuations)
    assert scores.loglik == pytest.approx(reference.loglik, abs=1e-4)
    assert scores.n_tokens == fed  # the context once, then each continuation minus its last token
    assert list(scores.continuation_chars) == [len(c) for c in continuations]


def test_packed_continuations_do_not_see_each_other(tiny_model):
    model, tok = tiny_model.model, tiny_model.tokenizer
    context, continuations = PACKED_CASES["different_lengths"]
    ctx, conts, _ = _fed_tokens(tok, context, continuations)
    forward = scoring._score_packed_rows(model, [[(ctx, conts)]])[0][0]
    backward = scoring._score_packed_rows(model, [[(ctx, conts[::-1])]])[0][0]
    assert backward[::-1] == pytest.approx(forward, abs=1e-5)


def test_packed_is_used_once_verified(tiny_model, fresh_verification, monkeypatch):
    model, tok = tiny_model.model, tiny_model.tokenizer
    context, continuations = PACKED_CASES["different_lengths"]
    reference = score_continuations_unshared(model, tok, context, continuations).loglik
    assert scoring._packed_supported(model, 10) is None  # eligible (llama, sdpa), not yet verified
    first = score_continuations(model, tok, context, continuations)  # checks packed against the cache
    assert fresh_verification.get(model) is True
    calls = []
    monkeypatch.setattr(scoring, "_score_with_shared_cache", lambda *a: calls.append(a))
    second = score_continuations(model, tok, context, continuations)
    assert calls == []  # one packed forward, no shared-cache pass
    assert first.loglik == pytest.approx(reference, abs=1e-4)
    assert second.loglik == pytest.approx(reference, abs=1e-4)


def test_score_many_packs_items_like_one_at_a_time(tiny_model, fresh_verification):
    model, tok = tiny_model.model, tiny_model.tokenizer
    requests = [PACKED_CASES[case] for case in sorted(PACKED_CASES)] * 2
    references = [score_continuations_unshared(model, tok, c, conts) for c, conts in requests]
    fresh_verification[model] = True
    for max_tokens in (1, 40, 10_000):  # each item alone, a few per forward, all in one forward
        got = score_many(model, tok, requests, max_tokens=max_tokens)
        for scores, reference, (context, continuations) in zip(got, references, requests):
            assert scores.loglik == pytest.approx(reference.loglik, abs=1e-4)
            assert scores.n_tokens == _fed_tokens(tok, context, continuations)[2]


def test_packed_eager_attention_takes_an_additive_mask(fresh_verification):
    from llm_energy.config import ModelSettings
    from llm_energy.models.loading import load_model

    loaded = load_model(ModelSettings(name="tiny-random-llama"), "fp32")
    loaded.model.set_attn_implementation("eager")
    assert loaded.model.config._attn_implementation == "eager"
    model, tok = loaded.model, loaded.tokenizer
    requests = [PACKED_CASES["different_lengths"], PACKED_CASES["trailing_space"]]
    fresh_verification[model] = True
    for scores, (context, continuations) in zip(score_many(model, tok, requests), requests):
        reference = score_continuations_unshared(model, tok, context, continuations)
        assert scores.loglik == pytest.approx(reference.loglik, abs=1e-4)


def test_packed_matches_unshared_at_nf4(fresh_verification):
    from llm_energy.config import ModelSettings
    from llm_energy.models.loading import load_model, precision_support

    reason = precision_support("nf4", "cpu")
    if reason:
        pytest.skip(reason)
    loaded = load_model(ModelSettings(name="tiny-random-llama"), "nf4")
    model, tok = loaded.model, loaded.tokenizer
    for case in sorted(PACKED_CASES):
        context, continuations = PACKED_CASES[case]
        reference = score_continuations_unshared(model, tok, context, continuations)
        ctx, conts, fed = _fed_tokens(tok, context, continuations)
        assert (scoring._score_packed_rows(model, [[(ctx, conts)]])[0][0]
                == pytest.approx(list(reference.loglik), abs=1e-3))
        scores = score_continuations(model, tok, context, continuations)
        assert scores.loglik == pytest.approx(reference.loglik, abs=1e-3)
        assert scores.n_tokens == fed
    assert fresh_verification.get(model) is True  # the quantized model passed the check and packs


@pytest.mark.parametrize("case", sorted(PACKED_CASES))
def test_fallback_shared_cache_matches_unshared(tiny_model, case, monkeypatch):
    model, tok = tiny_model.model, tiny_model.tokenizer
    context, continuations = PACKED_CASES[case]
    reference = score_continuations_unshared(model, tok, context, continuations)
    monkeypatch.setattr(scoring, "_packed_supported", lambda model, length: False)
    monkeypatch.setattr(scoring, "_score_packed_rows", lambda *a: pytest.fail("packed path used"))
    scores = score_continuations(model, tok, context, continuations)
    assert scores.loglik == pytest.approx(reference.loglik, abs=1e-4)
    assert scores.n_tokens == _fed_tokens(tok, context, continuations)[2]


def test_packed_that_raises_falls_back_for_good(tiny_model, fresh_verification, monkeypatch):
    model, tok = tiny_model.model, tiny_model.tokenizer
    context, continuations = PACKED_CASES["different_lengths"]
    reference = score_continuations_unshared(model, tok, context, continuations).loglik
    fresh_verification[model] = True

    def refuse(*args):
        raise TypeError("unexpected keyword argument 'position_ids'")

    monkeypatch.setattr(scoring, "_score_packed_rows", refuse)  # what scoring calls, one or several rows
    assert (score_continuations(model, tok, context, continuations).loglik
            == pytest.approx(reference, abs=1e-4))
    assert fresh_verification[model] is False
    assert scoring._packed_supported(model, 10) is False


def test_packed_that_disagrees_is_not_used(tiny_model, fresh_verification, monkeypatch):
    model, tok = tiny_model.model, tiny_model.tokenizer
    context, continuations = PACKED_CASES["different_lengths"]
    reference = score_continuations_unshared(model, tok, context, continuations).loglik
    real = scoring._score_packed_rows
    monkeypatch.setattr(scoring, "_score_packed_rows", lambda m, rows, prefix=None: [
        [[x + 0.5 for x in t] for t in row] for row in real(m, rows, prefix)])
    assert (score_continuations(model, tok, context, continuations).loglik
            == pytest.approx(reference, abs=1e-4))
    assert fresh_verification[model] is False


def test_models_outside_the_known_set_use_the_shared_cache(tiny_model, monkeypatch):
    assert scoring._packed_supported(FavouriteCharModel("a"), 3) is False  # no config at all
    monkeypatch.setattr(tiny_model.model.config, "_attn_implementation", "flash_attention_2")
    assert scoring._packed_supported(tiny_model.model, 3) is False


def test_scoring_path_is_chosen_before_scoring_and_then_fixed(tiny_model, fresh_verification, monkeypatch):
    model, tok = tiny_model.model, tiny_model.tokenizer
    assert scoring._packed_supported(model, 10) is None  # nothing decided yet
    path = scoring.choose_scoring_path(model, tok)
    assert path.name == "packed" and fresh_verification.get(model) is True
    # Once chosen, scoring runs no check: no shared-cache pass, no second verification.
    monkeypatch.setattr(scoring, "_score_with_shared_cache",
                        lambda *a: pytest.fail("a check ran while scoring"))
    context, continuations = PACKED_CASES["different_lengths"]
    score_many(model, tok, [(context, continuations)] * 3)
    assert scoring.choose_scoring_path(model, tok) == path


def test_scoring_path_names_why_it_is_the_shared_cache(tiny_model, fresh_verification, monkeypatch):
    model, tok = tiny_model.model, tiny_model.tokenizer
    real = scoring._score_packed_rows
    monkeypatch.setattr(scoring, "_score_packed_rows", lambda m, rows, prefix=None: [
        [[x + 0.5 for x in t] for t in row] for row in real(m, rows, prefix)])
    path = scoring.choose_scoring_path(model, tok)
    assert path.name == "shared_cache" and "failed its check" in path.reason
    monkeypatch.setattr(tiny_model.model.config, "_attn_implementation", "flash_attention_2")
    assert "not known to take a packed 4D mask" in scoring.choose_scoring_path(model, tok).reason


def test_several_packed_rows_in_one_forward_match_one_item_at_a_time(tiny_model, fresh_verification):
    """Rows of different lengths are padded into one forward; every score equals the item run alone."""
    model, tok = tiny_model.model, tiny_model.tokenizer
    requests = [(f"Ticket {i}: " + "alarm " * (1 + 3 * i) + "\nRoot cause:",
                 [" fibre cut", " power", " a routing loop"])
                for i in range(7)]
    fresh_verification[model] = True
    calls = []
    real = scoring._score_packed_rows
    scoring_rows = lambda m, rows, prefix=None: (calls.append(len(rows)), real(m, rows, prefix))[1]  # noqa: E731
    try:
        scoring._score_packed_rows = scoring_rows
        together = score_many(model, tok, requests, max_tokens=40)
    finally:
        scoring._score_packed_rows = real
    assert calls and max(calls) > 1  # several rows went through one forward
    for (context, continuations), got in zip(requests, together):
        alone = score_continuations_unshared(model, tok, context, continuations).loglik
        assert got.loglik == pytest.approx(alone, abs=1e-4)


def test_both_qa_styles_on_the_tiny_model(tiny_model):
    """cloze scores each choice's text; options shows the lettered choices and scores the letters."""
    from llm_energy.methods.scoring import prepare_task, score_prepared, task_result

    items = (QAItem("q1", "Which function anchors the user plane?", ("AMF", "UPF", "Both of the above"), 1),
             QAItem("q2", "Bits per 16-QAM symbol?", ("2", "4", "6", "8"), 1))
    data = TaskData(task="qa", source="synthetic", split="test", items=items)
    tok = tiny_model.tokenizer
    cloze = prepare_task("qa", tok, data, style="cloze")
    options = prepare_task("qa", tok, data, style="options")
    # the options prompt holds every choice with its letter; its continuations are the letters
    context = tok.decode(options.encoded[0].context)
    assert "A. AMF\nB. UPF\nC. Both of the above\nAnswer:" in context
    assert [tok.decode(c) for c in options.encoded[1].continuations] == [" A", " B", " C", " D"]
    assert [tok.decode(c) for c in cloze.encoded[0].continuations] == [" AMF", " UPF", " Both of the above"]
    a = task_result(cloze, score_prepared(tiny_model.model, tok, cloze))
    b = task_result(options, score_prepared(tiny_model.model, tok, options))
    assert set(a.metrics) == {"acc", "acc_norm"} and set(b.metrics) == {"acc"}
    assert a.n_items == b.n_items == 2
    with pytest.raises(ValueError, match=r"needs a prompt with a \{choices\} field"):
        prepare_task("qa", tok, data, prompt="Q: {question}\nA:", style="options")


def test_forward_groups_put_similar_lengths_together_within_the_budget():
    lengths = [30, 80, 10, 80, 55, 31, 10]
    groups = scoring.forward_groups(lengths, 170)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))  # every request once
    assert groups == [[1, 3], [4, 5, 0], [2, 6]]  # longest first; ties keep the requests' order
    assert all(len(g) * lengths[g[0]] <= 170 for g in groups)  # rows x the longest row
    assert scoring.forward_groups([500, 20], 100) == [[0], [1]]  # a row longer than the budget runs alone
    padded = sum(len(g) * lengths[g[0]] for g in groups)
    assert padded - sum(lengths) == (55 - 31) + (55 - 30)  # padding only where lengths differ in a call


def _gqa_reference(query, key, value, mask):
    """Plain softmax attention over the keys given (heads repeated for grouped queries), in float64."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1).double(), value.repeat_interleave(groups, 1).double()
    scores = query.double() @ key.transpose(-1, -2) / query.shape[-1] ** 0.5 + mask.double()
    return (scores.softmax(-1) @ value).transpose(1, 2)


def test_pack_rows_fills_rows_as_long_as_the_longest_request():
    lengths = [30, 80, 10, 80, 55, 31, 10, 25]
    rows = scoring.pack_rows(lengths)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))  # every request once
    assert rows == [[1], [3], [4, 7], [0, 2, 5], [6]]  # first fit, longest first; indices in order
    assert all(sum(lengths[i] for i in row) <= 80 for row in rows)
    assert sum(80 - sum(lengths[i] for i in row) for row in rows) < 80  # padding under one row
    assert scoring.pack_rows([]) == []
    # a sliding window less the prefix caps a row; a request longer than the cap has its own row
    capped = scoring.pack_rows([60, 40, 30, 20], limit=50)
    assert capped == [[0], [1], [2, 3]]
    assert scoring.pack_rows([5, 5], limit=0) == [[0], [1]]


@pytest.mark.parametrize("budget", [None, 1])  # 1 byte: one row per step and one query per slice
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_attention_to_a_prefix_apart_is_the_softmax_over_prefix_and_row(dtype, tol, budget, monkeypatch):
    """Rows attending to a prefix's keys, held once, and to their own (masked) equal attention over the
    prefix and the row together (grouped queries: 6 query heads on 2 kv heads), also when the scores
    are taken a row or a query at a time."""
    if budget is not None:
        monkeypatch.setattr(scoring, "PREFIX_SCORES_BYTES", budget)
    torch.manual_seed(0)
    rows, heads, kv, width, prefix, size = 3, 6, 2, 7, 11, 16
    query = torch.randn(rows, heads, width, size).to(dtype)
    key, value = torch.randn(rows, kv, width, size).to(dtype), torch.randn(rows, kv, width, size).to(dtype)
    prefix_key = torch.randn(1, kv, prefix, size).to(dtype)
    prefix_value = torch.randn(1, kv, prefix, size).to(dtype)
    visible = torch.ones(width, width, dtype=torch.bool).tril().expand(rows, 1, width, width).clone()
    visible[1, 0, 4:, :4] = False  # a second item in row 1 sees only itself
    row_mask = torch.zeros(visible.shape).masked_fill_(~visible, torch.finfo(torch.float32).min)

    class Layer:
        layer_idx = 1

    states = {scoring.PREFIX_KWARG: [None, (prefix_key, prefix_value)]}
    out, _ = scoring._prefix_attention(Layer(), query, key, value, row_mask.to(dtype), scaling=size ** -0.5,
                                       **states)
    whole_key = torch.cat([prefix_key.expand(rows, -1, -1, -1), key], 2)
    whole_value = torch.cat([prefix_value.expand(rows, -1, -1, -1), value], 2)
    whole_mask = torch.cat([torch.zeros(rows, 1, width, prefix), row_mask], -1)
    expected = _gqa_reference(query, whole_key, whole_value, whole_mask)
    assert out.shape == (rows, width, heads, size) and out.dtype == dtype
    assert torch.allclose(out.double(), expected, atol=tol, rtol=tol)


def test_16_bit_scores_are_taken_less_the_first_keys_score_and_keep_their_digits():
    """A first key every query scores high (an attention sink, scores near 40): 16-bit scores taken
    plainly round by up to 0.125 and the output drifts; taken less each query's score against that
    key, the output stays near the float64 softmax."""
    torch.manual_seed(1)
    rows, heads, kv, width, prefix, size = 2, 4, 2, 6, 9, 32
    query = torch.randn(rows, heads, width, size)
    query[..., 0] = 8.0
    key, value = torch.randn(rows, kv, width, size), torch.randn(rows, kv, width, size)
    prefix_key, prefix_value = torch.randn(1, kv, prefix, size), torch.randn(1, kv, prefix, size)
    prefix_key[:, :, 0, 0] = 28.0  # the sink: a score of about 8 x 28 / sqrt(32) = 40 for every query
    prefix_key[:, :, 1:, 0] = 27.5  # other prefix keys close behind it
    visible = torch.ones(width, width, dtype=torch.bool).tril().expand(rows, 1, width, width)
    row_mask = torch.zeros(visible.shape).masked_fill_(~visible, torch.finfo(torch.float32).min)

    class Layer:
        layer_idx = 0

    bf = torch.bfloat16
    states = {scoring.PREFIX_KWARG: [(prefix_key.to(bf), prefix_value.to(bf))]}
    q16, k16, v16 = query.to(bf), key.to(bf), value.to(bf)
    out, _ = scoring._prefix_attention(Layer(), q16, k16, v16, row_mask.to(bf), scaling=size**-0.5, **states)
    whole_key = torch.cat([prefix_key.to(bf).expand(rows, -1, -1, -1), k16], 2)
    whole_value = torch.cat([prefix_value.to(bf).expand(rows, -1, -1, -1), v16], 2)
    whole_mask = torch.cat([torch.zeros(rows, 1, width, prefix), row_mask], -1)
    expected = _gqa_reference(q16, whole_key, whole_value, whole_mask)
    groups = heads // kv
    plain_scores = (q16 * size ** -0.5) @ whole_key.repeat_interleave(groups, 1).transpose(-1, -2)  # bf16 out
    plain = ((plain_scores.double() + whole_mask.double()).softmax(-1)
             @ whole_value.repeat_interleave(groups, 1).double()).transpose(1, 2)
    centred_error = (out.double() - expected).abs().max().item()
    plain_error = (plain - expected).abs().max().item()
    assert centred_error < 0.03 < plain_error


def test_packed_rows_attend_to_a_prefix_held_once_and_take_one_logit_per_predicting_position(
        tiny_model, fresh_verification, monkeypatch):
    """On a CPU, rows after a shared prefix attend to its keys held once (no per-row copy of its cache),
    and the vocabulary projection runs once per position that predicts a token: under the options
    style one per item, whatever the number of lettered choices."""
    from llm_energy.methods.scoring import prepare_task, request_texts, score_prepared

    model, tok = tiny_model.model, tiny_model.tokenizer
    examples = tuple(QAItem(f"e{i}", f"Worked example {i}: which alarm follows a fibre cut on the backbone?",
                            ("LOS", "AIS", "RDI", "BER"), i % 4) for i in range(3))
    items = tuple(QAItem(f"q{i}", "Which alarm " + "really " * i + "comes first?",
                         ("LOS", "AIS", "RDI", "BER"), 0) for i in range(5))
    prepared = prepare_task("qa", tok, TaskData("qa", "x", "test", items, fewshot=examples), style="options")
    scoring.choose_scoring_path(model, tok)
    assert scoring._prefix_sharing_ok(model) and fresh_verification.get(model)
    copies, attended, projected = [], [], []
    monkeypatch.setattr(scoring._PrefixCache, "fresh", lambda self, n: copies.append(n))
    real_attention, real_logits = scoring._prefix_attention, scoring._final_logits
    monkeypatch.setattr(scoring, "_prefix_attention",
                        lambda *a, **k: (attended.append(1), real_attention(*a, **k))[1])
    monkeypatch.setattr(scoring, "_final_logits",
                        lambda m, h: (projected.append(h.shape[0]), real_logits(m, h))[1])
    got = score_prepared(model, tok, prepared)
    assert copies == [] and len(attended) == model.config.num_hidden_layers
    assert projected == [len(items)]  # one position per item, four letters scored from it
    for (context, continuations), scores in zip(request_texts("qa", prepared.data, style="options"), got):
        alone = score_continuations_unshared(model, tok, context, continuations).loglik
        assert scores.loglik == pytest.approx(alone, abs=1e-4)


def test_short_items_share_a_row_and_score_as_they_would_alone(tiny_model, fresh_verification, monkeypatch):
    """Items much shorter than the longest fill one packed row between them (after a shared prefix, on
    a CPU); each still sees only its own tokens and the prefix: the scores are those of the item alone."""
    from llm_energy.methods.scoring import prepare_task, request_texts, score_prepared

    model, tok = tiny_model.model, tiny_model.tokenizer
    examples = tuple(QAItem(f"e{i}", f"Worked example {i}: which alarm follows a fibre cut?",
                            ("LOS", "AIS", "RDI", "BER"), i % 4) for i in range(2))
    letters = ("LOS", "AIS", "RDI", "BER")
    items = (QAItem("long", "Which alarm " + "really " * 80 + "comes first?", letters, 0),
             *(QAItem(f"q{i}", f"Alarm {i}?", letters, 1) for i in range(3)))
    prepared = prepare_task("qa", tok, TaskData("qa", "x", "test", items, fewshot=examples), style="options")
    scoring.choose_scoring_path(model, tok)
    rows_seen = []
    real_rows = scoring._score_packed_rows
    monkeypatch.setattr(scoring, "_score_packed_rows",
                        lambda m, rows, prefix=None: (rows_seen.append([len(r) for r in rows]),
                                                      real_rows(m, rows, prefix))[1])
    got = score_prepared(model, tok, prepared)
    assert rows_seen == [[1, 3]]  # one forward: the long item alone, the three short ones in one row
    for (context, continuations), scores in zip(request_texts("qa", prepared.data, style="options"), got):
        alone = score_continuations_unshared(model, tok, context, continuations).loglik
        assert scores.loglik == pytest.approx(alone, abs=1e-4)
