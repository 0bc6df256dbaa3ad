"""fp32 linear layers at a few rows: torch's ``F.linear(x, W)`` against the weight-first form
X
scoring's vocabulary projection ran 2-6x below memory speed on a CPU).

    .venv/bin/python benchmarks/few_rows_linear.py [--threads 2] [--repeats 5] [--generate]

Part 1, per layer shape of the embedded models (SmolLM2-135M, Gemma 3 270M: decoder layers and the
vocabulary projection, the latter followed by the log-softmax that reads it) and row count: the
fastest of ``--repeats`` calls each way, their ratio, and which form the project's rule picks (``*``:
the rule's pick was the faster one here). Part 2
(``--generate``): Gemma 3 270M at fp32, greedy generation of the default study's 8 RCA resolutions
(16 tokens, batches of 2) with the rule and with every layer as before, and whether the tokens agree.
Last line: ``few_rows_speedup_vocab_2rows=<x> rule_speedup_le8rows=<x> rule_vs_best_le8rows=<x>`` (over
every shape at 1-8 rows: the usual form's seconds / the rule's, and the rule's / the faster form's,
1.0 = always the faster) plus ``generate_speedup=<x> same_tokens=<bool>`` with ``--generate``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHAPES = {  # (out, in): the embedded models' fp32 layers
    "smollm2 q/o": (576, 576), "smollm2 k/v": (192, 576), "smollm2 gate/up": (1536, 576),
    "smollm2 down": (576, 1536), "smollm2 vocab": (49152, 576),
    "gemma3 q": (1024, 640), "gemma3 gate/up": (2048, 640), "gemma3 down": (640, 2048),
    "gemma3 vocab": (262144, 640),
}
ROWS = (1, 2, 4, 8, 16, 32, 192, 2048)


def fastest(call, repeats: int) -> float:
    call()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def layers(repeats: int) -> tuple[float, float, float]:
    import torch

    from llm_energy.models.few_rows import weight_first

    print(f"{'layer':<16} {'out x in':>12} {'rows':>5} {'F.linear ms':>12} {'weight first ms':>16} "
          f"{'ratio':>6}  rule")
    picked = best = usual_total = 0.0  # seconds summed over the shapes at <= 8 rows (a decode step's)
    vocab_2 = float("nan")
    for name, (out, inp) in SHAPES.items():
        w = torch.randn(out, inp)
        for rows in ROWS:
            if out * rows > 262144 * 192:  # the vocabulary at thousands of rows: seconds, not informative
                continue
            x = torch.randn(rows, inp)
            # a vocabulary projection's output is read row-wise next (log-softmax, argmax): counted here
            after = (lambda y: torch.log_softmax(y, -1)) if out >= 16384 else (lambda y: y)
            usual = fastest(lambda: after(torch.nn.functional.linear(x, w)), repeats)
            first = fastest(lambda: after(torch.mm(w, x.t()).t()), repeats)
            pick = weight_first(rows, w)
            ok = (first <= usual) == pick
            if rows <= 8:
                picked += first if pick else usual
                best += min(first, usual)
                usual_total += usual
            if name == "gemma3 vocab" and rows == 2:
                vocab_2 = usual / first
            print(f"{name:<16} {f'{out}x{inp}':>12} {rows:>5} {usual * 1e3:>12.3f} {first * 1e3:>16.3f} "
                  f"{usual / first:>6.2f}  {'weight first' if pick else 'F.linear'}{' *' if ok else ''}",
                  flush=True)
    return vocab_2, usual_total / picked, picked / best


def generate(repeats: int) -> tuple[float, bool]:
    import torch

    from llm_energy.config import GenerationParams, ModelSettings, TaskSettings
    from llm_energy.data.tasks import load_task_data
    from llm_energy.methods import generation
    from llm_energy.models import few_rows
    from llm_energy.models.loading import load_model

    loaded = load_model(ModelSettings(name="gemma-3-270m", source="builtin"), "fp32")
    data = load_task_data("rca", TaskSettings(data="synthetic", split="test", max_items=120))
    spec = GenerationParams(new_tokens=16, max_items=8, chat="auto", batch_size=2)
    encoded = generation.encode_prompts(loaded.tokenizer, data.items, spec)
    swap = few_rows.few_rows_linears
    times, tokens = {}, {}
    for mode in ("weight first", "as before"):
        few_rows.few_rows_linears = swap if mode == "weight first" else (lambda m: contextlib.nullcontext(0))
        try:
            tokens[mode] = generation.generate_encoded(loaded.model, encoded)
            times[mode] = fastest(lambda: generation.generate_encoded(loaded.model, encoded), repeats)
        finally:
            few_rows.few_rows_linears = swap
        print(f"gemma-3-270m fp32, 8 resolutions x 16 tokens, {mode}: {times[mode]:.2f} s", flush=True)
    same = all(torch.equal(a, b) for a, b in zip(tokens["weight first"], tokens["as before"]))
    return times["as before"] / times["weight first"], same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--generate", action="store_true", help="also time Gemma 3's generation both ways")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    vocab_2, speedup, vs_best = layers(args.repeats)
    line = (f"few_rows_speedup_vocab_2rows={vocab_2:.2f} rule_speedup_le8rows={speedup:.2f} "
            f"rule_vs_best_le8rows={vs_best:.2f}")
    if args.generate:
        speedup, same = generate(max(1, args.repeats // 2))
        line += f" generate_speedup={speedup:.2f} same_tokens={same}"
    print(line)


if __name__ == "__main__":
    main()
