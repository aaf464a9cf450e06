"""write_dataset: a paranet HDF5 file (format 2) from in-memory arrays, validated, written atomically."""
import datetime
import json
from pathlib import Path

import numpy as np

from ..files import atomic_path, new_h5
from .errors import DataError
from .format import (FEATURE_DTYPES, FORMAT_VERSION, SPLITS, Stats, check_stats, hash_rows, piece_rows)


def _label_dtype(num_classes):
    """The smallest unsigned dtype that holds labels 0..num_classes-1."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if num_classes - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.int64)


def check_arrays(X, y, file, x_name, y_name):
    """Return (X, y) as arrays if they make a valid split, else raise DataError naming file and array.

    X: uint8, float32 or float64 of shape (N, ...) with every sample dimension > 0 and, for
    floats, every value finite; y: (N,) integers >= 0; N > 0.
    """
    X, y = np.asarray(X), np.asarray(y)
    if X.dtype not in FEATURE_DTYPES:
        raise DataError(f"expected features of dtype uint8, float32 or float64, got {X.dtype} "
                        f"(cast them first)", file=file, dataset=x_name)
    if X.ndim < 2:
        raise DataError(f"expected features of shape (N, ...) with at least one dimension per sample, "
                        f"got shape {X.shape}", file=file, dataset=x_name)
    if 0 in X.shape[1:]:
        raise DataError(f"expected every sample dimension > 0, got shape {X.shape}", file=file, dataset=x_name)
    one_hot = " (one-hot rows? pass y.argmax(axis=1))" if y.ndim == 2 and y.shape[1] > 1 else ""
    if y.dtype.kind not in "iu":
        raise DataError(f"expected integer labels of shape (N,), got dtype {y.dtype} shape {y.shape}{one_hot}",
                        file=file, dataset=y_name)
    if y.ndim != 1:
        raise DataError(f"expected labels of shape (N,), got {y.shape}{one_hot}", file=file, dataset=y_name)
    if len(y) != len(X):
        raise DataError(f"expected {len(X)} labels (one per sample in {x_name}), got {len(y)}",
                        file=file, dataset=y_name)
    if len(X) == 0:
        raise DataError("expected a non-empty split, got 0 rows", file=file, dataset=x_name)
    if X.dtype.kind == "f":
        step = piece_rows(X[0].nbytes)
        for a in range(0, len(X), step):
            ok = np.isfinite(X[a:a + step]).reshape(min(step, len(X) - a), -1).all(axis=1)
            if not ok.all():
                row = a + int(np.argmin(ok))
                flat = X[row].reshape(-1)
                raise DataError(f"expected finite features, got {flat[np.argmin(np.isfinite(flat))]} at row {row}",
                                file=file, dataset=x_name)
    if y.min() < 0:
        row = int(np.argmin(y))
        raise DataError(f"expected labels >= 0, got {int(y[row])} at row {row}", file=file, dataset=y_name)
    return X, y


def _as_split(name, pair, out):
    """Return (X, y) of one split as checked arrays; raise DataError naming /name."""
    if pair is None:
        raise DataError(f"expected a non-empty {name} split (X, y), got None", file=out, dataset=f"/{name}")
    try:
        X, y = pair
    except (TypeError, ValueError):
        raise DataError(f"expected a pair (X, y), got {type(pair).__name__}", file=out, dataset=f"/{name}") from None
    if name != "train" and len(X) == 0:
        raise DataError(f"expected a non-empty split, got 0 rows (pass {name}=None to leave it out)", file=out,
                        dataset=f"/{name}/images")
    return check_arrays(X, y, out, f"/{name}/images", f"/{name}/labels")


def write_dataset(path, train=None, val=None, test=None, num_classes=None, *, attrs=None):
    """Write a paranet HDF5 file (format 2) from arrays, atomically.

    /train is required; /val and /test are optional (None leaves them out; the trainer then
    skips validation or the test), never empty. Features are uint8, float32 or float64 of any
    per-sample shape (the same in every split); labels are integers 0..num_classes-1.
    The normalisation statistics (scalar mean and std over every feature of the training
    split: on the [0, 1] scale for uint8, on the raw scale for floats) and a sha256 of each
    dataset's content are computed and stored. Datasets are stored contiguous (one read a
    rank a step); labels in the smallest unsigned dtype that holds them.

    Args:
        path: the file to write; replaced atomically (temporary file, fsync, rename).
        train, val, test: (X, y) pairs: X (N, *sample_shape), y (N,); val and test may be None.
        num_classes: C; default max(label) + 1 over the splits given. At least 2.
        attrs: extra root attributes to record (e.g. source, params).

    Returns:
        The path written (Path).

    Raises:
        DataError: one line naming the file, the dataset and what was expected versus found.
    """
    out = Path(path)
    if out.is_dir():
        raise DataError("expected a file to write, got a directory", file=out)
    splits = {name: _as_split(name, pair, out) for name, pair in zip(SPLITS, (train, val, test))
              if name == "train" or pair is not None}
    X0 = splits["train"][0]
    for name, (X, _) in splits.items():
        if X.dtype != X0.dtype or X.shape[1:] != X0.shape[1:]:
            raise DataError(f"expected samples of shape {X0.shape[1:]} and dtype {X0.dtype} as in /train, "
                            f"got {X.shape[1:]} {X.dtype}", file=out, dataset=f"/{name}/images")
    top = max(int(y.max()) for _, y in splits.values())
    if num_classes is None:
        num_classes = top + 1
    elif isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
        raise DataError(f"expected num_classes to be an integer, got {num_classes!r}", file=out)
    num_classes = int(num_classes)
    if num_classes < 2:
        raise DataError(f"expected at least 2 classes, got num_classes {num_classes}", file=out)
    for name, (_, y) in splits.items():
        if int(y.max()) >= num_classes:
            row = int(np.argmax(y))
            raise DataError(f"expected labels in 0..{num_classes - 1}, got {int(y[row])} at row {row}",
                            file=out, dataset=f"/{name}/labels")
    stats = Stats(X0.dtype)
    step = piece_rows(X0[0].nbytes)
    for a in range(0, len(X0), step):
        stats.add(X0[a:a + step])
    mean, std = stats.result()
    if not std > 0:
        raise DataError(f"expected training features that vary (std > 0), got every value equal to "
                        f"{X0.reshape(-1)[0]}", file=out, dataset="/train/images")
    try:
        mean, std = check_stats(mean, std, X0.dtype)
    except ValueError as e:
        raise DataError(f"{e} (computed from the training features)", file=out, dataset="/train/images") from None
    label_dtype = _label_dtype(num_classes)
    content = {}
    for name, (X, y) in splits.items():
        y = y.astype(label_dtype, copy=False)
        splits[name] = (X, y)
        for key, arr in ((f"{name}/images", X), (f"{name}/labels", y)):
            content[key] = hash_rows(lambda a, b, arr=arr: arr[a:b], len(arr), arr[0].nbytes or 1)
    try:
        with atomic_path(out) as tmp:
            with new_h5(tmp) as f:
                for name, (X, y) in splits.items():
                    g = f.create_group(name)
                    g.create_dataset("images", data=X, dtype=X.dtype.newbyteorder("<"))  # contiguous
                    g.create_dataset("labels", data=y, dtype=label_dtype)
                for key, value in (attrs or {}).items():
                    f.attrs[key] = value
                f.attrs["num_classes"] = num_classes
                f.attrs["train_mean"], f.attrs["train_std"] = mean, std
                f.attrs["content_sha256"] = json.dumps(content, sort_keys=True)
                f.attrs.setdefault("created_utc", datetime.datetime.now(datetime.timezone.utc)
                                   .isoformat(timespec="seconds"))
                f.attrs["format_version"] = FORMAT_VERSION  # last: an interrupted write never looks complete
    except OSError as e:  # a read-only or full disk, a folder that cannot be made: one line
        reason = " ".join(str(e).split()) if e.strerror is None else e.strerror
        reason = reason[len(f"{out}: "):] if reason.startswith(f"{out}: ") else reason
        raise DataError(f"expected a writable location, got {reason}", file=out) from None
    return out
