"""BatchReader: each MPI rank reads only its own contiguous shard of every global batch.

The file is a paranet HDF5 file (paranet.data.format): features (N, *sample_shape) in
uint8, float32 or float64 and integer labels 0..C-1 per split, C in the num_classes attribute.

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
  shape (0, *sample_shape) and the rank must still join the step's collectives.
* ``batch_size < size`` is refused (DataError): then every step would leave ranks empty.

With ``shuffle=False`` (evaluation), batches follow file order from row 0 with no
rotation, and every row is seen once across the ranks.

Files: the reader opens the HDF5 file read-only in its constructor; create it after MPI
start-up and after any fork, in the process that uses it (a handle used in another
process raises DataError). It never imports mpi4py: the caller passes rank and size.
Labels are scanned once at open, in bounded pieces, for values outside 0..C-1; features
are only ever read a shard at a time (memory stays bounded for a file larger than RAM).
Each batch read is checked: labels in range, float features finite after normalisation.

A changed file: the reader records the file's identity (device, inode), size and
modification time at open. After every read it compares them with an fstat of the open
file, so a batch read from a file truncated (``: > f``, ``truncate -s``) or rewritten in
place (``cp other.h5 f``) is never returned: DataError instead. ``verify_unchanged()`` also
stats the path (a file replaced by rename or deleted) and its change time; the trainer calls
it before each checkpoint write and at each epoch end. ``identity()`` describes the content
(shapes, classes, statistics, the stored content sha256) for checkpoints.
"""
import numbers
import os
import queue
import threading
import time
from collections import namedtuple
from pathlib import Path

import h5py
import numpy as np

from .errors import DataError
from .format import (FEATURE_DTYPES, READABLE_VERSIONS, SPLITS, V1_NUM_CLASSES, V1_SAMPLE_SHAPE,
                     check_stats, hash_rows, parse_content_sha256, scale_shift)

Batch = namedtuple("Batch", ["x", "y", "n_local", "n_global"])
Batch.__doc__ = """One rank's part of one global batch.

x: (n_local, *sample_shape) normalised features; y: (n_local, num_classes) one-hot or
(n_local,) int64 labels; n_local: rows on this rank; n_global: rows in the global batch."""

_LABEL_SCAN_ROWS = 1 << 16  # labels checked at open in pieces of 64 Ki rows


def _check_int(value, name, low, file):
    """Raise DataError unless value is an int >= low."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise DataError(f"expected {name} to be an integer >= {low}, got {value!r}", file=file)


def _file_state(st):
    """(device, inode, size, mtime_ns, ctime_ns) of an os.stat_result."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _when(ns):
    """A nanosecond timestamp as local time, to the microsecond."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns // 10**9)) + f".{ns % 10**9 // 1000:06d}"


def _describe_change(before, after, ctime=True):
    """Say how a file's state changed between two _file_state tuples, or return None."""
    (dev0, ino0, size0, m0, c0), (dev, ino, size, m, c) = before, after
    if (dev, ino) != (dev0, ino0):
        return (f"expected the file opened at start (inode {ino0}), found another file at this path "
                f"(inode {ino}): it was replaced during the run")
    if size != size0:
        how = "truncated" if size < size0 else "extended"
        return f"expected {size0} bytes as at open, found {size}: the file was {how} during the run"
    if m != m0:
        return (f"expected the file unmodified since open (mtime {_when(m0)}), found it modified at "
                f"{_when(m)}: rewritten during the run")
    if ctime and c != c0:
        return (f"expected the file untouched since open (ctime {_when(c0)}), found its status changed at "
                f"{_when(c)}")
    return None


def identity_mismatch(recorded, current):
    """Compare two identity() dicts by content (not path or file size).

    Returns:
        None if they describe the same data, else a one-line description of the first
        difference, e.g. "num_classes 10 != 5".
    """
    keys = ("format_version", "num_classes", "sample_shape", "feature_dtype", "splits",
            "train_mean", "train_std", "content_sha256")
    for key in keys:
        a, b = recorded.get(key), current.get(key)
        if a != b:
            if key == "content_sha256" and isinstance(a, dict) and isinstance(b, dict):
                diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                return f"content_sha256 of {', '.join(diff)} differs"
            return f"{key} {a!r} != {b!r}"
    return None


class BatchReader:
    """This rank's shard of every global batch of one split of a paranet HDF5 file.

    Args:
        path: the HDF5 file (as written by write_dataset or a converter; format 1 or 2).
        split: "train", "val" or "test" (any group holding images and labels).
        rank: this process's rank, 0 <= rank < size.
        size: the number of ranks sharing each global batch.
        batch_size: rows in a global batch (summed over ranks); must be >= size.
        seed: with the epoch number, seeds the per-epoch shuffle.
        one_hot: y as (n, num_classes) one-hot in `dtype` if true, else (n,) int64 labels.
        dtype: float dtype of x (and of one-hot y): the training dtype.
        prefetch: read the next batch in a background thread while the caller computes.
        shuffle: reshuffle per epoch (default); False walks the split in file order.
        num_classes, sample_shape: what the caller expects (e.g. its model); a file that
            differs is refused. None accepts what the file holds.

    Attributes:
        num_samples: rows in the split.
        steps_per_epoch: ceil(num_samples / batch_size), the same on every rank.
        sample_shape: the shape of one sample (tuple); x is (n_local, *sample_shape).
        num_classes: C, from the file (10 for format 1).
        feature_dtype: the stored feature dtype (uint8, float32 or float64).
        mean, std: the training split's mean and std (uint8: on the [0, 1] scale; floats: raw).
        format_version: 1 or 2.
        rows_read, reads: rows read and hyperslab reads issued so far (counters).

    Raises:
        DataError: the file or a dataset is missing, of the wrong dtype, rank or shape,
            not contiguous, labels are outside 0..C-1 or differ in length from the
            features, normalisation attributes are absent or absurd, the file is truncated
            or corrupted, the split is empty, or batch_size < size. Later reads raise it
            for a file changed since open and for non-finite features.
    """

    def __init__(self, path, split, rank=0, size=1, batch_size=128, seed=0, one_hot=True,
                 dtype=np.float32, prefetch=True, shuffle=True, *, num_classes=None, sample_shape=None,
                 micro_shards=False):
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
        if np.dtype(dtype).kind != "f":
            raise DataError(f"expected a float dtype for x, got {np.dtype(dtype)}", file=self.path, rank=rank)
        self.rank, self.size, self.batch_size, self.seed = int(rank), int(size), int(batch_size), int(seed)
        self.one_hot, self.dtype = bool(one_hot), np.dtype(dtype)
        self.prefetch, self.shuffle = bool(prefetch), bool(shuffle)
        self.micro_shards = bool(micro_shards)  # whole micro-shards a rank (--reproducible): see shard()
        self._expect = {"num_classes": num_classes,
                        "sample_shape": None if sample_shape is None else tuple(int(d) for d in sample_shape)}
        self.rows_read = 0
        self.reads = 0
        self._file = None
        self._pid = os.getpid()
        self._open_and_validate()

    def _error(self, detail, dataset=None):
        """Return a DataError naming this reader's file, the dataset and the rank."""
        return DataError(detail, file=self.path, dataset=dataset, rank=self.rank)

    def _open_and_validate(self):
        """Open the file read-only; record its state; check attributes, datasets, dtypes, shapes and labels."""
        if not self.path.is_file():
            raise self._error("expected an HDF5 file, found no such file")
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as e:
            raise self._error(f"expected a readable HDF5 file, got {e}", dataset="/") from None
        try:
            self._fd = self._file.id.get_vfd_handle()  # the sec2 driver's file descriptor
            self._opened = _file_state(os.fstat(self._fd))
            self._validate()
        except BaseException:
            self.close()
            raise

    def _dataset(self, name, split=None):
        """Return the dataset /split/name, or raise DataError if it is missing."""
        p = f"/{split or self.split}/{name}"
        try:
            obj = self._file.get(p)
        except (OSError, KeyError, ValueError) as e:
            raise self._error(f"expected a readable dataset, got {e}", dataset=p) from None
        if not isinstance(obj, h5py.Dataset):
            raise self._error("expected a dataset, found " + ("none" if obj is None else type(obj).__name__),
                              dataset=p)
        return obj

    def _attrs(self):
        """Return the root attributes the format uses (None where absent)."""
        try:
            a = self._file.attrs
            return {k: a.get(k) for k in ("format_version", "num_classes", "train_mean", "train_std",
                                          "content_sha256")}
        except (OSError, TypeError, ValueError) as e:
            raise self._error(f"expected readable attributes, got {e}", dataset="/") from None

    def _validate(self):
        """Check the file against paranet's format (version 1 or 2; see paranet.data.format)."""
        ip, lp = f"/{self.split}/images", f"/{self.split}/labels"
        attrs = self._attrs()
        version = attrs["format_version"]
        if isinstance(version, (bool, np.bool_)) or not isinstance(version, numbers.Integral) \
                or int(version) not in READABLE_VERSIONS:
            raise self._error(f"expected attribute format_version in {READABLE_VERSIONS} (a complete "
                              f"paranet file), got {version!r}", dataset="/")
        self.format_version = int(version)
        if self.format_version == 1:
            num_classes = V1_NUM_CLASSES
        else:
            num_classes = attrs["num_classes"]
            if isinstance(num_classes, (bool, np.bool_)) or not isinstance(num_classes, numbers.Integral) \
                    or num_classes < 2:
                raise self._error(f"expected attribute num_classes, an integer >= 2, got {num_classes!r}",
                                  dataset="/")
            num_classes = int(num_classes)
        images, labels = self._dataset("images"), self._dataset("labels")
        if self.format_version == 1:
            if images.dtype != np.uint8:
                raise self._error(f"expected dtype uint8, got {images.dtype}", dataset=ip)
            if images.shape[1:] != V1_SAMPLE_SHAPE or images.ndim != 3:
                raise self._error(f"expected shape (N, 28, 28), got {images.shape}", dataset=ip)
            if labels.dtype != np.uint8:
                raise self._error(f"expected dtype uint8, got {labels.dtype}", dataset=lp)
        else:
            if images.dtype not in FEATURE_DTYPES:
                raise self._error(f"expected dtype uint8, float32 or float64, got {images.dtype}", dataset=ip)
            if images.ndim < 2:
                raise self._error(f"expected shape (N, ...) with at least one dimension per sample, "
                                  f"got {images.shape}", dataset=ip)
            if labels.dtype.kind not in "iu":
                raise self._error(f"expected an integer dtype, got {labels.dtype}", dataset=lp)
        if labels.ndim != 1:
            raise self._error(f"expected shape (N,), got {labels.shape}", dataset=lp)
        feature_dtype, sample_shape = np.dtype(images.dtype.name), tuple(images.shape[1:])
        if self.split != "train" and "train" in self._file:
            ref = self._dataset("images", "train")
            if (np.dtype(ref.dtype.name), tuple(ref.shape[1:])) != (feature_dtype, sample_shape):
                raise self._error(f"expected samples of shape {tuple(ref.shape[1:])} and dtype {ref.dtype} as "
                                  f"in /train/images, got {sample_shape} {images.dtype}", dataset=ip)
        try:
            self.mean, self.std = check_stats(attrs["train_mean"], attrs["train_std"], feature_dtype)
        except ValueError as e:
            raise self._error(str(e), dataset="/") from None
        n = images.shape[0]
        if labels.shape[0] != n:
            raise self._error(f"expected {n} labels (one per sample in {ip}), got {labels.shape[0]}", dataset=lp)
        if n == 0:
            raise self._error("expected a non-empty split, got 0 rows", dataset=ip)
        if 0 in sample_shape:
            raise self._error(f"expected every sample dimension > 0, got shape {images.shape}", dataset=ip)
        for d, p in ((images, ip), (labels, lp)):
            self._check_layout(d, p)
        want_c, want_shape = self._expect["num_classes"], self._expect["sample_shape"]
        if want_c is not None and int(want_c) != num_classes:
            raise self._error(f"expected {int(want_c)} classes (as the caller's model), got num_classes "
                              f"{num_classes} in the file", dataset="/")
        if want_shape is not None and want_shape != sample_shape:
            raise self._error(f"expected samples of shape {want_shape} (as the caller's model), got "
                              f"{sample_shape}", dataset=ip)
        self.num_classes, self.sample_shape, self.feature_dtype = num_classes, sample_shape, feature_dtype
        self._content, self._extents = None, {}
        if attrs["content_sha256"] is not None:
            try:
                self._content = parse_content_sha256(attrs["content_sha256"])
            except ValueError as e:
                raise self._error(str(e), dataset="/") from None
            for key in self._content:  # where each hashed dataset's bytes lie, for verify_content
                d = self._file.get(key)
                if isinstance(d, h5py.Dataset) and d.chunks is None and d.id.get_offset() is not None and d.shape:
                    self._extents[key] = (d.id.get_offset(), d.id.get_storage_size(), d.dtype, d.shape)
        for start in range(0, n, _LABEL_SCAN_ROWS):
            try:
                piece = labels[start:start + _LABEL_SCAN_ROWS]  # (<= 64 Ki,) integers
            except OSError as e:
                raise self._error(f"expected readable data, got {e}", dataset=lp) from None
            bad = self._bad_label(piece)
            if bad is not None:
                raise self._error(f"expected labels in 0..{num_classes - 1}, got {int(piece[bad])} "
                                  f"at row {start + bad}", dataset=lp)
        self._images, self._labels = images, labels
        self._split_rows = {s: int(self._file[f"{s}/images"].shape[0]) for s in SPLITS
                            if isinstance(self._file.get(f"{s}/images"), h5py.Dataset)}
        self.num_samples = n
        self.steps_per_epoch = -(-n // self.batch_size)
        self._scale, self._shift = scale_shift(self.mean, self.std, feature_dtype)  # x = raw * scale - shift

    def _check_layout(self, d, p):
        """Require contiguous storage lying wholly inside the file (one pread a read; no read past the end)."""
        if d.chunks is not None or d.external:
            how = f"chunks {d.chunks}" if d.chunks is not None else "external storage"
            raise self._error(f"expected a contiguous dataset (as write_dataset writes it), got {how}", dataset=p)
        offset = d.id.get_offset()
        if offset is None:
            raise self._error("expected data written to the file, got no storage allocated", dataset=p)
        end, size = offset + d.id.get_storage_size(), self._opened[2]
        if end > size:
            raise self._error(f"expected the file to hold this dataset's bytes up to {end}, got a file of "
                              f"{size} bytes (truncated)", dataset=p)

    def _bad_label(self, lab):
        """Index of the first label outside 0..C-1 in lab, or None."""
        if not len(lab):
            return None
        if (lab.dtype.kind == "i" and lab.min() < 0) or lab.max() >= self.num_classes:
            return int(np.argmax((lab < 0) | (lab >= self.num_classes)))
        return None

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
        """Return (begin, count) of this rank's slice of a global batch of n_global rows: the
        rows split as np.array_split splits them, or with ``micro_shards`` (--reproducible) a
        contiguous run of whole micro-shards (``paranet.reproducible.shard_range``)."""
        if self.micro_shards:
            from ..reproducible import micro_size, shard_range

            return shard_range(n_global, self.rank, self.size, micro_size(n_global))
        base, extra = divmod(n_global, self.size)
        return self.rank * base + min(self.rank, extra), base + (self.rank < extra)

    # -- reading --------------------------------------------------------------------------

    def _read_rows(self, first, count):
        """Read `count` consecutive rows from file row `first` (wrapping at N), as stored."""
        if os.getpid() != self._pid:
            raise self._error(f"expected the reader to be used in the process that opened it "
                              f"(pid {self._pid}), got pid {os.getpid()}: open it after fork")
        n = self.num_samples
        raws, labs, done = [], [], 0
        while done < count:                              # at most two runs (wrap at row N)
            a = (first + done) % n
            b = min(n, a + count - done)
            try:  # plain slices: one hyperslab each, never a fancy index
                raws.append(self._images[a:b])           # (b - a, *sample_shape)
                labs.append(self._labels[a:b])           # (b - a,)
            except (OSError, ValueError, TypeError) as e:  # a changed file is the likelier story: say so
                change = _describe_change(self._opened, _file_state(os.fstat(self._fd)), ctime=False)
                raise self._error(change or f"expected readable rows {a}..{b - 1}, got {e}",
                                  dataset=f"/{self.split}/images") from None
            self.reads += 1
            done += b - a
        # After the read, not before: whatever changed the file before or while we read has
        # changed its size or mtime by now, so no batch from a changed file is ever returned.
        # HDF5 returns zeros for a read past the end of a truncated file: caught here too.
        change = _describe_change(self._opened, _file_state(os.fstat(self._fd)), ctime=False)
        if change is not None:
            raise self._error(change, dataset=f"/{self.split}/images")
        if len(raws) == 1:
            raw, lab = raws[0], labs[0]
        elif raws:
            raw, lab = np.concatenate(raws), np.concatenate(labs)
        else:
            raw = np.empty((0, *self.sample_shape), self._images.dtype)
            lab = np.empty(0, self._labels.dtype)
        self.rows_read += count
        bad = self._bad_label(lab)
        if bad is not None:
            raise self._error(f"expected labels in 0..{self.num_classes - 1}, got {int(lab[bad])} at row "
                              f"{(first + bad) % n}", dataset=f"/{self.split}/labels")
        return raw, lab

    def _make_batch(self, raw, lab, n_global, first=0):
        """Normalise raw features and encode labels into a Batch; float features must stay finite."""
        with np.errstate(over="ignore", invalid="ignore"):
            x = raw.astype(self.dtype)                   # x: (n_local, *sample_shape)
            x *= self.dtype.type(self._scale)
            x -= self.dtype.type(self._shift)
        if self.feature_dtype.kind == "f" and len(x):
            finite = np.isfinite(x).reshape(len(x), -1).all(axis=1)
            if not finite.all():
                i = int(np.argmin(finite))
                v = raw[i].reshape(-1)[np.argmin(np.isfinite(x[i]).reshape(-1))]
                what = f"{v}" if not np.isfinite(v) else \
                    f"{v}, not finite once normalised by train_mean {self.mean:g} and train_std {self.std:g}"
                raise self._error(f"expected finite features, got {what} at row {(first + i) % self.num_samples}",
                                  dataset=f"/{self.split}/images")
        if self.one_hot:
            y = np.zeros((len(lab), self.num_classes), self.dtype)  # y: (n_local, num_classes)
            y[np.arange(len(lab)), lab] = 1
        else:
            y = lab.astype(np.int64)                     # y: (n_local,)
        return Batch(x, y, len(lab), int(n_global))

    # -- the file under a running job ------------------------------------------------------

    def verify_unchanged(self):
        """Raise DataError (naming the file) if the file changed since this reader opened it.

        Compares the path's device, inode, size, mtime and ctime, and the open handle's size
        and mtime, with those recorded at open: two stat calls, a few microseconds. A change
        of the ctime alone (chmod, a new hard link, or ``cp -p`` preserving the mtime) is
        settled by the content sha256 recorded at open, when the file has one: a full read
        of every dataset, then accepted if the bytes are the same.
        """
        try:
            st = os.stat(self.path)
        except OSError as e:
            raise self._error(f"expected the file opened at start to stay in place, found "
                              f"{e.strerror.lower() if e.strerror else e}: deleted or moved during the run") from None
        now = _file_state(st)
        change = _describe_change(self._opened, now, ctime=False)
        if change is None and self._file is not None:
            change = _describe_change(self._opened, _file_state(os.fstat(self._fd)), ctime=False)
        if change is None and now[4] != self._opened[4]:
            change = _describe_change(self._opened, now)
            if self._content is not None and self.verify_content(raise_error=False):
                self._opened, change = now, None
        if change is not None:
            raise self._error(change)

    def verify_content(self, raise_error=True):
        """Hash every dataset listed in the content sha256 recorded at open and compare (a full read).

        The bytes are read with os.pread from a descriptor of its own, not through HDF5: in
        this process HDF5 shares one handle (and its cache of raw data) between every open of
        the same file, so it could hand back what it read before the file changed.

        Returns:
            True if all match (or the file has none recorded: format 1); False on a mismatch
            when raise_error is false.

        Raises:
            DataError: a dataset's sha256 differs (raise_error true).
        """
        if self._content is None:
            return True
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            if raise_error:
                raise self._error(f"expected a readable file, got {e.strerror or e}") from None
            return False
        try:
            for key, want in sorted(self._content.items()):
                got = self._hash_extent(fd, key)
                if got != want:
                    if raise_error:
                        raise self._error(f"expected content sha256 {want[:16]}... as recorded, got "
                                          f"{'no readable data' if got is None else got[:16] + '...'}",
                                          dataset="/" + key)
                    return False
        finally:
            os.close(fd)
        return True

    def _hash_extent(self, fd, key):
        """sha256 of a contiguous dataset's bytes read straight from fd, or None if absent or short."""
        if key not in self._extents:
            return None
        offset, nbytes, dtype, shape = self._extents[key]
        row_bytes = nbytes // shape[0]

        def read(a, b):  # rows a..b-1
            data = os.pread(fd, (b - a) * row_bytes, offset + a * row_bytes)
            if len(data) != (b - a) * row_bytes:
                raise EOFError
            return np.frombuffer(data, dtype).reshape((b - a, *shape[1:]))

        try:
            return hash_rows(read, shape[0], row_bytes)
        except (EOFError, OSError):
            return None

    def identity(self):
        """What the data is, for a checkpoint to record: compare two with identity_mismatch().

        Returns:
            dict: path (resolved), size (bytes at open), format_version, num_classes,
            sample_shape (list), feature_dtype (str), splits ({name: rows}), train_mean,
            train_std, content_sha256 ({dataset: hex}, or None for a format 1 file).
            JSON-serialisable; metadata only, no data is read.
        """
        return {"path": str(self.path.resolve()), "size": int(self._opened[2]),
                "format_version": self.format_version, "num_classes": self.num_classes,
                "sample_shape": list(self.sample_shape), "feature_dtype": str(self.feature_dtype),
                "splits": dict(self._split_rows), "train_mean": self.mean, "train_std": self.std,
                "content_sha256": None if self._content is None else dict(sorted(self._content.items()))}

    def _batches(self, epoch, start_step):
        """Yield this rank's Batch for steps start_step.. of epoch, reading as it goes."""
        offset, starts, lengths = self.global_batches(epoch)
        for start, n_global in zip(starts[start_step:], lengths[start_step:]):
            begin, count = self.shard(int(n_global))
            first = offset + int(start) + begin
            if self._staged is not None:
                yield self._staged_rows(first, count, n_global)
                continue
            raw, lab = self._read_rows(first, count)
            yield self._make_batch(raw, lab, n_global, first)

    # -- staged in memory -------------------------------------------------------------------

    _staged = None  # (x, y) of the whole split, normalised, when stage() was called

    def staged_bytes(self):
        """Bytes this split takes in memory once staged: x in the training dtype, y as read."""
        row = int(np.prod(self.sample_shape, dtype=np.int64)) * self.dtype.itemsize
        label = self.num_classes * self.dtype.itemsize if self.one_hot else 8
        return self.num_samples * (row + label)

    def stage(self, shared_array=None):
        """Hold the whole split in memory, already normalised in the training dtype (and labels
        one-hot), so that a step's read is a view; the file is read once, in bounded pieces,
        with the same checks and the same arithmetic as a step's read (the batches are
        bit-identical). ``shared_array(shape, dtype, fill)`` (``World.shared_array``) makes
        the copy once per machine, shared by its ranks; by default it is this process's own.
        """
        if shared_array is None:
            def shared_array(shape, dtype, fill):
                arr = np.empty(shape, dtype)
                fill(arr)
                arr.flags.writeable = False
                return arr
        n = self.num_samples
        piece = max(1, (16 << 20) // (int(np.prod(self.sample_shape, dtype=np.int64)) * self.dtype.itemsize))  # 16 MiB
        ys = {}

        def fill_x(x):
            for a in range(0, n, piece):
                b = min(n, a + piece)
                raw, lab = self._read_rows(a, b - a)
                batch = self._make_batch(raw, lab, b - a, a)
                x[a:b] = batch.x
                ys[a] = batch.y

        def fill_y(y):  # on the rank that filled x (shared_array's filler), from the same reads
            for a, part in ys.items():
                y[a:a + len(part)] = part

        x = shared_array((n, *self.sample_shape), self.dtype, fill_x)
        y_shape = (n, self.num_classes) if self.one_hot else (n,)
        y = shared_array(y_shape, self.dtype if self.one_hot else np.int64, fill_y)
        ys.clear()
        self._staged = (x, y)
        return self

    def _staged_rows(self, first, count, n_global):
        """This rank's rows first.. (wrapping at N) of the staged split: views, or one copy at the wrap."""
        x, y = self._staged
        n = self.num_samples
        a = first % n
        if a + count <= n:
            xs, ys = x[a:a + count], y[a:a + count]
        else:
            xs = np.concatenate([x[a:], x[:a + count - n]])
            ys = np.concatenate([y[a:], y[:a + count - n]])
        self.rows_read += count
        return Batch(xs, ys, count, int(n_global))

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
