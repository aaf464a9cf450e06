"""Tests of BatchReader: P-invariance, per-epoch shuffles, own-rows-only reads, uneven sizes, prefetch."""
import threading

import h5py
import numpy as np
import pytest

from paranet.data import Batch, BatchReader, DataError
from paranet.data import write_dataset


def synthetic(path, n, seed=0):
    """A valid file whose /train row i has pixel [0, 0] = i % 251 and [0, 1] = i // 251 (row ids)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28), np.uint8)
    images[:, 0, 0], images[:, 0, 1] = np.arange(n) % 251, np.arange(n) // 251
    labels = rng.integers(0, 10, n, np.uint8)
    write_dataset(path, train=(images, labels), val=(images[:2], labels[:2]), test=(images[:2], labels[:2]),
                  num_classes=10)
    return path, images, labels


def row_ids(reader, x):
    """Recover the file rows of a batch from the id pixels."""
    raw = np.rint((x[:, 0, :2].astype(np.float64) * reader.std + reader.mean) * 255).astype(int)
    return raw[:, 0] + 251 * raw[:, 1]


def read_all(path, split, size, epoch, **kw):
    """Return [[Batch per step] per rank] for one epoch read by `size` ranks."""
    out = []
    for rank in range(size):
        with BatchReader(path, split, rank=rank, size=size, **kw) as r:
            out.append(list(r.epoch(epoch)))
    return out


def gathered(per_rank, step):
    """Concatenate ranks 0..P-1's shards of one step, as a P=1 Batch would hold them."""
    parts = [steps[step] for steps in per_rank]
    return (np.concatenate([b.x for b in parts]), np.concatenate([b.y for b in parts]),
            sum(b.n_local for b in parts), {b.n_global for b in parts})


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_p_ranks_see_exactly_the_single_process_batches_on_mnist(mnist_h5, size):
    for epoch in (0, 3):
        single = read_all(mnist_h5, "train", 1, epoch, batch_size=128, seed=5, prefetch=True)[0]
        ranks = read_all(mnist_h5, "train", size, epoch, batch_size=128, seed=5, prefetch=False)
        assert [len(s) for s in ranks] == [len(single)] * size == [430] * size
        for step, ref in enumerate(single):
            x, y, n, n_global = gathered(ranks, step)
            assert np.array_equal(x, ref.x) and np.array_equal(y, ref.y), (epoch, step)
            assert n == ref.n_local == ref.n_global and n_global == {ref.n_global}


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_uneven_sizes_every_rank_takes_every_step(tmp_path, size):
    path, _, _ = synthetic(tmp_path / "s.h5", 103)
    single = read_all(path, "train", 1, 2, batch_size=10, seed=1)[0]
    ranks = read_all(path, "train", size, 2, batch_size=10, seed=1)
    assert [len(s) for s in ranks] == [11] * size  # ceil(103 / 10) on every rank
    for step, ref in enumerate(single):
        x, _, n, n_global = gathered(ranks, step)
        assert np.array_equal(x, ref.x)
        assert n_global == {ref.n_global} and n == ref.n_global == (3 if step == 10 else 10)
        sizes = [steps[step].n_local for steps in ranks]
        assert sizes == [len(a) for a in np.array_split(np.arange(ref.n_global), size)]
    if size == 4:  # the short last batch of 3 rows leaves rank 3 empty, with well-formed arrays
        last = ranks[3][-1]
        assert last.n_local == 0 and last.x.shape == (0, 28, 28) and last.y.shape == (0, 10)


def test_every_row_once_per_epoch_and_epochs_reshuffle(tmp_path):
    path, _, _ = synthetic(tmp_path / "s.h5", 1000)
    with BatchReader(path, "train", batch_size=64, seed=11) as r:
        ids = {e: [row_ids(r, b.x) for b in r.epoch(e)] for e in (0, 1)}
    for e in (0, 1):
        assert np.array_equal(np.sort(np.concatenate(ids[e])), np.arange(1000))
    assert not np.array_equal(np.concatenate(ids[0]), np.concatenate(ids[1]))  # new order
    sets0 = {frozenset(b) for b in ids[0]}
    assert len(sets0 & {frozenset(b) for b in ids[1]}) < len(sets0) // 2  # mostly new batches
    with BatchReader(path, "train", batch_size=64, seed=11) as r2, \
            BatchReader(path, "train", batch_size=64, seed=12) as r3:
        again = np.concatenate([row_ids(r2, b.x) for b in r2.epoch(1)])
        other = np.concatenate([row_ids(r3, b.x) for b in r3.epoch(1)])
    assert np.array_equal(again, np.concatenate(ids[1]))  # (seed, epoch) reproduces it
    assert not np.array_equal(other, again)


def test_each_rank_reads_only_its_own_rows(mnist_h5):
    total, seen = 0, []
    for rank in range(4):
        with BatchReader(mnist_h5, "train", rank=rank, size=4, batch_size=128, prefetch=False) as r:
            n_local = sum(b.n_local for b in r.epoch(0))
            assert r.rows_read == n_local <= -(-55000 // 4) + r.steps_per_epoch
            assert r.reads <= r.steps_per_epoch + 1  # one hyperslab a step, two at the wrap
            total += r.rows_read
            seen.append(n_local)
    assert total == 55000 and max(seen) - min(seen) <= 430


def test_reads_are_contiguous_slices_never_fancy_indexing(tmp_path):
    path, _, _ = synthetic(tmp_path / "s.h5", 500)
    r = BatchReader(path, "train", rank=1, size=3, batch_size=30, prefetch=False)
    keys = []

    class Spy:
        def __init__(self, d):
            self.d = d

        def __getitem__(self, key):
            keys.append(key)
            return self.d[key]

    r._images, r._labels = Spy(r._images), Spy(r._labels)
    batches = list(r.epoch(0))
    assert keys and all(isinstance(k, slice) and k.step is None for k in keys)
    assert sum(k.stop - k.start for k in keys) == 2 * sum(b.n_local for b in batches)
    r.close()


def test_start_step_skips_without_reading(tmp_path):
    path, _, _ = synthetic(tmp_path / "s.h5", 250)
    with BatchReader(path, "train", rank=0, size=2, batch_size=20, prefetch=False) as r:
        full = list(r.epoch(4))
        r.rows_read = 0
        resumed = list(r.epoch(4, start_step=9))
        assert len(resumed) == len(full) - 9 == 4
        assert r.rows_read == sum(b.n_local for b in full[9:])
        for a, b in zip(full[9:], resumed):
            assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y)
        assert list(r.epoch(4, start_step=13)) == []
        with pytest.raises(DataError, match="start_step <= steps_per_epoch = 13, got 14"):
            r.epoch(4, start_step=14)


def test_unshuffled_split_in_file_order_across_ranks(mnist_h5):
    with h5py.File(mnist_h5, "r") as f:
        labels = f["test/labels"][:].astype(np.int64)
        first = f["test/images"][:100]
    ranks = read_all(mnist_h5, "test", 3, 0, batch_size=100, shuffle=False, one_hot=False)
    y = np.concatenate([gathered(ranks, s)[1] for s in range(len(ranks[0]))])
    assert np.array_equal(y, labels)  # every test sample once, in file order
    x0 = gathered(ranks, 0)[0]
    with BatchReader(mnist_h5, "test") as r:
        expect = ((first / 255.0 - r.mean) / r.std).astype(np.float32)
    assert np.allclose(x0, expect, atol=1e-5)


def test_normalisation_and_label_encodings(mnist_h5):
    with BatchReader(mnist_h5, "train", batch_size=1000, one_hot=True) as r:
        xs, ys = zip(*[(b.x, b.y) for b in r.epoch(0)])
        assert isinstance(r.epoch(0).__next__(), Batch)
    x, y = np.concatenate(xs), np.concatenate(ys)
    assert x.dtype == np.float32 and y.dtype == np.float32 and y.shape == (55000, 10)
    assert abs(x.mean()) < 1e-3 and abs(x.std() - 1) < 1e-3  # the file's train mean/std applied
    assert np.array_equal(y.sum(axis=1), np.ones(55000)) and set(np.unique(y)) == {0.0, 1.0}
    assert np.bincount(y.argmax(axis=1), minlength=10).sum() == 55000
    with BatchReader(mnist_h5, "val", batch_size=500, one_hot=False, dtype=np.float64, shuffle=False) as r:
        b = next(iter(r.epoch(0)))
        with h5py.File(mnist_h5, "r") as f:
            assert np.array_equal(b.y, f["val/labels"][:500]) and b.y.dtype == np.int64
        assert b.x.dtype == np.float64 and b.x.shape == (500, 28, 28)


def test_prefetch_matches_and_propagates_errors(tmp_path):
    path, _, _ = synthetic(tmp_path / "s.h5", 300)
    with BatchReader(path, "train", batch_size=16, prefetch=False) as a, \
            BatchReader(path, "train", batch_size=16, prefetch=True) as b:
        for ba, bb in zip(a.epoch(1), b.epoch(1), strict=True):
            assert np.array_equal(ba.x, bb.x) and ba.n_local == bb.n_local
        threads = threading.active_count()
        it = b.epoch(2)
        next(it)
        it.close()  # leaving early stops the background thread
        assert threading.active_count() == threads
        real, calls = b._read_rows, []

        def failing(first, count):
            calls.append(first)
            if len(calls) == 3:
                raise DataError("expected readable rows, got a test failure", file=path, rank=0)
            return real(first, count)

        b._read_rows = failing
        got = []
        with pytest.raises(DataError, match="s.h5 \\(rank 0\\): expected readable rows, got a test failure"):
            for batch in b.epoch(0):
                got.append(batch)
        assert len(got) == 2


def test_reader_refuses_use_in_another_process(tmp_path):
    path, _, _ = synthetic(tmp_path / "s.h5", 50)
    r = BatchReader(path, "train", batch_size=10, prefetch=False)
    r._pid = -1  # as after a fork: the handle belongs to the parent
    with pytest.raises(DataError, match="open it after fork"):
        next(iter(r.epoch(0)))
    r.close()
    with pytest.raises(DataError, match="closed"):
        r.epoch(0)


def test_data_layer_never_imports_mpi4py():
    import os
    import subprocess
    import sys
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    code = ("import sys, paranet.data, paranet.data.__main__\n"
            "assert 'mpi4py' not in sys.modules, sorted(m for m in sys.modules if 'mpi' in m)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
