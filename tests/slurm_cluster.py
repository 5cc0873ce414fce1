"""A real one-host SLURM 22.05 cluster for tests: munge, MariaDB, slurmdbd, slurmctld and two slurmd.

Everything it writes lives under one folder (state, logs, spool, munge key and socket, MariaDB data dir and
socket) except what SLURM insists on: `/etc/slurm/{slurm,gres,slurmdbd}.conf`, because the jobstep plugin
strips SLURM_CONF before its inner srun, and `/etc/hosts` lines for the node names, because torchrun's
rendezvous resolves the first node's name. Those are written only where absent (or left by an earlier run of
this module, recognised by MARKER), and removed again on stop. Daemons run in the foreground, each in its own
session, and are ended through their process groups: nothing is ever ended by name.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

MARKER = "# written by llavaflow tests/slurm_cluster.py"
PACKAGES = ["slurmctld", "slurmd", "slurm-client", "slurmdbd", "munge", "mariadb-server"]
PROGRAMS = ["slurmctld", "slurmd", "slurmdbd", "sbatch", "srun", "sacct", "sacctmgr", "munged", "mariadbd",
            "mariadb-install-db", "mariadb"]
ETC = Path("/etc/slurm")
HOSTS = Path("/etc/hosts")


class Unavailable(RuntimeError):
    """The cluster cannot exist on this machine (not root, no apt, a foreign SLURM config): a reason to skip."""


def _missing_programs():
    return [p for p in PROGRAMS if shutil.which(p) is None and not Path("/usr/sbin", p).exists()]


def install():
    """Debian's SLURM 22.05 + munge + MariaDB through apt (about 30 s warm, 2 min cold); a no-op when present."""
    if not _missing_programs():
        return
    if os.geteuid() != 0:
        raise Unavailable(f"SLURM is not installed ({', '.join(_missing_programs())} missing) and installing it "
                          "with apt-get needs root")
    if shutil.which("apt-get") is None:
        raise Unavailable("SLURM is not installed and there is no apt-get to install it with")
    # policy-rc.d 101 keeps the packages' maintainer scripts from starting system-wide daemons.
    policy = Path("/usr/sbin/policy-rc.d")
    ours = not policy.exists()
    if ours:
        policy.write_text(f"#!/bin/sh\n{MARKER}\nexit 101\n")
        policy.chmod(0o755)
    try:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *PACKAGES]):
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise Unavailable(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    finally:
        if ours and policy.read_text().find(MARKER) >= 0:
            policy.unlink()
    if _missing_programs():
        raise Unavailable(f"apt-get installed {PACKAGES} but {_missing_programs()} are still missing")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _owner_pid(path: Path):
    """The pid recorded in a file this module wrote, or None for a file it did not write."""
    first = path.read_text().splitlines()[:1]
    if not first or not first[0].startswith(MARKER):
        return None
    return int(first[0].split("pid=")[1].split()[0])


class SlurmCluster:
    """`with SlurmCluster(root) as c:` starts the cluster; `c.run(...)` runs a client command against it.

    Two nodes `NODES` on 127.0.0.1, each with `gpus` fake GPUs (character devices under root, AutoDetect=off),
    feature `feature`, in partitions `partitions` (the first is the default) and `urgent`, whose jobs preempt the
    others (requeued), one account `account` for root.
    `SlurmdParameters=config_overrides` lets the nodes declare the CPUs and memory a real profile asks for.
    """

    NODES = ("llfnode1", "llfnode2")

    def __init__(self, root: Path, *, account="llavaflow", partitions=("short", "accel"), feature="h100", gpus=2,
                 cpus=128, mem_mb=1_000_000, min_job_age=300):
        self.root = Path(root)
        self.account, self.partitions, self.feature = account, partitions, feature
        self.gpus, self.cpus, self.mem_mb, self.min_job_age = gpus, cpus, mem_mb, min_job_age
        self.cluster = "llftest"
        self.urgent = "urgent"
        self.host = socket.gethostname()
        self.daemons: dict[str, subprocess.Popen] = {}
        self.written: list[Path] = []
        self.created_etc = False
        self.hosts_line = None

    # --- files outside root -------------------------------------------------------------------------------
    def _claim(self, path: Path):
        """Refuse a file this module did not write, or one another live test session owns."""
        if path.exists():
            owner = _owner_pid(path)
            if owner is None:
                raise Unavailable(f"{path} exists and was not written by this test: refusing to touch a real "
                                  "SLURM configuration")
            if owner != os.getpid() and _alive(owner):
                raise Unavailable(f"{path} belongs to the test cluster of another live session (pid {owner})")

    def _write_etc(self, name, text, mode=0o644):
        path = ETC / name
        path.write_text(f"{MARKER} pid={os.getpid()} root={self.root}\n{text}")
        path.chmod(mode)
        self.written.append(path)

    def _add_hosts(self):
        stale = [line for line in HOSTS.read_text().splitlines() if MARKER in line
                 and not _alive(int(line.split("pid=")[1].split()[0]))]
        if stale:  # left by a test session that died before its stop(): ours to remove
            HOSTS.write_text("".join(line + "\n" for line in HOSTS.read_text().splitlines() if line not in stale))
        missing = []
        for n in self.NODES:
            try:
                if socket.gethostbyname(n) != "127.0.0.1":
                    raise Unavailable(f"node name {n} resolves to {socket.gethostbyname(n)}, not 127.0.0.1")
            except socket.gaierror:
                missing.append(n)
        if missing:
            self.hosts_line = f"127.0.0.1 {' '.join(missing)} {MARKER} pid={os.getpid()}"
            with HOSTS.open("a") as f:
                f.write(("" if HOSTS.read_text().endswith("\n") else "\n") + self.hosts_line + "\n")

    def _remove_hosts(self):
        if self.hosts_line is None:
            return
        lines = HOSTS.read_text().splitlines(keepends=True)
        kept = [line for line in lines if line.rstrip("\n") != self.hosts_line]
        HOSTS.write_text("".join(kept))  # in place: /etc/hosts may be a bind mount
        self.hosts_line = None

    # --- configuration ------------------------------------------------------------------------------------
    def _configure(self):
        r = self.root
        for d in ("state", "log", "run", "dev", "munge", "mysql", *(f"spool/{n}" for n in self.NODES)):
            (r / d).mkdir(parents=True, exist_ok=True)
        (r / "munge").chmod(0o755)  # munged wants the socket folder searchable by all
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.ports = {name: _free_port() for name in ("ctld", "dbd", "mysql", *self.NODES)}
        self.munge_socket = r / "munge" / "munge.socket"
        self.mysql_socket = r / "mysql.sock"
        auth = f"AuthType=auth/munge\nAuthInfo=socket={self.munge_socket}\n"
        nodes, gres = [], ["AutoDetect=off"]
        for n in self.NODES:
            devs = []
            for i in range(self.gpus):
                dev = r / "dev" / f"{n}-gpu{i}"
                if not dev.exists():  # a character device, as real GPUs are; the same numbers as /dev/null
                    os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
                devs.append(str(dev))
            gres.append(f"NodeName={n} Name=gpu File={','.join(devs)}")
            nodes.append(f"NodeName={n} NodeAddr=127.0.0.1 NodeHostname={self.host} Port={self.ports[n]}"
                         f" CPUs={self.cpus} RealMemory={self.mem_mb} Gres=gpu:{self.gpus} Feature={self.feature}"
                         " State=UNKNOWN")
        parts = [f"PartitionName={p} Nodes=ALL Default={'YES' if i == 0 else 'NO'} MaxTime=INFINITE State=UP"
                 " PriorityTier=1" for i, p in enumerate(self.partitions)]
        # jobs there preempt the others, which SLURM requeues (PreemptMode=REQUEUE)
        parts.append(f"PartitionName={self.urgent} Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=10")
        slurm_conf = f"""ClusterName={self.cluster}
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={self.ports['ctld']}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire is also how long a requeued (preempted) job waits before it may start again: 120 s by default
AuthInfo=socket={self.munge_socket},cred_expire=10
CredType=cred/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
SlurmdParameters=config_overrides
ReturnToService=2
SchedulerType=sched/backfill
# a requeued (preempted) job may start again at the scheduler's next pass: 60 s (main) / 30 s (backfill) by default
SchedulerParameters=sched_interval=5,bf_interval=5
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
MinJobAge={self.min_job_age}
KillWait=5
InactiveLimit=0
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={self.ports['dbd']}
AccountingStoragePass={self.munge_socket}
AccountingStorageEnforce=associations
AccountingStoreFlags=job_comment
JobCompType=jobcomp/none
{chr(10).join(nodes)}
{chr(10).join(parts)}
"""
        dbd_conf = f"""{auth}DbdHost={self.host}
DbdAddr=127.0.0.1
DbdPort={self.ports['dbd']}
SlurmUser=root
LogFile={r}/log/slurmdbd.log
PidFile={r}/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={self.ports['mysql']}
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
"""
        for name in ("slurm.conf", "gres.conf", "slurmdbd.conf"):
            self._claim(ETC / name)
        if not ETC.exists():
            ETC.mkdir(parents=True)
            self.created_etc = True
        self._write_etc("slurm.conf", slurm_conf)
        self._write_etc("gres.conf", "\n".join(gres) + "\n")
        self._write_etc("slurmdbd.conf", dbd_conf, mode=0o600)
        self._add_hosts()

    # --- daemons ------------------------------------------------------------------------------------------
    def _spawn(self, name, cmd):
        log = open(self.root / "log" / f"{name}.out", "ab")
        self.daemons[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                              start_new_session=True, cwd=self.root)
        log.close()

    def _wait(self, what, check, timeout=60):
        deadline = time.time() + timeout
        while not check():
            for name, proc in self.daemons.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited ({proc.returncode}) while waiting for {what}; "
                                       f"see {self.root / 'log'}:\n{self.logs_tail()}")
            if time.time() > deadline:
                raise RuntimeError(f"timed out waiting for {what}; logs in {self.root / 'log'}:\n{self.logs_tail()}")
            time.sleep(0.2)

    def logs_tail(self, n=2000):
        logs = sorted((self.root / "log").glob("*"))
        return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-n:]}" for p in logs)

    def run(self, *cmd, check=True, timeout=60):
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
        return proc

    def _ok(self, *cmd):
        return subprocess.run(list(cmd), capture_output=True, text=True).returncode == 0

    def start(self):
        if os.geteuid() != 0:
            raise Unavailable("the test cluster writes /etc/slurm and runs its daemons as root: not root")
        r = self.root
        self._configure()
        self._spawn("munged", ["munged", "-F", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={r}/munge/munge.key", f"--pid-file={r}/run/munged.pid",
                               f"--log-file={r}/log/munged.log", f"--seed-file={r}/munge/seed"])
        self._wait("munge", self.munge_socket.exists)
        datadir = r / "mysql"
        if not (datadir / "mysql").exists():
            self.run("mariadb-install-db", "--no-defaults", f"--datadir={datadir}", "--user=root",
                     "--auth-root-authentication-method=socket", "--skip-test-db", timeout=300)
        self._spawn("mariadbd", ["mariadbd", "--no-defaults", f"--datadir={datadir}", f"--socket={self.mysql_socket}",
                                 f"--port={self.ports['mysql']}", "--bind-address=127.0.0.1", "--user=root",
                                 "--skip-name-resolve", f"--pid-file={r}/run/mariadbd.pid",
                                 f"--log-error={r}/log/mariadbd.log", "--innodb-buffer-pool-size=64M"])
        sql = ["mariadb", "--no-defaults", f"--socket={self.mysql_socket}", "-u", "root"]
        self._wait("mariadb", lambda: self._ok(*sql, "-e", "SELECT 1"))
        self.run(*sql, "-e", "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm'; "
                             "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';")
        self._spawn("slurmdbd", ["slurmdbd", "-D"])
        self._wait("slurmdbd", lambda: self._ok("sacctmgr", "-n", "list", "cluster"))
        self.run("sacctmgr", "-i", "add", "cluster", self.cluster, check=False)
        self.run("sacctmgr", "-i", "add", "account", self.account, check=False)
        self.run("sacctmgr", "-i", "add", "user", "root", f"account={self.account}", check=False)
        self._spawn("slurmctld", ["slurmctld", "-D", "-i"])
        self._wait("slurmctld", lambda: self._ok("scontrol", "ping"))
        for n in self.NODES:
            self._spawn(f"slurmd-{n}", ["slurmd", "-D", "-N", n])
        self._wait("idle nodes", self._nodes_idle)
        return self

    def _nodes_idle(self):
        sinfo = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout
        states = dict(line.split() for line in sinfo.splitlines())
        return all(states.get(n) == "idle" for n in self.NODES)

    def cancel_all(self):
        """Cancel every job on this (test) cluster and wait until none is left."""
        self.run("scancel", "--full", "-u", "root", check=False)
        deadline = time.time() + 60
        while self.run("squeue", "-h", check=False).stdout.strip() and time.time() < deadline:
            time.sleep(0.5)

    def stop(self):
        if "slurmctld" in self.daemons and self.daemons["slurmctld"].poll() is None:
            self.cancel_all()
        for name in reversed(list(self.daemons)):
            proc = self.daemons[name]
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        self.daemons.clear()
        for path in self.written:
            if path.exists() and _owner_pid(path) == os.getpid():
                path.unlink()
        self.written.clear()
        if self.created_etc and ETC.exists() and not any(ETC.iterdir()):
            ETC.rmdir()
        self._remove_hosts()

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc):
        self.stop()
