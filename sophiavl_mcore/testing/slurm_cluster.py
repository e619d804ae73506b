"""A real Slurm cluster of one or more nodes in a temporary directory (tests of the sbatch
template).

Daemons from the Debian packages (``munge``, ``slurmctld``, one ``slurmd`` per node), each
in the foreground as our own child process, with every path they write (munge key,
socket, state, spool, logs, pid files) under one directory. Several nodes are emulated
on this one host: one ``slurmd -N <node>`` per ``NodeName`` line, each with
``NodeAddr=127.0.0.1``, its own ``Port`` and its own spool, pid and log files (``%n`` in
the paths); every node advertises the host's CPUs, so together they oversubscribe it
(``SlurmdParameters=config_overrides``). Clients (``sbatch``, ``scontrol``, ``squeue``,
``srun`` inside jobs) find the cluster through ``SLURM_CONF``; the munge
socket is in ``slurm.conf`` (``AuthInfo=socket=…``), which clients read too, so nothing
under ``/etc`` or ``/run`` is touched and several clusters can coexist on one machine.

There is no ``slurmdbd``, so ``sacct`` has nothing to report: job state comes from
``scontrol show job`` (completed jobs stay visible for ``MinJobAge`` seconds).

    with SlurmCluster(tmp_dir, nodes=2) as cluster:
        job = cluster.submit(script, env={...}, args=["--nodes=2"])
        info = cluster.wait(job, {"COMPLETED", "FAILED"}, timeout_s=600)

Daemons are stopped by the process ids we started (SIGTERM, then SIGKILL after a
grace period); jobs still known to the controller are cancelled first and waited for,
so that no ``slurmstepd`` or training process outlives the cluster, and any process that
still carries this cluster's ``SLURM_CONF`` in its environment afterwards (a job process
the daemons lost track of) is stopped by its pid too.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from sophiavl_mcore.parallel.init import free_port

logger = logging.getLogger(__name__)

# Debian puts the daemons in /usr/sbin, which is not on every PATH (e.g. a non-root one).
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo")
TERMINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                             "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"})


class SlurmError(RuntimeError):
    """A daemon did not come up, a client command failed, or a wait ran out of time."""


def which(name: str) -> str | None:
    """Path of a Slurm/munge binary (PATH, then the sbin directories)."""
    return shutil.which(name, path=_SEARCH_PATH)


def missing_binaries() -> list[str]:
    """Names of the daemons and clients this module needs that are not installed."""
    return [n for n in (*DAEMONS, *CLIENTS) if which(n) is None]


def _node_memory_mb() -> int:
    """90 % of MemTotal: slurmd drains a node that has less memory than configured."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return max(256, int(line.split()[1]) * 9 // 10 // 1024)
    return 1024


def _parse_record(line: str) -> dict[str, str]:
    """``scontrol show … -o`` output (one line of ``Key=Value`` pairs) as a dict.

    Values may contain spaces (``Command=``, ``Reason=``); a token without ``=`` is the
    continuation of the previous value.
    """
    out: dict[str, str] = {}
    last = None
    for tok in line.split():
        key, sep, value = tok.partition("=")
        if sep and key and (key[0].isupper() or key[0] == "_"):
            out[key], last = value, key
        elif last is not None:
            out[last] += " " + tok
    return out


class SlurmCluster:
    """One controller + ``nodes`` compute nodes (all on this machine) + munge, under ``root``.

    ``nodes``: 1 (default) is one node named after this host; more are ``node0``,
    ``node1``, … (one slurmd each).
    ``cpus``: CPUs each node advertises (default: the CPUs this process may use).
    ``kill_wait_s``: seconds between SIGTERM and SIGKILL when a job is cancelled or
    requeued: the trainer's preemption checkpoint must fit in it.
    """

    def __init__(self, root: str | Path, cpus: int | None = None, kill_wait_s: int = 60,
                 nodes: int = 1) -> None:
        if nodes < 1:
            raise ValueError(f"nodes={nodes} must be >= 1")
        self.root = Path(root).resolve()
        self.cpus = cpus or len(os.sched_getaffinity(0))
        self.kill_wait_s = kill_wait_s
        self.node = socket.gethostname().split(".")[0]  # the controller's host
        self.node_names = [self.node] if nodes == 1 else [f"node{i}" for i in range(nodes)]
        self._owned_dirs: list[Path] = []
        self.conf_path = self.root / "slurm.conf"
        # A unix socket path has at most 107 bytes: fall back to a short directory.
        munge_dir = self.root / "munge"
        if len(str(munge_dir / "munge.socket")) > 100:
            munge_dir = Path(tempfile.mkdtemp(prefix="munge-"))
            self._owned_dirs.append(munge_dir)
        self.munge_socket = munge_dir / "munge.socket"
        self.procs: dict[str, subprocess.Popen] = {}

    # ------------------------------------------------------------------ setup

    @property
    def env(self) -> dict[str, str]:
        """Environment for clients and jobs: the process env plus ``SLURM_CONF``."""
        return {**os.environ, "SLURM_CONF": str(self.conf_path),
                "PATH": os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin"])}

    def write_config(self) -> Path:
        """slurm.conf for a localhost cluster: no cgroups, no accounting, our paths."""
        r = self.root
        for d in ("state", "spool", "log", "run"):
            (r / d).mkdir(parents=True, exist_ok=True)
        (r / "plugstack.conf").write_text("")  # keep /etc/slurm's SPANK plugins out
        lines = [
            "ClusterName=sophiavltest",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            "SlurmUser=root" if os.geteuid() == 0 else f"SlurmUser={_user()}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={r / 'state'}",
            # %n: the node's name, so that the slurmds of emulated nodes do not collide.
            f"SlurmdSpoolDir={r / 'spool' / '%n'}",
            f"SlurmctldPidFile={r / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'run' / 'slurmd.%n.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd.%n.log'}",
            f"PlugStackConfig={r / 'plugstack.conf'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            # No cgroup plugins: containers without systemd/cgroup delegation run jobs too.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            f"MailProg={shutil.which('true') or 'true'}",  # no mail from a test cluster
            "SchedulerType=sched/builtin",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "ReturnToService=2",
            # The configured CPUs/memory count, not what each slurmd finds on the host:
            # emulated nodes share (and oversubscribe) this machine.
            "SlurmdParameters=config_overrides",
            # The trainer finishes its step and saves between SIGTERM and SIGKILL.
            f"KillWait={self.kill_wait_s}",
            # Finished jobs stay visible to `scontrol show job` (there is no slurmdbd).
            "MinJobAge=3600",
            "InactiveLimit=0",
            *self._node_lines(),
            f"PartitionName=debug Nodes={','.join(self.node_names)} Default=YES "
            "MaxTime=INFINITE State=UP",
        ]
        self.conf_path.write_text("\n".join(lines) + "\n")
        return self.conf_path

    def _node_lines(self) -> list[str]:
        """One ``NodeName`` line per node; emulated nodes get their own slurmd port."""
        mem = _node_memory_mb()
        lines = []
        for name in self.node_names:
            port = f" Port={free_port()}" if len(self.node_names) > 1 else ""
            lines.append(f"NodeName={name} NodeAddr=127.0.0.1 NodeHostname={self.node} "
                         f"CPUs={self.cpus} RealMemory={mem} State=UNKNOWN{port}")
        return lines

    def _spawn(self, name: str, cmd: Sequence[str]) -> subprocess.Popen:
        log = open(self.root / "log" / f"{name}.out", "ab")  # noqa: SIM115 - child owns it
        try:
            proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=self.env,
                                    start_new_session=True)
        finally:
            log.close()
        self.procs[name] = proc
        (self.root / "run" / f"{name}.ownpid").write_text(f"{proc.pid}\n")
        logger.info("started %s pid=%d", name, proc.pid)
        return proc

    def _start_munge(self) -> None:
        mdir = self.munge_socket.parent
        mdir.mkdir(parents=True, exist_ok=True)
        os.chmod(mdir, 0o700)  # munged refuses a key or socket directory others can write
        key = mdir / "munge.key"
        subprocess.run([which("mungekey"), "--create", "--keyfile", str(key), "--bits", "1024"],
                       check=True, capture_output=True)
        self._spawn("munged", [which("munged"), "--foreground", "--force",
                               f"--socket={self.munge_socket}", f"--key-file={key}",
                               f"--pid-file={mdir / 'munged.pid'}",
                               f"--log-file={self.root / 'log' / 'munged.log'}",
                               f"--seed-file={mdir / 'munged.seed'}"])
        self._wait_for(lambda: self.munge_socket.exists(), 30, "munged socket")

    def start(self, timeout_s: float = 120.0) -> SlurmCluster:
        """Write the config, start munged, slurmctld, a slurmd per node; wait until every
        node is idle."""
        missing = missing_binaries()
        if missing:
            raise SlurmError(f"Slurm/munge binaries not found: {', '.join(missing)}")
        self.root.mkdir(parents=True, exist_ok=True)
        self.write_config()
        try:
            self._start_munge()
            conf = str(self.conf_path)
            self._spawn("slurmctld", [which("slurmctld"), "-D", "-i", "-f", conf])
            self._wait_for(lambda: self._scontrol_ok("ping"), timeout_s, "slurmctld")
            for node in self.node_names:
                name = "slurmd" if len(self.node_names) == 1 else f"slurmd-{node}"
                self._spawn(name, [which("slurmd"), "-D", "-f", conf, "-N", node])
            self._wait_for(self._nodes_idle, timeout_s, f"nodes {self.node_names} idle")
        except BaseException:
            self.stop()
            raise
        logger.info("slurm cluster up under %s (nodes %s, %d CPUs each)", self.root,
                    ",".join(self.node_names), self.cpus)
        return self

    def _wait_for(self, ready, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise SlurmError(f"{name} exited with {proc.returncode} while waiting for "
                                     f"{what}\n{self.daemon_logs()}")
            if ready():
                return
            time.sleep(0.5)
        raise SlurmError(f"timed out after {timeout_s:.0f}s waiting for {what}\n"
                         f"{self.daemon_logs()}")

    def _scontrol_ok(self, *args: str) -> bool:
        return subprocess.run([which("scontrol"), *args], env=self.env,
                              capture_output=True).returncode == 0

    def node_states(self) -> dict[str, str]:
        """Each node's state (``IDLE``, ``ALLOCATED``, ``IDLE+COMPLETING``, …)."""
        res = subprocess.run([which("scontrol"), "show", "node", "-o"],
                             env=self.env, capture_output=True, text=True)
        if res.returncode != 0:
            return {}
        records = (_parse_record(line) for line in res.stdout.splitlines() if line.strip())
        return {r["NodeName"]: r.get("State", "") for r in records if "NodeName" in r}

    def _nodes_idle(self, exact: bool = False) -> bool:
        """IDLE in every node's state (``exact``: nothing else, e.g. not IDLE+COMPLETING)."""
        states = self.node_states()
        return all((states.get(n) == "IDLE") if exact else ("IDLE" in states.get(n, ""))
                   for n in self.node_names)

    def daemon_logs(self, tail_lines: int = 30) -> str:
        """Last lines of each daemon's log (for failure messages)."""
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            lines = path.read_text(errors="replace").splitlines()[-tail_lines:]
            parts.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    # ------------------------------------------------------------------ clients

    def run_client(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run a Slurm client (``scontrol``, ``squeue``, …) against this cluster."""
        exe = which(args[0])
        if exe is None:
            raise SlurmError(f"{args[0]} not found")
        # Queries are idempotent: under load a client can die of SIGPIPE (-13) or time out
        # when slurmctld drops its socket; a query is retried, a command is not.
        attempts = 5 if _is_query(args) else 1
        for attempt in range(attempts):
            res = subprocess.run([exe, *args[1:]], env=self.env, capture_output=True,
                                 text=True)
            if res.returncode == 0 or not _transient(res):
                break
            logger.warning("%s failed (%d), attempt %d/%d: %s", " ".join(args),
                           res.returncode, attempt + 1, attempts, res.stderr.strip())
            time.sleep(1.0 + attempt)
        if check and res.returncode != 0:
            raise SlurmError(f"{' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
        return res

    def submit(self, script: str | Path, env: Mapping[str, str] | None = None,
               args: Sequence[str] = (), script_args: Sequence[str] = (),
               cwd: str | Path | None = None) -> int:
        """``sbatch [args] script [script_args]``; ``env`` is added to the job's
        environment (sbatch exports the submitting environment). Returns the job id."""
        res = subprocess.run([which("sbatch"), "--parsable", *args, str(script), *script_args],
                             env={**self.env, **(env or {})}, capture_output=True, text=True,
                             cwd=str(cwd) if cwd else None)
        if res.returncode != 0:
            raise SlurmError(f"sbatch failed ({res.returncode}): {res.stderr.strip()}")
        job_id = int(res.stdout.strip().split(";")[0])
        logger.info("submitted %s as job %d", script, job_id)
        return job_id

    def job_info(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, …)."""
        res = self.run_client("scontrol", "show", "job", str(job_id), "-o")
        return _parse_record(res.stdout.strip().splitlines()[0])

    def job_state(self, job_id: int) -> str:
        """The job's base state, e.g. ``PENDING``, ``RUNNING``, ``COMPLETED``."""
        return self.job_info(job_id)["JobState"]

    def wait(self, job_id: int, states: Iterable[str] = TERMINAL_STATES,
             timeout_s: float = 600.0, poll_s: float = 2.0) -> dict[str, str]:
        """Block until the job's state is one of ``states``; returns its info."""
        wanted = set(states)
        deadline = time.monotonic() + timeout_s
        while True:
            info = self.job_info(job_id)
            if info["JobState"] in wanted:
                return info
            if time.monotonic() > deadline:
                raise SlurmError(f"job {job_id} still {info['JobState']} after {timeout_s:.0f}s "
                                 f"(wanted {sorted(wanted)}): {info}")
            time.sleep(poll_s)

    def requeue(self, job_id: int, release: bool = True) -> None:
        """``scontrol requeue``: Slurm kills the running job (SIGTERM, SIGKILL after
        KillWait) and queues it again under the same id. A requeued job is held back
        for two minutes (its EligibleTime); ``release`` makes it eligible once the old
        run has finished, as an administrator would with ``StartTime=now``."""
        self.run_client("scontrol", "requeue", str(job_id))
        if release:
            self.release(job_id)

    def wait_requeued(self, job_id: int, timeout_s: float | None = None) -> None:
        """Wait until a requeued job is PENDING again and every node has finished its old
        run (the run's files are final; the job is still held by its EligibleTime)."""
        deadline = time.monotonic() + (timeout_s or self.kill_wait_s + 120)
        while (state := self.job_state(job_id)) != "PENDING":  # COMPLETING the old run
            if state in TERMINAL_STATES or time.monotonic() > deadline:
                raise SlurmError(f"job {job_id} is {state}, not PENDING for a restart")
            time.sleep(1.0)
        while not self._nodes_idle(exact=True):
            if time.monotonic() > deadline:
                raise SlurmError(f"nodes still busy with job {job_id}'s old run: "
                                 f"{self.node_states()}")
            time.sleep(0.5)

    def release(self, job_id: int, timeout_s: float | None = None) -> None:
        """Wait until a requeued job is PENDING again (its old run has finished), then
        make it eligible now instead of after Slurm's two-minute requeue delay."""
        self.wait_requeued(job_id, timeout_s)
        # slurmd refuses to launch a job whose new credential is not newer, at one-second
        # resolution, than the revocation of its previous run ("Job credential revoked"):
        # the nodes have finished that run (above); let the clock pass it.
        time.sleep(2.0)
        self.run_client("scontrol", "update", f"JobId={job_id}", "StartTime=now")

    def cancel_all(self, timeout_s: float | None = None) -> None:
        """Cancel every job the controller knows and wait until none is active."""
        res = self.run_client("squeue", "-h", "-o", "%i", check=False)
        ids = res.stdout.split() if res.returncode == 0 else []
        if not ids:
            return
        self.run_client("scancel", *ids, check=False)
        deadline = time.monotonic() + (timeout_s or self.kill_wait_s + 30)
        while time.monotonic() < deadline:
            res = self.run_client("squeue", "-h", "-o", "%i", check=False)
            if res.returncode != 0 or not res.stdout.split():
                return
            time.sleep(1.0)
        logger.warning("jobs still active at teardown: %s", res.stdout.split())

    # ------------------------------------------------------------------ teardown

    def stop(self, grace_s: float = 20.0) -> list[int]:
        """Cancel jobs, then stop the slurmds, slurmctld, munged (reverse start order) by
        the process ids we started: SIGTERM, then SIGKILL after ``grace_s``. Returns the
        pids of processes that outlived that (:meth:`stray_pids`), which are then
        stopped the same way: empty after a clean shutdown."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            try:
                self.cancel_all()
            except Exception:  # teardown goes on: the daemons must stop regardless
                logger.exception("cancelling jobs at teardown failed")
        for name in reversed(list(self.procs)):
            proc = self.procs[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(grace_s)
                except subprocess.TimeoutExpired:
                    logger.warning("%s pid=%d ignored SIGTERM; killing it", name, proc.pid)
                    proc.kill()
                    proc.wait()
            logger.info("stopped %s pid=%d (rc=%s)", name, proc.pid, proc.returncode)
        self.procs.clear()
        strays = self.stray_pids()
        self._stop_strays(grace_s)
        for d in self._owned_dirs:
            shutil.rmtree(d, ignore_errors=True)
        self._owned_dirs.clear()
        return strays

    def stray_pids(self) -> list[int]:
        """Processes (other than this one) whose environment names this cluster's
        ``SLURM_CONF``: the daemons and everything they started (slurmstepd, batch
        shells, srun, torchrun, ranks), including what escaped Slurm's process tracking
        (``proctrack/linuxproc`` follows parent pids). Empty once the cluster is stopped
        cleanly."""
        marker = f"SLURM_CONF={self.conf_path}".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:  # gone, or not ours to read
                continue
            if marker in environ.split(b"\0"):
                pids.append(int(entry.name))
        return pids

    def _stop_strays(self, grace_s: float) -> None:
        """SIGTERM, then SIGKILL, whatever :meth:`stray_pids` still finds (by pid)."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = self.stray_pids()
            if not pids:
                return
            logger.warning("%s to processes left behind by the cluster: %s", sig.name, pids)
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace_s
            while self.stray_pids() and time.monotonic() < deadline:
                time.sleep(0.5)

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _is_query(args: Sequence[str]) -> bool:
    """``scontrol show …``, ``scontrol ping``, ``squeue``, ``sinfo``: safe to repeat."""
    return args[0] in ("squeue", "sinfo") or (
        args[0] == "scontrol" and len(args) > 1 and args[1] in ("show", "ping"))


def _transient(res: subprocess.CompletedProcess) -> bool:
    """A client killed by a signal or one that lost its connection to slurmctld."""
    err = res.stderr or ""
    return res.returncode < 0 or any(
        s in err for s in ("Socket timed out", "Unable to contact", "Connection refused",
                           "Zero Bytes were transmitted"))


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name
