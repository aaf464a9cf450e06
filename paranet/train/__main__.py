"""``python -m paranet.train``: the trainer CLI (see paranet/cli.py)."""
import sys

from ..cli import main

sys.exit(main())
