"""dynprune: dynamic channel pruning whose kernels physically skip pruned channels.

    import dynprune
    dynprune.convert(model, keep_ratio=0.5)   # nn.Conv2d -> DynamicConv2d, in place
    model.eval()                               # eval runs the sparse kernel
    print(dynprune.flops(model, x))            # dense vs executed MACs
"""
from dynprune.convert import convert
from dynprune.flops import FlopsReport, flops
from dynprune.nn import ChannelGate, Conv2dBN, DynamicConv2d, saliency_loss
from dynprune.ops import backends, gated_conv2d, gated_conv2d_reference, release_memory

__all__ = [
    "ChannelGate", "Conv2dBN", "DynamicConv2d", "FlopsReport", "backends", "convert", "flops",
    "gated_conv2d", "gated_conv2d_reference", "release_memory", "saliency_loss",
]
__version__ = "0.1.0"
