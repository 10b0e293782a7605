"""Triton gated convolution: an implicit GEMM that skips pruned channels.

One program computes a tile of (kept output channels x output pixels) of one
sample: ``acc[co, p] += W[co, ci] @ X[ci, p]`` over kernel taps x that
sample's *active* input channels only, BLOCK_CI of them per step, loading x
and the weights through the per-sample index lists (no dense weight copy per
sample). Gate scale, bias and ReLU are applied in the epilogue; pruned output
channels are zero because the output starts zeroed and only kept channels are
stored.

Layouts, chosen so the gathers stay coalesced:
  * x and y are NCHW: a tile row is one channel's run of pixels, so a warp
    reads and writes consecutive addresses along the pixels.
  * the weight is read as ``[Cout, KH, KW, Cin]`` (PyTorch's channels_last
    weight): a tile row is one output channel's input channels, a short run
    even when gathered. A standard contiguous weight is permuted once per call;
    ``model.to(memory_format=torch.channels_last)`` stores it that way already.
Small grids (batch 1, small maps) split the reduction over SPLIT programs that
add fp32 partial sums atomically; a second small kernel applies the epilogue.

Precision: float16 and bfloat16 multiply in their own type and accumulate in
float32; float32 uses TF32 tensor cores (``tl.dot`` input precision "tf32":
~1e-3 relative error), or full IEEE float32 with ``DYNPRUNE_TRITON_FP32=ieee``.

The active input channel lists are built on the device (a stable sort of the
"channel is zero" flags puts active channels first, ascending), and each
program reads its sample's count from memory: no host synchronisation.

With ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors through
Triton's interpreter; the tests use that.
"""
from __future__ import annotations

import functools
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


# Sizes change with every layer; specialising on them (divisible by 16 or not)
# would compile each config again per layer for no gain: the loads are gathers.
_INT_ARGS = ["N", "Cin", "H", "W", "Cout", "Wo", "HW_OUT", "K_OUT", "ACT_LEN",
             "stride_h", "stride_w", "pad_h", "pad_w", "dil_h", "dil_w"]
_TUNE_OPTIONS = {"reset_to_zero": ["ws_ptr"]}  # split partial sums: zero before each try
if not _INTERPRET:
    _TUNE_OPTIONS["prune_configs_by"] = {"early_config_prune": _prune_configs}
    if "do_bench" in inspect.signature(triton.autotune).parameters:
        _TUNE_OPTIONS["do_bench"] = _quick_bench


@triton.autotune(configs=_configs(), key=["N", "Cin", "Cout", "HW_OUT", "K_OUT", "KH", "KW",
                                          "SPLIT", "stride_h"], **_TUNE_OPTIONS)
@triton.jit(do_not_specialize=_INT_ARGS)
def _gated_conv_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, ws_ptr, out_idx_ptr, scale_ptr, act_ptr, count_ptr,
    N, Cin, H, W, Cout, Wo, HW_OUT, K_OUT, ACT_LEN,  # N: only in the tuning key
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, SPLIT: tl.constexpr, COUNT_GIVEN: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, RELU: tl.constexpr,
    IS_FP32: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_j = tl.program_id(1)
    pid_z = tl.program_id(2)
    n = pid_z // SPLIT
    part = pid_z % SPLIT

    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)  # output pixels of the tile
    p_ok = p < HW_OUT
    oh = p // Wo
    ow = p % Wo
    j = pid_j * BLOCK_CO + tl.arange(0, BLOCK_CO)  # positions in the kept list
    j_ok = j < K_OUT
    co = tl.load(out_idx_ptr + n * K_OUT + j, mask=j_ok, other=0).to(tl.int32)
    co = tl.minimum(tl.maximum(co, 0), Cout - 1)  # never address outside the weight
    if COUNT_GIVEN:
        count = ACT_LEN
    else:
        count = tl.load(count_ptr + n)

    hw_in = H * W
    x_n = x_ptr + n.to(tl.int64) * Cin * hw_in  # 64-bit base; offsets inside a sample are 32-bit
    w_rows = w_ptr + co[:, None] * (KH * KW * Cin)  # [BLOCK_CO, 1]
    act_n = act_ptr + n * ACT_LEN
    acc = tl.zeros([BLOCK_P, BLOCK_CO], dtype=tl.float32)
    for r in tl.static_range(KH):
        for s in tl.static_range(KW):
            if (r * KW + s) % SPLIT == part:  # a split reduction: this program's taps
                ih = oh * stride_h - pad_h + r * dil_h
                iw = ow * stride_w - pad_w + s * dil_w
                pix_ok = p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                x_off = ih * W + iw
                for i0 in range(0, count, BLOCK_CI):
                    i = i0 + tl.arange(0, BLOCK_CI)
                    i_ok = i < count
                    ci = tl.load(act_n + i, mask=i_ok, other=0).to(tl.int32)
                    ci = tl.minimum(tl.maximum(ci, 0), Cin - 1)
                    # Loaded with pixels (x) and input channels (weight) along the
                    # fastest axis, so a warp reads runs of addresses; transposed
                    # for the dot, whose M is the pixels.
                    xv = tl.trans(tl.load(x_n + ci[:, None] * hw_in + x_off[None, :],
                                          mask=i_ok[:, None] & pix_ok[None, :], other=0.0))
                    wv = tl.trans(tl.load(w_rows + (r * KW + s) * Cin + ci[None, :],
                                          mask=j_ok[:, None] & i_ok[None, :], other=0.0))
                    if IS_FP32:
                        acc += tl.dot(xv, wv, input_precision=PRECISION)
                    elif UPCAST:  # Triton's CPU interpreter has no bfloat16 dot
                        acc += tl.dot(xv.to(tl.float32), wv.to(tl.float32), input_precision="ieee")
                    else:
                        acc += tl.dot(xv, wv)

    out = tl.trans(acc)  # [BLOCK_CO, BLOCK_P]: stores run along the pixels
    mask = j_ok[:, None] & p_ok[None, :]
    if SPLIT > 1:  # raw partial sums; _finish_kernel applies the epilogue
        tl.atomic_add(ws_ptr + (n * K_OUT + j)[:, None] * HW_OUT + p[None, :], out, mask=mask)
    else:
        if HAS_BIAS:
            out += tl.load(b_ptr + co, mask=j_ok, other=0.0).to(tl.float32)[:, None]
        if HAS_SCALE:  # the contract's order: scale * (conv + bias)
            out *= tl.load(scale_ptr + n * K_OUT + j, mask=j_ok, other=0.0).to(tl.float32)[:, None]
        if RELU:
            out = tl.where(out < 0.0, 0.0, out)  # keeps NaN, like torch.relu
        y_n = y_ptr + n.to(tl.int64) * Cout * HW_OUT
        tl.store(y_n + co[:, None] * HW_OUT + p[None, :], out.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _finish_kernel(ws_ptr, b_ptr, y_ptr, out_idx_ptr, scale_ptr, Cout, HW_OUT, K_OUT,
                   HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, RELU: tl.constexpr,
                   BLOCK: tl.constexpr):
    """Epilogue of a split reduction: one kept channel's pixels per program."""
    pid_p = tl.program_id(0)
    j = tl.program_id(1)
    n = tl.program_id(2)
    p = pid_p * BLOCK + tl.arange(0, BLOCK)
    ok = p < HW_OUT
    co = tl.load(out_idx_ptr + n * K_OUT + j).to(tl.int32)
    co = tl.minimum(tl.maximum(co, 0), Cout - 1)
    acc = tl.load(ws_ptr + (n * K_OUT + j) * HW_OUT + p, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + co).to(tl.float32)
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + n * K_OUT + j).to(tl.float32)
    if RELU:
        acc = tl.where(acc < 0.0, 0.0, acc)
    y_n = y_ptr + n.to(tl.int64) * Cout * HW_OUT
    tl.store(y_n + co * HW_OUT + p, acc.to(y_ptr.dtype.element_ty), mask=ok)


def active_channels(x: torch.Tensor, in_idx: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-sample input channel lists ``[N, L]`` and their lengths ``[N]`` (int32).

    With ``in_idx`` the list is given (returned as is). Otherwise the channels
    holding any non-zero value (NaN counts as non-zero) come first, ascending,
    from a stable sort on the device: no host synchronisation.
    """
    n = x.shape[0]
    if in_idx is not None:
        return in_idx, torch.full((n,), in_idx.shape[1], dtype=torch.int32, device=x.device)
    active = x.ne(0).flatten(2).any(2)  # [N, Cin]
    order = torch.sort((~active).to(torch.uint8), dim=1, stable=True).indices
    return order.to(torch.int32).contiguous(), active.sum(1, dtype=torch.int32)


def _out_size(size: int, k: int, stride: int, pad: int, dil: int) -> int:
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few "SMs", so small tests take the split path too
    return torch.cuda.get_device_properties(device).multi_processor_count


def _choose_split(n: int, k: int, hw: int, taps: int, device: torch.device) -> int:
    """Split the reduction over the kernel taps when the output tiles alone
    cannot fill the GPU (batch 1 on small maps)."""
    tiles = n * triton.cdiv(k, 64) * triton.cdiv(hw, 64)
    sms = _sm_count(device)
    split = 1
    while split * 2 <= taps and tiles * split < sms:
        split *= 2
    return split


def _weight_cin_last(weight: torch.Tensor) -> torch.Tensor:
    """The weight as a contiguous ``[Cout, KH, KW, Cin]`` tensor (a view when it
    is stored channels_last already)."""
    w = weight.permute(0, 2, 3, 1)
    return w if w.is_contiguous() else w.contiguous()


def gated_conv2d_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        out_idx: torch.Tensor, out_scale: Optional[torch.Tensor],
                        in_idx: Optional[torch.Tensor], stride: Sequence[int],
                        padding: Sequence[int], dilation: Sequence[int], relu: bool,
                        out: Optional[torch.Tensor] = None, *, split: Optional[int] = None
                        ) -> torch.Tensor:
    """``dynprune::gated_conv2d`` on the GPU (arguments already validated).

    ``out``: a buffer of the output's shape and dtype to write into (it is
    zeroed first); otherwise a new zeroed tensor. ``split``: how many programs
    share one tile's reduction (default: chosen from the grid size; tests force it).
    """
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the Triton kernel supports {SUPPORTED_DTYPES}, got {x.dtype}")
    N, Cin, H, W = x.shape
    Cout, _, KH, KW = weight.shape
    Ho = _out_size(H, KH, stride[0], padding[0], dilation[0])
    Wo = _out_size(W, KW, stride[1], padding[1], dilation[1])
    if max(Cin * H * W, Cout * Ho * Wo, weight.numel()) >= 2**31:
        raise ValueError("the Triton kernel indexes within a sample with 32-bit offsets: "
                         f"one sample's input ({Cin}x{H}x{W}), output or the weight is too large")
    direct = out is not None and out.is_contiguous()
    y = out if direct else torch.empty((N, Cout, Ho, Wo), dtype=x.dtype, device=x.device)
    y.zero_()
    k = out_idx.shape[1]
    if N == 0 or k == 0 or Ho * Wo == 0:
        return y if out is None or direct else out.copy_(y)
    x = x.contiguous()
    w = _weight_cin_last(weight)
    idx = out_idx.contiguous()
    if in_idx is not None:  # every list is full length: the kernel needs no counts
        lists, counts = in_idx.contiguous(), idx
    else:
        lists, counts = active_channels(x, None)
    scale = out_scale.contiguous() if out_scale is not None else idx  # unused when absent
    b = bias.contiguous() if bias is not None else idx
    precision = "ieee" if os.environ.get("DYNPRUNE_TRITON_FP32") == "ieee" else "tf32"
    if split is None:
        split = _choose_split(N, k, Ho * Wo, KH * KW, x.device)
    ws = (torch.zeros((N, k, Ho * Wo), dtype=torch.float32, device=x.device) if split > 1
          else y)  # unused without a split

    def grid(meta):
        return (triton.cdiv(Ho * Wo, meta["BLOCK_P"]), triton.cdiv(k, meta["BLOCK_CO"]), N * split)

    _gated_conv_kernel[grid](
        x, w, b, y, ws, idx, scale, lists, counts,
        N, Cin, H, W, Cout, Wo, Ho * Wo, k, lists.shape[1],
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        KH=KH, KW=KW, SPLIT=split, COUNT_GIVEN=in_idx is not None,
        HAS_BIAS=bias is not None, HAS_SCALE=out_scale is not None, RELU=bool(relu),
        IS_FP32=x.dtype == torch.float32, PRECISION=precision,
        UPCAST=_INTERPRET and x.dtype == torch.bfloat16,
    )
    if split > 1:
        block = min(1024, max(32, triton.next_power_of_2(Ho * Wo)))
        _finish_kernel[(triton.cdiv(Ho * Wo, block), k, N)](
            ws, b, y, idx, scale, Cout, Ho * Wo, k, HAS_BIAS=bias is not None,
            HAS_SCALE=out_scale is not None, RELU=bool(relu), BLOCK=block)
    return y if out is None or direct else out.copy_(y)
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
