"""paranet's benchmarks: ``python -m bench`` (suite.py) runs them all; engine.py is the MPI worker."""
