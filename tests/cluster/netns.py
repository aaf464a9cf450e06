"""Two "hosts" on one machine: two network namespaces joined by a veth pair, each with its own IP.

MPICH's hydra reaches the second host through `netns_ssh.sh`, an ssh stand-in that runs the
command inside the namespace that owns the target address (HYDRA_LAUNCHER=ssh,
HYDRA_LAUNCHER_EXEC=netns_ssh.sh). `TwoHosts.delete` removes the namespaces (and with them the
veth pair) and ends any process still inside them.
"""
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

SSH_STANDIN = Path(__file__).with_name("netns_ssh.sh")


def _ip(*args, check=True):
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} exited {r.returncode}: {r.stderr.strip()}")
    return r


class TwoHosts:
    """Namespaces `names[i]` with address `addrs[i]`/24 on a veth end called `devs[i]`."""

    def __init__(self, addrs=("10.231.0.1", "10.231.0.2"), tag=None):
        tag = tag or str(os.getpid())
        self.addrs = list(addrs)
        self.names = [f"paranet-{c}-{tag}" for c in "ab"]
        self.devs = [f"pn{c}{tag}"[:15] for c in "ab"]  # interface names: 15 characters at most

    def create(self):
        """Create both namespaces, the veth pair between them, and bring everything up."""
        try:
            for ns in self.names:
                _ip("netns", "add", ns)
            _ip("link", "add", self.devs[0], "type", "veth", "peer", "name", self.devs[1])
            for ns, dev, addr in zip(self.names, self.devs, self.addrs):
                _ip("link", "set", dev, "netns", ns)
                _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
                _ip("-n", ns, "link", "set", dev, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except Exception:
            self.delete()
            raise
        return self

    def delete(self):
        """End processes left in the namespaces, then delete them (the veth pair goes with them)."""
        for ns in self.names:
            pids = _ip("netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            if pids:
                time.sleep(0.2)
            _ip("netns", "del", ns, check=False)
        _ip("link", "del", self.devs[0], check=False)  # only if it never reached a namespace

    def exists(self):
        listed = _ip("netns", "list", check=False).stdout.split()
        return [ns for ns in self.names if ns in listed]

    def wire_bytes(self):
        """Bytes sent plus received on host a's veth end: traffic that went between the hosts."""
        stats = Path("/sys/class/net") / self.devs[0] / "statistics"
        r = subprocess.run(["ip", "netns", "exec", self.names[0], "cat",
                            str(stats / "tx_bytes"), str(stats / "rx_bytes")],
                           capture_output=True, text=True, timeout=30, check=True)
        return sum(int(x) for x in r.stdout.split())

    def env(self, base=None):
        """Environment that makes hydra reach host b through the namespace ssh stand-in."""
        env = dict(base or os.environ)
        env.update(HYDRA_LAUNCHER="ssh", HYDRA_LAUNCHER_EXEC=str(SSH_STANDIN),
                   PARANET_NETNS_MAP=" ".join(f"{a}={n}" for a, n in zip(self.addrs, self.names)),
                   # Force MPICH's UCX netmod onto TCP: the "hosts" share one kernel, so UCX would
                   # otherwise move bulk data through shared memory and bypass the wire.
                   UCX_TLS="tcp", FI_PROVIDER="tcp")
        return env

    def command(self, host, argv, own_hostname=False):
        """argv run on host `host` (0 or 1), i.e. inside its namespace; ``own_hostname``: also in a
        UTS namespace named paranet-<address, dashes for dots> (as netns_ssh.sh does with
        PARANET_NETNS_UTS=1)."""
        prefix = ["ip", "netns", "exec", self.names[host]]
        if own_hostname:
            name = "paranet-" + self.addrs[host].replace(".", "-")  # no dots: a short name is cut at the first
            prefix += ["unshare", "--uts", "sh", "-c", f'hostname {name}; exec "$0" "$@"']
        return [*prefix, *map(str, argv)]

    def open_mpi_env(self, base=None):
        """env() for Open MPI: PRRTE reaches host b through the stand-in, which gives it a hostname
        of its own; the ranks talk TCP (ob1) across the veth pair."""
        env = self.env(base)
        env.update(PRTE_MCA_plm_ssh_agent=str(SSH_STANDIN), PARANET_NETNS_UTS="1", OMPI_MCA_osc="^ucx",
                   OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        env.pop("PYTHONPATH", None)
        return env


def missing_requirement():
    """Why two namespaces cannot be made here (None when they can): root, `ip`, and a probe."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the `ip` command is missing (apt-get install iproute2)"
    probe = f"paranet-probe-{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"`ip netns add` failed: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None
