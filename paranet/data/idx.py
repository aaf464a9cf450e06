"""IDX files (MNIST, Fashion-MNIST): find the four files in a folder, parse them with bounded reads, check sha256."""
import gzip
import hashlib
import re
import zlib
from pathlib import Path

import numpy as np

from .errors import DataError

# The four files, by role; MNIST and Fashion-MNIST use the same names.
IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IMAGES_MAGIC = 2051  # 0x00000803: uint8, 3 dimensions
LABELS_MAGIC = 2049  # 0x00000801: uint8, 1 dimension
# The largest uncompressed IDX file accepted (MNIST's training images: 47 MB). A header
# that declares more is refused before anything is inflated; a gzip stream holding more
# than its header declares is refused after inflating one byte past the declared size.
MAX_IDX_BYTES = 1 << 30
_SUM_LINE = re.compile(r"^([0-9a-fA-F]{64}) [ *]?(\S.*)$")


def find_idx_file(folder, name):
    """Return the path of IDX file `name` in `folder`: `name`, `name.gz`, or the `a-b.idxN` spelling."""
    folder = Path(folder)
    dotted = name.replace("-idx", ".idx")  # train-images.idx3-ubyte, as some copies name it
    for cand in (name + ".gz", name, dotted + ".gz", dotted):
        if (folder / cand).is_file():
            return folder / cand
    raise DataError(f"expected IDX file {name} or {name}.gz, found neither",
                    file=folder, dataset=name)


def read_idx(path, magic, max_bytes=MAX_IDX_BYTES):
    """Read one uint8 IDX file (gzip or raw, decided by the gzip magic) with bounded reads.

    The header is read first; then exactly the declared number of data bytes plus one, so
    a gzip bomb (a stream that inflates far past its header) is refused after inflating at
    most max_bytes + 1 bytes, and a header that declares more than max_bytes before any.

    Returns:
        (array, sha256 hex of the uncompressed content): (N,) labels or (N, 28, 28) images.
    """
    path = Path(path)
    ndim = {IMAGES_MAGIC: 3, LABELS_MAGIC: 1}[magic]
    kind = "images" if magic == IMAGES_MAGIC else "labels"
    header_len = 4 + 4 * ndim
    try:
        with open(path, "rb") as raw:
            packed = raw.read(2) == b"\x1f\x8b"
            raw.seek(0)
            stream = gzip.GzipFile(fileobj=raw, mode="rb") if packed else raw
            header = stream.read(header_len)
            if len(header) < header_len:
                raise DataError(f"expected an IDX header of {header_len} bytes, got {len(header)} bytes",
                                file=path, dataset="idx header")
            got_magic = int.from_bytes(header[:4], "big")
            if got_magic != magic:
                raise DataError(f"expected IDX magic {magic} ({kind}), got {got_magic}",
                                file=path, dataset="idx header")
            dims = tuple(int.from_bytes(header[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
            if ndim == 3 and dims[1:] != (28, 28):
                raise DataError(f"expected images of 28x28, got {dims[1]}x{dims[2]}",
                                file=path, dataset="idx header")
            expected_len = header_len + int(np.prod(dims, dtype=object))
            if expected_len > max_bytes:
                raise DataError(f"expected at most {max_bytes} bytes of IDX data, the header declares "
                                f"{expected_len} (shape {dims})", file=path, dataset="idx header")
            body = stream.read(expected_len - header_len + 1)  # one byte more: is there any excess?
    except OSError as e:
        if isinstance(e, (gzip.BadGzipFile, EOFError)) or "gzip" in str(e).lower() or "compressed" in str(e):
            raise DataError(f"expected a complete gzip stream, got {type(e).__name__}: {e}",
                            file=path, dataset="gzip") from None
        raise DataError(f"expected a readable IDX file, got {e.strerror or e}", file=path, dataset="idx") from None
    except (EOFError, zlib.error) as e:
        raise DataError(f"expected a complete gzip stream, got {type(e).__name__}: {e}",
                        file=path, dataset="gzip") from None
    got_len = header_len + len(body)
    if got_len != expected_len:
        more = " or more" if got_len > expected_len else ""
        raise DataError(f"expected {expected_len} bytes for {kind} of shape {dims}, got {got_len}{more}",
                        file=path, dataset="idx data")
    data = header + body
    arr = np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(dims)
    if ndim == 1 and arr.size and int(arr.max()) > 9:
        bad = int(np.argmax(arr > 9))
        raise DataError(f"expected labels in 0..9, got {int(arr[bad])} at row {bad}",
                        file=path, dataset="idx data")
    return arr, hashlib.sha256(data).hexdigest()


def read_sha256sums(folder):
    """Return {uncompressed name: sha256} from folder/SHA256SUMS, or {} if there is none.

    Each non-blank line is ``<64 hex digits>  <name>`` (sha256sum's output; ``*name`` too).

    Raises:
        DataError: the file is not UTF-8 text or a line is not of that form (names the line).
    """
    sums_path = Path(folder) / "SHA256SUMS"
    if not sums_path.is_file():
        return {}
    try:
        text = sums_path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"expected UTF-8 text, got byte 0x{e.object[e.start]:02x} at offset {e.start}",
                        file=sums_path, dataset="SHA256SUMS") from None
    except OSError as e:
        raise DataError(f"expected a readable file, got {e.strerror or e}", file=sums_path,
                        dataset="SHA256SUMS") from None
    sums = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = _SUM_LINE.match(line.strip())
        if m is None:
            raise DataError(f"expected '<64 hex digits> <file name>' on line {number}, got {line.strip()[:60]!r}",
                            file=sums_path, dataset="SHA256SUMS")
        sums[m.group(2).strip()] = m.group(1).lower()
    return sums


def load_idx_set(folder):
    """Read the four IDX files in folder; verify SHA256SUMS if present.

    Returns:
        (arrays, sources): arrays maps role -> uint8 array (train_images (N, 28, 28), ...);
        sources maps role -> {"file": name, "sha256": hex of uncompressed content}.
    """
    sums = read_sha256sums(folder)
    arrays, sources = {}, {}
    for role, name in IDX_NAMES.items():
        path = find_idx_file(folder, name)
        magic = IMAGES_MAGIC if role.endswith("images") else LABELS_MAGIC
        arrays[role], digest = read_idx(path, magic)
        if name in sums and sums[name] != digest:
            raise DataError(f"expected sha256 {sums[name]} of the uncompressed content "
                            f"(from SHA256SUMS), got {digest}", file=path, dataset="sha256")
        sources[role] = {"file": path.name, "sha256": digest}
    for split in ("train", "test"):
        n_img, n_lab = len(arrays[split + "_images"]), len(arrays[split + "_labels"])
        if n_img != n_lab:
            raise DataError(f"expected as many labels as images ({n_img}), got {n_lab} labels",
                            file=Path(folder) / IDX_NAMES[split + "_labels"], dataset="idx data")
    return arrays, sources


load_mnist_idx = load_idx_set  # the name before Fashion-MNIST shared it
