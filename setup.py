"""Builds dynprune and its native CPU kernels (dynprune._C) with ninja.

Install with `pip install --no-build-isolation .` (or `-e .`) so the extension
is compiled against the torch already installed. Set DYNPRUNE_NO_EXT=1 to skip
the native build (pure-Python fallback); DEBUG=1 for an unoptimised build.
"""
import os

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("DYNPRUNE_NO_EXT", "0") != "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    debug = os.environ.get("DEBUG", "0") == "1"
    # -fopenmp: at::parallel_for is an inline OpenMP loop; without it, it runs serially.
    flags = ["-fopenmp"] + (["-O0", "-g"] if debug else ["-O3", "-ffp-contract=fast"])
    ext_modules.append(
        CppExtension(
            "dynprune._C",
            sources=["csrc/gated_conv2d.cpp", "csrc/sparse_f32.cpp", "csrc/dynamic_conv2d.cpp",
                     "csrc/max_pool2d.cpp", "csrc/cout_vector.cpp", "csrc/output_pool.cpp",
                     "csrc/head_ops.cpp", "csrc/depthwise_conv2d.cpp"],
            extra_compile_args={"cxx": flags},
            extra_link_args=["-fopenmp"],
            depends=["csrc/microkernel.h", "csrc/cout_tile.h", "csrc/cout_vector.h", "csrc/gated_conv2d.h", "csrc/output_pool.h"],
        )
    )
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)

setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    package_dir={"dynprune": "dynprune", "dynprune.kernels": "kernels"},
    packages=["dynprune", "dynprune.kernels", "dynprune.models", "dynprune.fl"],
)
