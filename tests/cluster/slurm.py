"""A real one-node SLURM cluster on localhost for the launch tests: munged, slurmctld and slurmd.

The daemons run in the foreground as children of the test process, so their PIDs are known
exactly; `LocalSlurm.stop` ends them by those PIDs (SIGTERM, then SIGKILL after ~10 s).
Everything (config, key, state, spool, logs, munge socket) lives in one temporary directory,
so a munged or SLURM already running on the machine is neither used nor disturbed.
See /work/shared/notes/slurm-local-cluster.md for the facts behind each setting.
"""
import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ["slurm-wlm", "munge", "libpmix-dev"]  # libpmix.so: what srun --mpi=pmix loads (Open MPI's PMI)
BINARIES = ["munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "srun"]
ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_FED",
                 "REQUEUE_HOLD", "RESIZING", "SIGNALING", "STAGE_OUT", "SUSPENDED"}


def missing_requirement(install=True):
    """Why a local SLURM cannot run here (None when it can); installs the Debian packages as root.

    Args:
        install: when the binaries are missing and we are root with apt-get, install
            slurm-wlm and munge (about 10 s) instead of giving up.
    Returns:
        A reason string for pytest.skip, or None.
    """
    if os.geteuid() != 0:
        return "a local SLURM needs root (slurmd runs jobs as root, munged as user munge)"
    absent = [b for b in BINARIES if shutil.which(b, path=_sbin_path()) is None]
    if not glob.glob("/usr/lib/*/pmix*/lib/libpmix.so"):
        absent.append("libpmix.so")
    if absent and install and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=300)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
                       env=env, capture_output=True, timeout=600)
        absent = [b for b in BINARIES if shutil.which(b, path=_sbin_path()) is None]
        absent += [] if glob.glob("/usr/lib/*/pmix*/lib/libpmix.so") else ["libpmix.so"]
    if absent:
        return f"SLURM/munge binaries missing: {', '.join(absent)} (apt-get install {' '.join(PACKAGES)})"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "user 'munge' does not exist (the munge package creates it)"
    return None


def _sbin_path():
    return os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin"])


def _which(name):
    return shutil.which(name, path=_sbin_path())


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_hardware():
    """CPUs and RealMemory as `slurmd -C` reports them."""
    out = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, timeout=30).stdout
    cpus = int(re.search(r"\bCPUs=(\d+)", out).group(1))
    memory = int(re.search(r"\bRealMemory=(\d+)", out).group(1))
    return cpus, memory


def parse_record(line):
    """Parse one `scontrol show ... -o` line into a dict (values may contain spaces)."""
    return dict(re.findall(r"(?:^|\s)([A-Za-z][\w:/]*)=(.*?)(?=\s+[A-Za-z][\w:/]*=|\s*$)", line))


class LocalSlurm:
    """A one-node SLURM on localhost: partition `debug`, node `localhost`, MpiDefault=none."""

    def __init__(self, root=None, task_plugin="task/none"):
        """``task_plugin``: SLURM's TaskPlugin; "task/affinity" makes ``--cpu-bind`` bind the tasks
        (sched_setaffinity, no cgroups needed); "task/none" leaves them unbound."""
        self.task_plugin = task_plugin
        # Not under pytest's tmp_path: that is 0700 root, and munged (user munge) must reach its socket.
        self.root = Path(root or tempfile.mkdtemp(prefix="paranet-slurm-"))
        self.root.chmod(0o755)
        self.conf = self.root / "slurm.conf"
        self.procs = {}  # name -> Popen, so stop() ends exactly these PIDs
        self.cpus = None

    @property
    def env(self):
        """The environment for SLURM clients and the jobs they submit (SLURM_CONF points at ours)."""
        env = dict(os.environ, SLURM_CONF=str(self.conf))
        env["PATH"] = _sbin_path()
        for k in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))]:
            if k != "SLURM_CONF":
                del env[k]  # a test run inside a SLURM job must not leak the outer job's settings
        return env

    # ---- bring-up and tear-down -------------------------------------------------------------
    def start(self, timeout=30.0):
        """Write the config, start munged, slurmctld and slurmd, and wait until the node is idle."""
        t0 = time.monotonic()
        munge = pwd.getpwnam("munge")
        mdir = self.root / "munge"
        mdir.mkdir(exist_ok=True)
        mdir.chmod(0o755)  # munged: the socket directory must be searchable by all
        key = mdir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        for p in (mdir, key):
            os.chown(p, munge.pw_uid, munge.pw_gid)
        self.munge_socket = mdir / "munge.socket"
        for d in ("state", "spool", "log"):
            (self.root / d).mkdir(exist_ok=True)
        self.cpus, memory = _node_hardware()
        self.conf.write_text(self._config(memory))

        self._spawn("munged", [_which("munged"), "-F", f"--key-file={key}", f"--socket={self.munge_socket}",
                               f"--pid-file={mdir}/munged.pid", f"--log-file={mdir}/munged.log",
                               f"--seed-file={mdir}/munged.seed"],
                    user=munge.pw_uid, group=munge.pw_gid, extra_groups=[])
        self._wait(lambda: self.munge_socket.exists(), 10, "munged did not create its socket")
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-c", "-f", str(self.conf)])
        self._wait(self._controller_up, 15, "slurmctld did not answer `scontrol ping`")
        self._spawn("slurmd", [_which("slurmd"), "-D", "-N", "localhost", "-f", str(self.conf)])
        self._wait(self._node_idle, max(1.0, timeout - (time.monotonic() - t0)),
                   "node localhost did not become idle")
        return self

    def _config(self, memory):
        r = self.root
        return f"""\
# Generated by tests/cluster/slurm.py: a one-node cluster on localhost for paranet's tests.
ClusterName=paranet-test
SlurmctldHost=localhost
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire: a requeued job waits this long (default 120 s) before it may start again.
AuthInfo=socket={self.munge_socket},cred_expire=5
CredType=cred/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin={self.task_plugin}
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MailProg=/bin/true
ReturnToService=2
MinJobAge=600
KillWait=5
InactiveLimit=0
JobRequeue=1
SchedulerParameters=batch_sched_delay=0,sched_min_interval=100000,sched_interval=1
NodeName=localhost NodeAddr=127.0.0.1 NodeHostname=localhost CPUs={self.cpus} RealMemory={memory} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""

    def _spawn(self, name, argv, **kw):
        log = open(self.root / "log" / f"{name}.out", "wb")
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=self.env,
                                            start_new_session=True, **kw)
        log.close()

    def _wait(self, ready, timeout, what):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} (pid {p.pid}) exited with status {p.returncode} "
                                       f"during start-up:\n{self.logs()}")
            if ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"{what} within {timeout:.0f} s:\n{self.logs()}")

    def _controller_up(self):
        r = subprocess.run(["scontrol", "ping"], env=self.env, capture_output=True, text=True, timeout=10)
        return "UP" in r.stdout

    def _node_idle(self):
        r = subprocess.run(["scontrol", "show", "node", "-o", "localhost"], env=self.env,
                           capture_output=True, text=True, timeout=10)
        return parse_record(r.stdout).get("State", "").startswith("IDLE")

    def logs(self, tail=40):
        """The last lines of each daemon's log, for failure messages."""
        parts = []
        for f in sorted((self.root / "log").glob("*")) + [self.root / "munge" / "munged.log"]:
            try:
                lines = f.read_text(errors="replace").splitlines()[-tail:]
            except OSError:
                continue
            parts.append(f"--- {f} ---\n" + "\n".join(lines))
        return "\n".join(parts)

    def stop(self, grace=10.0):
        """Cancel the jobs, end the daemons we started by their recorded PIDs, then any process
        the cluster left behind (slurmstepd, job tasks); SIGTERM, then SIGKILL after `grace` s."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self._cancel_jobs(grace)
        order = ["slurmd", "slurmctld", "munged"]
        _terminate([self.procs[n].pid for n in order if n in self.procs], grace,
                   waiters={self.procs[n].pid: self.procs[n] for n in order if n in self.procs})
        self.procs.clear()
        # A slurmstepd may outlive slurmd and ignore SIGTERM (a job still running at shutdown).
        _terminate(self.stragglers(), grace)

    def _cancel_jobs(self, grace):
        r = self.run("squeue", "-h", "-o", "%A", check=False, timeout=10)
        ids = r.stdout.split()
        if not ids:
            return
        self.run("scancel", *ids, check=False, timeout=10)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and self.run("squeue", "-h", "-o", "%A", check=False).stdout.strip():
            time.sleep(0.2)

    def stragglers(self):
        """PIDs of live processes this cluster started: they carry our unique SLURM_CONF."""
        marker = f"SLURM_CONF={self.conf}".encode()
        pids = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == os.getpid():
                continue
            try:
                if marker in (d / "environ").read_bytes().split(b"\0"):
                    pids.append(int(d.name))
            except OSError:
                continue
        return pids

    def cleanup(self):
        """stop(), then remove the temporary directory."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    # ---- jobs ---------------------------------------------------------------------------------
    def run(self, *argv, check=True, timeout=30, env=None):
        """Run a SLURM client command (sbatch, scontrol, scancel) against this cluster."""
        r = subprocess.run([str(a) for a in argv], env=env or self.env, capture_output=True, text=True,
                           timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, argv))} exited {r.returncode}: {r.stderr.strip()}")
        return r

    def sbatch(self, script, *args, options=(), env=None):
        """Submit `script` with sbatch `options` and script arguments `args`; return the job ID."""
        r = self.run("sbatch", "--parsable", *options, script, *args, env=env)
        return r.stdout.strip().split(";")[0]

    def job(self, job_id):
        """The job's record from `scontrol show job -o` as a dict (JobState, ExitCode, Restarts...)."""
        return parse_record(self.run("scontrol", "show", "job", "-o", job_id).stdout.strip())

    def wait(self, job_id, timeout=60.0, until=None, poll=0.3):
        """Poll until the job leaves the active states (or `until(record)` is true); return its record."""
        deadline = time.monotonic() + timeout
        rec = {}
        while time.monotonic() < deadline:
            rec = self.job(job_id)
            if until(rec) if until else rec.get("JobState") not in ACTIVE_STATES:
                return rec
            time.sleep(poll)
        self.run("scancel", job_id, check=False)
        raise TimeoutError(f"job {job_id} still {rec.get('JobState')} after {timeout:.0f} s "
                           f"(reason {rec.get('Reason')}); cancelled it.\n{self.logs()}")


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except OSError:
        return False


def _terminate(pids, grace, waiters=None):
    """SIGTERM `pids`, wait up to `grace` s, SIGKILL the ones still alive; reap our children."""
    waiters = waiters or {}
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        for p in waiters.values():
            p.poll()
        if not any(_alive(pid) for pid in pids):
            break
        time.sleep(0.1)
    for pid in pids:
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for p in waiters.values():
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
