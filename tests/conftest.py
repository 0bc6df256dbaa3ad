"""Shared fixtures. No test may reach a model hub."""

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

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
