"""dynprune: dynamic channel pruning whose kernels physically skip pruned channels."""
from dynprune.ops import backends, gated_conv2d, gated_conv2d_reference

__all__ = ["backends", "gated_conv2d", "gated_conv2d_reference"]
__version__ = "0.1.0"
