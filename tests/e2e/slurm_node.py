"""A one-node SLURM on 127.0.0.1 for the tests: munged, slurmctld and slurmd in a temporary folder.

Debian's ``slurmctld``, ``slurmd``, ``slurm-client`` and ``munge`` (``.ci/run`` installs them), run
as root: a munge key made here, ``munged`` on its own socket, a ``slurm.conf`` that works in a
container (``proctrack/linuxproc``, ``task/none``, no accounting), the node (this machine's hostname at
127.0.0.1, its CPUs and memory as ``slurmd -C`` reads them) in two partitions: ``shared`` (the
default: jobs may share the node) and ``whole`` (``OverSubscribe=EXCLUSIVE``: every job gets the node).
Ports are free ones picked here, so two test sessions on one machine do not meet.

``slurmd`` runs in a mount namespace of its own where ``node-local/`` is an empty tmpfs: a folder the
node cannot see, as a login node's /tmp is not seen by a cluster's nodes. Everything stops at the end
(jobs cancelled, daemons terminated); :meth:`SlurmNode.leftovers` lists anything still running.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

COMMANDS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "squeue", "sinfo")


def missing_reason() -> str | None:
    """Why a real SLURM cannot start here, or None."""
    missing = [c for c in COMMANDS if shutil.which(c) is None]
    if missing:
        return (f"SLURM is not installed ({', '.join(missing)} missing): apt-get install slurmctld slurmd "
                "slurm-client munge (.ci/run does)")
    if os.geteuid() != 0:
        return "the test SLURM runs its daemons as root (SlurmUser=root)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_line(name: str) -> str:
    """The node's hardware as slurmd detects it (CPUs, sockets, cores, threads, RealMemory)."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=30).stdout
    first = next(line for line in out.splitlines() if line.startswith("NodeName="))
    fields = [f for f in first.split() if not f.startswith(("NodeName=", "UpTime="))]
    return f"NodeName={name} NodeAddr=127.0.0.1 " + " ".join(fields)


class SlurmNode:
    def __init__(self) -> None:
        # munged wants every folder above its socket to be searchable by all: not pytest's 0700 tmp dirs
        self.root = Path(tempfile.mkdtemp(prefix="llm-energy-slurm-"))
        self.root.chmod(0o755)
        self.conf = self.root / "slurm.conf"
        self.node_local = self.root / "node-local"
        self.logs = self.root / "log"
        self.name = socket.gethostname().split(".")[0]
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    # ---------------------------------------------------------------------------------------------

    def start(self) -> None:
        for sub in ("munge", "state", "spool", "log", "node-local"):
            (self.root / sub).mkdir()
        (self.root / "munge").chmod(0o755)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        socket_path = self.root / "munge" / "munge.socket"
        self._spawn("munged", ["munged", "-F", f"--key-file={key}", f"--socket={socket_path}",
                               f"--pid-file={self.root / 'munge' / 'munged.pid'}",
                               f"--log-file={self.logs / 'munged.log'}",
                               f"--seed-file={self.root / 'munge' / 'munged.seed'}"])
        self._wait(lambda: socket_path.exists(), 20, "munged did not create its socket")
        self.conf.write_text(self._slurm_conf(socket_path))
        self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        # slurmd in its own mount namespace, where node-local/ is an empty tmpfs the driver cannot see into
        local = f"mount -t tmpfs llm-energy-node-local {self.node_local} && "
        unshare = shutil.which("unshare")
        if unshare and subprocess.run([unshare, "--mount", "--propagation", "private", "true"],
                                      capture_output=True).returncode == 0:
            command = [unshare, "--mount", "--propagation", "private", "sh", "-c",
                       f'{local}exec slurmd -D -f "$0" -N "$1"', str(self.conf), self.name]
            self.node_local_hidden = True
        else:
            command = ["slurmd", "-D", "-f", str(self.conf), "-N", self.name]
            self.node_local_hidden = False
        self._spawn("slurmd", command)
        self._wait(self._node_idle, 60, "the node did not come up idle in sinfo")

    def _slurm_conf(self, munge_socket: Path) -> str:
        root = self.root
        return f"""\
ClusterName=llm-energy-test
SlurmctldHost={self.name}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={root / 'state'}
SlurmdSpoolDir={root / 'spool'}
SlurmctldPidFile={root / 'slurmctld.pid'}
SlurmdPidFile={root / 'slurmd.pid'}
SlurmctldLogFile={self.logs / 'slurmctld.log'}
SlurmdLogFile={self.logs / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
KillWait=5
MinJobAge=600
{node_line(self.name)} State=UNKNOWN
PartitionName=shared Nodes={self.name} Default=YES MaxTime=INFINITE State=UP
PartitionName=whole Nodes={self.name} OverSubscribe=EXCLUSIVE MaxTime=INFINITE State=UP
"""

    def _spawn(self, name: str, command: list[str]) -> None:
        log = open(self.logs / f"{name}.out", "w")
        self.procs[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)

    def _wait(self, ready, seconds: float, what: str) -> None:
        deadline = time.time() + seconds
        while time.time() < deadline:
            if ready():
                return
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} exited while starting\n{self.tail()}")
            time.sleep(0.3)
        raise RuntimeError(f"{what} within {seconds:.0f} s\n{self.tail()}")

    def _node_idle(self) -> bool:
        proc = self.run(["sinfo", "-h", "-N", "-o", "%t"], check=False)
        return proc.returncode == 0 and proc.stdout.split()[:1] == ["idle"]

    # ---------------------------------------------------------------------------------------------

    def run(self, command: list[str], check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        proc = subprocess.run(command, capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(command)}: exit {proc.returncode}\n{proc.stdout}{proc.stderr}")
        return proc

    def jobs(self) -> dict[str, dict[str, str]]:
        """Every job the controller remembers (MinJobAge: finished ones for 10 minutes), by id."""
        out = self.run(["scontrol", "-o", "show", "jobs"]).stdout
        found = {}
        for line in out.splitlines():
            fields = dict(re.findall(r"(\w+)=(\S*)", line))
            if "JobId" in fields:
                found[fields["JobId"]] = fields
        return found

    def running(self, name: str = "") -> list[str]:
        return [j for j, f in self.jobs().items() if f.get("JobState") == "RUNNING"
                and (not name or f.get("JobName") == name)]

    def tail(self, lines: int = 40) -> str:
        parts = []
        for log in sorted(self.logs.glob("*")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {log} (last {len(text)} lines)\n" + "\n".join(text))
        return "\n".join(parts)

    # ---------------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Cancel every job, wait for them to end, then stop the daemons (slurmd, slurmctld, munged)."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            self.run(["scancel", "--user", "root", "--full"], check=False)
            deadline = time.time() + 30
            while time.time() < deadline:
                try:
                    if not [j for j, f in self.jobs().items()
                            if f.get("JobState") in ("RUNNING", "PENDING", "COMPLETING")]:
                        break
                except (RuntimeError, subprocess.TimeoutExpired):
                    break
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def leftovers(self) -> list[str]:
        """Processes still running that this SLURM started: its daemons, or anything with its SLURM_CONF
        in the environment (job steps, workers, kernels)."""
        import psutil

        found = [f"{n} (pid {p.pid})" for n, p in self.procs.items() if p.poll() is None]
        mark = f"SLURM_CONF={self.conf}"
        for proc in psutil.process_iter(["pid", "name", "status"]):
            if proc.pid == os.getpid() or proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            try:
                with open(f"/proc/{proc.pid}/environ", "rb") as handle:
                    environ = handle.read().decode(errors="replace").split("\0")
            except OSError:
                continue
            if mark in environ:
                found.append(f"{proc.info['name']} (pid {proc.pid})")
        return found

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
