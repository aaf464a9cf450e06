"""Issue 11 in the trainer, run for real (mpiexec, HDF5, MNIST): resume bookkeeping, SIGTERM at
start-up, one writer per checkpoint, --checkpoint-every/--keep, bad flags and outputs refused up
front in one line, late write failures in one line, resuming onto other data, bad /val and /test
under mpirun, and the stall watchdog against a rank in SIGSTOP."""
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from launch import REPO, env, run_train, train_cmd
from paranet import checkpoint

TIMING = {"samples_per_second", "comm_share"}  # the only fields of a record that may differ


def exchange(a, b):
    """Swap the paths ``a`` and ``b`` atomically (Linux renameat2 with RENAME_EXCHANGE)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    if libc.renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(a))


def attrs(path):
    return checkpoint.read_attrs(path)


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def history(path):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in json.loads(path.read_text())["history"]]


# -- item 13: resume bookkeeping -----------------------------------------------------------


def test_interrupted_and_resumed_run_has_the_metrics_of_an_uninterrupted_one(mnist_h5, tmp_path):
    """--max-steps cuts mid-epoch, a SIGTERM on an epoch's last step, a SIGTERM mid-epoch and a
    re-run at the step limit, resumed each time: the same history (each epoch once, its train
    loss over the whole epoch), test results and parameters as one uninterrupted run. (One
    process: SIGTERM across ranks is tests/test_train.py's.)"""
    args = ("--data", mnist_h5, "--batch-size", 1000, "--epochs", 2)  # 55 steps an epoch
    run_train(None, *args, "--checkpoint", tmp_path / "full.h5", "--metrics", tmp_path / "full.json",
              "--save-params", tmp_path / "full.npz")
    ck = tmp_path / "ck.h5"
    run_train(None, *args, "--checkpoint", ck, "--max-steps", 30)  # a cut mid-epoch 1
    assert attrs(ck)["global_step"] == 30 and [r["epoch"] for r in attrs(ck)["history"]] == [1]
    # SIGTERM during step 55, the last of epoch 1: the epoch is recorded before stopping
    proc = run_train(None, *args, "--checkpoint", ck, "--resume", extra_env={"PARANET_FAULT": "rank=0,step=54,kind=sigterm"})
    assert "stopped by SIGTERM after step 55" in proc.stdout, proc.stdout
    a = attrs(ck)
    assert a["global_step"] == 55 and [r["epoch"] for r in a["history"]] == [1], a["history"]
    run_train(None, *args, "--checkpoint", ck, "--resume", "--max-steps", 80)  # a cut mid-epoch 2
    assert attrs(ck)["global_step"] == 80
    before = digest(ck)
    proc = run_train(None, *args, "--checkpoint", ck, "--resume", "--max-steps", 80)  # already there: no step
    assert "no step to run" in proc.stdout and digest(ck) == before and attrs(ck)["global_step"] == 80
    proc = run_train(None, *args, "--checkpoint", ck, "--resume", "--metrics", tmp_path / "m.json",
                     "--save-params", tmp_path / "p.npz", extra_env={"PARANET_FAULT": "rank=0,step=95,kind=sigterm"})
    assert "stopped by SIGTERM after step 96" in proc.stdout and not (tmp_path / "m.json").exists()
    run_train(None, *args, "--checkpoint", ck, "--resume", "--metrics", tmp_path / "m.json", "--save-params", tmp_path / "p.npz")

    assert history(tmp_path / "m.json") == history(tmp_path / "full.json")  # epochs 1 and 2, once each, equal
    full, resumed = (json.loads((tmp_path / n).read_text()) for n in ("full.json", "m.json"))
    assert (resumed["test_loss"], resumed["test_accuracy"], resumed["steps"]) == \
        (full["test_loss"], full["test_accuracy"], full["steps"])
    with np.load(tmp_path / "p.npz") as p, np.load(tmp_path / "full.npz") as f:
        assert all(np.array_equal(p[k], f[k]) for k in f.files)


def test_sigterm_on_an_epochs_last_step_keeps_that_epochs_record(mnist_h5, tmp_path):
    ck = tmp_path / "ck.h5"
    proc = run_train(None, "--data", mnist_h5, "--batch-size", 1000, "--epochs", 2, "--checkpoint", ck,
                     extra_env={"PARANET_FAULT": "rank=0,step=54,kind=sigterm"})  # during step 55 of 55
    assert "stopped by SIGTERM after step 55" in proc.stdout and "epoch   1/2" in proc.stdout
    a = attrs(ck)
    assert (a["epoch"], a["step_in_epoch"], [r["epoch"] for r in a["history"]]) == (1, 0, [1])


# -- item 12: SIGTERM before the first step ----------------------------------------------------


@pytest.mark.mpi
def test_sigterm_during_start_up_stops_cleanly_before_the_first_step(mnist_h5, tmp_path):
    ck = tmp_path / "ck.h5"
    proc = run_train(2, "--data", mnist_h5, "--max-steps", 5, "--checkpoint", ck, check=False,
                     extra_env={"PARANET_FAULT": "rank=1,step=-1,kind=sigterm"})  # rank 1, while it builds
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "stopped by SIGTERM before step 1; checkpoint saved to" in proc.stdout and "Traceback" not in proc.stderr
    assert attrs(ck)["global_step"] == 0
    proc = run_train(2, "--data", mnist_h5, "--max-steps", 5, "--checkpoint", ck, "--resume")
    assert attrs(ck)["global_step"] == 5


# -- item 15: one writer per checkpoint -------------------------------------------------------


@pytest.mark.mpi
def test_a_second_run_on_the_same_checkpoint_is_refused_naming_the_first(mnist_h5, tmp_path):
    ck = tmp_path / "ck.h5"
    out = tmp_path / "first.out"
    with open(out, "w") as f:
        first = subprocess.Popen(train_cmd(2, "--data", mnist_h5, "--batch-size", 32, "--epochs", 50, "--checkpoint", ck),
                                 cwd=REPO, env=env(), stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while "paranet: world size 2" not in out.read_text():
            assert first.poll() is None and time.monotonic() < deadline, out.read_text()
            time.sleep(0.1)
        second = run_train(None, "--data", mnist_h5, "--max-steps", 5, "--checkpoint", ck, check=False)
        holder = (tmp_path / ".ck.h5.lock").read_text()
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 0, out.read_text()
    finally:
        if first.poll() is None:
            first.kill()
    assert second.returncode == 2 and second.stdout.count("\n") == 0, second.stdout + second.stderr
    (line,) = second.stderr.splitlines()
    pid = int(re.search(r"pid (\d+) on ", holder).group(1))
    assert line.startswith(f"paranet: error: --checkpoint {ck} is in use by another run (pid {pid} on "), line
    assert not (tmp_path / ".ck.h5.lock").exists()  # released at the end of the first run
    assert "stopped by SIGTERM after step" in out.read_text()


# -- item 14: --checkpoint-every, --keep, stale temporaries -----------------------------------


def test_checkpoint_every_n_steps_keeps_the_last_k(mnist_h5, tmp_path):
    ck = tmp_path / "ck.h5"
    stale = tmp_path / ".ck.h5.999999.deadbeef.tmp"  # left by a writer killed mid-write (no such pid)
    stale.write_bytes(b"half a checkpoint")
    proc = run_train(None, "--data", mnist_h5, "--batch-size", 1000, "--max-steps", 25, "--checkpoint", ck,
                     "--checkpoint-every", 10, "--keep", 3)
    assert f"removed {stale}" in proc.stdout
    steps = {p.name: attrs(p)["global_step"] for p in tmp_path.iterdir()}
    assert steps == {"ck.h5": 25, "ck.h5.1": 20, "ck.h5.2": 10}  # and nothing else: no temporaries, no lock


@pytest.mark.mpi
def test_checkpoint_every_minutes_is_agreed_by_every_rank(mnist_h5, tmp_path):
    """Rank 0's clock decides; the request travels in the step's sum, so both ranks save together
    (a rank saving alone would wait in its barrier forever)."""
    ck = tmp_path / "ck.h5"
    run_train(2, "--data", mnist_h5, "--batch-size", 1000, "--max-steps", 40, "--checkpoint", ck,
              "--checkpoint-every", "0.0002min", "--keep", 2, timeout=60)  # every 12 ms
    assert attrs(ck)["global_step"] == 40 and 0 < attrs(tmp_path / "ck.h5.1")["global_step"] < 40


# -- items 8, 2, 9: bad flags and outputs, one line, exit 2, before any work -------------------


def bad_flags(data, tmp):
    return [
        (["--lr", "inf"], "--lr must be a finite number in (0, 1e+06], got inf"),
        (["--lr", "1e300"], "--lr must be a finite number in (0, 1e+06], got 1e+300"),
        (["--lr", "nan"], "--lr must be a finite number in (0, 1e+06], got nan"),
        (["--momentum", "nan"], "--momentum must be in [0, 1), got nan"),
        (["--momentum", "1.5"], "--momentum must be in [0, 1), got 1.5"),
        (["--seed", "-1"], "--seed must be in [0, 2**64), got -1"),
        (["--seed", str(2**64)], f"--seed must be in [0, 2**64), got {2**64}"),
        (["--timeline-steps", "0"], "--timeline-steps must be >= 1, got 0"),
        (["--timeline-steps", "-1"], "--timeline-steps must be >= 1, got -1"),
        (["--check-replicas", "-1"], "--check-replicas must be >= 0 (0: off), got -1"),
        (["--keep", "0"], "--keep must be >= 1, got 0"),
        (["--checkpoint-every", "0"], "expected N steps (>= 1) or M minutes (e.g. 10min), got '0'"),
        (["--checkpoint-every", "5x"], "expected N steps (>= 1) or M minutes (e.g. 10min), got '5x'"),
        (["--stall-timeout", "-1"], "--stall-timeout must be a finite number of seconds >= 0 (0: off), got -1.0"),
        (["--checkpoint", data], f"--checkpoint {data} is the same file as --data"),
        (["--metrics", data], f"--metrics {data} is the same file as --data"),
        (["--timeline", data], f"--timeline {data} is the same file as --data"),
        (["--save-params", tmp / "ck.h5"], f"--save-params {tmp / 'ck.h5'} is the same file as --checkpoint"),
        (["--metrics", tmp / "sub" / ".." / "ck.h5"], "is the same file as --checkpoint"),
    ]


@pytest.mark.parametrize("case", range(19))
def test_bad_flags_are_argparse_errors(mnist_h5, tmp_path, case, capsys):
    """The command line's own parser, in this process: exit 2 and one usage error, before MPI starts."""
    from paranet import cli

    args, message = bad_flags(mnist_h5, tmp_path)[case]
    with pytest.raises(SystemExit) as info:
        cli.parse_args(["--data", str(mnist_h5), "--max-steps", "1", "--checkpoint", str(tmp_path / "ck.h5"),
                        *map(str, args)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and message in err.splitlines()[-1], err


@pytest.mark.mpi
def test_a_bad_flag_under_mpirun_is_printed_once(mnist_h5, tmp_path):
    proc = run_train(2, "--data", mnist_h5, "--seed", "-1", "--checkpoint", tmp_path / "ck.h5", check=False, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("--seed must be in [0, 2**64)") == 1, proc.stderr


@pytest.mark.parametrize("flag", ["--metrics", "--checkpoint"])
def test_an_output_that_is_a_directory_is_refused_before_training(mnist_h5, tmp_path, flag):
    folder = tmp_path / "out"
    folder.mkdir()
    args = ["--checkpoint", tmp_path / "ck.h5"] if flag != "--checkpoint" else []
    proc = run_train(None, "--data", mnist_h5, "--max-steps", 3, *args, flag, folder, check=False, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.splitlines() == [f"paranet: error: {flag} {folder}: is a directory, expected a file name"]
    assert "epoch" not in proc.stdout and not (tmp_path / "ck.h5").exists()  # no step was run


@pytest.mark.mpi
def test_an_unwritable_checkpoint_folder_is_refused_before_training_once(mnist_h5, tmp_path):
    (tmp_path / "file").write_text("")
    proc = run_train(2, "--data", mnist_h5, "--max-steps", 3, "--checkpoint", tmp_path / "file" / "ck.h5",
                     check=False, timeout=60)
    assert proc.returncode == 2 and "world size" not in proc.stdout, proc.stdout + proc.stderr
    assert proc.stderr.splitlines() == [
        f"paranet: error: --checkpoint {tmp_path / 'file' / 'ck.h5'}: {tmp_path / 'file'} is a file, not a directory"]


@pytest.mark.mpi
def test_a_write_that_fails_late_is_one_line_and_keeps_the_good_checkpoint(mnist_h5, tmp_path):
    """The folder of --metrics turns into a file while the job runs: the write at the end fails
    with one line naming the file, exit 1, and the checkpoint is whole."""
    ck, out = tmp_path / "ck.h5", tmp_path / "out"
    log = tmp_path / "log"
    with open(log, "w") as f:
        job = subprocess.Popen(train_cmd(2, "--data", mnist_h5, "--batch-size", 64, "--max-steps", 400, "--checkpoint", ck,
                                         "--metrics", out / "m.json"), cwd=REPO, env=env(), stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while "paranet: world size 2" not in log.read_text():
            assert job.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        (tmp_path / "swap").write_text("now a file")
        exchange(out, tmp_path / "swap")  # out, made empty by the start-up check, becomes a file in one step
        assert job.wait(timeout=120) == 1, log.read_text()
    finally:
        if job.poll() is None:
            job.kill()
    lines = [line for line in log.read_text().splitlines() if "error" in line.lower() or "Traceback" in line]
    assert lines == [f"paranet: error: {out / 'm.json'}: cannot create its directory {out} (File exists)"], log.read_text()
    assert attrs(ck)["global_step"] == 400


@pytest.mark.mpi
def test_a_checkpoint_write_that_fails_mid_run_stops_every_rank_with_one_line(mnist_h5, tmp_path):
    """The checkpoint's folder is moved away and a file put in its place while two ranks train
    with --checkpoint-every: the next write fails, every rank stops after the same step, one
    line, exit 1, and the last good checkpoint (in the moved folder) is whole."""
    run_dir, moved = tmp_path / "run", tmp_path / "moved"
    ck, log = run_dir / "ck.h5", tmp_path / "log"
    with open(log, "w") as f:
        job = subprocess.Popen(train_cmd(2, "--data", mnist_h5, "--batch-size", 64, "--max-steps", 400, "--checkpoint", ck,
                                         "--checkpoint-every", 20), cwd=REPO, env=env(), stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not ck.exists():
            assert job.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        moved.write_text("now a file")
        exchange(run_dir, moved)  # one step: the folder is never missing, only the folder or a file
        assert job.wait(timeout=120) == 1, log.read_text()
    finally:
        if job.poll() is None:
            job.kill()
    errors = [line for line in log.read_text().splitlines() if "error" in line.lower() or "Traceback" in line]
    # which call meets the file first depends on timing: making the folder, or opening (or reopening
    # to fsync) the temporary file in it. paranet creates that file itself, so the reason is the
    # system's, never HDF5's (CI once saw "can't retrieve stat info for file" when h5py created it)
    assert errors in ([f"paranet: error: {ck}: cannot create its directory {run_dir} (File exists)"],
                      [f"paranet: error: {ck}: cannot write (Not a directory); the previous file, if any, is unchanged"]
                      ), log.read_text()
    assert 20 <= attrs(moved / "ck.h5")["global_step"] < 400


# -- item 4: resuming onto other data, or with flags that change what the step means ------------


def _other_data(path, n=2000, seed=1):
    from paranet.data import write_dataset

    rng = np.random.default_rng(seed)
    split = lambda m: (rng.integers(0, 256, (m, 28, 28), dtype=np.uint8), rng.integers(0, 10, m))  # noqa: E731
    return write_dataset(path, train=split(n), val=split(200), test=split(200), num_classes=10)


def test_resume_onto_other_data_or_changed_flags_is_refused_naming_both(mnist_h5, tmp_path):
    ck = tmp_path / "ck.h5"
    run_train(None, "--data", mnist_h5, "--max-steps", 3, "--checkpoint", ck)
    before = digest(ck)
    other = _other_data(tmp_path / "other.h5")
    proc = run_train(None, "--data", other, "--max-steps", 6, "--checkpoint", ck, "--resume", check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith(f"paranet: error: {ck}: written for the data {os.path.realpath(mnist_h5)}, "
                           f"this run has {other.resolve()}, which differs (") and "resume with the same data" in line
    proc = run_train(None, "--data", mnist_h5, "--max-steps", 6, "--checkpoint", ck, "--resume", "--lr", "0.01",
                     check=False)
    from paranet.cli import MODEL_DEFAULTS

    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        f"paranet: error: {ck}: written with --lr {MODEL_DEFAULTS['mlp']['lr']:g}, this run has 0.01 "
        f"(it may not change on --resume)"]
    # the sum of a bit-for-bit run: ordered and exact give other bits, so neither may be switched on,
    # off or swapped on --resume (the flags of a checkpoint written without it read "off")
    proc = run_train(None, "--data", mnist_h5, "--max-steps", 6, "--checkpoint", ck, "--resume", "--reproducible",
                     check=False)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        f"paranet: error: {ck}: written with --reproducible off, this run has ordered (it may not change on --resume)"]
    assert digest(ck) == before
    exact = tmp_path / "exact.h5"
    run_train(None, "--data", mnist_h5, "--max-steps", 3, "--checkpoint", exact, "--reproducible", "exact")
    proc = run_train(None, "--data", mnist_h5, "--max-steps", 6, "--checkpoint", exact, "--resume", "--reproducible",
                     "ordered", check=False)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        f"paranet: error: {exact}: written with --reproducible exact, this run has ordered "
        f"(it may not change on --resume)"]
    # the same bytes under another name are the same data: accepted
    copy = shutil.copy(mnist_h5, tmp_path / "copy.h5")
    run_train(None, "--data", copy, "--max-steps", 6, "--checkpoint", ck, "--resume")
    assert attrs(ck)["global_step"] == 6 and attrs(ck)["data"]["path"] == str(copy.resolve())


@pytest.mark.mpi
def test_a_bad_checkpoint_under_mpirun_is_one_line_once(mnist_h5, tmp_path):
    ck = tmp_path / "ck.h5"
    run_train(None, "--data", mnist_h5, "--max-steps", 2, "--checkpoint", ck)
    with h5py.File(ck, "r+") as f:
        del f["optimizer/v"]  # resuming would silently restart Adam's second moment
    before = digest(ck)
    proc = run_train(2, "--data", mnist_h5, "--max-steps", 4, "--checkpoint", ck, "--resume", check=False, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.splitlines() == [f"paranet: error: {ck}: missing dataset /optimizer/v"]
    assert digest(ck) == before


# -- item 5: bad /val or /test under mpirun: one line, once, exit 2 ----------------------------


def _break(src, dst, edit):
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        edit(f)
    return dst


def _labels_out_of_range(split):
    def edit(f):
        f[f"{split}/labels"][0] = 200
    return edit


def _images_wrong_dtype(split):
    def edit(f):
        x = f[f"{split}/images"][()]
        del f[f"{split}/images"]
        f.create_dataset(f"{split}/images", data=x.astype(np.int32))
    return edit


def _length_mismatch(split):
    def edit(f):
        y = f[f"{split}/labels"][()]
        del f[f"{split}/labels"]
        f.create_dataset(f"{split}/labels", data=y[:-1])
    return edit


@pytest.mark.mpi
@pytest.mark.parametrize("split, edit", [("val", _labels_out_of_range), ("test", _images_wrong_dtype),
                                         ("val", _length_mismatch), ("test", _labels_out_of_range)])
def test_a_bad_val_or_test_split_under_mpirun_is_one_line_once(tmp_path, split, edit):
    bad = _break(_other_data(tmp_path / "good.h5"), tmp_path / "bad.h5", edit(split))
    proc = run_train(2, "--data", bad, "--max-steps", 2, "--checkpoint", tmp_path / "ck.h5", check=False, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("paranet: error: ") and f"/{split}/" in lines[0], proc.stderr
    assert "Abort" not in proc.stdout + proc.stderr and not (tmp_path / "ck.h5").exists()


# -- item 16: a stopped rank does not hang the job ---------------------------------------------


@pytest.mark.mpi
def test_a_rank_in_sigstop_is_named_and_the_job_aborts(mnist_h5, tmp_path):
    """Rank 1 stops itself (SIGSTOP) during step 11: the others name it and the step within the
    timeout, and the job ends with status 3 instead of spinning forever."""
    cmd = train_cmd(3, "--data", mnist_h5, "--batch-size", 96, "--max-steps", 40, "--checkpoint", tmp_path / "ck.h5",
                    "--stall-timeout", 2)
    t0 = time.monotonic()
    job = subprocess.Popen(cmd, cwd=REPO, env=env(PARANET_FAULT="rank=1,step=10,kind=sigstop"), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)  # never leave a stopped rank behind
            job.wait()
    seconds = time.monotonic() - t0
    assert job.returncode == 3, out + err
    stalled = [line for line in err.splitlines() if line.startswith("paranet: stalled")]
    assert stalled == ["paranet: stalled: rank 1 did not arrive at the sum over the ranks of step 11 within 2 s "
                       "(--stall-timeout); aborting the job"], err
    assert seconds < 30 and "Traceback" not in err


@pytest.mark.mpi
def test_a_rank_stopped_at_a_checkpoint_is_named_too(mnist_h5, tmp_path):
    """Rank 1 stops as the checkpoint after step 10 begins: rank 0 waits for it in the gather
    that checks the data before every write, and names it."""
    cmd = train_cmd(2, "--data", mnist_h5, "--batch-size", 64, "--max-steps", 40, "--checkpoint", tmp_path / "ck.h5",
                    "--checkpoint-every", 10, "--stall-timeout", 2)
    job = subprocess.Popen(cmd, cwd=REPO, env=env(PARANET_FAULT="rank=1,step=10,kind=sigstop,at=checkpoint"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    assert job.returncode == 3, out + err
    assert [line for line in err.splitlines() if line.startswith("paranet: stalled")] == [
        "paranet: stalled: rank 1 did not arrive at the gather (checkpoint after step 10) within 2 s "
        "(--stall-timeout); aborting the job"], err
    assert not (tmp_path / "ck.h5").exists()  # nothing was written while a rank was missing
