"""Cross-check of our multiple-choice scorer against lm-evaluation-harness, accuracy and speed.

The same questions (200 seeded TeleQnA questions when the dataset is in shared/, else the built-in
QA test split), the same model (the embedded SmolLM2-135M at fp32, loaded once and handed to both)
and the same prompt ("Question: {question}\\nAnswer:", each choice a continuation " {choice}") are
scored by ``llm_energy.scoring.evaluate_qa`` (each question's context and choices packed into one
sequence under a 4D attention mask, a few questions per forward call) and by lm-eval's
``HFLM.loglikelihood`` in-process,
with requests built here rather than through lm-eval's task and dataset machinery (no hub access).
acc and acc_norm are computed from lm-eval's log-likelihoods exactly as its multiple_choice tasks
do (``ConfigurableTask.process_results``): acc_norm divides by ``len(choice)``, the choice string
without the target delimiter. Model loading is outside every timed region; each scorer gets an
untimed warm-up on a few questions first.

    .venv/bin/python benchmarks/mcq_vs_lm_eval.py [--items 200] [--batch-sizes 1 8] [--warmup 3] [--threads 1]

Needs the optional dependency lm-eval (pip install lm-eval==0.4.13).

Last line: speedup=<best lm-eval time / ours> acc_delta=<ours - lm-eval acc>
acc_norm_delta=<ours - lm-eval acc_norm>   (targets: speedup >= 2, |deltas| <= 0.005)
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROMPT = "Question: {question}\nAnswer:"
TELEQNA_ZIP = Path(__file__).resolve().parents[2] / "shared/datasets/teleqna/TeleQnA.zip"


def load_questions(n_items: int):
    from llm_energy.config import TaskSettings
    from llm_energy.data import load_task_data

    if TELEQNA_ZIP.is_file():
        settings = TaskSettings(data=str(TELEQNA_ZIP), password="teleqnadataset", max_items=n_items, sample_seed=0)
        source = f"TeleQnA ({TELEQNA_ZIP.name}, seeded sample, seed 0)"
    else:
        settings = TaskSettings(split="test", max_items=n_items)
        source = "built-in QA test split (TeleQnA zip not found)"
    return load_task_data("qa", settings), source


def lm_eval_requests(items):
    """One loglikelihood Instance per (question, choice), as lm-eval's multiple_choice tasks build them."""
    from lm_eval.api.instance import Instance

    requests = []
    for doc_id, item in enumerate(items):
        doc = {"question": item.question, "choices": list(item.choices), "gold": item.answer}
        context = PROMPT.format(question=item.question)
        for i, choice in enumerate(item.choices):
            requests.append(Instance(request_type="loglikelihood", doc=doc, arguments=(context, f" {choice}"),
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--warmup", type=int, default=3, help="untimed warm-up questions per scorer")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for both scorers (1: OpenMP spinning on a shared machine makes "
                             "multi-threaded timings erratic)")
    parser.add_argument("--diag-items", type=int, default=20,
                        help="questions whose per-choice log-likelihoods are compared (plus every disagreement)")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    args = parser.parse_args()

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from lm_eval.models.huggingface import HFLM

    from llm_energy.config import ModelSettings
    from llm_energy.items import TaskData
    from llm_energy.models import load_model
    from llm_energy.scoring import evaluate_qa, score_continuations

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # the "pretrained is not a str" warning is expected
    data, source = load_questions(args.items)
    items = list(data.items)
    gold = np.array([item.answer for item in items])
    loaded = load_model(ModelSettings(name=args.model), "fp32")
    model, tokenizer = loaded.model, loaded.tokenizer
    print(f"questions: {len(items)} from {source}; choices: {sum(len(i.choices) for i in items)}; "
          f"model {args.model} fp32 on {loaded.device}; torch threads {torch.get_num_threads()}",
          flush=True)

    warm = TaskData(task="qa", source=data.source, split=data.split, items=tuple(items[: args.warmup]))

    # --- ours -------------------------------------------------------------------------------------
    evaluate_qa(model, tokenizer, warm, PROMPT, n_boot=10)
    start = time.perf_counter()
    ours = evaluate_qa(model, tokenizer, data, PROMPT)
    ours_s = time.perf_counter() - start
    ours_pred = np.array(ours.predictions)
    ours_norm_correct = ours.per_item["acc_norm"]
    print(f"ours: {ours_s:.2f}s", flush=True)

    # --- lm-eval ----------------------------------------------------------------------------------
    runs = {}
    for batch_size in args.batch_sizes:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device="cpu")
        lm.loglikelihood(lm_eval_requests(items[: args.warmup]), disable_tqdm=True)
        requests = lm_eval_requests(items)
        start = time.perf_counter()
        results = lm.loglikelihood(requests, disable_tqdm=True)
        elapsed = time.perf_counter() - start
        runs[batch_size] = (elapsed, *lm_eval_metrics(items, results))
        print(f"lm-eval batch_size={batch_size}: {elapsed:.2f}s", flush=True)

    # --- untimed diagnostic: our per-choice log-likelihoods against lm-eval's, on the first questions
    # and on every question where a prediction differs (numbers, not just argmaxes)
    diag = set(range(min(args.diag_items, len(items))))
    for _, pred, pred_norm, _, _ in runs.values():
        diag |= set(np.flatnonzero((pred != ours_pred) | ((pred_norm == gold) != ours_norm_correct.astype(bool))))
    diag = sorted(int(i) for i in diag)
    ours_lls = {i: score_continuations(model, tokenizer, PROMPT.format(question=items[i].question),
                                       [" " + c for c in items[i].choices]).loglik for i in diag}

    # --- table ------------------------------------------------------------------------------------
    ours_acc, ours_acc_norm = ours.metrics["acc"], ours.metrics["acc_norm"]
    print()
    print(f"{'scorer':<22} {'time s':>8} {'q/s':>7} {'acc':>7} {'acc_norm':>9} {'pred agree':>11} "
          f"{'norm agree':>11} {'max|dLL|':>9}"
          f"  (max|dLL|: per-choice log-likelihood, over {len(diag)} questions)")
    print(f"{'llm_energy (ours)':<22} {ours_s:>8.2f} {len(items) / ours_s:>7.2f} {ours_acc:>7.4f} "
          f"{ours_acc_norm:>9.4f} {'-':>11} {'-':>11} {'-':>9}")
    for batch_size, (elapsed, pred, pred_norm, pred_norm_space, lls) in runs.items():
        acc = float((pred == gold).mean())
        acc_norm = float((pred_norm == gold).mean())
        agree = int((pred == ours_pred).sum())
        # ours exposes acc_norm per question as correct/incorrect; compare correctness per question
        norm_agree = int(((pred_norm == gold).astype(float) == ours_norm_correct).sum())
        max_dll = max(float(np.max(np.abs(lls[i] - ours_lls[i]))) for i in diag)
        print(f"{'lm-eval bs=' + str(batch_size):<22} {elapsed:>8.2f} {len(items) / elapsed:>7.2f} {acc:>7.4f} "
              f"{acc_norm:>9.4f} {f'{agree}/{len(items)}':>11} {f'{norm_agree}/{len(items)}':>11} {max_dll:>9.2e}")

    best_bs = min(runs, key=lambda b: runs[b][0])
    best_s, pred, pred_norm, pred_norm_space, lls = runs[best_bs]
    lm_acc = float((pred == gold).mean())
    lm_acc_norm = float((pred_norm == gold).mean())
    lm_acc_norm_space = float((pred_norm_space == gold).mean())
    disagree = [items[i].id for i in np.flatnonzero(pred != ours_pred)]
    norm_disagree = [items[i].id for i in np.flatnonzero((pred_norm == gold).astype(float) != ours_norm_correct)]
    print()
    print(f"acc prediction disagreements (vs lm-eval bs={best_bs}): {len(disagree)} {disagree[:10]}")
    print(f"acc_norm correctness disagreements: {len(norm_disagree)} {norm_disagree[:10]}")
    print(f"lm-eval acc_norm if normalised by len(' ' + choice) (a common mistake): {lm_acc_norm_space:.4f} "
          f"(lm-eval's own definition, len(choice): {lm_acc_norm:.4f})")
    print(f"headline speedup: lm-eval best (bs={best_bs}) {best_s:.2f}s / ours {ours_s:.2f}s")
    print(f"speedup={best_s / ours_s:.2f} acc_delta={ours_acc - lm_acc:+.4f} "
          f"acc_norm_delta={ours_acc_norm - lm_acc_norm:+.4f}")


if __name__ == "__main__":
    main()
