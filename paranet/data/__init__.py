"""paranet.data: classification datasets in HDF5 — writing, converters and the per-rank batch reader.

Depends only on numpy and h5py (tqdm for the download bar); never imports mpi4py.

Public API:
    DataError                 every bad-input case, as a one-line message
    write_dataset(path, ...)  a file from (X, y) arrays for train, val and test, atomically
    prepare_mnist, prepare_fashion_mnist, prepare_cifar10, prepare_npz   the converters
    check_file(path)          validate a whole file (every row, statistics, content sha256)
    BatchReader, Batch        this rank's shard of every global batch
    identity_mismatch         compare two BatchReader.identity() records (resume onto other data)
    default_data_path()       where the default (MNIST) file lives
    ensure_default_dataset    build the default file if it is missing or of an older format
"""
from .check import check_file
from .cifar import prepare_cifar10
from .errors import DataError
from .format import FORMAT_VERSION
from .npz import prepare_npz
from .prepare import default_data_path, ensure_default_dataset, prepare_fashion_mnist, prepare_mnist
from .reader import Batch, BatchReader, identity_mismatch
from .write import write_dataset

__all__ = ["DataError", "write_dataset", "prepare_mnist", "prepare_fashion_mnist", "prepare_cifar10",
           "prepare_npz", "check_file", "default_data_path", "ensure_default_dataset", "BatchReader", "Batch",
           "identity_mismatch", "FORMAT_VERSION"]
