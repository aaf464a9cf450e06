"""DataError: the one exception the data layer raises for bad input, as a one-line message."""


class DataError(Exception):
    """Bad input data: a missing, malformed or inconsistent file, dataset or argument.

    ``str(err)`` is one line naming the file, the dataset path, the rank (when known)
    and what was expected versus what was found, e.g.::

        /data/mnist.h5: /train/labels (rank 2): expected labels in 0..9, got 12 at row 345

    Attributes:
        file: the file involved (str), or None.
        dataset: the dataset path inside it (e.g. ``/train/images``), or None.
        rank: the MPI rank that hit the error, or None.
        detail: the expected-versus-actual part of the message.
    """

    def __init__(self, detail, file=None, dataset=None, rank=None):
        self.file = None if file is None else str(file)
        self.dataset = dataset
        self.rank = rank
        self.detail = " ".join(str(detail).split())  # one line, whatever the cause said
        super().__init__(self._format())

    def _format(self):
        """Join file, dataset path, rank and detail into one line."""
        where = ""
        if self.file is not None:
            where = self.file
        if self.dataset is not None:
            where = f"{where}: {self.dataset}" if where else self.dataset
        if self.rank is not None:
            where = f"{where} (rank {self.rank})" if where else f"rank {self.rank}"
        return f"{where}: {self.detail}" if where else self.detail
