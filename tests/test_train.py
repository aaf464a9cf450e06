"""The trainer under real mpiexec: P-equivalence, replicas, checkpoints, resume, signals and failures."""
import json
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from launch import MPIEXEC, REPO, env, load_params, max_abs_diff, run_train, train_cmd

pytestmark = pytest.mark.mpi

# 126 does not divide by 4 (32, 32, 31, 31 per rank) and 55,000 leaves a short last batch.
COMMON = ("--dtype", "float64", "--batch-size", "126", "--optimizer", "momentum", "--lr", "0.05")


@pytest.fixture(scope="module")
def p1_params(mnist_h5, tmp_path_factory):
    """The single-process reference: 30 steps, no launcher at all."""
    out = tmp_path_factory.mktemp("p1")
    run_train(None, "--data", mnist_h5, *COMMON, "--max-steps", 30, "--checkpoint", out / "ck.h5",
              "--save-params", out / "p.npz")
    return load_params(out / "p.npz")


@pytest.mark.parametrize("nprocs", [1, 2, 3, 4])
def test_p_ranks_reach_the_single_process_parameters(nprocs, mnist_h5, tmp_path, p1_params):
    proc = run_train(nprocs, "--data", mnist_h5, *COMMON, "--max-steps", 30, "--checkpoint", tmp_path / "ck.h5",
                     "--save-params", tmp_path / "p.npz", "--metrics", tmp_path / "m.json", "--check-replicas", 10)
    assert max_abs_diff(load_params(tmp_path / "p.npz"), p1_params) <= 1e-10
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["world_size"] == nprocs
    assert f"paranet: world size {nprocs}," in proc.stdout
    assert proc.stdout.count("test accuracy") == 1  # only rank 0 prints
    epochs = [line for line in proc.stdout.splitlines() if line.startswith("epoch ")]
    assert epochs and all(("samples/s  comm " in line) == (nprocs > 1) for line in epochs)  # one process: no sum
    assert [line.split("  train")[0] for line in epochs] == ["epoch   1/12 (30/437 steps)"]  # 55,000 / 126: a part


def test_float32_equivalence_within_documented_tolerance(mnist_h5, tmp_path):
    """float32 sums in another order at P=4; README documents the tolerance measured here."""
    args = ("--data", mnist_h5, "--batch-size", "126", "--optimizer", "momentum", "--lr", "0.05", "--max-steps", 30)
    run_train(None, *args, "--checkpoint", tmp_path / "a.h5", "--save-params", tmp_path / "a.npz")
    run_train(4, *args, "--checkpoint", tmp_path / "b.h5", "--save-params", tmp_path / "b.npz")
    a, b = load_params(tmp_path / "a.npz"), load_params(tmp_path / "b.npz")
    assert a["fc1/W"].dtype == np.float32
    diff = max_abs_diff(a, b)
    assert 0 < diff <= 1e-5, diff  # measured: about 5e-7 after 30 steps


def test_sgd_step_is_the_global_batch_mean(mnist_h5, tmp_path):
    """One plain SGD step at P=3 equals a numpy step on the whole global batch."""
    from paranet.data import BatchReader

    run_train(3, "--data", mnist_h5, "--dtype", "float64", "--optimizer", "sgd", "--lr", "0.5", "--max-steps", 1,
              "--batch-size", 100, "--checkpoint", tmp_path / "b.h5", "--save-params", tmp_path / "p.npz")
    # the initial weights, rebuilt the way the trainer builds them (seed 0)
    from paranet.models import mlp

    m = mlp(rng=np.random.default_rng(0))
    names = {v.name: np.array(v.value, dtype=np.float64) for v in _variables(m)}
    with BatchReader(mnist_h5, "train", batch_size=100, seed=0, dtype=np.float64, prefetch=False) as r:
        batch = next(iter(r.epoch(0)))
    x = batch.x.reshape(100, -1)
    W1, b1, W2, b2 = names["fc1/W"], names["fc1/b"], names["fc2/W"], names["fc2/b"]
    h = np.maximum(x @ W1 + b1, 0)
    z = h @ W2 + b2
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    d = (p - batch.y) / 100
    dW2, db2 = h.T @ d, d.sum(0)
    dh = (d @ W2.T) * (h > 0)
    dW1, db1 = x.T @ dh, dh.sum(0)
    expected = {"fc1/W": W1 - 0.5 * dW1, "fc1/b": b1 - 0.5 * db1, "fc2/W": W2 - 0.5 * dW2, "fc2/b": b2 - 0.5 * db2}
    assert max_abs_diff(load_params(tmp_path / "p.npz"), expected) <= 1e-12


def _variables(model):
    from paranet.graph import Variable, topological_order

    return [n for n in topological_order(model.loss) if isinstance(n, Variable)]


def test_checkpoint_layout(mnist_h5, tmp_path):
    ck = tmp_path / "ck.h5"
    run_train(2, "--data", mnist_h5, "--max-steps", 5, "--checkpoint", ck, "--optimizer", "adam")
    with h5py.File(ck, "r") as f:
        assert sorted(f["params"]) == ["fc1", "fc2"] and sorted(f["params/fc1"]) == ["W", "b"]
        assert f["params/fc1/W"].shape == (784, 128) and f["params/fc2/b"].shape == (10,)
        assert sorted(f["optimizer"]) == ["m", "v"] and f["optimizer"].attrs["steps"] == 5
        assert f.attrs["global_step"] == 5 and f.attrs["step_in_epoch"] == 5 and f.attrs["world_size"] == 2
        assert json.loads(f.attrs["flags"])["batch_size"] == 128
    assert [p.name for p in tmp_path.iterdir()] == ["ck.h5"]  # no temporary files left behind


def test_resume_matches_an_uninterrupted_run(mnist_h5, tmp_path):
    args = ("--data", mnist_h5, "--dtype", "float64", "--optimizer", "adam", "--batch-size", 1000, "--epochs", 2)
    run_train(2, *args, "--max-steps", 70, "--checkpoint", tmp_path / "full.h5", "--save-params", tmp_path / "full.npz")
    # stop in the middle of epoch 2 (55 steps an epoch), resume at the same and at another P
    run_train(2, *args, "--max-steps", 60, "--checkpoint", tmp_path / "part.h5")
    (tmp_path / "part3.h5").write_bytes((tmp_path / "part.h5").read_bytes())
    run_train(2, *args, "--max-steps", 70, "--checkpoint", tmp_path / "part.h5", "--resume", "--save-params", tmp_path / "same.npz")
    proc = run_train(3, *args, "--max-steps", 70, "--checkpoint", tmp_path / "part3.h5", "--resume",
                     "--save-params", tmp_path / "other.npz")
    assert "resumed from" in proc.stdout and "written by 2 ranks" in proc.stdout
    full = load_params(tmp_path / "full.npz")
    assert max_abs_diff(load_params(tmp_path / "same.npz"), full) == 0.0
    assert max_abs_diff(load_params(tmp_path / "other.npz"), full) <= 1e-10


def test_sigterm_to_one_rank_stops_all_after_the_same_step_and_resume_matches(mnist_h5, tmp_path):
    """SIGTERM reaching rank 1 alone (at step 300) stops every rank after that step: the request
    travels in the gradient Allreduce. The resumed run ends like an uninterrupted one."""
    args = ("--data", mnist_h5, "--dtype", "float64", "--batch-size", 32, "--max-steps", 500, "--optimizer", "sgd")
    run_train(3, *args, "--checkpoint", tmp_path / "full.h5", "--save-params", tmp_path / "full.npz")
    ck = tmp_path / "ck.h5"
    proc = run_train(3, *args, "--checkpoint", ck, extra_env={"PARANET_FAULT": "rank=1,step=300,kind=sigterm"})
    assert "paranet: stopped by SIGTERM after step 301;" in proc.stdout, proc.stdout + proc.stderr
    with h5py.File(ck, "r") as f:
        assert f.attrs["global_step"] == 301
    run_train(3, *args, "--checkpoint", ck, "--resume", "--save-params", tmp_path / "resumed.npz")
    assert max_abs_diff(load_params(tmp_path / "resumed.npz"), load_params(tmp_path / "full.npz")) == 0.0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_to_mpiexec_reaches_every_rank(mnist_h5, tmp_path, sig):
    """A real SIGTERM (or SIGUSR1, which Open MPI's mpiexec passes on where it ends the job on
    SIGTERM) to the launcher mid-run: a checkpoint at the step named, exit status 0."""
    ck = tmp_path / "ck.h5"
    proc = subprocess.Popen(train_cmd(2, "--data", mnist_h5, "--batch-size", 32, "--epochs", 50, "--checkpoint", ck),
                            cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert "world size 2" in proc.stdout.readline()
    time.sleep(0.5)  # 50 epochs take minutes: the signal lands mid-run
    proc.send_signal(sig)  # mpiexec forwards it to every rank
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    stopped = int(out.split(f"stopped by {sig.name} after step ")[1].split(";")[0])
    with h5py.File(ck, "r") as f:
        assert f.attrs["global_step"] == stopped > 0


def test_a_failing_rank_aborts_the_whole_job(mnist_h5, tmp_path):
    t0 = time.monotonic()
    proc = run_train(4, "--data", mnist_h5, "--checkpoint", tmp_path / "ck.h5", timeout=60, check=False,
                     extra_env={"PARANET_FAULT": "rank=2,step=7"})
    assert proc.returncode != 0
    assert time.monotonic() - t0 < 30
    assert "rank 2 of 4 failed" in proc.stderr and "injected fault at step 7" in proc.stderr


def test_diverged_replicas_are_caught_naming_the_step(mnist_h5, tmp_path):
    proc = run_train(2, "--data", mnist_h5, "--checkpoint", tmp_path / "ck.h5", "--check-replicas", 4, check=False,
                     extra_env={"PARANET_FAULT": "rank=1,step=5,kind=perturb"})
    assert proc.returncode == 1
    assert "replicas diverged at step 8" in proc.stderr


def test_non_finite_loss_stops_naming_the_step(mnist_h5, tmp_path):
    proc = run_train(2, "--data", mnist_h5, "--checkpoint", tmp_path / "ck.h5", "--optimizer", "sgd", "--lr", "1e4",
                     check=False)
    assert proc.returncode == 1
    assert "non-finite training loss" in proc.stderr and "at step" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_flag_is_an_argparse_error_printed_once(tmp_path):
    proc = run_train(2, "--batch-size", "0", check=False)
    assert proc.returncode == 2
    assert proc.stderr.count("--batch-size must be >= 1") == 1
    proc = run_train(None, "--model", "resnet", check=False)
    assert proc.returncode == 2 and "--model resnet: expected one of cnn, mlp" in proc.stderr


@pytest.mark.parametrize("nprocs", [None, 2])
def test_unreadable_data_gives_one_line(nprocs, tmp_path):
    bad = tmp_path / "broken.h5"
    bad.write_bytes(b"not an hdf5 file at all" * 100)
    proc = run_train(nprocs, "--data", bad, "--checkpoint", tmp_path / "ck.h5", check=False)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and str(bad) in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_runs_without_mpi4py(mnist_h5, tmp_path):
    """With mpi4py unimportable the same program runs single-process and says so once."""
    code = ("import sys, runpy; sys.modules['mpi4py'] = None; sys.argv[0] = 'paranet-train';"
            "runpy.run_module('paranet.train', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code, "--data", str(mnist_h5), "--max-steps", "3",
                           "--checkpoint", str(tmp_path / "ck.h5"), "--metrics", str(tmp_path / "m.json")],
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("mpi4py is not installed") == 1
    assert json.loads((tmp_path / "m.json").read_text())["world_size"] == 1


def test_metrics_file(mnist_h5, tmp_path):
    run_train(2, "--data", mnist_h5, "--epochs", 1, "--max-steps", 40, "--checkpoint", tmp_path / "ck.h5",
              "--metrics", tmp_path / "m.json")
    m = json.loads((tmp_path / "m.json").read_text())
    for key in ("test_accuracy", "test_loss", "history", "samples_per_second", "wall_seconds", "comm_seconds",
                "world_size", "flags"):
        assert key in m
    assert 0.80 < m["test_accuracy"] <= 1.0  # 40 Adam steps reach about 90%
    assert m["history"][0]["val_accuracy"] > 0.8 and m["flags"]["max_steps"] == 40
    assert 0 < m["comm_seconds"] < m["wall_seconds"]


def test_timeline_has_every_phase_of_every_rank(mnist_h5, tmp_path):
    trace = tmp_path / "trace.json"
    run_train(2, "--data", mnist_h5, "--max-steps", 30, "--checkpoint", tmp_path / "ck.h5", "--timeline", trace,
              "--timeline-steps", 12)
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e["ph"] == "X"]
    for rank in (0, 1):
        mine = [e for e in events if e["pid"] == rank]
        for phase in ("read", "forward", "backward", "allreduce", "update"):
            spans = [e for e in mine if e["name"] == phase]
            assert len(spans) == 12, (rank, phase, len(spans))
            assert all(e["dur"] >= 0 for e in spans)
        forward = sorted(e["ts"] for e in mine if e["name"] == "forward")
        backward = sorted(e["ts"] for e in mine if e["name"] == "backward")
        assert all(f < b for f, b in zip(forward, backward))  # each step's forward precedes its backward


def test_plot_draws_a_png(mnist_h5, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "curves.png"
    run_train(None, "--data", mnist_h5, "--epochs", 2, "--max-steps", 20, "--batch-size", 1000,
              "--checkpoint", tmp_path / "ck.h5", "--plot", png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_help_shows_defaults_and_console_script_exists():
    script = REPO / ".venv" / "bin" / "paranet-train"
    exe = [str(script)] if script.exists() else [sys.executable, "-m", "paranet.train"]
    proc = subprocess.run([*exe, "--help"], capture_output=True, text=True, env=env(), timeout=60)
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for expected in ("--batch-size BATCH_SIZE global batch size, split over the ranks (default: 128)",
                     "--optimizer {adam,momentum,sgd} the update rule (PyTorch's) (default: adam)", "--check-replicas N",
                     "mlp 12, cnn 5"):
        assert expected in text, expected


def test_progress_bar_on_a_terminal(mnist_h5, tmp_path):
    """Rank 0 draws a tqdm bar when stdout is a terminal, and none when it is a pipe."""
    import fcntl
    import os
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    proc = subprocess.Popen(train_cmd(None, "--data", mnist_h5, "--max-steps", 40, "--checkpoint", tmp_path / "ck.h5"),
                            cwd=REPO, env=env(), stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=60) == 0
    shown = b"".join(chunks).decode(errors="replace")
    assert "epoch 1/12:" in shown and "it/s" in shown  # tqdm's bar
    piped = run_train(None, "--data", mnist_h5, "--max-steps", 40, "--checkpoint", tmp_path / "ck2.h5")
    assert "it/s" not in piped.stdout + piped.stderr


@pytest.mark.parametrize("change", ["truncate", "copy-over"])
def test_a_data_file_changed_under_the_job_stops_it_and_keeps_the_last_checkpoint(change, mnist_h5, tmp_path):
    """Issue 11's silent corruption: truncating --data, or copying another valid file over it in
    place, while `mpirun -n 2` trains. The job must fail naming the file, and the checkpoint of
    the last good epoch must stay as it was (no metrics, no checkpoint from the changed data)."""
    import shutil

    data, ck, metrics = tmp_path / "d.h5", tmp_path / "ck.h5", tmp_path / "m.json"
    shutil.copyfile(mnist_h5, data)
    other = tmp_path / "other.h5"
    if change == "copy-over":
        from paranet.data import prepare_mnist

        prepare_mnist(other, seed=1, progress=False)  # valid, same size, other rows
    proc = subprocess.Popen(train_cmd(2, "--data", data, "--batch-size", 32, "--epochs", 20, "--checkpoint", ck,
                                      "--metrics", metrics), cwd=REPO, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    while not ck.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert ck.exists(), proc.communicate()
    good = ck.read_bytes()
    if change == "truncate":
        subprocess.run(["truncate", "-s", "1200K", str(data)], check=True)
    else:
        subprocess.run(["cp", str(other), str(data)], check=True)  # in place: same inode
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0, out
    assert str(data) in err and "Traceback" not in err, err
    assert ck.read_bytes() == good and not metrics.exists()


def test_staged_data_gives_the_hdf5_batches_bit_for_bit(mnist_h5):
    """--data-in-memory: the split normalised once in memory hands every rank the same bytes as
    its per-step hyperslab reads: every step of an epoch with a wrap and a short last batch."""
    from paranet.data import BatchReader

    for rank in range(3):
        common = dict(rank=rank, size=3, batch_size=999, seed=3, prefetch=False)  # 55 full batches and 55 rows
        with BatchReader(mnist_h5, "train", **common) as disk, BatchReader(mnist_h5, "train", **common) as mem:
            mem.stage()
            reads_before = mem.reads
            pairs = list(zip(disk.epoch(1), mem.epoch(1, start_step=0)))
            assert len(pairs) == 56 and pairs[-1][0].n_global == 55
            for a, b in pairs:
                assert a.n_local == b.n_local and a.n_global == b.n_global
                assert a.x.tobytes() == b.x.tobytes() and a.y.tobytes() == b.y.tobytes()
            assert mem.reads == reads_before  # a staged step reads nothing from the file


def test_data_in_memory_on_and_off_train_to_the_same_bits(mnist_h5, tmp_path):
    args = ("--data", mnist_h5, "--batch-size", "126", "--optimizer", "momentum", "--lr", "0.05", "--max-steps", 40)
    on = run_train(2, *args, "--data-in-memory", "on", "--checkpoint", tmp_path / "a.h5", "--save-params", tmp_path / "a.npz")
    off = run_train(2, *args, "--data-in-memory", "off", "--checkpoint", tmp_path / "b.h5", "--save-params", tmp_path / "b.npz")
    assert "held in memory shared by the ranks of each machine" in on.stdout
    assert "read from HDF5 every step" in off.stdout
    a, b = load_params(tmp_path / "a.npz"), load_params(tmp_path / "b.npz")
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)


def test_sigterm_while_the_trainer_is_still_importing_stops_it_cleanly(tmp_path, mnist_h5):
    """Issue 11 item 12: 0.1 s after the start the trainer is still importing numpy and h5py;
    paranet/__init__.py has recorded the signal from its first line, so the run stops before
    its first step with a checkpoint and exit 0, not status 143 with no message."""
    ck = tmp_path / "ck.h5"
    proc = subprocess.Popen(train_cmd(None, "--data", mnist_h5, "--max-steps", 50, "--checkpoint", ck), cwd=REPO,
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, (proc.returncode, err)
    assert "paranet: stopped by SIGTERM before step 1" in out
    with h5py.File(ck, "r") as f:
        assert f.attrs["global_step"] == 0


# -- a CNN shard above Conv2DOp.chunk_rows runs in pieces ---------------------------------------

PIECES = """
import sys
import numpy as np
import paranet as pn
from paranet.nn.conv import Conv2DOp

data, out, rows = sys.argv[1], sys.argv[2], int(sys.argv[3])
Conv2DOp.chunk_rows = rows or None  # 0: the whole shard in one pass, the reference
model = pn.models.cnn((16, 16), 3, np.random.default_rng(1), channels=(4, 8), hidden=16)
m = pn.fit(model, data, pn.train.AdamOptimizer(0.01, model.loss), batch_size=int(sys.argv[4]), epochs=4,
           dtype=np.float64, save_params=out, verbose=False)
if pn.init().rank == 0:
    print(m["history"][-1]["train_loss"], m["history"][-1]["train_accuracy"], m["test_loss"], m["test_accuracy"])
"""


@pytest.fixture(scope="module")
def small_images(tmp_path_factory):
    """1,000 16x16 float images in 3 classes (a bright quadrant a class), 200 for val and test."""
    from paranet.data import write_dataset

    rng = np.random.default_rng(5)

    def split(n):
        y = rng.integers(0, 3, n)
        X = rng.normal(0, 1, (n, 16, 16)).astype(np.float32)
        for c in range(3):
            X[y == c, (c // 2) * 8:(c // 2) * 8 + 8, (c % 2) * 8:(c % 2) * 8 + 8] += 1.5
        return X, y
    return write_dataset(tmp_path_factory.mktemp("small") / "s.h5", train=split(1000), val=split(200),
                         test=split(200), num_classes=3)


@pytest.mark.parametrize("nprocs, batch", [(None, 200), (2, 300)])
def test_a_cnn_shard_in_pieces_trains_as_the_whole_shard(nprocs, batch, small_images, tmp_path):
    """Pieces of at most 64 rows (200 rows: 4 of 50; 150 a rank: 3 of 50, and the epoch's last,
    shorter shards) give the parameters and metrics of one pass over the whole shard, float64,
    to rounding: the gradient of the mean is put together from the pieces' weighted by their rows."""
    script = tmp_path / "pieces.py"
    script.write_text(PIECES)
    cmd = [sys.executable, script] if nprocs is None else [MPIEXEC, "-n", nprocs, sys.executable, script]
    results = {}
    for rows in (0, 64):
        out = tmp_path / f"p{rows}.npz"
        proc = subprocess.run([str(c) for c in cmd + [small_images, out, rows, batch]], cwd=REPO, env=env(),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        results[rows] = (load_params(out), [float(v) for v in proc.stdout.split()])
    (whole, whole_metrics), (pieces, piece_metrics) = results[0], results[64]
    assert max_abs_diff(whole, pieces) <= 1e-11
    assert np.allclose(piece_metrics, whole_metrics, rtol=1e-11, atol=0)
    assert whole_metrics[3] > 0.9  # it learned: the comparison is not of two untrained nets


def test_piece_bounds():
    from paranet.trainer import piece_bounds

    assert piece_bounds(0, 128) == [] and piece_bounds(5, None) == [0, 5] and piece_bounds(128, 128) == [0, 128]
    assert piece_bounds(129, 128) == [0, 64, 129] and piece_bounds(500, 128) == [0, 125, 250, 375, 500]
    for n in range(1, 600, 7):
        b = piece_bounds(n, 64)
        sizes = np.diff(b)
        assert b[0] == 0 and b[-1] == n and sizes.max() <= 64 and sizes.max() - sizes.min() <= 1
