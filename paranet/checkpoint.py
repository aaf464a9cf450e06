"""Checkpoints in HDF5 (never pickle), written atomically: temp file, fsync, rename.

Layout:
    /params/<layer>/<param>   one dataset per parameter array (names like "fc1/W")
    /optimizer/<slot>         the optimizer's flat state arrays; attrs: steps, kind
    root attrs                format, epoch, step_in_epoch, global_step, world_size,
                              seed, flags (JSON), rng (JSON of the trainer's RNG state),
                              history (JSON: the per-epoch metrics so far)

The data order is a function of (seed, epoch) alone (paranet.data.reader), so seed, epoch and
step_in_epoch are the whole data-order state: a resumed run reads exactly the batches that the
uninterrupted run would have read, at any number of ranks.
"""
import json
from pathlib import Path

import h5py
import numpy as np

from .files import atomic_path

FORMAT = "paranet-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not fit the model."""


def atomic_h5(path, write):
    """Call ``write(h5file)`` on a temporary file beside ``path``, then put it in place atomically."""
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            write(f)


def atomic_write_text(path, text):
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save(path, params, optimizer, *, epoch, step_in_epoch, global_step, world_size, seed, flags, rng_state=None,
         history=()):
    """Write a checkpoint of ``params`` (a Parameters) and ``optimizer`` to ``path``."""

    def write(f):
        f.attrs.update(
            format=FORMAT, epoch=epoch, step_in_epoch=step_in_epoch, global_step=global_step,
            world_size=world_size, seed=seed, flags=json.dumps(flags, sort_keys=True),
            rng=json.dumps(rng_state or {}), history=json.dumps(list(history)), dtype=str(params.dtype),
        )
        for name, var in params.named():
            f.create_dataset(f"params/{name}", data=var.value)
        opt = f.create_group("optimizer")
        state = optimizer.state_dict()
        opt.attrs["steps"] = int(state.get("steps", 0))
        opt.attrs["kind"] = type(getattr(optimizer, "optimizer", optimizer)).__name__
        for slot, arr in state.items():
            if slot != "steps":
                opt.create_dataset(slot, data=arr)

    atomic_h5(path, write)


def load(path, params, optimizer):
    """Restore ``params`` and ``optimizer`` from ``path``; return the root attributes as a dict."""
    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot open checkpoint ({e})") from None
    with f:
        if f.attrs.get("format") != FORMAT:
            raise CheckpointError(f"{path}: expected attribute format={FORMAT!r}, got {f.attrs.get('format')!r}")
        if "params" not in f:
            raise CheckpointError(f"{path}: missing group /params")
        stored = []
        f["params"].visititems(lambda name, obj: stored.append(name) if isinstance(obj, h5py.Dataset) else None)
        if len(stored) != len(params.variables):
            raise CheckpointError(f"{path}: expected {len(params.variables)} parameter arrays under /params, but received {len(stored)}")
        for name, var in params.named():
            key = f"params/{name}"
            if key not in f:
                raise CheckpointError(f"{path}: missing dataset /{key}")
            arr = f[key][()]
            if arr.shape != var.shape:
                raise CheckpointError(f"{path}: dataset /{key}: expected shape {var.shape}, got {arr.shape}")
            var.value = arr
        kind = type(getattr(optimizer, "optimizer", optimizer)).__name__
        if f["optimizer"].attrs.get("kind") != kind:
            raise CheckpointError(f"{path}: /optimizer was written by {f['optimizer'].attrs.get('kind')}, expected {kind}")
        state = {"steps": int(f["optimizer"].attrs["steps"])}
        for slot, ds in f["optimizer"].items():
            if ds.shape != params.values.shape:
                raise CheckpointError(f"{path}: dataset /optimizer/{slot}: expected shape {params.values.shape}, got {ds.shape}")
            state[slot] = ds[()].astype(params.dtype)
        optimizer.load_state_dict(state)
        attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
    attrs["flags"] = json.loads(attrs["flags"])
    attrs["rng"] = json.loads(attrs["rng"])
    attrs["history"] = json.loads(attrs.get("history", "[]"))
    return attrs
