"""BatchReader: each MPI rank reads only its own contiguous shard of every global batch.

How an epoch is cut (the same for every number of ranks P):

* The file's training split is stored in a seeded shuffled order, so any run of
  consecutive rows is already a random mix of digits.
* Epoch ``e`` draws, from ``numpy.random.default_rng([seed, e])``, a random rotation
  ``offset`` of the N rows and a random order of the global batches: global batch ``b``
  is the ``batch_size`` consecutive rows starting at file row ``offset + b * batch_size``
  (modulo N). Batch composition therefore changes from epoch to epoch (the boundaries
  move) and the batch order is reshuffled, while every batch stays one contiguous run of
  the file (two runs where it wraps past the last row).
* Rank r of P takes a contiguous slice of each global batch, ``numpy.array_split`` style:
  shard sizes differ by at most one, lower ranks get the extra rows. Concatenating the
  shards of ranks 0..P-1 gives exactly the batch one process would read, row for row.
  So each rank issues one hyperslab read per step (two at the wrap) through h5py slicing,
  never a fancy index, and never reads another rank's rows.

Uneven sizes, and what happens to the remainder:

* Nothing is dropped: every row is read exactly once per epoch. ``steps_per_epoch`` is
  ``ceil(N / batch_size)`` on every rank, so no rank leaves a collective early.
* When N is not a multiple of ``batch_size``, the remainder ``N % batch_size`` rows form
  one short global batch, always the last step of the epoch. Because the rotation moves
  every epoch, it is a different set of rows each epoch.
* Each ``Batch`` carries ``n_local`` (this rank's true row count) and ``n_global`` (the
  rows in this global batch over all ranks), so a loss averaged as
  ``allreduce(n_local * local_mean) / n_global`` is the exact global mean. On a short
  last batch with fewer rows than ranks, the highest ranks get ``n_local == 0``: x has
  shape (0, 28, 28) and the rank must still join the step's collectives.
* ``batch_size < size`` is refused (DataError): then every step would leave ranks empty.

With ``shuffle=False`` (evaluation), batches follow file order from row 0 with no
rotation, and every row is seen once across the ranks.

Files: the reader opens the HDF5 file read-only in its constructor; create it after MPI
start-up and after any fork, in the process that uses it (a handle used in another
process raises DataError). It never imports mpi4py: the caller passes rank and size.
Labels (1 byte a row) are scanned once at open, in bounded pieces, for values outside
0..9; images are only ever read a shard at a time.
"""
import os
import queue
import threading
from collections import namedtuple
from pathlib import Path

import h5py
import numpy as np

from .errors import DataError
from .prepare import FORMAT_VERSION

Batch = namedtuple("Batch", ["x", "y", "n_local", "n_global"])
Batch.__doc__ = """One rank's part of one global batch.

x: (n_local, 28, 28) normalised images; y: (n_local, 10) one-hot or (n_local,) int64 labels;
n_local: rows on this rank; n_global: rows in the global batch over all ranks."""

NUM_CLASSES = 10
_LABEL_SCAN_ROWS = 1 << 16  # labels checked at open in pieces of 64 KiB


def _check_int(value, name, low, file):
    """Raise DataError unless value is an int >= low."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise DataError(f"expected {name} to be an integer >= {low}, got {value!r}", file=file)


class BatchReader:
    """This rank's shard of every global batch of one split of a paranet HDF5 file.

    Args:
        path: the HDF5 file (as written by prepare_mnist).
        split: "train", "val" or "test" (any group holding images and labels).
        rank: this process's rank, 0 <= rank < size.
        size: the number of ranks sharing each global batch.
        batch_size: rows in a global batch (summed over ranks); must be >= size.
        seed: with the epoch number, seeds the per-epoch shuffle.
        one_hot: y as (n, 10) one-hot in `dtype` if true, else (n,) int64 labels.
        dtype: float dtype of x (and of one-hot y).
        prefetch: read the next batch in a background thread while the caller computes.
        shuffle: reshuffle per epoch (default); False walks the split in file order.

    Attributes:
        num_samples: rows in the split.
        steps_per_epoch: ceil(num_samples / batch_size), the same on every rank.
        mean, std: the training split's pixel mean and std on the [0, 1] scale.
        rows_read, reads: image rows read and hyperslab reads issued so far (counters).

    Raises:
        DataError: the file or a dataset is missing, of the wrong dtype or shape, labels
            are outside 0..9 or differ in length from images, the file is truncated or
            corrupted, the split is empty, or batch_size < size.
    """

    def __init__(self, path, split, rank=0, size=1, batch_size=128, seed=0, one_hot=True,
                 dtype=np.float32, prefetch=True, shuffle=True):
        self.path = Path(path)
        self.split = split
        _check_int(size, "size", 1, self.path)
        _check_int(rank, "rank", 0, self.path)
        _check_int(batch_size, "batch_size", 1, self.path)
        _check_int(seed, "seed", 0, self.path)
        if rank >= size:
            raise DataError(f"expected rank < size = {size}, got rank {rank}", file=self.path, rank=rank)
        if batch_size < size:
            raise DataError(f"expected batch_size >= size (at least one sample per rank), "
                            f"got batch_size {batch_size} < size {size}", file=self.path, rank=rank)
        self.rank, self.size, self.batch_size, self.seed = int(rank), int(size), int(batch_size), int(seed)
        self.one_hot, self.dtype = bool(one_hot), np.dtype(dtype)
        self.prefetch, self.shuffle = bool(prefetch), bool(shuffle)
        self.rows_read = 0
        self.reads = 0
        self._file = None
        self._pid = os.getpid()
        self._open_and_validate()

    def _error(self, detail, dataset=None):
        """Return a DataError naming this reader's file, the dataset and the rank."""
        return DataError(detail, file=self.path, dataset=dataset, rank=self.rank)

    def _open_and_validate(self):
        """Open the file read-only; check attributes, datasets, dtypes, shapes and labels."""
        if not self.path.is_file():
            raise self._error("expected an HDF5 file, found no such file")
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as e:
            raise self._error(f"expected a readable HDF5 file, got {e}", dataset="/") from None
        try:
            self._validate()
        except BaseException:
            self.close()
            raise

    def _dataset(self, name):
        """Return the dataset /split/name, or raise DataError if it is missing."""
        p = f"/{self.split}/{name}"
        try:
            obj = self._file.get(p)
        except (OSError, KeyError, ValueError) as e:
            raise self._error(f"expected a readable dataset, got {e}", dataset=p) from None
        if not isinstance(obj, h5py.Dataset):
            raise self._error("expected a dataset, found " + ("none" if obj is None else type(obj).__name__),
                              dataset=p)
        return obj

    def _validate(self):
        """Check the file against paranet's layout (FORMAT_VERSION 1)."""
        f, ip, lp = self._file, f"/{self.split}/images", f"/{self.split}/labels"
        try:
            version = f.attrs.get("format_version")
            mean, std = f.attrs.get("train_mean"), f.attrs.get("train_std")
        except OSError as e:
            raise self._error(f"expected readable attributes, got {e}", dataset="/") from None
        if version is None or int(version) != FORMAT_VERSION:
            raise self._error(f"expected attribute format_version = {FORMAT_VERSION} (a complete "
                              f"paranet file), got {version!r}", dataset="/")
        if mean is None or std is None or not np.isfinite(std) or float(std) <= 0:
            raise self._error(f"expected attributes train_mean and train_std > 0, got {mean!r} and {std!r}",
                              dataset="/")
        self.mean, self.std = float(mean), float(std)
        images, labels = self._dataset("images"), self._dataset("labels")
        if images.dtype != np.uint8:
            raise self._error(f"expected dtype uint8, got {images.dtype}", dataset=ip)
        if images.ndim != 3 or images.shape[1:] != (28, 28):
            raise self._error(f"expected shape (N, 28, 28), got {images.shape}", dataset=ip)
        if labels.dtype != np.uint8:
            raise self._error(f"expected dtype uint8, got {labels.dtype}", dataset=lp)
        if labels.ndim != 1:
            raise self._error(f"expected shape (N,), got {labels.shape}", dataset=lp)
        n = images.shape[0]
        if labels.shape[0] != n:
            raise self._error(f"expected {n} labels (one per image in {ip}), got {labels.shape[0]}", dataset=lp)
        if n == 0:
            raise self._error("expected a non-empty split, got 0 rows", dataset=ip)
        for start in range(0, n, _LABEL_SCAN_ROWS):
            try:
                piece = labels[start:start + _LABEL_SCAN_ROWS]  # (<= 64 Ki,) uint8
            except OSError as e:
                raise self._error(f"expected readable data, got {e}", dataset=lp) from None
            if piece.max() >= NUM_CLASSES:
                bad = int(np.argmax(piece >= NUM_CLASSES))
                raise self._error(f"expected labels in 0..{NUM_CLASSES - 1}, got {int(piece[bad])} "
                                  f"at row {start + bad}", dataset=lp)
        self._images, self._labels = images, labels
        self.num_samples = n
        self.steps_per_epoch = -(-n // self.batch_size)
        # x = (raw / 255 - mean) / std = raw * scale - shift
        self._scale = 1.0 / (255.0 * self.std)
        self._shift = self.mean / self.std

    # -- the plan: which rows make up each global batch ------------------------------------

    def global_batches(self, epoch):
        """Return (offset, starts, lengths): global batch k covers rows offset+starts[k] ... (mod N)."""
        _check_int(epoch, "epoch", 0, self.path)
        n, g = self.num_samples, self.batch_size
        n_full, rem = divmod(n, g)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, int(epoch)])
            offset = int(rng.integers(n))
            starts = rng.permutation(n_full) * g
        else:
            offset, starts = 0, np.arange(n_full) * g
        lengths = np.full(n_full, g)
        if rem:  # the short batch is always the last step
            starts, lengths = np.append(starts, n_full * g), np.append(lengths, rem)
        return offset, starts, lengths

    def shard(self, n_global):
        """Return (begin, count) of this rank's slice of a global batch of n_global rows."""
        base, extra = divmod(n_global, self.size)
        return self.rank * base + min(self.rank, extra), base + (self.rank < extra)

    # -- reading --------------------------------------------------------------------------

    def _read_rows(self, first, count):
        """Read `count` consecutive rows from file row `first` (wrapping at N), as uint8 arrays."""
        if os.getpid() != self._pid:
            raise self._error(f"expected the reader to be used in the process that opened it "
                              f"(pid {self._pid}), got pid {os.getpid()}: open it after fork")
        n = self.num_samples
        raws, labs, done = [], [], 0
        while done < count:                              # at most two runs (wrap at row N)
            a = (first + done) % n
            b = min(n, a + count - done)
            try:  # plain slices: one hyperslab each, never a fancy index
                raws.append(self._images[a:b])           # (b - a, 28, 28) uint8
                labs.append(self._labels[a:b])           # (b - a,) uint8
            except (OSError, ValueError, TypeError) as e:
                raise self._error(f"expected readable rows {a}..{b - 1}, got {e}",
                                  dataset=f"/{self.split}/images") from None
            self.reads += 1
            done += b - a
        if len(raws) == 1:
            raw, lab = raws[0], labs[0]
        elif raws:
            raw, lab = np.concatenate(raws), np.concatenate(labs)
        else:
            raw, lab = np.empty((0, 28, 28), np.uint8), np.empty(0, np.uint8)
        self.rows_read += count
        if count and lab.max() >= NUM_CLASSES:  # the file changed since it was validated
            raise self._error(f"expected labels in 0..9, got {int(lab.max())}", dataset=f"/{self.split}/labels")
        return raw, lab

    def _make_batch(self, raw, lab, n_global):
        """Normalise raw uint8 images and encode labels into a Batch."""
        x = raw.astype(self.dtype)                       # x: (n_local, 28, 28)
        x *= self.dtype.type(self._scale)
        x -= self.dtype.type(self._shift)
        if self.one_hot:
            y = np.zeros((len(lab), NUM_CLASSES), self.dtype)  # y: (n_local, 10)
            y[np.arange(len(lab)), lab] = 1
        else:
            y = lab.astype(np.int64)                     # y: (n_local,)
        return Batch(x, y, len(lab), int(n_global))

    def _batches(self, epoch, start_step):
        """Yield this rank's Batch for steps start_step.. of epoch, reading as it goes."""
        offset, starts, lengths = self.global_batches(epoch)
        for start, n_global in zip(starts[start_step:], lengths[start_step:]):
            begin, count = self.shard(int(n_global))
            raw, lab = self._read_rows(offset + int(start) + begin, count)
            yield self._make_batch(raw, lab, n_global)

    def epoch(self, epoch, start_step=0):
        """Iterate this rank's batches of one epoch.

        Args:
            epoch: the epoch number (>= 0); with the seed it fixes the shuffle.
            start_step: skip the first steps without reading them (resuming a run).

        Returns:
            An iterator of Batch(x, y, n_local, n_global), steps_per_epoch - start_step long.
        """
        _check_int(epoch, "epoch", 0, self.path)
        _check_int(start_step, "start_step", 0, self.path)
        if start_step > self.steps_per_epoch:
            raise self._error(f"expected start_step <= steps_per_epoch = {self.steps_per_epoch}, "
                              f"got {start_step}")
        if self._file is None:
            raise self._error("expected an open reader, got a closed one")
        batches = self._batches(epoch, start_step)
        return _prefetched(batches) if self.prefetch else batches

    def __len__(self):
        return self.steps_per_epoch

    def close(self):
        """Close the HDF5 file (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            if self._file is not None and os.getpid() == self._pid:
                self.close()
        except Exception:
            pass

    def __repr__(self):
        return (f"BatchReader({str(self.path)!r}, {self.split!r}, rank={self.rank}, size={self.size}, "
                f"batch_size={self.batch_size}, num_samples={getattr(self, 'num_samples', '?')})")


class _Failure:
    """An exception raised in the prefetch thread, carried to the consumer."""

    def __init__(self, exc):
        self.exc = exc


_DONE = object()


def _prefetched(items, depth=2):
    """Yield from the iterator `items`, which a background thread runs up to `depth` ahead."""
    q = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item):
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def work():
        try:
            for item in items:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as e:  # carried to the consumer, raised there
            put(_Failure(e))

    thread = threading.Thread(target=work, name="paranet-data-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item
    finally:
        stop.set()
        thread.join()
