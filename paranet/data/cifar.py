"""CIFAR-10 from its binary archive (cifar-10-binary.tar.gz; never the pickled version) into paranet's format.

Each of data_batch_1..5.bin and test_batch.bin is a run of 3073-byte records: one label
byte (0..9), then 3072 pixel bytes, the 1024 red, 1024 green and 1024 blue values of a
32x32 image in row order. The file keeps that layout: samples (3, 32, 32) uint8, channels first.
"""
import hashlib
import json
import posixpath
import tarfile
import zlib
from pathlib import Path

import numpy as np

from .errors import DataError
from .prepare import check_output, split_off_val
from .write import write_dataset

RECORD_BYTES = 1 + 3 * 32 * 32
TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_FILE = "test_batch.bin"
MAX_RECORDS = 10000          # per file, as published; a larger member is refused before it is read
MAX_MEMBERS = 64             # the archive has 9; a tar of thousands of members is refused
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def parse_batch(data, file, name):
    """Parse one binary batch: return (images (n, 3, 32, 32) uint8, labels (n,) uint8)."""
    if not data or len(data) % RECORD_BYTES:
        raise DataError(f"expected a whole number of {RECORD_BYTES}-byte records, got {len(data)} bytes",
                        file=file, dataset=name)
    rec = np.frombuffer(data, np.uint8).reshape(-1, RECORD_BYTES)
    labels = rec[:, 0].copy()
    if labels.max() > 9:
        row = int(np.argmax(labels > 9))
        raise DataError(f"expected labels in 0..9, got {int(labels[row])} at record {row}", file=file, dataset=name)
    return rec[:, 1:].reshape(-1, 3, 32, 32).copy(), labels


def _check_size(size, file, name):
    """Refuse a member larger than MAX_RECORDS records before reading it."""
    if size > MAX_RECORDS * RECORD_BYTES:
        raise DataError(f"expected at most {MAX_RECORDS * RECORD_BYTES} bytes ({MAX_RECORDS} records), "
                        f"got {size}", file=file, dataset=name)


def read_batches(source):
    """Return {file name: bytes} of the six batch files from a tar(.gz) archive or a folder.

    The archive is read as a stream, member by member, without extracting anything to disk;
    only the six expected names are read, each refused if larger than 10,000 records.
    """
    source = Path(source)
    wanted = set(TRAIN_FILES) | {TEST_FILE}
    found = {}
    if source.is_dir():
        for name in sorted(wanted):
            for cand in (source / name, source / "cifar-10-batches-bin" / name):
                if cand.is_file():
                    _check_size(cand.stat().st_size, cand, name)
                    found[name] = cand.read_bytes()
                    break
    else:
        try:
            with tarfile.open(source, "r|*") as tar:
                for count, member in enumerate(tar, 1):
                    if count > MAX_MEMBERS:
                        raise DataError(f"expected the CIFAR-10 archive (9 members), got more than {MAX_MEMBERS}",
                                        file=source, dataset="tar")
                    name = posixpath.basename(member.name)
                    if name not in wanted or not member.isfile():
                        continue
                    if name in found:
                        raise DataError(f"expected {name} once in the archive, found it twice", file=source,
                                        dataset=member.name)
                    _check_size(member.size, source, member.name)
                    found[name] = tar.extractfile(member).read()
        except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
            raise DataError(f"expected a readable tar(.gz) archive, got {type(e).__name__}: {e}",
                            file=source, dataset="tar") from None
    missing = sorted(wanted - set(found))
    if missing:
        raise DataError(f"expected the CIFAR-10 binary batches, found no {', '.join(missing)} "
                        f"(is this cifar-10-binary.tar.gz?)", file=source, dataset="cifar10")
    return found


def prepare_cifar10(out, source=None, val_size=5000, seed=0, cache_dir=None, mirrors=None, *,
                    md5=None, progress=True):
    """Convert CIFAR-10 (binary version) into one HDF5 file, written atomically.

    /train is data_batch_1..5 less a seeded random `val_size` rows held out as /val (kept
    in their original order), written in a seeded shuffled order; /test is test_batch in
    its order. Samples (3, 32, 32) uint8 (channels first), 10 classes.

    Args:
        out: the HDF5 file to write (never the source).
        source: cifar-10-binary.tar.gz (or any tar holding the six .bin files), or a folder
            holding them; None downloads the archive (md5-checked, mirror fallback).
        val_size: training rows held out for /val (0 <= val_size < training rows; 0: no /val).
        seed: seeds the split and the training order.
        cache_dir, mirrors, md5, progress: the download (default: ~/.cache/paranet/cifar10).

    Returns:
        The path of the written file (Path).

    Raises:
        DataError: a missing or malformed source, a failed download, a bad val_size, an
            output that is the source.
    """
    from .download import CIFAR10_MD5, default_cache_dir, download_cifar10
    out = Path(out)
    if source is not None:
        source = Path(source)
        if not source.exists():
            raise DataError("expected cifar-10-binary.tar.gz or a folder of its .bin files, found no such file",
                            file=source, dataset="--source")
        inputs = [source] if not source.is_dir() else \
            [p for n in (*TRAIN_FILES, TEST_FILE) for p in (source / n, source / "cifar-10-batches-bin" / n)]
        check_output(out, inputs)
        origin = f"source:{source.resolve()}"
    else:
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir("cifar10")
        check_output(out, [cache / name for name in (md5 or CIFAR10_MD5)])
        source = download_cifar10(cache, mirrors=mirrors, md5=md5, progress=progress)
        origin = f"download:{source}"
    batches = read_batches(source)
    parts = [parse_batch(batches[name], source, name) for name in TRAIN_FILES]
    X = np.concatenate([p[0] for p in parts])   # (50000, 3, 32, 32) for the real archive
    y = np.concatenate([p[1] for p in parts])
    test = parse_batch(batches[TEST_FILE], source, TEST_FILE)
    train, val = split_off_val(X, y, val_size, seed, out)
    attrs = {
        "dataset": "cifar10",
        "source": origin,
        "source_sha256": json.dumps({n: hashlib.sha256(b).hexdigest() for n, b in batches.items()}, sort_keys=True),
        "params": json.dumps({"val_size": int(val_size), "seed": int(seed), "layout": "contiguous",
                              "sample_layout": "CHW", "train_order": "shuffled", "val_order": "original",
                              "test_order": "original"}, sort_keys=True),
        "class_names": json.dumps(CLASSES),
    }
    return write_dataset(out, train=train, val=val, test=test, num_classes=10, attrs=attrs)
