"""The data file changed under a running reader (issue 11 item 1): truncated, overwritten in place, replaced
or deleted; no batch is ever returned from the changed file, and verify_unchanged() names it."""
import os
import shutil
import subprocess

import h5py
import numpy as np
import pytest

from paranet.data import BatchReader, DataError


@pytest.fixture
def data(tmp_path, mnist_h5):
    """A private copy of the MNIST file, and a same-size copy with one training label changed."""
    path, other = tmp_path / "data.h5", tmp_path / "other.h5"
    shutil.copyfile(mnist_h5, path)
    shutil.copyfile(mnist_h5, other)
    with h5py.File(other, "a") as f:
        f["train/labels"][100] = (f["train/labels"][100] + 1) % 10  # in place: same size
    assert os.path.getsize(other) == os.path.getsize(path)
    return path, other


CHANGES = {  # the shell commands of the issue, run for real
    ": > f": (lambda f, other: ["sh", "-c", f': > "{f}"'], r"expected \d+ bytes as at open, found 0: the file was "
                                                            r"truncated during the run"),
    "truncate -s 1200K f": (lambda f, other: ["truncate", "-s", "1200K", str(f)],  # GNU's spelling of 1.2M
                            r"expected \d+ bytes as at open, found 1228800: the file was truncated during the run"),
    "cp other.h5 f": (lambda f, other: ["cp", str(other), str(f)],
                      r"expected the file unmodified since open \(mtime .*\), found it modified at .*: rewritten "
                      r"during the run"),
}


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("change", list(CHANGES))
def test_change_during_an_epoch_stops_the_next_read(data, change, prefetch):
    path, other = data
    command, pattern = CHANGES[change]
    with BatchReader(path, "train", rank=1, size=2, batch_size=128, prefetch=prefetch) as r:
        it = iter(r.epoch(0))
        first = next(it)
        assert first.n_local == 64
        subprocess.run(command(path, other), check=True)
        with pytest.raises(DataError) as info:
            for _ in range(5):  # prefetch may have read up to three batches before the change
                next(it)
        msg = str(info.value)
        assert msg.startswith(f"{path}: /train/images (rank 1): ") and "\n" not in msg, msg
        assert __import__("re").search(pattern, msg), msg
        with pytest.raises(DataError, match=f"^{path} \\(rank 1\\): " + pattern):
            r.verify_unchanged()


def test_no_batch_of_zeros_is_ever_returned_after_truncation(data):
    path, _ = data
    with BatchReader(path, "train", batch_size=1000, shuffle=False, prefetch=False) as r:
        it = iter(r.epoch(0))
        assert next(it).x.std() > 0.5
        os.truncate(path, 1258291)  # HDF5 now reads zeros for every row past 1.2 MB
        with pytest.raises(DataError, match="truncated during the run"):
            next(it)
        assert r.reads == 2  # the read happened; its zeros were not handed out


def test_a_fresh_reader_refuses_the_truncated_file(data):
    path, _ = data
    os.truncate(path, 1258291)
    with pytest.raises(DataError, match=r"data.h5: / \(rank 0\): expected a readable HDF5 file, got .*truncated"):
        BatchReader(path, "train")


def test_replaced_by_rename_or_deleted_is_reported_by_verify_unchanged(data, tmp_path):
    path, other = data
    with BatchReader(path, "val", prefetch=False) as r:
        r.verify_unchanged()  # nothing changed: silent
        staged = tmp_path / "staged.h5"
        shutil.copyfile(other, staged)
        os.replace(staged, path)  # e.g. a re-conversion onto the same name (atomic rename)
        with pytest.raises(DataError, match=r"data.h5 \(rank 0\): expected the file opened at start \(inode \d+\), "
                                            r"found another file at this path \(inode \d+\): it was replaced"):
            r.verify_unchanged()
        os.unlink(path)
        with pytest.raises(DataError, match=r"data.h5 \(rank 0\): expected the file opened at start to stay in place, "
                                            r"found no such file or directory: deleted or moved during the run"):
            r.verify_unchanged()


def test_ctime_only_change_is_settled_by_the_content_sha256(data):
    path, other = data
    with BatchReader(path, "train", prefetch=False) as r:
        opened = os.stat(path)
        os.chmod(path, 0o640)  # status change only: same bytes
        r.verify_unchanged()  # accepted after re-hashing every dataset
        # same size, the original mtime put back (as `cp -p` or `touch -r` would): only the
        # ctime tells, and the content sha256 recorded at open finds the changed label
        subprocess.run(["cp", str(other), str(path)], check=True)
        os.utime(path, ns=(opened.st_atime_ns, opened.st_mtime_ns))
        with pytest.raises(DataError, match=r"data.h5 \(rank 0\): expected the file untouched since open \(ctime .*\), "
                                            r"found its status changed at"):
            r.verify_unchanged()


def test_format_1_file_without_content_sums_treats_ctime_change_as_change(tmp_path):
    path = tmp_path / "v1.h5"
    with h5py.File(path, "w") as f:
        for s in ("train", "val", "test"):
            f[f"{s}/images"] = np.arange(5 * 784, dtype=np.uint8).reshape(5, 28, 28)
            f[f"{s}/labels"] = np.arange(5, dtype=np.uint8)
        f.attrs.update({"format_version": 1, "train_mean": 0.4, "train_std": 0.3})
    with BatchReader(path, "train", batch_size=5, prefetch=False) as r:
        os.chmod(path, 0o640)
        with pytest.raises(DataError, match="status changed"):
            r.verify_unchanged()
