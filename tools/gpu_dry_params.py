"""The GPU study's parameters cut for the CPU rehearsal (tools/gpu_check.sh --dry-run): params/gpu.yaml
with the device set to cpu, the model folder given, and a few items, short windows and fewer jobs, so
the study step runs the same runner, papermill and notebooks within seconds. Prints nothing; writes
``--out``.

    python tools/gpu_dry_params.py --params params/gpu.yaml --model DIR --out FILE
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    study = yaml.safe_load(args.params.read_text())
    study["study"] = "gpu-dry-run"
    study["device"] = "cpu"
    study["models"][0]["path"] = str(args.model.resolve())
    study["precisions"] = study["precisions"][:1]  # fp32: one inference job
    study["phases"] = [p for p in study["phases"] if p != "pruning"]  # pruning runs in step c and d
    study.pop("pruning", None)
    rca, qa = study["tasks"]["rca"], study["tasks"]["qa"]
    rca["max_items"], qa["max_items"] = 2, 2
    rca["generation"].update(new_tokens=2, max_items=1, batch_size=1)
    study["energy"].update(idle_seconds=0.1, repeats=1, max_repeats=1, min_window_s=0.0,
                           measure_power_secs=0.5)
    study["ranking"]["bootstrap"] = 10
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(yaml.safe_dump(study, sort_keys=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
