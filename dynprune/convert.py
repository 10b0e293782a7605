"""convert(model): make any CNN dynamic in place, fusing Conv -> BatchNorm pairs."""
from __future__ import annotations

import warnings
import weakref
from typing import Callable, Dict, List, Optional

import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from dynprune import nn as dnn
from dynprune.nn import DynamicConv2d
from dynprune.residual import fuse_residuals

__all__ = ["convert"]


def _conv_bn_pairs(model: nn.Module) -> Dict[str, str]:
    """``{conv_name: bn_name}`` for each conv whose only consumer is a BatchNorm.

    Found on the torch.fx graph when the model traces (any layout: torchvision
    ResNets call bn1(conv1(x)) from forward()); otherwise only adjacent pairs
    inside nn.Sequential containers, which need no graph to be sure of.
    """
    modules = dict(model.named_modules())
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as exc:
        graph, untraced = None, exc
    pairs: Dict[str, str] = {}
    if graph is not None:
        calls: Dict[str, int] = {}
        for node in graph.nodes:
            if node.op == "call_module":
                calls[node.target] = calls.get(node.target, 0) + 1
        for node in graph.nodes:
            if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
                continue
            src = node.args[0] if node.args else None
            if not modules[node.target].track_running_stats:
                continue  # batch statistics at eval too: nothing to fold
            if (isinstance(src, torch.fx.Node) and src.op == "call_module"
                    and isinstance(modules.get(src.target), nn.Conv2d)
                    and len(src.users) == 1 and calls[src.target] == 1 and calls[node.target] == 1):
                pairs[src.target] = node.target
        return pairs
    # Only plain nn.Sequential (a subclass may override forward), and only
    # modules that appear once in the model (a shared one may be called twice).
    counts: Dict[int, int] = {}
    for _, mod in model.named_modules(remove_duplicate=False):
        counts[id(mod)] = counts.get(id(mod), 0) + 1
    for name, mod in modules.items():
        if type(mod) is nn.Sequential:
            children = [(n, c) for n, c in mod.named_children() if counts[id(c)] == 1]
            children = list(mod.named_children()) if len(children) == len(mod) else []
            for (cname, c), (bname, b) in zip(children, children[1:]):
                if (isinstance(c, nn.Conv2d) and isinstance(b, nn.BatchNorm2d)
                        and b.track_running_stats):
                    prefix = f"{name}." if name else ""
                    pairs[prefix + cname] = prefix + bname
    if pairs:
        # Without the graph nothing shows whether forward() also calls one of
        # these convs (or BNs) alone, where the fold would change its output.
        reason = str(untraced).strip().splitlines()[0][:120] if str(untraced).strip() else ""
        warnings.warn(
            f"dynprune.convert: the model does not trace with torch.fx "
            f"({type(untraced).__name__}: {reason}); {len(pairs)} BatchNorm(s) were folded into "
            "the conv before them inside nn.Sequential, which assumes forward() calls each such "
            "Sequential whole. If it also calls one of those convs or BatchNorms on its own, "
            "convert with fuse_bn=False.", stacklevel=3)
    return pairs


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


class _LeafTracer(torch.fx.Tracer):
    """Traces a converted model with DynamicConv2d as an opaque call."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, DynamicConv2d) or super().is_leaf_module(m, qualname)


_RELU_FUNCTIONS = {torch.relu, torch.relu_, F.relu}


def _fuse_relus(model: nn.Module) -> int:
    """Let eval-mode DynamicConv2d apply the ReLU that alone consumes its output.

    Needs the torch.fx graph (a model that does not trace keeps separate
    ReLUs). Fusing is only correct when the ReLU is the *only* consumer, since
    the conv's output itself becomes non-negative. The consuming nn.ReLU
    instances become dynprune.nn.ReLU, which skips already-ReLU'd input (a
    functional relu is idempotent on it, just not skipped). Returns the count.
    """
    try:
        graph = _LeafTracer().trace(model)
    except Exception:
        return 0
    modules = dict(model.named_modules())
    calls: Dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    fused = 0
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), DynamicConv2d):
            continue
        if calls[node.target] != 1:  # a reused conv: fusing would change its other calls
            continue
        # Walk through nn.Identity (a fused BN leaves one): it returns its input.
        src, user = node, None
        while len(src.users) == 1:
            user = next(iter(src.users))
            if user.op == "call_module" and isinstance(modules.get(user.target), nn.Identity):
                src, user = user, None
                continue
            break
        if user is None or user.args[:1] != (src,):
            continue
        site = None
        if user.op == "call_module" and type(modules.get(user.target)) in (nn.ReLU, dnn.ReLU):
            relu = modules[user.target]
            if type(relu) is nn.ReLU:
                relu = dnn.ReLU(inplace=relu.inplace)
                _set_submodule(model, user.target, relu)
                modules[user.target] = relu
            parent_name, _, attr = user.target.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            site = (weakref.ref(parent), attr, weakref.ref(relu))
        elif not ((user.op == "call_function" and user.target in _RELU_FUNCTIONS)
                  or (user.op == "call_method" and user.target in ("relu", "relu_"))):
            continue
        modules[node.target].fuse_relu = True
        modules[node.target]._relu_site = site
        fused += 1
    return fused


# Activations with act(0) = 0, swapped for versions that hand on kept-channel marks.
_MARK_PASSING = {nn.ReLU6: dnn.ReLU6, nn.Hardswish: dnn.Hardswish, nn.SiLU: dnn.SiLU}


def _fast_ops(model: nn.Module) -> None:
    """The fast path's versions of the dense ops around the convs (same results):
    nn.MaxPool2d -> dynprune.nn.MaxPool2d (new module), and, by a class change
    that keeps their parameters, hooks and state_dict, nn.AdaptiveAvgPool2d ->
    dynprune.nn.AdaptiveAvgPool2d, nn.Linear -> dynprune.nn.Linear (not the
    gates' own layers: the kernels read their parameters directly), and
    nn.ReLU6 / nn.Hardswish / nn.SiLU -> dynprune.nn's (hand on kept-channel
    marks)."""
    gate_parts = {id(m) for gate in model.modules() if isinstance(gate, dnn.ChannelGate)
                  for m in gate.modules()}
    for name, mod in list(model.named_modules()):
        if id(mod) in gate_parts:
            continue
        if type(mod) is nn.MaxPool2d:
            new = dnn.MaxPool2d(mod.kernel_size, mod.stride, mod.padding, mod.dilation,
                                mod.return_indices, mod.ceil_mode)
            _set_submodule(model, name, new)
        elif type(mod) is nn.AdaptiveAvgPool2d:
            mod.__class__ = dnn.AdaptiveAvgPool2d
        elif type(mod) is nn.Linear:
            mod.__class__ = dnn.Linear
        elif type(mod) in _MARK_PASSING:
            mod.__class__ = _MARK_PASSING[type(mod)]


def _plain_conv(conv: nn.Conv2d) -> bool:
    """nn.Conv2d, or a subclass that keeps its forward (a parametrized conv,
    whose weight property a DynamicConv2d copies). A subclass with its own
    forward (weight standardisation, timm's dynamic 'same' padding, QAT)
    computes something a DynamicConv2d would not: converting one lost its
    forward silently (93% off on a weight-standardised conv, keep_ratio=1)."""
    cls = type(conv)
    return cls.forward is nn.Conv2d.forward and cls._conv_forward is nn.Conv2d._conv_forward


def _convertible(conv: nn.Conv2d) -> bool:
    """Grouped/depthwise convs, non-zero padding modes and convs with their own
    forward (DynamicConv2d and Conv2dBN included) stay as they are."""
    return conv.groups == 1 and conv.padding_mode == "zeros" and _plain_conv(conv)


def convert(
    model: nn.Module,
    keep_ratio: float = 0.5,
    *,
    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
    skip_first: bool = True,
    fuse_bn: bool = True,
    fast_path: bool = True,
) -> nn.Module:
    """Replace ``nn.Conv2d`` layers of ``model`` by :class:`DynamicConv2d`, in place.

    Args:
        model: any module; it is modified in place and also returned.
        keep_ratio: fraction of output channels each converted conv keeps per
            sample, in (0, 1]. 1.0 reproduces the original outputs.
        filter_fn: ``filter_fn(conv, qualified_name) -> bool``; only convs for
            which it returns True are converted (torchao's quantize_ convention).
        skip_first: keep the first conv dense (it sees the raw image, whose
            channels are few and all informative).
        fuse_bn: move a BatchNorm2d that directly follows a conv into the new
            module (gate after BN, folded at eval) and leave nn.Identity in
            its place, so pruned channels stay exactly zero through BN. A
            conv that stays dense takes its BN likewise, as a
            :class:`dynprune.nn.Conv2dBN` (BN folded into it at eval). Pairs
            come from the torch.fx graph; a model that does not trace gets
            the adjacent pairs inside nn.Sequential, with a warning (that
            assumes its forward calls each such Sequential whole).
        fast_path: make the whole network fast in eval mode, with no extra
            call: a ReLU that alone consumes a converted conv's output runs in
            the kernel's epilogue (not while that ReLU module is replaced or
            removed from where it was, nor while a forward hook is on the
            conv; slicing an nn.Sequential between the two is not seen: set
            the conv's ``fuse_relu = False`` or convert with
            ``fast_path=False`` for that), each conv hands its kept channels to the
            next one that reads its output unmodified (as the input channel
            list), nn.MaxPool2d runs a native NCHW pool (PyTorch's NCHW CPU
            pool is several times slower), and a global nn.AdaptiveAvgPool2d
            and nn.Linear at batch <= 16 run native kernels (PyTorch's come back
            cold after the convs), and a converted conv whose output a module's
            forward only adds to another tensor (then ReLUs), as a ResNet
            block ends, adds and ReLUs in the kernel's epilogue
            (:mod:`dynprune.residual`: that module gets an instance
            ``forward``). Training is unchanged.

    Grouped and depthwise convs (MobileNet) and convs with a non-'zeros'
    padding_mode are left dense, and so are nn.Conv2d subclasses with their
    own forward (weight standardisation, dynamic 'same' padding, QAT), with a
    warning: a DynamicConv2d would not compute what they do. Freshly converted
    gates are neutral (scale 1) and rank channels by filter norm until trained.
    A second call leaves converted layers as they are, and raises ValueError
    where their keep ratio differs from ``keep_ratio`` (set
    ``DynamicConv2d.keep_ratio`` to change it).
    """
    keep_ratio = dnn.check_keep_ratio(keep_ratio)
    if isinstance(model, nn.Conv2d):
        raise TypeError("convert() works on a model containing convs; for a single conv use "
                        "DynamicConv2d.from_conv(conv)")
    modules = dict(model.named_modules())
    convs: List[str] = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)]
    if skip_first and convs:
        convs = convs[1:]
    foreign = sorted({type(modules[n]).__name__ for n in convs
                      if not _plain_conv(modules[n])
                      and not isinstance(modules[n], (DynamicConv2d, dnn.Conv2dBN))})
    if foreign:
        warnings.warn(f"dynprune.convert: left dense the convs of class {', '.join(foreign)}: "
                      "their own forward computes something DynamicConv2d would not. Replace "
                      "them with nn.Conv2d first to convert them.", UserWarning, stacklevel=2)
    convs = [n for n in convs if (_convertible(modules[n]) or isinstance(modules[n], DynamicConv2d))
             and (filter_fn is None or filter_fn(modules[n], n))]
    # A second call must not leave layers at another keep ratio than asked
    # (checked before anything changes).
    for name in convs:
        conv = modules[name]
        if isinstance(conv, DynamicConv2d) and conv.keep_ratio != keep_ratio:
            raise ValueError(
                f"{name!r} is already a DynamicConv2d with keep_ratio {conv.keep_ratio}, not "
                f"{keep_ratio}: convert() does not change converted layers; set their "
                "keep_ratio attribute, or convert a fresh copy of the model")
    pairs = _conv_bn_pairs(model) if fuse_bn else {}
    for name in convs:
        conv = modules[name]
        if isinstance(conv, DynamicConv2d):
            continue
        bn_name = pairs.pop(name, None)
        bn = modules[bn_name] if bn_name is not None else None
        _set_submodule(model, name, DynamicConv2d.from_conv(conv, bn=bn, keep_ratio=keep_ratio))
        if bn_name is not None:
            _set_submodule(model, bn_name, nn.Identity())
    for name, bn_name in pairs.items():  # convs left dense: BN folded at eval all the same
        if type(modules[name]) is nn.Conv2d:
            _set_submodule(model, name, dnn.Conv2dBN.from_conv(modules[name], modules[bn_name]))
            _set_submodule(model, bn_name, nn.Identity())
    if fast_path:
        _fuse_relus(model)
        _fast_ops(model)
        fuse_residuals(model)
    return model
