"""Triton gated convolution: an implicit GEMM that skips pruned channels.

One program computes a tile of (output pixels x kept output channels) of one
sample. Its reduction runs over kernel taps x that sample's *active* input
channels only, BLOCK_CI of them per step, loading x and the weights through
the per-sample index lists (no dense weight copy per sample). Gate scale, bias
and ReLU are applied in the epilogue; pruned output channels are zero because
the output starts zeroed and only kept channels are stored.

Any strides work for x, the weight and y: a weight stored with output
channels contiguous (``w.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)``)
makes the weight tile loads coalesced; benchmarks/gpu_check.py times both.

Precision: float16 and bfloat16 multiply in their own type and accumulate in
float32; float32 uses TF32 tensor cores (``tl.dot`` input precision "tf32":
~1e-3 relative error), or full IEEE float32 with ``DYNPRUNE_TRITON_FP32=ieee``.

The active input channel lists are built on the device (a stable sort of the
"channel is zero" flags puts active channels first, ascending), and each
program reads its sample's count from memory: no host synchronisation.

With ``TRITON_INTERPRET=1`` the same kernel runs on CPU tensors through
Triton's interpreter; the tests use that.
"""
from __future__ import annotations

import inspect
import os
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
import triton.testing

__all__ = ["SUPPORTED_DTYPES", "active_channels", "gated_conv2d_triton", "dynamic_conv2d_triton"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _configs():
    # The interpreter runs every config it is given: keep one. So does
    # DYNPRUNE_TRITON_AUTOTUNE=0, for runs of many shapes where tuning costs more
    # than it gains (tests on a GPU).
    if _INTERPRET or os.environ.get("DYNPRUNE_TRITON_AUTOTUNE", "1") == "0":
        return [triton.Config({"BLOCK_P": 32, "BLOCK_CO": 16, "BLOCK_CI": 16}, num_warps=4)]
    return [
        triton.Config({"BLOCK_P": bp, "BLOCK_CO": bco, "BLOCK_CI": bci}, num_warps=w, num_stages=s)
        for bp, bco, bci, w, s in [
            (128, 64, 32, 4, 3), (64, 64, 32, 4, 3), (128, 32, 32, 4, 3), (64, 32, 64, 4, 3),
            (128, 128, 32, 8, 3), (32, 64, 32, 4, 3), (16, 32, 64, 4, 3),  # small maps: more programs
        ]
    ]


def _prune_configs(configs, named_args, **kwargs):
    """Drop tiles far larger than the layer: a 64-channel tile for 32 kept
    channels, or 128 pixels for a 7x7 map, only wastes lanes and tuning time."""
    k, hw = named_args["K_OUT"], named_args["HW_OUT"]
    fits = [c for c in configs
            if c.kwargs["BLOCK_CO"] <= max(16, triton.next_power_of_2(k))
            and c.kwargs["BLOCK_P"] <= max(16, triton.next_power_of_2(hw))]
    return fits or configs[-1:]


def _quick_bench(kernel_call, quantiles):
    # Tuning needs a ranking, not a precise time: short runs keep a first call
    # on a new shape well under a second.
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


# Sizes and strides change with every layer; specialising on them (divisible by
# 16 or not) would compile each config again per layer for no gain, since all
# loads here are gathers through index lists.
_INT_ARGS = ["N", "Cin", "H", "W", "Cout", "Wo", "HW_OUT", "K_OUT", "ACT_LEN",
             "sxn", "sxc", "sxh", "sxw", "swo", "swi", "swh", "sww", "syn", "syc", "syh", "syw",
             "stride_h", "stride_w", "pad_h", "pad_w", "dil_h", "dil_w"]
_TUNE_OPTIONS = {} if _INTERPRET else {"prune_configs_by": {"early_config_prune": _prune_configs}}
if not _INTERPRET and "do_bench" in inspect.signature(triton.autotune).parameters:
    _TUNE_OPTIONS["do_bench"] = _quick_bench


@triton.autotune(configs=_configs(), key=["N", "Cin", "Cout", "HW_OUT", "K_OUT", "KH", "KW",
                                          "stride_h", "IS_FP32"], **_TUNE_OPTIONS)
@triton.jit(do_not_specialize=_INT_ARGS)
def _gated_conv_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, out_idx_ptr, scale_ptr, act_ptr, count_ptr,
    N, Cin, H, W, Cout, Wo, HW_OUT, K_OUT, ACT_LEN,
    sxn, sxc, sxh, sxw, swo, swi, swh, sww, syn, syc, syh, syw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
    RELU: tl.constexpr, IS_FP32: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_j = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)

    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)  # output pixels of the tile
    p_ok = p < HW_OUT
    oh = p // Wo
    ow = p % Wo
    j = pid_j * BLOCK_CO + tl.arange(0, BLOCK_CO)  # positions in the kept list
    j_ok = j < K_OUT
    co = tl.load(out_idx_ptr + n * K_OUT + j, mask=j_ok, other=0).to(tl.int64)
    co = tl.minimum(tl.maximum(co, 0), Cout - 1)  # never address outside the weight
    count = tl.load(count_ptr + n)

    x_n = x_ptr + n * sxn
    acc = tl.zeros([BLOCK_P, BLOCK_CO], dtype=tl.float32)
    for r in tl.static_range(KH):
        for s in tl.static_range(KW):
            ih = oh * stride_h - pad_h + r * dil_h
            iw = ow * stride_w - pad_w + s * dil_w
            pix_ok = p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x_off = ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
            w_tap = w_ptr + co[None, :] * swo + r * swh + s * sww
            for i0 in range(0, count, BLOCK_CI):
                i = i0 + tl.arange(0, BLOCK_CI)
                i_ok = i < count
                ci = tl.load(act_ptr + n * ACT_LEN + i, mask=i_ok, other=0).to(tl.int64)
                ci = tl.minimum(tl.maximum(ci, 0), Cin - 1)
                xv = tl.load(x_n + x_off[:, None] + ci[None, :] * sxc,
                             mask=pix_ok[:, None] & i_ok[None, :], other=0.0)
                wv = tl.load(w_tap + ci[:, None] * swi, mask=i_ok[:, None] & j_ok[None, :],
                             other=0.0)
                if IS_FP32:
                    acc += tl.dot(xv, wv, input_precision=PRECISION)
                elif UPCAST:  # Triton's CPU interpreter has no bfloat16 dot
                    acc += tl.dot(xv.to(tl.float32), wv.to(tl.float32), input_precision="ieee")
                else:
                    acc += tl.dot(xv, wv)

    if HAS_BIAS:
        acc += tl.load(b_ptr + co, mask=j_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_SCALE:  # the contract's order: scale * (conv + bias)
        acc *= tl.load(scale_ptr + n * K_OUT + j, mask=j_ok, other=0.0).to(tl.float32)[None, :]
    if RELU:
        acc = tl.where(acc < 0.0, 0.0, acc)  # keeps NaN, like torch.relu
    y_ptrs = (y_ptr + n * syn + co[None, :] * syc + oh.to(tl.int64)[:, None] * syh
              + ow.to(tl.int64)[:, None] * syw)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=p_ok[:, None] & j_ok[None, :])


def active_channels(x: torch.Tensor, in_idx: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-sample input channel lists ``[N, L]`` (int32) and their lengths ``[N]``.

    With ``in_idx`` the list is given. Otherwise the channels holding any
    non-zero value (NaN counts as non-zero) come first, ascending, from a
    stable sort on the device: no host synchronisation.
    """
    n = x.shape[0]
    if in_idx is not None:
        lists = in_idx.to(torch.int32).contiguous()
        return lists, torch.full((n,), lists.shape[1], dtype=torch.int32, device=x.device)
    active = x.ne(0).flatten(2).any(2)  # [N, Cin]
    order = torch.sort((~active).to(torch.uint8), dim=1, stable=True).indices
    return order.to(torch.int32).contiguous(), active.sum(1, dtype=torch.int32)


def _out_size(size: int, k: int, stride: int, pad: int, dil: int) -> int:
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


def gated_conv2d_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        out_idx: torch.Tensor, out_scale: Optional[torch.Tensor],
                        in_idx: Optional[torch.Tensor], stride: Sequence[int],
                        padding: Sequence[int], dilation: Sequence[int], relu: bool,
                        out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``dynprune::gated_conv2d`` on the GPU (arguments already validated).

    ``out``: a buffer of the output's shape and dtype to write into (it is
    zeroed first); otherwise a new zeroed tensor.
    """
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the Triton kernel supports {SUPPORTED_DTYPES}, got {x.dtype}")
    N, Cin, H, W = x.shape
    Cout, _, KH, KW = weight.shape
    Ho = _out_size(H, KH, stride[0], padding[0], dilation[0])
    Wo = _out_size(W, KW, stride[1], padding[1], dilation[1])
    y = out if out is not None else torch.empty((N, Cout, Ho, Wo), dtype=x.dtype, device=x.device)
    y.zero_()
    k = out_idx.shape[1]
    if N == 0 or k == 0 or Ho * Wo == 0:
        return y
    lists, counts = active_channels(x, in_idx)
    idx = out_idx.to(torch.int32).contiguous()
    scale = out_scale.contiguous() if out_scale is not None else idx  # unused when absent
    b = bias.contiguous() if bias is not None else idx
    precision = "ieee" if os.environ.get("DYNPRUNE_TRITON_FP32") == "ieee" else "tf32"

    def grid(meta):
        return (triton.cdiv(Ho * Wo, meta["BLOCK_P"]), triton.cdiv(k, meta["BLOCK_CO"]), N)

    _gated_conv_kernel[grid](
        x, weight, b, y, idx, scale, lists, counts,
        N, Cin, H, W, Cout, Wo, Ho * Wo, k, lists.shape[1],
        *x.stride(), *weight.stride(), *y.stride(),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        KH=KH, KW=KW, HAS_BIAS=bias is not None, HAS_SCALE=out_scale is not None,
        RELU=bool(relu), IS_FP32=x.dtype == torch.float32, PRECISION=precision,
        UPCAST=_INTERPRET and x.dtype == torch.bfloat16,
    )
    return y


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
