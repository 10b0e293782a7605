"""Triton gated convolution: an implicit GEMM that skips pruned channels.

One program computes a tile of (output pixels x kept output channels) of one
sample. Its reduction runs over that sample's *active* input channels only,
BLOCK_CI of them per step, and over the kernel taps, loading x and the weights
either through the per-sample index lists (the gathering form) or from
per-sample packed copies (the packed form, PACK=1 or 2: two block sizes of
the copy). Gate scale, bias and ReLU
are applied in the epilogue. Only kept channels are stored by the conv; the
pruned ones are written as zeros by a second kernel (_complete_kernel, or the
packed form's _prepare_kernel), so y needs no memset. Grids too small to fill
the GPU split the channel steps over SPLIT programs that store float32 partial
sums; _complete_kernel then adds them and applies the epilogue.

Tiles are tuned per layer key on the first call (``_Launch.tune``): a short
candidate list timed with CUDA graph replay. Any strides work for x, the
weight and y; nn.Conv2d's own weight layout measured fastest on an H200.

Precision: float16 and bfloat16 multiply in their own type and accumulate in
float32; float32 uses TF32 tensor cores (``tl.dot`` input precision "tf32":
~1e-3 relative error), or full IEEE float32 with ``DYNPRUNE_TRITON_FP32=ieee``.

The active input channel lists are built on the device (active_channels: a
scan per channel, then a prefix sum per sample that puts active channels
first, ascending), and each program reads its sample's count from memory: no
host synchronisation.

With ``TRITON_INTERPRET=1`` the same kernel runs on CPU tensors through
Triton's interpreter; the tests use that.
"""
from __future__ import annotations

import os
import warnings
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
import triton.testing

__all__ = ["SUPPORTED_DTYPES", "active_channels", "gated_conv2d_triton", "dynamic_conv2d_triton"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_FORCE_WIDE = os.environ.get("DYNPRUNE_TRITON_WIDE") == "1"  # 64-bit offsets always (A/B runs)


_SMS = 132  # an H100/H200's multiprocessors; replaced by the device's own count at first use
_PACK_C, _PACK_O = 32, 64  # the packed path's buffers round channel counts up to these
# The packed path is tried only where its weight copy has at most this many
# elements per element of the packed input (taps * KP / padded pixels: 0.17,
# 0.64, 4.5 and 28 on ResNet-18's 3x3 layers at keep 0.5; on an H100 at batch
# 64 packing won on the first three, by 36%, 32% and 12%).
_PACK_W_RATIO = 8
# _prepare_kernel's blocks per PACK value: (padded rows per input block, taps
# per weight block (0: all; else it must divide the tap count), output pixels
# per block of zeros). The tuner times both. On an H200 at batch 64 (session
# 9) PACK=2 won on 64x56x56 and 128x28x28 (45.0 vs 51.2 and 35.6 vs 37.6 us
# a call) and lost on 256x14x14 (48.3 vs 41.8: a weight block per tap loads
# the index lists 9 times as often); 256-pixel zero blocks alone made the
# packing faster on all four ResNet-18 layers (22.7 -> 17.4 us on the first).
_PREPARE_BLOCKS = {1: (1, 0, 64), 2: (4, 1, 256)}


def _cdiv(a: int, b: int) -> int:
    # triton.cdiv and next_power_of_2 are constexpr functions in newer Tritons,
    # whose argument unwrapping took 40% of this module's host time per call
    return -(-a // b)


def _pow2(n: int) -> int:
    """The smallest power of 2 >= n (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()


def _config(bp, bco, bci, warps=4, split=1, stages=3, pack=0):
    kw = {"BLOCK_P": bp, "BLOCK_CO": bco, "BLOCK_CI": bci, "SPLIT": split}
    if pack:
        kw["PACK"] = pack
    return triton.Config(kw, num_warps=warps, num_stages=stages)


# Tiles (BLOCK_P, BLOCK_CO, warps) the tuner tries, best-first by the H200
# A/B run (benchmarks/results/gpu_experiments_2026-11-26b): large pixel tiles
# for batches, 32x32 tiles with a split reduction for small grids.
_TILES = [(256, 64, 8), (256, 32, 4), (128, 64, 4), (128, 32, 4), (64, 64, 4), (64, 32, 4),
          (32, 32, 4)]
# (BLOCK_P, BLOCK_CO, warps) of 16-channel gathering tiles with no spills.
_GATHER_NO_SPILL = [(128, 32, 8), (64, 64, 8), (64, 32, 4)]


def _candidates(n: int, k: int, hw: int, act_len: int, fp32: bool = False,
                packed_w_size: int = 0, packed_x_size: int = 0):
    """Configs worth timing for a layer, the heuristic's pick first.

    Tiles larger than the layer (64 channels for 32 kept, 128 pixels for 7x7)
    only idle lanes. A grid smaller than about two programs per multiprocessor
    splits its channel steps over more programs (at most 8, at most one per
    step), which is what made batch-1 layers fast on the H200. float32 loads
    are wide enough for Triton to pipeline through shared memory, which then
    overflows (737 KB for 256x64 at 2 stages): one stage for them."""
    if _INTERPRET:  # the interpreter runs small tiles fastest; tests cover the rest
        return [_config(32, 16, 16)]
    def fits(bp, bco):
        return bco <= max(32, _pow2(k)) and bp <= max(32, _pow2(hw))


    def split_for(programs, bci):
        split = 1
        while (split < 8 and programs * split * 2 <= 2 * _SMS
               and split * 2 <= _cdiv(act_len, bci)):
            split *= 2
        return split

    out, extra = [], []  # extra: the 16-channel variants, tried after the measured kinds
    for bp, bco, w in (t for t in _TILES if fits(t[0], t[1])):
        programs = n * _cdiv(hw, bp) * _cdiv(k, bco)
        # 16-channel steps allow twice the parts where 32-channel ones run out
        # (batch-1 128x28x28: 64 kept inputs are only 2 steps of 32); small
        # tiles only, to keep the list short. The timing decides.
        for bci in (32, 16) if bp * bco <= 2048 else (32,):
            split = split_for(programs, bci)
            if bci == 16 and split <= split_for(programs, 32):
                continue
            config = _config(bp, bco, bci, w, split, stages=1 if fp32 else 3)
            (out if bci == 32 else extra).append((programs * split, bp * bco, config))
    # Untimed, the first is used: the largest tile that still fills the GPU,
    # else the tile giving the most programs.
    out.sort(key=lambda t: (t[0] < _SMS, -t[1] if t[0] >= _SMS else -t[0]))
    plain = [c for _, _, c in out + extra] or [_config(32, 32, 32)]
    # Gathering tiles that compile without register spills for sm_90 (the
    # 32-channel ones spill up to 2 KB per thread: benchmarks/gpu_compile.py),
    # for grids that need no split; not yet timed on a GPU, so after the others.
    for bp, bco, w in _GATHER_NO_SPILL:
        if fits(bp, bco) and n * _cdiv(hw, bp) * _cdiv(k, bco) >= _SMS:
            plain.append(_config(bp, bco, 16, w, stages=1 if fp32 else 3))
    if packed_w_size > _PACK_W_RATIO * packed_x_size:
        return plain
    # the packed path for each 32-channel tile that fills the GPU unsplit (split
    # grids are small, where the packing's extra kernel costs more than it
    # saves: 15-30% slower at batch 1 on an H100), timed after the others.
    # Three stages also in float32: its contiguous tiles take 61-74 KB of
    # shared memory (benchmarks/gpu_compile.py), unlike its gathers.
    # PACK=2 packs in coarser blocks (_PREPARE_BLOCKS).
    return plain + [_config(c.kwargs["BLOCK_P"], c.kwargs["BLOCK_CO"], 32, c.num_warps,
                            stages=3, pack=pack) for pack in (1, 2)
                    for _, _, c in out if c.kwargs["SPLIT"] == 1]


# Sizes and strides change with every layer; specialising on them (divisible by
# 16 or not) would compile each config again per layer for no gain, since all
# loads here are gathers through index lists.
_INT_ARGS = ["N", "Cin", "H", "W", "Cout", "Wo", "HW_OUT", "K_OUT", "ACT_LEN",
             "sxn", "sxc", "sxh", "sxw", "swo", "swi", "swh", "sww", "syn", "syc", "syh", "syw",
             "stride_h", "stride_w", "pad_h", "pad_w", "dil_h", "dil_w"]


@triton.jit
def _idx(v, WIDE: tl.constexpr):
    """Offsets inside one sample, weight or partial-sum buffer in 32 bits unless
    a tensor is too large for that: fewer registers per gathered element."""
    if WIDE:  # one return: Triton 3.6 rejects a second one after a static if that returns
        out = v.to(tl.int64)
    else:
        out = v.to(tl.int32)
    return out


@triton.jit
def _channels(list_ptr, pos, ok, limit, WIDE: tl.constexpr):
    """Entries pos of an index list (masked by ok), clamped to [0, limit): a
    malformed list gives wrong numbers, never an address outside the tensor."""
    v = _idx(tl.load(list_ptr + pos, mask=ok, other=0), WIDE)
    return tl.minimum(tl.maximum(v, 0), limit - 1)


@triton.jit
def _tap_step(acc, x_n, w_j, ci, i_ok, j_ok, oh, ow, p_ok, r, s, H, W, sxc, sxh, sxw, swi, swh,
              sww, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
              IS_FP32: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
              WIDE: tl.constexpr):
    """acc += x[pixels shifted by tap (r, s), channels ci] @ w[ci, tap, kept outputs]."""
    ih = oh * stride_h - pad_h + r * dil_h
    iw = ow * stride_w - pad_w + s * dil_w
    pix_ok = p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    x_off = _idx(ih, WIDE) * sxh + _idx(iw, WIDE) * sxw
    xv = tl.load(x_n + x_off[:, None] + ci[None, :] * sxc, mask=pix_ok[:, None] & i_ok[None, :],
                 other=0.0)
    wv = tl.load(w_j + ci[:, None] * swi + r * swh + s * sww, mask=i_ok[:, None] & j_ok[None, :],
                 other=0.0)
    return _mma(acc, xv, wv, IS_FP32, PRECISION, UPCAST)


@triton.jit
def _mma(acc, xv, wv, IS_FP32: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc += xv @ wv in the dtype's tensor-core mode."""
    if IS_FP32:
        acc += tl.dot(xv, wv, input_precision=PRECISION)
    elif UPCAST:  # Triton's CPU interpreter has no bfloat16 dot
        acc += tl.dot(xv.to(tl.float32), wv.to(tl.float32), input_precision="ieee")
    else:
        acc += tl.dot(xv, wv)
    return acc


@triton.jit
def _tile_start(out_idx_ptr, count_ptr, Cout, K_OUT, ACT_LEN, COUNT_GIVEN: tl.constexpr,
                BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr, SPLIT: tl.constexpr,
                WIDE: tl.constexpr):
    """A conv program's sample n, its part of a split reduction, its output
    pixels p and kept-list positions j (with j_ok), their channels co (clamped:
    never an address outside the weight), and the sample's active count."""
    n = (tl.program_id(2) // SPLIT).to(tl.int64)
    part = tl.program_id(2) % SPLIT  # this program's share of the channel blocks
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    j = tl.program_id(1) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    j_ok = j < K_OUT
    co = _channels(out_idx_ptr + n * K_OUT, j, j_ok, Cout, WIDE)
    if COUNT_GIVEN:  # in_idx given: every sample lists ACT_LEN channels
        count = ACT_LEN
    else:
        count = tl.load(count_ptr + n)
    return n, part, p, j, j_ok, co, count


@triton.jit(do_not_specialize=_INT_ARGS)
def _gated_conv_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, out_idx_ptr, scale_ptr, act_ptr, count_ptr, part_ptr,
    N, Cin, H, W, Cout, Wo, HW_OUT, K_OUT, ACT_LEN,
    sxn, sxc, sxh, sxw, swo, swi, swh, sww, syn, syc, syh, syw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
    RELU: tl.constexpr, IS_FP32: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    COUNT_GIVEN: tl.constexpr, FLAT_Y: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr,
    SPLIT: tl.constexpr, WIDE: tl.constexpr,
):
    n, part, p, j, j_ok, co, count = _tile_start(out_idx_ptr, count_ptr, Cout, K_OUT, ACT_LEN,
                                                 COUNT_GIVEN, BLOCK_P, BLOCK_CO, SPLIT, WIDE)
    p_ok = p < HW_OUT
    oh = p // Wo
    ow = p % Wo

    x_n = x_ptr + n * sxn
    w_j = w_ptr + co[None, :] * swo
    acc = tl.zeros([BLOCK_P, BLOCK_CO], dtype=tl.float32)
    # Taps inside the channel-block loop: one index-list load serves all taps,
    # and their loads are independent (1.2-1.4x faster on the H200 than taps
    # outside; loading x along pixels and transposing it was slower still).
    for i0 in range(part * BLOCK_CI, count, SPLIT * BLOCK_CI):
        i = i0 + tl.arange(0, BLOCK_CI)
        i_ok = i < count
        ci = _channels(act_ptr + n * ACT_LEN, i, i_ok, Cin, WIDE)
        for r in tl.static_range(KH):
            for s in tl.static_range(KW):
                acc = _tap_step(acc, x_n, w_j, ci, i_ok, j_ok, oh, ow, p_ok, r, s, H, W, sxc, sxh,
                                sxw, swi, swh, sww, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                                IS_FP32, PRECISION, UPCAST, WIDE)

    _finish_or_part(acc, b_ptr, scale_ptr, y_ptr, part_ptr, co, j, j_ok, p, p_ok, oh, ow, n,
                    K_OUT, HW_OUT, syn, syc, syh, syw, HAS_BIAS, HAS_SCALE, RELU, FLAT_Y, SPLIT,
                    WIDE)


@triton.jit
def _finish_or_part(acc, b_ptr, scale_ptr, y_ptr, part_ptr, co, j, j_ok, p, p_ok, oh, ow, n,
                    K_OUT, HW_OUT, syn, syc, syh, syw, HAS_BIAS: tl.constexpr,
                    HAS_SCALE: tl.constexpr, RELU: tl.constexpr, FLAT_Y: tl.constexpr,
                    SPLIT: tl.constexpr, WIDE: tl.constexpr):
    """A conv program's result: the finished tile, or with a split reduction this
    part's float32 partial sums, parts[n, part, j, pixel] (_complete_kernel adds
    them; no atomics, so no zeroed buffer and the same result every call)."""
    if SPLIT == 1:
        _finish(acc, b_ptr, scale_ptr, y_ptr, co, j, j_ok, p, p_ok, oh, ow, n, K_OUT, syn, syc,
                syh, syw, HAS_BIAS, HAS_SCALE, RELU, FLAT_Y, WIDE)
    else:
        offs = _idx(j, WIDE)[None, :] * HW_OUT + p[:, None]
        tl.store((part_ptr + tl.program_id(2).to(tl.int64) * K_OUT * HW_OUT) + offs, acc,
                 mask=p_ok[:, None] & j_ok[None, :])


@triton.jit
def _y_offsets(co, p, oh, ow, syc, syh, syw, FLAT_Y: tl.constexpr, WIDE: tl.constexpr):
    """Offsets of y[., co, pixel] in one sample. FLAT_Y (each channel's map
    contiguous, as in a new NCHW y): the pixel index itself, which Triton sees
    is contiguous along the tile and stores as vectors."""
    if FLAT_Y:
        pix = _idx(p, WIDE)
    else:
        pix = _idx(oh, WIDE) * syh + _idx(ow, WIDE) * syw
    return co[None, :] * syc + pix[:, None]


@triton.jit
def _finish(acc, b_ptr, scale_ptr, y_ptr, co, j, j_ok, p, p_ok, oh, ow, n, K_OUT, syn, syc, syh,
            syw, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, RELU: tl.constexpr,
            FLAT_Y: tl.constexpr, WIDE: tl.constexpr):
    """Bias, gate scale and ReLU on a [pixels, kept channels] tile, stored to y."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + co, mask=j_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_SCALE:  # the contract's order: scale * (conv + bias)
        acc *= tl.load(scale_ptr + n * K_OUT + j, mask=j_ok, other=0.0).to(tl.float32)[None, :]
    if RELU:
        acc = tl.where(acc < 0.0, 0.0, acc)  # keeps NaN, like torch.relu
    y_ptrs = (y_ptr + n * syn) + _y_offsets(co, p, oh, ow, syc, syh, syw, FLAT_Y, WIDE)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=p_ok[:, None] & j_ok[None, :])


@triton.jit(do_not_specialize=["Cout", "Wo", "HW_OUT", "K_OUT", "SEARCH_STEPS", "syn", "syc",
                               "syh", "syw"])
def _complete_kernel(part_ptr, b_ptr, y_ptr, out_idx_ptr, scale_ptr,
                     Cout, Wo, HW_OUT, K_OUT, SEARCH_STEPS, syn, syc, syh, syw,
                     HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, RELU: tl.constexpr,
                     SPLIT: tl.constexpr, FLAT_Y: tl.constexpr, BLOCK_P: tl.constexpr,
                     BLOCK_C: tl.constexpr, WIDE: tl.constexpr):
    """Writes the pruned channels of y as zeros (y is not zeroed beforehand:
    half the bytes of a memset) and, after a split reduction (SPLIT > 1), the
    kept channels as the epilogue of their summed partials."""
    _complete_block(tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64), part_ptr,
                    b_ptr, y_ptr, out_idx_ptr, scale_ptr, Cout, Wo, HW_OUT, K_OUT, SEARCH_STEPS,
                    syn, syc, syh, syw, HAS_BIAS, HAS_SCALE, RELU, SPLIT, FLAT_Y, BLOCK_P,
                    BLOCK_C, WIDE)


@triton.jit
def _complete_block(pb, cb, n, part_ptr, b_ptr, y_ptr, out_idx_ptr, scale_ptr,
                    Cout, Wo, HW_OUT, K_OUT, SEARCH_STEPS, syn, syc, syh, syw,
                    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, RELU: tl.constexpr,
                    SPLIT: tl.constexpr, FLAT_Y: tl.constexpr, BLOCK_P: tl.constexpr,
                    BLOCK_C: tl.constexpr, WIDE: tl.constexpr):
    """_complete_kernel's work on pixel block pb x channel block cb (of all
    output channels) of sample n. Each channel finds its position in the
    sample's sorted kept list by binary search."""
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    p_ok = p < HW_OUT
    c_ok = c < Cout
    row = out_idx_ptr + n * K_OUT
    lo = tl.zeros([BLOCK_C], dtype=tl.int32)  # first position whose channel is >= c
    hi = tl.zeros([BLOCK_C], dtype=tl.int32) + K_OUT
    for _ in range(SEARCH_STEPS):
        mid = (lo + hi) // 2
        below = tl.load(row + mid, mask=mid < K_OUT, other=0) < c
        open_ = lo < hi
        lo = tl.where(open_ & below, mid + 1, lo)
        hi = tl.where(open_ & ~below, mid, hi)
    kept = c_ok & (lo < K_OUT) & (tl.load(row + lo, mask=lo < K_OUT, other=-1) == c)
    oh = p // Wo
    ow = p % Wo
    if SPLIT > 1:
        offs = _idx(lo, WIDE)[None, :] * HW_OUT + p[:, None]
        m = p_ok[:, None] & kept[None, :]
        acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
        for part in tl.static_range(SPLIT):
            acc += tl.load((part_ptr + (n * SPLIT + part) * K_OUT * HW_OUT) + offs, mask=m,
                           other=0.0)
        _finish(acc, b_ptr, scale_ptr, y_ptr, c, lo, kept, p, p_ok, oh, ow, n, K_OUT, syn, syc,
                syh, syw, HAS_BIAS, HAS_SCALE, RELU, FLAT_Y, WIDE)
    zeros = tl.zeros([BLOCK_P, BLOCK_C], dtype=y_ptr.dtype.element_ty)
    y_ptrs = (y_ptr + n * syn) + _y_offsets(c, p, oh, ow, syc, syh, syw, FLAT_Y, WIDE)
    tl.store(y_ptrs, zeros, mask=p_ok[:, None] & (c_ok & ~kept)[None, :])


# --- Packed path (config key PACK=1 or 2): the gathers leave the inner loop ---
#
# One _prepare_kernel launch first copies each sample's active input channels
# into a compact channels-last buffer with a zero halo, xc[n, Hp*Wp, CK], and
# its kept weights into wp[n, tap, CK, KP] (CK: the list length rounded up to
# 32; KP: the kept-output count rounded up to 32 if at most 32, else to 64;
# zeros past each sample's lists), and writes the pruned output channels'
# zeros. The tiles then load unmasked rows of contiguous channels, which
# Triton turns into 16-byte cp.async copies into shared memory, pipelined (as
# benchmarks/gpu_compile.py shows); the gathered element loads of the plain
# kernel cannot be pipelined. The reduction runs over (channel block, tap)
# steps in one flat loop, one x tile and one weight tile per step. The weight
# copy costs N*taps*CK*KP elements, so the packed path pays only where weights
# are small next to activations (H100: benchmarks/results/
# gpu_experiments_2026-11-27). Packing only x was measured too: it never beat
# both other forms.

@triton.jit
def _pack_x_block(rb, jb, n, count, x_ptr, xc_ptr, act_ptr, Cin, H, W, WP, HPWP, ACT_LEN, CK,
                  sxn, sxc, sxh, sxw, pad_h, pad_w, COL_BLOCKS, ROWS: tl.constexpr,
                  BLOCK_Q: tl.constexpr, BLOCK_J: tl.constexpr, WIDE: tl.constexpr):
    """xc[n, q, j] = x[n, act[n, j], q's row - pad_h, q's column - pad_w] for
    BLOCK_Q columns of ROWS padded rows (row block rb) and channel block jb,
    zero in the halo and for j past count. Pixels run along rows, so each
    BLOCK_Q of them are consecutive in x (contiguity Triton can see when sxw
    is 1, as the JIT specialises it): warps read runs along rows, then write
    runs of channels. Blocks of 64 flattened pixels (row and column by // and
    % of a runtime width) made Triton read along channels, a plane apart per
    thread."""
    i = tl.arange(0, ROWS * BLOCK_Q)
    hp = (rb // COL_BLOCKS) * ROWS + i // BLOCK_Q  # padded rows
    wq = (rb % COL_BLOCKS) * BLOCK_Q + i % BLOCK_Q  # padded columns
    q = hp * WP + wq
    q_ok = (wq < WP) & (q < HPWP)
    jj = jb * BLOCK_J + tl.arange(0, BLOCK_J)
    j_ok = jj < count
    ih = hp - pad_h
    iw = wq - pad_w
    inside = q_ok & (iw >= 0) & (iw < W) & (ih >= 0) & (ih < H)
    ci = _channels(act_ptr + n * ACT_LEN, jj, j_ok, Cin, WIDE)
    v = tl.load((x_ptr + n * sxn) + ci[None, :] * sxc
                + (_idx(ih, WIDE) * sxh + _idx(iw, WIDE) * sxw)[:, None],
                mask=inside[:, None] & j_ok[None, :], other=0.0)
    offs = _idx(q, WIDE)[:, None] * CK + jj[None, :]
    tl.store((xc_ptr + n * HPWP * CK) + offs, v, mask=q_ok[:, None])


@triton.jit
def _pack_w_block(ob, jb, tap0, n, count, w_ptr, wp_ptr, out_idx_ptr, act_ptr, Cin, Cout,
                  K_OUT, ACT_LEN, CK, KP, swo, swi, swh, sww,
                  KH: tl.constexpr, KW: tl.constexpr, TAPS: tl.constexpr, BLOCK_J: tl.constexpr,
                  BLOCK_O: tl.constexpr, WIDE: tl.constexpr):
    """wp[n, tap, j, o] = w[out_idx[n, o], act[n, j], tap] for output block ob,
    input block jb and TAPS taps from tap0, zero past the lists. One [inputs,
    outputs] tile per tap (reading [outputs, inputs, taps] tiles, so that
    neighbouring threads read adjacent taps, was 1.3-1.7x slower on an H100)."""
    o = ob * BLOCK_O + tl.arange(0, BLOCK_O)
    jj = jb * BLOCK_J + tl.arange(0, BLOCK_J)
    o_ok = o < K_OUT
    j_ok = jj < count
    co = _channels(out_idx_ptr + n * K_OUT, o, o_ok, Cout, WIDE)
    ci = _channels(act_ptr + n * ACT_LEN, jj, j_ok, Cin, WIDE)
    src = w_ptr + co[None, :] * swo + ci[:, None] * swi
    dst = (wp_ptr + n * (KH * KW) * CK * KP) + (_idx(jj, WIDE)[:, None] * KP + o[None, :])
    for t in tl.static_range(TAPS):
        tap = tap0 + t
        v = tl.load(src + (tap // KW) * swh + (tap % KW) * sww,
                    mask=j_ok[:, None] & o_ok[None, :], other=0.0)
        tl.store(dst + _idx(tap, WIDE) * CK * KP, v)


@triton.jit(do_not_specialize=["Cin", "H", "W", "WP", "HPWP", "ACT_LEN", "Cout", "K_OUT", "Wo",
                               "HW_OUT", "SEARCH_STEPS", "sxn", "sxc", "sxh", "swo", "swi",
                               "swh", "sww", "syn", "syc", "syh", "syw", "pad_h", "pad_w",
                               "COL_BLOCKS", "X_BLOCKS", "W_BLOCKS"])
def _prepare_kernel(x_ptr, xc_ptr, w_ptr, wp_ptr, y_ptr, out_idx_ptr, act_ptr, count_ptr,
                    Cin, H, W, WP, HPWP, ACT_LEN, CK, KP, Cout, K_OUT, Wo, HW_OUT, SEARCH_STEPS,
                    sxn, sxc, sxh, sxw, swo, swi, swh, sww, syn, syc, syh, syw, pad_h, pad_w,
                    COL_BLOCKS, X_BLOCKS, W_BLOCKS,
                    KH: tl.constexpr, KW: tl.constexpr, COUNT_GIVEN: tl.constexpr,
                    FLAT_Y: tl.constexpr, ROWS: tl.constexpr, BLOCK_Q: tl.constexpr,
                    W_TAPS: tl.constexpr, ZERO_P: tl.constexpr, WIDE: tl.constexpr):
    """The packed path's first kernel. For sample program_id(1), programs
    [0, X_BLOCKS) copy the input (ROWS padded rows x BLOCK_Q columns x 32
    channels each; the channel block varies fastest, then the column block),
    the next W_BLOCKS the weights (32 inputs x 32 outputs x W_TAPS taps each;
    the tap group fastest, then the input block), and any after those write
    the pruned output channels' zeros (ZERO_P pixels x 32 channels each): one
    launch instead of three (a launch costs 11-35 us of host time)."""
    r = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    if COUNT_GIVEN:
        count = ACT_LEN
    else:
        count = tl.load(count_ptr + n)
    blocks_j = CK // 32  # _PACK_C (a jit function reads no plain Python globals)
    if r < X_BLOCKS:
        _pack_x_block(r // blocks_j, r % blocks_j, n, count, x_ptr, xc_ptr, act_ptr, Cin, H, W,
                      WP, HPWP, ACT_LEN, CK, sxn, sxc, sxh, sxw, pad_h, pad_w, COL_BLOCKS, ROWS,
                      BLOCK_Q, 32, WIDE)
    elif r < X_BLOCKS + W_BLOCKS:  # (new names in the branches: nothing flows out of them)
        rw = r - X_BLOCKS
        tap_groups = (KH * KW) // W_TAPS
        rt = rw // tap_groups
        _pack_w_block(rt // blocks_j, rt % blocks_j, (rw % tap_groups) * W_TAPS, n, count, w_ptr,
                      wp_ptr, out_idx_ptr, act_ptr, Cin, Cout, K_OUT, ACT_LEN, CK, KP, swo, swi,
                      swh, sww, KH, KW, W_TAPS, 32, 32, WIDE)
    else:
        rz = r - X_BLOCKS - W_BLOCKS
        blocks_c = tl.cdiv(Cout, 32)
        _complete_block(rz // blocks_c, rz % blocks_c, n, y_ptr, y_ptr, y_ptr, out_idx_ptr, y_ptr,
                        Cout, Wo, HW_OUT, K_OUT, SEARCH_STEPS, syn, syc, syh, syw, False, False,
                        False, 1, FLAT_Y, ZERO_P, 32, WIDE)


@triton.jit(do_not_specialize=["Cout", "Wo", "HW_OUT", "K_OUT", "ACT_LEN", "WP", "HPWP",
                               "syn", "syc", "syh", "syw", "stride_h", "stride_w", "dil_h",
                               "dil_w"])
def _packed_conv_kernel(
    xc_ptr, wp_ptr, b_ptr, y_ptr, out_idx_ptr, scale_ptr, count_ptr, part_ptr,
    Cout, Wo, HW_OUT, K_OUT, ACT_LEN, WP, HPWP, CK, KP,
    syn, syc, syh, syw, stride_h, stride_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
    RELU: tl.constexpr, IS_FP32: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    COUNT_GIVEN: tl.constexpr, FLAT_Y: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr,
    SPLIT: tl.constexpr, WIDE: tl.constexpr,
):
    """The gated conv over the packed input and weights."""
    n, part, p, j, j_ok, co, count = _tile_start(out_idx_ptr, count_ptr, Cout, K_OUT, ACT_LEN,
                                                 COUNT_GIVEN, BLOCK_P, BLOCK_CO, SPLIT, WIDE)
    p_ok = p < HW_OUT
    pc = tl.minimum(p, HW_OUT - 1)  # tail pixels repeat the last one: loads need no mask
    oh = pc // Wo
    ow = pc % Wo
    pix = _idx(oh * stride_h, WIDE) * WP + _idx(ow * stride_w, WIDE)  # tap (0, 0), padded map

    xc_n = xc_ptr + n * HPWP * CK
    wp_n = wp_ptr + n * (KH * KW) * CK * KP
    c0 = tl.arange(0, BLOCK_CI)
    acc = tl.zeros([BLOCK_P, BLOCK_CO], dtype=tl.float32)
    for t in range(part, tl.cdiv(count, BLOCK_CI) * (KH * KW), SPLIT):
        tap = t % (KH * KW)
        jj = (t // (KH * KW)) * BLOCK_CI + c0  # < CK: no mask (zeros past the count)
        x_off = (pix + (tap // KW) * dil_h * WP + (tap % KW) * dil_w) * CK
        xv = tl.load(xc_n + x_off[:, None] + jj[None, :])
        wv = tl.load(wp_n + _idx(tap, WIDE) * CK * KP + _idx(jj, WIDE)[:, None] * KP + j[None, :])
        acc = _mma(acc, xv, wv, IS_FP32, PRECISION, UPCAST)

    _finish_or_part(acc, b_ptr, scale_ptr, y_ptr, part_ptr, co, j, j_ok, p, p_ok, oh, ow, n,
                    K_OUT, HW_OUT, syn, syc, syh, syw, HAS_BIAS, HAS_SCALE, RELU, FLAT_Y, SPLIT,
                    WIDE)


@triton.jit(do_not_specialize=["C", "HW", "W", "sxn", "sxc", "sxh", "sxw"])
def _nonzero_kernel(x_ptr, flags_ptr, C, HW, W, sxn, sxc, sxh, sxw, BLOCK: tl.constexpr):
    """flags[n, c] = 1 where x[n, c] holds any non-zero value (NaN included).
    The scan stops at the first block holding one, so an active channel costs
    one block and only zero channels are read whole."""
    c = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    base = x_ptr + n * sxn + c.to(tl.int64) * sxc
    found = c * 0  # int32 tensors: a while loop's carried values keep their type
    start = c * 0
    while (start < HW) & (found == 0):
        q = start + tl.arange(0, BLOCK)
        v = tl.load(base + (q // W) * sxh + (q % W) * sxw, mask=q < HW, other=0.0)
        found = tl.max((v != 0).to(tl.int32), axis=0)
        start += BLOCK
    tl.store(flags_ptr + n * C + c, found)


@triton.jit
def _compact_kernel(flags_ptr, lists_ptr, counts_ptr, C, BLOCK_C: tl.constexpr):
    """Each sample's channels, active ones first, both groups ascending (what a
    stable sort of the "is zero" flags gives), and the active count."""
    n = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    f = tl.load(flags_ptr + n * C + c, mask=c < C, other=0)
    before = tl.cumsum(f, axis=0) - f  # active channels before c
    total = tl.sum(f, axis=0)
    pos = tl.where(f != 0, before, total + c - before)
    tl.store(lists_ptr + n * C + pos, c, mask=c < C)
    tl.store(counts_ptr + n, total)


_COMPACT_MAX = 8192  # channels one compaction program holds; more go through torch.sort
_DETECT_ERROR = None  # set if the detection kernels fail to compile


def active_channels(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-sample lists ``[N, Cin]`` (int32) of the input channels holding any
    non-zero value (NaN counts as non-zero), ascending and first in each row,
    and their lengths ``[N]``, found on the device with no host
    synchronisation: two small kernels (a scan per channel, a prefix sum per
    sample) instead of the ~7 torch ops of a stable sort, which took 25 us of
    GPU time and 100+ us of host time per call at batch 1 on an H100."""
    N, C, H, W = x.shape
    if (C > _COMPACT_MAX or N == 0 or C == 0  # the scan's offsets are 32-bit:
            or x.untyped_storage().nbytes() // x.element_size() >= 2**31):
        return _active_channels_torch(x)
    global _DETECT_ERROR
    if _DETECT_ERROR is None:
        flags = torch.empty((N, C), dtype=torch.int32, device=x.device)
        lists = torch.empty((N, C), dtype=torch.int32, device=x.device)
        counts = torch.empty((N,), dtype=torch.int32, device=x.device)
        hw = H * W
        try:
            _launch(_nonzero_kernel, (C, N), x, flags, C, hw, max(W, 1), *x.stride(),
                    BLOCK=max(16, min(1024, _pow2(max(hw, 1)))))
            _launch(_compact_kernel, (N,), flags, lists, counts, C,
                    BLOCK_C=_pow2(C))
            return lists, counts
        except (triton.CompilationError, RuntimeError) as exc:  # cannot build them: stay correct
            if isinstance(exc, torch.cuda.OutOfMemoryError) or "CUDA" in str(exc):
                raise  # a device error, not a build failure
            _DETECT_ERROR = exc
            warnings.warn(f"dynprune: the channel-detection kernels did not compile ({exc}); "
                          "using torch ops instead (correct, slower)", RuntimeWarning)
    return _active_channels_torch(x)


def _active_channels_torch(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """active_channels in torch ops (a stable sort of the "is zero" flags)."""
    active = x.ne(0).flatten(2).any(2)  # [N, Cin]
    order = torch.sort((~active).to(torch.uint8), dim=1, stable=True).indices
    return order.to(torch.int32).contiguous(), active.sum(1, dtype=torch.int32)


def _span(t: torch.Tensor, first_dim: int) -> int:
    """Elements between the first and last addressed element of t[0, ...]
    (first_dim=1) or of t (first_dim=0), plus one."""
    span = 1  # a plain loop: sum() over a generator took twice the host time
    for size, st in zip(t.shape[first_dim:], t.stride()[first_dim:]):
        span += (size - 1) * abs(st)
    return span


def _out_size(size: int, k: int, stride: int, pad: int, dil: int) -> int:
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


# The config the tuner chose, per layer key (shapes, dtypes, flags), and the
# untimed pick per key (used while timing is off or impossible).
_CHOSEN: dict = {}
_UNTIMED: dict = {}
# Compiled kernels per launch signature, for _launch.
_COMPILED: dict = {}


def _launch(kernel, grid, *args, **kw):
    """``kernel[grid](*args, **kw)``; after the first call per signature, through
    the compiled kernel's own launcher. The JIT binds and specialises every
    argument on each call: 49 us of host time per launch on an H100 against
    16 us direct, and a layer at batch 1 runs in 8-10 us. The key holds more
    than the JIT specialises on (dtypes, 16-byte alignment of pointers, int
    values), so a compiled kernel is reused only where the JIT would have
    picked the same one."""
    if _INTERPRET:
        kernel[grid](*args, **kw)
        return
    if len(grid) < 3:
        grid = tuple(grid) + (1,) * (3 - len(grid))  # the compiled launcher takes three
    # Ints by value (finer than the JIT's classes, so one JIT call per new shape,
    # never a wrong reuse), tensors by dtype and address modulo 16.
    key = (kernel, torch.cuda.current_device(), tuple(kw.items()),
           *[(a.dtype, a.data_ptr() & 15) if isinstance(a, torch.Tensor) else a for a in args])
    cached = _COMPILED.get(key)
    if cached is None:
        compiled = kernel[grid](*args, **kw)
        if compiled is not None:  # the constexprs follow the runtime arguments, in order
            _COMPILED[key] = (compiled, [kw[name] for name in kernel.arg_names[len(args):]])
        return
    compiled, constexprs = cached
    compiled[grid](*args, *constexprs)


class _Launch:
    """Everything one call of the kernel needs, built from the op's arguments."""

    def __init__(self, x, weight, bias, out_idx, out_scale, in_idx, stride, padding, dilation,
                 relu, out):
        if x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"the Triton kernel supports {SUPPORTED_DTYPES}, got {x.dtype}")
        N, Cin, H, W = x.shape
        Cout, _, KH, KW = weight.shape
        Ho = _out_size(H, KH, stride[0], padding[0], dilation[0])
        Wo = _out_size(W, KW, stride[1], padding[1], dilation[1])
        # Not zeroed: the conv writes the kept channels, _complete_kernel the rest.
        self.y = torch.empty((N, Cout, Ho, Wo), dtype=x.dtype, device=x.device) if out is None \
            else out
        self.n, self.k, self.hw = N, out_idx.shape[1], Ho * Wo
        self.empty = N == 0 or self.k == 0 or self.hw == 0
        if self.empty:
            self.y.zero_()
            return
        if in_idx is not None:
            lists, counts = in_idx.contiguous(), in_idx  # counts unused: COUNT_GIVEN
        else:
            lists, counts = active_channels(x)
        idx = out_idx.contiguous()
        scale = out_scale.contiguous() if out_scale is not None else idx  # unused when absent
        b = bias.contiguous() if bias is not None else idx
        precision = ("ieee" if x.dtype == torch.float32
                     and os.environ.get("DYNPRUNE_TRITON_FP32") == "ieee" else "tf32")
        self.tensors = (x, weight, b, self.y, idx, scale, lists, counts)
        self.ints = (N, Cin, H, W, Cout, Wo, Ho * Wo, self.k, lists.shape[1],
                     *x.stride(), *weight.stride(), *self.y.stride(),
                     stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1])
        self.consts = dict(KH=KH, KW=KW, HAS_BIAS=bias is not None,
                           HAS_SCALE=out_scale is not None, RELU=bool(relu),
                           IS_FP32=x.dtype == torch.float32, PRECISION=precision,
                           UPCAST=_INTERPRET and x.dtype == torch.bfloat16,
                           COUNT_GIVEN=in_idx is not None,
                           FLAT_Y=self.y.stride(3) == 1 and self.y.stride(2) == Wo)
        # The tuner's key: whether the input lists are given or found (their
        # length and dtype), and y's layout, change no timing, so one tuning
        # serves both (every config computes the same result for any of them).
        self.key = (N, Cin, Cout, Ho * Wo, self.k, stride[0], x.dtype, KH, KW, bias is not None,
                    out_scale is not None, bool(relu), precision)
        self.cout, self.wo = Cout, Wo
        # the packed path's buffers (PACK >= 1): padded map, rounded-up lists
        self.geometry = (H, W, *padding, *stride, *dilation)
        self.hp, self.wp = H + 2 * padding[0], W + 2 * padding[1]
        self.ck = _cdiv(lists.shape[1], _PACK_C) * _PACK_C
        kp_step = 32 if self.k <= 32 else _PACK_O  # tiles of 64 kept outputs need KP % 64 == 0
        self.kp = _cdiv(self.k, kp_step) * kp_step
        self.packed_w_size = N * KH * KW * self.ck * self.kp
        self.packed_x_size = N * self.hp * self.wp * self.ck
        # 32-bit offsets unless one sample of x or y (or its packed copies), the
        # weight or the partial sums span 2^31 elements (_FORCE_WIDE: 64-bit
        # always, for A/B runs). A storage bounds what a view of it can
        # address, so exact spans are only worked out for storages that large.
        largest = max(self.k * self.hw, self.hp * self.wp * self.ck, KH * KW * self.ck * self.kp)
        if max(t.untyped_storage().nbytes() // t.element_size() for t in (x, weight, self.y)) \
                >= 2**31:
            largest = max(largest, _span(x, 1), _span(weight, 0), _span(self.y, 1))
        self.wide = largest >= 2**31 or _FORCE_WIDE

    def tune(self) -> triton.Config:
        """The config for this key: the fastest candidate under CUDA graph
        replay (launch overhead would hide the GPU time of small layers), or
        the heuristic's pick where timing is off or impossible (during a graph
        capture, under the interpreter, DYNPRUNE_TRITON_AUTOTUNE=0)."""
        global _SMS
        x = self.tensors[0]
        if x.is_cuda:
            _SMS = torch.cuda.get_device_properties(x.device).multi_processor_count
        cands = _candidates(self.n, self.k, self.hw, self.ints[8], self.consts["IS_FP32"],
                            self.packed_w_size, self.packed_x_size)
        timed = (len(cands) > 1 and not _INTERPRET and x.is_cuda
                 and os.environ.get("DYNPRUNE_TRITON_AUTOTUNE", "1") != "0"
                 and not torch.cuda.is_current_stream_capturing())
        if not timed and self.key in _UNTIMED:  # not remembered as chosen: timing may come later
            self.run(_UNTIMED[self.key])
            return _UNTIMED[self.key]
        times = []
        for c in cands:
            try:
                if not timed:  # the first candidate that compiles for this GPU
                    self.run(c)
                    _UNTIMED[self.key] = c
                    return c
                # rep: 3 ms of replays, 10 times; capturing the graph costs
                # more host time than that, so a longer rep only slows tuning
                times.append((triton.testing.do_bench_cudagraph(lambda: self.run(c), rep=3), c))
            except (triton.runtime.errors.OutOfResources,  # too many registers/shared memory
                    triton.CompilationError):  # a Triton that cannot build this form
                continue
        if not times:
            raise RuntimeError(f"dynprune: no Triton tile fits this GPU for key {self.key}")
        best = min(times, key=lambda t: t[0])[1]
        _CHOSEN[self.key] = best
        return best

    def run(self, config):
        """Launch with a given config (for a split, the partial sums then the
        epilogue; otherwise the conv and the pruned channels' zeros)."""
        kwargs = config.all_kwargs()
        packed = kwargs.pop("PACK", 0)
        split = kwargs["SPLIT"]
        x, weight, b, y, idx, scale, lists, counts = self.tensors
        # A split reduction stores float32 partial sums here; otherwise the slot is unused.
        part = (torch.empty((self.n * split, self.k, self.hw), dtype=torch.float32,
                            device=y.device) if split > 1 else y)
        grid = (_cdiv(self.hw, kwargs["BLOCK_P"]), _cdiv(self.k, kwargs["BLOCK_CO"]),
                self.n * split)
        if packed:  # the copies (and the zeros, unless split) then the conv
            if self.kp % kwargs["BLOCK_CO"] or self.ck % kwargs["BLOCK_CI"]:
                # the packed loads are unmasked: tiles must divide the buffers
                raise ValueError(f"packed config {kwargs}: BLOCK_CO must divide {self.kp} and "
                                 f"BLOCK_CI must divide {self.ck} for this layer")
            xc, wp = self.pack(zeros=split == 1, blocks=_PREPARE_BLOCKS[packed])
            stride_h, stride_w, dil_h, dil_w = self.geometry[4:]
            _launch(_packed_conv_kernel, grid,
                    xc, wp, b, y, idx, scale, counts, part, self.cout, self.wo, self.hw, self.k,
                    lists.shape[1], self.wp, self.hp * self.wp, self.ck, self.kp, *y.stride(),
                    stride_h, stride_w, dil_h, dil_w, **self.consts, WIDE=self.wide, **kwargs)
            if split == 1:
                return
        else:
            _launch(_gated_conv_kernel, grid, *self.tensors, part, *self.ints, **self.consts,
                    WIDE=self.wide, **kwargs)
        # the pruned channels' zeros, and the epilogue of a split reduction
        _launch(_complete_kernel, (_cdiv(self.hw, 64), _cdiv(self.cout, 32), self.n),
                part, b, y, idx, scale, self.cout, self.wo, self.hw, self.k, self.k.bit_length(),
                *y.stride(), HAS_BIAS=self.consts["HAS_BIAS"], HAS_SCALE=self.consts["HAS_SCALE"],
                RELU=self.consts["RELU"], SPLIT=split, FLAT_Y=self.consts["FLAT_Y"], BLOCK_P=64,
                BLOCK_C=32, WIDE=self.wide)

    def pack(self, zeros: bool = True, blocks: Tuple[int, int, int] = _PREPARE_BLOCKS[1]):
        """The packed path's buffers, filled by one _prepare_kernel launch: each
        sample's active input channels, channels-last with a zero halo, and its
        kept weights; with zeros, y's pruned channels are zeroed too. blocks:
        the kernel's block sizes, as in _PREPARE_BLOCKS."""
        x, weight, _, y, idx, _, lists, counts = self.tensors
        H, W, pad_h, pad_w = self.geometry[:4]
        KH, KW = self.consts["KH"], self.consts["KW"]
        xc = torch.empty((self.n, self.hp * self.wp, self.ck), dtype=x.dtype, device=x.device)
        wp = torch.empty((self.n, KH * KW, self.ck, self.kp), dtype=weight.dtype,
                         device=x.device)
        blocks_j = self.ck // _PACK_C
        rows, w_taps, zero_p = blocks
        w_taps = w_taps or KH * KW
        if (KH * KW) % w_taps:  # else the last taps' weights would never be copied
            raise ValueError(f"prepare blocks {blocks}: {w_taps} taps per weight block "
                             f"must divide the kernel's {KH * KW} taps")
        block_q = min(64, max(16, _pow2(self.wp)))  # columns of a padded row per x block
        col_blocks = _cdiv(self.wp, block_q)
        x_blocks = _cdiv(self.hp, rows) * col_blocks * blocks_j
        w_blocks = self.kp // 32 * blocks_j * (KH * KW // w_taps)
        z_blocks = _cdiv(self.hw, zero_p) * _cdiv(self.cout, 32) if zeros else 0
        _launch(_prepare_kernel, (x_blocks + w_blocks + z_blocks, self.n),
                x, xc, weight, wp, y, idx, lists, counts, x.shape[1], H, W, self.wp,
                self.hp * self.wp, lists.shape[1], self.ck, self.kp, self.cout, self.k, self.wo,
                self.hw, self.k.bit_length(), *x.stride(), *weight.stride(), *y.stride(), pad_h,
                pad_w, col_blocks, x_blocks, w_blocks, KH=KH, KW=KW,
                COUNT_GIVEN=self.consts["COUNT_GIVEN"], FLAT_Y=self.consts["FLAT_Y"],
                ROWS=rows, BLOCK_Q=block_q, W_TAPS=w_taps, ZERO_P=zero_p, WIDE=self.wide)
        return xc, wp


def gated_conv2d_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        out_idx: torch.Tensor, out_scale: Optional[torch.Tensor],
                        in_idx: Optional[torch.Tensor], stride: Sequence[int],
                        padding: Sequence[int], dilation: Sequence[int], relu: bool,
                        out: Optional[torch.Tensor] = None,
                        config: Optional[triton.Config] = None) -> torch.Tensor:
    """``dynprune::gated_conv2d`` on the GPU (arguments already validated).

    ``out``: a buffer of the output's shape and dtype to write into (every
    element is overwritten); otherwise a new tensor. Index lists may be int32 or
    int64 (no conversion on the host path). ``config``: a ``triton.Config`` to
    run instead of the tuned one (benchmarks and A/B runs).
    """
    launch = _Launch(x, weight, bias, out_idx, out_scale, in_idx, stride, padding, dilation,
                     relu, out)
    if not launch.empty:
        config = config or _CHOSEN.get(launch.key)
        if config is None:
            launch.tune()  # leaves y computed: every candidate computes the same result
        else:
            launch.run(config)
    return launch.y


def dynamic_conv2d_triton(x, weight, bias, gate_weight, gate_bias, priority, k, in_idx, stride,
                          padding, dilation, relu):
    """``dynprune::dynamic_conv2d`` on the GPU: the gate in torch ops on the device
    (float64 saliency, the reference's ranking), then the Triton conv."""
    from dynprune.ops import saliency_from_means, select_channels

    mean = x.mean((2, 3), dtype=torch.float64)
    if in_idx is not None:  # channels outside in_idx are zero for the gate too
        listed = torch.zeros(x.shape[0], x.shape[1], dtype=torch.bool, device=x.device)
        listed.scatter_(1, in_idx.long(), True)
        mean = torch.where(listed, mean, torch.zeros((), dtype=mean.dtype, device=mean.device))
    saliency = saliency_from_means(mean, gate_weight, gate_bias, x.dtype)
    idx = select_channels(saliency, priority, k)
    scale = saliency.gather(1, idx)
    y = gated_conv2d_triton(x, weight, bias, idx, scale, in_idx, stride, padding, dilation, relu)
    return y, idx, scale
