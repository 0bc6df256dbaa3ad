"""One job of a study: a phase notebook run by papermill in a fresh kernel, alone or for one config
(forked, with its imports done, from the study's warm kernel server when one runs: runner.warm_kernels).

The runner (:mod:`llm_energy.runner.study`) and the cluster workers (:mod:`llm_energy.runner.scale`) both
execute jobs through :func:`execute_job`, which never raises: one failing config must not stop a study.
"""

from __future__ import annotations

import importlib
import os
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import QUICK_EXIT_ENV
from ..layout import NOTEBOOKS, StudyLayout, notebooks_dir
from .warm_kernels import kernel_manager_class

# The kernel's own log at ERROR: its start-up warning about TCP transport without encryption (the
# kernel listens on 127.0.0.1 only) would otherwise be printed once per job. Cell output goes to the job's
# log.
KERNEL_ARGUMENTS = ["--log-level=ERROR"]


# What the runner's process imports to execute a job (papermill, nbclient, jupyter_client's kernel
# manager): ~1.5 s the first job of a study would otherwise spend before its kernel starts.
JOB_MACHINERY = ("papermill", "jupyter_client.manager", "nbclient")


def preload_job_machinery() -> threading.Thread:
    """Import :data:`JOB_MACHINERY` in a background thread (beside the study's sustained-load burn, which
    is not a measurement and waits for it: the thread must have ended before the first job starts). An
    import that fails here fails again, with its message, in the first job."""
    def load() -> None:
        for name in JOB_MACHINERY:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001  (reported by the job that needs it)
                continue

    thread = threading.Thread(target=load, name="llm-energy-job-imports", daemon=True)
    thread.start()
    return thread


@dataclass(frozen=True)
class Job:
    phase: str
    config_id: str | None
    parameters: dict[str, Any]

    @property
    def key(self) -> str:
        return self.phase if self.config_id is None else f"{self.phase}__{self.config_id}"

    @property
    def notebook(self) -> str:
        return NOTEBOOKS[self.phase]


def filter_parameters(notebook: Path, parameters: dict[str, Any]) -> dict[str, Any]:
    """Only the keys the notebook's parameters cell declares (papermill itself would just warn)."""
    import papermill

    declared = papermill.inspect_notebook(str(notebook))
    return {k: v for k, v in parameters.items() if k in declared}


def notebook_parameters(job: Job) -> dict[str, Any]:
    """Exactly what papermill receives for this job: its parameters, less those its notebook does
    not declare (``llm-energy params`` writes these, for ``papermill ... -f``)."""
    return filter_parameters(notebooks_dir() / job.notebook, job.parameters)


def parameters_yaml(job: Job) -> str:
    """The job's notebook parameters as a YAML file papermill reads with ``-f``."""
    import yaml

    header = f"# papermill parameters of job {job.key} ({job.notebook}); written by llm-energy params\n"
    return header + yaml.safe_dump(notebook_parameters(job), sort_keys=False, allow_unicode=True)


def run_job(job: Job, out_dir: Path) -> None:
    """Execute the job's notebook with its parameters; the executed copy and a log go to the study."""
    import papermill

    layout = StudyLayout(out_dir)
    notebook = notebooks_dir() / job.notebook
    executed = layout.executed_notebook(job.phase, job.config_id)
    executed.parent.mkdir(parents=True, exist_ok=True)
    layout.logs.mkdir(parents=True, exist_ok=True)
    # the kernel skips the interpreter's teardown once its cells are done (llm_energy.QUICK_EXIT_ENV)
    os.environ[QUICK_EXIT_ENV] = "1"
    # forked from the study's warm kernel server when one runs on this host (runner.warm_kernels)
    manager = kernel_manager_class()
    with open(layout.log(job.key), "w") as stdout:
        papermill.execute_notebook(
            str(notebook), str(executed), parameters=notebook_parameters(job),
            kernel_name="python3", progress_bar=False, log_output=False, stdout_file=stdout,
            stderr_file=stdout, cwd=str(notebook.parent), extra_arguments=KERNEL_ARGUMENTS,
            # once the last cell has answered, the kernel holds nothing to save (every table is written
            # by its cell): it is killed, not asked to shut down and polled until it has (0.4-0.8 s a job)
            shutdown_kernel="immediate",
            **({"kernel_manager_class": manager} if manager is not None else {}),
        )


def execute_job(job: Job, out_dir: Path) -> dict[str, Any]:
    """Run one job and report, never raise: {'ok', 'error', 'seconds'} (also used on cluster workers)."""
    start = time.perf_counter()
    try:
        run_job(job, out_dir)
    except Exception as exc:  # one failing config must not stop the study
        return {"ok": False, "error": short_error(exc), "seconds": time.perf_counter() - start}
    return {"ok": True, "error": "", "seconds": time.perf_counter() - start}


def short_error(exc: BaseException) -> str:
    """The exception line of an error (papermill's carry the notebook's traceback)."""
    name = type(exc).__name__
    text = str(exc).strip()
    ename, evalue = getattr(exc, "ename", None), getattr(exc, "evalue", None)
    if ename:
        return f"{ename}: {evalue}"
    lines = [line for line in text.splitlines() if line.strip()]
    return (f"{name}: {lines[-1] if lines else ''}" if lines
            else name + "\n" + "".join(traceback.format_exception_only(exc)))
