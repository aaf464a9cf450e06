"""Checkpoints in HDF5 (never pickle): written atomically, validated whole on load, one writer a run.

Layout:
    /params/<layer>/<param>   one dataset per parameter array (names like "fc1/W"), in the
                              training dtype (float32 or float64)
    /optimizer/<slot>         the optimizer's flat state arrays (Adam: m, v; Momentum: momentum;
                              SGD: none), shaped and typed like the flat parameter buffer;
                              attrs: steps, kind
    root attrs                format, epoch, step_in_epoch, global_step, world_size, seed, dtype,
                              flags (JSON), rng (JSON of the trainer's RNG state),
                              history (JSON: the per-epoch metrics so far),
                              extra (JSON object: whatever else the caller passed to save, such
                              as the dataset's identity; optional)

The data order is a function of (seed, epoch) alone (paranet.data.reader), so seed, epoch and
step_in_epoch are the whole data-order state: a resumed run reads exactly the batches that the
uninterrupted run would have read, at any number of ranks.

``load`` reads and checks everything (every dataset with its dtype and shape, every attribute
with its type, the JSON in flags/history/rng/extra) before it changes the model, and opens the
file read-only: a bad checkpoint is one CheckpointError line naming the file and the item, and
neither the file nor the model is touched.

``save(..., keep=K)`` keeps the last K checkpoints: ``ck.h5`` is always the newest, ``ck.h5.1``
the one before, up to ``ck.h5.<K-1>``. Rotation happens after the new file is complete and
synced, and by renames and a hard link, so ``ck.h5`` exists at every moment.

``RunLock(path)`` holds an fcntl.flock on ``.<name>.lock`` beside the checkpoint for the run:
a second run on the same checkpoint is refused with one line naming the first (pid, host).
"""
import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path

import h5py
import numpy as np

from .files import atomic_path, cleanup_stale, new_h5, temp_name  # noqa: F401  (cleanup_stale re-exported)

FORMAT = "paranet-checkpoint/1"
# The state arrays each optimizer has after its first step (the trainer's optimizers).
SLOTS = {"AdamOptimizer": ("m", "v"), "MomentumOptimizer": ("momentum",), "GradientDescentOptimizer": ()}
PARAM_DTYPES = ("float32", "float64")
# Root attributes: name -> (required, check). JSON ones are decoded before they are checked.
_INT = "an integer >= 0"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, malformed or does not fit the model (one line)."""


class RunLockError(RuntimeError):
    """Another run holds the checkpoint's lock (one line naming it)."""


def atomic_h5(path, write, before_replace=None):
    """Call ``write(h5file)`` on a temporary file beside ``path``, then put it in place atomically."""
    with atomic_path(path, before_replace=before_replace) as tmp:
        with new_h5(tmp) as f:
            write(f)


def atomic_write_text(path, text):
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _kind(optimizer):
    """The update rule's class name, through a DistributedOptimizer wrapper."""
    return type(getattr(optimizer, "optimizer", optimizer)).__name__


def save(path, params, optimizer, *, epoch, step_in_epoch, global_step, world_size, seed, flags, rng_state=None,
         history=(), keep=1, **extra):
    """Write a checkpoint of ``params`` (a Parameters) and ``optimizer`` to ``path``.

    Args:
        epoch, step_in_epoch, global_step: where training stands (integers >= 0).
        world_size: the number of ranks that wrote it; seed: the run's seed (0 <= seed < 2**64).
        flags, rng_state, history: stored as JSON (a dict, a dict, a list of dicts).
        keep: how many checkpoints to keep: the new one at ``path`` and the K-1 before it
            as ``path.1`` (newest) ... ``path.<K-1>``.
        extra: more JSON-serialisable items (e.g. ``data={...}`` for the dataset's identity);
            ``load`` returns them among the attributes.
    """
    path = Path(path)
    for name, value in (("epoch", epoch), ("step_in_epoch", step_in_epoch), ("global_step", global_step)):
        if not _is_int(value) or value < 0:
            raise ValueError(f"checkpoint.save: {name} must be an integer >= 0, got {value!r}")
    if not _is_int(world_size) or world_size < 1:
        raise ValueError(f"checkpoint.save: world_size must be an integer >= 1, got {world_size!r}")
    if not _is_int(seed) or not 0 <= seed < 2**64:
        raise ValueError(f"checkpoint.save: seed must be an integer in [0, 2**64), got {seed!r}")
    if not _is_int(keep) or keep < 1:
        raise ValueError(f"checkpoint.save: keep must be an integer >= 1, got {keep!r}")
    clash = sorted(set(extra) & (set(_ROOT) | {"extra"}))
    if clash:
        raise ValueError(f"checkpoint.save: extra items may not be named {', '.join(clash)}")
    # encode everything before the file is opened: an unserialisable item fails with nothing written
    encoded = dict(flags=json.dumps(flags, sort_keys=True), rng=json.dumps(rng_state or {}),
                   history=json.dumps(list(history)), extra=json.dumps(extra, sort_keys=True))
    state = optimizer.state_dict()

    def write(f):
        f.attrs.update(
            format=FORMAT, epoch=int(epoch), step_in_epoch=int(step_in_epoch), global_step=int(global_step),
            world_size=int(world_size), seed=np.uint64(seed) if seed >= 2**63 else int(seed),
            dtype=str(params.dtype), **encoded,
        )
        for name, var in params.named():
            f.create_dataset(f"params/{name}", data=var.value)
        opt = f.create_group("optimizer")
        opt.attrs["steps"] = int(state.get("steps", 0))
        opt.attrs["kind"] = _kind(optimizer)
        for slot, arr in state.items():
            if slot != "steps":
                opt.create_dataset(slot, data=arr)

    atomic_h5(path, write, before_replace=(lambda: rotate(path, keep)) if keep > 1 else None)
    if keep == 1:
        _drop_rotated(path, 1)


def rotated(path, i):
    """The i-th older checkpoint kept beside ``path`` (``path.i``)."""
    path = Path(path)
    return path.with_name(f"{path.name}.{i}")


def rotate(path, keep):
    """Shift ``path.1 .. path.<keep-2>`` up by one and make ``path.1`` the current ``path``.

    ``path`` itself stays in place (a hard link, or a copy where links are not supported,
    becomes ``path.1``), so a crash at any point leaves the newest complete checkpoint at
    ``path``; copies beyond ``keep`` are removed.
    """
    path = Path(path)
    _drop_rotated(path, keep)
    for i in range(keep - 1, 1, -1):
        if rotated(path, i - 1).exists():
            os.replace(rotated(path, i - 1), rotated(path, i))
    if path.exists():
        tmp = temp_name(path, ".link")
        try:
            try:
                os.link(path, tmp)
            except OSError:
                shutil.copyfile(path, tmp)
            os.replace(tmp, rotated(path, 1))
        finally:
            tmp.unlink(missing_ok=True)


def _drop_rotated(path, keep):
    """Remove ``path.<keep>``, ``path.<keep+1>``, ... left by a run that kept more."""
    i = keep
    while rotated(path, i).exists():
        rotated(path, i).unlink()
        i += 1


# -- loading -----------------------------------------------------------------------------


def _is_int(v):
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _json(kind):
    def check(v):
        if not isinstance(v, str):
            return f"expected a JSON string, got {type(v).__name__}"
        try:
            obj = json.loads(v)
        except ValueError as e:
            return f"not valid JSON ({e})"
        if not isinstance(obj, kind):
            return f"expected a JSON {'object' if kind is dict else 'array'}, got {type(obj).__name__}"
        if kind is list and not all(isinstance(r, dict) for r in obj):
            return "expected a JSON array of objects"
        return None

    return check


def _int_at_least(low):
    def check(v):
        if not _is_int(v):
            return f"expected an integer, got {type(v).__name__} {v!r}"
        if v < low:
            return f"is {int(v)}, expected an integer >= {low}"
        return None

    return check


def _one_of(values):
    def check(v):
        return None if isinstance(v, str) and v in values else f"is {v!r}, expected one of {', '.join(values)}"

    return check


_ROOT = {
    "format": (True, lambda v: None if v == FORMAT else f"is {v!r}, expected {FORMAT!r} (not a paranet checkpoint?)"),
    "epoch": (True, _int_at_least(0)),
    "step_in_epoch": (True, _int_at_least(0)),
    "global_step": (True, _int_at_least(0)),
    "world_size": (True, _int_at_least(1)),
    "seed": (True, _int_at_least(0)),
    "dtype": (True, _one_of(PARAM_DTYPES)),
    "flags": (True, _json(dict)),
    "rng": (True, _json(dict)),
    "history": (True, _json(list)),
    "extra": (False, _json(dict)),
}


def _read_attrs(f, path):
    """The root attributes, each checked, JSON decoded, extra items merged in."""
    attrs = {}
    for name, (required, check) in _ROOT.items():
        if name not in f.attrs:
            if required:
                raise CheckpointError(f"{path}: missing root attribute {name!r}")
            continue
        value = f.attrs[name]
        problem = check(value)
        if problem:
            raise CheckpointError(f"{path}: root attribute {name!r}: {problem}")
        attrs[name] = json.loads(value) if name in ("flags", "rng", "history", "extra") else (
            value.item() if isinstance(value, np.generic) else value)
    attrs.update(attrs.pop("extra", {}))
    return attrs


def read_attrs(path):
    """The validated root attributes of the checkpoint at ``path``, without a model."""
    path = Path(path)
    with _open(path) as f:
        return _guarded(path, lambda: _read_attrs(f, path))


def _open(path):
    try:
        return h5py.File(path, "r")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot open checkpoint ({_first_line(e)})") from None


def _first_line(e):
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _guarded(path, read):
    """Run ``read()``; an error from h5py (a damaged file) becomes one CheckpointError line."""
    try:
        return read()
    except CheckpointError:
        raise
    except (OSError, KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {_first_line(e)})") from None


def _dataset(f, key, path, shape, dtype):
    """The array at ``key``, checked for presence, kind, shape, dtype and finiteness."""
    if key not in f:
        raise CheckpointError(f"{path}: missing dataset /{key}")
    ds = f[key]
    if not isinstance(ds, h5py.Dataset):
        raise CheckpointError(f"{path}: /{key} is a group, expected a dataset")
    if ds.shape != shape:
        raise CheckpointError(f"{path}: dataset /{key}: expected shape {shape}, got {ds.shape}")
    if ds.dtype != dtype:
        raise CheckpointError(f"{path}: dataset /{key}: dtype {ds.dtype}, expected {dtype} (never cast)")
    arr = ds[()]
    if not np.isfinite(arr).all():
        raise CheckpointError(f"{path}: dataset /{key}: holds {int(np.size(arr) - np.isfinite(arr).sum())} "
                              "non-finite values")
    return arr


def _group(f, key, path):
    if key not in f:
        raise CheckpointError(f"{path}: missing group /{key}")
    if not isinstance(f[key], h5py.Group):
        raise CheckpointError(f"{path}: /{key} is a dataset, expected a group")
    return f[key]


def _read_all(f, path, params, optimizer):
    attrs = _read_attrs(f, path)
    dtype = np.dtype(params.dtype)
    # parameters: exactly the model's names, shapes and dtype
    stored = []
    _group(f, "params", path).visititems(lambda name, obj: stored.append(name) if isinstance(obj, h5py.Dataset) else None)
    names = [name for name, _ in params.named()]
    extra = sorted(set(stored) - set(names))
    if extra or len(stored) != len(names):
        raise CheckpointError(f"{path}: expected {len(names)} parameter arrays under /params, but received {len(stored)}"
                              + (f" (unexpected: /params/{extra[0]})" if extra else ""))
    values = {name: _dataset(f, f"params/{name}", path, var.shape, dtype) for name, var in params.named()}
    # optimizer: its kind, step count and every slot that kind has
    opt = _group(f, "optimizer", path)
    kind, steps = opt.attrs.get("kind"), opt.attrs.get("steps")
    if kind is None:
        raise CheckpointError(f"{path}: missing attribute 'kind' of /optimizer")
    if kind != _kind(optimizer):
        raise CheckpointError(f"{path}: /optimizer was written by {kind}, expected {_kind(optimizer)}")
    if steps is None:
        raise CheckpointError(f"{path}: missing attribute 'steps' of /optimizer")
    problem = _int_at_least(0)(steps)
    if problem:
        raise CheckpointError(f"{path}: attribute 'steps' of /optimizer: {problem}")
    expected = SLOTS.get(kind)
    present = sorted(opt)
    if expected is not None:
        unexpected = [s for s in present if s not in expected]
        if unexpected:
            raise CheckpointError(f"{path}: unexpected dataset /optimizer/{unexpected[0]} for {kind} "
                                  f"(expected {', '.join(expected) or 'none'})")
        if steps > 0:
            present = list(expected)  # after a step, every slot must be there
    state = {"steps": int(steps)}
    for slot in present:
        state[slot] = _dataset(f, f"optimizer/{slot}", path, params.values.shape, dtype)
    return attrs, values, state


def load(path, params, optimizer):
    """Restore ``params`` and ``optimizer`` from ``path``; return the root attributes as a dict.

    Everything is read and checked first; on any problem a CheckpointError (one line naming
    ``path`` and the item) is raised and neither the model nor the file has changed. The
    returned dict holds the root attributes with flags, rng and history decoded, plus any
    extra items given to ``save``.
    """
    path = Path(path)
    with _open(path) as f:
        attrs, values, state = _guarded(path, lambda: _read_all(f, path, params, optimizer))
    for name, var in params.named():
        var.value = values[name]
    optimizer.load_state_dict(state)
    return attrs


# -- one writer per checkpoint -------------------------------------------------------------


class RunLock:
    """An exclusive lock for one run on ``path``'s checkpoint, held until ``release()``.

    ``fcntl.flock`` on ``.<name>.lock`` beside ``path`` (on Linux NFS maps it to a POSIX lock, so
    it also holds across machines sharing the storage). The lock file records the holder's pid,
    host and start time, which the refusal names. The kernel drops the lock when the holder
    dies, even by SIGKILL, so a stale lock file never blocks a later run. Use it as a context
    manager, or call ``acquire()``/``release()``.
    """

    def __init__(self, path):
        path = Path(path)
        self.path = path
        self.lock_path = path.with_name(f".{path.name}.lock")
        self.fd = None

    def acquire(self):
        """Take the lock or raise RunLockError naming the run that holds it."""
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise RunLockError(f"{self.path} is in use by another run ({holder}); wait for it to end, "
                                   "or give this run another --checkpoint") from None
            except BaseException:
                os.close(fd)
                raise
            # the holder before us may have unlinked the file after we opened it: lock the live one
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.lock_path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        info = f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode(), 0)
        self.fd = fd
        return self

    def release(self):
        """Remove the lock file and drop the lock (in that order: see acquire)."""
        if self.fd is None:
            return
        try:
            self.lock_path.unlink(missing_ok=True)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _read_holder(fd):
    try:
        text = os.pread(fd, 512, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text or "holder unknown"
