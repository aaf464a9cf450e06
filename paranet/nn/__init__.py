"""Layers: FullConnection, Conv2D and MaxPool, built from graph nodes with their parameters."""
from .conv import Conv2D, MaxPool
from .dense import Dense, FullConnection

__all__ = ["Conv2D", "Dense", "FullConnection", "MaxPool"]
