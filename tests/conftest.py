"""Shared fixtures. No test may reach a model hub."""

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
if not os.environ.get("LLM_ENERGY_INPUTS_CACHE"):  # runner.inputs_cache: the tests' entries, not the user's
    import atexit
    import shutil
    import tempfile

    _INPUTS = tempfile.mkdtemp(prefix="llm-energy-inputs-")
    os.environ["LLM_ENERGY_INPUTS_CACHE"] = _INPUTS
    atexit.register(shutil.rmtree, _INPUTS, True)

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def tiny_model():
    """The tiny random Llama at fp32 (built once per machine, cached)."""
    from llm_energy.config import ModelSettings
    from llm_energy.models.loading import load_model

    return load_model(ModelSettings(name="tiny-random-llama"), "fp32")
