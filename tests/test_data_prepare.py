"""Tests of MNIST preparation: no loss against the raw IDX bytes, layout, attributes, atomic writes, CLI."""
import gzip
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from paranet.data import DataError, default_data_path, ensure_default_dataset, prepare_mnist
from paranet.data import prepare as prepare_mod

REPO = Path(__file__).resolve().parents[1]
EMBEDDED = REPO / "datasets" / "mnist"
# From /work/shared/data/mnist/README.md, not computed by paranet.
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}


def env_with_repo():
    """os.environ with the repository on PYTHONPATH, for subprocesses."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def raw_idx(name):
    """Parse datasets/mnist/<name>.gz with struct/frombuffer, independently of paranet.data.idx."""
    data = gzip.decompress((EMBEDDED / (name + ".gz")).read_bytes())
    magic = struct.unpack(">I", data[:4])[0]
    if magic == 2051:
        n, h, w = struct.unpack(">III", data[4:16])
        return np.frombuffer(data[16:], np.uint8).reshape(n, h * w)
    assert magic == 2049
    (n,) = struct.unpack(">I", data[4:8])
    return np.frombuffer(data[8:], np.uint8).reshape(n)


def rows_as_records(images, labels):
    """Sorted (label ++ pixels) rows as one void value each: a multiset to compare."""
    both = np.concatenate([labels.reshape(-1, 1), images.reshape(len(images), -1)], axis=1)
    return np.sort(np.ascontiguousarray(both).view(f"V{both.shape[1]}").ravel())


def test_embedded_files_match_published_sha256():
    import hashlib
    for name, digest in SHA256.items():
        assert hashlib.sha256(gzip.decompress((EMBEDDED / (name + ".gz")).read_bytes())).hexdigest() == digest


def test_no_loss_against_raw_idx_bytes(mnist_h5):
    tr_img, tr_lab = raw_idx("train-images-idx3-ubyte"), raw_idx("train-labels-idx1-ubyte")
    te_img, te_lab = raw_idx("t10k-images-idx3-ubyte"), raw_idx("t10k-labels-idx1-ubyte")
    with h5py.File(mnist_h5, "r") as f:
        train = f["train/images"][:], f["train/labels"][:]
        val = f["val/images"][:], f["val/labels"][:]
        test = f["test/images"][:], f["test/labels"][:]
    assert len(train[0]) == 55000 and len(val[0]) == 5000 and len(test[0]) == 10000
    # train + val is the raw training set as a multiset (order may differ, nothing lost or doubled)
    got = rows_as_records(np.concatenate([train[0], val[0]]), np.concatenate([train[1], val[1]]))
    assert np.array_equal(got, rows_as_records(tr_img, tr_lab))
    assert np.array_equal(rows_as_records(*test), rows_as_records(te_img, te_lab))
    # digit counts against the published ones
    assert np.bincount(np.concatenate([train[1], val[1]]), minlength=10).tolist() == TRAIN_COUNTS
    assert np.bincount(test[1], minlength=10).tolist() == TEST_COUNTS


def test_layout_and_attributes(mnist_h5):
    with h5py.File(mnist_h5, "r") as f:
        for split, n in (("train", 55000), ("val", 5000), ("test", 10000)):
            im, lab = f[f"{split}/images"], f[f"{split}/labels"]
            assert (im.shape, im.dtype, lab.shape, lab.dtype) == ((n, 28, 28), np.uint8, (n,), np.uint8)
            # contiguous: a rank's read for one step is one run of bytes, one pread
            assert im.chunks is None and im.compression is None and lab.chunks is None
        a = f.attrs
        assert a["format_version"] == 2 and a["num_classes"] == 10
        assert json.loads(a["source_sha256"]) == {k + ".gz": v for k, v in SHA256.items()}
        assert json.loads(a["params"])["val_size"] == 5000 and json.loads(a["params"])["seed"] == 0
        # the published figures are over all 60,000 training images; ours over the 55,000 kept
        assert abs(a["train_mean"] - 0.1307) < 1e-3 and abs(a["train_std"] - 0.3081) < 1e-3
        x = f["train/images"][:].astype(np.float64) / 255
        assert a["train_mean"] == pytest.approx(x.mean(), rel=1e-9)
        assert a["train_std"] == pytest.approx(x.std(), rel=1e-9)


def test_train_is_shuffled_so_any_block_is_a_mix(mnist_h5):
    with h5py.File(mnist_h5, "r") as f:
        labels = f["train/labels"][:]
    raw = raw_idx("train-labels-idx1-ubyte")
    assert not np.array_equal(labels[:1000], raw[:1000])
    for start in (0, 27000, 54000):
        counts = np.bincount(labels[start:start + 1000], minlength=10)
        assert counts.min() > 60 and counts.max() < 150, counts  # ~100 each if random


def test_test_split_keeps_file_order(mnist_h5):
    with h5py.File(mnist_h5, "r") as f:
        assert np.array_equal(f["test/labels"][:], raw_idx("t10k-labels-idx1-ubyte"))


def test_seed_and_val_size(tmp_path, mnist_h5):
    a = prepare_mnist(tmp_path / "a.h5", val_size=1000, seed=7, progress=False)
    b = prepare_mnist(tmp_path / "b.h5", val_size=1000, seed=7, progress=False)
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb, h5py.File(mnist_h5, "r") as f0:
        assert fa["val/labels"].shape == (1000,) and fa["train/labels"].shape == (59000,)
        assert np.array_equal(fa["train/images"][:], fb["train/images"][:])      # same seed: same file
        assert not np.array_equal(fa["train/labels"][:55000], f0["train/labels"][:])  # other seed


def test_raw_source_folder_gives_the_same_file(tmp_path, mnist_h5):
    src = tmp_path / "raw"
    src.mkdir()
    for name in SHA256:  # uncompressed IDX, no SHA256SUMS: the other accepted layout
        (src / name).write_bytes(gzip.decompress((EMBEDDED / (name + ".gz")).read_bytes()))
    out = prepare_mnist(tmp_path / "raw.h5", source=src, progress=False)
    with h5py.File(out, "r") as f, h5py.File(mnist_h5, "r") as f0:
        for d in ("train/images", "train/labels", "val/labels", "test/images"):
            assert np.array_equal(f[d][:], f0[d][:]), d
        assert f.attrs["source"].startswith("source:")


def test_other_idx_source_such_as_fashion(tmp_path):
    # a Fashion-MNIST-like folder: same format, other content, gzip
    rng = np.random.default_rng(3)
    src = tmp_path / "fashion"
    src.mkdir()
    data = {"train": (rng.integers(0, 256, (300, 28, 28), np.uint8), rng.integers(0, 10, 300, np.uint8)),
            "t10k": (rng.integers(0, 256, (50, 28, 28), np.uint8), rng.integers(0, 10, 50, np.uint8))}
    for split, (im, lab) in data.items():
        (src / f"{split}-images-idx3-ubyte.gz").write_bytes(
            gzip.compress(struct.pack(">IIII", 2051, len(im), 28, 28) + im.tobytes()))
        (src / f"{split}-labels-idx1-ubyte.gz").write_bytes(
            gzip.compress(struct.pack(">II", 2049, len(lab)) + lab.tobytes()))
    out = prepare_mnist(tmp_path / "f.h5", source=src, val_size=100, progress=False)
    with h5py.File(out, "r") as f:
        assert np.array_equal(rows_as_records(f["test/images"][:], f["test/labels"][:]),
                              rows_as_records(*data["t10k"]))
        got = rows_as_records(np.concatenate([f["train/images"][:], f["val/images"][:]]),
                              np.concatenate([f["train/labels"][:], f["val/labels"][:]]))
        assert np.array_equal(got, rows_as_records(*data["train"]))
        assert f.attrs["train_mean"] == pytest.approx(f["train/images"][:].mean() / 255)


def test_embedded_copy_is_checked_by_sha256(tmp_path, monkeypatch):
    bad = tmp_path / "mnist"
    shutil.copytree(EMBEDDED, bad)
    sums = (bad / "SHA256SUMS").read_text().replace(SHA256["t10k-labels-idx1-ubyte"], "0" * 64)
    (bad / "SHA256SUMS").write_text(sums)
    monkeypatch.setattr(prepare_mod, "EMBEDDED_DIR", bad)
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz: sha256: expected sha256 0{64} .*, got ff7bcfd4"):
        prepare_mnist(tmp_path / "x.h5", progress=False)
    assert not (tmp_path / "x.h5").exists()


def test_failed_conversion_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    out = tmp_path / "m.h5"
    out.write_bytes(b"previous content")
    from paranet.data import write as write_mod

    class Boom:
        @staticmethod
        def dumps(*a, **k):
            raise KeyboardInterrupt  # as if interrupted half-way: datasets written, attributes not

    monkeypatch.setattr(write_mod, "json", Boom)
    with pytest.raises(KeyboardInterrupt):
        prepare_mnist(out, progress=False)
    assert out.read_bytes() == b"previous content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.h5"]


def test_killed_conversion_never_leaves_a_valid_looking_file(tmp_path):
    # The child is SIGKILLed after the data is written but before the rename.
    script = (
        "import os, signal, sys\n"
        "from paranet.data import prepare\n"
        "real = os.replace\n"
        "os.replace = lambda a, b: os.kill(os.getpid(), signal.SIGKILL)\n"
        "prepare.prepare_mnist(sys.argv[1], progress=False)\n"
    )
    out = tmp_path / "m.h5"
    proc = subprocess.run([sys.executable, "-c", script, str(out)], env=env_with_repo(), timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    leftovers = list(tmp_path.iterdir())
    assert leftovers and all(p.name.endswith(".tmp") for p in leftovers)
    # the complete-looking temporary never got the final name, so a reader finds nothing there
    from paranet.data import BatchReader
    with pytest.raises(DataError, match="m.h5 \\(rank 0\\): expected an HDF5 file"):
        BatchReader(out, "train")


def test_temporary_file_without_format_version_is_rejected(tmp_path, monkeypatch):
    # Kill the writer between datasets and attributes: the partial file lacks format_version.
    from paranet.data import BatchReader
    partial = tmp_path / "partial.h5"
    with h5py.File(partial, "w") as f:
        f["train/images"] = np.zeros((10, 28, 28), np.uint8)
        f["train/labels"] = np.zeros(10, np.uint8)
        f.attrs["train_mean"], f.attrs["train_std"] = 0.1, 0.3
    with pytest.raises(DataError, match=r"partial.h5: / \(rank 0\): expected attribute format_version in \(1, 2\)"):
        BatchReader(partial, "train")


def test_cli_converts_and_checks(tmp_path):
    out = tmp_path / "cli.h5"
    p = subprocess.run([sys.executable, "-m", "paranet.data", "mnist", "--out", str(out), "--val-size", "2000",
                        "--seed", "3"], env=env_with_repo(), capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    with h5py.File(out, "r") as f:
        assert f["val/labels"].shape == (2000,) and json.loads(f.attrs["params"])["seed"] == 3
    p = subprocess.run([sys.executable, "-m", "paranet.data", "check", str(out)], env=env_with_repo(),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "/train: 58000 samples" in p.stdout


def test_cli_help_shows_defaults():
    p = subprocess.run([sys.executable, "-m", "paranet.data", "mnist", "--help"], env=env_with_repo(),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "(default: 5000)" in p.stdout and "--cache-dir" in p.stdout


def test_default_data_path_and_ensure(tmp_path, monkeypatch):
    assert default_data_path() == REPO / "datasets" / "mnist.h5"
    target = tmp_path / "d" / "mnist.h5"
    calls = []
    real = prepare_mod.prepare_mnist
    monkeypatch.setattr(prepare_mod, "prepare_mnist", lambda p: calls.append(p) or real(p, progress=False))
    assert ensure_default_dataset(target) == target and calls == [target]
    assert ensure_default_dataset(target) == target and calls == [target]  # present: not rebuilt
    with h5py.File(target, "a") as f:
        f.attrs["format_version"] = 0  # an older format is rebuilt
    ensure_default_dataset(target)
    assert len(calls) == 2
