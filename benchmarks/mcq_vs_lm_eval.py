"""Cross-check of our multiple-choice scorer against lm-evaluation-harness, accuracy and speed,
for both question styles and both embedded models.

The same questions (a seeded 200-question sample of the test split of TeleQnA as the package ships
it, stratified by category; the 17 published questions with a repeated choice are left out), the
same model (loaded once and handed to both scorers) and the same requests, built by
``llm_energy.methods.scoring.request_texts`` as the study builds them:

- ``cloze``: "Question: {question}\nAnswer:", each choice a continuation " {choice}";
  acc and acc_norm (lm-eval divides by ``len(choice)``, without the target delimiter).
- ``options``: "Question: {question}\nA. ...\nB. ...\nAnswer:", each letter a continuation " A",
  " B", ... (lm-eval's MMLU-style layout); acc.
- ``--fewshot K`` (default 5, the default study's ``qa.fewshot``): before every question, the same K
  worked examples from TeleQnA's train split (the prompt, " " and the answer, then a blank line:
  lm-eval's default few-shot layout), in the context string both scorers receive.

Ours is ``llm_energy.methods.scoring.evaluate_qa`` (each question's context and choices packed into one
sequence under a 4D attention mask, a few questions per forward call; the worked examples' tokens,
shared by every context, run once per call as a key/value cache every row continues); lm-eval's is
``HFLM.loglikelihood`` in-process, with requests built here rather than through lm-eval's task and
dataset machinery (no hub access), and ``add_bos_token`` set as our scorer does (Gemma: its <bos>;
SmolLM2: none). Model loading is outside every timed region; each scorer gets an untimed warm-up.

    .venv/bin/python benchmarks/mcq_vs_lm_eval.py [--items 200] [--models smollm2-135m-instruct gemma-3-270m]
        [--styles cloze options] [--fewshot 5] [--batch-sizes 1 8] [--warmup 3] [--threads 1]

Needs the optional dependency lm-eval (pip install -e ".[bench]", i.e. lm-eval==0.4.13).

One line per model and style, then the last line over all of them: speedup=<the smallest of
(best lm-eval time / ours)> acc_delta=<the largest |ours - lm-eval| of acc and acc_norm>
(targets: speedup >= 2, acc_delta <= 0.005).
"""

from __future__ import annotations

import argparse
import logging
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CLOZE_PROMPT = "Question: {question}\nAnswer:"
OPTIONS_PROMPT = "Question: {question}\n{choices}\nAnswer:"


def load_questions(n_items: int, fewshot: int):
    from llm_energy.config import TaskSettings
    from llm_energy.data.tasks import load_task_data

    settings = TaskSettings(data="teleqna", invalid_records="skip", max_items=n_items, sample_seed=0,
                            fewshot=fewshot)
    shots = (f"; {fewshot} worked examples from the train split before each question" if fewshot
             else "; zero-shot")
    return load_task_data("qa", settings), f"TeleQnA (packaged), test split, stratified sample, seed 0{shots}"


def requests_for(data, style: str):
    """(context, continuations) per question, as both scorers receive them (the study's own texts)."""
    from llm_energy.methods.scoring import request_texts

    return request_texts("qa", data, OPTIONS_PROMPT if style == "options" else CLOZE_PROMPT, style)


def lm_eval_requests(data, style: str):
    """One loglikelihood Instance per (question, choice), as lm-eval's multiple_choice tasks build them."""
    from lm_eval.api.instance import Instance

    requests = []
    for doc_id, (item, (context, continuations)) in enumerate(zip(data.items, requests_for(data, style))):
        doc = {"question": item.question, "choices": list(item.choices), "gold": item.answer}
        for i, continuation in enumerate(continuations):
            requests.append(Instance(request_type="loglikelihood", doc=doc, arguments=(context, continuation),
                                     idx=i, metadata=("teleqna_mcq", doc_id, 1)))
    return requests


def lm_eval_metrics(items, results):
    """Per-question predictions from lm-eval's (loglik, is_greedy) results, as process_results does."""
    import numpy as np

    preds, preds_norm, preds_norm_space, lls_all = [], [], [], []
    pos = 0
    for item in items:
        lls = np.array([ll for ll, _ in results[pos : pos + len(item.choices)]])
        pos += len(item.choices)
        completion_len = np.array([float(len(c)) for c in item.choices])  # lm-eval: len(choice), no delimiter
        preds.append(int(np.argmax(lls)))
        preds_norm.append(int(np.argmax(lls / completion_len)))
        preds_norm_space.append(int(np.argmax(lls / (completion_len + 1))))  # len(" " + choice): diagnostic
        lls_all.append(lls)
    return np.array(preds), np.array(preds_norm), np.array(preds_norm_space), lls_all


def compare(model, tokenizer, data, style: str, batch_sizes, warmup: int) -> dict:
    """Ours and lm-eval on one style: times, metrics, agreement."""
    from dataclasses import replace

    import numpy as np
    from lm_eval.models.huggingface import HFLM

    from llm_energy.methods.scoring import evaluate_qa, special_prefix

    items = list(data.items)
    gold = np.array([item.answer for item in items])
    prompt = OPTIONS_PROMPT if style == "options" else CLOZE_PROMPT
    warm = replace(data, items=tuple(items[:warmup]))
    evaluate_qa(model, tokenizer, warm, prompt, n_boot=10, style=style)
    start = time.perf_counter()
    ours = evaluate_qa(model, tokenizer, data, prompt, style=style)
    ours_s = time.perf_counter() - start
    ours_pred = np.array(ours.predictions)

    runs = {}
    for batch_size in batch_sizes:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device="cpu",
                  add_bos_token=bool(special_prefix(tokenizer)))
        lm.loglikelihood(lm_eval_requests(warm, style), disable_tqdm=True)
        requests = lm_eval_requests(data, style)
        start = time.perf_counter()
        results = lm.loglikelihood(requests, disable_tqdm=True)
        runs[batch_size] = (time.perf_counter() - start, *lm_eval_metrics(items, results))
    best = min(runs, key=lambda b: runs[b][0])
    best_s, pred, pred_norm, _, _ = runs[best]
    deltas = {"acc": ours.metrics["acc"] - float((pred == gold).mean())}
    if style == "cloze":
        deltas["acc_norm"] = ours.metrics["acc_norm"] - float((pred_norm == gold).mean())
    return {"ours_s": ours_s, "lm_eval_s": best_s, "best_bs": best,
            "times": {b: r[0] for b, r in runs.items()}, "ours": ours.metrics, "deltas": deltas,
            "agree": int((pred == ours_pred).sum()), "n": len(items)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "gemma-3-270m"])
    parser.add_argument("--styles", nargs="+", default=["cloze", "options"], choices=["cloze", "options"])
    parser.add_argument("--fewshot", type=int, default=5,
                        help="worked examples before each question (0: zero-shot)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--warmup", type=int, default=3, help="untimed warm-up questions per scorer")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for both scorers (1: OpenMP spinning on a shared machine makes "
                             "multi-threaded timings erratic)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from llm_energy.config import ModelSettings
    from llm_energy.models.loading import load_model

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # the "pretrained is not a str" warning is expected
    data, source = load_questions(args.items, args.fewshot)
    print(f"questions: {len(data.items)} from {source}; choices: {sum(len(i.choices) for i in data.items)}; "
          f"torch threads {torch.get_num_threads()}", flush=True)
    print(f"{'model':<24} {'style':<8} {'ours s':>7} {'lm-eval s':>9} {'bs':>3} {'speedup':>8} {'acc':>7} "
          f"{'acc_norm':>9} {'d acc':>8} {'d acc_norm':>10} {'pred agree':>11}", flush=True)
    speedups, deltas = [], []
    for name in args.models:
        loaded = load_model(ModelSettings(name=name), "fp32")
        for style in args.styles:
            r = compare(loaded.model, loaded.tokenizer, data, style, args.batch_sizes, args.warmup)
            speedup = r["lm_eval_s"] / r["ours_s"]
            speedups.append(speedup)
            deltas += [abs(d) for d in r["deltas"].values()]
            acc_norm = r["ours"].get("acc_norm")
            d_norm = r["deltas"].get("acc_norm")
            print(f"{name:<24} {style:<8} {r['ours_s']:>7.2f} {r['lm_eval_s']:>9.2f} {r['best_bs']:>3} "
                  f"{speedup:>8.2f} {r['ours']['acc']:>7.4f} "
                  f"{acc_norm if acc_norm is not None else float('nan'):>9.4f} {r['deltas']['acc']:>+8.4f} "
                  f"{d_norm if d_norm is not None else float('nan'):>+10.4f} {r['agree']:>5}/{r['n']:<5}",
                  flush=True)
    print(f"speedup={min(speedups):.2f} acc_delta={max(deltas):.4f}")


if __name__ == "__main__":
    main()
