"""Tests of the converters against files generated in the real formats: a tiny CIFAR-10 binary tarball, an IDX
set (Fashion-MNIST), .npz archives; and the bad inputs of issue 11 items 2, 6, 8 and 11."""
import gzip
import io
import os
import re
import struct
import subprocess
import sys
import tarfile
import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pytest

from paranet.data import DataError, check_file, prepare_cifar10, prepare_mnist, prepare_npz
from paranet.data import prepare as prepare_mod
from paranet.data.__main__ import main
from paranet.data.idx import IMAGES_MAGIC, LABELS_MAGIC, read_idx

REPO = Path(__file__).resolve().parents[1]
RECORD = 3073


def env_with_repo():
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def expect_cli_error(argv, pattern, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("paranet.data: error: ") and err.count("\n") == 1, err
    assert re.search(pattern, err), err


# -- CIFAR-10 -------------------------------------------------------------------------------

def cifar_records(n, seed):
    """n records of the binary format: label byte, then 1024 R, 1024 G, 1024 B bytes (row order)."""
    rng = np.random.default_rng(seed)
    rec = rng.integers(0, 256, (n, RECORD), np.uint8)
    rec[:, 0] = rng.integers(0, 10, n)
    return rec


def cifar_tarball(path, per_batch=12, test=7, extra=None, gz=True):
    """A cifar-10-binary.tar.gz with the real member names; returns {name: records}."""
    batches = {f"data_batch_{i}.bin": cifar_records(per_batch, i) for i in range(1, 6)}
    batches["test_batch.bin"] = cifar_records(test, 9)
    batches.update(extra or {})
    with tarfile.open(path, "w:gz" if gz else "w") as tar:
        members = [("cifar-10-batches-bin/batches.meta.txt", b"airplane\nautomobile\n")]
        members += [(f"cifar-10-batches-bin/{n}", r if isinstance(r, bytes) else r.tobytes())
                    for n, r in batches.items()]
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return batches


def as_set(images, labels):
    """Rows as records (label ++ CHW bytes), sorted: a multiset to compare."""
    both = np.concatenate([labels.reshape(-1, 1), images.reshape(len(images), -1)], axis=1)
    return np.sort(np.ascontiguousarray(both).view(f"V{both.shape[1]}").ravel())


@pytest.mark.parametrize("layout", ["tar.gz", "folder"])
def test_cifar10_binary_against_the_generated_bytes(tmp_path, layout):
    tarball = tmp_path / "cifar-10-binary.tar.gz"
    batches = cifar_tarball(tarball)
    source = tarball
    if layout == "folder":
        with tarfile.open(tarball) as tar:
            tar.extractall(tmp_path / "x", filter="data")
        source = tmp_path / "x"  # holds cifar-10-batches-bin/
    out = prepare_cifar10(tmp_path / "c.h5", source=source, val_size=10, seed=3, progress=False)
    train_rec = np.concatenate([batches[f"data_batch_{i}.bin"] for i in range(1, 6)])
    with h5py.File(out, "r") as f:
        assert f["train/images"].shape == (50, 3, 32, 32) and f["val/images"].shape == (10, 3, 32, 32)
        assert f.attrs["num_classes"] == 10 and f.attrs["dataset"] == "cifar10"
        # test keeps the file order; the pixel at (c, h, w) is byte 1 + 1024 c + 32 h + w of its record
        test_rec = batches["test_batch.bin"]
        assert np.array_equal(f["test/labels"][:], test_rec[:, 0])
        assert f["test/images"][2, 1, 5, 7] == test_rec[2, 1 + 1024 + 32 * 5 + 7]
        assert np.array_equal(f["test/images"][:].reshape(7, -1), test_rec[:, 1:])
        got = as_set(np.concatenate([f["train/images"][:], f["val/images"][:]]),
                     np.concatenate([f["train/labels"][:], f["val/labels"][:]]))
        assert np.array_equal(got, as_set(train_rec[:, 1:], train_rec[:, 0]))
        assert f.attrs["train_mean"] == pytest.approx(f["train/images"][:].mean() / 255, rel=1e-12)
    assert "samples (3, 32, 32) uint8" in check_file(out)[0]


def big_member(name, size):
    """A tar member header declaring `size` bytes (contents zeros)."""
    return {name: bytes(size)}


CIFAR_BAD = {
    "partial record": ({"test_batch.bin": bytes(RECORD * 2 + 5)},
                       r"c.tar.gz: test_batch.bin: expected a whole number of 3073-byte records, got 6151 bytes"),
    "label 10": ({"data_batch_3.bin": np.concatenate([cifar_records(2, 0),
                                                      np.full((1, RECORD), 10, np.uint8)]).tobytes()},
                 r"data_batch_3.bin: expected labels in 0..9, got 10 at record 2"),
    "oversized member": (big_member("data_batch_2.bin", 10001 * RECORD),
                         r"cifar-10-batches-bin/data_batch_2.bin: expected at most 30730000 bytes \(10000 records\), "
                         r"got 30733073"),
}


@pytest.mark.parametrize("case", list(CIFAR_BAD))
def test_cifar10_bad_archives(tmp_path, capsys, case):
    extra, pattern = CIFAR_BAD[case]
    src = tmp_path / "c.tar.gz"
    cifar_tarball(src, extra=extra)
    with pytest.raises(DataError, match=pattern):
        prepare_cifar10(tmp_path / "o.h5", source=src, val_size=5, progress=False)
    expect_cli_error(["cifar10", "--source", str(src), "--out", str(tmp_path / "o.h5"), "--val-size", "5"],
                     pattern, capsys)
    assert not (tmp_path / "o.h5").exists()


def test_cifar10_archive_that_is_not_cifar(tmp_path, capsys):
    with tarfile.open(tmp_path / "t.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")  # the pickled version's names
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    expect_cli_error(["cifar10", "--source", str(tmp_path / "t.tar.gz"), "--out", str(tmp_path / "o.h5")],
                     r"t.tar.gz: cifar10: expected the CIFAR-10 binary batches, found no data_batch_1.bin, .*"
                     r"\(is this cifar-10-binary.tar.gz\?\)", capsys)
    (tmp_path / "junk.tar.gz").write_bytes(gzip.compress(b"not a tar at all" * 100)[:-20])
    expect_cli_error(["cifar10", "--source", str(tmp_path / "junk.tar.gz"), "--out", str(tmp_path / "o.h5")],
                     r"junk.tar.gz: tar: expected a readable tar\(.gz\) archive, got", capsys)


def test_cifar10_cli_in_a_process(tmp_path):
    cifar_tarball(tmp_path / "cifar-10-binary.tar.gz")
    p = subprocess.run([sys.executable, "-m", "paranet.data", "cifar10",
                        "--source", str(tmp_path / "cifar-10-binary.tar.gz"), "--out", str(tmp_path / "c.h5"), "--val-size", "6"], env=env_with_repo(),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout == f"wrote {tmp_path / 'c.h5'}\n", p.stderr
    p = subprocess.run([sys.executable, "-m", "paranet.data", "check", str(tmp_path / "c.h5")], env=env_with_repo(),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "/train: 54 samples" in p.stdout and "/test: 7 samples" in p.stdout


# -- npz -----------------------------------------------------------------------------------

def test_npz_single_set_is_split_and_matches(tmp_path):
    rng = np.random.default_rng(1)
    X, y = rng.standard_normal((100, 6)).astype(np.float32), rng.integers(0, 4, 100).astype(np.int16)
    np.savez(tmp_path / "a.npz", X=X, y=y)
    out = prepare_npz(tmp_path / "a.h5", tmp_path / "a.npz", val_size=15, seed=2)
    with h5py.File(out, "r") as f:
        sizes = [f[f"{s}/images"].shape[0] for s in ("train", "val", "test")]
        assert sizes == [75, 15, 10] and f.attrs["num_classes"] == 4
        rows = sorted(zip(np.concatenate([f[f"{s}/labels"][:] for s in ("train", "val", "test")]).tolist(),
                          map(tuple, np.concatenate([f[f"{s}/images"][:] for s in ("train", "val", "test")]).tolist())))
        assert rows == sorted(zip(y.tolist(), map(tuple, X.tolist())))
        # held-out splits keep the archive's relative order
        val = f["val/images"][:]
        idx = [int(np.flatnonzero((X == v).all(axis=1))[0]) for v in val]
        assert idx == sorted(idx)


def test_npz_per_split_arrays_used_as_given(tmp_path, capsys):
    rng = np.random.default_rng(2)
    arrays = {f"{k}_{s}": v for s, n in (("train", 20), ("val", 5), ("test", 4))
              for k, v in (("X", rng.integers(0, 256, (n, 2, 3, 3), np.uint8)), ("y", np.arange(n) % 3))}
    np.savez_compressed(tmp_path / "s.npz", **arrays)
    assert main(["npz", str(tmp_path / "s.npz"), "--out", str(tmp_path / "s.h5"), "--num-classes", "5"]) == 0
    with h5py.File(tmp_path / "s.h5", "r") as f:
        for s in ("train", "val", "test"):
            assert np.array_equal(f[f"{s}/images"][:], arrays[f"X_{s}"])
            assert np.array_equal(f[f"{s}/labels"][:], arrays[f"y_{s}"])
        assert f.attrs["num_classes"] == 5


class Payload:
    """Unpickling this would create a file: proof that the archive is never unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_npz_bad_archives(tmp_path, capsys):
    np.savez(tmp_path / "obj.npz", X=np.array([Payload(str(tmp_path / "pwned"))], dtype=object), y=np.zeros(1, int))
    expect_cli_error(["npz", str(tmp_path / "obj.npz"), "--out", str(tmp_path / "o.h5")],
                     r"obj.npz: npz: expected plain numeric arrays \(loaded with allow_pickle=False\), "
                     r"got Object arrays",
                     capsys)
    assert not (tmp_path / "pwned").exists()
    np.savez(tmp_path / "keys.npz", data=np.zeros((3, 2)), target=np.zeros(3))
    expect_cli_error(["npz", str(tmp_path / "keys.npz"), "--out", str(tmp_path / "o.h5")],
                     r"keys.npz: npz: expected arrays X and y \(or X_train, .*\), got \['data', 'target'\]", capsys)
    np.savez(tmp_path / "rank.npz", X=np.zeros(30, np.float32), y=np.zeros(30, int))
    expect_cli_error(["npz", str(tmp_path / "rank.npz"), "--out", str(tmp_path / "o.h5")],
                     r"rank.npz: X: expected features of shape \(N, \.\.\.\) with at least one dimension per sample, "
                     r"got shape \(30,\)", capsys)
    X = np.ones((30, 2), np.float32)
    X[17, 1] = np.inf
    np.savez(tmp_path / "inf.npz", X=X, y=np.arange(30) % 2)
    expect_cli_error(["npz", str(tmp_path / "inf.npz"), "--out", str(tmp_path / "o.h5")],
                     r"inf.npz: X: expected finite features, got inf at row 17", capsys)
    np.savez(tmp_path / "lab.npz", X=np.arange(60, dtype=np.float32).reshape(30, 2), y=np.arange(30) % 7)
    expect_cli_error(["npz", str(tmp_path / "lab.npz"), "--out", str(tmp_path / "o.h5"), "--num-classes", "6"],
                     r"o.h5: /\w+/labels: expected labels in 0..5, got 6 at row", capsys)
    expect_cli_error(["npz", str(tmp_path / "lab.npz"), "--out", str(tmp_path / "o.h5"), "--val-size", "20",
                      "--test-size", "10"],
                     r"lab.npz: X: expected val \+ test sizes below the 30 rows of X, got 20 \+ 10",
                     capsys)
    (tmp_path / "zip.npz").write_bytes(b"PK\x03\x04 not really")
    expect_cli_error(["npz", str(tmp_path / "zip.npz"), "--out", str(tmp_path / "o.h5")],
                     r"zip.npz: npz: expected a readable .npz archive, got", capsys)
    expect_cli_error(["npz", str(tmp_path / "lab.npz"), "--out", str(tmp_path / "lab.npz")],
                     r"lab.npz: --out: expected an output other than the inputs, got one of its own source files",
                     capsys)
    assert not (tmp_path / "o.h5").exists()


# -- Fashion-MNIST (IDX) ------------------------------------------------------------------------

def idx_set(folder, n_train=30, n_test=8, seed=0, gz=True):
    """Four IDX files in the real format (big-endian header, uint8 data); returns the arrays."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    data = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        im, lab = rng.integers(0, 256, (n, 28, 28), np.uint8), rng.integers(0, 10, n).astype(np.uint8)
        data[split] = (im, lab)
        for name, raw in ((f"{split}-images-idx3-ubyte", struct.pack(">IIII", IMAGES_MAGIC, n, 28, 28) + im.tobytes()),
                          (f"{split}-labels-idx1-ubyte", struct.pack(">II", LABELS_MAGIC, n) + lab.tobytes())):
            (folder / (name + ".gz" if gz else name)).write_bytes(gzip.compress(raw) if gz else raw)
    return data


def test_fashion_mnist_from_a_source_folder(tmp_path, capsys):
    data = idx_set(tmp_path / "fashion")
    assert main(["fashion-mnist", "--source", str(tmp_path / "fashion"), "--out", str(tmp_path / "f.h5"),
                 "--val-size", "6"]) == 0
    with h5py.File(tmp_path / "f.h5", "r") as f:
        assert f.attrs["dataset"] == "fashion-mnist" and f.attrs["num_classes"] == 10
        assert np.array_equal(f["test/images"][:], data["t10k"][0])
        got = as_set(np.concatenate([f["train/images"][:], f["val/images"][:]]),
                     np.concatenate([f["train/labels"][:], f["val/labels"][:]]))
        assert np.array_equal(got, as_set(*data["train"]))


# -- issue 11: items 2, 6, 8, 11 --------------------------------------------------------------

def test_out_naming_one_of_its_own_sources_is_refused(tmp_path, capsys, monkeypatch):
    idx_set(tmp_path / "src")
    (tmp_path / "src" / "SHA256SUMS").write_text("")
    for name in ("train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", "SHA256SUMS"):
        target = tmp_path / "src" / name
        before = target.read_bytes()
        expect_cli_error(["mnist", "--source", str(tmp_path / "src"), "--out", str(target)],
                         f"{name}: --out: expected an output other than the inputs, got one of its own source files",
                         capsys)
        assert target.read_bytes() == before
    os.link(tmp_path / "src" / "train-labels-idx1-ubyte.gz", tmp_path / "hardlink.h5")  # the same file by inode
    expect_cli_error(["fashion-mnist", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "hardlink.h5")],
                     "one of its own source files", capsys)
    # the embedded copy (moved aside so that a failure of this test cannot destroy the real one)
    monkeypatch.setattr(prepare_mod, "EMBEDDED_DIR", tmp_path / "src")
    with pytest.raises(DataError, match="one of its own source files"):
        prepare_mnist(tmp_path / "src" / "t10k-images-idx3-ubyte.gz", progress=False)
    expect_cli_error(["mnist", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "src")],
                     r"src: --out: expected a file to write, got a directory", capsys)
    cifar_tarball(tmp_path / "c.tar.gz")
    expect_cli_error(["cifar10", "--source", str(tmp_path / "c.tar.gz"), "--out", str(tmp_path / "c.tar.gz")],
                     "one of its own source files", capsys)


@pytest.mark.parametrize("argv, pattern", [
    (["mnist", "--out", "x.h5", "--seed", "-1"], r"--seed: expected an integer in 0..18446744073709551615, got -1"),
    (["mnist", "--out", "x.h5", "--seed", str(2 ** 64)],
     r"--seed: expected an integer in 0..\d+, got 18446744073709551616"),
    (["cifar10", "--out", "x.h5", "--seed", "x"], r"--seed: expected an integer, got 'x'"),
    (["mnist", "--out", "x.h5", "--val-size", "-1"], r"--val-size: expected an integer >= 0, got -1"),
    (["fashion-mnist", "--out", "x.h5", "--val-size", "-3"], r"--val-size: expected an integer >= 0, got -3"),
    (["npz", "a.npz", "--out", "x.h5", "--test-size", "-1"], r"--test-size: expected an integer >= 0, got -1"),
    (["npz", "a.npz", "--out", "x.h5", "--num-classes", "1"], r"--num-classes: expected an integer >= 2, got 1"),
])
def test_bad_flags_are_argparse_errors(tmp_path, capsys, argv, pattern):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m paranet.data") and re.search(pattern, err), err
    assert not (tmp_path / "x.h5").exists()


def test_val_size_zero_writes_a_file_without_val_that_check_accepts(tmp_path, capsys):
    # issue 11 item 6: /val (and /test) are optional everywhere: absent, never empty
    data = idx_set(tmp_path / "src")
    assert main(["mnist", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "o.h5"), "--val-size", "0"]) == 0
    with h5py.File(tmp_path / "o.h5", "r") as f:
        assert "val" not in f and f["train/images"].shape == (30, 28, 28)
        assert np.array_equal(as_set(f["train/images"][:], f["train/labels"][:]), as_set(*data["train"]))
    capsys.readouterr()
    assert main(["check", str(tmp_path / "o.h5")]) == 0
    out = capsys.readouterr().out
    assert "/train: 30 samples" in out and "/test: 8 samples" in out and "/val: none in this file" in out
    expect_cli_error(["check", str(tmp_path / "o.h5"), "--splits", "val"],
                     r"o.h5: /val/images \(rank 0\): expected a dataset, found none", capsys)
    with pytest.raises(DataError, match=r"o.h5: /val: expected a validation size in 0..29 \(0: no /val\), got 30"):
        prepare_mnist(tmp_path / "o.h5", source=tmp_path / "src", val_size=30, progress=False)


def test_npz_without_held_out_splits(tmp_path):
    X, y = np.arange(40, dtype=np.float32).reshape(20, 2), np.arange(20) % 2
    np.savez(tmp_path / "a.npz", X=X, y=y)
    prepare_npz(tmp_path / "a.h5", tmp_path / "a.npz", val_size=0, test_size=0)
    np.savez(tmp_path / "b.npz", X_train=X, y_train=y, X_test=X[:3], y_test=y[:3])
    prepare_npz(tmp_path / "b.h5", tmp_path / "b.npz")
    with h5py.File(tmp_path / "a.h5", "r") as a, h5py.File(tmp_path / "b.h5", "r") as b:
        assert sorted(a) == ["train"] and a["train/images"].shape == (20, 2)
        assert sorted(b) == ["test", "train"] and np.array_equal(b["test/images"][:], X[:3])
    np.savez(tmp_path / "c.npz", X_train=X, y_train=y, X_val=X[:3])
    with pytest.raises(DataError, match=r"c.npz: npz: expected both X_val and y_val or neither"):
        prepare_npz(tmp_path / "c.h5", tmp_path / "c.npz")


@pytest.mark.parametrize("content, pattern", [
    (b"0" * 64 + b"  train-images-idx3-ubyte\nnot a checksum line\n",
     r"SHA256SUMS: SHA256SUMS: expected '<64 hex digits> <file name>' on line 2, got 'not a checksum line'"),
    (b"abc  train-images-idx3-ubyte\n", r"expected '<64 hex digits> <file name>' on line 1, got 'abc train-"),
    (b"\xff\xfe" + b"0" * 64 + b"  x\n", r"SHA256SUMS: SHA256SUMS: expected UTF-8 text, got byte 0xff at offset 0"),
])
def test_malformed_sha256sums_is_one_line(tmp_path, capsys, content, pattern):
    idx_set(tmp_path / "src")
    (tmp_path / "src" / "SHA256SUMS").write_bytes(content)
    expect_cli_error(["mnist", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "o.h5")], pattern, capsys)


def test_sha256sums_in_star_and_blank_forms_are_accepted(tmp_path):
    import hashlib
    idx_set(tmp_path / "src")
    raw = gzip.decompress((tmp_path / "src" / "t10k-labels-idx1-ubyte.gz").read_bytes())
    (tmp_path / "src" / "SHA256SUMS").write_text(f"\n{hashlib.sha256(raw).hexdigest()} *t10k-labels-idx1-ubyte\n\n")
    prepare_mnist(tmp_path / "o.h5", source=tmp_path / "src", val_size=3, progress=False)


def gzip_bomb(header, declared_rows, inflated_mib):
    """A gzip file: an IDX header and its rows, then `inflated_mib` MiB of zeros (1 MiB members, multi-member)."""
    zeros = gzip.compress(bytes(1 << 20), compresslevel=9)  # ~1 KiB each
    return gzip.compress(header + bytes(declared_rows)) + zeros * inflated_mib


def test_gzip_bomb_is_refused_before_it_is_inflated(tmp_path):
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(gzip_bomb(struct.pack(">II", LABELS_MAGIC, 10), 10, inflated_mib=256))
    assert path.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz: idx data: expected 18 bytes for labels of "
                                            r"shape \(10,\), got 19 or more"):
            read_idx(path, LABELS_MAGIC)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak  # inflated whole it would take 256 MiB
    # a header that declares more than the bound is refused before any data is inflated
    path.write_bytes(gzip.compress(struct.pack(">IIII", IMAGES_MAGIC, 2_000_000, 28, 28)))
    with pytest.raises(DataError, match=r"idx header: expected at most 1073741824 bytes of IDX data, the header "
                                        r"declares 1568000016"):
        read_idx(path, IMAGES_MAGIC)
