"""llm-energy: energy-aware LLM deployment studies.

The package is a stack of layers, one folder each (README, "Where things live"):
config, layout, items (foundation); data/ (ground); models/, measure/, methods/, analysis/ (middle);
tables/, report/ (plumbing); phases/ (one module per notebook); runner/ (jobs, cluster, study, plan);
cli. The modules were one flat folder before: their old names (``llm_energy.rank``,
``from llm_energy import scoring``) still import, as the same module objects as the new ones.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

# old flat module -> where it lives now
MOVED: dict[str, str] = {
    "teleqna": "data.teleqna", "energy": "measure.meter", "throughput": "measure.throughput",
    "results": "tables.store", "records": "tables.rows", "quant8": "models.quant8",
    "sparse": "models.sparse_kernels", "scoring": "methods.scoring", "generation": "methods.generation",
    "prune": "methods.sparsify", "lora": "methods.lora_training", "significance": "analysis.significance",
    "rank": "analysis.ranking_math", "plots": "report.figures", "evaluation": "phases.evaluation",
    "finetune": "phases.finetune", "inference": "phases.inference", "pruning": "phases.pruning",
    "ranking": "phases.ranking", "jobs": "runner.jobs", "scale": "runner.scale", "study": "runner.study",
    "plan": "runner.plan", "checks": "runner.checks",
    # (data, models and report are folders now; each resolves its old module's names itself)
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports llm_energy.<old name> as the module that now lives elsewhere (the same object)."""

    def find_spec(self, fullname: str, path: object = None, target: object = None):  # noqa: ANN201
        prefix, _, name = fullname.partition(".")
        if prefix != __name__ or name not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(f"{__name__}.{MOVED[spec.name.partition('.')[2]]}")

    def exec_module(self, module: ModuleType) -> None:
        pass


if not any(isinstance(finder, _Alias) for finder in sys.meta_path):
    sys.meta_path.append(_Alias())


def __getattr__(name: str) -> ModuleType:
    if name in MOVED:
        return importlib.import_module(f"{__name__}.{MOVED[name]}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _quiet_optional_kernel_notice() -> None:
    """bitsandbytes (0.50), imported on a CPU with AVX-512 bf16, tries to fetch an optional 4-bit GEMM
    from the Hugging Face hub (the ``kernels`` package, not installed: this project never downloads at
    run time) and logs a warning that it failed, in the runner and in every job. Its own CPU path runs
    instead, which is what every nf4 number here measured; the notice is dropped, nothing else."""
    import logging

    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels")

    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_Drop())


_quiet_optional_kernel_notice()


# A job's kernel ends without the interpreter's teardown. papermill waits for the kernel process to
# exit after the last cell, and unloading torch and transformers module by module took about a second
# of every job (outside any window: dead time, issue 29). The runner asks for it (`runner.jobs`); a
# kernel a researcher opens in JupyterLab is never touched. Everything the job writes is closed by then
# (tables through context managers); the handler flushes the standard streams and logging first.
QUICK_EXIT_ENV = "LLM_ENERGY_KERNEL_QUICK_EXIT"


def _quick_exit() -> None:  # pragma: no cover  (the process ends here)
    import logging
    import os

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001,S110  (a closed stream: nothing left to flush)
            pass
    os._exit(0)


def register_quick_exit() -> bool:
    """In a job's kernel (the runner set QUICK_EXIT_ENV), end the process without teardown once its
    cells are done; called on import, and by a warm kernel once it has the job's environment."""
    import os

    if os.environ.get(QUICK_EXIT_ENV) != "1" or "ipykernel" not in sys.modules:
        return False
    import atexit

    atexit.register(_quick_exit)
    return True


register_quick_exit()
