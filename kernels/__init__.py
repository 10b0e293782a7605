"""Triton GPU kernels, installed as ``dynprune.kernels``.

``gated_conv.py``: the CUDA implementation of ``dynprune::gated_conv2d`` and
``dynprune::dynamic_conv2d`` (registered by ``dynprune.ops`` when a GPU is
present and triton imports). Importing this package does not import triton;
``dynprune.kernels.gated_conv`` does.
"""
