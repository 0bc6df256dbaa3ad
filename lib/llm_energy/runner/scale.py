"""Running a study's configs on Dask: a LocalCluster here, or SLURM jobs through dask-jobqueue.

Energy is only valid when a measured job has its device to itself. Every worker advertises one unit
of the resource ``device`` and every measured job asks for one, so a worker never runs two measured
jobs at once; with one worker per GPU (or one worker for the CPU) no two jobs share a device.
Results need no gathering step: each job writes the study's tables itself, under a file lock, on
the shared output folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

from ..config import SlurmSettings, Study
from .jobs import Job, execute_job

DEVICE_RESOURCE = "device"


def local_worker_count(study: Study, device: str) -> int:
    """One worker per device: each visible GPU, or a single one for the CPU (its cores are one device)."""
    if study.cluster.local_workers:
        return study.cluster.local_workers
    if device.startswith("cuda"):
        import torch

        return max(1, torch.cuda.device_count())
    return 1


def slurm_cluster(settings: SlurmSettings, log_dir: Path) -> Any:
    """A SLURMCluster whose workers each own `gpus_per_job` GPUs and one `device` resource."""
    from dask_jobqueue import SLURMCluster

    directives = list(settings.job_extra_directives)
    if settings.gpus_per_job:
        directives.append(f"--gres=gpu:{settings.gpus_per_job}")
    return SLURMCluster(
        queue=settings.queue,
        account=settings.account,
        walltime=settings.walltime,
        cores=settings.cores,
        processes=1,  # one worker per job: the worker owns the job's devices
        memory=settings.memory,
        job_extra_directives=directives,
        worker_extra_args=["--resources", f"{DEVICE_RESOURCE}=1"],
        log_directory=str(log_dir),
        python=os.environ.get("LLM_ENERGY_PYTHON") or None,
    )


def local_cluster(n_workers: int, gpus: bool) -> Any:
    """Workers named device0..N-1, each owning resource device<i> (and GPU i when there are GPUs)."""
    from dask.distributed import Nanny, Scheduler, SpecCluster

    workers = {}
    for index in range(n_workers):
        options: dict[str, Any] = {"nthreads": 1, "resources": {f"{DEVICE_RESOURCE}{index}": 1}, "host": "127.0.0.1"}
        if gpus:
            # The job inside sees only its own GPU, so "cuda" and NVML both mean that one device.
            options["env"] = {"CUDA_VISIBLE_DEVICES": str(index), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
        workers[f"{DEVICE_RESOURCE}{index}"] = {"cls": Nanny, "options": options}
    # Loopback only: a local cluster has no business listening on the machine's network.
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": None, "host": "127.0.0.1"}}
    return SpecCluster(workers=workers, scheduler=scheduler, asynchronous=False)


def make_cluster(kind: str, study: Study, device: str, out_dir: Path) -> tuple[Any, list[str]]:
    """The cluster and the resource names jobs are spread over (one per device)."""
    if kind == "local":
        n_workers = local_worker_count(study, device)
        return local_cluster(n_workers, device.startswith("cuda")), [f"{DEVICE_RESOURCE}{i}" for i in range(n_workers)]
    if kind == "slurm":
        cluster = slurm_cluster(study.cluster.slurm, out_dir / "logs" / "slurm")
        cluster.scale(jobs=study.cluster.slurm.jobs)
        return cluster, [DEVICE_RESOURCE]
    raise ValueError(f"unknown cluster kind {kind!r}")


def _run_on_worker(job: Job, out_dir: str) -> dict[str, Any]:
    return execute_job(job, Path(out_dir))


def run_on_cluster(jobs: list[Job], out_dir: Path, kind: str, study: Study, device: str) -> Iterator[tuple[Job, dict[str, Any]]]:
    """Submit jobs (data first, then configs), yield (job, result) as each finishes."""
    from dask.distributed import Client, as_completed

    if not jobs:
        return
    cluster, resources = make_cluster(kind, study, device, out_dir)
    with cluster, Client(cluster) as client:
        futures = {}
        for index, job in enumerate(jobs):
            # Every job, the unmeasured data job included, takes a whole device, so nothing ever
            # runs beside a measurement on the same device.
            resource = resources[index % len(resources)]
            future = client.submit(_run_on_worker, job, str(out_dir), key=f"llm-energy-{job.key}", pure=False,
                                   resources={resource: 1})
            futures[future] = job
        for future in as_completed(futures):
            yield futures[future], future.result()
