"""Tests of bad input: each case is a one-line DataError naming file, dataset path and expectation, and exit 2."""
import gzip
import os
import struct
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from paranet.data import BatchReader, DataError, prepare_mnist
from paranet.data.__main__ import main

REPO = Path(__file__).resolve().parents[1]


def h5(path, images=None, labels=None, split="train", attrs=True):
    """Write a file by hand (no validation), with the attributes a complete file carries."""
    with h5py.File(path, "w") as f:
        if images is not None:
            f[f"{split}/images"] = images
        if labels is not None:
            f[f"{split}/labels"] = labels
        if attrs:
            f.attrs.update({"format_version": 1, "train_mean": 0.13, "train_std": 0.31})
    return path


def good_images(n):
    return np.zeros((n, 28, 28), np.uint8)


def good_labels(n):
    return np.arange(n, dtype=np.uint8) % 10


def expect_error(path, pattern, split="train", **kw):
    """Assert BatchReader and `python -m paranet.data check` both fail on path with one line matching pattern."""
    with pytest.raises(DataError) as info:
        BatchReader(path, split, **kw)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg, msg
    assert __import__("re").search(pattern, msg), msg
    return msg


def expect_cli_error(argv, pattern, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("paranet.data: error: ") and err.count("\n") == 1, err
    assert __import__("re").search(pattern, err), err


H5_CASES = {
    "missing file": (lambda p: p, r"bad.h5 \(rank 0\): expected an HDF5 file, found no such file"),
    "missing dataset": (lambda p: h5(p, good_images(5)),
                        r"bad.h5: /train/labels \(rank 0\): expected a dataset, found none"),
    "missing split": (lambda p: h5(p, good_images(5), good_labels(5), split="val"),
                      r"bad.h5: /train/images \(rank 0\): expected a dataset, found none"),
    "images dtype": (lambda p: h5(p, good_images(5).astype(np.float32), good_labels(5)),
                     r"/train/images \(rank 0\): expected dtype uint8, got float32"),
    "images shape": (lambda p: h5(p, np.zeros((5, 784), np.uint8), good_labels(5)),
                     r"/train/images \(rank 0\): expected shape \(N, 28, 28\), got \(5, 784\)"),
    "labels dtype": (lambda p: h5(p, good_images(5), good_labels(5).astype(np.int64)),
                     r"/train/labels \(rank 0\): expected dtype uint8, got int64"),
    "labels shape": (lambda p: h5(p, good_images(5), good_labels(5).reshape(5, 1)),
                     r"/train/labels \(rank 0\): expected shape \(N,\), got \(5, 1\)"),
    "label out of range": (lambda p: h5(p, good_images(70000), np.where(np.arange(70000) == 66000, 12,
                                                                       good_labels(70000)).astype(np.uint8)),
                           r"/train/labels \(rank 0\): expected labels in 0..9, got 12 at row 66000"),
    "length mismatch": (lambda p: h5(p, good_images(10), good_labels(9)),
                        r"/train/labels \(rank 0\): expected 10 labels \(one per sample in /train/images\), got 9"),
    "empty split": (lambda p: h5(p, good_images(0), good_labels(0)),
                    r"/train/images \(rank 0\): expected a non-empty split, got 0 rows"),
    "not a paranet file": (lambda p: h5(p, good_images(5), good_labels(5), attrs=False),
                           r"bad.h5: / \(rank 0\): expected attribute format_version in \(1, 2\)"),
}


@pytest.mark.parametrize("case", list(H5_CASES))
def test_bad_h5_file(tmp_path, capsys, case):
    make, pattern = H5_CASES[case]
    path = tmp_path / "bad.h5"
    make(path)
    expect_error(path, pattern)
    expect_cli_error(["check", str(path), "--splits", "train"], pattern, capsys)


def test_truncated_and_corrupted_files(tmp_path, mnist_h5, capsys):
    data = Path(mnist_h5).read_bytes()
    cut = tmp_path / "cut.h5"
    cut.write_bytes(data[: len(data) // 2])
    expect_error(cut, r"cut.h5: / \(rank 0\): expected a readable HDF5 file, got .*(truncat|eof)")
    expect_cli_error(["check", str(cut)], r"cut.h5: / \(rank 0\): expected a readable HDF5 file", capsys)
    bad = tmp_path / "sig.h5"
    bad.write_bytes(b"\0" * 64 + data[64:])  # superblock destroyed
    expect_error(bad, r"sig.h5: / \(rank 0\): expected a readable HDF5 file, got")


def test_arguments(tmp_path, mnist_h5):
    msg = expect_error(mnist_h5, r"\(rank 2\): expected batch_size >= size .*got batch_size 3 < size 4",
                       rank=2, size=4, batch_size=3)
    assert "mnist.h5" in msg
    expect_error(mnist_h5, r"expected rank < size = 2, got rank 2", rank=2, size=2)
    expect_error(mnist_h5, r"expected seed to be an integer >= 0, got -1", seed=-1)


def idx_folder(tmp_path, **override):
    """A tiny MNIST-format folder (raw IDX); override maps file name -> bytes."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "idx"
    folder.mkdir(exist_ok=True)
    files = {}
    for split, n in (("train", 40), ("t10k", 10)):
        files[f"{split}-images-idx3-ubyte"] = struct.pack(">IIII", 2051, n, 28, 28) + bytes(
            rng.integers(0, 256, n * 784, np.uint8))
        files[f"{split}-labels-idx1-ubyte"] = struct.pack(">II", 2049, n) + bytes(good_labels(n))
    files.update(override)
    for name, data in files.items():
        if data is not None:
            (folder / name).write_bytes(data)
    return folder


IDX_CASES = {
    "missing file": ({"t10k-labels-idx1-ubyte": None},
                     r"idx: t10k-labels-idx1-ubyte: expected IDX file t10k-labels-idx1-ubyte or .*gz, found neither"),
    "wrong magic": ({"train-labels-idx1-ubyte": struct.pack(">II", 2051, 40) + bytes(40)},
                    r"train-labels-idx1-ubyte: idx header: expected IDX magic 2049 \(labels\), got 2051"),
    "wrong image size": ({"t10k-images-idx3-ubyte": struct.pack(">IIII", 2051, 10, 32, 32) + bytes(10 * 1024)},
                         r"t10k-images-idx3-ubyte: idx header: expected images of 28x28, got 32x32"),
    "truncated": ({"train-images-idx3-ubyte": struct.pack(">IIII", 2051, 40, 28, 28) + bytes(39 * 784)},
                  r"train-images-idx3-ubyte: idx data: expected 31376 bytes .* got 30592"),
    "label out of range": ({"train-labels-idx1-ubyte": struct.pack(">II", 2049, 40) + bytes([3] * 39 + [10])},
                           r"train-labels-idx1-ubyte: idx data: expected labels in 0..9, got 10 at row 39"),
    "length mismatch": ({"t10k-labels-idx1-ubyte": struct.pack(">II", 2049, 9) + bytes(9)},
                        r"t10k-labels-idx1-ubyte: idx data: expected as many labels as images \(10\), got 9"),
    "corrupted gzip": ({"t10k-labels-idx1-ubyte": None,
                        "t10k-labels-idx1-ubyte.gz": gzip.compress(struct.pack(">II", 2049, 10) + bytes(10))[:-9]},
                       r"t10k-labels-idx1-ubyte.gz: gzip: expected a complete gzip stream"),
    "val too large": ({}, r"out.h5: /val: expected a validation size in 0..39 .*, got 40"),
}


@pytest.mark.parametrize("case", list(IDX_CASES))
def test_bad_idx_source(tmp_path, capsys, case):
    override, pattern = IDX_CASES[case]
    folder = idx_folder(tmp_path, **override)
    out = tmp_path / "out.h5"
    with pytest.raises(DataError, match=pattern):
        prepare_mnist(out, source=folder, val_size=40, progress=False)
    expect_cli_error(["mnist", "--out", str(out), "--source", str(folder), "--val-size", "40"], pattern, capsys)
    assert not out.exists()


def test_good_idx_source_passes(tmp_path):
    # the same tiny folder without a defect converts (so the cases above fail for their defect only)
    out = prepare_mnist(tmp_path / "ok.h5", source=idx_folder(tmp_path), val_size=5, progress=False)
    with BatchReader(out, "train", batch_size=7) as r:
        assert r.num_samples == 35 and r.steps_per_epoch == 5


def test_cli_process_exits_nonzero_with_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, "-m", "paranet.data", "mnist", "--out", str(tmp_path / "o.h5"),
                        "--source", str(tmp_path / "nowhere")], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert p.stderr == f"paranet.data: error: {tmp_path / 'nowhere'}: --source: expected a folder of IDX files, " \
                       "found no such folder\n"
