"""launch/mpirun.sh: the workstation wrapper around the wheel's mpiexec, run for real."""
import json
import subprocess
import sys

import pytest

from launch import REPO, env

MPIRUN_SH = REPO / "launch" / "mpirun.sh"


def _run(*args, timeout=120, **extra):
    return subprocess.run([str(MPIRUN_SH), *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          env=env(PARANET_PYTHON=sys.executable, **extra), timeout=timeout)


@pytest.mark.mpi
def test_runs_the_trainer_on_n_ranks(mnist_h5, tmp_path):
    proc = _run("-n", 2, "--", "--data", mnist_h5, "--max-steps", 20, "--batch-size", 64,
                "--checkpoint", tmp_path / "ck.h5", "--metrics", tmp_path / "m.json")
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["world_size"] == 2 and metrics["completed"] is True and metrics["steps"] == 20
    assert "paranet: world size 2," in proc.stdout
    assert f"{sys.executable} -m paranet.train" in proc.stderr  # the Python it was told to use


@pytest.mark.mpi
def test_hostfile_goes_to_mpiexec(tmp_path):
    """-f reaches hydra: it launches onto the file's (remote) host through the given launcher."""
    hostfile = tmp_path / "hosts"
    hostfile.write_text("192.0.2.7:2\n")  # TEST-NET-1: never this machine
    seen = tmp_path / "seen"
    fake_ssh = tmp_path / "fake-ssh"
    fake_ssh.write_text(f'#!/bin/sh\n[ "$1" = -x ] && shift\necho "$1" >> {seen}\nexit 1\n')
    fake_ssh.chmod(0o755)
    proc = _run("-n", 2, "-f", hostfile, "--", "--data", tmp_path / "none.h5", "--max-steps", 1, timeout=60,
                HYDRA_LAUNCHER="ssh", HYDRA_LAUNCHER_EXEC=fake_ssh)
    assert proc.returncode != 0
    assert seen.read_text().split() == ["192.0.2.7"], proc.stderr


@pytest.mark.parametrize("args, message", [
    (["-n", "0"], "-n wants a positive rank count, not '0'"),
    (["-n"], "option -n needs a value"),
    (["--epochs", "2"], "unknown option --"),  # training flags need "--" before them
    (["-f", "/nonexistent/hosts"], "hostfile /nonexistent/hosts is not readable"),
])
def test_usage_errors_exit_2(args, message):
    proc = _run(*args, timeout=30)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_help_describes_the_options():
    proc = _run("-h", timeout=30)
    assert proc.returncode == 0
    assert "-n RANKS" in proc.stdout and "-f HOSTFILE" in proc.stdout and "set -euo" not in proc.stdout
