"""The custom op ``dynprune::gated_conv2d``: one contract, several backends.

    y[n, out_idx[n, j]] = act(out_scale[n, j] * (conv(x[n], weight[out_idx[n, j]])
                                                 + bias[out_idx[n, j]]))

and every other output channel is exactly 0. Input channels not listed in
``in_idx`` are treated as zero (``in_idx=None``: the backend finds the non-zero
channels itself). ``act`` is ReLU when ``relu`` is true, else the identity.

Backends:
  * ``reference``: dense conv then mask, in plain PyTorch. It *defines* the
    semantics and is the test oracle; it saves no work.
  * ``cpu``: the native kernel from ``csrc/`` (float32 skips pruned channels;
    other dtypes run the reference formula in ATen).
  * ``cuda``: the Triton kernel of ``kernels/gated_conv.py`` (float32 as TF32,
    float16, bfloat16; other dtypes the reference) when triton imports, else
    the reference.
A fake (meta) implementation makes the op traceable by torch.compile/export,
and an autograd formula (recomputing the reference) keeps gradients correct
when the op is called on tensors that require grad.
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "backends", "channel_gate_reference", "dynamic_conv2d_reference", "gated_conv2d",
    "gated_conv2d_reference", "select_channels",
]

_SCHEMA = (
    "(Tensor x, Tensor weight, Tensor? bias, Tensor out_idx, Tensor? out_scale, "
    "Tensor? in_idx, int[2] stride, int[2] padding, int[2] dilation, bool relu)"
)
_lib = torch.library.Library("dynprune", "DEF")
_lib.define("gated_conv2d" + _SCHEMA + " -> Tensor")
_lib.define("gated_conv2d.out" + _SCHEMA[:-1] + ", *, Tensor(a!) out) -> Tensor(a!)")
_lib.define("channel_gate(Tensor x, Tensor gate_weight, Tensor gate_bias, Tensor priority, int k)"
            " -> (Tensor, Tensor)")
_lib.define(
    "dynamic_conv2d(Tensor x, Tensor weight, Tensor? bias, Tensor gate_weight, Tensor gate_bias, "
    "Tensor priority, int k, Tensor? in_idx, int[2] stride, int[2] padding, int[2] dilation, "
    "bool relu) -> (Tensor, Tensor, Tensor)"
)

_BACKENDS = {"cpu": "reference", "cuda": "reference"}


def _load_native() -> Optional[str]:
    """Load dynprune._C (registers the CPU kernels). Returns the failure reason."""
    # Say plainly when the library is absent: Python's own message for a missing
    # submodule of a package still initialising blames a circular import.
    if importlib.util.find_spec("dynprune._C") is None:
        return "the extension is not built (no dynprune/_C library next to the package)"
    try:
        from dynprune import _C  # noqa: F401
    except Exception as exc:  # ImportError, undefined symbol, ABI mismatch, ...
        return f"{type(exc).__name__}: {exc}"
    return None


# --------------------------------------------------------------------------- checks


def _check_index(idx: torch.Tensor, name: str, n: int, limit: int, values: bool = True) -> None:
    if idx.dtype.is_floating_point or idx.dtype == torch.bool or idx.dtype.is_complex:
        raise TypeError(f"{name} must be an integer tensor, got {idx.dtype}")
    if idx.dim() != 2 or idx.shape[0] != n:
        raise ValueError(f"{name} must have shape [N={n}, k], got {list(idx.shape)}")
    if idx.shape[1] > limit:
        raise ValueError(f"{name} lists {idx.shape[1]} channels but only {limit} exist")
    if idx.numel() == 0 or not values:
        return
    if int(idx.min()) < 0 or int(idx.max()) >= limit:
        raise ValueError(f"{name} holds values out of range [0, {limit})")
    if idx.shape[1] > 1 and not bool((idx[:, 1:] > idx[:, :-1]).all()):
        raise ValueError(f"{name} rows must be sorted ascending without duplicates")


def _check_inputs(x, weight, bias, out_idx, out_scale, in_idx, stride, padding, dilation,
                  values: bool = True):
    """The same checks as the native kernel, so every backend fails alike.

    ``values=False`` skips reading index values (a host synchronisation on
    CUDA); shapes, dtypes and devices are always checked."""
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D [N, Cin, H, W], got {x.dim()}-D")
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D [Cout, Cin, kh, kw], got {weight.dim()}-D")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be floating point, got {x.dtype}")
    for name, t in (("weight", weight), ("bias", bias), ("out_scale", out_scale)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"dtype mismatch: x is {x.dtype} but {name} is {t.dtype}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"channel mismatch: x has {x.shape[1]} input channels but weight expects "
            f"{weight.shape[1]} (grouped convolutions are not supported)"
        )
    if weight.shape[2] < 1 or weight.shape[3] < 1:
        raise ValueError(f"kernel size must be positive, got {tuple(weight.shape[2:])}")
    if weight.shape[0] < 1 or weight.shape[1] < 1:
        raise ValueError("weight must have at least one output and one input channel, got "
                         f"{tuple(weight.shape[:2])}")
    if x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"x must have a non-empty spatial size, got {x.shape[2]}x{x.shape[3]}")
    if len(stride) != 2 or len(padding) != 2 or len(dilation) != 2:
        raise ValueError("stride, padding and dilation must have 2 elements each")
    if min(stride) <= 0 or min(dilation) <= 0 or min(padding) < 0:
        raise ValueError(
            "stride and dilation must be positive and padding non-negative, got "
            f"stride={list(stride)} padding={list(padding)} dilation={list(dilation)}"
        )
    for d in range(2):
        if x.shape[2 + d] + 2 * padding[d] < dilation[d] * (weight.shape[2 + d] - 1) + 1:
            raise ValueError(
                f"input {tuple(x.shape[2:])} with padding {list(padding)} is smaller than "
                "the dilated kernel"
            )
    cout = weight.shape[0]
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != cout):
        raise ValueError(f"bias must have shape [{cout}], got {list(bias.shape)}")
    _check_index(out_idx, "out_idx", x.shape[0], cout, values)
    if out_scale is not None and out_scale.shape != out_idx.shape:
        raise ValueError(
            f"out_scale must have the shape of out_idx {list(out_idx.shape)}, "
            f"got {list(out_scale.shape)}"
        )
    if in_idx is not None:
        _check_index(in_idx, "in_idx", x.shape[0], x.shape[1], values)
    for t in (weight, bias, out_idx, out_scale, in_idx):
        if t is not None and t.device != x.device:
            raise ValueError(f"all tensors must be on {x.device}, got one on {t.device}")


# --------------------------------------------------------------------------- reference


def gated_conv2d_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_idx: torch.Tensor,
    out_scale: Optional[torch.Tensor],
    in_idx: Optional[torch.Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    relu: bool,
) -> torch.Tensor:
    """The definition of the op: dense convolution, then mask. Differentiable."""
    _check_inputs(x, weight, bias, out_idx, out_scale, in_idx, stride, padding, dilation)
    return _gated_conv2d_math(x, weight, bias, out_idx, out_scale, in_idx, stride, padding,
                              dilation, relu)


def _gated_conv2d_math(x, weight, bias, out_idx, out_scale, in_idx, stride, padding, dilation,
                       relu):
    """gated_conv2d_reference after its input checks (which read index values:
    the backward recomputes from inputs the forward already checked, and under
    torch.compile such reads are data-dependent guards)."""
    n, cout = x.shape[0], weight.shape[0]
    out_idx = out_idx.long()
    if in_idx is not None:  # where(), not a multiply: a NaN outside in_idx is still zero
        in_mask = torch.zeros(n, x.shape[1], dtype=torch.bool, device=x.device)
        in_mask.scatter_(1, in_idx.long(), True)
        x = torch.where(in_mask[:, :, None, None], x, torch.zeros((), dtype=x.dtype, device=x.device))
    y = F.conv2d(x, weight, bias, tuple(stride), tuple(padding), tuple(dilation))
    if out_scale is None:
        out_scale = torch.ones(out_idx.shape, dtype=x.dtype, device=x.device)
    full_scale = torch.zeros(n, cout, dtype=x.dtype, device=x.device).scatter(1, out_idx, out_scale)
    kept = torch.zeros(n, cout, dtype=torch.bool, device=x.device).scatter(1, out_idx, True)
    y = y * full_scale[:, :, None, None]
    if relu:
        y = torch.relu(y)
    # where(), not a multiply: pruned channels are exactly 0 even if conv gave inf/nan.
    return torch.where(kept[:, :, None, None], y, torch.zeros((), dtype=y.dtype, device=y.device))


def _reference_out(x, weight, bias, out_idx, out_scale, in_idx, stride, padding, dilation,
                   relu, *, out):
    y = gated_conv2d_reference(x, weight, bias, out_idx, out_scale, in_idx, stride, padding,
                               dilation, relu)
    _check_out(out, tuple(y.shape), y.dtype)
    return out.copy_(y)


def _check_out(out: torch.Tensor, shape, dtype) -> None:
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"out must have shape {list(shape)}, got {list(out.shape)}")
    if out.dtype != dtype:
        raise TypeError(f"dtype mismatch: x is {dtype} but out is {out.dtype}")


def select_channels(saliency: torch.Tensor, priority: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k channels per row of ``saliency``, sorted ascending.

    Ranking: saliency descending, ties by priority descending, then by lower
    channel index (NaN saliency ranks first, as in torch.sort). Stable sorts
    over channels pre-ordered by priority give exactly this order.
    """
    order = torch.sort(priority, descending=True, stable=True).indices
    ranked = torch.sort(saliency[:, order], dim=1, descending=True, stable=True).indices
    return torch.sort(order[ranked[:, :k]], dim=1).values


def gate_saliency(x: torch.Tensor, gate_weight: torch.Tensor, gate_bias: torch.Tensor) -> torch.Tensor:
    """``relu(gate_weight @ mean_hw(x) + gate_bias)``, computed in float64 and
    rounded once to x.dtype, so every backend ranks channels alike."""
    return saliency_from_means(x.mean((2, 3), dtype=torch.float64), gate_weight, gate_bias,
                               x.dtype)


def saliency_from_means(mean: torch.Tensor, gate_weight: torch.Tensor, gate_bias: torch.Tensor,
                        dtype: torch.dtype) -> torch.Tensor:
    """The gate on float64 channel means ``[N, Cin]``, rounded once to ``dtype``."""
    return F.relu(F.linear(mean, gate_weight.double(), gate_bias.double())).to(dtype)


def _check_gate(x, gate_weight, gate_bias, priority, k):
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D [N, Cin, H, W], got {x.dim()}-D")
    if gate_weight.dim() != 2 or gate_weight.shape[1] != x.shape[1]:
        raise ValueError(f"gate_weight must have shape [Cout, {x.shape[1]}], "
                         f"got {list(gate_weight.shape)}")
    c = gate_weight.shape[0]
    if gate_bias.shape != (c,) or priority.shape != (c,):
        raise ValueError(f"gate_bias and priority must have shape [{c}]")
    if not 1 <= k <= c:
        raise ValueError(f"k must be in [1, {c}], got {k}")
    for t in (gate_weight, gate_bias, priority):
        if t.dtype != x.dtype:
            raise TypeError(f"dtype mismatch: x is {x.dtype} but a gate tensor is {t.dtype}")


def channel_gate_reference(x, gate_weight, gate_bias, priority, k):
    """``(out_idx, out_scale)``: FBS gate ``relu(fc(mean_hw(x)))`` and its top-k."""
    _check_gate(x, gate_weight, gate_bias, priority, k)
    return _channel_gate_math(x, gate_weight, gate_bias, priority, k)


def _channel_gate_math(x, gate_weight, gate_bias, priority, k):
    """channel_gate_reference after its input checks."""
    saliency = gate_saliency(x, gate_weight, gate_bias)
    idx = select_channels(saliency.detach(), priority, k)
    return idx, saliency.gather(1, idx)


def dynamic_conv2d_reference(x, weight, bias, gate_weight, gate_bias, priority, k, in_idx,
                             stride, padding, dilation, relu):
    """Gate then gated conv: one eval-mode DynamicConv2d layer. ``(y, idx, scale)``.

    Input channels outside ``in_idx`` are treated as zero by the gate and the
    conv alike (the kernel never reads them).
    """
    return _dynamic_conv2d_math(x, weight, bias, gate_weight, gate_bias, priority, k, in_idx,
                                stride, padding, dilation, relu, check=True)


def _dynamic_conv2d_math(x, weight, bias, gate_weight, gate_bias, priority, k, in_idx, stride,
                         padding, dilation, relu, check=False):
    """dynamic_conv2d_reference; without ``check`` none of its input checks
    (see _gated_conv2d_math)."""
    if in_idx is not None:
        if check:
            _check_index(in_idx, "in_idx", x.shape[0], x.shape[1])
        in_mask = torch.zeros(x.shape[0], x.shape[1], dtype=torch.bool, device=x.device)
        in_mask.scatter_(1, in_idx.long(), True)
        x = torch.where(in_mask[:, :, None, None], x, torch.zeros((), dtype=x.dtype, device=x.device))
    gate = channel_gate_reference if check else _channel_gate_math
    idx, scale = gate(x, gate_weight, gate_bias, priority, k)
    conv = gated_conv2d_reference if check else _gated_conv2d_math
    y = conv(x, weight, bias, idx, scale, in_idx, stride, padding, dilation, relu)
    return y, idx, scale


# --------------------------------------------------------------------------- registration

_native_error = _load_native()
if _native_error is None:
    _BACKENDS["cpu"] = "native"
else:
    warnings.warn(
        f"dynprune: native CPU kernels unavailable ({_native_error}); falling back to the "
        "pure-PyTorch reference op (correct, not faster). Rebuild with "
        "`pip install --no-build-isolation -e .`.",
        RuntimeWarning,
        stacklevel=2,
    )
_REFERENCES = {
    "gated_conv2d": gated_conv2d_reference,
    "gated_conv2d.out": _reference_out,
    "channel_gate": channel_gate_reference,
    "dynamic_conv2d": dynamic_conv2d_reference,
}
for _name, _ref in _REFERENCES.items():
    if _native_error is not None:
        _lib.impl(_name, _ref, "CPU")
    _lib.impl(_name, _ref, "CUDA")


# --------------------------------------------------------------------------- CUDA (Triton)
#
# Index *values* are not checked on CUDA by default: reading them would
# synchronise with the host on every call. The kernel clamps every index it
# loads, so malformed lists give wrong numbers, never a memory fault. Set
# DYNPRUNE_CHECK_INDICES=1 to check them (a sync per call).


def _check_values() -> bool:
    return os.environ.get("DYNPRUNE_CHECK_INDICES", "0") == "1"


def _triton_gated(x, weight, bias, out_idx, out_scale, in_idx, stride, padding, dilation, relu):
    from dynprune.kernels.gated_conv import SUPPORTED_DTYPES, gated_conv2d_triton
    if x.dtype not in SUPPORTED_DTYPES:
        return gated_conv2d_reference(x, weight, bias, out_idx, out_scale, in_idx, stride,
                                      padding, dilation, relu)
    _check_inputs(x, weight, bias, out_idx, out_scale, in_idx, stride, padding, dilation,
                  values=_check_values())
    return gated_conv2d_triton(x, weight, bias, out_idx, out_scale, in_idx, stride, padding,
                               dilation, relu)


def _triton_gated_out(x, weight, bias, out_idx, out_scale, in_idx, stride, padding, dilation,
                      relu, *, out):
    from dynprune.kernels.gated_conv import SUPPORTED_DTYPES, gated_conv2d_triton
    if x.dtype not in SUPPORTED_DTYPES:
        return _reference_out(x, weight, bias, out_idx, out_scale, in_idx, stride, padding,
                              dilation, relu, out=out)
    _check_inputs(x, weight, bias, out_idx, out_scale, in_idx, stride, padding, dilation,
                  values=_check_values())
    _check_out(out, _conv_out_shape(x, weight, stride, padding, dilation), x.dtype)
    return gated_conv2d_triton(x, weight, bias, out_idx, out_scale, in_idx, stride, padding,
                               dilation, relu, out=out)


def _triton_dynamic(x, weight, bias, gate_weight, gate_bias, priority, k, in_idx, stride,
                    padding, dilation, relu):
    from dynprune.kernels.gated_conv import SUPPORTED_DTYPES, dynamic_conv2d_triton
    if x.dtype not in SUPPORTED_DTYPES:
        return dynamic_conv2d_reference(x, weight, bias, gate_weight, gate_bias, priority, k,
                                        in_idx, stride, padding, dilation, relu)
    _check_gate(x, gate_weight, gate_bias, priority, k)
    if in_idx is not None:
        _check_index(in_idx, "in_idx", x.shape[0], x.shape[1], _check_values())
    return dynamic_conv2d_triton(x, weight, bias, gate_weight, gate_bias, priority, k, in_idx,
                                 stride, padding, dilation, relu)


def _register_triton() -> Optional[str]:
    """Make the Triton kernels the CUDA implementation. Returns the failure reason."""
    try:
        import dynprune.kernels.gated_conv  # noqa: F401  (imports triton)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    _lib.impl("gated_conv2d", _triton_gated, "CUDA", allow_override=True)
    _lib.impl("gated_conv2d.out", _triton_gated_out, "CUDA", allow_override=True)
    _lib.impl("dynamic_conv2d", _triton_dynamic, "CUDA", allow_override=True)
    return None


_cuda_error = None
if torch.cuda.is_available():  # importing triton costs time: only where it can run
    _cuda_error = _register_triton()
    if _cuda_error is None:
        _BACKENDS["cuda"] = "triton"
    else:
        warnings.warn(f"dynprune: Triton kernels unavailable ({_cuda_error}); CUDA tensors use "
                      "the pure-PyTorch reference op (correct, not faster).", RuntimeWarning,
                      stacklevel=2)


def _conv_out_shape(x, weight, stride, padding, dilation):
    h = (x.shape[2] + 2 * padding[0] - dilation[0] * (weight.shape[2] - 1) - 1) // stride[0] + 1
    w = (x.shape[3] + 2 * padding[1] - dilation[1] * (weight.shape[3] - 1) - 1) // stride[1] + 1
    return (x.shape[0], weight.shape[0], h, w)


# Fake implementations: shapes only (the index checks read data, which fake
# tensors do not have), so torch.compile / export can trace the ops.
@torch.library.register_fake("dynprune::gated_conv2d")
def _fake(x, weight, bias, out_idx, out_scale, in_idx, stride, padding, dilation, relu):
    return x.new_empty(_conv_out_shape(x, weight, stride, padding, dilation))


@torch.library.register_fake("dynprune::channel_gate")
def _fake_gate(x, gate_weight, gate_bias, priority, k):
    return (x.new_empty((x.shape[0], k), dtype=torch.long), x.new_empty((x.shape[0], k)))


@torch.library.register_fake("dynprune::dynamic_conv2d")
def _fake_dynamic(x, weight, bias, gate_weight, gate_bias, priority, k, in_idx, stride, padding,
                  dilation, relu):
    y = x.new_empty(_conv_out_shape(x, weight, stride, padding, dilation))
    return y, x.new_empty((x.shape[0], k), dtype=torch.long), x.new_empty((x.shape[0], k))


def _register_recompute_autograd(name, reference, differentiable):
    """Autograd for op ``name``: backward recomputes ``reference`` densely.

    Correct gradients for the inputs at positions ``differentiable`` (training
    uses the dense path anyway; this keeps an eval-mode call differentiable).
    """

    def setup_context(ctx, inputs, output):
        ctx.inputs = inputs

    def backward(ctx, *grads):
        inputs = list(ctx.inputs)
        leaves = {}
        with torch.enable_grad():
            for i in differentiable:
                if inputs[i] is not None:
                    inputs[i] = leaves[i] = inputs[i].detach().requires_grad_(True)
            outs = reference(*inputs)
            outs = outs if isinstance(outs, tuple) else (outs,)
            pairs = [(o, g) for o, g in zip(outs, grads)
                     if g is not None and o.is_floating_point()]
            got = torch.autograd.grad([o for o, _ in pairs], list(leaves.values()),
                                      [g for _, g in pairs], allow_unused=True)
        result = [None] * len(inputs)
        for i, g in zip(leaves, got):
            result[i] = g
        return tuple(result)

    torch.library.register_autograd(f"dynprune::{name}", backward, setup_context=setup_context)


# The backwards recompute without the checks: the forward ran them.
_register_recompute_autograd("gated_conv2d", _gated_conv2d_math, (0, 1, 2, 4))
_register_recompute_autograd("channel_gate", channel_gate_reference, (0, 1, 2))
_register_recompute_autograd("dynamic_conv2d", _dynamic_conv2d_math, (0, 1, 2, 3, 4))


def gated_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_idx: torch.Tensor,
    out_scale: Optional[torch.Tensor] = None,
    in_idx: Optional[torch.Tensor] = None,
    stride: Sequence[int] = (1, 1),
    padding: Sequence[int] = (0, 0),
    dilation: Sequence[int] = (1, 1),
    relu: bool = False,
) -> torch.Tensor:
    """Gated 2-D convolution that computes only the kept output channels.

    Args:
        x: ``[N, Cin, H, W]`` input (any memory format).
        weight: ``[Cout, Cin, kh, kw]``; bias: ``[Cout]`` or None.
        out_idx: ``[N, k]`` integer, kept output channels per sample, sorted
            ascending, no duplicates.
        out_scale: ``[N, k]`` gate scale per kept channel (None: 1).
        in_idx: ``[N, kin]`` integer, the input channels to read per sample
            (sorted, unique); others are treated as zero. None: found from x.
        stride, padding, dilation: pairs of ints (symmetric zero padding).
        relu: apply ReLU in the epilogue.

    Returns:
        ``[N, Cout, H', W']``; pruned output channels are exactly zero.

    Raises:
        ValueError / TypeError naming the problem on malformed input.
    """
    return torch.ops.dynprune.gated_conv2d(
        x, weight, bias, out_idx, out_scale, in_idx, list(stride), list(padding),
        list(dilation), bool(relu)
    )


def backends() -> dict:
    """Which implementation serves each device: ``{'cpu': 'native'|'reference', ...}``."""
    info = dict(_BACKENDS)
    if _native_error is not None:
        info["cpu_error"] = _native_error
    if _cuda_error is not None:
        info["cuda_error"] = _cuda_error
    return info


def release_memory() -> int:
    """Free the memory the native CPU kernels keep for reuse; returns its bytes.

    Outputs of the CPU kernels (DynamicConv2d, gated_conv2d, the fast
    max-pool) take their memory from blocks of earlier outputs of the same
    size once those are freed, instead of fresh pages from the system: a
    fresh multi-MB block faults on every 4 KB page it writes. Up to 512 MB of
    freed outputs is kept; this returns it to the system (0 without the
    native kernels).
    """
    if _native_error is not None:
        return 0
    from dynprune import _C
    return int(_C.release_idle_outputs())
