"""A job kernel's launcher when the runner keeps warm kernels (:mod:`llm_energy.runner.warm_kernels`).

Run by path, standard library only (it must start in tens of milliseconds, so it imports nothing of
the package): ``python warm_launch.py SOCKET -f CONNECTION_FILE [kernel arguments]``. It asks the warm
kernel server listening on SOCKET to fork a kernel with this process's standard streams, environment
and working directory, then stands in for that kernel towards whoever launched it (jupyter_client):

- signals it receives (interrupt, terminate, hang-up) are passed on to the kernel;
- it exits as the kernel exited (its status, or the signal that ended it);
- when it dies, however it dies (SIGKILL included), the kernel dies too: the kernel watches a pipe whose
  only writer is this process, and ends itself when the pipe closes.

When no server answers, the server refuses (an environment the warm kernels were not started with), or
anything else fails before the kernel is forked, it becomes a plain kernel (``python -m
ipykernel_launcher``, exec'd in place): a job never fails for want of a warm kernel.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
MESSAGE_BYTES = 1 << 20
CONNECT_TIMEOUT_S = 10.0


def plain_kernel(arguments: list[str], reason: str) -> None:
    """Replace this process with an ordinary kernel (never returns)."""
    if os.environ.get("LLM_ENERGY_WARM_KERNELS_DEBUG"):
        print(f"warm kernel not used: {reason}", file=sys.stderr, flush=True)
    options = sys.orig_argv[1:sys.orig_argv.index(sys.argv[0])] if sys.argv[0] in sys.orig_argv else []
    os.execv(sys.executable, [sys.executable, *options, "-m", "ipykernel_launcher", *arguments])


def exit_as(status: int) -> None:
    """Exit as a process that ended with this waitpid status did (never returns)."""
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        signal.signal(number, signal.SIG_DFL)
        os.kill(os.getpid(), number)
        time.sleep(1.0)
        os._exit(128 + number)
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit("usage: warm_launch.py SOCKET -f CONNECTION_FILE [kernel arguments]")
    path, arguments = argv[0], argv[1:]
    try:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        server.settimeout(CONNECT_TIMEOUT_S)
        server.connect(path)
        read_end, write_end = os.pipe()  # the kernel's life line: this process holds the only writer
        request = {"arguments": arguments, "cwd": os.getcwd(), "env": dict(os.environ),
                   "prefix": sys.prefix}
        socket.send_fds(server, [json.dumps(request).encode()], [0, 1, 2, read_end])
        os.close(read_end)
        reply = json.loads(server.recv(MESSAGE_BYTES) or b"{}")
    except (OSError, ValueError) as exc:
        plain_kernel(arguments, f"{type(exc).__name__}: {exc}")
        return
    if "pid" not in reply:
        plain_kernel(arguments, str(reply.get("refused", "no reply")))
        return
    pid = int(reply["pid"])
    server.settimeout(None)

    def forward(number: int, _frame: object) -> None:
        try:
            os.kill(pid, number)
        except ProcessLookupError:
            pass

    for number in FORWARDED:
        signal.signal(number, forward)
    while True:
        try:
            message = server.recv(MESSAGE_BYTES)
        except OSError:
            message = b""
        if not message:  # the server went away: wait for the kernel itself
            while True:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    os._exit(0)
                time.sleep(0.1)
        reply = json.loads(message)
        if "status" in reply:
            os.close(write_end)
            exit_as(int(reply["status"]))


if __name__ == "__main__":
    main(sys.argv[1:])
