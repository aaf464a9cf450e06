"""Shared pytest fixtures: the full MNIST HDF5 file, built once per test session."""
import pytest


@pytest.fixture(scope="session")
def mnist_h5(tmp_path_factory):
    """Path of the full MNIST file converted from the embedded IDX copy (val_size 5000, seed 0)."""
    from paranet.data import prepare_mnist
    return prepare_mnist(tmp_path_factory.mktemp("mnist") / "mnist.h5", progress=False)
