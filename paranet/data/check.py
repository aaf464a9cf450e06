"""check_file: validate a whole paranet HDF5 file (every row, the statistics, the content sha256) and summarise it."""
import math

import numpy as np

from .errors import DataError
from .format import SPLITS, Stats, piece_rows
from .reader import BatchReader


def _scan(reader, stats):
    """Read a split piece by piece: class counts, finite float features, training statistics."""
    images, labels, where = reader._images, reader._labels, f"/{reader.split}/images"
    n, counts = reader.num_samples, np.zeros(reader.num_classes, np.int64)
    step = piece_rows(images.dtype.itemsize * int(np.prod(reader.sample_shape)))
    for a in range(0, n, step):
        b = min(n, a + step)
        try:
            x, y = images[a:b], labels[a:b]
        except OSError as e:
            raise reader._error(f"expected readable rows {a}..{b - 1}, got {e}", dataset=where) from None
        bad = reader._bad_label(y)
        if bad is not None:
            raise reader._error(f"expected labels in 0..{reader.num_classes - 1}, got {int(y[bad])} at row {a + bad}",
                                dataset=f"/{reader.split}/labels")
        counts += np.bincount(y.astype(np.int64), minlength=reader.num_classes)
        if x.dtype.kind == "f":
            ok = np.isfinite(x).reshape(b - a, -1).all(axis=1)
            if not ok.all():
                row = int(np.argmin(ok))
                flat = x[row].reshape(-1)
                raise reader._error(f"expected finite features, got {flat[np.argmin(np.isfinite(flat))]} at row "
                                    f"{a + row}", dataset=where)
        if stats is not None:
            stats.add(x)
    reader.verify_unchanged()
    return counts


def _present_splits(path):
    """(["train", and val/test if the file has them], [the optional splits it lacks])."""
    import h5py
    try:
        with h5py.File(path, "r") as f:
            have = [s for s in SPLITS[1:] if s in f]
    except (OSError, ValueError):
        have = []  # the reader says what is wrong with the file
    return ["train", *have], [s for s in SPLITS[1:] if s not in have]


def _counts_text(counts):
    """Per-class counts: all of them for up to 20 classes, else the range."""
    if len(counts) <= 20:
        return " ".join(str(int(c)) for c in counts)
    return f"min {int(counts.min())}, max {int(counts.max())}, {int((counts == 0).sum())} classes empty"


def check_file(path, splits=None, content=True):
    """Validate every split of a paranet file in full and return its summary as lines of text.

    Beyond what BatchReader checks at open (format, attributes, dtypes, shapes, layout,
    label range), this reads every row: float features must be finite, the stored
    train_mean/train_std must equal those recomputed from /train (relative 1e-6), and each
    dataset must match the content sha256 recorded at conversion (format 2).

    Args:
        path: the file.
        splits: the splits to check; default /train and whichever of /val and /test exist.
        content: also verify the content sha256 (a full read of the file).

    Raises:
        DataError: the first problem found, as one line.
    """
    lines, readers = [], []
    absent = []
    if splits is None:
        splits, absent = _present_splits(path)
    if not splits:
        raise DataError("expected at least one split to check, got none", file=path)
    try:
        for split in splits:
            readers.append(BatchReader(path, split, prefetch=False, batch_size=1))
        r0 = readers[0]
        scale = "[0, 1] scale" if r0.feature_dtype == np.uint8 else "raw scale"
        lines.append(f"{path}: format {r0.format_version}, {r0.num_classes} classes, samples "
                     f"{r0.sample_shape} {r0.feature_dtype}, train_mean {r0.mean:.6g}, train_std {r0.std:.6g} "
                     f"({scale})")
        for r in readers:
            stats = Stats(r.feature_dtype) if r.split == "train" else None
            counts = _scan(r, stats)
            lines.append(f"  /{r.split}: {r.num_samples} samples, per class: {_counts_text(counts)}")
            if stats is not None:
                for name, stored, got in zip(("train_mean", "train_std"), (r.mean, r.std), stats.result()):
                    if not math.isclose(stored, got, rel_tol=1e-6, abs_tol=1e-12):
                        raise DataError(f"expected attribute {name} = {got:.9g} (recomputed from /train/images), "
                                        f"got {stored:.9g}", file=path, dataset="/", rank=r.rank)
        for split in absent:
            lines.append(f"  /{split}: none in this file (training skips it)")
        if content and r0._content is not None:
            r0.verify_content()
            lines.append(f"  content sha256: {len(r0._content)} datasets match the sums recorded at conversion")
        elif r0._content is None:
            lines.append("  content sha256: none recorded (format 1 file)")
    finally:
        for r in readers:
            r.close()
    return lines
