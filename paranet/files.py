"""Output files: atomic writes (temporary file, fsync, rename), start-up checks, stale temporaries.

Every file paranet writes goes through ``atomic_path``, so a reader sees the old file or the
whole new one, never a part. ``check_output`` finds an unwritable output before training
starts rather than after an epoch; ``cleanup_stale`` removes the temporary files that a
SIGKILL in the middle of a write leaves behind.
"""
import os
import re
from contextlib import contextmanager
from pathlib import Path


class OutputError(OSError):
    """An output file cannot be written; the message is one line naming the file."""


@contextmanager
def atomic_path(path, suffix=".tmp", before_replace=None):
    """Yield a temporary path beside ``path`` to write; on success it replaces ``path``.

    The temporary file is fsynced, renamed onto ``path`` and the folder fsynced, so a crash
    leaves either the old file or the whole new one. On an exception the temporary file is
    removed and ``path`` is untouched. ``suffix`` ends the temporary name (np.savez wants .npz).
    ``before_replace()``, if given, runs after the new file is complete and synced and just
    before it replaces ``path`` (checkpoint rotation uses it).

    An OSError while writing (a full disk, a read-only file system) is raised as an OutputError
    naming ``path``; removing the temporary file afterwards never replaces that error with one
    of its own (on a read-only file system even unlinking a missing file fails).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{path}: cannot create its directory {path.parent} ({_reason(e)})") from e
    tmp = temp_name(path, suffix)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OutputError:
        raise
    except OSError as e:
        raise OutputError(f"{path}: cannot write ({_reason(e)}); the previous file, if any, is unchanged") from e
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # e.g. EROFS: the write already failed with the error that matters


@contextmanager
def new_h5(tmp):
    """An h5py.File writing a new file at ``tmp`` (atomic_path's temporary), which Python creates.

    Python's ``open(tmp, "x+b")`` makes the file and h5py writes through that file object, not
    through HDF5's own open: a failure then is an OSError with the system's reason ("Not a
    directory") rather than HDF5's wording ("can't retrieve stat info for file"), which is what a
    folder moved away between HDF5's open and its stat gave; same speed (120 MB: 0.026 s both).
    """
    import h5py

    with open(tmp, "x+b") as fh, h5py.File(fh, "w") as f:
        yield f


def temp_name(path, suffix=".tmp"):
    """The temporary name atomic_path writes ``path`` through: ``.<name>.<pid>.<8 hex><suffix>``."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}{suffix}")


def _reason(e):
    """An OSError's reason without the file name that OSError's str() repeats."""
    return e.strerror or str(e)


def check_output(path, flag="output", need_bytes=0):
    """Check, before any work is done, that ``path`` can be written by atomic_path.

    Raises OutputError with one line naming ``flag`` and ``path`` when ``path`` is a directory,
    its directory cannot be created or written (a temporary file is created and removed there,
    which also catches a read-only file system as root), or fewer than ``need_bytes`` bytes are
    free there. Creates the directory, as atomic_path would.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{flag} {path}: is a directory, expected a file name")
    if path.exists() and not path.is_file():
        raise OutputError(f"{flag} {path}: exists and is not a regular file")
    folder = path.parent
    above = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if above is not None and not above.is_dir():
        raise OutputError(f"{flag} {path}: {above} is a file, not a directory")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{flag} {path}: cannot create directory {folder} ({_reason(e)})") from None
    probe = temp_name(path, ".probe")
    try:
        with open(probe, "xb"):
            pass
    except OSError as e:
        raise OutputError(f"{flag} {path}: directory {folder} is not writable ({_reason(e)})") from None
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass
    if need_bytes:
        st = os.statvfs(folder)
        free = st.f_bavail * st.f_frsize
        if free < need_bytes:
            raise OutputError(f"{flag} {path}: {free:,} bytes free in {folder}, a write needs about {need_bytes:,}")


def _stale_pattern(path):
    return re.compile(rf"^\.{re.escape(Path(path).name)}\.(\d+)\.[0-9a-f]{{8}}(\.[A-Za-z0-9]+)?$")


def _alive(pid):
    """Whether a process ``pid`` exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def cleanup_stale(path, started=None):
    """Remove the temporary files of ``path`` (``.<name>.<pid>.<hex>.<ext>`` beside it) that an
    interrupted write left behind; returns the removed paths.

    A temporary file is stale when the process that wrote it no longer exists on this machine,
    or, when ``started`` (a time.time() value: the start of this run) is given, when it was last
    modified before that. Call it while holding the run's RunLock: then no other run writes
    ``path``, and on shared storage a writer on another machine cannot be mistaken for a dead one.
    Files of this process are never removed.
    """
    path = Path(path)
    pattern = _stale_pattern(path)
    removed = []
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = pattern.match(entry.name)
        if not m or not entry.is_file():
            continue
        pid = int(m.group(1))
        if pid == os.getpid():
            continue
        try:
            old = started is not None and entry.stat().st_mtime < started
        except OSError:
            continue
        if old or not _alive(pid):
            try:
                entry.unlink()
                removed.append(entry)
            except OSError:
                pass
    return removed


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
