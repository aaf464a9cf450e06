"""The paranet HDF5 format: its version, the allowed dtypes, the normalisation rules and content hashing.

Version 2 (written by write_dataset and every converter) holds the split ``/train`` and,
optionally, ``/val`` and ``/test`` (absent rather than empty), each with ``images`` (N, *sample_shape) in uint8,
float32 or float64 and ``labels`` (N,) of an integer dtype with values in 0..C-1. Both are
stored contiguous. Root attributes: ``format_version`` (2, written last), ``num_classes`` (C),
``train_mean`` and ``train_std`` (scalars over every feature of /train: on the [0, 1] scale
for uint8, on the raw scale for floats), ``content_sha256`` (JSON {"train/images": hex, ...}).
Version 1 (MNIST only, still read): the same without num_classes and content_sha256;
images (N, 28, 28) uint8, labels uint8, C = 10.
"""
import hashlib
import json
import math
import numbers

import numpy as np

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
SPLITS = ("train", "val", "test")
FEATURE_DTYPES = (np.dtype(np.uint8), np.dtype(np.float32), np.dtype(np.float64))
V1_SAMPLE_SHAPE, V1_NUM_CLASSES = (28, 28), 10
# Bounds past which a normalisation attribute is refused as absurd (it would overflow the
# scaled features, or cannot come from data of that dtype). uint8 features are on [0, 1], so
# their std is at most 0.5; the smallest non-zero std of N uint8 values is about 1/(255 sqrt N).
UINT8_MIN_STD = 1e-12
FLOAT_STAT_LIMIT = 1e30
FLOAT_MIN_STD = 1e-30
_PIECE_BYTES = 16 << 20  # whole-split passes (stats, hashes, scans) go in pieces of 16 MiB


def piece_rows(row_bytes):
    """Rows per piece so that a piece of rows of `row_bytes` bytes is about 16 MiB."""
    return max(1, _PIECE_BYTES // max(1, int(row_bytes)))


def check_stats(mean, std, feature_dtype):
    """Return (mean, std) as floats, or raise ValueError saying what was expected and found.

    mean and std are the file's train_mean and train_std attributes; feature_dtype decides
    the scale: [0, 1] for uint8 (mean in 0..1, std in [1e-12, 0.5]), raw for floats
    (|mean| <= 1e30, std in [1e-30, 1e30]).
    """
    got = []
    for name, value in (("train_mean", mean), ("train_std", std)):
        if isinstance(value, np.ndarray) and value.shape == ():
            value = value[()]
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
            raise ValueError(f"expected attribute {name} to be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"expected attribute {name} to be finite, got {value!r}")
        got.append(value)
    mean, std = got
    if np.dtype(feature_dtype) == np.uint8:
        if not 0.0 <= mean <= 1.0:
            raise ValueError(f"expected attribute train_mean in 0..1 (uint8 features on the [0, 1] scale), "
                             f"got {mean!r}")
        if not UINT8_MIN_STD <= std <= 0.5 + 1e-9:
            raise ValueError(f"expected attribute train_std in {UINT8_MIN_STD:g}..0.5 (uint8 features on the "
                             f"[0, 1] scale), got {std!r}")
    else:
        if abs(mean) > FLOAT_STAT_LIMIT:
            raise ValueError(f"expected attribute train_mean within +-{FLOAT_STAT_LIMIT:g}, got {mean!r}")
        if not FLOAT_MIN_STD <= std <= FLOAT_STAT_LIMIT:
            raise ValueError(f"expected attribute train_std in {FLOAT_MIN_STD:g}..{FLOAT_STAT_LIMIT:g}, "
                             f"got {std!r}")
    return mean, std


def scale_shift(mean, std, feature_dtype):
    """Return (scale, shift) with normalised x = raw * scale - shift."""
    unit = 255.0 if np.dtype(feature_dtype) == np.uint8 else 1.0
    return 1.0 / (unit * std), mean / std


class Stats:
    """Mean and std of every feature of a split, accumulated piece by piece (exact for uint8)."""

    def __init__(self, feature_dtype):
        self.uint8 = np.dtype(feature_dtype) == np.uint8
        self.counts = np.zeros(256, np.int64)
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, piece):
        """Add a piece of rows (any shape) of the features."""
        if self.uint8:
            self.counts += np.bincount(np.asarray(piece).reshape(-1), minlength=256)
            return
        v = np.asarray(piece, np.float64).reshape(-1)
        if not v.size:
            return
        m = float(v.mean())
        m2 = float(np.square(v - m).sum())
        n = self.n + v.size  # Chan et al.'s pairwise update of (count, mean, M2)
        delta = m - self.mean
        self.mean += delta * v.size / n
        self.m2 += m2 + delta * delta * self.n * v.size / n
        self.n = n

    def result(self):
        """Return (mean, std): on the [0, 1] scale for uint8, raw for floats."""
        if self.uint8:
            counts = self.counts.astype(np.float64)
            v = np.arange(256, dtype=np.float64) / 255.0
            n = counts.sum()
            mean = float(counts @ v / n)
            return mean, float(counts @ (v - mean) ** 2 / n) ** 0.5
        return self.mean, (self.m2 / self.n) ** 0.5


def canonical(piece):
    """The piece as C-ordered little-endian array, the byte form content_sha256 is taken over."""
    return np.ascontiguousarray(piece, dtype=piece.dtype.newbyteorder("<"))


def hash_rows(read, n, row_bytes):
    """sha256 hex of rows 0..n-1, where read(a, b) returns rows a..b-1 as an array."""
    h = hashlib.sha256()
    step = piece_rows(row_bytes)
    for a in range(0, n, step):
        h.update(memoryview(canonical(read(a, min(n, a + step)))).cast("B"))
    return h.hexdigest()


def parse_content_sha256(value):
    """Return the content_sha256 attribute as a dict {"split/name": hex}, or raise ValueError."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    try:
        sums = json.loads(value)
    except (TypeError, ValueError):
        raise ValueError(f"expected attribute content_sha256 to be JSON, got {str(value)[:60]!r}") from None
    if not isinstance(sums, dict) or not all(isinstance(v, str) and len(v) == 64 for v in sums.values()):
        raise ValueError(f"expected attribute content_sha256 to map datasets to sha256 hex, got {str(value)[:60]!r}")
    return sums
