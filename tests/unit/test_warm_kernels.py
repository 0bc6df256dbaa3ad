"""Warm kernels (runner.warm_kernels): a job's kernel forked from a server that has done the imports,
with the job's environment, directory and streams; a plain kernel wherever that cannot be done; and no
kernel left behind when its launcher dies."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time

import nbformat
import psutil
import pytest

from llm_energy.runner import warm_kernels
from llm_energy.runner.warm_kernels import WarmKernels, import_time_differences, kernel_manager_class

PROBE = ("import json, os, sys\n"
         "print(json.dumps({'pid': os.getpid(), 'ppid': os.getppid(), 'cwd': os.getcwd(), "
         "'preloaded': 'llm_energy.layout' in sys.modules, 'marker': os.environ.get('WARM_TEST_MARKER')}))")


def _notebook(path) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(PROBE)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(path))


def _run(tmp_path, cwd) -> dict:
    import papermill

    _notebook(tmp_path / "in.ipynb")
    manager = kernel_manager_class()
    papermill.execute_notebook(str(tmp_path / "in.ipynb"), str(tmp_path / "out.ipynb"), kernel_name="python3",
                               progress_bar=False, cwd=str(cwd),
                               **({"kernel_manager_class": manager} if manager else {}))
    text = json.loads((tmp_path / "out.ipynb").read_text())["cells"][0]["outputs"][0]["text"]
    return json.loads("".join(text) if isinstance(text, list) else text)


@pytest.fixture
def server(monkeypatch):
    monkeypatch.delenv(warm_kernels.WARM_ENV, raising=False)
    with WarmKernels(["llm_energy.layout"]) as warm:
        assert warm.running, warm.note
        yield warm
    assert warm_kernels.WARM_ENV not in os.environ


def test_a_job_kernel_is_forked_with_the_jobs_environment_and_directory(server, tmp_path, monkeypatch):
    monkeypatch.setenv("WARM_TEST_MARKER", "set after the server started")
    seen = _run(tmp_path, tmp_path)
    assert seen["ppid"] == server.process.pid  # a child of the server...
    assert seen["preloaded"]  # ...that began with the server's imports done
    assert seen["marker"] == "set after the server started"  # the launcher's environment, not the server's
    assert server.served() == {"forked": 1, "plain": 0, "reasons": []}
    assert os.path.realpath(seen["cwd"]) == os.path.realpath(tmp_path)


def test_an_environment_read_at_import_time_gets_a_plain_kernel(server, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1" if os.environ.get("OMP_NUM_THREADS") != "1" else "2")
    seen = _run(tmp_path, tmp_path)
    assert seen["ppid"] != server.process.pid  # exec'd in place of the launcher, not forked
    assert server.served()["plain"] == 1 and "OMP_NUM_THREADS" in server.served()["reasons"][0]
    assert not seen["preloaded"]


def test_without_a_server_jobs_use_plain_kernels(tmp_path, monkeypatch):
    monkeypatch.delenv(warm_kernels.WARM_ENV, raising=False)
    assert kernel_manager_class() is None
    monkeypatch.setenv(warm_kernels.WARM_ENV, f"{socket.gethostname()}:{tmp_path / 'gone.sock'}")
    assert kernel_manager_class() is None  # a socket that is not there
    (tmp_path / "dead.sock").write_text("")  # a path that is no listening socket: the launcher falls back
    monkeypatch.setenv(warm_kernels.WARM_ENV, f"{socket.gethostname()}:{tmp_path / 'dead.sock'}")
    seen = _run(tmp_path, tmp_path)
    assert seen["ppid"] == os.getpid()  # the launcher exec'd a plain kernel in its place
    assert not seen["preloaded"]


def test_a_kernel_dies_with_its_launcher_even_on_sigkill(server):
    manager = kernel_manager_class()(kernel_name="python3")
    asyncio.run(manager.start_kernel())
    try:
        launcher = manager.provisioner.process.pid
        deadline = time.monotonic() + 30
        kernels = []
        while not kernels and time.monotonic() < deadline:
            kernels = psutil.Process(server.process.pid).children()
            time.sleep(0.1)
        assert len(kernels) == 1, "the server forked no kernel"
        kernel = kernels[0]
        os.kill(launcher, signal.SIGKILL)
        kernel.wait(timeout=10)  # raises psutil.TimeoutExpired if the kernel outlived its launcher
        assert not kernel.is_running()
    finally:
        asyncio.run(manager.cleanup_resources())


def test_the_launcher_exits_as_its_kernel_exited(server):
    manager = kernel_manager_class()(kernel_name="python3")
    asyncio.run(manager.start_kernel())
    launcher = manager.provisioner.process
    kernels = []
    deadline = time.monotonic() + 30
    while not kernels and time.monotonic() < deadline:
        kernels = psutil.Process(server.process.pid).children()
        time.sleep(0.1)
    kernels[0].send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=10) == -signal.SIGTERM
    asyncio.run(manager.cleanup_resources())


def test_import_time_variables_are_compared_and_others_ignored():
    reference = {"OMP_NUM_THREADS": "2", "HOME": "/root", "TORCHINDUCTOR_CACHE_DIR": "/tmp/a"}
    assert import_time_differences({**reference, "HOME": "/x", "LLM_ENERGY_RUNNER": "h:1"}, reference) == []
    assert import_time_differences({**reference, "TORCHINDUCTOR_CACHE_DIR": "/tmp/b"}, reference) == []
    assert import_time_differences({**reference, "OMP_NUM_THREADS": "1"}, reference) == ["OMP_NUM_THREADS"]
    assert import_time_differences({**reference, "HF_HUB_OFFLINE": "1"}, reference) == ["HF_HUB_OFFLINE"]


def test_the_server_preloads_what_the_notebooks_import(tmp_path):
    folders = []
    for model_type in ("llama", "gemma3_text"):  # each folder's type from its config.json
        folder = tmp_path / model_type
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
        folders.append(str(folder))
    modules = warm_kernels.kernel_modules(["fp32", "nf4"], folders)
    for name in ("torch", "transformers.models.llama.modeling_llama",
                 "transformers.models.gemma3.modeling_gemma3", "bitsandbytes", "llm_energy.phases.inference",
                 "llm_energy.report.figures", "tokenizer:" + folders[0]):
        assert name in modules
    assert "bitsandbytes" not in warm_kernels.kernel_modules(["fp32", "w8a8"], folders)
    assert not any("modeling" in m for m in warm_kernels.kernel_modules(["fp32"], [str(tmp_path / "none")]))


def test_a_kernel_dies_with_the_server_as_a_plain_kernel_dies_with_its_runner(monkeypatch):
    monkeypatch.delenv(warm_kernels.WARM_ENV, raising=False)
    with WarmKernels(["llm_energy.layout"]) as warm:
        manager = kernel_manager_class()(kernel_name="python3")
        asyncio.run(manager.start_kernel())
        try:
            kernels = []
            deadline = time.monotonic() + 30
            while not kernels and time.monotonic() < deadline:
                kernels = psutil.Process(warm.process.pid).children()
                time.sleep(0.1)
            warm.process.kill()  # as when the runner is killed: the server goes, SIGKILL and all
            kernels[0].wait(timeout=10)
            assert manager.provisioner.process.wait(timeout=10) is not None  # and the launcher follows
        finally:
            asyncio.run(manager.cleanup_resources())


def test_a_preloaded_tokenizer_is_taken_once_by_load_model(tmp_path):
    from llm_energy.config import ModelSettings
    from llm_energy.models import loading

    spec = ModelSettings(name="tiny-random-llama")
    folder = loading.weights_folder(spec)
    assert loading.preload_tokenizer(folder)
    preloaded = next(iter(loading._PRELOADED_TOKENIZERS.values()))
    first = loading.load_model(spec, "fp32")
    assert first.tokenizer is preloaded  # not read again from the folder
    second = loading.load_model(spec, "fp32")
    assert second.tokenizer is not preloaded  # taken once: a second load reads its own
    assert second.tokenizer("a b").input_ids == first.tokenizer("a b").input_ids
    assert not loading.preload_tokenizer(tmp_path / "missing")
    assert "tokenizer:" + folder in warm_kernels.kernel_modules(["fp32"], [folder])


def test_the_servers_task_records_are_the_kernels_cache(tmp_path, monkeypatch):
    """A study's records (TeleQnA's zip decrypted, every record validated) read once by the server:
    a forked kernel's load_task_data finds them in read_records' cache."""
    import papermill

    from llm_energy.config import TasksSettings

    monkeypatch.delenv(warm_kernels.WARM_ENV, raising=False)
    qa = {"data": "teleqna", "max_items": 20, "invalid_records": "skip"}
    tasks = TasksSettings.model_validate({"qa": qa, "rca": {"max_items": 10}}).model_dump(mode="json")
    data = {"tasks": tasks, "base_dir": str(tmp_path)}
    code = ("import json\nfrom pathlib import Path\nfrom llm_energy.config import TasksSettings\n"
            "from llm_energy.data import tasks\n"
            "before = tasks._read_records_cached.cache_info()\n"
            f"for name, s in TasksSettings.model_validate({tasks!r}).enabled().items():\n"
            f"    tasks.load_task_data(name, s, base_dir=Path({str(tmp_path)!r}))\n"
            "after = tasks._read_records_cached.cache_info()\n"
            "print(json.dumps({'misses': after.misses - before.misses, 'hits': after.hits - before.hits}))")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(code)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(tmp_path / "in.ipynb"))
    modules = [m for m in warm_kernels.kernel_modules([], [], data=data) if m.startswith(warm_kernels.DATA)]
    with WarmKernels(["llm_energy.layout", *modules]) as warm:
        assert warm.running and "not preloaded" not in warm.note, warm.note
        papermill.execute_notebook(str(tmp_path / "in.ipynb"), str(tmp_path / "out.ipynb"),
                                   kernel_name="python3", progress_bar=False,
                                   kernel_manager_class=kernel_manager_class())
    text = json.loads((tmp_path / "out.ipynb").read_text())["cells"][0]["outputs"][0]["text"]
    assert json.loads("".join(text) if isinstance(text, list) else text) == {"misses": 0, "hits": 2}


def test_begin_does_not_wait_and_settled_reports_the_answer(monkeypatch):
    """The runner begins the server before the study's sustained-load burn and polls it from the burn:
    begin() returns at once, settled() is False until the server said ready, and only then do jobs
    see it (WARM_ENV); start() afterwards returns at once."""
    monkeypatch.delenv(warm_kernels.WARM_ENV, raising=False)
    warm = WarmKernels(["llm_energy.layout"])
    try:
        started = time.perf_counter()
        warm.begin()
        assert time.perf_counter() - started < 1.0 and warm.process is not None
        assert warm_kernels.WARM_ENV not in os.environ  # not yet: no job may be handed to it
        polls = 0
        while not warm.settled(0.05):
            polls += 1
        assert polls >= 1 and warm.running and warm.note.startswith(warm_kernels.READY), warm.note
        assert warm_kernels.WARM_ENV in os.environ and warm.started_s > 0
        warm.start()  # already settled: at once
        assert warm.settled() and warm.running
    finally:
        warm.__exit__(None, None, None)
    assert warm_kernels.WARM_ENV not in os.environ
    never = WarmKernels(["llm_energy.layout"], enabled=False)
    assert never.begin().settled() and not never.running


def test_a_server_that_fails_settles_as_failed(monkeypatch):
    monkeypatch.delenv(warm_kernels.WARM_ENV, raising=False)
    monkeypatch.setattr(warm_kernels.sys, "executable", "/bin/false")  # exits without a word
    warm = WarmKernels(["llm_energy.layout"])
    try:
        warm.begin()
        while not warm.settled(0.05):
            pass
        assert not warm.running and warm_kernels.WARM_ENV not in os.environ
        assert warm.note.startswith("no answer"), warm.note
    finally:
        warm.__exit__(None, None, None)


def test_a_server_whose_runner_died_removes_its_socket_folder(monkeypatch):
    """A killed runner cannot remove the server's folder (its ``finally`` never runs): the server, which
    ends when its input closes, removes it itself, so no ``llm-energy-kernels-*`` folder is left."""
    monkeypatch.delenv(warm_kernels.WARM_ENV, raising=False)
    warm = WarmKernels(["llm_energy.layout"])
    try:
        warm.start()
        assert warm.running and os.path.isdir(warm.folder), warm.note
        folder = warm.folder
        warm.process.stdin.close()  # what the runner's death does to the server, without its clean-up
        warm.process.wait(timeout=30)
        assert not os.path.exists(folder)
    finally:
        warm.__exit__(None, None, None)


def test_folders_of_servers_that_are_gone_are_swept_and_live_ones_kept():
    """A whole process group killed at once (the runner and its server) leaves a folder no one removes:
    the next server's start sweeps the folders whose socket refuses a connection (and those that never
    had one, after a day); a listening server's folder and a young one without a socket stay."""
    import shutil
    import tempfile
    from pathlib import Path

    # a short parent: a socket's path must fit AF_UNIX's ~107 bytes (pytest's tmp_path under the test
    # runner's base folder does not)
    tmp_path = Path(tempfile.mkdtemp(prefix="lek-"))

    def folder(name: str) -> str:
        path = tmp_path / f"{warm_kernels.FOLDER_PREFIX}{name}"
        path.mkdir()
        return str(path)

    dead = folder("dead")
    gone = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    gone.bind(os.path.join(dead, "kernels.sock"))
    gone.close()  # the file stays, nothing listens
    long_ago = (time.time() - 120, time.time() - 120)
    os.utime(os.path.join(dead, "kernels.sock"), long_ago)
    just_bound = folder("just-bound")  # refuses too, but a server may be between bind() and listen()
    fresh = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fresh.bind(os.path.join(just_bound, "kernels.sock"))
    fresh.close()
    live = folder("live")
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listening.bind(os.path.join(live, "kernels.sock"))
    listening.listen(1)
    os.utime(os.path.join(live, "kernels.sock"), long_ago)
    young, old = folder("starting"), folder("never-bound")
    os.utime(old, (time.time() - 2 * 86400, time.time() - 2 * 86400))
    other = tmp_path / "someone-elses"
    other.mkdir()
    try:
        removed = warm_kernels.remove_stale_folders(str(tmp_path))
    finally:
        listening.close()
    assert sorted(removed) == sorted([dead, old])
    assert os.path.isdir(live) and os.path.isdir(young) and os.path.isdir(just_bound) and other.is_dir()
    assert not os.path.exists(dead) and not os.path.exists(old)
    shutil.rmtree(tmp_path)
