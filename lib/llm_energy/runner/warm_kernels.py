"""Warm kernels: every job still runs in a fresh kernel process, without paying its imports.

A job's kernel used to spend about 5 s of every job importing torch, transformers, the model's modeling
module, bitsandbytes and this package (a fresh interpreter each time), outside any measured window:
dead time in the default study, and a third of each job of the smoke study the tests run. The runner
now starts one server process per study (:class:`WarmKernels`) that imports all of it once and then
forks: each job's kernel is a child of that server, a new process with its own memory (copy-on-write),
its own session, the job's environment, working directory and standard streams, that begins with the
modules already imported. Nothing else is shared: a kernel never sees another job's objects, and the
server itself never runs a model, starts a thread or opens a measured window.

The pieces:

- :func:`serve` (``python -m llm_energy.runner.warm_kernels SOCKET MODULE...``): imports the modules,
  refuses to serve if any import started a thread (a forked child would inherit a lock some thread
  held), says ``ready``, then forks one kernel per request on a Unix socket and reports each kernel's
  exit status to its launcher. It ends when the runner closes its standard input.
- :mod:`llm_energy.runner.warm_launch`: the process jupyter_client starts in place of
  ``python -m ipykernel_launcher``; it hands its streams, environment and a life-line pipe to the server,
  forwards signals, and exits as the kernel exits (the kernel dies with it, SIGKILL included).
- :class:`WarmKernelManager`: the kernel manager ``runner.jobs`` gives papermill when a server of this
  host is running (``LLM_ENERGY_WARM_KERNELS``); it only changes the command line.

Where a kernel cannot be forked (no server, another interpreter, an environment variable read at
import time that differs from the server's: thread counts, CUDA, hub and tokenizer settings), the
launcher execs a plain kernel instead. The runner starts a server only for CPU studies run here or on a
local Dask cluster; jobs under SLURM, on CUDA, and notebooks opened in JupyterLab use plain kernels.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import logging
import os
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

WARM_ENV = "LLM_ENERGY_WARM_KERNELS"  # "host:socket" of this study's warm kernel server
LAUNCHER = Path(__file__).resolve().with_name("warm_launch.py")
MESSAGE_BYTES = 1 << 20
READY = "ready"
TOKENIZER = "tokenizer:"  # an argument of the server naming a model folder whose tokenizer it reads
EMBEDDER = "embedder:minilm"  # an argument of the server: read MiniLM (RCA resolutions' similarity)
DATA = "data:"  # an argument of the server: the study's tasks and base folder (JSON), whose records it reads
READY_TIMEOUT_S = 180.0
THREADS_END_S = 2.0  # how long the server waits for the threads its imports left to end, each
# Environment variables read when a module is imported (thread pools, CUDA, the hub and tokenizers'
# settings, the interpreter's own): a kernel whose value differs from the server's is not forked.
IMPORT_TIME_PREFIXES = ("OMP_", "MKL_", "KMP_", "GOMP_", "OPENBLAS_", "NUMEXPR_", "DNNL_", "ONEDNN_", "CUDA_",
                        "NVIDIA_", "TORCH", "PYTORCH_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TOKENIZERS_",
                        "BNB_", "CODECARBON_", "LD_", "PYTHON", "MALLOC_", "MPLBACKEND", "MPLCONFIGDIR",
                        "JUPYTER_", "IPYTHON")


# ---------------------------------------------------------------------------------------------------
# the server


# ...less those torch sets in a process that compiled something (read when compiling, not on import)
SET_AT_RUN_TIME = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")


def import_time_differences(env: dict[str, str], reference: dict[str, str]) -> list[str]:
    """Names of the variables read at import time whose values differ between two environments."""
    names = {k for k in [*env, *reference] if k.startswith(IMPORT_TIME_PREFIXES) and k not in SET_AT_RUN_TIME}
    return sorted(k for k in names if env.get(k) != reference.get(k))


def preload(modules: list[str]) -> list[str]:
    """Import each module; returns those that could not be imported (left to the kernels)."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001  (any import error: the kernel imports it itself, and reports it)
            missing.append(name)
    return missing


def serve(path: str, modules: list[str]) -> None:  # pragma: no cover  (a separate process: tests drive it)
    """Import ``modules``, then fork a kernel for every launcher that connects to ``path``, until the
    standard input closes."""
    tokenizers = [m.removeprefix(TOKENIZER) for m in modules if m.startswith(TOKENIZER)]
    # the standard output carries the ready line to the runner: what the imports print (a progress
    # bar) goes to the standard error
    with contextlib.redirect_stdout(sys.stderr):
        missing = preload(["ipykernel.kernelapp", *(m for m in modules if not m.startswith((TOKENIZER, DATA))
                                                     and m != EMBEDDER)])
        for data in (m.removeprefix(DATA) for m in modules if m.startswith(DATA)):
            from ..data.tasks import preload_records

            request = json.loads(data)
            missing += [f"{task} records" for task in preload_records(request["tasks"], request["base_dir"])]
        if tokenizers:
            from ..models.loading import preload_tokenizer

            missing += [f"tokenizer {t}" for t in tokenizers if not preload_tokenizer(t)]
        if EMBEDDER in modules:
            from ..methods.generation import preload_embedder

            missing += [] if preload_embedder() else ["MiniLM"]
    for thread in threading.enumerate():  # a pool shut down without waiting: its threads end shortly
        if thread is not threading.current_thread():
            thread.join(timeout=THREADS_END_S)
    if threading.active_count() != 1:
        names = ", ".join(t.name for t in threading.enumerate())
        print(f"not serving: importing the modules started threads ({names})", flush=True)
        return
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(64)
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_read, False)
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C in the runner's terminal is the runner's
    reference = dict(os.environ)
    kernels: dict[int, socket.socket] = {}
    served: dict[str, Any] = {"forked": 0, "plain": 0, "reasons": []}
    print(READY + (f" (not preloaded: {', '.join(missing)})" if missing else ""), flush=True)
    while True:
        readable, _, _ = select.select([listener, wake_read, 0], [], [])
        if 0 in readable and not os.read(0, 1):  # the runner closed our input (or died): done
            return
        if wake_read in readable:
            with contextlib.suppress(BlockingIOError):
                while os.read(wake_read, 512):
                    pass
            _reap(kernels)
        if listener in readable:
            connection, _ = listener.accept()
            try:
                message, fds, _, _ = socket.recv_fds(connection, MESSAGE_BYTES, 4)
                request = json.loads(message)
            except (OSError, ValueError) as exc:
                with contextlib.suppress(OSError):
                    connection.send(json.dumps({"refused": f"unreadable request: {exc}"}).encode())
                connection.close()
                continue
            if "query" in request:  # the runner asks what was served
                with contextlib.suppress(OSError):
                    connection.send(json.dumps(served).encode())
                connection.close()
                continue
            refused = _refusal(request, fds, reference)
            if refused:
                served["plain"] += 1
                served["reasons"] = sorted({*served["reasons"], refused})[:5]
                for fd in fds:
                    os.close(fd)
                with contextlib.suppress(OSError):
                    connection.send(json.dumps({"refused": refused}).encode())
                connection.close()
                continue
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _become_kernel(request, fds, [listener.fileno(), connection.fileno(), wake_read, wake_write])
            for fd in fds:
                os.close(fd)
            kernels[pid] = connection
            served["forked"] += 1
            try:
                connection.send(json.dumps({"pid": pid}).encode())
            except OSError:  # the launcher is gone already: its kernel follows through the life line
                pass


def _refusal(request: dict[str, Any], fds: list[int], reference: dict[str, str]) -> str:
    if len(fds) != 4:
        return f"expected 4 descriptors (stdin, stdout, stderr, life line), got {len(fds)}"
    if request.get("prefix") != sys.prefix:
        return f"another Python environment ({request.get('prefix')}; the server's: {sys.prefix})"
    differ = import_time_differences(request.get("env") or {}, reference)
    if differ:
        return f"environment read at import time differs from the server's: {', '.join(differ)}"
    return ""


def _reap(kernels: dict[int, socket.socket]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        connection = kernels.pop(pid, None)
        if connection is not None:
            with contextlib.suppress(OSError):
                connection.send(json.dumps({"status": status}).encode())
            connection.close()


def _become_kernel(request: dict[str, Any], fds: list[int], close: list[int]) -> None:  # pragma: no cover
    """In the forked child: take the launcher's streams, environment and directory, then run ipykernel
    as ``python -m ipykernel_launcher`` would; never returns."""
    code: Any = 1
    server = os.getppid()
    try:
        os.setsid()  # its own session, as jupyter_client starts kernels (and apart from the server's)
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for fd in close:
            os.close(fd)
        for target, fd in zip((0, 1, 2), fds[:3]):
            os.dup2(fd, target)
            os.close(fd)
        _watch_life_line(fds[3])
        _die_with_server(server)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        random.seed()
        if "numpy" in sys.modules:
            sys.modules["numpy"].random.seed()
        if sys.path and sys.path[0] in ("", os.getcwd()):
            del sys.path[0]  # as ipykernel_launcher does; IPython puts the working directory back
        sys.argv = ["ipykernel_launcher", *request["arguments"]]
        parent = request["env"].get("JPY_PARENT_PID", "")
        if parent.isdigit():  # ipykernel read it when the server imported it (as 0): say it again
            sys.argv.append(f"--IPKernelApp.parent_handle={parent}")
        import llm_energy

        llm_energy.register_quick_exit()  # the runner's QUICK_EXIT_ENV arrives with the environment
        from ipykernel import kernelapp

        kernelapp.launch_new_instance()
        code = 0
    except SystemExit as exc:
        code = exc.code
    except BaseException:  # noqa: BLE001  (whatever it was, the child must not return into the server)
        traceback.print_exc()
        code = 1
    finally:
        with contextlib.suppress(BaseException):
            atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(BaseException):
                stream.flush()
        os._exit(code if isinstance(code, int) else (0 if code is None else 1))


def _die_with_server(server: int) -> None:  # pragma: no cover  (in the forked child)
    """End this process when the server ends, as a plain kernel ends when its runner dies (ipykernel
    polls its parent; here the parent is the server, which ends when the runner does): the kernel of a
    study whose runner was killed must not go on writing its tables beside the rerun that resumes it."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, int(signal.SIGKILL), 0, 0, 0) == 0:  # PR_SET_PDEATHSIG
            if os.getppid() != server:  # it ended before the call
                os.kill(os.getpid(), signal.SIGKILL)
            return
    except (OSError, AttributeError):
        pass

    def poll() -> None:
        while os.getppid() == server:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=poll, name="warm-kernel-server-watch", daemon=True).start()


def _watch_life_line(fd: int) -> None:  # pragma: no cover  (in the forked child)
    """End this process when the launcher's end of the pipe closes (the launcher died)."""
    def watch() -> None:
        while True:
            try:
                if not os.read(fd, 1):
                    break
            except InterruptedError:
                continue
            except OSError:
                break
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="warm-kernel-life-line", daemon=True).start()


# ---------------------------------------------------------------------------------------------------
# the runner's side


def kernel_modules(precisions: list[str], folders: list[str], embedder: bool = False,
                   data: dict[str, Any] | None = None) -> list[str]:
    """What a job's kernel imports: torch, transformers' loading and the modeling module of each model
    folder's type (its config.json), bitsandbytes for its precisions, pandas, and every module the phase
    notebooks import; and the tokenizers of the model ``folders`` (``tokenizer:FOLDER``), MiniLM
    when the study scores generated RCA resolutions (``embedder``), and the task records of ``data``
    (``{"tasks": ..., "base_dir": ...}`` as the jobs receive them)."""
    # seaborn (every job's figure; it imports statsmodels: 0.8 s) and peft (adapters) are imported lazily
    modules = ["torch", "transformers", "pandas", "psutil", "codecarbon", "matplotlib", "seaborn", "peft"]
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    for model_type in sorted({t for t in map(_model_type, folders) if t}):
        name = model_type_to_module_name(model_type)
        modules += [f"transformers.models.{name}.configuration_{name}",
                    f"transformers.models.{name}.modeling_{name}"]
    if any(p in ("int8", "nf4", "fp4") for p in precisions):
        modules.append("bitsandbytes")
    return (modules + notebook_imports() + [TOKENIZER + folder for folder in folders]
            + ([EMBEDDER] if embedder else []) + ([DATA + json.dumps(data)] if data else []))


def _model_type(folder: str) -> str | None:
    """A model folder's transformers model type (config.json's ``model_type``), or None."""
    try:
        value = json.loads((Path(folder) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def notebook_imports() -> list[str]:
    """Every module the phase notebooks' code cells import (parsed, not run)."""
    import ast

    from ..layout import notebooks_dir

    found: list[str] = []
    for notebook in sorted(notebooks_dir().glob("*.ipynb")):
        cells = json.loads(notebook.read_text()).get("cells", [])
        source = "\n".join("".join(c.get("source", "")) for c in cells if c.get("cell_type") == "code")
        try:
            tree = ast.parse(source)
        except SyntaxError:  # magics: leave that notebook's imports to its kernel
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.append(node.module)
                found += [f"{node.module}.{alias.name}" for alias in node.names]
    # `from package import name` names a module or an attribute: preload() skips what is no module
    return [m for m in dict.fromkeys(found) if _is_module(m)]


def _is_module(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


class WarmKernels:
    """This study's warm kernel server: :meth:`start` (or entering a ``with`` block) starts it and waits
    until it is ready (its imports done), so its start-up never overlaps a measured window; stopped on
    exit. While it runs,
    ``LLM_ENERGY_WARM_KERNELS`` names it and :func:`kernel_manager_class` hands jobs to it. A server
    that fails to start is reported and the jobs use plain kernels."""

    def __init__(self, modules: list[str] | Callable[[], list[str]], enabled: bool = True,
                 note: str = "") -> None:
        self.modules = modules  # or a function that lists them, called on start
        self.enabled = enabled  # False: start() does nothing (note says why)
        self.process: subprocess.Popen[str] | None = None
        self.folder: str | None = None
        self.started_s = 0.0
        self.note = note
        self._tried = False
        self._begun = 0.0
        self._answered = False
        self._path = ""

    def __enter__(self) -> "WarmKernels":
        self.start()
        return self

    def start(self) -> "WarmKernels":
        """Start the server and wait until it is ready (once; later calls return at once)."""
        self.begin()
        while not self.settled(READY_TIMEOUT_S):
            pass
        return self

    def begin(self) -> "WarmKernels":
        """Start the server without waiting for it (once): its imports run beside what the runner does
        next, which must not be a measurement (the study's sustained-load burn is not one: it runs
        until :meth:`settled`, then on its own, before it reads the canaries)."""
        if self._tried or not self.enabled:
            return self
        self._tried = True
        self._begun = time.perf_counter()
        remove_stale_folders()
        self.folder = tempfile.mkdtemp(prefix=FOLDER_PREFIX)
        self._path = os.path.join(self.folder, "kernels.sock")
        modules = self.modules() if callable(self.modules) else self.modules
        self.process = subprocess.Popen([sys.executable, "-m", __name__, self._path, *modules],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        return self

    def settled(self, timeout_s: float = 0.0) -> bool:
        """Whether the server's start-up is over: it said ready (jobs are handed to it from now on), it
        failed or gave no answer in READY_TIMEOUT_S (reported; jobs use plain kernels), or it was never
        begun. Waits up to ``timeout_s`` for its answer."""
        if self._answered or not self._tried or self.process is None:
            return True
        assert self.process.stdout is not None
        left = READY_TIMEOUT_S - (time.perf_counter() - self._begun)
        ready, _, _ = select.select([self.process.stdout], [], [], max(0.0, min(timeout_s, left)))
        if not ready and time.perf_counter() - self._begun < READY_TIMEOUT_S:
            return False
        line = self.process.stdout.readline().strip() if ready else ""
        self._answered = True
        self.started_s = time.perf_counter() - self._begun
        if not line.startswith(READY):
            self.note = line or f"no answer in {READY_TIMEOUT_S:.0f} s"
            log.warning("warm kernels not started (%s): each job starts a plain kernel", self.note)
            self._stop()
            return True
        self.note = line
        os.environ[WARM_ENV] = f"{socket.gethostname()}:{self._path}"
        return True

    def summary(self) -> dict[str, Any]:
        """For provenance.json: whether it ran, its start-up seconds, and what it served."""
        return {"used": self.running, "start_s": round(self.started_s, 2), "note": self.note, **self.served()}

    def served(self) -> dict[str, Any]:
        """How many kernels the server forked, how many launchers it sent to a plain kernel and why
        ({} when it is not running)."""
        path = warm_socket()
        if not self.running or path is None:
            return {}
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as client:
                client.settimeout(10)
                client.connect(path)
                client.send(json.dumps({"query": "served"}).encode())
                return json.loads(client.recv(MESSAGE_BYTES))
        except (OSError, ValueError) as exc:
            return {"error": f"{type(exc).__name__}: {exc}"}

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __exit__(self, *exc: Any) -> None:
        self._stop()

    def _stop(self) -> None:
        os.environ.pop(WARM_ENV, None)
        if self.process is not None:
            with contextlib.suppress(OSError):
                assert self.process.stdin is not None
                self.process.stdin.close()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            if self.process.stdout is not None:
                self.process.stdout.close()
            self.process = None
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


FOLDER_PREFIX = "llm-energy-kernels-"  # a server's folder in the temporary directory (its socket inside)
STALE_UNBOUND_S = 86400.0  # a folder whose server never bound its socket is left alone for a day
STALE_BOUND_S = 60.0  # a socket that refuses connections is a dead server's once it is this old


def remove_stale_folders(parent: str | None = None) -> list[str]:
    """Remove the folders of servers that are gone: a whole process group killed at once (``kill -9``
    of the runner's group) leaves a folder no one removes. A folder is stale when its socket refuses a
    connection (no server listens on it) and is over a minute old, or when it has no socket and is over a
    day old; a live server's folder, or one whose server is still starting, is kept. Returns what was
    removed."""
    parent = parent or tempfile.gettempdir()
    removed = []
    try:
        names = [n for n in os.listdir(parent) if n.startswith(FOLDER_PREFIX)]
    except OSError:
        return removed
    for name in names:
        folder = os.path.join(parent, name)
        path = os.path.join(folder, "kernels.sock")
        try:
            if os.path.exists(path):
                if time.time() - os.stat(path).st_mtime < STALE_BOUND_S:
                    continue  # bound just now: its server may be between bind() and listen()
                with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as client:
                    client.settimeout(1.0)
                    try:
                        client.connect(path)
                        continue  # a server answers: in use
                    except (ConnectionRefusedError, FileNotFoundError):
                        pass
            elif time.time() - os.stat(folder).st_mtime < STALE_UNBOUND_S:
                continue
        except OSError:  # another user's folder, or one that went away meanwhile: not ours to judge
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def warm_socket() -> str | None:
    """The socket of a warm kernel server running on this host for this process's study, if any."""
    host, _, path = os.environ.get(WARM_ENV, "").partition(":")
    if host != socket.gethostname() or not path or not os.path.exists(path):
        return None
    return path


def kernel_manager_class() -> type | None:
    """A kernel manager that launches through the warm kernel server, or None (plain kernels)."""
    path = warm_socket()
    if path is None:
        return None
    from jupyter_client.manager import AsyncKernelManager

    class WarmKernelManager(AsyncKernelManager):
        """nbclient's kernel manager with one change: ``python -m ipykernel_launcher ARGS`` becomes
        ``python warm_launch.py SOCKET ARGS`` (the same interpreter; the launcher falls back to the
        former by itself)."""

        def format_kernel_cmd(self, extra_arguments: list[str] | None = None) -> list[str]:
            command = super().format_kernel_cmd(extra_arguments)
            for index in range(1, len(command) - 1):
                if command[index:index + 2] == ["-m", "ipykernel_launcher"]:
                    # the interpreter's own options (-Xfrozen_modules=off) stay in front
                    return [*command[:index], str(LAUNCHER), path, *command[index + 2:]]
            return command

    return WarmKernelManager


def _remove_own_folder(path: str) -> None:
    """Remove the socket and the folder the runner made for it (``llm-energy-kernels-*``): the runner
    removes them when it stops the server, but a runner that was killed cannot, and the server outlives
    it only until it reads the end of its input."""
    folder = os.path.dirname(path)
    if os.path.basename(folder).startswith(FOLDER_PREFIX):
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":  # pragma: no cover
    try:
        serve(sys.argv[1], sys.argv[2:])
    finally:
        _remove_own_folder(sys.argv[1])
    # done: its kernels have ended and it holds nothing to write; tearing down the interpreter (torch,
    # transformers, the tokenizers) would keep the runner waiting ~1.5 s for nothing
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
