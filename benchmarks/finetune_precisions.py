"""LoRA fine-tuning speed and loss per precision, on the study's own fine-tuning spec (issue 29, item 4).

Runs :func:`llm_energy.methods.lora_training.finetune` as the study's fine-tuning job does (the
``finetune`` section of a study file: model, spec, the task's whole training and validation splits,
seeded samples), once per precision and round, the precisions alternating within a round so that a
slow stretch of a shared machine falls on all of them. Model loading is outside the timing. Per
precision it prints:

- ``train_s``: the training time of the run (the sum of its epochs' windows, evaluation left out),
  the fastest of the quiet rounds (other processes took at most ``--max-foreign`` of the machine's
  CPU time during the run); ``median_s`` over every round beside it, and ``vs_fp32`` = train_s over
  fp32's;
- ``foreign``: other processes' CPU share during the reported run;
- ``train_loss`` and ``eval_loss`` per epoch (nats per answer token) of the reported run: every run
  is seeded, so each round repeats the same numbers;
- ``gflop_per_s``: the useful GFLOP of the epochs (``EpochRecord.gflop``: forward + backward) per
  training second, and ``probe_gflop_per_s``: the device's matmul probe for the precision
  (:func:`llm_energy.measure.throughput.probe_precision`).

With ``--profile K``: torch.profiler over two training steps per precision (a run of 16 examples,
one epoch), its K costliest ops by self CPU time.

    .venv/bin/python benchmarks/finetune_precisions.py --precisions fp32 bf16 w8a8 nf4 --rounds 2

The last line is machine-readable: ``train_s_<precision>=<s> ... slowest_vs_fp32=<x>``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "lib") not in sys.path and not os.environ.get("PYTHONPATH"):
    sys.path.insert(0, str(ROOT / "lib"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")



@dataclass(frozen=True)
class Run:
    precision: str
    train_s: float  # the epochs' windows, evaluation left out
    foreign: float  # other processes' share of the machine's CPU time during the run
    train_loss: tuple[float, ...]
    eval_loss: tuple[float, ...]
    gflop: float  # useful GFLOP of the epochs (forward + backward)


def _busy_s() -> float:
    """CPU seconds the whole machine has spent busy since boot (/proc/stat: all but idle and iowait),
    processes that started and ended in between included."""
    values = [float(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:8]]
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


def timed(call: Any) -> tuple[Any, float]:
    """(what ``call`` returned, the share of the machine's CPU time other processes took meanwhile)."""
    import time

    busy, own, wall = _busy_s(), time.process_time(), time.perf_counter()
    value = call()
    wall, own, busy = time.perf_counter() - wall, time.process_time() - own, _busy_s() - busy
    return value, min(1.0, max(0.0, busy - own) / (wall * (os.cpu_count() or 1)))


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def study_parts(params: Path) -> tuple[Any, Any, Any, Any, Path]:
    """(model settings, fine-tuning spec, training split, validation split, base dir) of a study file."""
    from llm_energy.config import load_study
    from llm_energy.phases.evaluation import full_split

    study = load_study(params)
    if study.finetune is None:
        raise SystemExit(f"{params} has no finetune section")
    chosen = study.finetune.models
    model = next(m for m in study.models if chosen is None or m.name in chosen)
    spec = study.finetune
    settings = study.tasks.enabled()[spec.task]
    base_dir = params.resolve().parent
    return (model, spec, full_split(spec.task, settings, "train", base_dir),
            full_split(spec.task, settings, "validation", base_dir), base_dir)


def train_once(model_settings: Any, precision: str, spec: Any, train: Any, valid: Any, base_dir: Path) -> Run:
    from llm_energy.methods.lora_training import finetune
    from llm_energy.models.loading import load_model

    loaded = load_model(model_settings, precision, "cpu", base_dir=base_dir)
    with tempfile.TemporaryDirectory() as folder:
        result, foreign = timed(lambda: finetune(loaded, train.items, valid.items, spec, None, Path(folder),
                                                 label_set=train.labels, progress=False))
    return Run(precision, sum(e.duration_s for e in result.epochs), foreign,
               tuple(e.train_loss for e in result.epochs), tuple(e.eval_loss for e in result.epochs),
               sum(e.gflop for e in result.epochs))


def profile(model_settings: Any, precision: str, spec: Any, train: Any, valid: Any, base_dir: Path,
            rows: int) -> str:
    import torch

    from llm_energy.methods.lora_training import finetune
    from llm_energy.models.loading import load_model

    loaded = load_model(model_settings, precision, "cpu", base_dir=base_dir)
    short = spec.model_copy(update={"epochs": 1, "max_train_items": 2 * spec.batch_size, "max_eval_items": 1})
    with tempfile.TemporaryDirectory() as folder, torch.profiler.profile(record_shapes=True) as prof:
        finetune(loaded, train.items, valid.items, short, None, Path(folder), label_set=train.labels,
                 progress=False)
    return prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=rows,
                                                              max_name_column_width=40,
                                                              max_shapes_column_width=70)


def main(argv: list[str] | None = None) -> list[Run]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=Path, default=ROOT / "params" / "default.yaml", help="a study file")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "w8a8", "nf4"])
    parser.add_argument("--rounds", type=int, default=2,
                        help="runs per precision (alternating); 0: profile only")
    parser.add_argument("--max-foreign", type=float, default=0.10,
                        help="a run is quiet when other processes took at most this share of the CPU time")
    parser.add_argument("--max-rounds", type=int, default=4,
                        help="rounds at most, to get --rounds quiet ones")
    parser.add_argument("--profile", type=int, default=0, metavar="K", help="profile two steps, print K ops")
    args = parser.parse_args(argv)

    import torch

    from llm_energy.measure.throughput import probe_precision

    model, spec, train, valid, base_dir = study_parts(args.params)
    print(f"{cpu_model()}, {os.cpu_count()} CPUs; torch {torch.__version__}, {torch.get_num_threads()} "
          "threads")
    print(f"{model.name}, task {spec.task}: {spec.max_train_items} training examples x {spec.epochs} epochs, "
          f"batch {spec.batch_size}, LoRA r={spec.rank} on {', '.join(spec.target_modules)} "
          f"({args.params.name})")
    if args.profile:
        for precision in args.precisions:
            print(f"\n== {precision}: two training steps\n"
                  + profile(model, precision, spec, train, valid, base_dir, args.profile))
    if args.rounds < 1:
        return []
    runs: dict[str, list[Run]] = {p: [] for p in args.precisions}
    for _ in range(args.max_rounds):
        if all(sum(r.foreign <= args.max_foreign for r in done) >= args.rounds for done in runs.values()):
            break
        for precision in args.precisions:
            run = train_once(model, precision, spec, train, valid, base_dir)
            runs[precision].append(run)
            print(f"  {precision}: {run.train_s:.1f} s (foreign {run.foreign:.2f})", flush=True)
    best = {}
    for precision, done in runs.items():
        quiet = [r for r in done if r.foreign <= args.max_foreign] or done
        best[precision] = min(quiet, key=lambda r: r.train_s)
    reference = best.get("fp32")
    header = (f"{'precision':<9} {'train_s':>8} {'median_s':>8} {'vs_fp32':>7} {'foreign':>7} "
              f"{'gflop_per_s':>11} {'probe':>7}  train_loss / eval_loss per epoch")
    print("\n" + header + "\n" + "-" * len(header))
    for precision, run in best.items():
        probe = probe_precision(precision, "cpu").gflop_per_s
        ratio = run.train_s / reference.train_s if reference else float("nan")
        losses = "  ".join(f"{t:.3f}/{e:.3f}" for t, e in zip(run.train_loss, run.eval_loss))
        print(f"{precision:<9} {run.train_s:>8.1f} "
              f"{statistics.median(r.train_s for r in runs[precision]):>8.1f} {ratio:>7.2f} "
              f"{run.foreign:>7.2f} {run.gflop / run.train_s:>11.1f} {probe or float('nan'):>7.1f}  {losses}")
    slowest = max(run.train_s for run in best.values()) / reference.train_s if reference else float("nan")
    print(" ".join(f"train_s_{p}={r.train_s:.1f}" for p, r in best.items())
          + f" slowest_vs_fp32={slowest:.2f}")
    return list(best.values())


if __name__ == "__main__":
    main()
