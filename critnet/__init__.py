"""critnet: which parameters and neurons of a trained classifier are critical, and how it holds up when pruned."""

__version__ = "0.1.0"
