"""A local Dask cluster's workers keep the runner's thread settings (Dask's nannies set
OMP_NUM_THREADS=1 by default, in the workers and in the runner's own process, which every job's kernel
would inherit: torch on one thread)."""

from __future__ import annotations

import os


def _thread_settings() -> dict:
    return {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                           "MALLOC_TRIM_THRESHOLD_")}


def test_local_workers_keep_the_runners_thread_settings():
    from dask.distributed import Client

    from llm_energy.runner.scale import local_cluster

    before = _thread_settings()
    cluster = local_cluster(1, gpus=False)
    try:
        with Client(cluster) as client:
            seen = client.submit(_thread_settings, pure=False).result(timeout=60)
    finally:
        cluster.close()
    assert seen == before
    assert _thread_settings() == before  # the nanny used to set them in the runner's own process too
