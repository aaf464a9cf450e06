"""A NumPy .npz archive of arrays (X, y, or one pair per split) into paranet's format, never unpickling."""
import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np

from .errors import DataError
from .prepare import check_output
from .write import check_arrays, write_dataset

PER_SPLIT = ("X_train", "y_train", "X_val", "y_val", "X_test", "y_test")  # val and test optional


def _load(path):
    """Return {name: array} of an .npz file loaded with allow_pickle=False."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise DataError("expected an .npz archive of named arrays, got a single .npy array",
                                file=path, dataset="npz")
            return {k: z[k] for k in z.files}
    except DataError:
        raise
    except ValueError as e:  # object arrays: "Object arrays cannot be loaded when allow_pickle=False"
        raise DataError(f"expected plain numeric arrays (loaded with allow_pickle=False), got {e}",
                        file=path, dataset="npz") from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"expected a readable .npz archive, got {type(e).__name__}: {e}", file=path,
                        dataset="npz") from None


def _sizes(n, val_size, test_size, path):
    """Resolve the held-out sizes (default 10% each, at least 1; 0 leaves the split out) and check
    that they leave training rows."""
    val = max(1, n // 10) if val_size is None else val_size
    test = max(1, n // 10) if test_size is None else test_size
    for name, v in (("--val-size", val), ("--test-size", test)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise DataError(f"expected {name} >= 0, got {v!r}", file=path, dataset=name)
    if val + test >= n:
        raise DataError(f"expected val + test sizes below the {n} rows of X, got {val} + {test}",
                        file=path, dataset="X")
    return int(val), int(test)


def prepare_npz(out, source, val_size=None, test_size=None, seed=0, num_classes=None):
    """Convert an .npz archive into one HDF5 file, written atomically.

    The archive holds either ``X`` and ``y`` (one set, split here: seeded random
    `test_size` and `val_size` rows, default 10% each, 0 for none, held out in their original
    order; the rest shuffled into /train), or ``X_train, y_train`` and optionally
    ``X_val, y_val``, ``X_test, y_test`` (used as given). X: (N, ...) uint8, float32 or float64; y: (N,) integers 0..C-1.
    It is loaded with allow_pickle=False: an object array is refused, never unpickled.

    Returns:
        The path of the written file (Path).

    Raises:
        DataError: an unreadable archive, missing or malformed arrays, bad sizes, an output
            that is the source.
    """
    out, source = Path(out), Path(source)
    if not source.is_file():
        raise DataError("expected an .npz file, found no such file", file=source, dataset="npz")
    check_output(out, [source])
    arrays = _load(source)
    keys = sorted(arrays)
    if "X" in arrays and "y" in arrays:
        if any(k in arrays for k in PER_SPLIT):
            raise DataError(f"expected either X and y or the per-split arrays, got both: {keys}",
                            file=source, dataset="npz")
        X, y = check_arrays(arrays["X"], arrays["y"], source, "X", "y")
        val, test = _sizes(len(X), val_size, test_size, source)
        perm = np.random.default_rng(seed).permutation(len(X))
        test_idx, val_idx, train_idx = np.sort(perm[:test]), np.sort(perm[test:test + val]), perm[test + val:]
        splits = {"train": (X[train_idx], y[train_idx]), "val": (X[val_idx], y[val_idx]) if val else None,
                  "test": (X[test_idx], y[test_idx]) if test else None}
        params = {"val_size": val, "test_size": test, "seed": int(seed), "train_order": "shuffled",
                  "val_order": "original", "test_order": "original"}
    elif "X_train" in arrays and "y_train" in arrays:
        if val_size is not None or test_size is not None:
            raise DataError("expected no --val-size/--test-size for an archive that has its own splits",
                            file=source, dataset="npz")
        splits = {}
        for s in ("train", "val", "test"):
            if (f"X_{s}" in arrays) != (f"y_{s}" in arrays):
                raise DataError(f"expected both X_{s} and y_{s} or neither, got {keys}", file=source, dataset="npz")
            if f"X_{s}" in arrays:
                splits[s] = check_arrays(arrays[f"X_{s}"], arrays[f"y_{s}"], source, f"X_{s}", f"y_{s}")
        params = {"splits": "as given"}
    else:
        raise DataError(f"expected arrays X and y (or {', '.join(PER_SPLIT)}), got {keys}",
                        file=source, dataset="npz")
    attrs = {"dataset": "npz", "source": f"source:{source.resolve()}",
             "source_sha256": json.dumps({source.name: hashlib.sha256(source.read_bytes()).hexdigest()}),
             "params": json.dumps(params, sort_keys=True)}
    return write_dataset(out, **splits, num_classes=num_classes, attrs=attrs)
