"""Compile the Triton kernels for a Hopper GPU on any machine: no GPU needed.

    python benchmarks/gpu_compile.py [--arch 90] [--check]

Triton compiles to PTX and ptxas (shipped in the triton wheel) to a cubin
without a device, so this shows, before a GPU is at hand, whether every kernel
variant builds, and what a profiler would be asked first: registers and spill
bytes per thread (ptxas -v), shared memory, and how the tile loads compiled
(cp.async copies that Triton's pipeliner issues, warp-group MMAs). Times come
only from a GPU (benchmarks/gpu_ab.py); this is the static half.

--check: exit 1 unless every variant compiles and the packed conv loads its
tiles with 16-byte cp.async copies and (float16, bfloat16) spills nothing:
what makes it faster than the gathering form, whose unrolled taps keep 9
gathered tiles in flight and spill (2 KB per thread at 128x32 with Triton
3.9). The tests run this in a subprocess: the kernels must be imported
without TRITON_INTERPRET, which turns them into interpreted functions.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from dynprune.kernels import gated_conv as gc  # noqa: E402

INDEX_PTRS = {"out_idx_ptr": "*i64", "act_ptr": "*i64", "count_ptr": "*i64", "flags_ptr": "*i32",
              "lists_ptr": "*i32", "counts_ptr": "*i32"}
SPECIALISED = {"CK", "KP"}  # ints the JIT sees divisible by 16 (multiples of 32)


def signature(fn, consts, dtype, part):
    """Triton types for fn's arguments, with the 16-byte alignment the JIT
    would record for freshly allocated tensors."""
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = INDEX_PTRS.get(name, part if name == "part_ptr" else dtype)
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "i32"
            if name in SPECIALISED:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def ptxas_info(ptx: str, arch: int) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        out = subprocess.run([get_ptxas(arch).path, f"-arch=sm_{arch}a", "-v", f.name,
                              "-o", os.devnull], capture_output=True, text=True).stderr
    finally:
        os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores", out)
    return dict(regs=int(regs.group(1)) if regs else -1, spill=int(spill.group(1)) if spill else -1)


def compile_one(fn, consts, dtype="*fp16", part="*fp16", warps=4, stages=3, arch=90) -> dict:
    sig, attrs = signature(fn, consts, dtype, part)
    t = time.time()
    kernel = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs),
                            target=GPUTarget("cuda", arch, 32),
                            options=dict(num_warps=warps, num_stages=stages))
    ptx = kernel.asm["ptx"]
    copies = re.findall(r"cp\.async\.\w+\.shared\.global \[[^]]*\], \[[^]]*\], (0x\w+|\d+)", ptx)
    return dict(**ptxas_info(ptx, arch), shared=kernel.metadata.shared,
                cp_async_16=sum(int(c, 0) == 16 for c in copies), cp_async=len(copies),
                wgmma=ptx.count("wgmma.mma_async"), ld_global=len(re.findall(r"ld\.global", ptx)),
                secs=time.time() - t)


def variants():
    """(name, kernel, constexprs, dtype, partial-sum type, warps, stages)."""
    conv = dict(KH=3, KW=3, HAS_BIAS=True, HAS_SCALE=True, RELU=True, UPCAST=False,
                COUNT_GIVEN=True, FLAT_Y=True, WIDE=False)
    out = []
    for dtype, is_fp32 in (("*fp16", False), ("*bf16", False), ("*fp32", True)):
        c = dict(conv, IS_FP32=is_fp32, PRECISION="tf32")
        stages = 1 if is_fp32 else 3  # as _candidates: float32 gathers overflow shared memory
        t = dtype[1:]
        out += [
            (f"gather {t} P128xCO32", gc._gated_conv_kernel,
             dict(c, BLOCK_P=128, BLOCK_CO=32, BLOCK_CI=32, SPLIT=1), dtype, dtype, 4, stages),
            (f"gather {t} P32xCO32 split4", gc._gated_conv_kernel,
             dict(c, BLOCK_P=32, BLOCK_CO=32, BLOCK_CI=32, SPLIT=4), dtype, "*fp32", 4, stages),
            (f"packed {t} P128xCO32", gc._packed_conv_kernel,
             dict(c, BLOCK_P=128, BLOCK_CO=32, BLOCK_CI=32, SPLIT=1), dtype, dtype, 4, 3),
            (f"packed {t} P128xCO64", gc._packed_conv_kernel,
             dict(c, BLOCK_P=128, BLOCK_CO=64, BLOCK_CI=32, SPLIT=1), dtype, dtype, 4, 3),
        ]
    epi = dict(HAS_BIAS=True, HAS_SCALE=True, RELU=True, FLAT_Y=True, BLOCK_P=64, BLOCK_C=32,
               WIDE=False)
    out += [
        ("gather fp16 P64xCO64 ci16 w8", gc._gated_conv_kernel,
         dict(conv, IS_FP32=False, PRECISION="tf32", BLOCK_P=64, BLOCK_CO=64, BLOCK_CI=16,
              SPLIT=1), "*fp16", "*fp16", 8, 3),
        ("gather fp16 found lists", gc._gated_conv_kernel,
         dict(conv, COUNT_GIVEN=False, IS_FP32=False, PRECISION="tf32", BLOCK_P=64, BLOCK_CO=32,
              BLOCK_CI=16, SPLIT=2), "*fp16", "*fp32", 4, 3),
        ("complete (zeros)", gc._complete_kernel, dict(epi, SPLIT=1), "*fp16", "*fp16", 4, 3),
        ("complete split4", gc._complete_kernel, dict(epi, SPLIT=4), "*fp16", "*fp32", 4, 3),
        # sxw=1: the JIT specialises an int argument equal to 1 (NCHW input)
        ("prepare", gc._prepare_kernel, dict(KH=3, KW=3, COUNT_GIVEN=True, FLAT_Y=True, ROWS=1,
                                             BLOCK_Q=64, W_TAPS=9, ZERO_P=64, WIDE=False, sxw=1),
         "*fp16", "*fp16", 4, 3),
        ("prepare, coarse blocks", gc._prepare_kernel,
         dict(KH=3, KW=3, COUNT_GIVEN=True, FLAT_Y=True, ROWS=4, BLOCK_Q=64, W_TAPS=1, ZERO_P=256,
              WIDE=False, sxw=1), "*fp16", "*fp16", 4, 3),
        ("prepare found lists 64-bit", gc._prepare_kernel,
         dict(KH=3, KW=3, COUNT_GIVEN=False, FLAT_Y=False, ROWS=4, BLOCK_Q=16, W_TAPS=1,
              ZERO_P=256, WIDE=True), "*fp16", "*fp16", 4, 3),
        ("detect: scan", gc._nonzero_kernel, dict(BLOCK=1024), "*fp16", "*fp16", 4, 3),
        ("detect: compact", gc._compact_kernel, dict(BLOCK_C=512), "*fp16", "*fp16", 4, 3),
    ]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="SM version (90: H100/H200)")
    ap.add_argument("--check", action="store_true", help="exit 1 on a failed expectation")
    a = ap.parse_args()
    print(f"triton {triton.__version__}, sm_{a.arch}")
    print(f"{'variant':30} {'regs':>5} {'spill B':>8} {'smem B':>7} {'cp.async16':>10} "
          f"{'wgmma':>6} {'ld.global':>9} {'s':>5}")
    bad = []
    for name, fn, consts, dtype, part, warps, stages in variants():
        try:
            r = compile_one(fn, consts, dtype, part, warps, stages, a.arch)
        except Exception as exc:  # report every variant, then fail
            bad.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            print(f"{name:30} FAILED ({type(exc).__name__})")
            continue
        print(f"{name:30} {r['regs']:5} {r['spill']:8} {r['shared']:7} {r['cp_async_16']:10} "
              f"{r['wgmma']:6} {r['ld_global']:9} {r['secs']:5.1f}", flush=True)
        # the packed conv's point: pipelined 16-byte tile copies, and (16-bit
        # types) no spills; float32 64-wide tiles spill 40 B with Triton 3.9
        if name.startswith("packed") and (r["cp_async_16"] == 0 or
                                          (r["spill"] != 0 and "fp32" not in name)):
            bad.append(f"{name}: expected 16-byte cp.async tile loads and no spills, got {r}")
    for line in bad:
        print("FAILED:", line)
    return 1 if (bad and a.check) else 0


if __name__ == "__main__":
    sys.exit(main())
