"""Atomic file writes: a temporary file beside the target, fsync, rename, fsync the folder."""
import os
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path, suffix=".tmp"):
    """Yield a temporary path beside ``path`` to write; on success it replaces ``path``.

    The temporary file is fsynced, renamed onto ``path`` and the folder fsynced, so a crash
    leaves either the old file or the whole new one. On an exception the temporary file is
    removed and ``path`` is untouched. ``suffix`` ends the temporary name (np.savez wants .npz).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}{suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_dir(folder):
    """fsync a folder so that a rename in it is durable (a no-op where unsupported)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
