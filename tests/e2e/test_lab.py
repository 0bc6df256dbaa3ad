"""`make lab` serves JupyterLab at the repository root: its file browser lists notebooks/ and
outputs/, and the project's kernel (registered for the user) is offered. Checked through the Jupyter
server's REST API, with the user's Jupyter folders moved to a temporary one."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(port: int, token: str, path: str):
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                     headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_make_lab_lists_notebooks_outputs_and_the_project_kernel(root, tmp_path):
    make = shutil.which("make")
    venv = Path(sys.prefix)
    if make is None or not (venv / "bin" / "jupyter").exists():
        pytest.skip("needs GNU make and the venv's jupyter")
    port, token = free_port(), secrets.token_hex(16)
    env = {**os.environ, "JUPYTER_DATA_DIR": str(tmp_path / "data"),
           "JUPYTER_CONFIG_DIR": str(tmp_path / "config"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")}
    log = tmp_path / "lab.log"
    lab_args = (f"--no-browser --ip=127.0.0.1 --port={port} --ServerApp.port_retries=0 "
                f"--IdentityProvider.token={token}")
    with open(log, "w") as out:
        # -o: the venv is set up already (the tests run in it); do not reinstall it
        proc = subprocess.Popen([make, "-C", str(root), "-o", str(venv / ".installed"), "lab", f"VENV={venv}",
                                 f"LAB_ARGS={lab_args}"], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"make lab exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            try:
                get(port, token, "/api/status")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                assert time.monotonic() < deadline, ("JupyterLab did not answer in 120 "
                                                     f"s:\n{log.read_text()[-3000:]}")
                time.sleep(1)
        top = {entry["name"]: entry["type"] for entry in get(port, token, "/api/contents/")["content"]}
        assert top.get("notebooks") == "directory" and top.get("outputs") == "directory", top
        notebooks = {entry["name"] for entry in get(port, token, "/api/contents/notebooks")["content"]}
        assert {"03_inference.ipynb", "03_inference.py"} <= notebooks
        assert ("README.md"
                in {entry["name"] for entry in get(port, token, "/api/contents/outputs")["content"]})
        specs = get(port, token, "/api/kernelspecs")["kernelspecs"]
        assert "llm-energy" in specs, sorted(specs)
        project = specs["llm-energy"]["spec"]
        assert str(root) in project["display_name"]
        assert Path(project["argv"][0]).parent == venv / "bin"
        assert (tmp_path / "data" / "kernels" / "llm-energy" / "kernel.json").is_file()  # the user's kernels
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    """End make and the JupyterLab it started (their own process group), however far they got."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
