"""Convert IDX sets (MNIST, Fashion-MNIST) into paranet's HDF5 format, atomically; default paths."""
import json
import os
from pathlib import Path

import h5py
import numpy as np

from .download import download_mnist
from .errors import DataError
from .format import FORMAT_VERSION
from .idx import IDX_NAMES, load_idx_set
from .write import write_dataset

# Layout: images and labels are stored contiguous (unchunked, uncompressed). A rank's share
# of a step is then one run of bytes that HDF5 reads with a single pread straight into the
# output array: no chunk cache, no copy of neighbouring rows. Measured on MNIST, 32 rows at a
# random offset: 11 us contiguous against 34-40 us with chunks of 16, 64 or 256 rows.
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


def has_embedded_mnist():
    """True in a source checkout, whose datasets/mnist/ holds the four IDX files (a wheel has none)."""
    return all(any((EMBEDDED_DIR / (n + ext)).is_file() for ext in ("", ".gz")) for n in IDX_NAMES.values())


def default_dataset_origin():
    """Where ensure_default_dataset will take MNIST from, in words (the CLI's first-use line)."""
    if has_embedded_mnist():
        return "the embedded MNIST"
    return "a download of MNIST (an installed paranet has no embedded copy: that is in a source checkout)"


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


def split_off_val(X, y, val_size, seed, out):
    """Hold out a seeded random val_size rows of (X, y) as /val (kept in their original order);
    return (train, val), train in a seeded shuffled order (any contiguous block a random mix).
    val is None for val_size 0: the file then has no /val (never an empty one)."""
    n = len(X)
    if isinstance(val_size, bool) or not isinstance(val_size, (int, np.integer)) or not 0 <= val_size < n:
        raise DataError(f"expected a validation size in 0..{n - 1} (0: no /val), got {val_size!r}",
                        file=out, dataset="/val")
    perm = np.random.default_rng(seed).permutation(n)
    val_idx = np.sort(perm[:val_size])   # held out, original relative order
    train_idx = perm[val_size:]          # shuffled
    return (X[train_idx], y[train_idx]), ((X[val_idx], y[val_idx]) if val_size else None)


def _same_file(a, b):
    """True if paths a and b name the same file (the same path, or the same inode)."""
    a, b = Path(a), Path(b)
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_output(out, inputs):
    """Refuse an output path that is a directory or one of the converter's own input files.

    Writing a dataset onto its own source would replace the source (the rename is atomic,
    so the source is simply gone): refused up front, before anything is read.
    """
    out = Path(out)
    if out.is_dir():
        raise DataError("expected a file to write, got a directory", file=out, dataset="--out")
    for src in inputs:
        if _same_file(out, src):
            raise DataError(f"expected an output other than the inputs, got one of its own source files ({src})",
                            file=out, dataset="--out")


def _idx_inputs(folder):
    """The files in an IDX folder that a conversion reads (those present)."""
    found = []
    for name in list(IDX_NAMES.values()) + ["SHA256SUMS"]:
        for cand in (name + ".gz", name, name.replace("-idx", ".idx") + ".gz", name.replace("-idx", ".idx")):
            if (Path(folder) / cand).exists():
                found.append(Path(folder) / cand)
    return found


def prepare_idx(out, dataset="mnist", source=None, val_size=5000, seed=0, cache_dir=None, mirrors=None, *,
                md5=None, progress=True):
    """Convert an IDX set (MNIST or Fashion-MNIST) into one HDF5 file, written atomically.

    The IDX files come from, in this order: `source` if given; else, for MNIST, the
    embedded copy under ``datasets/mnist/`` (sha256-checked against its SHA256SUMS); else a
    download from the dataset's mirrors into `cache_dir` (md5-checked). The validation split
    is a seeded random `val_size` rows held out from the training rows (kept in their
    original relative order); the training split is written in a seeded shuffled order;
    the test split keeps its original order. 10 classes, samples (28, 28) uint8.

    Args:
        out: the HDF5 file to write (replaced atomically if it exists; never a source file).
        dataset: "mnist" or "fashion-mnist" (the download mirrors and checksums).
        source: a folder of IDX files, gzip or raw, or None.
        val_size: rows held out from train for /val (0 <= val_size < training rows; 0: no /val).
        seed: seeds the train/val split and the training order.
        cache_dir: download cache (default: ~/.cache/paranet/<dataset>-idx).
        mirrors: base URLs to download from (default: the dataset's).
        md5: {"<name>.gz": md5} for downloads (default: the published sums).
        progress: show a progress bar while downloading.

    Returns:
        The path of the written file (Path).

    Raises:
        DataError: a missing or malformed source, a failed download, a bad val_size, an
            output that is a source file.
    """
    from .download import FASHION_MD5, MNIST_MD5, default_cache_dir, download_fashion_mnist
    if dataset not in ("mnist", "fashion-mnist"):
        raise DataError(f"expected dataset 'mnist' or 'fashion-mnist', got {dataset!r}", file=out)
    out = Path(out)
    if source is not None:
        folder, origin = Path(source), f"source:{Path(source).resolve()}"
        if not folder.is_dir():
            raise DataError("expected a folder of IDX files, found no such folder", file=folder,
                            dataset="--source")
        check_output(out, _idx_inputs(folder))
    elif dataset == "mnist" and has_embedded_mnist():
        folder, origin = EMBEDDED_DIR, "embedded:datasets/mnist"
        check_output(out, _idx_inputs(folder))
    else:
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir(f"{dataset}-idx")
        check_output(out, [cache / name for name in (md5 or (MNIST_MD5 if dataset == "mnist" else FASHION_MD5))])
        fetch = download_mnist if dataset == "mnist" else download_fashion_mnist
        try:
            folder = fetch(cache, mirrors=mirrors, md5=md5, progress=progress)
        except DataError as e:  # offline, most likely: say how to go on without a download
            raise DataError(f"{e.detail}; without a network, give IDX files you have: python -m paranet.data "
                            f"{dataset} --source DIR --out FILE", file=e.file, dataset=e.dataset, rank=e.rank) from None
        origin = f"download:{folder}"
    arrays, sources = load_idx_set(folder)
    train, val = split_off_val(arrays["train_images"], arrays["train_labels"], val_size, seed, out)
    attrs = {
        "dataset": dataset,
        "source": origin,
        "source_sha256": json.dumps({s["file"]: s["sha256"] for s in sources.values()}, sort_keys=True),
        "params": json.dumps({"val_size": int(val_size), "seed": int(seed), "layout": "contiguous",
                              "train_order": "shuffled", "val_order": "original",
                              "test_order": "original"}, sort_keys=True),
    }
    return write_dataset(out, train=train, val=val, test=(arrays["test_images"], arrays["test_labels"]),
                         num_classes=10, attrs=attrs)


def prepare_mnist(out, source=None, val_size=5000, seed=0, cache_dir=None, mirrors=None, *,
                  md5=None, progress=True):
    """Convert the MNIST IDX files (source, else the embedded copy, else a download) into one
    HDF5 file, written atomically; see prepare_idx."""
    return prepare_idx(out, "mnist", source, val_size, seed, cache_dir, mirrors, md5=md5, progress=progress)


def prepare_fashion_mnist(out, source=None, val_size=5000, seed=0, cache_dir=None, mirrors=None, *,
                          md5=None, progress=True):
    """Convert Fashion-MNIST (source folder, else a download) into one HDF5 file; see prepare_idx."""
    return prepare_idx(out, "fashion-mnist", source, val_size, seed, cache_dir, mirrors, md5=md5,
                       progress=progress)
