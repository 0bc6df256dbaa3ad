"""Importing llm_energy drops bitsandbytes' notice that an optional hub kernel could not be fetched
(printed in the runner and every job on CPUs with AVX-512 bf16), and nothing else that logger says."""

import logging
import subprocess
import sys

import llm_energy  # noqa: F401  (installs the filter)

NOTICE = ("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
          "`pip install kernels` and the kernels >= 0.11.1")


def _record(message: str) -> logging.LogRecord:
    return logging.LogRecord("bitsandbytes.backends.cpu.ops", logging.WARNING, __file__, 1, message,
                             ("No module named 'kernels'",), None)


def test_the_optional_kernel_notice_is_dropped_and_other_warnings_kept():
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    assert not logger.filter(_record(NOTICE))
    assert logger.filter(_record("some other warning: %s"))


def test_importing_bitsandbytes_after_the_package_prints_no_notice():
    result = subprocess.run([sys.executable, "-c", "import llm_energy, bitsandbytes"], capture_output=True,
                            text=True, check=True)
    assert "kernels-community" not in result.stderr + result.stdout
