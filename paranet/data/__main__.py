"""Command line of paranet.data: `mnist` converts IDX files to HDF5, `check` validates an HDF5 file."""
import argparse
import sys

from .errors import DataError
from .prepare import prepare_mnist
from .reader import BatchReader


class _Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """Show "(default: X)" except where X is None (those helps say what None means)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser():
    """Return the argparse parser for `python -m paranet.data`."""
    p = argparse.ArgumentParser(prog="python -m paranet.data", description=__doc__.split(":", 1)[1].strip(),
                                formatter_class=_Defaults)
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("mnist", help="convert the MNIST IDX files into one HDF5 file",
                       formatter_class=_Defaults,
                       description="Convert MNIST IDX files (the embedded copy, --source, or a "
                                   "download) into one HDF5 file, written atomically.")
    m.add_argument("--out", required=True, help="the HDF5 file to write")
    m.add_argument("--source", default=None,
                   help="a folder of IDX files, gzip or raw (default: datasets/mnist/, else download)")
    m.add_argument("--val-size", type=int, default=5000, help="training rows held out for /val")
    m.add_argument("--seed", type=int, default=0, help="seeds the train/val split and the training order")
    m.add_argument("--cache-dir", default=None, help="download cache (default: ~/.cache/paranet/mnist-idx)")
    c = sub.add_parser("check", help="validate an HDF5 file and print its splits",
                       formatter_class=_Defaults)
    c.add_argument("file", help="the HDF5 file to check")
    c.add_argument("--splits", default="train,val,test", help="comma-separated splits to check")
    return p


def main(argv=None):
    """Run the CLI; return the exit status (0, or 2 on DataError)."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "mnist":
            out = prepare_mnist(args.out, source=args.source, val_size=args.val_size, seed=args.seed,
                                cache_dir=args.cache_dir)
            print(f"wrote {out}")
        else:
            for split in args.splits.split(","):
                with BatchReader(args.file, split, prefetch=False) as r:
                    print(f"{args.file}: /{split}: {r.num_samples} samples, "
                          f"mean {r.mean:.4f}, std {r.std:.4f}")
    except DataError as e:
        print(f"paranet.data: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
