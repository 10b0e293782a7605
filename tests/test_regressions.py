"""Bugs found in review, each pinned by a test against the reference or nn.Conv2d."""
import copy

import pytest
import torch
import torch.nn as nn

import dynprune
from dynprune import DynamicConv2d
from dynprune.ops import channel_gate_reference


def test_bn_fold_follows_running_stats_after_training_forward():
    m = DynamicConv2d(4, 6, 3, padding=1, keep_ratio=1.0, batch_norm=True).eval()
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        m(x)  # fills the fold cache
    m.train()
    m(x * 3 + 1)  # moves the running stats in place (no version bump)
    m.eval()
    with torch.no_grad():
        assert torch.allclose(m(x), m.forward_dense(x), atol=1e-5)


def test_bn_fold_follows_eps_and_deepcopy():
    m = DynamicConv2d(4, 6, 3, padding=1, keep_ratio=1.0, batch_norm=True).eval()
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        m(x)
        m.bn.eps = 0.5
        assert torch.allclose(m(x), m.forward_dense(x), atol=1e-5)
        c = copy.deepcopy(m)
        assert c._fold_cache is None
        for t in (c.weight, c.bn.weight, c.bn.bias):
            t.mul_(1.5)
        assert torch.allclose(c(x), c.forward_dense(x), atol=1e-5)


def test_reused_conv_keeps_its_relu_separate():
    class Reuse(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.conv = nn.Conv2d(8, 8, 3, padding=1)
            self.relu = nn.ReLU()

        def forward(self, x):
            return self.conv(self.relu(self.conv(self.stem(x))))

    m = Reuse().eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = m(x)
        dynprune.convert(m, keep_ratio=1.0)
        assert not m.conv.fuse_relu
        assert torch.allclose(m(x), ref, atol=1e-5)


def test_sequential_subclass_is_not_bn_fused_without_a_graph():
    class Block(nn.Sequential):
        def forward(self, x):
            y = self[0](x)
            return self[1](y) + y  # the conv output has a second consumer

    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 6, 3, padding=1)
            self.block = Block(nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6))

        def forward(self, x):
            if x.sum() > 1e9:  # data-dependent: torch.fx cannot trace
                return x
            return self.block(self.stem(x))

    m = Untraceable()
    with torch.no_grad():
        m.block[1].running_mean.uniform_(-1, 1)
    m.eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = m(x)
        dynprune.convert(m, keep_ratio=1.0)
        assert isinstance(m.block[1], nn.BatchNorm2d)
        assert torch.allclose(m(x), ref, atol=1e-5)


def test_zero_kernel_size_is_a_clear_error():
    args = (torch.randn(1, 2, 4, 4), torch.randn(3, 2, 0, 3), None, torch.tensor([[0, 1]]))
    for fn in (dynprune.gated_conv2d, dynprune.gated_conv2d_reference):
        with pytest.raises(ValueError, match="kernel size"):
            fn(*args, None, None, (1, 1), (0, 0), (1, 1), False)


def test_nan_in_gate_ranks_like_the_reference():
    x = torch.ones(1, 2, 3, 3)
    gw = torch.zeros(2, 2)
    cases = [(torch.tensor([float("nan"), float("inf")]), torch.tensor([0.0, 1.0])),
             (torch.tensor([1.0, 1.0]), torch.tensor([1.0, float("nan")]))]
    for gb, prio in cases:
        w = torch.randn(2, 2, 1, 1)
        _, idx, _ = torch.ops.dynprune.dynamic_conv2d(x, w, None, gw, gb, prio, 1, None, [1, 1],
                                                     [0, 0], [1, 1], False)
        ref_idx, _ = channel_gate_reference(x, gw, gb, prio, 1)
        assert torch.equal(idx, ref_idx)


def test_nan_outside_in_idx_is_zero_everywhere():
    x = torch.randn(1, 3, 4, 4)
    x[0, 1] = float("nan")
    w, idx, in_idx = torch.randn(2, 3, 3, 3), torch.tensor([[0, 1]]), torch.tensor([[0, 2]])
    args = (w, None, idx, None, in_idx, (1, 1), (1, 1), (1, 1), False)
    y, ref = dynprune.gated_conv2d(x, *args), dynprune.gated_conv2d_reference(x, *args)
    assert torch.isfinite(ref).all() and torch.allclose(y, ref, atol=1e-5)


def test_epilogue_applies_scale_after_bias():
    x = torch.ones(1, 1, 1, 1)
    w, b = torch.full((1, 1, 1, 1), 1e30), torch.tensor([-1e30])
    args = (w, b, torch.tensor([[0]]), torch.tensor([[1e10]]), None, (1, 1), (0, 0), (1, 1), False)
    assert dynprune.gated_conv2d(x, *args).item() == dynprune.gated_conv2d_reference(x, *args).item()


@pytest.mark.parametrize("k", [13, 30])
@pytest.mark.parametrize("seed", range(4))
def test_gate_ties_rank_like_the_reference(seed, k):
    # Many equal saliencies (ReLU zeros, -0.0 next to +0.0) and equal
    # priorities: the kernel's integer keys must break ties like the reference
    # (saliency, then priority, then the lower index).
    gen = torch.Generator().manual_seed(seed)
    C, Cout = 6, 40
    x = torch.randn(3, C, 4, 4, generator=gen)
    gw = torch.zeros(Cout, C)
    gb = torch.randint(-2, 3, (Cout,), generator=gen).float()
    gb[gb == 0] = torch.tensor(-0.0) if seed % 2 else 0.0
    gb[::7] = -0.0
    prio = torch.randint(0, 3, (Cout,), generator=gen).float()
    prio[::5] = -0.0
    w = torch.randn(Cout, C, 3, 3, generator=gen)
    _, idx, _ = torch.ops.dynprune.dynamic_conv2d(x, w, None, gw, gb, prio, k, None, [1, 1],
                                                 [1, 1], [1, 1], False)
    ref_idx, _ = channel_gate_reference(x, gw, gb, prio, k)
    assert torch.equal(idx, ref_idx)
