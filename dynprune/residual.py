"""Residual adds fused into the last conv of a block, for eval-mode inference.

A ResNet block ends ``relu(bn2(conv2(out)) + identity)``. Run op by op, the
add and the ReLU are two more passes over the block's output, each a
dispatch and an allocation (fusing them made ResNet-20 at batch 1 about 6%
faster, ResNet-18 2-3%; at batch 16 7-11%). When the conv is a DynamicConv2d (its
BN folded in, an nn.Identity left in the BN's place), the kernel's epilogue
can add the residual and apply the ReLU as it writes each output value
(pruned channels get ``relu(identity)``), same values, bit for bit.

:func:`fuse_residuals` (called by :func:`dynprune.convert`) finds such tails
with torch.fx in the ``forward`` of each module that owns a DynamicConv2d,
every child called as an opaque module, and gives that module an instance
``forward`` (:class:`ResidualForward`): in eval mode without autograd it runs
the traced forward with each tail as one :func:`conv_add_act` call; otherwise
the class's own ``forward``. Every call re-checks what the fusion assumed
(module types, no hooks, tensors the kernel takes) and runs the unfused ops
where it does not hold.
"""
from __future__ import annotations

import operator
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.modules import module as _module

from dynprune import nn as dnn
from dynprune.nn import DynamicConv2d

__all__ = ["ResidualForward", "conv_add_act", "fuse_residuals"]

_RELU_MODULES = (nn.ReLU, dnn.ReLU)
_RELU_FUNCTIONS = {torch.relu, torch.relu_, torch.nn.functional.relu}


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


def _global_hooks() -> bool:
    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks)


def conv_add_act(conv: nn.Module, mids: Tuple[nn.Module, ...], x, other, add: str,
                 conv_first: bool, act):
    """``act(mids(conv(x)) + other)``, as the traced forward wrote it.

    add: ``"add"`` (``y + other``, or ``other + y`` unless conv_first) or
    ``"iadd"`` (``y += other``); act: None, a ReLU module, or ``"relu"`` (a
    functional ReLU). Eval-mode DynamicConv2d without autograd, with Identity
    mids, no hooks, and ``other`` a float32 tensor shaped like the output: one
    native call (``EvalPlan.run_residual``). Otherwise the modules and ops in
    turn, hooks and all.
    """
    if (isinstance(conv, DynamicConv2d) and type(other) is torch.Tensor
            and not (conv.relu or conv.fuse_relu) and not _hooked(conv)
            and all(type(m) is nn.Identity and not _hooked(m) for m in mids)
            and (act is None or isinstance(act, str)
                 or (type(act) in _RELU_MODULES and not _hooked(act)))
            and not _global_hooks()):
        plan = conv._eval_plan_for(x)  # the conditions of its own native path
        if plan is not None:
            y = plan.run_residual(x, dnn._kept_channels(x), other, act is not None)
            if y is not None:
                return y
    y = conv(x)
    for m in mids:
        y = m(y)
    if add == "iadd":
        y += other
        s = y
    else:
        s = y + other if conv_first else other + y
    if act is None:
        return s
    return torch.relu(s) if isinstance(act, str) else act(s)


class _ChildrenTracer(fx.Tracer):
    """Traces one module's own forward: every submodule call stays a call."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True


def _single_user(node: fx.Node) -> Optional[fx.Node]:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _add_form(node: fx.Node, y: fx.Node) -> Optional[Tuple[str, fx.Node, bool]]:
    """(kind, other operand, y first) when ``node`` adds y and another node."""
    if node.kwargs or len(node.args) != 2:
        return None
    a, b = node.args
    if (a is y) == (b is y):  # y + y, or y not an operand
        return None
    other = b if a is y else a
    if not isinstance(other, fx.Node):
        return None
    fn = node.target
    if node.op == "call_function" and fn in (operator.add, torch.add):
        return "add", other, a is y
    if node.op == "call_method" and fn == "add":
        return "add", other, a is y
    # y.add_(other): in place on y only (the fused call writes a new tensor).
    # (`y += other` never gets here: fx traces it as y + other.)
    if a is y and node.op == "call_method" and fn == "add_":
        return "iadd", other, True
    return None


def _relu_form(node: fx.Node, src: fx.Node, modules: Dict[str, nn.Module]):
    """The act argument when ``node`` is a ReLU of src alone, else None."""
    if node.args != (src,):
        return None
    if node.op == "call_module" and type(modules.get(node.target)) in _RELU_MODULES \
            and not node.kwargs:
        return "module"
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS \
            and set(node.kwargs) <= {"inplace"}:
        return "relu"
    if node.op == "call_method" and node.target in ("relu", "relu_") and not node.kwargs:
        return "relu"
    return None


def _tails(graph: fx.Graph, modules: Dict[str, nn.Module]) -> Iterator[tuple]:
    """(conv, mids, add, act or None, kind, other, conv_first, act form) per fusable tail."""
    for node in list(graph.nodes):
        conv = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(conv, DynamicConv2d) or conv.relu or conv.fuse_relu \
                or len(node.args) != 1 or node.kwargs:
            continue
        src, mids = node, []
        user = _single_user(src)
        while (user is not None and user.op == "call_module" and user.args == (src,)
               and not user.kwargs and type(modules.get(user.target)) is nn.Identity):
            mids.append(user)
            src, user = user, _single_user(user)
        if user is None:
            continue
        form = _add_form(user, src)
        if form is None:
            continue
        kind, other, conv_first = form
        act = _single_user(user)
        act_form = _relu_form(act, user, modules) if act is not None else None
        yield node, mids, user, (act if act_form else None), kind, other, conv_first, act_form


# What Python runs for an augmented assignment on an fx Proxy, which has no
# in-place operators: `a += b` is traced as `a = a + b`.
_AUGMENTABLE = {operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv,
                operator.mod, operator.pow, operator.matmul, operator.and_, operator.or_,
                operator.xor, operator.lshift, operator.rshift}


def _no_hidden_in_place(graph: fx.Graph) -> bool:
    """False where a traced op may have been an in-place `a += b` whose effect
    the trace loses: a left operand that is an input or attribute of the module
    (the caller's tensor), or that something else also reads."""
    for node in graph.nodes:
        if node.op == "call_function" and node.target in _AUGMENTABLE and node.args \
                and isinstance(node.args[0], fx.Node):
            left = node.args[0]
            if left.op in ("placeholder", "get_attr") or len(left.users) > 1:
                return False
    return True


def fused_forward(module: nn.Module):
    """``module``'s forward with its residual tails fused, as a function of
    (module, *inputs); None when it has none, does not trace, or may update a
    tensor in place in a way the trace would lose."""
    try:
        graph = _ChildrenTracer().trace(module)
    except Exception:  # control flow on values, unsupported ops: not fused
        return None
    if not _no_hidden_in_place(graph):
        return None
    modules = dict(module.named_modules())
    found = 0
    while True:  # one at a time: a fused tail may hold another's operand
        first = next(_tails(graph, modules), None)
        if first is None:
            break
        conv, mids, add, act, kind, other, conv_first, act_form = first
        tail = act if act is not None else add
        with graph.inserting_before(tail):
            conv_attr = graph.get_attr(conv.target)
            mid_attrs = tuple(graph.get_attr(m.target) for m in mids)
            act_arg = graph.get_attr(act.target) if act_form == "module" else act_form
            fused = graph.call_function(conv_add_act, (conv_attr, mid_attrs, conv.args[0], other,
                                                       kind, conv_first, act_arg))
        tail.replace_all_uses_with(fused)
        for n in ([act] if act is not None else []) + [add] + mids[::-1] + [conv]:
            graph.erase_node(n)
        found += 1
    if not found:
        return None
    graph.lint()
    code = graph.python_code(root_module="self")
    namespace = dict(code.globals)
    exec(compile(code.src, f"<dynprune fused {type(module).__name__}.forward>", "exec"), namespace)
    return namespace["forward"]


def _plain_names(module: nn.Module) -> Tuple[str, ...]:
    """The module's plain attributes (flags, sizes), which the traced forward's
    control flow may have read."""
    return tuple(k for k, v in module.__dict__.items()
                 if not k.startswith("_") and k != "training"
                 and isinstance(v, (bool, int, float, str, type(None))))


def _guard_key(module: nn.Module, names: Tuple[str, ...]) -> tuple:
    """What a trace depends on: the children (by identity), the plain attributes."""
    d = module.__dict__
    return tuple(module._modules.items()), tuple(d.get(k, _guard_key) for k in names)


class ResidualForward:
    """A module's instance ``forward`` with its residual tails fused (eval only).

    In eval mode without autograd, called with tensors only, it runs the
    module's forward as traced by torch.fx, each tail as a :func:`conv_add_act`
    call; the trace is redone when a child module or a plain attribute of the
    module changes. Otherwise (training, autograd, torch.compile, torch.jit.trace,
    fx tracing, keyword arguments) the class's ``forward``. Copies and pickles re-trace.
    It calls the module it was made for: nn.DataParallel's replicas share it
    and would run the original module (convert with ``fast_path=False`` for
    that; DistributedDataParallel is unaffected).
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self._fn = self._key = self._names = None

    def __call__(self, *args, **kwargs):
        m = self.module
        if (not kwargs and not m.training and not torch.is_grad_enabled()
                and all(type(a) is torch.Tensor for a in args)
                and not torch.compiler.is_compiling() and dnn._tracing_state() is None):
            if self._key is None or _guard_key(m, self._names) != self._key:
                self._names = _plain_names(m)
                self._fn, self._key = fused_forward(m), _guard_key(m, self._names)
            if self._fn is not None:
                return self._fn(m, *args)
        return type(m).forward(m, *args, **kwargs)

    def __getstate__(self):
        return {"module": self.module}

    def __setstate__(self, state):
        self.module = state["module"]
        self._fn = self._key = self._names = None


def fuse_residuals(model: nn.Module) -> List[str]:
    """Gives each module of ``model`` whose forward ends a DynamicConv2d in an add
    (and ReLU) a :class:`ResidualForward`; returns their names.

    Only modules with a DynamicConv2d child, whose forward traces with every
    child opaque, and that have no instance ``forward`` of their own.
    """
    names = []
    for name, m in model.named_modules():
        if "forward" in m.__dict__ or isinstance(m, DynamicConv2d) \
                or not any(isinstance(c, DynamicConv2d) for c in m.children()):
            continue
        if fused_forward(m) is not None:
            m.forward = ResidualForward(m)
            names.append(name)
    return names
