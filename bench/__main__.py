"""``python -m bench`` (``make bench``): see bench/suite.py, or ``python -m bench --help``."""
from bench.suite import main

main()
