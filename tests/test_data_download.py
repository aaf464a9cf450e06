"""Tests of the MNIST download against an HTTP server on 127.0.0.1: md5 check, next mirror, cache, bar."""
import hashlib
import http.server
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest

from paranet.data import DataError, prepare_mnist
from paranet.data import download as download_mod
from paranet.data import prepare as prepare_mod

EMBEDDED = Path(__file__).resolve().parents[1] / "datasets" / "mnist"
NAMES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
         "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]


@pytest.fixture
def serve(tmp_path):
    """Start HTTP servers on 127.0.0.1, one per folder; yield a function folder -> base URL."""
    servers = []

    def start(folder):
        handler = lambda *a, **k: QuietHandler(*a, directory=str(folder), **k)  # noqa: E731
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        srv.requests = []
        handler.server = srv
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return srv, f"http://127.0.0.1:{srv.server_address[1]}/mnist/"

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder under /mnist/, records the paths asked for, logs nothing."""

    def translate_path(self, path):
        self.server.requests.append(path)
        return super().translate_path(path.replace("/mnist/", "/", 1))

    def log_message(self, *args):
        pass


def mirror(tmp_path, name, corrupt=()):
    """A folder with the four embedded .gz files; those in `corrupt` get bytes flipped or cut."""
    folder = tmp_path / name
    folder.mkdir()
    for n in NAMES:
        data = bytearray((EMBEDDED / n).read_bytes())
        if n in corrupt:
            data = data[: len(data) // 2]  # a truncated transfer
            data[100] ^= 0xFF
        (folder / n).write_bytes(bytes(data))
    return folder


def md5s():
    return {n: hashlib.md5((EMBEDDED / n).read_bytes()).hexdigest() for n in NAMES}


def test_corrupted_mirror_falls_through_to_the_next(tmp_path, serve):
    bad_srv, bad = serve(mirror(tmp_path, "bad", corrupt=NAMES[:2]))
    good_srv, good = serve(mirror(tmp_path, "good"))
    cache = tmp_path / "cache"
    got = download_mod.download_mnist(cache, mirrors=[bad, good], md5=md5s(), progress=True)
    assert got == cache
    for n in NAMES:
        assert (cache / n).read_bytes() == (EMBEDDED / n).read_bytes()
    # the two corrupted files were fetched from both mirrors, the two good ones only from the first
    assert sorted(good_srv.requests) == sorted("/mnist/" + n for n in NAMES[:2])
    assert len(bad_srv.requests) == 4
    assert not list(cache.glob("*.tmp")) and not list(cache.glob(".*.tmp"))


def test_progress_bar_is_shown(tmp_path, serve, capsys):
    _, url = serve(mirror(tmp_path, "good"))
    download_mod.download_mnist(tmp_path / "c", mirrors=[url], md5=md5s(), progress=True)
    err = capsys.readouterr().err
    assert "train-images-idx3-ubyte.gz" in err and "9.72M/9.72M" in err


def test_cache_is_reused_without_network(tmp_path, serve):
    srv, url = serve(mirror(tmp_path, "good"))
    cache = tmp_path / "c"
    download_mod.download_mnist(cache, mirrors=[url], md5=md5s(), progress=False)
    n_requests = len(srv.requests)
    download_mod.download_mnist(cache, mirrors=["http://127.0.0.1:9/"], md5=md5s(), progress=False)
    assert len(srv.requests) == n_requests == 4


def test_every_mirror_corrupted_is_a_data_error(tmp_path, serve):
    _, a = serve(mirror(tmp_path, "a", corrupt=NAMES))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: download: expected a download with md5 "
                                        r"\w{32}, got none from 2 mirror\(s\): .*md5 .*127.0.0.1:9"):
        download_mod.download_mnist(tmp_path / "c", mirrors=[a, "http://127.0.0.1:9/"], md5=md5s(),
                                    progress=False, timeout=5)
    assert not (tmp_path / "c" / NAMES[0]).exists()


def test_published_md5_is_the_default_check(tmp_path, serve):
    # The embedded .gz files were re-compressed, so the published md5 must reject them.
    assert download_mod.MNIST_MD5["train-images-idx3-ubyte.gz"] == "f68b3c2dcbeaaa9fbdd348bbdeb94873"
    _, url = serve(mirror(tmp_path, "good"))
    with pytest.raises(DataError, match="md5 .* != f68b3c2dcbeaaa9fbdd348bbdeb94873"):
        download_mod.download_mnist(tmp_path / "c", mirrors=[url], progress=False)


def test_prepare_downloads_when_no_embedded_copy(tmp_path, serve, monkeypatch, mnist_h5):
    monkeypatch.setattr(prepare_mod, "EMBEDDED_DIR", tmp_path / "absent")
    _, bad = serve(mirror(tmp_path, "bad", corrupt=NAMES))
    _, good = serve(mirror(tmp_path, "good"))
    out = prepare_mnist(tmp_path / "dl.h5", cache_dir=tmp_path / "cache", mirrors=[bad, good], md5=md5s(),
                        progress=False)
    with h5py.File(out, "r") as f, h5py.File(mnist_h5, "r") as f0:
        assert f.attrs["source"].startswith("download:")
        assert np.array_equal(f["train/images"][:], f0["train/images"][:])
        assert np.array_equal(f["test/labels"][:], f0["test/labels"][:])
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(NAMES)


def test_an_install_without_the_embedded_copy_says_so_and_how_to_go_on_offline(tmp_path, monkeypatch):
    """An installed wheel has no datasets/mnist/: the first-use line says MNIST is downloaded (not
    "the embedded MNIST"), and a failed download's one line says how to give local IDX files."""
    assert prepare_mod.default_dataset_origin() == "the embedded MNIST"  # this source checkout
    monkeypatch.setattr(prepare_mod, "EMBEDDED_DIR", tmp_path / "absent")
    assert prepare_mod.default_dataset_origin().startswith("a download of MNIST (an installed paranet has no embedded")
    with pytest.raises(DataError) as e:
        prepare_mnist(tmp_path / "m.h5", cache_dir=tmp_path / "cache", mirrors=["http://127.0.0.1:9/"], md5=md5s(),
                      progress=False)
    line = str(e.value)
    assert "\n" not in line and line.startswith(f"{tmp_path / 'cache' / NAMES[0]}: download: expected a download")
    assert line.endswith("; without a network, give IDX files you have: python -m paranet.data mnist --source DIR "
                         "--out FILE")
    assert not (tmp_path / "m.h5").exists()


def test_fashion_mnist_download_falls_through_to_the_next_mirror(tmp_path, serve):
    import gzip
    from paranet.data import prepare_fashion_mnist
    from test_data_convert import idx_set
    data = idx_set(tmp_path / "good")
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in (tmp_path / "good").iterdir():
        (bad / p.name).write_bytes(p.read_bytes()[:-30])  # truncated transfers
    sums = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in (tmp_path / "good").iterdir()}
    bad_srv, bad_url = serve(bad)
    good_srv, good_url = serve(tmp_path / "good")
    out = prepare_fashion_mnist(tmp_path / "f.h5", cache_dir=tmp_path / "cache", mirrors=[bad_url, good_url],
                                md5=sums, val_size=5, progress=False)
    assert len(bad_srv.requests) == len(good_srv.requests) == 4
    with h5py.File(out, "r") as f:
        assert f.attrs["source"].startswith("download:") and f.attrs["dataset"] == "fashion-mnist"
        assert np.array_equal(f["test/labels"][:], data["t10k"][1])
        assert np.array_equal(f["test/images"][:],
                              np.frombuffer(gzip.decompress((tmp_path / "good" / "t10k-images-idx3-ubyte.gz")
                                                            .read_bytes())[16:], np.uint8).reshape(-1, 28, 28))
    # the default check is the published md5 of Fashion-MNIST, which these generated files fail
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: download: .*md5 \w+ != "
                                        r"8d4fb7e6c68d591d4c3dfef9ec88bf0d"):
        prepare_fashion_mnist(tmp_path / "g.h5", cache_dir=tmp_path / "c2", mirrors=[good_url], progress=False)


def test_cifar10_download_checks_md5_and_uses_the_cache(tmp_path, serve):
    from paranet.data import prepare_cifar10
    from test_data_convert import cifar_tarball
    (tmp_path / "good").mkdir()
    (tmp_path / "bad").mkdir()
    batches = cifar_tarball(tmp_path / "good" / "cifar-10-binary.tar.gz")
    data = (tmp_path / "good" / "cifar-10-binary.tar.gz").read_bytes()
    (tmp_path / "bad" / "cifar-10-binary.tar.gz").write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    md5 = {"cifar-10-binary.tar.gz": hashlib.md5(data).hexdigest()}
    bad_srv, bad_url = serve(tmp_path / "bad")
    good_srv, good_url = serve(tmp_path / "good")
    out = prepare_cifar10(tmp_path / "c.h5", cache_dir=tmp_path / "cache", mirrors=[bad_url, good_url], md5=md5,
                          val_size=4, progress=False)
    with h5py.File(out, "r") as f:
        assert np.array_equal(f["test/labels"][:], batches["test_batch.bin"][:, 0])
    assert (tmp_path / "cache" / "cifar-10-binary.tar.gz").read_bytes() == data
    prepare_cifar10(tmp_path / "d.h5", cache_dir=tmp_path / "cache", mirrors=["http://127.0.0.1:9/"], md5=md5,
                    val_size=4, progress=False)  # cached: no network
    assert len(good_srv.requests) == len(bad_srv.requests) == 1
    assert download_mod.CIFAR10_MD5 == {"cifar-10-binary.tar.gz": "c32a1d4ab5d03f1284b67883e8d87530"}
