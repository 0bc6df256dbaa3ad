"""A phase notebook given a whole study's parameters file stops with a message naming
`llm-energy params`, instead of running its defaults (papermill itself only warns)."""

import subprocess
import sys

import pytest


def test_study_file_given_to_a_notebook_stops_with_the_way_out(root, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "papermill", str(root / "notebooks" / "03_inference.ipynb"),
                           str(tmp_path / "out.ipynb"), "-f", str(root / "params" / "smoke.yaml"), "-k",
                           "python3", "--cwd", str(root / "notebooks"), "--no-progress-bar"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode != 0
    assert "StudyParametersGiven" in proc.stderr
    assert "llm-energy params STUDY.yaml --job JOB_ID" in proc.stderr
    assert "keys study, description, phases, models, precisions" in proc.stderr


def test_refusal_only_for_study_keys():
    from llm_energy.layout import StudyParametersGiven, refuse_study_parameters

    refuse_study_parameters({"model": {"name": "tiny-random-llama"}, "precision": "fp32", "tasks": {}})
    with pytest.raises(StudyParametersGiven, match=r"keys models, precisions.*llm-energy jobs STUDY.yaml"):
        refuse_study_parameters({"models": [], "precisions": ["fp32"], "tasks": {}})
