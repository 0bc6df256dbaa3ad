"""Test collection for the whole repository (tests/ and the nbval runs of notebooks/)."""

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "smoke: reads the smoke study (tools/parallel_tests.py runs these "
                                       "together)")
    config.addinivalue_line("markers", "slurm: runs studies on a real one-node SLURM "
                                       "(tests/e2e/test_slurm.py)")
    config.addinivalue_line("markers", "beside_smoke: runs in the smoke study's process "
                                       "(tools/parallel_tests.py), which would otherwise finish first")
    config.addinivalue_line("markers", "quiet: needs the machine to itself (tools/parallel_tests.py runs "
                            "these alone, after both groups)")


def pytest_itemcollected(item):
    """Every test that reads the smoke study is marked ``smoke`` (make test runs them in one process, so
    the study runs once), and each notebook cell nbval runs is marked ``slow`` (make test-fast skips it)."""
    if "smoke_study" in getattr(item, "fixturenames", ()):
        item.add_marker(pytest.mark.smoke)
    elif str(getattr(item, "path", "")).endswith(".ipynb"):
        item.add_marker(pytest.mark.slow)
