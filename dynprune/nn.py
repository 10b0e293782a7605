"""DynamicConv2d: a drop-in nn.Conv2d whose output channels are gated per sample.

A Feature-Boosting-and-Suppression style gate (global average pool -> linear
-> ReLU) gives every output channel a saliency per sample; the top-k channels
are kept and scaled by their saliency, the rest are exactly zero.

* Training runs a differentiable dense path (conv [-> BN] -> gate mask and
  scale [-> ReLU]) so the weights and the gate learn; the saliency L1 term of
  the last forward is in ``module.saliency_l1`` (see :func:`saliency_loss`).
* Eval runs ``dynprune::gated_conv2d``: BatchNorm folded into the weights, only
  the kept output channels computed, over only the non-zero input channels.
"""
from __future__ import annotations

import copy
import math
import numbers
import weakref
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules import module as _module

from dynprune.ops import gate_saliency, gated_conv2d, select_channels

__all__ = ["AdaptiveAvgPool2d", "ChannelGate", "Conv2dBN", "DynamicConv2d", "Hardswish", "Linear",
           "MaxPool2d", "ReLU", "ReLU6", "SiLU", "saliency_loss"]


class ChannelGate(nn.Module):
    """Per-sample channel saliency and top-k selection.

    ``saliency = relu(fc(mean_hw(x)))`` (in float64, rounded once). The gate
    starts neutral: ``fc`` has zero weight and unit bias, so every saliency is exactly 1 (keep_ratio=1 then
    reproduces the dense layer). Ties are broken by ``priority`` (higher first;
    filter norms when made by :meth:`DynamicConv2d.from_conv`), so an untrained
    gate keeps the channels with the largest filters.
    """

    def __init__(self, in_channels: int, out_channels: int, device=None, dtype=None):
        super().__init__()
        self.fc = nn.Linear(in_channels, out_channels, device=device, dtype=dtype)
        nn.init.zeros_(self.fc.weight)
        nn.init.ones_(self.fc.bias)
        self.register_buffer("priority", torch.zeros(out_channels, device=device, dtype=dtype))

    def saliency(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, Cin, H, W] -> [N, Cout]`` non-negative saliency."""
        return gate_saliency(x, self.fc.weight, self.fc.bias)

    def select(self, saliency: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Top-k channels per sample, sorted ascending, and their saliency."""
        idx = select_channels(saliency.detach(), self.priority, k)
        return idx, saliency.gather(1, idx)

    # The priority is a ranking, and casts must keep it: model.half() or
    # model.bfloat16() rounded close filter norms to one value, the index then
    # broke the tie, and a converted ResNet-20 at keep 0.5 kept other channels
    # than in float32 (outputs 24% / 50% off the float64 model, 5e-3 at keep 1).
    def _apply(self, fn, *args, **kwargs):
        before = self._buffers["priority"]
        result = super()._apply(fn, *args, **kwargs)
        after = self._buffers["priority"]
        if after is not None and after is not before and after.dtype != before.dtype:
            self._buffers["priority"] = _ranking_kept(before.to(after.device), after.dtype)
        return result

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "priority"
        mine, theirs = self._buffers["priority"], state_dict.get(key)
        if (isinstance(theirs, torch.Tensor) and mine is not None and theirs.dtype != mine.dtype
                and theirs.shape == mine.shape):
            state_dict = {**state_dict, key: _ranking_kept(theirs, mine.dtype)}
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _ranking(priority: torch.Tensor) -> torch.Tensor:
    """Channels in selection order: priority descending, ties by lower index."""
    return torch.sort(priority, descending=True, stable=True).indices


def _ranking_kept(priority: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``priority`` in ``dtype`` with the same channel ranking: the plain cast
    where it keeps the ranking, else :func:`_ranking_values`."""
    cast = priority.to(dtype)
    if not dtype.is_floating_point or torch.equal(_ranking(cast), _ranking(priority)):
        return cast
    return _ranking_values(priority, dtype)


def _ranking_values(priority: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The channels' ranking as the distinct values 1.0, 1.0 + 1 ulp, ... of the
    16-bit float ``dtype`` (``priority`` itself where it already is ``dtype``).
    No host synchronisation: usable in a CUDA forward pass."""
    if priority.dtype == dtype:
        return priority
    c, device = priority.numel(), priority.device
    if dtype.itemsize != 2 or not dtype.is_floating_point or c > 16383:
        # (16383 steps from 1.0 stay finite in float16 and bfloat16)
        raise ValueError(f"cannot keep the ranking of {c} channel priorities in {dtype}")
    steps = torch.empty(c, dtype=torch.int16, device=device)
    steps[_ranking(priority)] = torch.arange(c - 1, -1, -1, dtype=torch.int16, device=device)
    one = torch.ones((), dtype=dtype, device=device).view(torch.int16)
    return (one + steps).view(dtype)


def _copy_bn(bn: nn.BatchNorm2d, like: torch.Tensor) -> nn.BatchNorm2d:
    """A copy of ``bn`` (affine or not) on ``like``'s device and dtype. (A
    default BatchNorm2d could not load an affine=False one's state: convert()
    raised on Conv -> BatchNorm2d(affine=False).)"""
    twin = nn.BatchNorm2d(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                          device=like.device, dtype=like.dtype)
    twin.load_state_dict(bn.state_dict())
    twin.train(bn.training)
    return twin


class _FoldsBatchNorm:
    """Mixin for a conv module with an optional ``bn`` (BatchNorm2d after the conv):
    the eval weight and bias with BN folded in, cached while valid."""

    _fold_cache = None
    # Caches derived from the parameters: dropped by train(), _apply() and copies.
    _eval_caches: Tuple[str, ...] = ("_fold_cache",)

    def inference_params(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Weight and bias with the BatchNorm (running stats) folded in.

        On the hot path of every eval forward: tensors are read from the module
        dicts (nn.Module.__getattr__ costs ~0.6 us a lookup), and the fold is
        cached while no gradient is recorded, keyed on the tensors themselves
        and their version counters (an optimizer step, load_state_dict or a new
        Parameter all invalidate it; so do train() and a change of bn.eps).
        Writes through ``.data`` bypass version counters: call
        ``module.train(module.training)`` after them.
        """
        params, bn = self._parameters, self._modules.get("bn")
        if bn is None:
            return params["weight"], params["bias"]
        tensors = (params["weight"], params["bias"], bn._parameters["weight"],
                   bn._parameters["bias"], bn._buffers["running_mean"], bn._buffers["running_var"])
        # Not while torch.compile records: version counters are data-dependent
        # there (comparing them broke the graph at every layer); the fold is
        # traced into the compiled graph instead.
        # Nor for inference tensors (made under torch.inference_mode): they have
        # no version counter, so an in-place update could not be seen.
        cacheable = (not torch.is_grad_enabled() and not _capturing()
                     and not any(t is not None and t.is_inference() for t in tensors))
        if cacheable:
            versions = [t._version if t is not None else -1 for t in tensors] + [bn.eps]
            cache = self._fold_cache
            if (cache is not None and cache[1] == versions
                    and all(a is b for a, b in zip(cache[0], tensors))):
                return cache[2], cache[3]
        inv_std = torch.rsqrt(bn.running_var + bn.eps)
        mult = inv_std * bn.weight if bn.affine else inv_std
        bias = self.bias if self.bias is not None else torch.zeros_like(bn.running_mean)
        b = (bias - bn.running_mean) * mult
        if bn.affine:
            b = b + bn.bias
        w = self.weight * mult.view(-1, 1, 1, 1)
        # Only real tensors: convert()'s torch.fx traces run this forward with
        # Proxies, and a cached Proxy (convert() under no_grad) made the next
        # real forward raise fx's TraceError.
        if cacheable and isinstance(w, torch.Tensor) and isinstance(b, torch.Tensor):
            self._fold_cache = (tensors, versions, w, b)
        return w, b

    def _drop_eval_caches(self, state: dict) -> dict:
        for name in self._eval_caches:
            state[name] = None
        return state

    def train(self, mode: bool = True):
        # BatchNorm updates its running stats in place without bumping their
        # version counters, so the eval fold cannot detect a training forward.
        self._drop_eval_caches(self.__dict__)
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        # .to()/.double()/.cuda() may swap tensor data without a version bump.
        self._drop_eval_caches(self.__dict__)
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):
        # A copy's tensors restart their version counters (never carry the
        # fold), and a native plan is not picklable (it is rebuilt on demand).
        return self._drop_eval_caches(self.__dict__.copy())


def _as_pair(v) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def check_keep_ratio(value) -> float:
    """``value`` as a float keep ratio: TypeError unless a real number (numpy
    scalars and 0-d tensors too, not bools), ValueError outside (0, 1]."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_complex() \
            and value.dtype != torch.bool:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"keep_ratio must be a number in (0, 1], got {value!r}")
    if not 0.0 < float(value) <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {value}")
    return float(value)


class DynamicConv2d(_FoldsBatchNorm, nn.Conv2d):
    """nn.Conv2d with a per-sample channel gate; eval runs the sparse kernel.

    Takes nn.Conv2d's constructor unchanged, plus keyword-only options:

    Args:
        keep_ratio: fraction of output channels kept per sample, in (0, 1];
            ``k = max(1, ceil(keep_ratio * out_channels))``.
        batch_norm: own a BatchNorm2d applied after the conv and *before* the
            gate, so pruned channels stay exactly zero (folded at eval).
        relu: apply ReLU after the gate (fused into the kernel at eval).

    Only ``groups=1`` and ``padding_mode='zeros'`` are supported (ValueError
    otherwise): :func:`dynprune.convert` leaves other convs dense.

    Eval-mode forwards run ``dynprune::gated_conv2d``; they stay differentiable
    (correct, dense-cost gradients), but train with ``.train()``, which also
    records ``saliency_l1`` for the regulariser (until the next ``train()`` or
    ``eval()`` call, a copy, or a move).
    """

    # saliency_l1 goes with them: it belongs to the last training forward (a
    # non-leaf tensor whose graph it keeps alive), so train()/eval(), .to() and
    # copies drop it. Kept, it made copy.deepcopy(model) raise after training.
    _eval_caches = ("_fold_cache", "_plan_cache", "saliency_l1")

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        keep_ratio: float = 0.5,
        batch_norm: bool = False,
        relu: bool = False,
    ):
        if groups != 1:
            raise ValueError(
                f"DynamicConv2d supports groups=1 only, got groups={groups} "
                "(convert() leaves grouped/depthwise convs dense)"
            )
        if padding_mode != "zeros":
            raise ValueError(f"DynamicConv2d supports padding_mode='zeros' only, got {padding_mode!r}")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         bias, padding_mode, device, dtype)
        self.keep_ratio = keep_ratio  # validated by the setter
        self.relu = bool(relu)
        self.gate = ChannelGate(in_channels, out_channels, device=device, dtype=dtype)
        self.bn = nn.BatchNorm2d(out_channels, device=device, dtype=dtype) if batch_norm else None
        self.saliency_l1: Optional[torch.Tensor] = None
        # Set by convert() when this conv's only consumer is a ReLU: eval then
        # applies the ReLU in the kernel (see dynprune.nn.ReLU).
        self.fuse_relu = False
        # convert() also records where that ReLU module is: weak references to
        # its parent and to it, and its name; None for a functional relu; ()
        # in a copy made after that ReLU was gone.
        self._relu_site = None
        self._fused_relu = False  # fuse_relu as the last eval call found it
        self._fold_cache = None
        self._plan_cache = None

    # ------------------------------------------------------------------ config

    @property
    def keep_ratio(self) -> float:
        return self._keep_ratio

    @keep_ratio.setter
    def keep_ratio(self, value: float) -> None:
        self._keep_ratio = check_keep_ratio(value)

    @property
    def k(self) -> int:
        """Output channels kept per sample."""
        return max(1, math.ceil(self.keep_ratio * self.out_channels - 1e-9))

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", keep_ratio={self.keep_ratio}, "
                f"batch_norm={self.bn is not None}, relu={self.relu}"
                + (", fuse_relu=True" if self.fuse_relu else ""))

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, *, bn: Optional[nn.BatchNorm2d] = None,
                  relu: bool = False, keep_ratio: float = 0.5) -> "DynamicConv2d":
        """A DynamicConv2d with ``conv``'s weights (and ``bn`` fused after it).

        The gate starts neutral (scale 1); channel priority = L1 norm of each
        filter, times |gamma / std| when a BatchNorm is fused.
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"from_conv expects an nn.Conv2d, got {type(conv).__name__}")
        if bn is not None and (not isinstance(bn, nn.BatchNorm2d) or bn.num_features != conv.out_channels
                               or not bn.track_running_stats):
            raise ValueError("bn must be an nn.BatchNorm2d with conv.out_channels features and "
                             "running statistics (track_running_stats=True)")
        w = conv.weight
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                device=w.device, dtype=w.dtype, keep_ratio=keep_ratio,
                batch_norm=bn is not None, relu=relu)
        with torch.no_grad():
            m.weight.copy_(w)
            if conv.bias is not None:
                m.bias.copy_(conv.bias)
            priority = w.detach().abs().flatten(1).sum(1)
            if bn is not None:
                m.bn = _copy_bn(bn, w)
                if bn.affine:
                    priority = priority * (bn.weight.detach().abs() /
                                           torch.sqrt(bn.running_var + bn.eps))
            m.gate.priority.copy_(priority)
        m.train(conv.training)
        return m

    # ------------------------------------------------------------------ forward

    def _same_pads(self) -> Tuple[Tuple[int, int], Tuple[int, int]]:
        """'same' padding as ((top, bottom), (left, right)): total d*(k-1), the
        extra pixel on the bottom/right, as F.conv2d does."""
        pads = []
        for d, k in zip(self.dilation, self.kernel_size):
            total = d * (k - 1)
            pads.append((total // 2, total - total // 2))
        return pads[0], pads[1]

    def _symmetric_padding(self) -> Optional[Tuple[int, int]]:
        """The op's padding, or None for an asymmetric 'same' (x is padded first)."""
        if not isinstance(self.padding, str):
            return _as_pair(self.padding)
        if self.padding == "valid":
            return (0, 0)
        (th, bh), (lw, rw) = self._same_pads()
        return (th, lw) if (th, lw) == (bh, rw) else None

    def _padding(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """Symmetric padding for the op; asymmetric 'same' pads x explicitly."""
        padding = self._symmetric_padding()
        if padding is not None:
            return x, padding
        (th, bh), (lw, rw) = self._same_pads()
        return F.pad(x, (0, rw - lw, 0, bh - th)), (th, lw)

    def _native_eval_plan(self):
        """This layer's bound native CPU call (``dynprune._C.EvalPlan``), or None.

        Cached; the plan checks on each call (``EvalPlan.holds``, natively)
        that it still matches the layer: the configuration by value, and by
        identity the tensors it was built from and the submodules holding
        them (guards from ``_plan_guards``); when a BatchNorm is folded in,
        also the version counters of the fold's inputs. A replaced Parameter
        or submodule, a BN update or a new keep ratio rebuilds it; other
        in-place updates are seen directly (it holds the tensors), except by
        the plan's transposed copy of the gate weight, which follows the
        weight's version counter (and storage): writes that bypass version
        counters (``.data`` writes, numpy views, fused optimizers such as
        ``Adam(fused=True)``) need ``module.train(module.training)`` after
        them, as for the BN fold. (Building
        that key in Python cost ~7 us a layer inside a network; old/new time
        with the native check and input checks: ResNet-20 1.05-1.08,
        ResNet-56 1.12, VGG-16 1.04.)
        None when the native extension is missing or the padding is an
        asymmetric 'same' (which pads x first).
        """
        plan = self._plan_cache
        if plan is not None and plan.holds():
            return plan
        self._plan_cache = None
        padding = self._symmetric_padding()
        if _EvalPlan is None or padding is None:
            return None
        params, bn = self._parameters, self._modules.get("bn")
        gate = self._modules["gate"]
        fc_params = gate._modules["fc"]._parameters
        weight, bias = self.inference_params()
        # With a BN folded in, the plan's weight and bias are a copy: it
        # watches the fold's inputs for in-place changes (version counters).
        watched = []
        if bn is not None:
            watched = [t for t in (params["weight"], params["bias"], bn._parameters["weight"],
                                   bn._parameters["bias"], bn._buffers["running_mean"],
                                   bn._buffers["running_var"]) if t is not None]
            if any(t.is_inference() for t in watched):
                return None  # no version counters: the op path folds on every call
        plan = _EvalPlan(weight, bias, fc_params["weight"], fc_params["bias"],
                         gate._buffers["priority"], self.k, list(self.stride), list(padding),
                         list(self.dilation), self.relu or self._fused_relu, watched,
                         self._plan_guards(gate, bn))
        self._plan_cache = plan
        return plan

    def _plan_guards(self, gate: nn.Module, bn: Optional[nn.Module]) -> list:
        """What the plan depends on, as (dict, key, expected, by_identity) entries
        it re-checks natively on each call (``EvalPlan.holds``): the
        configuration by value; the tensors, and the submodules that hold them,
        by identity."""
        # The configuration is read from this layer's __dict__ through a weak
        # reference: the __dict__ holds the plan, and a plan holding it back
        # would be a cycle the garbage collector cannot see.
        me, d, fc = weakref.ref(self), self.__dict__, gate._modules["fc"]
        guards = [(me, name, d[name], False)
                  for name in ("_keep_ratio", "relu", "_fused_relu", "stride", "padding", "dilation")]
        guards += [(self._parameters, "weight", self._parameters["weight"], True),
                   (self._parameters, "bias", self._parameters.get("bias"), True),
                   (self._modules, "gate", gate, True), (self._modules, "bn", bn, True),
                   (gate._modules, "fc", fc, True),
                   (fc._parameters, "weight", fc._parameters["weight"], True),
                   (fc._parameters, "bias", fc._parameters.get("bias"), True),
                   (gate._buffers, "priority", gate._buffers["priority"], True)]
        if bn is not None:
            guards += [(bn._parameters, n, bn._parameters.get(n), True) for n in ("weight", "bias")]
            guards += [(bn._buffers, n, bn._buffers.get(n), True)
                       for n in ("running_mean", "running_var")]
            guards.append((bn.__dict__, "eps", bn.eps, False))
        return guards

    def _eval_plan_for(self, x) -> Optional["_EvalPlan"]:
        """The native plan when this call is eager CPU inference (eval, no
        autograd, a plain CPU tensor, nothing recording the model), else None."""
        if (not self.training and type(x) is torch.Tensor and not torch.is_grad_enabled()
                and x.is_cpu and not torch.compiler.is_compiling() and _tracing_state() is None
                and not _any_autocast()):
            return self._native_eval_plan()
        return None

    def _fused_relu_holds(self) -> bool:
        """``fuse_relu`` where it is still right: not once its ReLU module was
        replaced or removed from where convert() found it, nor while a
        forward hook would see the conv's output or the ReLU's input (training
        never fuses, so the hook would see two different tensors)."""
        if not self.fuse_relu:
            return False
        if self._forward_hooks or _module._global_forward_hooks \
                or _module._global_forward_pre_hooks:
            return False
        site = self.__dict__.get("_relu_site")
        if site is None:  # a functional relu in the forward, or set by hand
            return True
        if not site:  # () : its ReLU was gone when this conv was copied
            return False
        parent, relu = site[0](), site[2]()
        # (hooks on the ReLU would see its input ReLU'd already)
        return (parent is not None and relu is not None and parent._modules.get(site[1]) is relu
                and not (relu._forward_hooks or relu._forward_pre_hooks))

    def __getstate__(self):
        # Weak references do not pickle: a copy of the whole model carries the
        # parent and ReLU themselves (copied with it), and __setstate__ makes
        # them weak again; a conv copied alone finds them gone: not fused.
        state = super().__getstate__()
        site = state.get("_relu_site")
        if site:
            parent, relu = site[0](), site[2]()
            state["_relu_site"] = () if parent is None or relu is None else (parent, site[1], relu)
        return state

    def __deepcopy__(self, memo):
        # As the default copy does, except that a conv copied without the
        # parent of its fused ReLU (not already in the memo) leaves them out:
        # it would only copy them to find them gone (see __getstate__).
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        state = self.__getstate__()
        site = state.get("_relu_site")
        if site and id(site[0]) not in memo:
            state["_relu_site"] = ()
        new.__setstate__(copy.deepcopy(state, memo))
        return new

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_fused_relu", False)  # pickled before session 26
        site = self.__dict__.setdefault("_relu_site", None)
        if site:
            self._relu_site = (weakref.ref(site[0]), site[1], weakref.ref(site[2]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:  # one unbatched [C, H, W] sample, as nn.Conv2d takes it
            return self.forward(x.unsqueeze(0)).squeeze(0)
        if not self.training:  # what eval applies now (the plan guards it)
            fused = self.fuse_relu and self._fused_relu_holds()
            if self.__dict__.get("_fused_relu") is not fused:
                self._fused_relu = fused
        plan = self._eval_plan_for(x)
        if plan is not None:
            # The hot path of eager CPU inference: one pybind11 call into the
            # kernel (no autograd, no dispatcher argument boxing), which checks
            # x's rank, channels and dtype itself, with the errors below. When
            # x is the untouched output of another DynamicConv2d, its kept
            # channels are our input channel list.
            y, idx = plan.run(x, _kept_channels(x))
            _mark(y, idx, self.relu or self._fused_relu)
            return y
        if x.dim() != 4:
            raise ValueError(f"DynamicConv2d expects a 4-D input [N, C, H, W] (or an unbatched "
                             f"3-D [C, H, W]), got {x.dim()}-D")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"DynamicConv2d expects {self.in_channels} input channels, "
                             f"got {x.shape[1]}")
        cast = _autocast_dtype(x)
        if cast is None and x.dtype != self._parameters["weight"].dtype:
            raise TypeError(f"dtype mismatch: input is {x.dtype} but DynamicConv2d weights are "
                            f"{self._parameters['weight'].dtype}")
        if self.training:
            return self.forward_dense(x)  # F.conv2d follows autocast itself
        compiling = _capturing()
        weight, bias = self.inference_params()
        gate = self._modules["gate"]
        fc_params = gate._modules["fc"]._parameters
        gate_w, gate_b = fc_params["weight"], fc_params["bias"]
        priority = gate._buffers["priority"]
        if cast is not None:  # compute in the autocast dtype, as nn.Conv2d does there
            x, weight, gate_w, gate_b = (t.to(cast) for t in (x, weight, gate_w, gate_b))
            bias = bias.to(cast) if bias is not None else None
            priority = _ranking_values(priority, cast)
        xp, padding = self._padding(x)
        relu = self.relu or self._fused_relu
        if xp is not x:  # asymmetric 'same' padding: the gate pools the unpadded input
            idx, scale = gate.select(gate.saliency(x), self.k)
            return gated_conv2d(xp, weight, bias, idx, scale, None, self.stride, padding,
                                self.dilation, relu)
        # One call of the op: gate + gated conv. Marks are Python attributes on
        # tensors: not while torch.compile or torch.jit.trace records.
        in_idx = None if compiling else _kept_channels(x)
        args = (x, weight, bias, gate_w, gate_b, priority, self.k, in_idx,
                self.stride, padding, self.dilation, relu)
        keys = _BACKEND_KEYS.get(x.device.type)
        if keys is None or compiling or torch.is_grad_enabled() or type(x) is not torch.Tensor:
            y, idx, _ = _DYNAMIC_CONV2D(*args)
        else:  # no autograd wanted: skip the (Python) autograd kernel, ~9 us a call
            y, idx, _ = _DYNAMIC_CONV2D.redispatch(keys, *args)
        if not compiling:
            _mark(y, idx, relu)
        return y

    def forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        """The differentiable training path: conv [-> BN] -> gate [-> ReLU].

        Same values as the eval path when BN is in eval mode; records
        ``saliency_l1`` (mean over the batch of the L1 norm of the saliency).
        """
        y = self._conv_forward(x, self.weight, self.bias)
        if self.bn is not None:
            y = self.bn(y)
            self._fold_cache = None  # running stats may have moved (see train())
        saliency = self.gate.saliency(x)
        idx, _ = self.gate.select(saliency.detach(), self.k)
        mask = torch.zeros_like(saliency).scatter(1, idx, 1.0)
        y = y * (mask * saliency)[:, :, None, None]
        if self.relu:
            y = F.relu(y)
        # per-sample mean; an empty batch adds 0, not NaN, to the loss
        self.saliency_l1 = saliency.abs().sum() / max(1, saliency.shape[0])
        return y


NATIVE_DENSE_MIN_BYTES = 32 << 20  # see Conv2dBN._native_pays


class Conv2dBN(_FoldsBatchNorm, nn.Conv2d):
    """A dense nn.Conv2d with the BatchNorm2d that follows it, folded at eval.

    :func:`dynprune.convert` puts it where a conv stays dense (the first conv,
    grouped/depthwise convs) and a BatchNorm alone consumes its output: training
    runs ``bn(conv(x))`` unchanged; eval runs one convolution with the BN's
    running statistics folded into its weight and bias (a BatchNorm pass over
    the activation saved: ~0.3 ms on ResNet-18's stem at batch 1). Outputs of
    32 MB and more are computed by the native kernel with every channel kept
    (see :meth:`_native_pays`); smaller ones by F.conv2d.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.bn = nn.BatchNorm2d(self.out_channels, device=self.weight.device,
                                 dtype=self.weight.dtype)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> "Conv2dBN":
        """``conv`` followed by ``bn``, as one module (copies of both)."""
        if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d) \
                or bn.num_features != conv.out_channels or not bn.track_running_stats:
            raise ValueError("Conv2dBN needs an nn.Conv2d and an nn.BatchNorm2d with "
                             "conv.out_channels features and running statistics")
        w = conv.weight
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                device=w.device, dtype=w.dtype)
        with torch.no_grad():
            m.weight.copy_(w)
            if conv.bias is not None:
                m.bias.copy_(conv.bias)
        m.bn = _copy_bn(bn, w)
        m.train(conv.training)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.bn(self._conv_forward(x, self.weight, self.bias))
        weight, bias = self.inference_params()
        if (self.groups > 1 and _depthwise_or_none is not None and type(x) is torch.Tensor
                and self.padding_mode == "zeros" and not isinstance(self.padding, str)
                and not _capturing() and not _any_autocast()):
            # A depthwise 3x3 or 5x5 (MobileNets, EfficientNet): the native kernel where it applies,
            # which checks the rest itself; None: F.conv2d below.
            # When x carries a DynamicConv2d's mark (through a ReLU6), its
            # channels outside the kept lists are zero: their planes are the bias.
            y = _depthwise_or_none(x, weight, bias, self.groups, self.stride, self.padding,
                                   self.dilation, _kept_channels(x))
            if y is not None:
                return y
        if self._native_pays(x, weight):
            n = x.shape[0]
            idx = self._all_channels.get(n)
            if idx is None:  # every output channel of every sample, and every input channel
                idx = (torch.arange(self.out_channels).expand(n, -1).contiguous(),
                       torch.arange(self.in_channels).expand(n, -1).contiguous())
                self._all_channels = {n: idx}
            return gated_conv2d(x, weight, bias, idx[0], None, idx[1], self.stride,
                                self.padding, self.dilation)
        return self._conv_forward(x, weight, bias)

    _all_channels: dict = {}  # {batch: (out_idx, in_idx)} of the native path, per instance

    def _native_pays(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        """Whether this eval call runs the native kernel instead of F.conv2d.

        Only for outputs of at least :data:`NATIVE_DENSE_MIN_BYTES`: glibc's
        malloc maps blocks that large afresh on every call (its mmap threshold
        stops growing at 32 MB), so PyTorch's output faults on every page
        (ResNet-18's stem at batch 16: 51 MB, 12.5k faults a call), while the
        native kernel's outputs reuse freed memory. Both compute the same
        dense convolution (all channels kept and read). Native/F.conv2d time,
        2 threads: 0.91 for 256x56x56 3x3 at batch 16 (51 MB out); on smaller
        outputs neither wins everywhere (1.08 for 128x56x56 at batch 16, 1.07-1.10
        for ResNet-18's 3x3 layers at batch 1, 0.65 for its 512x7x7). End to
        end, ResNet-18 at batch 16 runs 1.20x faster; at batch 1 (3 MB) the
        stem stays on F.conv2d.
        """
        if (_EvalPlan is None or type(x) is not torch.Tensor or not x.is_cpu or x.dim() != 4
                or x.dtype != torch.float32 or weight.dtype != torch.float32
                or torch.is_grad_enabled() or self.groups != 1 or self.padding_mode != "zeros"
                or isinstance(self.padding, str) or _capturing() or _any_autocast()):
            return False
        n, _, h, w = x.shape
        out = n * self.out_channels * 4
        for size, k, s, p, d in zip((h, w), self.kernel_size, self.stride, self.padding,
                                    self.dilation):
            out *= max(0, (size + 2 * p - d * (k - 1) - 1) // s + 1)
        return out >= NATIVE_DENSE_MIN_BYTES


# ---------------------------------------------------------------------------- chaining
#
# An eval-mode DynamicConv2d marks its output with the kept channel indices and
# the tensor's version counter. A later DynamicConv2d that receives that very
# tensor, unmodified (same version: no in-place op since), passes the indices
# as in_idx, so the kernel reads only those channels; a dynprune ReLU returns
# an already-ReLU'd tensor as is. Any in-place change (e.g. `out += identity`)
# bumps the version and voids the mark, so a stale mark is never trusted.
# (Writes through ``.data`` or a numpy view bypass version counters and are
# not seen: activations must not be edited that way between layers.)


_DYNAMIC_CONV2D = torch.ops.dynprune.dynamic_conv2d.default
try:  # the native extension's eval entry points (None: the reference backend)
    from dynprune._C import EvalPlan as _EvalPlan
    from dynprune._C import head_avg_pool as _head_avg_pool
    from dynprune._C import head_linear as _head_linear
    from dynprune._C import max_pool2d_or_none as _max_pool2d_or_none
    from dynprune._C import depthwise_or_none as _depthwise_or_none
except Exception:  # missing or broken build: ops.py has warned once already
    _EvalPlan = _max_pool2d_or_none = _head_avg_pool = _head_linear = None
    _depthwise_or_none = None

_BACKEND_KEYS = {"cpu": torch._C.DispatchKeySet(torch._C.DispatchKey.CPU),
                 "cuda": torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)}


_tracing_state = torch._C._get_tracing_state
# Whether any torch.autocast is active (the float32 native paths step aside):
# ~60 ns a call less than torch.is_autocast_enabled("cpu"), on the hot path.
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None) or (
    lambda: torch.is_autocast_enabled("cpu"))


def _autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype torch.autocast computes convolutions in on x's device, or None."""
    device = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


def _capturing() -> bool:
    """True while torch.compile or torch.jit.trace records the model: the native
    calls (pybind11, opaque to both) and the Python-side marks are left out then."""
    return torch.compiler.is_compiling() or _tracing_state() is not None


def _mark(y: torch.Tensor, idx: torch.Tensor, relu: bool) -> None:
    # Inference tensors have no version counter, so an in-place change could
    # not be detected: they are never marked (the chain then re-detects).
    if not y.is_inference():
        y._dynprune_mark = (idx, y._version, relu)


def _valid_mark(x: torch.Tensor):
    if x.is_inference():
        return None
    mark = getattr(x, "_dynprune_mark", None)
    return mark if mark is not None and mark[1] == x._version else None


def _kept_channels(x: torch.Tensor) -> Optional[torch.Tensor]:
    mark = _valid_mark(x)
    return mark[0] if mark is not None else None


class ReLU(nn.ReLU):
    """nn.ReLU that skips the pass when its input was ReLU'd inside a DynamicConv2d.

    convert() puts it in place of an nn.ReLU that consumes a DynamicConv2d's
    output (and sets that conv's ``fuse_relu``); on any other input it is
    nn.ReLU.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mark = (None if torch.compiler.is_compiling() or _tracing_state() is not None
                else _valid_mark(x))
        if mark is not None and mark[2]:
            return x
        return super().forward(x)


class _HandsOnMarks:
    """Mixin for an activation with act(0) = 0: its output keeps a
    DynamicConv2d's kept-channel mark (the zero channels stay zero), so a
    depthwise conv after it (MobileNets, EfficientNet) computes only the kept
    ones. convert() swaps the classes in (keeping ``inplace``); on any other
    input they are the torch.nn activations."""

    nonnegative = False  # outputs >= 0: a dynprune ReLU after it may skip its pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _capturing():
            return super().forward(x)
        mark = _valid_mark(x)
        y = super().forward(x)
        if mark is not None:  # (an in-place activation bumped the version: marked anew)
            _mark(y, mark[0], self.nonnegative)
        return y


class ReLU6(_HandsOnMarks, nn.ReLU6):
    """nn.ReLU6 that hands on kept-channel marks (see _HandsOnMarks)."""

    nonnegative = True


class Hardswish(_HandsOnMarks, nn.Hardswish):
    """nn.Hardswish that hands on kept-channel marks (see _HandsOnMarks)."""


class SiLU(_HandsOnMarks, nn.SiLU):
    """nn.SiLU that hands on kept-channel marks (see _HandsOnMarks)."""


class MaxPool2d(nn.MaxPool2d):
    """nn.MaxPool2d with a fast path for NCHW float32 input on CPU.

    PyTorch's NCHW max-pool kernel is several times slower on CPU than its
    channels_last one. Without autograd, contiguous NCHW float32 input runs
    the native kernel (``dynprune._C.max_pool2d_or_none``; ResNet-18's stem pool
    at batch 1, 2 threads: 0.32 ms, against 0.79 ms through channels_last
    and 3.5 ms for PyTorch's NCHW kernel); with autograd, or without the
    native build, or with ``ceil_mode``, it pools through channels_last. Same
    results; the output stays NCHW. ``return_indices`` uses nn.MaxPool2d as is.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (_max_pool2d_or_none is not None and type(x) is torch.Tensor
                and not self.return_indices and not self.ceil_mode
                and not _capturing()):
            # The native pool, checks included, in one call (at batch 1 this
            # code runs cold after the stem conv); None: the routes below.
            y = _max_pool2d_or_none(x, self.kernel_size, self.stride, self.padding,
                                    self.dilation)
            if y is not None:
                return y
        if (x.dim() != 4 or x.device.type != "cpu" or self.return_indices
                or not x.is_contiguous() or _capturing()):
            return super().forward(x)
        y = super().forward(x.contiguous(memory_format=torch.channels_last))
        return y.contiguous()


class AdaptiveAvgPool2d(nn.AdaptiveAvgPool2d):
    """nn.AdaptiveAvgPool2d with a native path for the global pool (output 1x1).

    Inside a network at batch 1 PyTorch's pool comes back cold after the
    convs: ~105 us on ResNet-18's 512x7x7 head, ~21 us natively
    (``dynprune._C.head_avg_pool``: float64 sums, rounded once). Applies to
    float32 CPU input without autograd; otherwise (other output sizes too)
    nn.AdaptiveAvgPool2d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (_head_avg_pool is not None and type(x) is torch.Tensor
                and self.output_size in (1, (1, 1), [1, 1]) and not _capturing()):
            y = _head_avg_pool(x)  # None where it does not apply
            if y is not None:
                return y
        return super().forward(x)


# Largest batch the native classifier takes. 512 -> 1000 (and 1280 -> 1000),
# 2 threads, native/MKL time: batch 1-8 0.31-0.66 warm, 0.26-0.55 after a
# 64 MB flush; batch 16 1.02 (0.86) warm, 0.64 (0.71) flushed; batch 32 1.18
# (1.02) warm. Beyond 16, MKL's GEMM, which reuses each weight row across
# more samples, is the better kernel.
LINEAR_NATIVE_MAX_BATCH = 16


class Linear(nn.Linear):
    """nn.Linear with a native path for a small batch of float32 rows on CPU.

    At batch 1 PyTorch runs MKL's gemv on one thread, with the weight cold
    after the convs: ResNet-18's 512 -> 1000 classifier took ~260 us inside
    the network, ~90 us with the rows split over the threads
    (``dynprune._C.head_linear``). 2-D inputs of at most
    :data:`LINEAR_NATIVE_MAX_BATCH` rows, without autograd; otherwise nn.Linear.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The checks are native (one call): at batch 1 this code runs cold
        # after the convs, where each Python-level check cost 6-27 us.
        if _head_linear is not None and type(x) is torch.Tensor \
                and not _capturing() and not _any_autocast():
            p = self._parameters
            y = _head_linear(x, p["weight"], p["bias"], LINEAR_NATIVE_MAX_BATCH)
            if y is not None:
                return y
        return super().forward(x)


def saliency_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the gates' saliency L1 terms from the last training forward.

    Add ``lam * saliency_loss(model)`` to the task loss to push saliencies
    (and so the kept channels' scales) towards sparsity, as in FBS.
    """
    terms = [m.saliency_l1 for m in model.modules()
             if isinstance(m, DynamicConv2d) and m.saliency_l1 is not None]
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()
