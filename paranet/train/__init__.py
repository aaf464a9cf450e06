"""Optimizers (``pn.train.GradientDescentOptimizer`` ...); ``python -m paranet.train`` is the trainer CLI."""
from .optimizers import AdamOptimizer, GradientDescentOptimizer, MomentumOptimizer, Optimizer

__all__ = ["AdamOptimizer", "GradientDescentOptimizer", "MomentumOptimizer", "Optimizer"]
