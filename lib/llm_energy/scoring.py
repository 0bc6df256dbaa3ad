"""Task metrics by log-likelihood, with bootstrap confidence intervals over items.

Multiple-choice QA follows lm-evaluation-harness: each choice is a continuation ``" {choice}"`` of
the prompt; ``acc`` picks the highest summed log-likelihood, ``acc_norm`` the highest log-likelihood
divided by the choice's length in characters, without the leading space (lm-eval's ``len(choice)``).

Root-cause analysis scores every label of the data's label set the same way (the label read as
words, e.g. ``" fibre cut"``) and predicts the label with the highest length-normalised
log-likelihood, so that long label names are not penalised; metrics are ``accuracy`` and
``macro_f1``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from .data import QAItem, RCAItem, TaskData, label_text

DEFAULT_QA_PROMPT = "Question: {question}\nAnswer:"
DEFAULT_RCA_PROMPT = (
    "Network fault ticket:\n{ticket}\n"
    "Possible root causes: {labels}.\n"
    "Root cause:"
)


@dataclass(frozen=True)
class ChoiceScores:
    """Log-likelihoods of each choice of one item and the tokens the forward pass processed."""

    loglik: np.ndarray  # summed log-probability of each continuation
    continuation_chars: np.ndarray  # len(" choice") per continuation
    n_tokens: int  # tokens fed to the model for this item (no padding)


@dataclass(frozen=True)
class TaskResult:
    task: str
    metrics: dict[str, float]
    intervals: dict[str, tuple[float, float]]
    per_item: dict[str, np.ndarray] = field(repr=False)  # metric -> per-item values (0/1 etc.)
    item_ids: tuple[str, ...] = field(repr=False)
    predictions: tuple[int, ...] = field(repr=False)
    n_items: int = 0
    n_tokens: int = 0


def _encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    # As lm-evaluation-harness: trailing spaces of the context move to the continuation, and the
    # continuation tokens are what encoding the whole string adds after the context's tokens.
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    return ctx, whole[len(ctx) :]


def score_continuations(model: Any, tokenizer: Any, context: str, continuations: Sequence[str]) -> ChoiceScores:
    """Summed log-likelihood of each continuation after the context.

    The context is run once and its key/value cache shared by every continuation (lm-evaluation-
    harness recomputes it per choice); the scores are the same, the work is not.
    """
    import torch

    pairs = [_encode_pair(tokenizer, context, c) for c in continuations]
    ctx = pairs[0][0]
    conts = [cont for _, cont in pairs]
    for cont in conts:
        if not cont:
            raise ValueError(f"a continuation encodes to no tokens after context {context[-40:]!r}")
    if not ctx:  # a first token is needed to predict from
        ctx = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
    device = next(model.parameters()).device
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ctx], device=device), use_cache=True)
        first = torch.log_softmax(out.logits[0, -1].float(), dim=-1).cpu()
        totals = [float(first[cont[0]]) for cont in conts]
        n_tokens = len(ctx)
        longer = [i for i, cont in enumerate(conts) if len(cont) > 1]
        if longer:
            # Feed every continuation but its last token after the shared cache, padded on the right.
            inputs = [conts[i][:-1] for i in longer]
            width = max(len(x) for x in inputs)
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            ids = torch.full((len(inputs), width), pad, dtype=torch.long)
            mask = torch.zeros((len(inputs), len(ctx) + width), dtype=torch.long)
            mask[:, : len(ctx)] = 1
            for row, x in enumerate(inputs):
                ids[row, : len(x)] = torch.tensor(x)
                mask[row, len(ctx) : len(ctx) + len(x)] = 1
            # transformers renamed past_key_values to cache in 5.x; accept both spellings.
            new_api = "cache" in out
            cache = out["cache"] if new_api else out["past_key_values"]
            cache.batch_repeat_interleave(len(inputs))
            positions = torch.arange(len(ctx), len(ctx) + width).expand(len(inputs), -1)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                           position_ids=positions.to(device), use_cache=True,
                           **{("cache" if new_api else "past_key_values"): cache}).logits
            logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
            for row, i in enumerate(longer):
                targets = torch.tensor(conts[i][1:])
                totals[i] += float(logprobs[row, torch.arange(len(targets)), targets].sum())
                n_tokens += len(inputs[row])
    return ChoiceScores(
        loglik=np.array(totals),
        continuation_chars=np.array([len(c) for c in continuations], dtype=float),
        n_tokens=n_tokens,
    )


def score_continuations_unshared(model: Any, tokenizer: Any, context: str, continuations: Sequence[str]) -> ChoiceScores:
    """The reference computation: context and continuation run together, once per continuation."""
    import torch

    pairs = [_encode_pair(tokenizer, context, c) for c in continuations]
    sequences = []
    for ctx, cont in pairs:
        if not ctx:
            ctx = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
        sequences.append((ctx, cont))
    inputs = [ctx + cont[:-1] for ctx, cont in sequences]
    width = max(len(x) for x in inputs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    ids = torch.full((len(inputs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(inputs), width), dtype=torch.long)
    for row, x in enumerate(inputs):
        ids[row, : len(x)] = torch.tensor(x)
        mask[row, : len(x)] = 1
    with torch.inference_mode():
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
    logprobs = torch.log_softmax(logits, dim=-1).cpu()
    totals = []
    for row, (ctx, cont) in enumerate(sequences):
        positions = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(cont))
        totals.append(float(logprobs[row, positions, torch.tensor(cont)].sum()))
    return ChoiceScores(
        loglik=np.array(totals),
        continuation_chars=np.array([len(c) for c in continuations], dtype=float),
        n_tokens=int(mask.sum()),
    )


def bootstrap_interval(values: np.ndarray, statistic: Callable[[np.ndarray], float] = np.mean,
                       n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of a statistic over items."""
    values = np.asarray(values)
    if len(values) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(values), size=(n_boot, len(values)))
    stats = np.array([statistic(values[d]) for d in draws]) if statistic is not np.mean else values[draws].mean(axis=1)
    alpha = (1 - level) / 2
    return float(np.quantile(stats, alpha)), float(np.quantile(stats, 1 - alpha))


def macro_f1(gold: Sequence[int], predicted: Sequence[int], n_labels: int) -> float:
    """Unweighted mean of per-label F1 over the labels present in gold or predictions."""
    gold, predicted = np.asarray(gold), np.asarray(predicted)
    scores = []
    for label in range(n_labels):
        tp = np.sum((predicted == label) & (gold == label))
        fp = np.sum((predicted == label) & (gold != label))
        fn = np.sum((predicted != label) & (gold == label))
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0


def _bootstrap_macro_f1(gold: np.ndarray, predicted: np.ndarray, n_labels: int, n_boot: int, seed: int) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(gold), size=(n_boot, len(gold)))
    stats = np.array([macro_f1(gold[d], predicted[d], n_labels) for d in draws])
    return float(np.quantile(stats, 0.025)), float(np.quantile(stats, 0.975))


def evaluate_qa(model: Any, tokenizer: Any, data: TaskData, prompt: str | None = None,
                progress: bool = False, n_boot: int = 1000, seed: int = 0) -> TaskResult:
    prompt = prompt or DEFAULT_QA_PROMPT
    correct, correct_norm, predictions, n_tokens = [], [], [], 0
    for item in _iterate(data.items, progress, "qa"):
        assert isinstance(item, QAItem)
        context = prompt.format(question=item.question, choices=_choice_block(item.choices))
        scores = score_continuations(model, tokenizer, context, [" " + c for c in item.choices])
        best = int(np.argmax(scores.loglik))
        # lm-evaluation-harness normalises by len(choice), without the leading space it scores.
        best_norm = int(np.argmax(scores.loglik / np.array([len(c) for c in item.choices], dtype=float)))
        correct.append(float(best == item.answer))
        correct_norm.append(float(best_norm == item.answer))
        predictions.append(best)
        n_tokens += scores.n_tokens
    per_item = {"acc": np.array(correct), "acc_norm": np.array(correct_norm)}
    return TaskResult(
        task="qa",
        metrics={k: float(v.mean()) for k, v in per_item.items()},
        intervals={k: bootstrap_interval(v, n_boot=n_boot, seed=seed) for k, v in per_item.items()},
        per_item=per_item,
        item_ids=tuple(i.id for i in data.items),
        predictions=tuple(predictions),
        n_items=len(data.items),
        n_tokens=n_tokens,
    )


def evaluate_rca(model: Any, tokenizer: Any, data: TaskData, prompt: str | None = None,
                 progress: bool = False, n_boot: int = 1000, seed: int = 0) -> TaskResult:
    prompt = prompt or DEFAULT_RCA_PROMPT
    labels = list(data.labels)
    continuations = [" " + label_text(label) for label in labels]
    label_list = ", ".join(label_text(label) for label in labels)
    gold, predicted, n_tokens = [], [], 0
    for item in _iterate(data.items, progress, "rca"):
        assert isinstance(item, RCAItem)
        context = prompt.format(ticket=item.ticket, labels=label_list)
        scores = score_continuations(model, tokenizer, context, continuations)
        predicted.append(int(np.argmax(scores.loglik / scores.continuation_chars)))
        gold.append(labels.index(item.root_cause))
        n_tokens += scores.n_tokens
    gold_a, pred_a = np.array(gold), np.array(predicted)
    correct = (gold_a == pred_a).astype(float)
    return TaskResult(
        task="rca",
        metrics={"accuracy": float(correct.mean()), "macro_f1": macro_f1(gold_a, pred_a, len(labels))},
        intervals={
            "accuracy": bootstrap_interval(correct, n_boot=n_boot, seed=seed),
            "macro_f1": _bootstrap_macro_f1(gold_a, pred_a, len(labels), min(n_boot, 500), seed),
        },
        per_item={"accuracy": correct},
        item_ids=tuple(i.id for i in data.items),
        predictions=tuple(predicted),
        n_items=len(data.items),
        n_tokens=n_tokens,
    )


def evaluate(task: str, model: Any, tokenizer: Any, data: TaskData, prompt: str | None = None,
             progress: bool = False, seed: int = 0) -> TaskResult:
    """Score one task; the same function for every precision and model."""
    if task == "qa":
        return evaluate_qa(model, tokenizer, data, prompt, progress, seed=seed)
    if task == "rca":
        return evaluate_rca(model, tokenizer, data, prompt, progress, seed=seed)
    raise ValueError(f"unknown task {task!r}")


def _choice_block(choices: Sequence[str]) -> str:
    return "\n".join(f"{chr(ord('A') + i)}. {c}" for i, c in enumerate(choices))


def _iterate(items: Sequence[Any], progress: bool, label: str) -> Any:
    if not progress:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=f"scoring {label}", leave=False)
