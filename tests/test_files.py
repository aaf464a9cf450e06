"""paranet.files: an atomic write lands whole or leaves the old file untouched, a failed write is
one line naming the file, and outputs are checked before any work is done."""
import shutil
import subprocess
import sys

import pytest

from launch import REPO, env
from paranet import files
from paranet.files import atomic_path


def test_success_replaces_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out" / "f.txt"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_text("new")
        assert not target.exists()  # nothing visible until the block ends
    assert target.read_text() == "new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["f.txt"]


def test_failure_keeps_the_old_file(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


# -- a write that fails is one line naming the file; the cleanup never hides the error ------


def _unshare_ok():
    """Whether this machine lets us mount a read-only tmpfs in a user+mount namespace."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-r", "-m", "sh", "-c", "mount -t tmpfs -o ro tmpfs /mnt"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


needs_readonly_fs = pytest.mark.skipif(not _unshare_ok(), reason="needs unshare -r -m to mount a read-only tmpfs")


def _on_readonly_fs(tmp_path, code):
    """Run ``code`` with a read-only file system at tmp_path/ro (which holds a folder "d")."""
    ro = tmp_path / "ro"
    ro.mkdir()
    script = (f"mount -t tmpfs tmpfs {ro} && mkdir {ro}/d && echo old > {ro}/d/f.txt && "
              f"mount -o remount,ro {ro} && exec {sys.executable} -c \"$0\"")
    return subprocess.run(["unshare", "-r", "-m", "sh", "-c", script, code], capture_output=True, text=True,
                          env=env(), cwd=REPO, timeout=60)


@needs_readonly_fs
def test_read_only_file_system_is_one_error_naming_the_file(tmp_path):
    ro = tmp_path / "ro"
    proc = _on_readonly_fs(tmp_path, f"""
from paranet.files import atomic_path
try:
    with atomic_path("{ro}/d/f.txt") as tmp:
        tmp.write_text("new")
except OSError as e:
    print(type(e).__name__ + ":", e, "| cause:", type(e.__cause__).__name__)
print(open("{ro}/d/f.txt").read().strip())
""")
    assert proc.returncode == 0, proc.stderr
    first, content = proc.stdout.splitlines()
    assert first.startswith(f"OutputError: {ro}/d/f.txt: cannot write (Read-only file system)"), proc.stdout
    assert "cause: OSError" in first and content == "old"  # the write's own error, the old file intact


def test_a_failing_cleanup_does_not_replace_the_first_error(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="the first error"):
        with atomic_path(target) as tmp:
            tmp.mkdir()  # unlinking a folder fails: IsADirectoryError must not hide the error below
            (tmp / "x").write_text("")
            raise RuntimeError("the first error")
    assert target.read_text() == "old"


FULL = """
import resource, signal, sys
from paranet.files import atomic_path, OutputError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
    with atomic_path(sys.argv[1]) as tmp:
        tmp.write_bytes(b"x" * 100000)
except OutputError as e:
    print(e)
"""


def test_a_write_that_fails_late_is_one_line_and_leaves_the_old_file(tmp_path):
    target = tmp_path / "ck.h5"
    target.write_text("old")
    proc = subprocess.run([sys.executable, "-c", FULL, str(target)], capture_output=True, text=True, env=env(),
                          cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{target}: cannot write (File too large); the previous file, if any, is unchanged\n"
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["ck.h5"]


def test_an_hdf5_temporary_is_created_by_python_so_its_error_is_the_systems(tmp_path):
    """new_h5 opens the temporary file itself: a folder that went away gives the system's reason,
    which atomic_path reports in its one line; h5py.File(path, "w") would report HDF5's long text."""
    import h5py

    target = tmp_path / "gone" / "ck.h5"
    with pytest.raises(FileNotFoundError) as e:
        with files.new_h5(target) as f:
            f["x"] = 1
    assert e.value.strerror == "No such file or directory"
    with pytest.raises(files.OutputError) as e:
        with atomic_path(target) as tmp:
            target.parent.rmdir()
            with files.new_h5(tmp):
                pass
    assert str(e.value) == f"{target}: cannot write (No such file or directory); the previous file, if any, is unchanged"
    with files.new_h5(tmp_path / "ok.h5") as f:  # and what it writes is an ordinary HDF5 file
        f["x"] = [1.5, 2.5]
    with h5py.File(tmp_path / "ok.h5", "r") as f:
        assert f["x"][:].tolist() == [1.5, 2.5]


# -- outputs checked before training ---------------------------------------------------------


def test_check_output_accepts_a_new_file_and_creates_its_folder(tmp_path):
    files.check_output(tmp_path / "new" / "m.json", "--metrics")
    assert (tmp_path / "new").is_dir() and list((tmp_path / "new").iterdir()) == []  # the probe is gone


def test_check_output_refuses_a_directory(tmp_path):
    with pytest.raises(files.OutputError) as info:
        files.check_output(tmp_path, "--metrics")
    assert str(info.value) == f"--metrics {tmp_path}: is a directory, expected a file name"


def test_check_output_refuses_a_folder_under_a_file(tmp_path):
    (tmp_path / "plain").write_text("")
    with pytest.raises(files.OutputError) as info:
        files.check_output(tmp_path / "plain" / "sub" / "ck.h5", "--checkpoint")
    assert str(info.value) == f"--checkpoint {tmp_path}/plain/sub/ck.h5: {tmp_path}/plain is a file, not a directory"


def test_check_output_refuses_too_little_space(tmp_path):
    with pytest.raises(files.OutputError, match=r"bytes free in .*, a write needs about"):
        files.check_output(tmp_path / "ck.h5", "--checkpoint", need_bytes=2**62)


@needs_readonly_fs
def test_check_output_refuses_a_read_only_file_system_even_as_root(tmp_path):
    ro = tmp_path / "ro"
    proc = _on_readonly_fs(tmp_path, f"""
from paranet import files
try:
    files.check_output("{ro}/d/ck.h5", "--checkpoint")
except files.OutputError as e:
    print(e)
""")
    assert proc.stdout == f"--checkpoint {ro}/d/ck.h5: directory {ro}/d is not writable (Read-only file system)\n", \
        proc.stderr
