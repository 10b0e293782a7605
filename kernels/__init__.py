"""Triton GPU kernels, installed as ``dynprune.kernels``.

Empty until the GPU backend lands: on CUDA tensors ``dynprune::gated_conv2d``
currently runs the pure-PyTorch reference. Triton is optional on the CPU.
"""
