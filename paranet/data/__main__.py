"""Command line of paranet.data: convert datasets (mnist, fashion-mnist, cifar10, npz) to HDF5, `check` a file."""
import argparse
import sys

from .errors import DataError


class _Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """Show "(default: X)" except where X is None (those helps say what None means)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def _int_in(low, high=None):
    """An argparse type: an integer in low..high (high exclusive, None for no bound)."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value >= high):
            bound = f">= {low}" if high is None else f"in {low}..{high - 1}"
            raise argparse.ArgumentTypeError(f"expected an integer {bound}, got {value}")
        return value
    parse.__name__ = "integer"
    return parse


SEED = _int_in(0, 2 ** 64)
COUNT = _int_in(0)


def _download_args(p, what, cache):
    p.add_argument("--out", required=True, help="the HDF5 file to write (never one of its sources)")
    p.add_argument("--seed", type=SEED, default=0, help="seeds the train/val split and the training order")
    p.add_argument("--val-size", type=COUNT, default=5000, help="rows held out for /val, 0: none")
    p.add_argument("--cache-dir", default=None, help=f"download cache (default: ~/.cache/paranet/{cache})")
    p.add_argument("--mirror", action="append", default=None, metavar="URL",
                   help=f"base URL to download {what} from, tried before the built-in mirrors (repeatable)")


def build_parser():
    """Return the argparse parser for `python -m paranet.data`."""
    p = argparse.ArgumentParser(prog="python -m paranet.data", description=__doc__.split(":", 1)[1].strip(),
                                formatter_class=_Defaults)
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("mnist", help="convert the MNIST IDX files into one HDF5 file", formatter_class=_Defaults,
                       description="Convert MNIST IDX files (the embedded copy, --source, or a download) into "
                                   "one HDF5 file, written atomically.")
    m.add_argument("--source", default=None,
                   help="a folder of IDX files, gzip or raw (default: the embedded copy, a source checkout's "
                        "datasets/mnist/, else a download)")
    _download_args(m, "the four .gz files", "mnist-idx")
    f = sub.add_parser("fashion-mnist", help="convert Fashion-MNIST (IDX) into one HDF5 file",
                       formatter_class=_Defaults,
                       description="Convert Fashion-MNIST (--source folder of IDX files, else a download, "
                                   "md5-checked) into one HDF5 file, written atomically.")
    f.add_argument("--source", default=None, help="a folder of IDX files, gzip or raw (default: download)")
    _download_args(f, "the four .gz files", "fashion-mnist-idx")
    c = sub.add_parser("cifar10", help="convert CIFAR-10 (binary version) into one HDF5 file",
                       formatter_class=_Defaults,
                       description="Convert CIFAR-10 from cifar-10-binary.tar.gz (never the pickled version) "
                                   "into one HDF5 file of (3, 32, 32) uint8 samples, written atomically.")
    c.add_argument("--source", default=None,
                   help="cifar-10-binary.tar.gz or a folder of its .bin files (default: download)")
    _download_args(c, "cifar-10-binary.tar.gz", "cifar10")
    n = sub.add_parser("npz", help="convert a NumPy .npz of arrays into one HDF5 file", formatter_class=_Defaults,
                       description="Convert an .npz holding X and y (split here) or X_train, y_train, X_val, "
                                   "y_val, X_test, y_test (used as given); loaded with allow_pickle=False.")
    n.add_argument("source", help="the .npz file")
    n.add_argument("--out", required=True, help="the HDF5 file to write (never the source)")
    n.add_argument("--val-size", type=COUNT, default=None, help="rows of X held out for /val (default: 10%%; 0: none)")
    n.add_argument("--test-size", type=COUNT, default=None,
                   help="rows of X held out for /test (default: 10%%; 0: none)")
    n.add_argument("--seed", type=SEED, default=0, help="seeds the split and the training order")
    n.add_argument("--num-classes", type=_int_in(2), default=None, help="C (default: the largest label + 1)")
    k = sub.add_parser("check", help="validate an HDF5 file in full and print its summary",
                       formatter_class=_Defaults)
    k.add_argument("file", help="the HDF5 file to check")
    k.add_argument("--splits", default=None, help="comma-separated splits to check (default: those in the file)")
    return p


def main(argv=None):
    """Run the CLI; return the exit status (0, or 2 on DataError; argparse errors exit 2 too)."""
    args = build_parser().parse_args(argv)
    try:
        if args.command in ("mnist", "fashion-mnist", "cifar10"):
            from . import download
            if args.command == "cifar10":
                from .cifar import prepare_cifar10 as convert
                builtin = download.CIFAR10_MIRRORS
            else:
                from .prepare import prepare_fashion_mnist, prepare_mnist
                convert = prepare_mnist if args.command == "mnist" else prepare_fashion_mnist
                builtin = download.MIRRORS if args.command == "mnist" else download.FASHION_MIRRORS
            mirrors = None if args.mirror is None else [*args.mirror, *builtin]
            out = convert(args.out, source=args.source, val_size=args.val_size, seed=args.seed,
                          cache_dir=args.cache_dir, mirrors=mirrors)
            print(f"wrote {out}")
        elif args.command == "npz":
            from .npz import prepare_npz
            out = prepare_npz(args.out, args.source, val_size=args.val_size, test_size=args.test_size,
                              seed=args.seed, num_classes=args.num_classes)
            print(f"wrote {out}")
        else:
            from .check import check_file
            splits = None if args.splits is None else [s for s in args.splits.split(",") if s]
            for line in check_file(args.file, splits):
                print(line)
    except DataError as e:
        print(f"paranet.data: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
