"""Tests of format 2: write_dataset, any sample shape and dtype through BatchReader, format 1 still read, check."""
import hashlib
import json
import re

import h5py
import numpy as np
import pytest

from paranet.data import BatchReader, DataError, check_file, identity_mismatch, write_dataset
from paranet.data.__main__ import main

CASES = {  # name: (sample shape, feature dtype, label dtype, classes in the data, num_classes passed)
    "colour images uint8": ((3, 8, 8), np.uint8, np.int64, 5, None),
    "vectors float32": ((7,), np.float32, np.uint8, 3, None),
    "matrices float64, C above max label": ((4, 5), np.float64, np.int32, 4, 12),
}


def arrays(shape, dtype, label_dtype, classes, n, seed):
    """Random features (n, *shape) and labels 0..classes-1, every class present."""
    rng = np.random.default_rng(seed)
    if np.dtype(dtype) == np.uint8:
        X = rng.integers(0, 256, (n, *shape), np.uint8)
    else:
        X = (rng.standard_normal((n, *shape)) * 3 + 1.5).astype(dtype)
    y = (np.arange(n) % classes).astype(label_dtype)
    rng.shuffle(y)
    return X, y


def write(path, case, sizes=(50, 11, 9)):
    shape, dtype, ldt, classes, c = CASES[case]
    splits = [arrays(shape, dtype, ldt, classes, n, seed) for seed, n in enumerate(sizes)]
    write_dataset(path, train=splits[0], val=splits[1], test=splits[2], num_classes=c)
    return splits


def numpy_normalised(X, train_X):
    """The reference normalisation: scalar mean/std of /train in float64, uint8 on [0, 1]."""
    unit = 255.0 if X.dtype == np.uint8 else 1.0
    t = train_X.astype(np.float64) / unit
    return (X.astype(np.float64) / unit - t.mean()) / t.std()


@pytest.mark.parametrize("case", list(CASES))
def test_write_then_read_any_shape_and_dtype(tmp_path, case):
    shape, dtype, _, classes, c = CASES[case]
    (Xtr, ytr), (Xva, yva), (Xte, yte) = write(tmp_path / "d.h5", case)
    C = c or classes
    with h5py.File(tmp_path / "d.h5", "r") as f:
        a = f.attrs
        assert a["format_version"] == 2 and a["num_classes"] == C
        t = Xtr.astype(np.float64) / (255.0 if dtype == np.uint8 else 1.0)
        assert a["train_mean"] == pytest.approx(t.mean(), rel=1e-12)
        assert a["train_std"] == pytest.approx(t.std(), rel=1e-12)
        sums = json.loads(a["content_sha256"])
        little = Xtr.astype(np.dtype(dtype).newbyteorder("<"))
        assert sums["train/images"] == hashlib.sha256(little.tobytes()).hexdigest()
        assert sums["val/labels"] == hashlib.sha256(yva.astype(np.uint8).tobytes()).hexdigest()
        for s, X in (("train", Xtr), ("val", Xva), ("test", Xte)):
            assert f[f"{s}/images"].chunks is None and f[f"{s}/images"].shape == X.shape
            assert f[f"{s}/labels"].dtype == np.uint8
    for size in (1, 3):  # file order, gathered over ranks == numpy reference
        xs, ys = [], []
        for rank in range(size):
            with BatchReader(tmp_path / "d.h5", "val", rank=rank, size=size, batch_size=11, shuffle=False,
                             dtype=np.float64) as r:
                assert (r.sample_shape, r.num_classes, r.feature_dtype) == (shape, C, np.dtype(dtype))
                b = next(iter(r.epoch(0)))
                assert b.x.shape == (b.n_local, *shape) and b.y.shape == (b.n_local, C)
                xs.append(b.x)
                ys.append(b.y)
        assert np.allclose(np.concatenate(xs), numpy_normalised(Xva, Xtr), rtol=1e-12, atol=1e-12)
        assert np.array_equal(np.concatenate(ys), np.eye(C)[yva])


def test_zero_row_rank_gets_empty_arrays_of_the_sample_shape(tmp_path):
    write(tmp_path / "d.h5", "colour images uint8", sizes=(50, 11, 9))
    with BatchReader(tmp_path / "d.h5", "train", rank=3, size=4, batch_size=4) as r:  # 50 % 4 = 2 rows last
        last = list(r.epoch(0))[-1]
    assert last.n_local == 0 and last.x.shape == (0, 3, 8, 8) and last.y.shape == (0, 5)
    with BatchReader(tmp_path / "d.h5", "train", rank=3, size=4, batch_size=4, one_hot=False) as r:
        last = list(r.epoch(0))[-1]
    assert last.y.shape == (0,) and last.y.dtype == np.int64


def test_format_1_mnist_file_is_still_read(tmp_path):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (30, 28, 28), np.uint8), (np.arange(30) % 10).astype(np.uint8)
    with h5py.File(tmp_path / "v1.h5", "w") as f:
        for s in ("train", "val", "test"):
            f[f"{s}/images"], f[f"{s}/labels"] = images, labels
        f.attrs.update({"format_version": 1, "train_mean": 0.4, "train_std": 0.3})
    with BatchReader(tmp_path / "v1.h5", "test", batch_size=30, shuffle=False) as r:
        assert (r.format_version, r.num_classes, r.sample_shape, r.feature_dtype) == (1, 10, (28, 28), np.uint8)
        b = next(iter(r.epoch(0)))
        assert np.allclose(b.x, (images / 255.0 - 0.4) / 0.3, atol=1e-5)
        assert r.identity()["content_sha256"] is None
    lines = check_file(tmp_path / "v1.h5", ["test"])
    assert "none recorded (format 1 file)" in lines[-1]


def bad(X=None, y=None, split="train", **kw):
    """write_dataset arguments with one split replaced."""
    base = {s: ((np.full((6, 2, 3), i + 1.0) * np.arange(6).reshape(6, 1, 1)).astype(np.float32), np.arange(6) % 3)
            for i, s in enumerate(("train", "val", "test"))}
    if X is not None or y is not None:
        X0, y0 = base[split]
        base[split] = (X0 if X is None else X, y0 if y is None else y)
    return {**base, **kw}


def nan_at(row, split="train"):
    X = bad()[split][0].copy()
    X[row, 1, 2] = np.nan
    return X


WRITE_CASES = {
    "nan feature": (bad(X=nan_at(4)), r"/train/images: expected finite features, got nan at row 4"),
    "inf feature in val": (bad(X=np.where(np.arange(6)[:, None, None] == 2, np.float32(np.inf), bad()["val"][0]),
                               split="val"),
                           r"/val/images: expected finite features, got inf at row 2"),
    "label >= num_classes": (bad(num_classes=2), r"/train/labels: expected labels in 0..1, got 2 at row 2"),
    "negative label": (bad(y=np.array([0, 1, -1, 0, 1, 2]), split="test"),
                       r"/test/labels: expected labels >= 0, got -1 at row 2"),
    "length mismatch": (bad(y=np.arange(5) % 3), r"/train/labels: expected 6 labels \(one per sample in "
                                                 r"/train/images\), got 5"),
    "rank 1 features": (bad(X=np.zeros(6, np.float32)), r"/train/images: expected features of shape \(N, \.\.\.\) "
                                                        r"with at least one dimension per sample, got shape \(6,\)"),
    "int16 features": (bad(X=np.zeros((6, 2, 3), np.int16)),
                       r"expected features of dtype uint8, float32 or float64, got int16"),
    "float labels": (bad(y=np.zeros(6)), r"/train/labels: expected integer labels of shape \(N,\), got dtype float64 "
                                         r"shape \(6,\)$"),
    "one-hot float labels": (bad(y=np.eye(3)[np.arange(6) % 3]),
                             r"/train/labels: expected integer labels of shape \(N,\), got dtype float64 shape "
                             r"\(6, 3\) \(one-hot rows\? pass y.argmax\(axis=1\)\)$"),
    "one-hot int labels": (bad(y=np.eye(3, dtype=int)[np.arange(6) % 3]),
                           r"/train/labels: expected labels of shape \(N,\), got \(6, 3\) \(one-hot rows\? pass "
                           r"y.argmax\(axis=1\)\)$"),
    "labels of rank 2": (bad(y=np.zeros((6, 1), int)), r"/train/labels: expected labels of shape \(N,\), got \(6, 1\)"),
    "other sample shape in test": (bad(X=np.ones((6, 3, 2), np.float32), split="test"),
                                   r"/test/images: expected samples of shape \(2, 3\) and dtype float32 as in /train, "
                                   r"got \(3, 2\) float32"),
    "other dtype in val": (bad(X=np.ones((6, 2, 3), np.float64), split="val"),
                           r"/val/images: expected samples of shape \(2, 3\) and dtype float32 as in /train"),
    "empty train": (bad(X=np.zeros((0, 2, 3), np.float32), y=np.zeros(0, int)),
                    r"/train/images: expected a non-empty split, got 0 rows"),
    "no train": ({**bad(), "train": None}, r"/train: expected a non-empty train split \(X, y\), got None"),
    "empty val": (bad(X=np.zeros((0, 2, 3), np.float32), y=np.zeros(0, int), split="val"),
                  r"/val/images: expected a non-empty split, got 0 rows \(pass val=None to leave it out\)"),
    "one class": (bad(num_classes=1), r"expected at least 2 classes, got num_classes 1"),
    "constant features": (bad(X=np.ones((6, 2, 3), np.float32)),
                          r"/train/images: expected training features that vary \(std > 0\)"),
    "absurd scale": (bad(X=(np.full((6, 2, 3), 1e35) * np.arange(6).reshape(6, 1, 1)).astype(np.float32)),
                     r"expected attribute train_mean within \+-1e\+30, got .* \(computed from the training features\)"),
}


@pytest.mark.parametrize("case", list(WRITE_CASES))
def test_write_dataset_refuses_bad_input_with_one_line(tmp_path, case):
    kwargs, pattern = WRITE_CASES[case]
    out = tmp_path / "w.h5"
    out.write_bytes(b"previous")
    with pytest.raises(DataError) as info:
        write_dataset(out, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(str(out)), msg
    assert re.search(pattern, msg), msg
    assert out.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == ["w.h5"]


def test_good_base_of_the_bad_cases_writes(tmp_path):
    # the arrays the cases above break, unbroken, write and read (so each case fails for its defect only)
    write_dataset(tmp_path / "ok.h5", **bad())
    assert "  /train: 6 samples, per class: 2 2 2" in check_file(tmp_path / "ok.h5")


def v2(path, split="train", images=None, labels=None, **attrs):
    """A format 2 file written by hand (no validation): all splits valid unless overridden."""
    rng = np.random.default_rng(0)
    good = rng.standard_normal((8, 3, 4)).astype(np.float32), (np.arange(8) % 4).astype(np.int32)
    base = {"format_version": 2, "num_classes": 4, "train_mean": 0.0, "train_std": 1.0}
    base.update(attrs)
    with h5py.File(path, "w") as f:
        for s in ("train", "val", "test"):
            X, y = good
            if s == split:
                X = X if images is None else images
                y = y if labels is None else labels
            if X is not None:
                f.create_dataset(f"{s}/images", data=X) if not callable(X) else X(f, f"{s}/images")
            if y is not None:
                f[f"{s}/labels"] = y
        for k, v in base.items():
            if v is not None:
                f.attrs[k] = v
    return path


def chunked(f, name):
    f.create_dataset(name, data=np.zeros((8, 3, 4), np.float32), chunks=(2, 3, 4), compression="gzip")


READ_CASES = {
    "num_classes missing": (dict(num_classes=None), r"/ \(rank 0\): expected attribute num_classes, an integer >= 2, "
                                                    r"got None"),
    "num_classes a string": (dict(num_classes="ten"), r"expected attribute num_classes, an integer >= 2, got 'ten'"),
    "label >= num_classes": (dict(num_classes=3), r"/train/labels \(rank 0\): expected labels in 0..2, got 3 at row 3"),
    "negative int8 label": (dict(labels=np.array([0, 1, 2, 3, 0, -5, 1, 2], np.int8)),
                            r"/train/labels \(rank 0\): expected labels in 0..3, got -5 at row 5"),
    "float labels": (dict(labels=np.zeros(8, np.float32)), r"/train/labels \(rank 0\): expected an integer dtype, "
                                                           r"got float32"),
    "features of rank 1": (dict(images=np.zeros(8, np.float32)),
                           r"/train/images \(rank 0\): expected shape \(N, \.\.\.\) with at least one dimension per "
                           r"sample, got \(8,\)"),
    "int16 features": (dict(images=np.zeros((8, 3, 4), np.int16)),
                       r"/train/images \(rank 0\): expected dtype uint8, float32 or float64, got int16"),
    "chunked and compressed": (dict(images=chunked), r"/train/images \(rank 0\): expected a contiguous dataset "
                                                     r"\(as write_dataset writes it\), got chunks \(2, 3, 4\)"),
    "val of another shape": (dict(split="val", images=np.zeros((8, 4, 3), np.float32)),
                             r"/val/images \(rank 0\): expected samples of shape \(3, 4\) and dtype float32 as in "
                             r"/train/images, got \(4, 3\) float32"),
    "test labels too short": (dict(split="test", labels=np.zeros(7, np.int32)),
                              r"/test/labels \(rank 0\): expected 8 labels \(one per sample in /test/images\), got 7"),
    "mean nan": (dict(train_mean=np.nan), r"/ \(rank 0\): expected attribute train_mean to be finite, got nan"),
    "mean inf": (dict(train_mean=np.inf), r"expected attribute train_mean to be finite, got inf"),
    "mean 1e300": (dict(train_mean=1e300), r"expected attribute train_mean within \+-1e\+30, got 1e\+300"),
    "std 1e-300": (dict(train_std=1e-300), r"expected attribute train_std in 1e-30..1e\+30, got 1e-300"),
    "std a string": (dict(train_std="0.3"), r"expected attribute train_std to be a number, got '0.3'"),
    "std zero": (dict(train_std=0.0), r"expected attribute train_std in 1e-30..1e\+30, got 0.0"),
    "bad content_sha256": (dict(content_sha256="{not json"), r"expected attribute content_sha256 to be JSON"),
}


@pytest.mark.parametrize("case", list(READ_CASES))
def test_reader_and_check_refuse_bad_files(tmp_path, capsys, case):
    kw, pattern = READ_CASES[case]
    split = kw.pop("split", "train") if "split" in kw else "train"
    path = v2(tmp_path / "bad.h5", split=split, **kw)
    kw["split"] = split
    with pytest.raises(DataError) as info:
        BatchReader(path, split)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(str(path)) and re.search(pattern, msg), msg
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(pattern, err), err


def test_uint8_statistics_out_of_their_scale_are_refused(tmp_path):
    X = np.arange(48, dtype=np.uint8).reshape(3, 4, 4)
    write_dataset(tmp_path / "u.h5", train=(X, np.array([0, 1, 0])), val=(X, np.array([0, 1, 0])),
                  test=(X, np.array([0, 1, 0])))
    for key, value, pattern in (("train_mean", 1.5, r"train_mean in 0..1 \(uint8 features on the \[0, 1\] scale\), "
                                                    r"got 1.5"),
                                ("train_std", 0.9, r"train_std in 1e-12..0.5 .*got 0.9")):
        with h5py.File(tmp_path / "u.h5", "a") as f:
            saved, f.attrs[key] = f.attrs[key], value
        with pytest.raises(DataError, match=pattern):
            BatchReader(tmp_path / "u.h5", "train")
        with h5py.File(tmp_path / "u.h5", "a") as f:
            f.attrs[key] = saved
    BatchReader(tmp_path / "u.h5", "train").close()


def test_caller_expectations_of_classes_and_shape(tmp_path):
    write(tmp_path / "d.h5", "vectors float32")
    with pytest.raises(DataError, match=r"d.h5: / \(rank 0\): expected 10 classes \(as the caller's model\), got "
                                        r"num_classes 3 in the file"):
        BatchReader(tmp_path / "d.h5", "train", num_classes=10)
    with pytest.raises(DataError, match=r"/train/images \(rank 0\): expected samples of shape \(28, 28\) \(as the "
                                        r"caller's model\), got \(7,\)"):
        BatchReader(tmp_path / "d.h5", "train", sample_shape=(28, 28))
    BatchReader(tmp_path / "d.h5", "train", num_classes=3, sample_shape=[7]).close()


def test_non_finite_features_in_a_file_fail_the_batch_that_holds_them(tmp_path):
    X = np.linspace(-1, 1, 40, dtype=np.float64).reshape(10, 4)
    X[7, 2] = 1e300  # finite in float64, not once cast to the float32 training dtype
    v2(tmp_path / "f.h5", images=X, labels=np.arange(10) % 4, num_classes=4)
    with h5py.File(tmp_path / "f.h5", "a") as f:
        for s in ("val", "test"):
            del f[f"{s}/images"]
            f[f"{s}/images"] = np.zeros((8, 4))
            del f[f"{s}/labels"]
            f[f"{s}/labels"] = np.arange(8) % 4
    with BatchReader(tmp_path / "f.h5", "train", batch_size=5, shuffle=False) as r:
        it = iter(r.epoch(0))
        assert next(it).n_local == 5  # rows 0..4 are fine
        with pytest.raises(DataError, match=r"f.h5: /train/images \(rank 0\): expected finite features, got 1e\+300, "
                                            r"not finite once normalised .* at row 7"):
            next(it)
    with h5py.File(tmp_path / "f.h5", "a") as f:
        f["train/images"][3, 0] = np.nan
    with pytest.raises(DataError, match=r"/train/images \(rank 0\): expected finite features, got nan at row 3"):
        check_file(tmp_path / "f.h5")


def test_check_recomputes_statistics_and_content(tmp_path, capsys):
    write(tmp_path / "d.h5", "colour images uint8")
    assert main(["check", str(tmp_path / "d.h5")]) == 0
    out = capsys.readouterr().out
    assert "format 2, 5 classes, samples (3, 8, 8) uint8" in out and "/val: 11 samples" in out
    assert "content sha256: 6 datasets match" in out
    with h5py.File(tmp_path / "d.h5", "a") as f:
        f.attrs["train_mean"] = 0.25  # plausible, but not this data's
    assert main(["check", str(tmp_path / "d.h5")]) == 2
    assert re.search(r"d.h5: / \(rank 0\): expected attribute train_mean = 0.5\d+ \(recomputed from /train/images\), "
                     r"got 0.25\n$", capsys.readouterr().err)
    write(tmp_path / "e.h5", "colour images uint8")
    with h5py.File(tmp_path / "e.h5", "a") as f:
        f["test/labels"][4] = (f["test/labels"][4] + 1) % 5  # a valid label, but not the one converted
    assert main(["check", str(tmp_path / "e.h5")]) == 2
    assert re.search(r"e.h5: /test/labels \(rank 0\): expected content sha256 \w{16}\.\.\. as recorded, got \w{16}",
                     capsys.readouterr().err)


def test_identity_names_the_data_not_the_path(tmp_path):
    write(tmp_path / "a.h5", "vectors float32")
    write(tmp_path / "b.h5", "vectors float32")
    with BatchReader(tmp_path / "a.h5", "train") as ra, BatchReader(tmp_path / "b.h5", "val") as rb:
        ia, ib = ra.identity(), rb.identity()
    assert json.loads(json.dumps(ia)) == ia and ia["path"] != ib["path"]
    assert ia["splits"] == {"train": 50, "val": 11, "test": 9} and ia["sample_shape"] == [7]
    assert identity_mismatch(ia, ib) is None
    with h5py.File(tmp_path / "b.h5", "a") as f:
        f["val/labels"][0] = (f["val/labels"][0] + 1) % 3
    write(tmp_path / "c.h5", "colour images uint8")
    with BatchReader(tmp_path / "c.h5", "train") as rc:
        assert identity_mismatch(ia, rc.identity()) == "num_classes 3 != 5"
    with BatchReader(tmp_path / "b.h5", "train") as rb:  # the recorded sums are the file's: compare to a's
        assert identity_mismatch(ia, {**rb.identity(), "content_sha256": {**ia["content_sha256"],
                                                                          "val/labels": "0" * 64}}) \
            == "content_sha256 of val/labels differs"


def test_unwritable_location_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(DataError, match=r"file/sub/d.h5: expected a writable location, got .*Not a directory"):
        write_dataset(tmp_path / "file" / "sub" / "d.h5", **bad())
    with pytest.raises(DataError, match=r"expected a file to write, got a directory"):
        write_dataset(tmp_path, **bad())


def test_val_and_test_are_optional(tmp_path):
    X, y = bad()["train"]
    write_dataset(tmp_path / "t.h5", train=(X, y))
    with h5py.File(tmp_path / "t.h5", "r") as f:
        assert sorted(f) == ["train"] and sorted(json.loads(f.attrs["content_sha256"])) == ["train/images",
                                                                                          "train/labels"]
    with BatchReader(tmp_path / "t.h5", "train") as r:
        assert r.identity()["splits"] == {"train": 6}
    lines = check_file(tmp_path / "t.h5")
    assert lines[2:4] == ["  /val: none in this file (training skips it)", "  /test: none in this file (training skips it)"]
    with pytest.raises(DataError, match=r"t.h5: /test/images \(rank 0\): expected a dataset, found none"):
        BatchReader(tmp_path / "t.h5", "test")
