"""paranet.data: MNIST in HDF5 — preparation (IDX -> .h5) and the per-rank batch reader.

Depends only on numpy and h5py (tqdm for the download bar); never imports mpi4py.

Public API:
    DataError               every bad-input case, as a one-line message
    prepare_mnist(out, ...) convert MNIST IDX files into one HDF5 file, atomically
    default_data_path()     where the default HDF5 file lives
    ensure_default_dataset  build the default file if it is missing
    BatchReader, Batch      this rank's shard of every global batch
"""
from .errors import DataError
from .prepare import FORMAT_VERSION, default_data_path, ensure_default_dataset, prepare_mnist
from .reader import Batch, BatchReader

__all__ = ["DataError", "prepare_mnist", "default_data_path", "ensure_default_dataset",
           "BatchReader", "Batch", "FORMAT_VERSION"]
