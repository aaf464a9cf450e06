"""Download source files (MNIST, Fashion-MNIST, CIFAR-10) from mirrors into a cache, checking md5."""
import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

from .errors import DataError

# Tried in this order; a failed or corrupted download moves on to the next one.
MIRRORS = (  # MNIST
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
# md5 of the .gz bytes as published on the mirrors (the embedded copy differs: re-compressed).
MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}


# Fashion-MNIST (Zalando Research, MIT licence): the md5 of the .gz files published in its README.
FASHION_MIRRORS = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
)
FASHION_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
# CIFAR-10, binary version (Alex Krizhevsky): md5 from https://www.cs.toronto.edu/~kriz/cifar.html.
CIFAR10_MIRRORS = (
    "https://www.cs.toronto.edu/~kriz/",
    "https://mindspore-website.obs.cn-north-4.myhuaweicloud.com/notebook/datasets/",
)
CIFAR10_MD5 = {"cifar-10-binary.tar.gz": "c32a1d4ab5d03f1284b67883e8d87530"}


def default_cache_dir(name="mnist-idx"):
    """Return the folder downloads go to: $XDG_CACHE_HOME/paranet/<name> or ~/.cache/paranet/<name>."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "paranet" / name


def md5_file(path):
    """Return the hex md5 of a file's bytes."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fetch(url, dest, progress, timeout):
    """Stream url into dest, with a tqdm bar (named after the URL's file) when progress is true."""
    with urllib.request.urlopen(url, timeout=timeout) as resp, open(dest, "wb") as out:
        total = int(resp.headers.get("Content-Length") or 0) or None
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=total, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1])
        try:
            for block in iter(lambda: resp.read(1 << 16), b""):
                out.write(block)
                if bar is not None:
                    bar.update(len(block))
        finally:
            if bar is not None:
                bar.close()


def download_files(md5, mirrors, cache_dir, progress=True, timeout=30.0):
    """Make sure every file of `md5` is in cache_dir, downloading what is missing.

    A cached file is kept if its md5 matches. Each download goes to a temporary name,
    is checked against the published md5 and only then renamed; a failed or corrupted
    download is deleted and the next mirror is tried.

    Args:
        md5: {file name: md5 of its bytes as published}.
        mirrors: base URLs ending in "/", tried in order.
        cache_dir: folder for the files.
        progress: show a tqdm progress bar per file.
        timeout: seconds per connection attempt.

    Returns:
        The cache folder (Path).

    Raises:
        DataError: no mirror gave a file with the expected md5 (names each mirror's failure).
    """
    cache = Path(cache_dir)
    mirrors = list(mirrors)
    cache.mkdir(parents=True, exist_ok=True)
    for name in md5:
        dest = cache / name
        if dest.is_file() and md5_file(dest) == md5[name]:
            continue
        failures = []
        for base in mirrors:
            url = base.rstrip("/") + "/" + name
            tmp = cache / f".{name}.{os.getpid()}.tmp"
            try:
                _fetch(url, tmp, progress, timeout)
                got = md5_file(tmp)
                if got != md5[name]:
                    failures.append(f"{url}: md5 {got} != {md5[name]}")
                    continue
                os.replace(tmp, dest)
                break
            except (urllib.error.URLError, OSError, ValueError) as e:
                failures.append(f"{url}: {getattr(e, 'reason', e)}")
            finally:
                tmp.unlink(missing_ok=True)
        else:
            raise DataError(f"expected a download with md5 {md5[name]}, got none from "
                            f"{len(mirrors)} mirror(s): " + "; ".join(failures),
                            file=cache / name, dataset="download")
    return cache


def download_mnist(cache_dir=None, mirrors=None, md5=None, progress=True, timeout=30.0):
    """Make sure the four MNIST .gz files are in cache_dir (default: default_cache_dir()); see download_files."""
    return download_files(dict(MNIST_MD5 if md5 is None else md5), MIRRORS if mirrors is None else mirrors,
                          default_cache_dir() if cache_dir is None else cache_dir, progress, timeout)


def download_fashion_mnist(cache_dir=None, mirrors=None, md5=None, progress=True, timeout=30.0):
    """The four Fashion-MNIST .gz files into cache_dir (default ~/.cache/paranet/fashion-mnist-idx)."""
    return download_files(dict(FASHION_MD5 if md5 is None else md5),
                          FASHION_MIRRORS if mirrors is None else mirrors,
                          default_cache_dir("fashion-mnist-idx") if cache_dir is None else cache_dir,
                          progress, timeout)


def download_cifar10(cache_dir=None, mirrors=None, md5=None, progress=True, timeout=30.0):
    """cifar-10-binary.tar.gz into cache_dir (default ~/.cache/paranet/cifar10); returns the file's path."""
    md5 = dict(CIFAR10_MD5 if md5 is None else md5)
    cache = download_files(md5, CIFAR10_MIRRORS if mirrors is None else mirrors,
                           default_cache_dir("cifar10") if cache_dir is None else cache_dir, progress, timeout)
    return cache / next(iter(md5))
