"""Running a study's configs on Dask: a LocalCluster here, or SLURM jobs through dask-jobqueue.

Energy is only valid when a measured job has its device to itself. Every worker advertises one unit
of the resource ``device`` and the runner keeps at most one job per worker in flight, so a worker never
runs two measured jobs at once; with one worker per GPU (or one worker for the CPU) no two jobs share a
device. Results need no gathering step: each job writes the study's tables itself, under a file lock, on
the shared output folder.

On SLURM, what the job really got decides how its energy is attributed: each measured job reads its
own SLURM job (``scontrol show job $SLURM_JOB_ID``) before it starts, and only a job SLURM gave a whole
node (``OverSubscribe=NO``: ``--exclusive``, or an exclusive partition) is charged the machine. A worker
whose SLURM job ends (``scancel``, its walltime, a node failure) fails the job it was running, which is
recorded failed (a rerun runs it again), and a new worker job replaces it for the jobs left.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

from ..config import SlurmSettings, Study
from .jobs import Job, execute_job, short_error

DEVICE_RESOURCE = "device"
# SLURM's client commands the runner calls (Debian / Ubuntu: the slurm-client package)
SLURM_COMMANDS = ("sbatch", "srun", "scontrol", "scancel")
# Set on a worker before each measured job, read by record_config in the job's kernel (configs.csv)
OVERSUBSCRIBE_ENV = "LLM_ENERGY_SLURM_OVERSUBSCRIBE"
# how long the output-folder check waits for a node (srun --immediate), seconds
NODE_CHECK_WAIT_S = 120


def local_worker_count(study: Study, device: str) -> int:
    """One worker per device: each visible GPU, or a single one for the CPU (its cores are one device)."""
    if study.cluster.local_workers:
        return study.cluster.local_workers
    if device.startswith("cuda"):
        import torch

        return max(1, torch.cuda.device_count())
    return 1


def _slurm_job_options(settings: SlurmSettings, log_dir: Path | None) -> dict[str, Any]:
    """What each worker job asks SLURM for (SLURMCluster's and SLURMJob's arguments)."""
    directives = list(settings.job_extra_directives)
    if settings.gpus_per_job:
        directives.append(f"--gres=gpu:{settings.gpus_per_job}")
    return dict(
        queue=settings.queue,
        account=settings.account,
        walltime=settings.walltime,
        cores=settings.cores,
        processes=1,  # one worker per job: the worker owns the job's devices
        memory=settings.memory,
        job_extra_directives=directives,
        worker_extra_args=["--resources", f"{DEVICE_RESOURCE}=1"],
        log_directory=str(log_dir) if log_dir is not None else None,
        python=os.environ.get("LLM_ENERGY_PYTHON") or None,
    )


def slurm_cluster(settings: SlurmSettings, log_dir: Path) -> Any:
    """A SLURMCluster whose workers each own `gpus_per_job` GPUs and one `device` resource."""
    from dask_jobqueue import SLURMCluster

    return SLURMCluster(**_slurm_job_options(settings, log_dir))


def worker_job_script(settings: SlurmSettings, log_dir: Path | None = None) -> str:
    """The batch script of one worker job, as SLURMCluster submits it (no scheduler started; a log
    folder given is created, as SLURMCluster does)."""
    from dask_jobqueue.slurm import SLURMJob

    return SLURMJob(scheduler="tcp://127.0.0.1:1", name="llm-energy-check",
                    **_slurm_job_options(settings, log_dir)).job_script()


# --------------------------------------------------------------------------------------------------
# Before any job: what --cluster slurm needs, each refusal with what to do


def slurm_tools_problem() -> str | None:
    """dask-jobqueue importable and SLURM's client commands on the PATH, or what is missing."""
    try:
        import dask_jobqueue  # noqa: F401
    except ImportError as exc:
        return (f"--cluster slurm needs dask-jobqueue, which does not import here ({exc}). Install the "
                "project's dependencies into this Python (`make setup`, or `pip install dask-jobqueue`), or "
                "run without --cluster slurm.")
    missing = [command for command in SLURM_COMMANDS if shutil.which(command) is None]
    if missing:
        return (f"--cluster slurm needs SLURM's client commands, and {', '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not on the PATH. Run from a login node of the "
                "cluster (where `sbatch` works), or install them and the cluster's slurm.conf "
                "(Debian/Ubuntu: `apt install slurm-client`; SLURM_CONF names another configuration file).")
    return None


def _run(command: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)


def worker_job_problem(settings: SlurmSettings) -> str | None:
    """Would SLURM accept a worker job as cluster.slurm asks for it (partition, account, cores, memory,
    walltime, extra directives)? ``sbatch --test-only`` answers without submitting anything."""
    script = worker_job_script(settings)
    try:
        proc = subprocess.run(["sbatch", "--test-only"], input=script, capture_output=True, text=True,
                              timeout=60, check=False)
    except subprocess.TimeoutExpired:
        return "the SLURM controller did not answer `sbatch --test-only` within 60 s: is it up (`sinfo`)?"
    if proc.returncode != 0:
        said = " ".join((proc.stderr or proc.stdout).split())
        return (f"SLURM would not run a worker job as cluster.slurm asks for it ({said}). Fix queue, "
                "account, cores, memory, walltime or job_extra_directives so that they fit the partition's "
                "nodes (`sinfo -N -l`, `scontrol show partition`).")
    return None


def out_dir_problem(settings: SlurmSettings, out_dir: Path) -> str | None:
    """Can a node of the study's partition see the output folder? Every job writes the study's tables
    there, so a folder only this machine sees (/tmp, /dev/shm, a local disk) would lose them. A file
    with a random name is written in the folder (or its closest existing parent), a one-task ``srun``
    in the partition looks for it, and it is removed again."""
    anchor = out_dir
    while not anchor.exists() and anchor != anchor.parent:
        anchor = anchor.parent
    token = uuid.uuid4().hex
    probe = anchor / f".llm-energy-node-check-{token[:12]}"
    try:
        probe.write_text(token)
    except OSError as exc:
        return f"the output folder {out_dir} cannot be written here ({exc}): choose another with --out."
    command = ["srun", "--nodes=1", "--ntasks=1", "--time=00:01:00", "--job-name=llm-energy-check",
               f"--immediate={NODE_CHECK_WAIT_S}"]
    command += [f"--partition={settings.queue}"] if settings.queue else []
    command += [f"--account={settings.account}"] if settings.account else []
    command += ["sh", "-c", 'echo "node=$(hostname)"; cat "$0" 2>/dev/null || echo missing', str(probe)]
    try:
        proc = _run(command, NODE_CHECK_WAIT_S + 60)
    except subprocess.TimeoutExpired:
        proc = None
    finally:
        probe.unlink(missing_ok=True)
    where = f"partition {settings.queue}" if settings.queue else "the default partition"
    if proc is None or not re.search(r"^node=", proc.stdout, re.M):
        said = " ".join(((proc.stderr or proc.stdout) if proc is not None else "no answer").split())[-400:]
        return (f"could not check that the nodes of {where} see the output folder {out_dir}: `srun` got no "
                f"node within {NODE_CHECK_WAIT_S} s ({said}). Run again when a node is free, and check that "
                "`srun` works from here.")
    node = re.search(r"^node=(\S*)", proc.stdout, re.M).group(1)  # type: ignore[union-attr]
    if token not in proc.stdout:
        return (f"the output folder {out_dir} is not visible from the cluster's nodes: node {node} of "
                f"{where} does not see the file this machine wrote in {anchor}. Every job writes the study's "
                "tables there: put --out on a filesystem the nodes share (the project or home space the "
                "cluster mounts everywhere, not /tmp, /dev/shm or a local disk).")
    return None


def partition_oversubscribe(queue: str | None) -> str:
    """The partition's OverSubscribe setting (the default partition without a queue), "" if unknown."""
    try:
        proc = _run(["scontrol", "-o", "show", "partition", *([queue] if queue else [])], 30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    for line in proc.stdout.splitlines():
        if queue or re.search(r"\bDefault=YES\b", line):
            found = re.search(r"\bOverSubscribe=(\S+)", line)
            return found.group(1) if found else ""
    return ""


def exclusive_requested(settings: SlurmSettings) -> bool:
    """Will every worker job get its node to itself: --exclusive among the directives, or an exclusive
    partition? (What the job really got is read again inside each job: :func:`job_attribution`.)"""
    return ("--exclusive" in settings.job_extra_directives
            or partition_oversubscribe(settings.queue) == "EXCLUSIVE")


# --------------------------------------------------------------------------------------------------
# Inside each worker job


def slurm_job_oversubscribe(job_id: str) -> str:
    """This SLURM job's OverSubscribe as the controller records it ("NO": the node is the job's alone;
    "OK", "USER", "MCS", ...: other jobs may run on it), or "unknown" when scontrol cannot say."""
    try:
        proc = _run(["scontrol", "-o", "show", "job", job_id], 30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    found = re.search(r"\bOverSubscribe=(\S+)", proc.stdout)
    return found.group(1) if found else "unknown"


def job_attribution(requested: str, oversubscribe: str, device: str, job_id: str) -> tuple[str, str | None]:
    """How a measured job in SLURM job ``job_id`` is charged, from what SLURM gave it: (attribution,
    None), or ("", why it must not run). Only OverSubscribe=NO is a node of its own."""
    if oversubscribe == "NO":
        return ("machine" if requested == "auto" else requested), None
    shared = (f"SLURM job {job_id} may share its node with other jobs (scontrol show job: "
              f"OverSubscribe={oversubscribe})")
    fix = ("give each worker job its node: add --exclusive to cluster.slurm.job_extra_directives "
           "(or use a partition with OverSubscribe=EXCLUSIVE)")
    if not device.startswith("cuda"):
        return "", f"{shared}: a measured CPU job's energy cannot be told apart from theirs; {fix}."
    if requested == "machine":
        return "", (f"{shared}, and energy.attribution is machine: the job would be charged the whole node's "
                    f"CPU and RAM; use attribution: auto or gpu_only, or {fix}.")
    return "gpu_only", None


def _run_on_worker(job: Job, out_dir: str, on_slurm: bool, requested: str) -> dict[str, Any]:
    """One job on a worker. Under SLURM a measured job first reads what its SLURM job got and is
    charged accordingly (or refused); the SLURM job's id and OverSubscribe go to configs.csv."""
    slurm_id = os.environ.get("SLURM_JOB_ID", "") if on_slurm else ""
    info = {"slurm_job_id": slurm_id, "slurm_oversubscribe": ""}
    if slurm_id and job.config_id is not None and "energy" in job.parameters:
        oversubscribe = slurm_job_oversubscribe(slurm_id)
        info["slurm_oversubscribe"] = os.environ[OVERSUBSCRIBE_ENV] = oversubscribe
        attribution, refused = job_attribution(requested, oversubscribe, job.parameters.get("device", "cpu"),
                                               slurm_id)
        if refused:
            return {"ok": False, "error": f"not measured: {refused}", "seconds": 0.0, **info}
        job = replace(job, parameters={**job.parameters,
                                       "energy": {**job.parameters["energy"], "attribution": attribution}})
    return {**execute_job(job, Path(out_dir)), **info}


# --------------------------------------------------------------------------------------------------


def local_cluster(n_workers: int, gpus: bool) -> Any:
    """Workers named device0..N-1, each owning resource device<i> (and GPU i when there are GPUs)."""
    from dask.distributed import Nanny, Scheduler, SpecCluster

    workers = {}
    for index in range(n_workers):
        options: dict[str, Any] = {"nthreads": 1, "resources": {f"{DEVICE_RESOURCE}{index}": 1},
                                   "host": "127.0.0.1"}
        if gpus:
            # The job inside sees only its own GPU, so "cuda" and NVML both mean that one device.
            options["env"] = {"CUDA_VISIBLE_DEVICES": str(index), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
        workers[f"{DEVICE_RESOURCE}{index}"] = {"cls": Nanny, "options": options}
    # Loopback only: a local cluster has no business listening on the machine's network.
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": None, "host": "127.0.0.1"}}
    # Dask's nannies set OMP_NUM_THREADS, MKL_NUM_THREADS and OPENBLAS_NUM_THREADS to 1 in their workers
    # (distributed.nanny.pre-spawn-environ), and every job's kernel would inherit it: torch on one thread,
    # a CPU job measured at half (or a quarter) of the cores the same job uses when run here. The workers
    # keep the runner's environment instead.
    import dask

    with dask.config.set({"distributed.nanny.pre-spawn-environ": {}}):
        return SpecCluster(workers=workers, scheduler=scheduler, asynchronous=False)


def make_cluster(kind: str, study: Study, device: str, out_dir: Path) -> tuple[Any, list[str]]:
    """The cluster and its device slots: the resource each in-flight job takes (one per device)."""
    if kind == "local":
        n_workers = local_worker_count(study, device)
        return (local_cluster(n_workers, device.startswith("cuda")),
                [f"{DEVICE_RESOURCE}{i}" for i in range(n_workers)])
    if kind == "slurm":
        cluster = slurm_cluster(study.cluster.slurm, out_dir / "logs" / "slurm")
        cluster.scale(jobs=study.cluster.slurm.jobs)
        return cluster, [DEVICE_RESOURCE] * study.cluster.slurm.jobs
    raise ValueError(f"unknown cluster kind {kind!r}")


# A worker that dies fails the task it was running at once (no second try on another worker: a killed
# job is recorded failed and runs again on a rerun), and its SLURM job is replaced soon after.
CLUSTER_CONFIG = {"distributed.scheduler.allowed-failures": 0, "distributed.deploy.lost-worker-timeout": "3s"}


def _lost_worker_result(exc: BaseException, slurm_ids: dict[str, str]) -> dict[str, Any]:
    """The result of a job whose worker died under it."""
    worker = getattr(exc, "last_worker", None)
    name = str(getattr(worker, "name", "") or "")
    slurm_id = slurm_ids.get(name, "")
    where = f"its worker's SLURM job {slurm_id}" if slurm_id else f"its worker {name or '?'}"
    return {"ok": False, "seconds": 0.0, "slurm_job_id": slurm_id, "slurm_oversubscribe": "",
            "error": (f"WorkerLost: {where} ended while the job ran (scancel, the job's walltime, memory or "
                      "the node); nothing of it was kept. A rerun runs it again.")}


def run_on_cluster(jobs: list[Job], out_dir: Path, kind: str, study: Study,
                   device: str) -> Iterator[tuple[Job, dict[str, Any]]]:
    """Submit jobs in order, at most one per device slot at a time, and yield (job, result) as each
    finishes. On SLURM, a worker job that ended is replaced while jobs are left."""
    import dask
    from dask.distributed import Client

    if not jobs:
        return
    for noisy in ("distributed", "dask_jobqueue"):  # importing distributed set its loggers to INFO; the
        logging.getLogger(noisy).setLevel(logging.WARNING)  # workers' own logs are in logs/slurm
    # The config stays set while the cluster runs: the lost-worker timeout is read when a worker goes.
    with dask.config.set(CLUSTER_CONFIG):
        cluster, slots = make_cluster(kind, study, device, out_dir)
        with cluster, Client(cluster) as client:
            yield from _run_in_slots(client, cluster, jobs, slots, out_dir, kind == "slurm", study)


def _run_in_slots(client: Any, cluster: Any, jobs: list[Job], slots: list[str], out_dir: Path, on_slurm: bool,
                  study: Study) -> Iterator[tuple[Job, dict[str, Any]]]:
    from dask.distributed import wait

    todo, free = list(jobs), list(slots)
    running: dict[Any, tuple[Job, str]] = {}
    slurm_ids: dict[str, str] = {}  # worker name -> its SLURM job id, as last seen
    while todo or running:
        while todo and free:
            # Every job, the unmeasured data job included, takes a whole device, so nothing ever
            # runs beside a measurement on the same device.
            job, slot = todo.pop(0), free.pop(0)
            running[client.submit(_run_on_worker, job, str(out_dir), on_slurm, study.energy.attribution,
                                  key=f"llm-energy-{job.key}-{uuid.uuid4().hex[:8]}", pure=False,
                                  resources={slot: 1})] = (job, slot)
        if on_slurm:
            slurm_ids.update(
                {name: str(w.job_id) for name, w in cluster.workers.items() if getattr(w, "job_id", None)})
        try:
            finished = list(wait(list(running), timeout=2, return_when="FIRST_COMPLETED").done)
        except TimeoutError:
            finished = []
        if on_slurm:
            cluster.scale(jobs=study.cluster.slurm.jobs)  # a new worker job for any that ended
        while finished:
            future = finished.pop()
            job, slot = running.pop(future)
            free.append(slot)
            result = _result(future, slurm_ids)
            future.release()  # at once: a result still held when its worker dies would be computed again
            yield job, result


def _result(future: Any, slurm_ids: dict[str, str]) -> dict[str, Any]:
    from distributed.scheduler import KilledWorker

    if future.status != "error":
        return future.result()
    exc = future.exception()
    if isinstance(exc, KilledWorker):
        return _lost_worker_result(exc, slurm_ids)
    return {"ok": False, "error": short_error(exc), "seconds": 0.0}
