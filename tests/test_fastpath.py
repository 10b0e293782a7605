"""The whole-network fast path: ReLU fused, kept channels handed on, faster pools."""
import copy
import io
import os

import pytest
import torch
import torch.nn as nn

import dynprune
import dynprune.nn as dnn
from dynprune.models import MODELS

from zoo import ZOO, randomize_bn, trained_looking


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


def both_paths(model, keep):
    """(fast-path model, per-layer model) converted alike from ``model``."""
    fast = dynprune.convert(copy.deepcopy(model), keep_ratio=keep)
    slow = dynprune.convert(copy.deepcopy(model), keep_ratio=keep, fast_path=False)
    slow.load_state_dict(trained_looking(fast).state_dict())
    return fast.eval(), slow.eval()


CASES = [(name, lambda f=f: f(), (3, 16, 16)) for name, f in sorted(ZOO.items())]
CASES += [("resnet20", lambda: MODELS["resnet20"][0](), (3, 32, 32)),
          ("vgg16", lambda: MODELS["vgg16"][0](), (3, 32, 32))]


@pytest.mark.parametrize("name,make,shape", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("keep", [1.0, 0.5])
def test_fast_path_equals_per_layer_path(name, make, shape, keep):
    fast, slow = both_paths(randomize_bn(make()), keep)
    x = torch.randn(3, *shape)
    with torch.no_grad():
        y = fast(x)
        assert torch.isfinite(y).all()
        assert rel_err(y, slow(x)) < 1e-5
    fast.train()  # training is untouched by the fast path
    slow.train()
    torch.manual_seed(0)
    a = fast(x)
    torch.manual_seed(0)
    assert rel_err(a, slow(x)) < 1e-5


def test_resnet_block_fuses_relu_and_hands_on_channels():
    model = randomize_bn(MODELS["resnet20"][0]())
    dynprune.convert(model, keep_ratio=0.5)
    trained_looking(model).eval()
    block = model.layer2[0]
    assert block.conv1.fuse_relu and not block.conv2.fuse_relu  # conv2 feeds the residual add
    assert isinstance(block.relu, dnn.ReLU)
    seen = {}
    block.conv2.register_forward_pre_hook(
        lambda m, args: seen.__setitem__("in_idx", dnn._kept_channels(args[0])))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    in_idx = seen["in_idx"]
    assert in_idx is not None and in_idx.shape == (2, block.conv1.k)


def test_in_place_change_voids_the_mark():
    conv = dynprune.DynamicConv2d(6, 6, 3, padding=1, keep_ratio=0.5).eval()
    with torch.no_grad():
        y = conv(torch.randn(1, 6, 5, 5))
        assert dnn._kept_channels(y) is not None
        y.add_(1.0)  # channels outside the kept set are no longer zero
        assert dnn._kept_channels(y) is None
        z = conv(y)
        ref = conv.forward_dense(y)
    assert rel_err(z, ref) < 1e-5


def test_relu_not_fused_when_output_has_other_consumers():
    class TwoUses(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.conv = nn.Conv2d(8, 8, 3, padding=1)
            self.relu = nn.ReLU()

        def forward(self, x):
            y = self.conv(self.stem(x))
            return self.relu(y) + y  # y is used raw too: fusing the ReLU would be wrong

    model = TwoUses()
    ref = copy.deepcopy(model).eval()
    dynprune.convert(model, keep_ratio=1.0).eval()
    assert not model.conv.fuse_relu
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert rel_err(model(x), ref(x)) < 1e-5



@pytest.mark.parametrize("edit", [nn.Identity, nn.Tanh])
def test_fused_relu_dropped_when_its_module_is_replaced(edit):
    # convert() fuses block.relu into conv1; replacing that module afterwards
    # must not leave conv1 applying a ReLU nobody asks for any more.
    model = randomize_bn(MODELS["resnet20"][0]()).eval()
    ref = copy.deepcopy(model)  # the unconverted network
    dynprune.convert(model, keep_ratio=1.0).eval()
    block = model.layer1[0]
    assert block.conv1.fuse_relu
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(model(x), ref(x)) < 1e-4  # the fused plan is built and cached
        before = ref(x)
        fused_relu, ref_relu = block.relu, ref.layer1[0].relu
        block.relu, ref.layer1[0].relu = edit(), edit()
        y, want = model(x), ref(x)
    assert rel_err(want, before) > 1e-2  # the edit changes the network's output
    assert rel_err(y, want) < 1e-4
    assert not block.conv1._fused_relu
    with torch.no_grad():  # the ReLU back where it was: fused again
        block.relu, ref.layer1[0].relu = fused_relu, ref_relu
        y = model(x)
    assert block.conv1._fused_relu
    assert rel_err(y, before) < 1e-4



def test_fused_relu_site_survives_copies():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
    ref = copy.deepcopy(model).eval()
    dynprune.convert(model, keep_ratio=1.0).eval()
    x = torch.randn(2, 3, 9, 9)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    copied = copy.deepcopy(model)
    with torch.no_grad():
        for m in (copied, loaded):  # whole-model copies: fused, and checked against the copy
            assert rel_err(m(x), ref(x)) < 1e-4 and m[1]._fused_relu
            m[2] = nn.Identity()
            assert rel_err(m(x), ref[3](ref[1](ref[0](x)))) < 1e-4  # no ReLU now
        assert rel_err(model(x), ref(x)) < 1e-4 and model[1]._fused_relu  # the original: untouched
        alone = copy.deepcopy(model[1])  # one conv copied out: no ReLU of its own
        h = model[0](x)
        assert (alone(h) < 0).any() and rel_err(alone(h), ref[1](h)) < 1e-4

    class NoCopy(nn.Identity):
        def __deepcopy__(self, memo):
            raise AssertionError("a sibling was copied")  # noqa

    model[3] = NoCopy()  # copying the conv alone must not copy its parent's other children
    assert copy.deepcopy(model[1])._relu_site == ()

def test_fused_relu_dropped_for_a_forward_hook():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.ReLU())
    dynprune.convert(model, keep_ratio=1.0).eval()
    assert model[1].fuse_relu
    seen = []
    model[1].register_forward_hook(lambda m, args, out: seen.append(out.clone()))
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        y = model(x)
        raw = model[1].forward_dense(model[0](x))
    # the hook sees the conv's own output, as in training, and the ReLU still runs
    assert (seen[0] < 0).any() and rel_err(seen[0], raw) < 1e-5
    assert rel_err(y, torch.relu(raw)) < 1e-5
    assert model[1].fuse_relu  # the conv's setting stands; only this call ran unfused
    model[1]._forward_hooks.clear()
    inputs = []  # a hook on the ReLU sees its input as in training: the raw conv output
    model[2].register_forward_pre_hook(lambda m, args: inputs.append(args[0].clone()))
    with torch.no_grad():
        assert rel_err(model(x), torch.relu(raw)) < 1e-5
    assert (inputs[0] < 0).any() and rel_err(inputs[0], raw) < 1e-5

@pytest.mark.parametrize("shape,k,s,p,d", [
    ((2, 5, 13, 11), 3, 2, 1, 1), ((1, 4, 8, 8), 2, 2, 0, 1), ((1, 3, 9, 10), (3, 2), (1, 3), (1, 1), 1),
    ((2, 2, 15, 12), 3, 1, 1, 2), ((1, 70, 5, 7), 5, 3, 2, 1), ((3, 1, 4, 4), 4, 4, 0, 1),
    # 2x2 windows with stride 2 take their own path: odd sizes (floor), 2x2
    # maps, and enough planes to be split between threads
    ((2, 6, 7, 9), 2, 2, 0, 1), ((1, 9, 2, 2), 2, 2, 0, 1), ((2, 2100, 4, 4), 2, 2, 0, 1),
    # 3-wide windows with stride 2 take vector column steps: 16 outputs at a
    # time and a partial last one
    ((2, 3, 40, 70), 3, 2, 1, 1), ((1, 2, 9, 37), 3, 2, 1, 1), ((1, 2, 8, 33), 3, 2, 0, 1),
    ((1, 2, 6, 64), (2, 3), 2, (1, 1), 1)])
@pytest.mark.parametrize("grad", [False, True])
def test_maxpool_matches(shape, k, s, p, d, grad):
    """The native NCHW pool (no autograd) and the channels_last route (autograd)."""
    assert dnn._max_pool2d_or_none is not None or dynprune.backends()["cpu"] != "native"
    x = torch.randn(*shape)
    x.view(-1)[::7] = float("-inf")
    x.view(-1)[5] = float("nan")  # NaN propagates, as in PyTorch
    x.requires_grad_(grad)
    got, ref = dnn.MaxPool2d(k, s, p, d)(x), nn.MaxPool2d(k, s, p, d)(x)
    assert torch.equal(got.isnan(), ref.isnan())
    assert torch.equal(got.nan_to_num(), ref.nan_to_num())
    assert got.requires_grad == grad


def test_maxpool_window_larger_than_the_input_raises_like_pytorch():
    x = torch.randn(1, 2, 2, 2)  # (2 - 3) / 2 + 1: no output, not one rounded up
    with pytest.raises(RuntimeError):
        nn.MaxPool2d(3, 2)(x)
    with torch.no_grad(), pytest.raises((ValueError, RuntimeError), match="too small"):
        dnn.MaxPool2d(3, 2)(x)


def test_maxpool_falls_back_for_other_inputs():
    x = torch.randn(2, 3, 9, 9)
    for pool, inp in [(dnn.MaxPool2d(3, 2, ceil_mode=True), x), (dnn.MaxPool2d(2), x.double()),
                      (dnn.MaxPool2d(2), x.to(memory_format=torch.channels_last)),
                      (dnn.MaxPool2d(3, 2, return_indices=True), x)]:
        ref = nn.MaxPool2d(pool.kernel_size, pool.stride, pool.padding, pool.dilation,
                           pool.return_indices, pool.ceil_mode)
        got, want = pool(inp), ref(inp)
        if pool.return_indices:
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        else:
            assert torch.equal(got, want)
    with pytest.raises(RuntimeError, match="pad should be at most half"):
        dnn.MaxPool2d(2, 2, 2)(x)


def test_inference_mode_and_grad_mode_agree():
    """inference_mode (no version counters: no chaining), no_grad (native call
    without the autograd kernel) and grad mode (differentiable) give one result."""
    model = randomize_bn(MODELS["resnet20"][0]())
    dynprune.convert(model, keep_ratio=0.5)
    trained_looking(model).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a = model(x)
    with torch.inference_mode():
        b = model(x)
    c = model(x)
    c.sum().backward()
    assert rel_err(b, a) < 1e-6 and rel_err(c.detach(), a) < 1e-6
    assert model.layer1[0].conv1.weight.grad is not None


# ------------------------------------------------------------- the network head


def count_calls(monkeypatch, name):
    """Counts the calls of dynprune.nn's native entry ``name`` (if built)."""
    calls = []
    fn = getattr(dnn, name)
    if fn is not None:
        monkeypatch.setattr(dnn, name, lambda *a: calls.append(1) or fn(*a))
    return calls, fn is not None


@pytest.mark.parametrize("shape", [(1, 512, 7, 7), (3, 5, 1, 1), (2, 17, 3, 11), (0, 4, 2, 2),
                                   (16, 64, 8, 8)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_global_avg_pool_matches_float64_mean(shape, layout, monkeypatch):
    calls, native = count_calls(monkeypatch, "_head_avg_pool")
    x = torch.randn(*shape) * 3 + 1
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = torch.randn(shape[0], shape[1] + 2, shape[2], shape[3])[:, 1:-1]
    pool = dnn.AdaptiveAvgPool2d(1)
    with torch.no_grad():
        got = pool(x)
    ref = x.double().mean((2, 3), keepdim=True)
    assert got.shape == ref.shape and got.dtype == torch.float32
    if ref.numel():
        assert (got.double() - ref).abs().max().item() <= 1e-6 * ref.abs().max().item() + 1e-7
    assert len(calls) == native  # the native path, where built


def test_global_avg_pool_falls_back_and_keeps_autograd():
    x = torch.randn(2, 3, 6, 5)
    for size, inp in [((2, 1), x), (1, x.double()), ((1, None), x)]:
        assert torch.equal(dnn.AdaptiveAvgPool2d(size)(inp), nn.AdaptiveAvgPool2d(size)(inp))
    xg = x.clone().requires_grad_()
    dnn.AdaptiveAvgPool2d((1, 1))(xg).sum().backward()
    assert torch.allclose(xg.grad, torch.full_like(x, 1 / 30))


@pytest.mark.parametrize("n", [0, 1, 2, 5, 16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("sizes", [(512, 1000), (7, 5), (1280, 1000), (513, 1001)])
def test_small_batch_linear_matches_float64(n, bias, sizes, monkeypatch):
    calls, native = count_calls(monkeypatch, "_head_linear")
    fc = dnn.Linear(*sizes, bias=bias)
    x = torch.randn(n, sizes[0] + 3)[:, 2:-1]  # not contiguous
    with torch.no_grad():
        got = fc(x)
    ref = torch.nn.functional.linear(x.double(), fc.weight.double(),
                                     fc.bias.double() if bias else None)
    assert got.shape == (n, sizes[1]) and got.dtype == torch.float32 and len(calls) == native
    if n:
        assert ((got.double() - ref).abs().max() / ref.abs().max()).item() < 2e-6


def test_linear_falls_back_for_large_batches_other_ranks_and_autograd():
    fc = dnn.Linear(32, 8)
    ref = nn.Linear(32, 8)
    ref.load_state_dict(fc.state_dict())
    for x in [torch.randn(dnn.LINEAR_NATIVE_MAX_BATCH + 1, 32), torch.randn(2, 3, 32),
              torch.randn(2, 32).double()]:
        with torch.no_grad():
            if x.dtype == torch.float64:
                fc.double(), ref.double()
            assert torch.equal(fc(x), ref(x))
    fc.float()
    x = torch.randn(1, 32, requires_grad=True)
    fc(x).sum().backward()  # grad mode: nn.Linear, differentiable
    assert x.grad is not None and fc.weight.grad is not None
    with pytest.raises(RuntimeError):
        with torch.no_grad():
            fc(torch.randn(1, 31))  # wrong width: nn.Linear's error


def test_native_head_ops_reject_bad_input():
    if dnn._head_linear is None:
        pytest.skip("native extension not built")
    from dynprune import _C
    with pytest.raises(ValueError, match="2-D"):
        _C.linear_small_batch(torch.randn(2, 3, 4), torch.randn(5, 4), None)
    with pytest.raises(ValueError, match="weight must be"):
        _C.linear_small_batch(torch.randn(2, 4), torch.randn(5, 3), None)
    with pytest.raises(TypeError, match="float32"):
        _C.linear_small_batch(torch.randn(2, 4).double(), torch.randn(5, 4).double(), None)
    with pytest.raises(ValueError, match="bias must be"):
        _C.linear_small_batch(torch.randn(2, 4), torch.randn(5, 4), torch.randn(4))
    with pytest.raises(ValueError, match="4-D"):
        _C.global_avg_pool2d_nchw(torch.randn(2, 3, 4))
    with pytest.raises(TypeError, match="float32"):
        _C.global_avg_pool2d_nchw(torch.randn(2, 3, 4, 4).double())
    # The modules' entries decline (None) instead, and the module runs PyTorch's.
    w = torch.randn(5, 4)
    assert _C.head_linear(torch.randn(5, 4), w, None, 4) is None  # batch over the limit
    assert _C.head_linear(torch.randn(2, 3), w, None, 4) is None  # width mismatch
    assert _C.head_linear(torch.randn(2, 4), w, torch.randn(4), 4) is None  # bias size
    assert _C.head_linear(torch.randn(2, 4).double(), w.double(), None, 4) is None
    assert _C.head_linear(torch.randn(2, 4, requires_grad=True), w, None, 4) is None
    with torch.no_grad():
        assert _C.head_linear(torch.randn(2, 4, requires_grad=True), w, None, 4) is not None
    assert _C.head_avg_pool(torch.randn(2, 3, 4)) is None
    assert _C.head_avg_pool(torch.randn(2, 3, 0, 4)) is None
    assert _C.head_avg_pool(torch.randn(2, 3, 4, 4, requires_grad=True)) is None


def test_convert_gives_the_head_fast_ops_and_keeps_parameters_and_hooks():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 4))
    ref = copy.deepcopy(model).eval()
    seen = []
    model[4].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    weight, keys = model[4].weight, set(model.state_dict())
    dynprune.convert(model, keep_ratio=1.0)
    assert type(model[2]) is dnn.AdaptiveAvgPool2d and type(model[4]) is dnn.Linear
    assert model[4].weight is weight and keys <= set(model.state_dict())
    gate_fc = model[1].gate.fc
    assert type(gate_fc) is nn.Linear  # the gates' own layers are left alone
    x = torch.randn(1, 3, 12, 12)
    with torch.no_grad():
        assert rel_err(model.eval()(x), ref(x)) < 1e-5
    assert seen == [torch.Size([1, 4])]


def test_maxpool_native_entry_reads_module_arguments_or_declines():
    if dnn._max_pool2d_or_none is None:
        pytest.skip("native extension not built")
    x = torch.randn(2, 3, 11, 10)
    for args in [(3, None, 1, 1), ((3, 2), (2, 1), (1, 0), 1), (2, [], 0, (1, 2)), (3, 2, 1, 1)]:
        pool = dnn.MaxPool2d(*args)
        with torch.no_grad():
            got = dnn._max_pool2d_or_none(x, pool.kernel_size, pool.stride, pool.padding,
                                          pool.dilation)
        ref = nn.MaxPool2d(args[0], args[1] or None, args[2], args[3])(x)
        assert got is not None and torch.equal(got, ref)
    entry = dnn._max_pool2d_or_none
    assert entry(x.transpose(2, 3), 3, 2, 1, 1) is None  # not contiguous
    assert entry(x.double(), 3, 2, 1, 1) is None
    assert entry(x[0], 3, 2, 1, 1) is None  # 3-D
    assert entry(x, 2, 2, 2, 1) is None  # padding over half the window: nn.MaxPool2d's error
    assert entry(x.clone().requires_grad_(), 3, 2, 1, 1) is None


def _cpu_has_avx512():
    """What the native kernels check (gated_conv2d's has_avx512): without it the
    depthwise kernel declines and F.conv2d computes."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return (all(f in flags for f in ("avx512f", "avx512bw", "avx512vl", "avx512dq"))
            and "DYNPRUNE_DISABLE_AVX512" not in os.environ)


def _depthwise_bn(c, stride, bias, k=3):
    conv = nn.Conv2d(c, c, k, stride=stride, padding=k // 2, groups=c, bias=bias)
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    return dnn.Conv2dBN.from_conv(conv, bn).eval()


@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
def test_depthwise_native_matches_float64(k, stride, bias):
    """Conv2dBN's native depthwise 3x3 / 5x5 against F.conv2d + BatchNorm in
    float64, on random shapes (odd sizes, 1-pixel maps, several planes a thread)."""
    gen = torch.Generator().manual_seed(k * 4 + stride * 2 + bias)
    for _ in range(25):
        n, c = (int(v) for v in torch.randint(1, 5, (2,), generator=gen))
        c = c * int(torch.randint(1, 20, (), generator=gen)) + 1  # groups > 1: depthwise
        h, w = (int(v) for v in torch.randint(1, 40, (2,), generator=gen))
        layer = _depthwise_bn(c, stride, bias, k)
        x = torch.randn(n, c, h, w, generator=gen)
        ref = copy.deepcopy(layer).double()
        ref.train(False)
        with torch.no_grad():
            want = ref.bn(ref._conv_forward(x.double(), ref.weight, ref.bias))

            def no_fallback(*args):
                raise AssertionError("F.conv2d ran: the native depthwise declined")
            if _cpu_has_avx512():
                layer._conv_forward = no_fallback
            y = layer(x)
        assert y.shape == want.shape
        assert ((y.double() - want).abs().max() / want.abs().max()).item() < 1e-5


def test_depthwise_native_declines_what_it_does_not_cover():
    from dynprune._C import depthwise_or_none

    x, w, b = torch.randn(2, 4, 6, 6), torch.randn(4, 1, 3, 3), torch.randn(4)
    for weight, pad in ((w, 1), (torch.randn(4, 1, 5, 5), 2)):
        got = depthwise_or_none(x, weight, b, 4, [2, 2], [pad, pad], [1, 1])
        assert (got is not None) == _cpu_has_avx512()
    for args in ([x, w, b, 4, [1, 1], [0, 0], [1, 1]],                # padding 0
                 [x, w, b, 4, [3, 3], [1, 1], [1, 1]],                # stride 3
                 [x, w, b, 4, [1, 1], [1, 1], [2, 2]],                # dilation 2
                 [x, torch.randn(4, 1, 5, 5), b, 4, [1, 1], [1, 1], [1, 1]],  # 5x5, padding 1
                 [x, torch.randn(4, 1, 7, 7), b, 4, [1, 1], [3, 3], [1, 1]],  # 7x7
                 [x, torch.randn(8, 1, 3, 3), None, 4, [1, 1], [1, 1], [1, 1]],  # multiplier 2
                 [x.double(), w.double(), None, 4, [1, 1], [1, 1], [1, 1]],
                 [x.transpose(2, 3), w, b, 4, [1, 1], [1, 1], [1, 1]],  # not contiguous
                 [x.requires_grad_(), w, b, 4, [1, 1], [1, 1], [1, 1]]):
        assert depthwise_or_none(*args) is None
    # the module still computes those through F.conv2d
    layer = _depthwise_bn(4, 1, True)
    xt = torch.randn(2, 4, 6, 6).transpose(2, 3)
    with torch.no_grad():
        want = layer.bn(layer._conv_forward(xt, layer.weight, layer.bias))
        assert torch.allclose(layer(xt), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k,act", [(3, nn.ReLU6), (5, nn.Hardswish), (3, nn.SiLU)])
def test_depthwise_skips_channels_outside_the_mark(k, act):
    """DynamicConv2d -> activation -> depthwise Conv2dBN (a MobileNet or
    EfficientNet block): the activation hands on the kept-channel mark and the
    depthwise kernel writes the bias alone for the other channels, equal to
    computing them."""
    from dynprune.nn import _kept_channels
    from dynprune._C import depthwise_or_none

    torch.manual_seed(k)
    expand = dnn.DynamicConv2d(8, 24, 1, keep_ratio=0.4, batch_norm=True).eval()
    with torch.no_grad():
        expand.gate.fc.weight.normal_()
    model = nn.Sequential(expand, act(inplace=True), _depthwise_bn(24, 2, True, k))
    dynprune.convert(model, keep_ratio=0.4, filter_fn=lambda conv, name: False)
    assert type(model[1]) is getattr(dnn, act.__name__) and model[1].inplace
    dw = model[2]
    x = torch.randn(3, 8, 11, 13)
    with torch.no_grad():
        h = model[1](expand(x))
        kept = _kept_channels(h)
        assert kept is not None and kept.shape == (3, expand.k)  # the mark survived the clamp
        y = dw(h)
        ref = copy.deepcopy(dw).double()
        want = ref.bn(ref._conv_forward(h.double(), ref.weight, ref.bias))
        assert ((y.double() - want).abs().max() / want.abs().max()).item() < 1e-5
        if _cpu_has_avx512():  # the skipping entry itself: a non-zero channel outside the list
            w, b = dw.inference_params()
            h2 = h.clone()
            pruned = [c for c in range(24) if c not in kept[0].tolist()][0]
            h2[0, pruned] = 1.0  # ignored: the list says it is zero
            got = depthwise_or_none(h2, w, b, 24, [2, 2], [k // 2] * 2, [1, 1], kept)
            assert torch.equal(got[0, pruned], torch.full_like(got[0, pruned], float(b[pruned])))
            bad = kept.clone()
            bad[0, 0] = 24
            assert depthwise_or_none(h, w, b, 24, [2, 2], [k // 2] * 2, [1, 1], bad) is None
