"""paranet as users get it: a wheel, installed outside the repository, run from another folder.

The wheel is built from the package files alone (pyproject.toml, README.md, paranet/) with the
test environment's setuptools (no network), installed with ``pip install --target`` into a
folder that comes first on PYTHONPATH, and run from a folder that is not the checkout."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from launch import MPIEXEC, REPO, env


def _run(cmd, cwd, extra_env, timeout=120):
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=extra_env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(wheel, site folder, environment): the wheel built and installed away from the checkout."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "paranet", src / "paranet", ignore=shutil.ignore_patterns("__pycache__"))
    proc = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", root / "dist",
                 src], root, env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = (root / "dist").glob("paranet-*.whl")
    site = root / "site"
    proc = _run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", site, wheel], root, env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    home = root / "home"
    home.mkdir()
    e = env(PYTHONPATH=site, HOME=home)
    e.pop("XDG_CACHE_HOME", None)
    return wheel, site, e


def test_the_wheel_holds_every_module_of_the_package_and_nothing_else(installed):
    wheel, _, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    modules = sorted(str(p.relative_to(REPO)) for p in (REPO / "paranet").rglob("*.py"))
    assert sorted(n for n in names if n.endswith(".py")) == modules
    assert all(n.startswith(("paranet/", "paranet-")) for n in names), names  # no datasets/, tests/, bench/
    assert not any("datasets" in n or n.endswith((".gz", ".h5")) for n in names)


@pytest.mark.mpi
def test_the_installed_wheel_trains_on_two_ranks_from_another_folder(installed, mnist_h5, tmp_path):
    _, site, e = installed
    where = _run([sys.executable, "-c", "import paranet; print(paranet.__file__)"], tmp_path, e)
    assert Path(where.stdout.strip()).is_relative_to(site), where.stdout + where.stderr  # not the checkout
    proc = _run([MPIEXEC, "-n", 2, sys.executable, "-m", "paranet.train", "--data", mnist_h5, "--max-steps", 5,
                 "--checkpoint", "ck.h5", "--metrics", "m.json"], tmp_path, e)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("paranet: world size 2") and (tmp_path / "ck.h5").is_file()
    assert (tmp_path / "m.json").is_file() and proc.stderr.count("Traceback") == 0


def test_an_installed_paranet_knows_it_has_no_embedded_mnist(installed, tmp_path):
    """Without --data it would build ~/.cache/paranet/mnist.h5 from a download, and its --help and
    first-use line say so instead of promising the embedded copy."""
    _, site, e = installed
    proc = _run([sys.executable, "-c", "from paranet.data.prepare import default_data_path, default_dataset_origin; "
                 "print(default_data_path()); print(default_dataset_origin())"], tmp_path, e)
    assert proc.returncode == 0, proc.stderr
    path, origin = proc.stdout.splitlines()
    assert path == os.path.join(e["HOME"], ".cache", "paranet", "mnist.h5")
    assert origin.startswith("a download of MNIST (an installed paranet has no embedded copy")
    console = site / "bin" / "paranet-train"
    help_text = _run([console, "--help"], tmp_path, e)
    assert help_text.returncode == 0, help_text.stderr
    assert "else from a download" in " ".join(help_text.stdout.split())
