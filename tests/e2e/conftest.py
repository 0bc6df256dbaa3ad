import subprocess
import sys

import pytest


@pytest.fixture(scope="session")
def smoke_study(root, tmp_path_factory):
    """The smoke study run once through the CLI (papermill, every notebook)."""
    out = tmp_path_factory.mktemp("smoke") / "smoke"
    proc = subprocess.run([sys.executable, "-m", "llm_energy.cli", "run", str(root / "params" / "smoke.yaml"),
                           "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc


@pytest.fixture(scope="session")
def smoke_report(smoke_study):
    return smoke_study[0] / "report.html"
