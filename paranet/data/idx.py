"""IDX files (the MNIST format): find the four files in a folder, parse them, check their sha256."""
import gzip
import hashlib
import zlib
from pathlib import Path

import numpy as np

from .errors import DataError

# The four MNIST files, by role; Fashion-MNIST uses the same names.
IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IMAGES_MAGIC = 2051  # 0x00000803: uint8, 3 dimensions
LABELS_MAGIC = 2049  # 0x00000801: uint8, 1 dimension


def find_idx_file(folder, name):
    """Return the path of IDX file `name` in `folder`: `name`, `name.gz`, or the `a-b.idxN` spelling."""
    folder = Path(folder)
    dotted = name.replace("-idx", ".idx")  # train-images.idx3-ubyte, as some copies name it
    for cand in (name + ".gz", name, dotted + ".gz", dotted):
        if (folder / cand).is_file():
            return folder / cand
    raise DataError(f"expected IDX file {name} or {name}.gz, found neither",
                    file=folder, dataset=name)


def read_bytes(path):
    """Return the uncompressed content of an IDX file, gzip or raw (decided by the gzip magic)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"expected a readable IDX file, got {e.strerror}", file=path, dataset="idx") from None
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"expected a complete gzip stream, got {type(e).__name__}: {e}",
                        file=path, dataset="gzip") from None


def parse_idx(data, path, magic):
    """Parse uint8 IDX bytes with the given magic; return (N,) labels or (N, 28, 28) images."""
    ndim = {IMAGES_MAGIC: 3, LABELS_MAGIC: 1}[magic]
    kind = "images" if magic == IMAGES_MAGIC else "labels"
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DataError(f"expected an IDX header of {header_len} bytes, got {len(data)} bytes",
                        file=path, dataset="idx header")
    got_magic = int.from_bytes(data[:4], "big")
    if got_magic != magic:
        raise DataError(f"expected IDX magic {magic} ({kind}), got {got_magic}",
                        file=path, dataset="idx header")
    dims = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    if ndim == 3 and dims[1:] != (28, 28):
        raise DataError(f"expected images of 28x28, got {dims[1]}x{dims[2]}",
                        file=path, dataset="idx header")
    expected_len = header_len + int(np.prod(dims))
    if len(data) != expected_len:
        raise DataError(f"expected {expected_len} bytes for {kind} of shape {dims}, got {len(data)}",
                        file=path, dataset="idx data")
    arr = np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(dims)
    if ndim == 1 and arr.size and int(arr.max()) > 9:
        bad = int(np.argmax(arr > 9))
        raise DataError(f"expected labels in 0..9, got {int(arr[bad])} at row {bad}",
                        file=path, dataset="idx data")
    return arr


def sha256_hex(data):
    """Return the hex sha256 of bytes."""
    return hashlib.sha256(data).hexdigest()


def read_sha256sums(folder):
    """Return {uncompressed name: sha256} from folder/SHA256SUMS, or {} if there is none."""
    sums_path = Path(folder) / "SHA256SUMS"
    if not sums_path.is_file():
        return {}
    sums = {}
    for line in sums_path.read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            sums[name.strip().lstrip("*")] = digest.lower()
    return sums


def load_mnist_idx(folder):
    """Read the four IDX files in folder; verify SHA256SUMS if present.

    Returns:
        (arrays, sources): arrays maps role -> uint8 array (train_images (N, 28, 28), ...);
        sources maps role -> {"file": name, "sha256": hex of uncompressed content}.
    """
    sums = read_sha256sums(folder)
    arrays, sources = {}, {}
    for role, name in IDX_NAMES.items():
        path = find_idx_file(folder, name)
        data = read_bytes(path)
        digest = sha256_hex(data)
        if name in sums and sums[name] != digest:
            raise DataError(f"expected sha256 {sums[name]} of the uncompressed content "
                            f"(from SHA256SUMS), got {digest}", file=path, dataset="sha256")
        magic = IMAGES_MAGIC if role.endswith("images") else LABELS_MAGIC
        arrays[role] = parse_idx(data, path, magic)
        sources[role] = {"file": path.name, "sha256": digest}
    for split in ("train", "test"):
        n_img, n_lab = len(arrays[split + "_images"]), len(arrays[split + "_labels"])
        if n_img != n_lab:
            raise DataError(f"expected as many labels as images ({n_img}), got {n_lab} labels",
                            file=Path(folder) / IDX_NAMES[split + "_labels"], dataset="idx data")
    return arrays, sources
