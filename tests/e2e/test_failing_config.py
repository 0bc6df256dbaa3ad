"""A config that raises is recorded, the others complete, and the report lists the failure."""

import json
import subprocess
import sys

import pytest

from llm_energy.tables import store as results

# beside_smoke: in make test's smoke-study process, which would otherwise finish first
pytestmark = [pytest.mark.slow, pytest.mark.beside_smoke]


def test_raising_config_leaves_others_complete(root, tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()  # exists, so validation passes; holds no config.json, so loading raises
    params = tmp_path / "study.yaml"
    params.write_text(f"""
study: one-broken
models:
  - name: tiny-random-llama
  - name: broken
    source: local
    path: {broken}
precisions: [fp32]
tasks:
  rca: {{max_items: 3}}
  qa: {{max_items: 3}}
energy: {{idle_seconds: 0.5, repeats: 1, max_repeats: 1}}
ranking: {{bootstrap: 10}}
""")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "llm_energy.cli", "run", str(params), "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # finished, with a failure to report
    assert "FAILED inference__broken__fp32: FileNotFoundError" in proc.stdout
    failures = json.loads((out / "failures.json").read_text())
    assert [f["job"] for f in failures] == ["inference__broken__fp32"]
    assert "has no config.json" in failures[0]["error"]
    # the executed notebook with the failing cell is kept, and the job's log
    assert (out / "notebooks" / "03_inference__broken__fp32.ipynb").is_file()
    assert (out / "logs" / "inference__broken__fp32.log").is_file()
    energy = results.read_table(out, "energy")
    assert set(energy[energy["phase"] == "inference"]["config_id"]) == {"tiny-random-llama__fp32"}
    configs = results.read_table(out, "configs").set_index("config_id")
    assert configs.loc["broken__fp32", "status"] == "failed"
    html = (out / "report.html").read_text()
    assert "Failed configurations" in html and "inference__broken__fp32" in html
