"""Wanda against magnitude pruning on the embedded SmolLM2-135M (fp32), 50% unstructured sparsity.

Calibration: a seeded sample of texts from the built-in RCA and QA training splits (Wanda only).
Held-out text: every RCA test ticket and every QA test question with its choices, one item per
forward pass; perplexity = exp(mean NLL over every predicted token of every item). The dense model
is reloaded before each method, so both prune the same weights.

    .venv/bin/python benchmarks/wanda_vs_magnitude.py [--sparsity 0.5] [--calibration-texts 128]

The last line is machine-readable:
``ppl_dense=<x> ppl_magnitude=<y> ppl_wanda=<z> wanda_better=<True|False>``.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

from llm_energy.config import DEFAULT_INCLUDE, ModelSettings, PruningSpec, TaskSettings
from llm_energy.data.tasks import load_task_data
from llm_energy.items import item_text
from llm_energy.methods.sparsify import calibration_texts, measure_sparsity, prune_model
from llm_energy.models.loading import load_model

MODEL = ModelSettings(name="smollm2-135m-instruct")


@dataclass(frozen=True)
class Row:
    method: str
    target_sparsity: float
    measured_sparsity: float
    prune_s: float
    mean_nll: float  # nats per predicted token
    perplexity: float
    n_tokens: int  # predicted tokens in the held-out text
    eval_s: float


def split_items(split: str) -> list[Any]:
    return [item for task in ("rca", "qa") for item in load_task_data(task, TaskSettings(split=split)).items]


def heldout_nll(model: Any, tokenizer: Any, texts: Sequence[str]) -> tuple[float, int]:
    """(summed NLL in nats, predicted tokens) over texts scored one at a time (no padding)."""
    import torch
    import torch.nn.functional as F

    total_nll, total_tokens = 0.0, 0
    with torch.inference_mode():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            if ids.shape[1] < 2:
                continue  # nothing to predict
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
            total_nll += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            total_tokens += ids.shape[1] - 1
    return total_nll, total_tokens


def prune_and_measure_nll(method: str, spec: PruningSpec | None, calibration: list[str],
                          heldout: list[str]) -> Row:
    loaded = load_model(MODEL, "fp32")  # fresh dense weights for every method
    prune_s = 0.0
    if spec is not None:
        result = prune_model(loaded.model, spec, calibration=calibration, tokenizer=loaded.tokenizer)
        measured, prune_s = result.measured_sparsity, result.duration_s
    else:
        layers = measure_sparsity(loaded.model, DEFAULT_INCLUDE).values()
        measured = sum(layer.n_zero for layer in layers) / sum(layer.n_weights for layer in layers)
    start = time.perf_counter()
    nll, n_tokens = heldout_nll(loaded.model, loaded.tokenizer, heldout)
    mean_nll = nll / n_tokens
    return Row(method, spec.sparsity if spec else 0.0, measured, prune_s, mean_nll, math.exp(mean_nll),
               n_tokens, time.perf_counter() - start)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sparsity", type=float, default=0.5,
                        help="fraction of weights zeroed (unstructured)")
    parser.add_argument("--calibration-texts", type=int, default=128, help="Wanda calibration texts")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration sample")
    args = parser.parse_args(argv)

    calibration = calibration_texts(split_items("train"), n=args.calibration_texts, seed=args.seed)
    heldout = [item_text(item) for item in split_items("test")]
    specs: dict[str, PruningSpec | None] = {
        "dense": None,
        "magnitude": PruningSpec("magnitude", "unstructured", args.sparsity, seed=args.seed),
        "wanda": PruningSpec("wanda", "unstructured", args.sparsity,
                             calibration_samples=args.calibration_texts, seed=args.seed),
    }
    print(f"{MODEL.name} fp32, {len(calibration)} calibration texts (train), {len(heldout)} held-out texts "
          "(test)")
    rows = {method: prune_and_measure_nll(method, spec, calibration, heldout)
            for method, spec in specs.items()}

    header = (f"{'method':<10} {'target':>7} {'measured':>9} {'prune_s':>8} {'mean_nll':>9} {'ppl':>10} "
              f"{'tokens':>7} {'eval_s':>7}")
    print(header)
    print("-" * len(header))
    for r in rows.values():
        print(f"{r.method:<10} {r.target_sparsity:>7.3f} {r.measured_sparsity:>9.4f} {r.prune_s:>8.2f} "
              f"{r.mean_nll:>9.4f} {r.perplexity:>10.3f} {r.n_tokens:>7d} {r.eval_s:>7.1f}")
    dense, magnitude, wanda = (rows[m].perplexity for m in ("dense", "magnitude", "wanda"))
    print(f"ppl_dense={dense:.4f} ppl_magnitude={magnitude:.4f} ppl_wanda={wanda:.4f} "
          f"wanda_better={wanda < magnitude}")


if __name__ == "__main__":
    main()
