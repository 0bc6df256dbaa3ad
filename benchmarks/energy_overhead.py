"""Wall-time overhead of the energy meter on a real inference workload.

The same workload (the embedded SmolLM2-135M at fp32 scoring built-in QA items) runs with and
without a measured window, alternated so drift hits both alike; the ratio of medians over the pairs
is the overhead. Model loading and the tracker's start are outside the timed region, as in a study.

    .venv/bin/python benchmarks/energy_overhead.py [--pairs 7] [--items 24] [--model smollm2-135m-instruct]

Last line: overhead_ratio=<median tracked wall time / median untracked wall time>  (target <= 1.02)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=7)
    parser.add_argument("--items", type=int, default=24)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    args = parser.parse_args()

    from llm_energy.config import EnergySettings, ModelSettings, TaskSettings
    from llm_energy.data.tasks import load_task_data
    from llm_energy.measure.meter import EnergyMeter
    from llm_energy.methods.scoring import score_task
    from llm_energy.models.loading import load_model

    loaded = load_model(ModelSettings(name=args.model), "fp32")
    data = load_task_data("qa", TaskSettings(split="test", max_items=args.items))

    def workload() -> None:
        score_task("qa", loaded.model, loaded.tokenizer, data)

    workload()  # warm-up: first-call allocations are not the meter's cost
    meter = EnergyMeter(EnergySettings(measure_power_secs=1.0), device="cpu")
    untracked, tracked = [], []
    try:
        for pair in range(args.pairs):
            # Alternate which goes first so a slow drift does not favour one side.
            order = ("untracked", "tracked") if pair % 2 == 0 else ("tracked", "untracked")
            for kind in order:
                start = time.perf_counter()
                if kind == "tracked":
                    with meter.window("overhead") as handle:
                        workload()
                    tracked.append(time.perf_counter() - start)
                else:
                    workload()
                    untracked.append(time.perf_counter() - start)
            print(f"pair {pair + 1}: untracked {untracked[-1]:.3f}s tracked {tracked[-1]:.3f}s "
                  f"({handle.record.energy_kwh * 3.6e6:.1f} J, {handle.record.energy_method})", flush=True)
    finally:
        meter.close()
    ratio = statistics.median(tracked) / statistics.median(untracked)
    print(f"median untracked {statistics.median(untracked):.3f}s, tracked {statistics.median(tracked):.3f}s, "
          f"pairs {args.pairs}, items {args.items}, model {args.model}")
    print(f"overhead_ratio={ratio:.4f}")


if __name__ == "__main__":
    main()
