"""Layers: FullConnection, Conv2D and MaxPool, built from graph nodes with their parameters."""
from .dense import Dense, FullConnection

try:  # conv.py lands separately
    from .conv import Conv2D, MaxPool
except ImportError:  # pragma: no cover
    pass
