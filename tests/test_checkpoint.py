"""paranet.checkpoint on real HDF5 files: round trip, whole-schema validation, rotation, stale
temporaries after a real SIGKILL, and the one-writer lock held by a real second process."""
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from launch import REPO, env
from paranet import checkpoint
from paranet.graph import Session
from paranet.models import mlp
from paranet.train import AdamOptimizer, GradientDescentOptimizer, MomentumOptimizer

OPTIMIZERS = {"adam": AdamOptimizer, "momentum": MomentumOptimizer, "sgd": GradientDescentOptimizer}


def trained(kind="adam", dtype="float32", seed=0, steps=2):
    """A small MLP and its optimizer after ``steps`` real updates (so the optimizer has its slots)."""
    rng = np.random.default_rng(seed)
    model = mlp((784,), 10, rng=rng, hidden=(8,))
    sess = Session(dtype)
    opt = OPTIMIZERS[kind](0.01, model.loss)
    x = rng.random((16, 784))
    y = np.eye(10)[rng.integers(0, 10, 16)]
    for _ in range(steps):
        sess.run(opt, {model.x: x, model.y: y})
    return sess.parameters(model.loss), opt


def save(path, params, opt, **kw):
    args = dict(epoch=1, step_in_epoch=3, global_step=58, world_size=2, seed=7, flags={"lr": 0.01, "model": "mlp"},
                rng_state={"state": 1}, history=[{"epoch": 1, "train_loss": 0.5}])
    args.update(kw)
    checkpoint.save(path, params, opt, **args)


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_round_trip_restores_everything_and_returns_extra_items(tmp_path):
    params, opt = trained("adam", steps=3)
    ck = tmp_path / "ck.h5"
    data = {"path": "/data/mnist.h5", "train": 55000, "sha256": "ab" * 32}
    save(ck, params, opt, data=data, epoch_sums=[1.5, 30, 64])
    fresh, fresh_opt = trained("adam", seed=1, steps=1)
    assert not np.array_equal(fresh.values, params.values)
    attrs = checkpoint.load(ck, fresh, fresh_opt)
    assert np.array_equal(fresh.values, params.values)
    assert fresh_opt.steps == 3 and fresh_opt.state.keys() >= {"m", "v"}
    for slot in ("m", "v"):
        assert np.array_equal(fresh_opt.state[slot], opt.state[slot])
    assert attrs["epoch"] == 1 and attrs["global_step"] == 58 and attrs["seed"] == 7
    assert attrs["flags"] == {"lr": 0.01, "model": "mlp"} and attrs["history"][0]["train_loss"] == 0.5
    assert attrs["data"] == data and attrs["epoch_sums"] == [1.5, 30, 64]
    assert checkpoint.read_attrs(ck)["data"] == data


def test_largest_seed_round_trips_and_a_seed_past_uint64_writes_nothing(tmp_path):
    params, opt = trained("sgd", steps=1)
    save(tmp_path / "a.h5", params, opt, seed=2**64 - 1)
    assert checkpoint.load(tmp_path / "a.h5", params, opt)["seed"] == 2**64 - 1
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*64\)"):
        save(tmp_path / "b.h5", params, opt, seed=2**64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.h5"]


def _set_attr(name, value):
    def edit(f):
        f.attrs[name] = value
    return edit


def _del(key):
    def edit(f):
        del f[key]
    return edit


def _del_attr(name, where="/"):
    def edit(f):
        del f[where].attrs[name]
    return edit


def _retype(key, dtype):
    def edit(f):
        arr = f[key][()]
        del f[key]
        f.create_dataset(key, data=arr.astype(dtype))
    return edit


def _replace(key, arr):
    def edit(f):
        del f[key]
        f.create_dataset(key, data=arr)
    return edit


def _nan(key):
    def edit(f):
        f[key][0] = np.nan
    return edit


# (optimizer, edit, expected message): each is a valid HDF5 file with a wrong paranet checkpoint in it
BAD = {
    "adam without v": ("adam", _del("optimizer/v"), "missing dataset /optimizer/v"),
    "adam without m": ("adam", _del("optimizer/m"), "missing dataset /optimizer/m"),
    "momentum without its buffer": ("momentum", _del("optimizer/momentum"), "missing dataset /optimizer/momentum"),
    "int32 parameters": ("adam", _retype("params/fc1/W", "int32"), "dataset /params/fc1/W: dtype int32, expected float32"),
    "float16 parameters": ("adam", _retype("params/fc2/b", "float16"), "dataset /params/fc2/b: dtype float16, expected float32"),
    "float16 optimizer slot": ("adam", _retype("optimizer/m", "float16"), "dataset /optimizer/m: dtype float16"),
    "slot of the wrong shape": ("adam", _replace("optimizer/v", np.zeros(3, "float32")), "dataset /optimizer/v: expected shape"),
    "parameter of the wrong shape": ("sgd", _replace("params/fc1/b", np.zeros(9, "float32")),
                                     "dataset /params/fc1/b: expected shape (8,), got (9,)"),
    "NaN in a parameter": ("sgd", _nan("params/fc2/b"), "dataset /params/fc2/b: holds 1 non-finite values"),
    "a parameter too many": ("sgd", lambda f: f.create_dataset("params/fc3/W", data=np.zeros(2, "float32")),
                             "unexpected: /params/fc3/W"),
    "a slot SGD does not have": ("sgd", lambda f: f.create_dataset("optimizer/m", data=np.zeros(1, "float32")),
                                 "unexpected dataset /optimizer/m"),
    "missing /params": ("sgd", _del("params"), "missing group /params"),
    "missing /optimizer": ("sgd", _del("optimizer"), "missing group /optimizer"),
    "a parameter that is a group": ("sgd", lambda f: (f.__delitem__("params/fc1/W"), f.create_group("params/fc1/W")),
                                    "expected 4 parameter arrays under /params, but received 3"),
    "missing epoch": ("sgd", _del_attr("epoch"), "missing root attribute 'epoch'"),
    "missing flags": ("sgd", _del_attr("flags"), "missing root attribute 'flags'"),
    "missing optimizer kind": ("sgd", _del_attr("kind", "optimizer"), "missing attribute 'kind' of /optimizer"),
    "missing optimizer steps": ("sgd", _del_attr("steps", "optimizer"), "missing attribute 'steps' of /optimizer"),
    "negative optimizer steps": ("sgd", lambda f: f["optimizer"].attrs.__setitem__("steps", -2),
                                 "attribute 'steps' of /optimizer: is -2"),
    "negative epoch": ("sgd", _set_attr("epoch", -1), "root attribute 'epoch': is -1, expected an integer >= 0"),
    "negative step": ("sgd", _set_attr("step_in_epoch", -5), "root attribute 'step_in_epoch': is -5"),
    "negative global step": ("sgd", _set_attr("global_step", -1), "root attribute 'global_step': is -1"),
    "zero ranks": ("sgd", _set_attr("world_size", 0), "root attribute 'world_size': is 0, expected an integer >= 1"),
    "epoch as a string": ("sgd", _set_attr("epoch", "3"), "root attribute 'epoch': expected an integer, got str"),
    "epoch as a float": ("sgd", _set_attr("epoch", 1.5), "root attribute 'epoch': expected an integer"),
    "bad JSON in flags": ("sgd", _set_attr("flags", "{lr: 1"), "root attribute 'flags': not valid JSON"),
    "bad JSON in history": ("sgd", _set_attr("history", "[{]"), "root attribute 'history': not valid JSON"),
    "bad JSON in rng": ("sgd", _set_attr("rng", "nope"), "root attribute 'rng': not valid JSON"),
    "history not a list": ("sgd", _set_attr("history", "{}"), "root attribute 'history': expected a JSON array"),
    "history of numbers": ("sgd", _set_attr("history", "[1, 2]"), "expected a JSON array of objects"),
    "flags not an object": ("sgd", _set_attr("flags", "[]"), "root attribute 'flags': expected a JSON object"),
    "flags as a number": ("sgd", _set_attr("flags", 3), "root attribute 'flags': expected a JSON string, got"),
    "bad JSON in extra": ("sgd", _set_attr("extra", "{"), "root attribute 'extra': not valid JSON"),
    "unknown dtype": ("sgd", _set_attr("dtype", "int8"), "root attribute 'dtype': is 'int8'"),
    "wrong format": ("sgd", _set_attr("format", "other/2"), "root attribute 'format': is 'other/2'"),
    "other optimizer": ("sgd", lambda f: f["optimizer"].attrs.__setitem__("kind", "AdamOptimizer"),
                        "/optimizer was written by AdamOptimizer, expected GradientDescentOptimizer"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_wrong_checkpoint_is_one_line_naming_it_and_changes_nothing(case, tmp_path):
    kind, edit, message = BAD[case]
    params, opt = trained(kind)
    ck = tmp_path / "ck.h5"
    save(ck, params, opt)
    with h5py.File(ck, "r+") as f:
        edit(f)
    before = digest(ck)
    target, target_opt = trained(kind, seed=1)
    values, state = target.values.copy(), {k: v.copy() for k, v in target_opt.state.items()}
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.load(ck, target, target_opt)
    text = str(info.value)
    assert text.startswith(f"{ck}: ") and message in text and "\n" not in text, text
    assert digest(ck) == before  # the file is left as it was
    assert np.array_equal(target.values, values) and target_opt.steps == 2  # so is the model
    assert all(np.array_equal(target_opt.state[k], v) for k, v in state.items())


def test_a_checkpoint_before_the_first_step_has_no_slots_and_loads(tmp_path):
    params, opt = trained("adam", steps=0)
    save(tmp_path / "ck.h5", params, opt, global_step=0, step_in_epoch=0, epoch=0)
    with h5py.File(tmp_path / "ck.h5", "r") as f:
        assert sorted(f["optimizer"]) == []
    target, target_opt = trained("adam", seed=1, steps=0)
    checkpoint.load(tmp_path / "ck.h5", target, target_opt)
    assert np.array_equal(target.values, params.values)


def test_float64_checkpoint_is_not_cast_into_a_float32_model(tmp_path):
    params, opt = trained("sgd", dtype="float64")
    save(tmp_path / "ck.h5", params, opt)
    target, target_opt = trained("sgd", dtype="float32")
    with pytest.raises(checkpoint.CheckpointError, match="dtype float64, expected float32"):
        checkpoint.load(tmp_path / "ck.h5", target, target_opt)


def test_not_hdf5_and_truncated_files_are_one_line(tmp_path):
    params, opt = trained("sgd")
    (tmp_path / "text.h5").write_text("not hdf5\n")
    save(tmp_path / "ck.h5", params, opt)
    data = (tmp_path / "ck.h5").read_bytes()
    (tmp_path / "cut.h5").write_bytes(data[: len(data) // 2])
    for name in ("text.h5", "cut.h5", "missing.h5"):
        with pytest.raises(checkpoint.CheckpointError) as info:
            checkpoint.load(tmp_path / name, params, opt)
        assert str(info.value).startswith(f"{tmp_path / name}: ") and "\n" not in str(info.value)


def test_keep_rotates_the_last_k_and_the_newest_is_always_at_the_path(tmp_path):
    params, opt = trained("sgd", steps=1)
    ck = tmp_path / "ck.h5"
    for step in range(1, 6):
        save(ck, params, opt, global_step=step, keep=3)
        assert checkpoint.read_attrs(ck)["global_step"] == step
    steps = {p.name: checkpoint.read_attrs(p)["global_step"] for p in tmp_path.iterdir()}
    assert steps == {"ck.h5": 5, "ck.h5.1": 4, "ck.h5.2": 3}  # and no temporary files
    save(ck, params, opt, global_step=6, keep=1)  # keeping fewer drops the older copies
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.h5"]


def test_keep_leaves_the_old_files_when_the_new_write_fails(tmp_path):
    params, opt = trained("sgd", steps=1)
    ck = tmp_path / "ck.h5"
    save(ck, params, opt, global_step=1, keep=2)
    save(ck, params, opt, global_step=2, keep=2)
    with pytest.raises(TypeError):
        save(ck, params, opt, global_step=3, keep=2, data={"not json": object()})
    steps = {p.name: checkpoint.read_attrs(p)["global_step"] for p in tmp_path.iterdir()}
    assert steps == {"ck.h5": 2, "ck.h5.1": 1}


WRITER = """
import sys, time
from paranet.files import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    with open(tmp, "wb") as f:
        f.write(b"x" * 1000); f.flush()
        print("writing", flush=True)
        time.sleep(60)
"""


def _writer(target):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], env=env(), cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    return proc


def test_cleanup_stale_removes_what_a_sigkill_mid_write_left_and_nothing_else(tmp_path):
    ck = tmp_path / "ck.h5"
    ck.write_text("the checkpoint")
    (tmp_path / "other.h5").write_text("unrelated")
    (tmp_path / ".other.h5.1.0123abcd.tmp").write_text("another file's temporary")
    killed = _writer(ck)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    live = _writer(ck)
    try:
        names = sorted(p.name for p in tmp_path.iterdir())
        dead_tmp = [n for n in names if n.startswith(f".ck.h5.{killed.pid}.")]
        live_tmp = [n for n in names if n.startswith(f".ck.h5.{live.pid}.")]
        assert len(dead_tmp) == 1 and len(live_tmp) == 1, names
        removed = checkpoint.cleanup_stale(ck)
        assert [p.name for p in removed] == dead_tmp  # the live writer's file stays
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(set(names) - set(dead_tmp))
        # under the run's lock, anything older than the run is stale, whatever its pid
        removed = checkpoint.cleanup_stale(ck, started=time.time() + 1)
        assert [p.name for p in removed] == live_tmp
    finally:
        live.kill()
        live.wait()
    assert ck.read_text() == "the checkpoint" and (tmp_path / ".other.h5.1.0123abcd.tmp").exists()


HOLDER = """
import sys, time
from paranet.checkpoint import RunLock
with RunLock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_run_lock_refuses_a_second_run_naming_the_first_and_dies_with_it(tmp_path):
    ck = tmp_path / "ck.h5"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(ck)], env=env(), cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(checkpoint.RunLockError) as info:
            checkpoint.RunLock(ck).acquire()
        text = str(info.value)
        assert f"{ck} is in use by another run (pid {holder.pid} on {socket.gethostname()}" in text
        assert "\n" not in text
    finally:
        holder.send_signal(signal.SIGKILL)  # the kernel drops the lock with the process
        holder.wait()
    assert (tmp_path / ".ck.h5.lock").exists()  # a SIGKILL leaves the file, but not the lock
    with checkpoint.RunLock(ck) as lock:
        assert f"pid {os.getpid()} on" in (tmp_path / ".ck.h5.lock").read_text()
        with pytest.raises(checkpoint.RunLockError, match=f"pid {os.getpid()}"):
            checkpoint.RunLock(ck).acquire()  # also within one process
    assert lock.fd is None and not (tmp_path / ".ck.h5.lock").exists()
    checkpoint.RunLock(ck).acquire().release()
