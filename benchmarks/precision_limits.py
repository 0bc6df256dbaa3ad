"""Each precision's QA scoring against its own matmul limit (issue 29, item 2).

For a builtin model and a set of precisions, scores N TeleQnA items as the default study does (the
qa section of a study file: 5-shot, lettered options; the items split into ``--windows`` scoring
calls as the measured windows split them, so a shared few-shot prefix runs once per call) and prints
per precision:

- ``seconds``: wall time of the scoring calls, the fastest of ``--repeats`` quiet passes (other
  processes took at most ``--max-foreign`` of the machine's CPU time; a noisy pass is run again, up
  to ``--max-passes``); the median of all passes beside it;
- ``foreign``: the share of the machine's CPU time other processes took during the reported pass, and
  ``cpu_per_wall``: this process's CPU seconds per wall second in it (torch's threads when nothing
  else runs);
- ``tokens``: tokens as they ran (a shared prefix once per call);
- ``gflop``: the forward's useful GFLOP as the scorer runs it
  (:func:`llm_energy.methods.scoring.scoring_gflop`, built on :func:`llm_energy.measure.flops.forward_gflop`:
  2 x decoder linear weights per token, attention per attended key, the vocabulary projection only
  where logits are computed, the prefix once per call);
- ``gflop_per_s`` and ``probe_gflop_per_s``: the throughput probe of the precision
  (:func:`llm_energy.measure.throughput.probe_precision`), measured in the same run just before and
  just after the precision's scoring (the fastest quiet one);
- ``limit_share`` = gflop_per_s / probe_gflop_per_s.

With ``--ceiling``: one more pass per precision with the scorer's attention function timed (the
seconds inside it, its GFLOP from the same count), and the bound it puts on ``limit_share``
(:func:`attention_ceiling`): every other op free, the linear layers exactly at the probe's rate, the
attention as fast as it ran. A precision whose ceiling is under a target cannot reach the target
without a faster attention, whatever its linear layers do.

With ``--profile K``: torch.profiler over one more scoring call per precision, its K costliest ops.
Last line: ``limit_share_<precision>=<x> ...`` and ``nf4_speed_vs_fp32=<fp32 seconds / nf4 seconds>``.
Results: ``benchmarks/results/2026-12-06-cpu-precision_limits.md``.

    .venv/bin/python benchmarks/precision_limits.py --model smollm2-135m-instruct \\
        --precisions fp32 bf16 w8a8 nf4 --items 200 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "lib") not in sys.path and not os.environ.get("PYTHONPATH"):
    sys.path.insert(0, str(ROOT / "lib"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass(frozen=True)
class PrecisionLimit:
    precision: str
    seconds: float
    seconds_median: float
    cpu_per_wall: float
    foreign: float
    tokens: int
    gflop: float
    gflop_per_s: float
    probe_gflop_per_s: float | None
    limit_share: float | None
    scoring_path: str
    # --ceiling: one more pass with the scorer's attention timed (None without it)
    attention_gflop: float | None = None
    attention_s: float | None = None  # seconds inside the attention function in that pass
    ceiling_pass_s: float | None = None  # that pass's wall seconds
    ceiling_share: float | None = None  # the bound on limit_share (see attention_ceiling)


def qa_task(params: Path, items: int):
    """The study file's qa settings and its first ``items`` scored items."""
    import yaml

    from llm_energy.config import TasksSettings
    from llm_energy.phases.evaluation import load_task_sets

    study = yaml.safe_load(params.read_text())
    tasks = TasksSettings.model_validate({"qa": {**study["tasks"]["qa"], "max_items": items}, "rca": None})
    return tasks.enabled()["qa"], load_task_sets(tasks, ROOT)["qa"]


def split(sequence: tuple, parts: int) -> list[tuple]:
    """``parts`` consecutive chunks of near-equal size (as the measured windows split a task's items)."""
    size, extra = divmod(len(sequence), parts)
    out, start = [], 0
    for k in range(parts):
        stop = start + size + (1 if k < extra else 0)
        out.append(sequence[start:stop])
        start = stop
    return [c for c in out if c]


@dataclass(frozen=True)
class Pass:
    wall_s: float
    cpu_s: float
    foreign: float  # other processes' share of the machine's CPU time during the pass
    value: Any = None


def busy_cpu_s() -> float:
    """CPU seconds the whole machine spent busy since boot (/proc/stat: all but idle and iowait)."""
    values = [float(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:8]]
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


def timed(call: Callable[[], Any]) -> Pass:
    """Run ``call`` once: its wall and CPU seconds, and the share of the machine's CPU time that other
    processes (short-lived ones included) took meanwhile."""
    busy, wall, cpu = busy_cpu_s(), time.perf_counter(), time.process_time()
    value = call()
    wall, cpu, busy = time.perf_counter() - wall, time.process_time() - cpu, busy_cpu_s() - busy
    foreign = max(0.0, busy - cpu) / (wall * (os.cpu_count() or 1))
    return Pass(wall, cpu, min(1.0, foreign), value)


QUIET_WAIT_S = 120.0  # how long a pass waits for other processes to go quiet before it runs anyway


def wait_for_quiet(max_foreign: float, timeout_s: float = QUIET_WAIT_S) -> None:
    """Return once other processes took at most ``max_foreign`` of the CPU time over one second (or
    after ``timeout_s``): a pass that starts in a busy stretch would only be run again."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and timed(lambda: time.sleep(1.0)).foreign > max_foreign:
        pass


def quiet_passes(call: Callable[[], Any], wanted: int, max_passes: int, max_foreign: float,
                 wait_s: float = QUIET_WAIT_S) -> list[Pass]:
    """Passes until ``wanted`` of them were quiet (or ``max_passes`` ran): the quiet ones, else all."""
    passes: list[Pass] = []
    while len(passes) < max_passes and sum(p.foreign <= max_foreign for p in passes) < wanted:
        wait_for_quiet(max_foreign, wait_s)
        passes.append(timed(call))
    quiet = [p for p in passes if p.foreign <= max_foreign]
    return quiet or passes


def probe(precision: str, min_time_s: float, max_foreign: float) -> float | None:
    from llm_energy.measure.throughput import probe_precision

    passes = quiet_passes(lambda: probe_precision(precision, "cpu", min_time_s=min_time_s).gflop_per_s,
                          1, 4, max_foreign)
    rates = [p.value for p in passes if p.value]
    return max(rates) if rates else None


def measure(model_name: str, precision: str, settings, data, windows: int, repeats: int, probe_s: float,
            profile_rows: int, max_passes: int, max_foreign: float, ceiling: bool = False) -> PrecisionLimit:
    from llm_energy.config import ModelSettings
    from llm_energy.methods.scoring import choose_scoring_path, prepare_task, score_prepared, scoring_gflop
    from llm_energy.models.loading import load_model

    loaded = load_model(ModelSettings(name=model_name, source="builtin"), precision, "cpu")
    prepared = prepare_task("qa", loaded.tokenizer, data, settings.prompt, settings.style)
    parts = [replace(prepared, encoded=chunk) for chunk in split(prepared.encoded, windows)]
    path = choose_scoring_path(loaded.model, loaded.tokenizer)
    score_prepared(loaded.model, loaded.tokenizer, replace(prepared, encoded=prepared.encoded[:2]))  # warm-up
    rates = [probe(precision, probe_s, max_foreign)]
    passes = quiet_passes(lambda: [score_prepared(loaded.model, loaded.tokenizer, part) for part in parts],
                          repeats, max(max_passes, repeats), max_foreign)
    rates.append(probe(precision, probe_s, max_foreign))
    best = min(passes, key=lambda p: p.wall_s)
    scores = best.value
    gflop = sum(scoring_gflop(loaded.model.config, part.encoded, s) for part, s in zip(parts, scores))
    tokens = sum(x.tokens_run for s in scores for x in s)
    known = [r for r in rates if r]
    rate = max(known) if known else None
    if profile_rows:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            score_prepared(loaded.model, loaded.tokenizer, parts[0])
        print(f"\n--- {precision}: one scoring call ({len(parts[0].encoded)} items), costliest ops ---")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=profile_rows,
                                        max_name_column_width=48))
    achieved = gflop / best.wall_s
    extra: dict[str, float | None] = {}
    if ceiling:
        attention_s, pass_s = timed_attention(loaded, parts)
        attention = attention_gflop_of(loaded.model.config, parts, scores, gflop)
        extra = {"attention_gflop": attention, "attention_s": attention_s, "ceiling_pass_s": pass_s,
                 "ceiling_share": attention_ceiling(gflop, attention, attention_s, rate) if rate else None}
    return PrecisionLimit(precision, best.wall_s, statistics.median(p.wall_s for p in passes),
                          best.cpu_s / best.wall_s, best.foreign, tokens, gflop, achieved, rate,
                          achieved / rate if rate else None, path.name, **extra)


def attention_ceiling(gflop: float, attention_gflop: float, attention_s: float, probe_rate: float) -> float:
    """The largest limit_share a scoring pass could reach with its attention taking ``attention_s`` and
    everything else (``gflop - attention_gflop``: the linear layers and the vocabulary projection) running
    at exactly the probe's rate with no other op costing anything: gflop / (that time) / probe_rate."""
    bound_s = (gflop - attention_gflop) / probe_rate + attention_s
    return gflop / bound_s / probe_rate


def timed_attention(loaded, parts) -> tuple[float, float]:
    """One pass over ``parts`` with the scorer's attention function (scoring._prefix_attention, which a
    packed forward on a CPU runs) wrapped by a clock: (seconds inside it, the pass's wall seconds)."""
    from llm_energy.methods import scoring

    inner, spent = scoring._prefix_attention, [0.0]

    def clocked(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - start

    scoring._prefix_attention = clocked
    try:
        start = time.perf_counter()
        for part in parts:
            scoring.score_prepared(loaded.model, loaded.tokenizer, part)
        wall = time.perf_counter() - start
    finally:
        scoring._prefix_attention = inner
    return spent[0], wall


def attention_gflop_of(config, parts, scores, gflop: float) -> float:
    """The attention's part of ``gflop`` (scoring_gflop of the pass): less the same count with no key
    attended (the linear layers and the vocabulary projection alone)."""
    from llm_energy.measure.flops import forward_gflop
    from llm_energy.methods.scoring import logit_positions

    tokens = sum(x.tokens_run for s in scores for x in s)
    logits = sum(logit_positions(r) for part in parts for r in part.encoded)
    return gflop - forward_gflop(config, tokens, logits, [0] * tokens)


def machine() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return (f"{model or 'unknown CPU'}, {os.cpu_count()} CPUs, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads)")


def main(argv: list[str] | None = None) -> list[PrecisionLimit]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="a builtin model name")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "w8a8", "nf4"])
    parser.add_argument("--items", type=int, default=200, help="QA items scored (the default study: 200)")
    parser.add_argument("--windows", type=int, default=4,
                        help="scoring calls the items are split into (study: 4)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="quiet passes over the items; the fastest is reported")
    parser.add_argument("--max-passes", type=int, default=6, help="passes at most, quiet or not")
    parser.add_argument("--max-foreign", type=float, default=0.10,
                        help="a pass is quiet when other processes took at most this share of the CPU time")
    parser.add_argument("--probe-s", type=float, default=0.5, help="seconds per throughput probe")
    parser.add_argument("--params", type=Path, default=ROOT / "params" / "default.yaml",
                        help="study file (its qa section)")
    parser.add_argument("--profile", type=int, default=0, metavar="K",
                        help="print the K costliest ops of one call")
    parser.add_argument("--ceiling", action="store_true",
                        help="one more pass with the attention timed, and the bound it puts on limit_share")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)

    import llm_energy

    settings, data = qa_task(args.params, args.items)
    print(f"# {machine()}; llm_energy from {Path(llm_energy.__file__).parent}")
    print(f"# {args.model}, {len(data.items)} QA items ({settings.style}, {settings.fewshot}-shot) in "
          f"{args.windows} calls, best of {args.repeats}; load average before: {os.getloadavg()[0]:.2f}")
    rows = [measure(args.model, p, settings, data, args.windows, args.repeats, args.probe_s, args.profile,
                    args.max_passes, args.max_foreign, args.ceiling) for p in args.precisions]
    print(f"# load average after: {os.getloadavg()[0]:.2f}")
    header = ("precision", "seconds", "median_s", "foreign", "cpu/wall", "tokens", "gflop", "gflop_per_s",
              "probe_gflop_per_s", "limit_share", "path")
    print("  ".join(f"{h:>12}" for h in header))
    for r in rows:
        probe_rate = f"{r.probe_gflop_per_s:12.1f}" if r.probe_gflop_per_s else f"{'-':>12}"
        share = f"{r.limit_share:12.3f}" if r.limit_share is not None else f"{'-':>12}"
        print(f"{r.precision:>12}  {r.seconds:12.2f}  {r.seconds_median:12.2f}  {r.foreign:12.2f}  "
              f"{r.cpu_per_wall:12.2f}  {r.tokens:12d}  "
              f"{r.gflop:12.1f}  {r.gflop_per_s:12.1f}  {probe_rate}  {share}  {r.scoring_path:>12}")
    if args.ceiling:
        print("\nattention timed in one more pass; ceiling = limit_share with every other op free and the "
              "linear layers at the probe's rate")
        print("  ".join(f"{h:>14}" for h in ("precision", "pass_s", "attention_s", "attention_share",
                                               "attn_gflop", "attn_gflop_s", "ceiling_share")))
        for r in rows:
            if r.attention_s is None or r.ceiling_pass_s is None or r.attention_gflop is None:
                continue
            bound = f"{r.ceiling_share:14.3f}" if r.ceiling_share is not None else f"{'-':>14}"
            print(f"{r.precision:>14}  {r.ceiling_pass_s:14.2f}  {r.attention_s:14.2f}  "
                  f"{r.attention_s / r.ceiling_pass_s:14.3f}  {r.attention_gflop:14.1f}  "
                  f"{r.attention_gflop / r.attention_s:14.1f}  {bound}")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    summary = [f"limit_share_{r.precision}={r.limit_share:.3f}" for r in rows if r.limit_share is not None]
    seconds = {r.precision: r.seconds for r in rows}
    if "fp32" in seconds and "nf4" in seconds:
        summary.append(f"nf4_speed_vs_fp32={seconds['fp32'] / seconds['nf4']:.2f}")
    summary += [f"ceiling_{r.precision}={r.ceiling_share:.3f}" for r in rows if r.ceiling_share is not None]
    print(" ".join(summary))
    return rows


if __name__ == "__main__":
    main()
