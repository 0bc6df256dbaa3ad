"""Command line: llm-energy run | validate | report | jobs | params."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from .config import StudyValidationError, load_study


def _print_problems(params: Path, err: StudyValidationError, suffix: str = "") -> None:
    """Every problem of a parameters file on standard error, one a line (file:line: key: why)."""
    print(f"{params}: {len(err.problems)} problem(s){suffix}", file=sys.stderr)
    for problem in err.problems:
        print(f"  {problem}", file=sys.stderr)


def _validate(args: argparse.Namespace) -> int:
    from .runner.checks import data_problems, with_context_exclusions

    try:
        study = load_study(args.params)
        study, too_long = with_context_exclusions(study, args.params.parent.resolve())
        problems = data_problems(study, args.params.parent.resolve())
        if problems:
            raise StudyValidationError(problems)
    except StudyValidationError as err:
        _print_problems(args.params, err)
        return 2
    for task, n in too_long.items():
        print(f"{args.params}: tasks.{task}: {n} record(s) too long for a model's context will be left out "
              "(invalid_records: skip; listed in tables/skipped_records.csv)")
    n_configs = len(study.models) * len(study.precisions)
    print(f"{args.params}: valid — study '{study.study}', {n_configs} inference config(s), phases "
          f"{', '.join(study.phases)}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from .runner.plan import check_budget
    from .runner.study import StudyRunError, run_study

    try:
        outcome = run_study(args.params, out=args.out, resume=not args.no_resume, force=args.force,
                            phases=args.phases, cluster=args.cluster, before_jobs=check_budget)
    except StudyValidationError as err:
        _print_problems(args.params, err, "; nothing was run")
        return 2
    except StudyRunError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"results: {outcome.out_dir}")
    print(f"  jobs completed: {len(outcome.completed)}, resumed (already done): {len(outcome.resumed)}, "
          f"skipped: {len(outcome.skipped)}, failed: {len(outcome.failed)}")
    if outcome.remeasured:
        print(f"  measured again, whole, for contaminated windows: {', '.join(outcome.remeasured)}")
    for item in outcome.skipped:
        print(f"  skipped {item['config_id']}: {item['reason']}")
    for item in outcome.failed:
        print(f"  FAILED {item['job']}: {item['error']} (log: {item['log']})")
    if outcome.report:
        print(f"  report: {outcome.report}")
    return 1 if outcome.failed else 0


def _report(args: argparse.Namespace) -> int:
    from .runner.study import StudyRunError, render_report

    try:
        path = render_report(args.dir)
    except StudyRunError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"report: {path}")
    if args.pdf:
        from .report.html import PdfUnavailable, render_pdf

        try:
            print(f"pdf: {render_pdf(path)}")
        except PdfUnavailable as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    return 0


def _plan(args: argparse.Namespace) -> int:
    from .runner.estimate import calibrate
    from .runner.plan import format_plan, plan_study
    from .runner.study import StudyRunError

    try:
        calibration = calibrate(args.calibrate_from) if args.calibrate_from else None
        plan = plan_study(args.params, calibration=calibration)
    except StudyValidationError as err:
        _print_problems(args.params, err)
        return 2
    except StudyRunError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_plan(plan))
    return 0


def _planned(args: argparse.Namespace) -> tuple[list[Any], str] | None:
    """The study's jobs as a run into args.out would execute them, or None after printing why not."""
    from .runner.study import StudyRunError, planned_jobs

    try:
        return planned_jobs(args.params, out=args.out)
    except StudyValidationError as err:
        _print_problems(args.params, err)
    except StudyRunError as err:
        print(f"error: {err}", file=sys.stderr)
    return None


def _jobs(args: argparse.Namespace) -> int:
    planned = _planned(args)
    if planned is None:
        return 2
    jobs, note = planned
    for job in jobs:
        print(f"{job.key}\t{job.notebook}")
    if note:
        print(f"note: {note}", file=sys.stderr)
    return 0


def _params(args: argparse.Namespace) -> int:
    from .runner.jobs import parameters_yaml

    planned = _planned(args)
    if planned is None:
        return 2
    jobs, note = planned
    chosen = [job for job in jobs if job.key == args.job]
    if not chosen:
        print(f"error: {args.params} has no job {args.job!r}; its jobs: {', '.join(j.key for j in jobs)}"
              + (f"\nnote: {note}" if note else ""), file=sys.stderr)
        return 2
    text = parameters_yaml(chosen[0])
    if args.output_file is None:
        sys.stdout.write(text)
    else:
        args.output_file.write_text(text)
        print(f"{args.output_file}: parameters of {args.job}; run it with "
              f"papermill notebooks/{chosen[0].notebook} out.ipynb -f {args.output_file}", file=sys.stderr)
    return 0


def _add_jobs_commands(sub: Any) -> None:
    """`jobs` and `params` on the parser's subcommands."""
    jobs = sub.add_parser("jobs", help="list the job ids of a study (phase__config), in run order")
    jobs.add_argument("params", type=Path, help="study parameters (YAML)")
    jobs.add_argument("--out", type=Path, help="the run's output folder, as for run (default: "
                                               "outputs/<study>)")
    jobs.set_defaults(func=_jobs)

    params = sub.add_parser("params", help="the papermill parameters of one job, for papermill -f")
    params.add_argument("params", type=Path, help="study parameters (YAML)")
    params.add_argument("--job", required=True, help="a job id from `llm-energy jobs`")
    params.add_argument("--out", type=Path, help="the run's output folder the job writes to, as for run "
                        "(default: outputs/<study>)")
    params.add_argument("-o", "--output-file", type=Path,
                        help="write the YAML here (default: standard output)")
    params.set_defaults(func=_params)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-energy", description="Energy-aware LLM deployment studies.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a study: every phase notebook, executed with papermill")
    run.add_argument("params", type=Path, help="study parameters (YAML)")
    run.add_argument("--out", type=Path, help="output folder (default: outputs/<study>)")
    run.add_argument("--no-resume", action="store_true",
                     help="do not skip finished jobs (needs --force on a used folder)")
    run.add_argument("--force", action="store_true",
                     help="with --no-resume: delete the output folder's results first")
    run.add_argument("--cluster", choices=["none", "local", "slurm"], default="none",
                     help="where jobs run (default: sequentially here)")
    run.add_argument("--phases", nargs="+", help="run only these phases (data, inference, ranking)")
    run.set_defaults(func=_run)

    validate = sub.add_parser("validate", help="check a parameters file; exit 2 listing every problem")
    validate.add_argument("params", type=Path)
    validate.set_defaults(func=_validate)

    report = sub.add_parser("report", help="re-render the ranking, figures and report.html from saved tables")
    report.add_argument("dir", type=Path, help="a study output folder")
    report.add_argument("--pdf", action="store_true",
                        help="also write report.pdf beside it (headless Chromium's print to PDF)")
    report.set_defaults(func=_report)

    plan = sub.add_parser("plan", help="the jobs, each precision's measured speed here, skips and estimated "
                                       "times")
    plan.add_argument("params", type=Path, help="study parameters (YAML)")
    plan.add_argument("--calibrate-from", type=Path, metavar="STUDY_DIR",
                      help="calibrate the estimate on this finished study folder (e.g. one run on this "
                           "machine or GPU) instead of the recorded default study the package ships")
    plan.set_defaults(func=_plan)
    _add_jobs_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("codecarbon", "papermill", "httpx", "urllib3", "distributed", "dask_jobqueue"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # bitsandbytes suggests a CPU kernel package fetched from the model hub at run time: not usable offline
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
