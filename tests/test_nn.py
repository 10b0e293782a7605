"""DynamicConv2d, convert() and flops() against nn.Conv2d and the dense path."""
import copy
import gc
import io
import math
import weakref

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dynprune
from dynprune import DynamicConv2d

from zoo import ZOO, randomize_bn, tiny_resnet


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


CONV_CASES = [
    dict(in_channels=6, out_channels=10, kernel_size=3, padding=1),
    dict(in_channels=5, out_channels=7, kernel_size=3, stride=2, padding=1, bias=False),
    dict(in_channels=4, out_channels=9, kernel_size=5, padding="same", dilation=2),
    dict(in_channels=4, out_channels=9, kernel_size=(2, 4), padding="same"),  # asymmetric 'same'
    dict(in_channels=3, out_channels=8, kernel_size=1),
    dict(in_channels=3, out_channels=8, kernel_size=3, padding="valid"),
]


@pytest.mark.parametrize("cfg", CONV_CASES)
def test_keep_ratio_one_equals_conv2d(cfg):
    conv = nn.Conv2d(**cfg)
    dyn = DynamicConv2d.from_conv(conv, keep_ratio=1.0).eval()
    x = torch.randn(3, cfg["in_channels"], 11, 12)
    with torch.no_grad():
        assert rel_err(dyn(x), conv(x)) < 1e-5
    # Same constructor as nn.Conv2d: same parameter names and shapes.
    fresh = DynamicConv2d(**cfg, keep_ratio=1.0)
    assert {k: v.shape for k, v in conv.state_dict().items()}.items() <= \
        {k: v.shape for k, v in fresh.state_dict().items()}.items()


@pytest.mark.parametrize("cfg", CONV_CASES)
@pytest.mark.parametrize("bn,relu", [(False, False), (True, True), (True, False)])
def test_eval_equals_training_path(cfg, bn, relu):
    m = DynamicConv2d(**cfg, keep_ratio=0.4, batch_norm=bn, relu=relu)
    with torch.no_grad():  # a trained-looking gate: input-dependent saliencies
        m.gate.fc.weight.normal_()
        m.gate.fc.bias.uniform_(0.0, 1.0)
    if bn:
        randomize_bn(m)
    m.eval()
    x = torch.randn(4, cfg["in_channels"], 10, 9)
    with torch.no_grad():
        fast, dense = m(x), m.forward_dense(x)
    assert rel_err(fast, dense) < 1e-5
    kept = fast.flatten(2).ne(0).any(2).sum(1)
    assert (kept <= m.k).all()  # at most k channels are non-zero per sample


def test_k_and_keep_ratio_validation():
    assert DynamicConv2d(4, 10, 3, keep_ratio=0.25).k == 3  # ceil(2.5)
    assert DynamicConv2d(4, 10, 3, keep_ratio=0.01).k == 1  # at least one
    assert DynamicConv2d(4, 10, 3, keep_ratio=1.0).k == 10
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="keep_ratio"):
            DynamicConv2d(4, 10, 3, keep_ratio=bad)
    with pytest.raises(TypeError, match="keep_ratio"):
        DynamicConv2d(4, 10, 3, keep_ratio="half")
    with pytest.raises(ValueError, match="groups"):
        DynamicConv2d(4, 8, 3, groups=2)
    with pytest.raises(ValueError, match="padding_mode"):
        DynamicConv2d(4, 8, 3, padding=1, padding_mode="reflect")
    with pytest.raises(ValueError, match="keep_ratio"):
        dynprune.convert(nn.Sequential(nn.Conv2d(3, 4, 3)), keep_ratio=0)
    for bad in (True, "half", None, torch.tensor([0.5])):  # the module and convert() alike
        with pytest.raises(TypeError, match="keep_ratio"):
            DynamicConv2d(4, 10, 3, keep_ratio=bad)
        with pytest.raises(TypeError, match="keep_ratio"):
            dynprune.convert(nn.Sequential(nn.Conv2d(3, 4, 3)), keep_ratio=bad)
    for ok in (np.float32(0.25), np.float64(0.25), torch.tensor(0.25), 1):
        m = DynamicConv2d(4, 10, 3, keep_ratio=ok)
        assert type(m.keep_ratio) is float and m.k == (3 if ok != 1 else 10)



@pytest.mark.parametrize("mode", ["eval_no_grad", "eval_grad", "train"])
def test_unbatched_input_like_nn_conv2d(mode):
    """A [C, H, W] input gives what the batch of that one sample gives, [Cout, Ho, Wo]."""
    torch.manual_seed(0)
    m = DynamicConv2d(4, 8, 3, padding=1, keep_ratio=0.5)
    m.gate.fc.weight.data.normal_()
    m.train(mode == "train")
    x = torch.randn(4, 6, 7)
    with torch.set_grad_enabled(mode != "eval_no_grad"):
        torch.manual_seed(1)
        y = m(x)
        torch.manual_seed(1)
        want = m(x[None])[0]
    assert y.shape == (8, 6, 7) and torch.equal(y, want)
    assert y.shape == nn.Conv2d(4, 8, 3, padding=1)(x).shape

@pytest.mark.parametrize("native", [False, True])
def test_bad_input_to_module(native):
    """Clear errors for bad input, with autograd on (the Python checks) and off
    (eval then runs the native plan, which checks the input itself)."""
    m = DynamicConv2d(4, 8, 3, batch_norm=True).eval()
    with torch.set_grad_enabled(not native):
        m(torch.randn(1, 4, 5, 5))
        assert (m._plan_cache is not None) == native
        for bad in (torch.randn(4, 5), torch.randn(1, 1, 4, 5, 5)):
            with pytest.raises(ValueError, match="expects a 4-D input"):
                m(bad)
        with pytest.raises(ValueError, match="expects 4 input channels, got 3"):
            m(torch.randn(1, 3, 5, 5))
        with pytest.raises(TypeError, match="dtype mismatch"):
            m(torch.randn(1, 4, 5, 5, dtype=torch.float64))


def test_native_plan_rebuilt_when_a_submodule_is_replaced():
    """The plan's guards cover the modules holding its tensors: a new gate or
    BatchNorm (not just new tensors) rebuilds it."""
    torch.manual_seed(0)
    m = DynamicConv2d(6, 10, 3, padding=1, keep_ratio=0.5, batch_norm=True).eval()
    randomize_bn(m)
    x = torch.randn(2, 6, 8, 8)
    with torch.no_grad():
        before = m(x)
        m.gate.fc = nn.Linear(6, 10)
        after_gate = m(x)
        assert torch.equal(after_gate, _reference_forward(m, x))
        assert not torch.equal(after_gate, before)
        m.bn = nn.BatchNorm2d(10).eval()  # fresh statistics: mean 0, var 1
        after_bn = m(x)
        assert torch.equal(after_bn, _reference_forward(m, x))
        assert not torch.equal(after_bn, after_gate)
        m.bn.eps = 0.5
        assert torch.equal(m(x), _reference_forward(m, x))
        assert not torch.equal(m(x), after_bn)


class _Probe:
    """An object that lives in a layer's __dict__ and dies with it."""


def test_native_plan_does_not_keep_its_layer_alive():
    """A layer whose cached plan checks it on every call is still freed, its
    __dict__ (which holds the plan) included."""
    m = DynamicConv2d(4, 8, 3, batch_norm=True).eval()
    m.probe = _Probe()
    with torch.no_grad():
        m(torch.randn(1, 4, 5, 5))
    assert m._plan_cache is not None
    layer, probe = weakref.ref(m), weakref.ref(m.probe)
    del m
    gc.collect()
    assert layer() is None and probe() is None


def test_gradients_flow_to_weights_and_gate():
    torch.manual_seed(0)
    m = DynamicConv2d(3, 4, 3, padding=1, keep_ratio=0.5, batch_norm=True, relu=True).double()
    with torch.no_grad():
        m.gate.fc.weight.normal_()
    m.train()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    params = [m.weight, m.bias, m.gate.fc.weight, m.gate.fc.bias, m.bn.weight, m.bn.bias]
    # gradcheck needs a fixed channel selection: tiny perturbations must not flip
    # the top-k, which holds with probability ~1 for continuous random saliency.
    assert torch.autograd.gradcheck(lambda x, *p: m(x), (x, *params), eps=1e-6, atol=1e-5)
    y = m(x)
    (y.sum() + 0.1 * dynprune.saliency_loss(m)).backward()
    for p in params:
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_eval_forward_is_differentiable():
    m = DynamicConv2d(3, 4, 3, padding=1, keep_ratio=0.5).double().eval()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: m(x), (x, m.weight), eps=1e-6, atol=1e-5)


def test_state_dict_round_trip():
    a = DynamicConv2d(5, 6, 3, padding=1, keep_ratio=0.5, batch_norm=True, relu=True)
    with torch.no_grad():
        a.gate.fc.weight.normal_()
    randomize_bn(a)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = DynamicConv2d(5, 6, 3, padding=1, keep_ratio=0.5, batch_norm=True, relu=True)
    b.load_state_dict(torch.load(buf))
    a.eval(), b.eval()
    x = torch.randn(2, 5, 7, 7)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_fold_cache_follows_weight_updates():
    m = DynamicConv2d(3, 4, 3, padding=1, keep_ratio=1.0, batch_norm=True).eval()
    x = torch.randn(1, 3, 6, 6)
    with torch.no_grad():
        before = m(x)
        m.weight.mul_(2.0)  # in-place update bumps the version counter
        after = m(x)
        assert rel_err(after, m.forward_dense(x)) < 1e-5
        assert not torch.allclose(before, after)


@pytest.mark.parametrize("groups", [1, 4])
def test_conv2d_bn_folds_at_eval_and_trains_unchanged(groups):
    conv, bn = nn.Conv2d(8, 12, 3, padding=1, groups=groups), nn.BatchNorm2d(12)
    randomize_bn(nn.Sequential(conv, bn))
    fused = dynprune.Conv2dBN.from_conv(conv, bn)
    x = torch.randn(3, 8, 7, 7)
    conv.eval(), bn.eval(), fused.eval()
    with torch.no_grad():
        ref = bn(conv(x))
        assert rel_err(fused(x), ref) < 1e-5
        fused.bn.running_mean.add_(1.0)  # the fold follows the BN's statistics
        assert rel_err(fused(x), fused.bn(F.conv2d(x, fused.weight, fused.bias, padding=1,
                                                   groups=groups))) < 1e-5
    # Training: batch statistics and running-stat updates exactly as conv -> bn.
    conv2, bn2 = copy.deepcopy(conv).train(), copy.deepcopy(bn).train()
    fused2 = dynprune.Conv2dBN.from_conv(conv2, bn2).train()
    assert torch.equal(fused2(x), bn2(conv2(x)))
    assert torch.equal(fused2.bn.running_mean, bn2.running_mean)


@pytest.mark.parametrize("n,cin,cout,k,stride,padding,dilation,bias", [
    (2, 3, 16, 7, 2, 3, 1, False), (3, 5, 9, 3, 1, 1, 2, True), (1, 4, 6, 1, 1, 0, 1, True),
    (0, 3, 8, 3, 2, 1, 1, False), (2, 6, 5, 3, 2, 0, 1, True)])
def test_conv2d_bn_native_path_matches_float64(monkeypatch, n, cin, cout, k, stride, padding,
                                               dilation, bias):
    # The threshold lowered so that small cases take the native dense path.
    monkeypatch.setattr(dynprune.nn, "NATIVE_DENSE_MIN_BYTES", 0)
    conv = nn.Conv2d(cin, cout, k, stride, padding, dilation, bias=bias)
    bn = nn.BatchNorm2d(cout)
    randomize_bn(nn.Sequential(conv, bn))
    fused = dynprune.Conv2dBN.from_conv(conv, bn).eval()
    ref = nn.Sequential(conv, bn).eval().double()
    x = torch.randn(n, cin, 17, 15)
    x[:, 0] = 0.0  # an all-zero input channel is still read (dense semantics)
    with torch.no_grad():
        assert fused._native_pays(x, fused.weight) == (dynprune.backends()["cpu"] == "native")
        y, expected = fused(x), ref(x.double())
        assert y.shape == expected.shape and y.dtype == torch.float32
        if n:
            assert rel_err(y, expected) < 1e-5
        y2 = fused(torch.randn(n + 1, cin, 17, 15))  # another batch size
        assert y2.shape[0] == n + 1


def test_conv2d_bn_native_threshold():
    conv, bn = nn.Conv2d(1, 8, 1), nn.BatchNorm2d(8)
    randomize_bn(nn.Sequential(conv, bn))
    fused = dynprune.Conv2dBN.from_conv(conv, bn).eval()
    ref = nn.Sequential(conv, bn).eval().double()
    big = torch.randn(1, 1, 1024, 1024)  # a 32 MB output: the native path
    with torch.no_grad():
        assert not fused._native_pays(big[:, :, :512], fused.weight)
        assert fused._native_pays(big, fused.weight) == (dynprune.backends()["cpu"] == "native")
        assert rel_err(fused(big).double(), ref(big.double())) < 1e-5
    with torch.enable_grad():  # autograd: F.conv2d
        assert not fused._native_pays(big, fused.weight)


def test_conv2d_bn_rejects_bn_without_running_stats():
    with pytest.raises(ValueError, match="running statistics"):
        dynprune.Conv2dBN.from_conv(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False))


def _reference_forward(m, x):
    """The same eval forward through the op path (no native plan: grad enabled)."""
    with torch.enable_grad():
        return m(x).detach()


def test_native_plan_matches_op_path_and_follows_changes():
    """The no-grad CPU fast path (a cached native plan) sees every change to the layer."""
    m = DynamicConv2d(6, 10, 3, padding=1, keep_ratio=0.5, batch_norm=True, relu=True)
    with torch.no_grad():
        m.gate.fc.weight.normal_()
    randomize_bn(m)
    m.eval()
    x = torch.randn(2, 6, 8, 8)
    changes = [
        lambda: setattr(m, "keep_ratio", 0.3),                      # k
        lambda: m.gate.fc.weight.mul_(-1.0),                        # in place, gate
        lambda: m.bn.running_mean.add_(0.5),                        # BN re-fold
        lambda: setattr(m, "weight", nn.Parameter(m.weight * 2)),   # new Parameter
        lambda: setattr(m, "relu", False),                          # epilogue
        lambda: setattr(m, "fuse_relu", True),
    ]
    with torch.no_grad():
        previous = m(x)
        assert m._plan_cache is not None
        assert torch.equal(previous, _reference_forward(m, x))
        for change in changes:
            change()
            y = m(x)
            assert torch.equal(y, _reference_forward(m, x))
            dense = m.forward_dense(x)
            assert rel_err(y, F.relu(dense) if m.fuse_relu else dense) < 1e-5
            assert not torch.equal(y, previous)
            previous = y


def _layer_reference(m, x):
    """(y, idx) of the pure-PyTorch reference op for eval DynamicConv2d m (no BN) on x."""
    gate = m.gate
    y, idx, _ = dynprune.ops.dynamic_conv2d_reference(
        x, m.weight, m.bias, gate.fc.weight, gate.fc.bias, gate.priority, m.k, None, m.stride,
        m.padding, m.dilation, False)
    return y, idx


GATE_SCHEDULES = [  # (batch, cin, cout, size): where the plan's kernel computes the gate
    (1, 24, 40, 6),     # a small input: set-up on the calling thread
    (1, 48, 72, 24),    # a larger one: the phases in one parallel region
    (4, 16, 24, 12),    # samples run whole, fewer gate rows than pixels: a gate per sample
    (4, 40, 96, 4),     # samples run whole, more gate rows than pixels: the batch's gate first
]


@pytest.mark.parametrize("batch, cin, cout, size", GATE_SCHEDULES)
@pytest.mark.parametrize("infinite", [False, True])
def test_native_plan_gate_matches_the_reference(batch, cin, cout, size, infinite):
    """The plan's gate (from its transposed copy of the gate weight, reading only
    the rows of non-zero inputs) keeps the reference's channels, scales and
    outputs, with about half the inputs zero. With `infinite`, a zero input's
    gate weights hold inf: inf * 0 is NaN in the reference, so those rows must
    still be read."""
    gen = torch.Generator().manual_seed(batch * 1000 + cin)
    m = DynamicConv2d(cin, cout, 3, padding=1, keep_ratio=0.5).eval()
    with torch.no_grad():
        m.gate.fc.weight.normal_(generator=gen)
        m.gate.fc.bias.normal_(generator=gen)
    x = torch.randn(batch, cin, size, size, generator=gen)
    x[torch.rand(batch, cin, generator=gen) < 0.5] = 0
    x[:, 1] = 0
    if infinite:
        with torch.no_grad():
            m.gate.fc.weight[::3, 1] = math.inf
    plan = m._native_eval_plan()
    assert plan is not None
    for _ in range(2):  # the second call reuses the cached transposed weight
        with torch.no_grad():
            y, idx = plan.run(x, None)
            ref_y, ref_idx = _layer_reference(m, x)
        assert torch.equal(idx, ref_idx)
        if infinite:  # NaN saliency ranks first: the inf rows are kept, and NaN
            assert torch.isnan(y).any()
            assert torch.equal(torch.isnan(y), torch.isnan(ref_y))
        else:
            assert rel_err(y, ref_y) < 1e-5
    with torch.no_grad():  # an in-place update of the gate weight is seen
        m.gate.fc.weight.neg_()
        y, idx = plan.run(x, None)
        _, ref_idx = _layer_reference(m, x)
    assert torch.equal(idx, ref_idx)


@pytest.mark.parametrize("size", [7, 1])  # 1: the taps that read only padding are cut
def test_native_plan_follows_data_reassignment_of_its_weights(size):
    """`.data =` swaps a parameter's storage without a version bump (as
    torch.nn.utils.vector_to_parameters does): the plan's cached copies (the
    transposed gate, the cut taps) must follow, even when a new storage lands
    at a freed one's address (the plan holds the storage its copy came from)."""
    torch.manual_seed(0)
    m = DynamicConv2d(32, 24, 3, padding=1, keep_ratio=0.5).eval()
    x = torch.randn(1, 32, size, size)
    plan = m._native_eval_plan()
    for _ in range(6):
        m.gate.fc.weight.data = torch.randn(24, 32)
        m.weight.data = torch.randn(24, 32, 3, 3)
        with torch.no_grad():
            y, idx = plan.run(x, None)
            ref_y, ref_idx = _layer_reference(m, x)
        assert torch.equal(idx, ref_idx)
        assert rel_err(y, ref_y) < 1e-5


@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize("size", [7, 1])  # 1: the taps that read only padding are cut
def test_layer_made_under_inference_mode_follows_in_place_updates(bn, size):
    """Parameters made under torch.inference_mode have no version counter, so
    nothing derived from them (folded BN, cut taps, the transposed gate) may be
    cached: outputs match a twin made normally, also after load_state_dict
    updates the inference tensors in place."""
    torch.manual_seed(0)
    twin = DynamicConv2d(16, 24, 3, padding=1, keep_ratio=0.5, batch_norm=bn)
    with torch.no_grad():
        twin.gate.fc.weight.normal_()
    if bn:
        randomize_bn(twin)
    twin.eval()
    x = torch.randn(2, 16, size, size)
    outputs = []
    for scale in (1.0, -1.5):
        with torch.no_grad():
            for name, t in twin.state_dict().items():
                if t.is_floating_point() and "running_var" not in name:
                    t.mul_(scale)
            expected = twin(x)
        with torch.inference_mode():
            if not outputs:
                m = DynamicConv2d(16, 24, 3, padding=1, keep_ratio=0.5, batch_norm=bn).eval()
            m.load_state_dict(twin.state_dict())
            outputs.append(m(x))
        assert rel_err(outputs[-1], expected) < 1e-5
    assert not torch.equal(outputs[0], outputs[1])


SMALL_MAPS = [  # (cin, cout, kernel, stride, padding, dilation, map): taps that read only padding
    (24, 16, 3, 1, 1, 1, (1, 1)),            # 3x3 on 1x1: the centre tap alone
    (24, 16, 3, 2, 1, 1, (2, 2)),            # stride 2 to 1x1: a 2x2 corner of taps
    (16, 8, 5, 1, 2, 1, (1, 2)),             # rows cut to one, columns kept
    (16, 8, (3, 5), 1, (1, 2), 1, (1, 3)),
    (8, 12, 3, 1, 2, 2, (2, 2)),             # dilated: the centre tap alone
    (8, 12, 3, 1, 1, 1, (2, 3)),             # every tap reads the map somewhere: no cut
    (8, 12, 7, 2, 3, 1, (3, 3)),
]


@pytest.mark.parametrize("case", SMALL_MAPS)
@pytest.mark.parametrize("bn", [False, True])
def test_small_maps_skip_padding_taps_exactly(case, bn):
    """Kernel taps that read only zero padding are cut off on small maps: same outputs,
    and an in-place change of the weight reaches the cut copy."""
    cin, cout, kernel, stride, padding, dilation, hw = case
    m = DynamicConv2d(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation,
                      keep_ratio=0.5, batch_norm=bn)
    with torch.no_grad():
        m.gate.fc.weight.normal_()
        m.gate.fc.bias.uniform_(0.0, 1.0)
    if bn:
        randomize_bn(m)
    m.eval()
    x = torch.randn(5, cin, *hw)
    x[:, 1::3] = 0
    with torch.no_grad():
        fast = m(x)
        assert rel_err(fast, m.forward_dense(x)) < 1e-5
        assert rel_err(fast, _reference_forward(m, x)) < 1e-5
        m.weight.mul_(-2.0)
        again = m(x)
        assert rel_err(again, m.forward_dense(x)) < 1e-5
        assert not torch.equal(again, fast)


def test_small_map_too_small_for_the_kernel_still_raises():
    # 1 + 2*1 - 3 - 1 < 0: no output row, even though one tap alone would fit
    m = DynamicConv2d(4, 4, (4, 1), stride=(2, 1), padding=(1, 0), keep_ratio=0.5).eval()
    with torch.no_grad(), pytest.raises((ValueError, RuntimeError)):
        m(torch.randn(1, 4, 1, 3))


def test_small_map_with_zero_stride_raises_value_error():
    m = DynamicConv2d(4, 4, 3, stride=0, padding=1, keep_ratio=0.5).eval()
    with torch.no_grad(), pytest.raises(ValueError, match="stride"):
        m(torch.randn(1, 4, 1, 1))


def test_native_plan_survives_copies_and_dtype_changes():
    m = DynamicConv2d(4, 6, 3, padding=1, keep_ratio=0.5).eval()
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        y = m(x)
        for clone in (copy.deepcopy(m), torch.load(_saved(m), weights_only=False)):
            assert clone._plan_cache is None
            assert torch.equal(clone(x), y)
        m.double()
        assert rel_err(m(x.double()), y) < 1e-6


def _saved(module):
    buf = io.BytesIO()
    torch.save(module, buf)
    buf.seek(0)
    return buf


@pytest.mark.parametrize("name", sorted(ZOO))
def test_convert_keep_one_matches_original(name):
    model = randomize_bn(ZOO[name]()).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
        conv = dynprune.convert(copy.deepcopy(model), keep_ratio=1.0).eval()
        out = conv(x)
    assert rel_err(out, ref) < 1e-4
    dyn = [m for m in conv.modules() if isinstance(m, DynamicConv2d)]
    assert dyn, "nothing was converted"
    # depthwise convs stay dense; the first conv stays dense
    assert all(m.groups == 1 for m in dyn)
    first = next(m for m in conv.modules() if isinstance(m, nn.Conv2d))
    assert not isinstance(first, DynamicConv2d)
    # Convs left dense took the BatchNorm that alone follows them (DenseNet's
    # first conv feeds a concatenation: no BN to take).
    kept_dense = [m for m in conv.modules() if type(m) is dynprune.Conv2dBN]
    assert bool(kept_dense) == (name != "densenet")
    if name == "mobilenet":
        assert any(m.groups > 1 for m in kept_dense)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_convert_half_prunes_and_trains(name):
    model = randomize_bn(ZOO[name]())
    dynprune.convert(model, keep_ratio=0.5)
    x = torch.randn(4, 3, 16, 16)
    model.train()
    loss = model(x).square().mean() + 1e-3 * dynprune.saliency_loss(model)
    loss.backward()
    model.eval()
    with torch.no_grad():
        out = model(x)
        report = dynprune.flops(model, x)
    assert torch.isfinite(out).all()
    assert report.executed_macs < 0.75 * report.dense_macs


def test_convert_fuses_bn_and_zeros_survive():
    model = randomize_bn(tiny_resnet()).eval()
    dynprune.convert(model, keep_ratio=0.5)
    block = model.layers[1]
    assert isinstance(block.conv1, DynamicConv2d) and block.conv1.bn is not None
    assert isinstance(block.bn1, nn.Identity)
    assert isinstance(block.downsample[0], DynamicConv2d) and isinstance(block.downsample[1], nn.Identity)
    x = torch.randn(3, 8, 16, 16)
    with torch.no_grad():
        y = block.relu(block.bn1(block.conv1(x)))
    zero_channels = y.flatten(2).eq(0).all(2).sum(1)
    assert (zero_channels >= 16 - block.conv1.k).all()  # gate after BN: pruned stay zero


def test_convert_filter_fn_and_untraceable_model():
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
            self.head = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            if x.sum() > 1e9:  # data-dependent control flow: torch.fx cannot trace it
                return x
            return self.head(self.body(self.stem(x)))

    model = randomize_bn(Untraceable()).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
    seen = []
    with pytest.warns(UserWarning, match="does not trace.*fuse_bn=False"):
        dynprune.convert(model, keep_ratio=1.0, filter_fn=lambda m, n: seen.append(n) or n != "head")
    assert seen == ["body.0", "head"]
    assert isinstance(model.body[0], DynamicConv2d) and model.body[0].bn is not None
    assert isinstance(model.head, nn.Conv2d) and not isinstance(model.head, DynamicConv2d)
    with torch.no_grad():
        assert rel_err(model(x), ref) < 1e-4



def test_untraceable_model_calling_a_folded_conv_alone():
    """Without the fx graph the Sequential fallback cannot see a conv called on
    its own: convert() says so, and fuse_bn=False keeps such a model exact."""
    class CallsConvAlone(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 1)
            self.seq = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8))
            self.head = nn.Conv2d(8, 8, 1)

        def forward(self, x):
            x = self.stem(x)
            if x.mean() > -100:  # data-dependent: torch.fx cannot trace it
                a = self.seq(x)
            return self.head(a) + self.seq[0](x)  # the conv alone, no BN

    model = randomize_bn(CallsConvAlone()).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
    folded = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="fuse_bn=False"):
        dynprune.convert(folded, keep_ratio=1.0)
    dynprune.convert(model, keep_ratio=1.0, fuse_bn=False)
    with torch.no_grad():
        assert rel_err(model(x), ref) < 1e-4
        assert rel_err(folded(x), ref) > 1e-2  # what the warning is about

def test_flops_counts_skipped_channels():
    conv = nn.Conv2d(8, 10, 3, padding=1, bias=False)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), DynamicConv2d.from_conv(conv, keep_ratio=0.5))
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        model[0].weight[:3] = 0  # three input channels of the dynamic conv are all-zero
        model[0].bias[:3] = 0
    r = dynprune.flops(model, x)
    first = 8 * 3 * 36
    assert r.dense_macs == first + 10 * 8 * 9 * 36
    assert r.executed_macs == first + 5 * 5 * 9 * 36
    assert math.isclose(r.ratio, r.executed_macs / r.dense_macs)

    with pytest.raises(ValueError, match="empty batch"):
        dynprune.flops(model, x[:0])


def test_saliency_term_of_an_empty_batch_is_zero():
    m = DynamicConv2d(3, 4, 3, keep_ratio=0.5).train()
    m(torch.randn(0, 3, 5, 5))
    assert float(m.saliency_l1) == 0.0
    x = torch.randn(3, 3, 5, 5)  # and on a real batch: the per-sample mean of |saliency|
    m(x)
    want = m.gate.saliency(x).abs().sum(1).mean()
    assert torch.allclose(m.saliency_l1, want, rtol=1e-6)

def test_torch_compile_converted_model():
    """One graph (fullgraph=True raises at a graph break), also after eager
    calls filled the eval caches: comparing the BN fold cache's version
    counters once broke the graph at every layer."""
    model = randomize_bn(tiny_resnet())
    dynprune.convert(model, keep_ratio=0.5).eval()
    x = torch.randn(2, 3, 16, 16)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    torch._dynamo.reset()
    assert rel_err(compiled, eager) < 1e-5



def test_torch_compile_eval_with_autograd():
    """Eval with autograd on (fine-tuning through a frozen converted model):
    one graph, and the gradients of eager mode. The backward recomputes the
    reference without its index checks, whose value reads were data-dependent
    guards under compile."""
    model = randomize_bn(tiny_resnet())
    dynprune.convert(model, keep_ratio=0.5).eval()
    x = torch.randn(2, 3, 16, 16)
    grads = []
    for compiled in (False, True):
        torch._dynamo.reset()
        run = torch.compile(model, backend="aot_eager", fullgraph=True) if compiled else model
        model.zero_grad()
        y = run(x)
        y.square().sum().backward()
        grads.append((y.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    torch._dynamo.reset()
    (y0, g0), (y1, g1) = grads
    assert rel_err(y1, y0) < 1e-5 and len(g0) == len(g1) > 0
    assert all(rel_err(b, a) < 1e-4 for a, b in zip(g0, g1))

def _half_cast_case():
    """A layer whose filter norms differ by less than a bfloat16 step."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 12, 3, padding=1)
    with torch.no_grad():
        conv.weight.mul_(6.0 / conv.weight.abs().flatten(1).sum(1)[:, None, None, None])
        conv.weight[:, 0, 0, 0] += torch.randperm(12) * 1e-3  # norms 6.000 .. 6.011
    return DynamicConv2d.from_conv(conv, keep_ratio=0.5).eval()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_casts_keep_the_channel_ranking(dtype):
    from dynprune.nn import _ranking

    layer = _half_cast_case()
    ranking = _ranking(layer.gate.priority)
    assert not torch.equal(_ranking(layer.gate.priority.bfloat16()), ranking)  # a plain cast ties
    x = torch.randn(3, 6, 5, 5)
    with torch.no_grad():
        kept = layer(x).abs().sum((2, 3)) > 0
        low = copy.deepcopy(layer).to(dtype)
        assert low.gate.priority.dtype == dtype
        assert torch.equal(_ranking(low.gate.priority), ranking)
        assert torch.equal(low(x.to(dtype)).abs().sum((2, 3)) > 0, kept)
        back = copy.deepcopy(low).float()
        assert torch.equal(_ranking(back.gate.priority), ranking)
        # a float32 state_dict loaded into the 16-bit layer keeps it too
        fresh = copy.deepcopy(low)
        fresh.gate.priority.zero_()
        fresh.load_state_dict(layer.state_dict())
        assert torch.equal(_ranking(fresh.gate.priority), ranking)


def test_half_precision_converted_resnet_keeps_its_channels():
    """ResNet-20's filter norms sit closer than a float16 step: before the
    casts kept the ranking, .half() kept other channels (24% off)."""
    from dynprune.models import resnet20

    torch.manual_seed(0)
    model = dynprune.convert(resnet20(num_classes=10), keep_ratio=0.5).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
        half = copy.deepcopy(model).half()(x.half())
    assert rel_err(half.double(), ref) < 1e-2


class _StdConv2d(nn.Conv2d):
    """A conv with its own forward (weight standardisation, as in BiT/NFNet)."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


def test_convert_leaves_conv_subclasses_with_their_own_forward_dense():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), _StdConv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.utils.parametrizations.weight_norm(nn.Conv2d(8, 8, 3, padding=1)),
                          nn.ReLU()).eval()
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        ref = model(x)
    with pytest.warns(UserWarning, match="_StdConv2d"):
        dynprune.convert(model, keep_ratio=1.0)
    assert type(model[2]) is _StdConv2d
    assert isinstance(model[4], DynamicConv2d)  # parametrized: same forward, weight copied
    with torch.no_grad():
        assert rel_err(model(x), ref) < 1e-5


def test_convert_twice():
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                                       nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8),
                                       nn.ReLU())).eval()
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        ref = model(x)
        dynprune.convert(model, keep_ratio=1.0)
        # the dense stem (a Conv2dBN now) keeps its BN even when no longer skipped
        dynprune.convert(model, keep_ratio=1.0, skip_first=False)
        assert type(model[0]) is dynprune.nn.Conv2dBN and isinstance(model[3], DynamicConv2d)
        assert rel_err(model(x), ref) < 1e-5
        before = copy.deepcopy(model.state_dict())
        with pytest.raises(ValueError, match="already a DynamicConv2d with keep_ratio 1.0"):
            dynprune.convert(model, keep_ratio=0.5)
        assert model[3].keep_ratio == 1.0
        after = model.state_dict()
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) for k in before)


def test_convert_under_no_grad_then_infer():
    """convert()'s fx traces run the dense stem's forward (a Conv2dBN) with
    Proxies; under no_grad its BN-fold cache once kept them, and the next real
    forward raised fx's TraceError."""
    torch.manual_seed(0)
    model = randomize_bn(tiny_resnet()).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
        dynprune.convert(model, keep_ratio=1.0)
        assert rel_err(model(x), ref) < 1e-5


@pytest.mark.parametrize("affine", [True, False])
def test_convert_keeps_the_batchnorm_configuration(affine):
    """The fused BN keeps eps, momentum and affine=False (eps and momentum were
    reset to the defaults: 3% off with eps=0.1; affine=False raised)."""
    torch.manual_seed(0)

    def bn():
        b = nn.BatchNorm2d(8, eps=0.1, momentum=0.3, affine=affine)
        with torch.no_grad():
            b.running_mean.uniform_(-1, 1)
            b.running_var.uniform_(0.05, 0.5)
            if affine:
                b.weight.uniform_(0.5, 1.5)
                b.bias.uniform_(-1, 1)
        return b

    model = nn.Sequential(nn.Conv2d(3, 8, 3), bn(), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), bn(),
                          nn.ReLU()).eval()
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        ref = model(x)
    dynprune.convert(model, keep_ratio=1.0)
    assert type(model[0]) is dynprune.nn.Conv2dBN and isinstance(model[3], DynamicConv2d)
    for m in (model[0].bn, model[3].bn):
        assert (m.eps, m.momentum, m.affine) == (0.1, 0.3, affine)
    with torch.no_grad():
        assert rel_err(model(x), ref) < 1e-5


def test_from_conv_rejects_batchnorm_without_running_stats():
    with pytest.raises(ValueError, match="running statistics"):
        DynamicConv2d.from_conv(nn.Conv2d(3, 8, 3), bn=nn.BatchNorm2d(8, track_running_stats=False))


def test_autocast_computes_in_the_autocast_dtype():
    """Under torch.autocast a converted model runs as nn.Conv2d does there (it
    raised a dtype mismatch): eval and training, kept channels as in float32."""
    torch.manual_seed(0)
    layer = _half_cast_case()  # filter norms closer than a bfloat16 step
    x = torch.randn(3, 6, 5, 5)
    with torch.no_grad():
        kept = layer(x).abs().sum((2, 3)) > 0
        ref = copy.deepcopy(layer).double()(x.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y.abs().sum((2, 3)) > 0, kept)
    assert rel_err(y.double(), ref) < 3e-2

    model = randomize_bn(tiny_resnet())
    dynprune.convert(model, keep_ratio=0.5).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
    assert rel_err(y.double(), ref) < 3e-2
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x).float().square().mean() + 1e-3 * dynprune.saliency_loss(model)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_copies_after_training():
    """A trained model deep-copies and pickles (best-model snapshots, EMA): the
    last forward's saliency term, a non-leaf tensor, made deepcopy raise."""
    torch.manual_seed(0)
    model = dynprune.convert(randomize_bn(tiny_resnet()), keep_ratio=0.5).train()
    x = torch.randn(4, 3, 16, 16)
    loss = model(x).square().mean() + 1e-3 * dynprune.saliency_loss(model)
    loss.backward()
    snapshot = copy.deepcopy(model)
    assert float(dynprune.saliency_loss(snapshot)) == 0.0  # the copy carries no stale term
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    model.eval(), snapshot.eval(), loaded.eval()
    assert float(dynprune.saliency_loss(model)) == 0.0  # eval() dropped it too
    with torch.no_grad():
        assert torch.equal(snapshot(x), model(x)) and torch.equal(loaded(x), model(x))
