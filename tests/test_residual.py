"""Residual adds (and the ReLU after them) fused into a block's last conv."""
import copy
import io
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

import dynprune
from dynprune.models import MODELS
from dynprune.ops import dynamic_conv2d_reference
from dynprune.residual import ResidualForward, fuse_residuals

from conftest import max_rel_err
from zoo import randomize_bn, tiny_resnet, trained_looking

# (Cin, Cout, map, kernel, stride, batch): the pixel form on a large map, the
# output-channel form (14x14 at batch 16), the tail pixel (7x7), 3x3 on 2x2
# (pairs), 3x3 on 1x1 (cropped to 1x1), 1x1 convs, stride 2 to 4x4 (tap copies).
KERNEL_CASES = [(16, 24, 30, 3, 1, 1), (32, 32, 14, 3, 1, 16), (64, 64, 14, 3, 1, 1),
                (48, 64, 7, 3, 1, 3), (64, 64, 2, 3, 1, 2), (64, 64, 1, 3, 1, 4),
                (64, 96, 7, 1, 1, 2), (32, 64, 14, 1, 2, 1), (24, 40, 7, 3, 2, 5)]


def gated_layer(cin, cout, kernel, stride, seed):
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2)
    layer = dynprune.DynamicConv2d.from_conv(conv, keep_ratio=0.5).eval()
    with torch.no_grad():
        layer.gate.fc.weight.normal_(generator=g)  # per-sample channel choices
    return layer


@pytest.mark.parametrize("case", KERNEL_CASES, ids=[str(c) for c in KERNEL_CASES])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("given_inputs", [False, True])
def test_run_residual_equals_the_unfused_ops(case, relu, given_inputs):
    cin, cout, size, kernel, stride, batch = case
    layer = gated_layer(cin, cout, kernel, stride, seed=sum(case))
    x = torch.randn(batch, cin, size, size)
    x[:, torch.randperm(cin)[: cin // 3]] = 0
    in_idx = None
    if given_inputs:  # channels outside in_idx hold values and must be ignored
        in_idx = torch.stack([torch.sort(torch.randperm(cin)[: cin // 2]).values
                              for _ in range(batch)])
    with torch.no_grad():
        plan = layer._native_eval_plan()
        y, idx = plan.run(x, in_idx)
        res = torch.randn_like(y)
        res[0, 0, 0, 0] = float("nan")  # NaN goes through the add and the ReLU
        fused = plan.run_residual(x, in_idx, res, relu)
    unfused = torch.relu(y + res) if relu else y + res
    assert torch.equal(fused.isnan(), unfused.isnan())
    assert torch.equal(fused.nan_to_num(), unfused.nan_to_num())  # bit for bit

    # and against the float64 reference op (independent of the kernel)
    xr = x.double()
    if in_idx is not None:
        xr = xr * torch.zeros(batch, cin, 1, 1, dtype=torch.float64).scatter(
            1, in_idx[:, :, None, None], 1.0)
    with torch.no_grad():
        w, b = layer.inference_params()
        ref, ref_idx, _ = dynamic_conv2d_reference(
            xr, w.double(), b.double(), layer.gate.fc.weight.double(),
            layer.gate.fc.bias.double(), layer.gate.priority.double(), layer.k, None,
            layer.stride, layer.padding, layer.dilation, False)
    assert torch.equal(ref_idx, idx)
    ref = ref + res.double()
    if relu:
        ref = torch.relu(ref)
    keep = ~ref.isnan()
    assert max_rel_err(fused[keep], ref[keep]) < 1e-5


def test_run_residual_declines_what_the_kernel_does_not_take():
    layer = gated_layer(8, 8, 3, 1, seed=0)
    x = torch.randn(2, 8, 6, 6)
    plan = layer._native_eval_plan()
    with torch.no_grad():
        y, _ = plan.run(x, None)
        assert plan.run_residual(x, None, torch.randn(2, 8, 1, 1), True) is None  # broadcast
        assert plan.run_residual(x, None, y.double(), True) is None  # dtype promotion
        assert plan.run_residual(x, None, y.transpose(2, 3), True) is None  # layout
        assert plan.run_residual(x[:0], None, y[:0], True) is None  # empty batch
    relu_layer = dynprune.DynamicConv2d(8, 8, 3, padding=1, relu=True).eval()
    with pytest.raises(ValueError, match="own ReLU"):
        relu_layer._native_eval_plan().run_residual(x, None, y, True)


def test_run_residual_without_avx512():
    script = textwrap.dedent("""
        import torch, dynprune
        torch.manual_seed(0)
        ok = True
        for cin, cout, size, kernel, stride, batch in [(16, 24, 9, 3, 1, 1), (32, 32, 7, 3, 2, 4),
                                                        (24, 16, 5, 1, 1, 3)]:
            conv = torch.nn.Conv2d(cin, cout, kernel, stride, kernel // 2)
            layer = dynprune.DynamicConv2d.from_conv(conv, keep_ratio=0.5).eval()
            layer.gate.fc.weight.data.normal_()
            x = torch.randn(batch, cin, size, size)
            x[:, :3] = 0
            with torch.no_grad():
                plan = layer._native_eval_plan()
                y, _ = plan.run(x, None)
                res = torch.randn_like(y)
                ok &= torch.equal(plan.run_residual(x, None, res, True), torch.relu(y + res))
                ok &= torch.equal(plan.run_residual(x, None, res, False), y + res)
        print(ok)
    """)
    env = dict(os.environ, DYNPRUNE_DISABLE_AVX512="1")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "True"


def converted(model, keep=0.5):
    dynprune.convert(randomize_bn(model), keep_ratio=keep)
    return trained_looking(model).eval()


def unfused_forward(model, x):
    """The model with every fused forward taken away (a copy)."""
    plain = copy.deepcopy(model)
    for m in plain.modules():
        m.__dict__.pop("forward", None)
    with torch.no_grad():
        return plain(x)


def count_conv_forwards(monkeypatch):
    calls = []
    forward = dynprune.DynamicConv2d.forward

    def counted(self, x):
        calls.append(self)
        return forward(self, x)

    monkeypatch.setattr(dynprune.DynamicConv2d, "forward", counted)
    return calls


@pytest.mark.parametrize("name", ["resnet20", "zoo"])
def test_convert_fuses_block_tails_bit_exactly(name, monkeypatch):
    # resnet20 ends a block relu(out + identity); the zoo's torchvision-style
    # block writes `out += identity` then self.relu(out).
    model = converted(MODELS["resnet20"][0]() if name == "resnet20" else tiny_resnet())
    shape = (3, 32, 32) if name == "resnet20" else (3, 16, 16)
    blocks = [m for m in model.modules() if isinstance(m.__dict__.get("forward"), ResidualForward)]
    assert len(blocks) == (9 if name == "resnet20" else 3)
    x = torch.randn(2, *shape)
    expected = unfused_forward(model, x)
    calls = count_conv_forwards(monkeypatch)
    with torch.no_grad():
        y = model(x)
    assert torch.equal(y, expected)
    tails = {id(b.conv2) for b in blocks}
    assert not any(id(c) in tails for c in calls)  # each tail ran as one native call
    assert len(calls) == sum(isinstance(m, dynprune.DynamicConv2d) for m in model.modules()) \
        - len(blocks)


def test_fused_tail_runs_the_ops_when_its_assumptions_break(monkeypatch):
    model = converted(MODELS["resnet20"][0]())
    x = torch.randn(2, 3, 32, 32)
    expected = unfused_forward(model, x)
    block = model.layer1[0]
    seen = []
    handle = block.conv2.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        assert torch.equal(model(x), expected)  # a hook: the conv runs as a module
    assert len(seen) == 1
    handle.remove()

    # the residual is broadcast or promoted by the add: the ops do it
    conv, other = block.conv2, torch.randn(2, 16, 1, 1)
    from dynprune.residual import conv_add_act
    with torch.no_grad():
        h = torch.relu(torch.randn(2, 16, 32, 32))
        ref = torch.relu(conv(h) + other)
        assert torch.equal(conv_add_act(conv, (), h, other, "add", True, "relu"), ref)
        other64 = torch.randn(2, 16, 32, 32, dtype=torch.float64)
        out = conv_add_act(conv, (), h, other64, "add", False, None)
        assert out.dtype == torch.float64 and torch.equal(out, other64 + conv(h))

    # autograd and training take the class's forward
    y = model(x)
    assert y.requires_grad and torch.allclose(y.detach(), expected, rtol=1e-5, atol=1e-6)
    model.train()
    model(x).sum().backward()
    assert block.conv2.weight.grad is not None


def test_changed_children_or_attributes_retrace():
    model = converted(tiny_resnet())
    block = model.layers[1]  # has a downsample branch
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        model(x)
        # a replaced conv (dense now) and a different activation after the add
        block.conv2 = nn.Conv2d(block.conv2.in_channels, block.conv2.out_channels, 3, padding=1)
        block.relu = nn.LeakyReLU(0.5)
        assert torch.equal(model(x), unfused_forward(model, x))
        # a plain attribute the forward's control flow reads
        first = model.layers[0]
        first.downsample = nn.Identity()
        assert torch.equal(model(x), unfused_forward(model, x))


def test_only_tails_that_are_safe_to_fuse():
    def conv():
        return dynprune.DynamicConv2d(4, 4, 3, padding=1)

    class Tails(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = conv(), conv(), conv()

        def forward(self, x):
            x2 = torch.cat([x], 1)
            x2 += self.a(x)  # traced as x2 + a(x): x2 is read nowhere else, fused
            z = self.b(x2)
            z = z + z  # the conv's output on both sides: not fused
            w = self.c(z)
            return torch.relu(w) + x2, w  # the conv's output used twice: not fused

    tails = Tails().eval()
    assert fuse_residuals(tails) == [""]
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        for got, want in zip(tails(x), type(tails).forward(tails, x)):
            assert torch.equal(got, want)
        assert tails.forward._fn is not None

    class UpdatesItsInput(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = conv()

        def forward(self, x):
            x += self.a(x)  # the caller's tensor changes: the trace would lose that
            return torch.relu(x)

    assert fuse_residuals(UpdatesItsInput()) == []

    class Shares(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = conv()

        def forward(self, x):
            h = torch.relu(x)
            keep = h
            h += self.a(x)  # also changes `keep` in place: not fused
            return h * keep

    assert fuse_residuals(Shares()) == []

    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = conv(), conv()

        def forward(self, x):
            return torch.relu(self.a(x) + self.b(x))  # one add: one fusion

    chain = Chain().eval()
    assert fuse_residuals(chain) == [""]
    with torch.no_grad():
        assert torch.equal(chain(x), type(chain).forward(chain, x))

    class AddInPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = conv()

        def forward(self, x):
            return self.a(x).add_(torch.relu(x)).relu_()  # in place on the conv's output

    tail = AddInPlace().eval()
    assert fuse_residuals(tail) == [""]
    with torch.no_grad():
        assert torch.equal(tail(x), type(tail).forward(tail, x))


def test_copies_pickles_and_state_dict_are_unchanged():
    model = converted(tiny_resnet())
    plain = dynprune.convert(randomize_bn(tiny_resnet()), keep_ratio=0.5, fast_path=False)
    assert list(model.state_dict()) == list(plain.state_dict())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        y = model(x)
        clone = copy.deepcopy(model)
        assert clone.layers[0].forward.module is clone.layers[0]
        assert torch.equal(clone(x), y)
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        assert loaded.layers[0].forward.module is loaded.layers[0]
        assert torch.equal(loaded(x), y)


def test_jit_trace_records_the_ops_not_the_native_calls():
    # pybind11 calls are opaque to torch.jit.trace: it would bake their results
    # in as constants. While it records, every module takes the op path.
    import warnings

    model = converted(tiny_resnet())
    x, other = torch.randn(2, 3, 16, 16), torch.randn(3, 3, 16, 16)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's own warnings
        traced = torch.jit.trace(model, x, check_trace=False)
        assert torch.allclose(traced(other), model(other), rtol=1e-5, atol=1e-6)
