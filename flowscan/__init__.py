"""flowscan: renormalization-group flow analysis of iterative magnitude pruning checkpoints."""

__version__ = "0.1.0"
