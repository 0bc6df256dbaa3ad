"""What the study runner adds on top of papermill: the smoke study both ways, same machine, same run.

Runner: `llm-energy run params/smoke.yaml` (validation, planning, idle baseline, provenance, resume
markers, report rendering). Direct: the same notebooks with the same parameters through
papermill.execute_notebook, one after the other, nothing else. Both measure energy inside the
notebooks, so the difference is the runner's own cost.

    .venv/bin/python benchmarks/runner_overhead.py [--rounds 1]

Last line: runner_overhead_ratio=<runner wall time / direct wall time>  (target <= 1.1)
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent


def run_with_runner(params: Path, out: Path) -> float:
    from llm_energy.runner.study import run_study

    start = time.perf_counter()
    outcome = run_study(params, out=out, resume=False, force=True)
    elapsed = time.perf_counter() - start
    if outcome.failed:
        raise SystemExit(f"runner failed: {outcome.failed}")
    return elapsed


def run_direct(params: Path, out: Path) -> float:
    import papermill

    from llm_energy.config import load_study
    from llm_energy.layout import notebooks_dir
    from llm_energy.runner.jobs import filter_parameters
    from llm_energy.runner.study import expand

    study = load_study(params)
    jobs, _ = expand(study, out, params.parent, "cpu")
    start = time.perf_counter()
    for job in jobs:
        notebook = notebooks_dir() / job.notebook
        papermill.execute_notebook(str(notebook), str(out / f"{job.key}.ipynb"),
                                   parameters=filter_parameters(notebook, job.parameters),
                                   kernel_name="python3", progress_bar=False, cwd=str(notebook.parent))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=1, help="alternated runner/direct pairs")
    parser.add_argument("--params", type=Path, default=ROOT / "params" / "smoke.yaml")
    args = parser.parse_args()
    runner_s, direct_s = [], []
    with tempfile.TemporaryDirectory() as tmp:
        # Only the phases both sides plan up front: the runner adds adapter evaluation and top-k
        # pruning after the first stage, which plain papermill over a fixed list would not do.
        import yaml

        study = yaml.safe_load(args.params.read_text())
        study["phases"] = ["data", "inference", "ranking"]
        params = Path(tmp) / args.params.name
        params.write_text(yaml.safe_dump(study))
        args.params = params
        for index in range(args.rounds):
            for kind in (("direct", "runner") if index % 2 else ("runner", "direct")):
                out = Path(tmp) / f"{kind}-{index}"
                if kind == "runner":
                    runner_s.append(run_with_runner(args.params, out))
                else:
                    out.mkdir()
                    direct_s.append(run_direct(args.params, out))
                print(f"round {index + 1} {kind}: {(runner_s if kind == 'runner' else direct_s)[-1]:.1f}s",
                      flush=True)
                shutil.rmtree(out, ignore_errors=True)
    ratio = statistics.median(runner_s) / statistics.median(direct_s)
    print(f"median runner {statistics.median(runner_s):.1f}s, direct papermill "
          f"{statistics.median(direct_s):.1f}s")
    print(f"runner_overhead_ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
