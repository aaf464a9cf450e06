"""Convert MNIST IDX files into paranet's HDF5 layout, atomically; default paths for the file."""
import datetime
import json
from pathlib import Path

import h5py
import numpy as np

from .download import download_mnist
from ..files import atomic_path
from .errors import DataError
from .idx import IDX_NAMES, load_mnist_idx

FORMAT_VERSION = 1
# Layout: images and labels are stored contiguous (unchunked, uncompressed). A rank's share
# of a step is then one run of bytes that HDF5 reads with a single pread straight into the
# output array: no chunk cache, no copy of neighbouring rows. Measured on MNIST, 32 rows at a
# random offset: 11 us contiguous against 34-40 us with chunks of 16, 64 or 256 rows.
SPLITS = ("train", "val", "test")
# The embedded copy: <repo>/datasets/mnist/, present in a source checkout only.
EMBEDDED_DIR = Path(__file__).resolve().parents[2] / "datasets" / "mnist"


def default_data_path():
    """Return where the default HDF5 file lives.

    Returns:
        ``<repo>/datasets/mnist.h5`` when paranet sits in a source checkout (the
        ``datasets/`` folder exists next to the package), else ``~/.cache/paranet/mnist.h5``.
    """
    datasets = Path(__file__).resolve().parents[2] / "datasets"
    if datasets.is_dir():
        return datasets / "mnist.h5"
    return Path.home() / ".cache" / "paranet" / "mnist.h5"


def _is_current(path):
    """True if path opens as HDF5 and carries this FORMAT_VERSION."""
    try:
        with h5py.File(path, "r") as f:
            return int(f.attrs.get("format_version", -1)) == FORMAT_VERSION
    except (OSError, ValueError):
        return False


def ensure_default_dataset(path=None):
    """Build the default MNIST HDF5 file if it is missing or of an older format.

    Call it from one process only (e.g. rank 0, the others waiting on a barrier);
    the file appears atomically, so a reader never sees it half-written.

    Args:
        path: the file (default: default_data_path()).

    Returns:
        The path of the file (Path).
    """
    path = Path(path) if path is not None else default_data_path()
    if path.is_file() and _is_current(path):
        return path
    return prepare_mnist(path)


def write_h5(out, splits, attrs):
    """Write splits {name: (images (N, 28, 28) uint8, labels (N,) uint8)} to out, atomically.

    The data goes to a temporary file in out's folder, is fsynced and renamed onto out.
    `format_version` is the last attribute written, so even the temporary file of an
    interrupted run does not pass the reader's checks. Returns out (Path).
    """
    out = Path(out)
    with atomic_path(out) as tmp:
        with h5py.File(tmp, "w") as f:
            for name, (images, labels) in splits.items():
                g = f.create_group(name)
                g.create_dataset("images", data=images, dtype=np.uint8)  # contiguous: see above
                g.create_dataset("labels", data=labels, dtype=np.uint8)
            for key, value in attrs.items():
                f.attrs[key] = value
            f.attrs["format_version"] = FORMAT_VERSION
    return out


def pixel_stats(images):
    """Return (mean, std) of uint8 images on the [0, 1] scale, exactly, via a histogram."""
    counts = np.bincount(images.reshape(-1), minlength=256).astype(np.float64)
    v = np.arange(256, dtype=np.float64) / 255.0
    n = counts.sum()
    mean = float(counts @ v / n)
    var = float(counts @ (v - mean) ** 2 / n)
    return mean, var ** 0.5


def prepare_mnist(out, source=None, val_size=5000, seed=0, cache_dir=None, mirrors=None, *,
                  md5=None, progress=True):
    """Convert the MNIST IDX files into one HDF5 file, written atomically.

    The IDX files come from, in this order: `source` if given; else the embedded copy
    under ``datasets/mnist/`` (sha256-checked against its SHA256SUMS); else a download
    from the MNIST mirrors into `cache_dir` (md5-checked). The validation split is a
    seeded random `val_size` rows held out from the 60,000 training rows (kept in their
    original relative order); the training split is written in a seeded shuffled order;
    the test split keeps its original order.

    Args:
        out: the HDF5 file to write (replaced atomically if it exists).
        source: a folder of IDX files, gzip or raw (e.g. Fashion-MNIST), or None.
        val_size: rows held out from train for /val (0 <= val_size < training rows).
        seed: seeds the train/val split and the training order.
        cache_dir: download cache (default: ~/.cache/paranet/mnist-idx).
        mirrors: base URLs to download from (default: download.MIRRORS).
        md5: {"<name>.gz": md5} for downloads (default: the published sums).
        progress: show a progress bar while downloading.

    Returns:
        The path of the written file (Path).

    Raises:
        DataError: a missing or malformed source, a failed download, a bad val_size.
    """
    out = Path(out)
    if source is not None:
        folder, origin = Path(source), f"source:{Path(source).resolve()}"
        if not folder.is_dir():
            raise DataError("expected a folder of IDX files, found no such folder", file=folder,
                            dataset="--source")
    elif all(any((EMBEDDED_DIR / (n + ext)).is_file() for ext in ("", ".gz")) for n in IDX_NAMES.values()):
        folder, origin = EMBEDDED_DIR, "embedded:datasets/mnist"
    else:
        folder = download_mnist(cache_dir, mirrors=mirrors, md5=md5, progress=progress)
        origin = f"download:{folder}"
    arrays, sources = load_mnist_idx(folder)

    train_images, train_labels = arrays["train_images"], arrays["train_labels"]
    n = len(train_images)
    if not isinstance(val_size, (int, np.integer)) or not 0 <= val_size < n:
        raise DataError(f"expected a validation size in 0..{n - 1}, got {val_size!r}",
                        file=out, dataset="/val")
    perm = np.random.default_rng(seed).permutation(n)
    val_idx = np.sort(perm[:val_size])   # held out, original relative order
    train_idx = perm[val_size:]          # shuffled: any contiguous block is a random mix
    splits = {
        "train": (train_images[train_idx], train_labels[train_idx]),
        "val": (train_images[val_idx], train_labels[val_idx]),
        "test": (arrays["test_images"], arrays["test_labels"]),
    }
    mean, std = pixel_stats(splits["train"][0])
    attrs = {
        "train_mean": mean,
        "train_std": std,
        "source": origin,
        "source_sha256": json.dumps({s["file"]: s["sha256"] for s in sources.values()}, sort_keys=True),
        "params": json.dumps({"val_size": int(val_size), "seed": int(seed), "layout": "contiguous",
                              "train_order": "shuffled", "val_order": "original",
                              "test_order": "original"}, sort_keys=True),
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return write_h5(out, splits, attrs)
