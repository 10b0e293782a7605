"""The reference networks have the published sizes, and convert() keeps them exact."""
import pytest
import torch

import dynprune
from dynprune.models import MODELS

# Published multiply-accumulates per image (ResNet-18: He et al. 2016, 1.8 G;
# CIFAR ResNet-20/56: 41 M / 125 M; VGG-16 with BN on CIFAR: 313 M).
PUBLISHED_MMACS = {"resnet18": 1814, "resnet20": 40.8, "resnet56": 125.7, "vgg16": 313.2}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_size_and_keep_one_conversion(name):
    make, shape, classes = MODELS[name]
    model = make(num_classes=classes).eval()
    x = torch.randn(1, *shape)
    report = dynprune.flops(model, x)
    assert abs(report.dense_macs / 1e6 - PUBLISHED_MMACS[name]) / PUBLISHED_MMACS[name] < 0.01
    with torch.no_grad():
        ref = model(x)
        out = dynprune.convert(model, keep_ratio=1.0).eval()(x)
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-4


@pytest.mark.parametrize("name", sorted(MODELS))
def test_width_scales_channels(name):
    make, shape, classes = MODELS[name]
    full = dynprune.flops(make(num_classes=classes), torch.randn(1, *shape)).dense_macs
    half = dynprune.flops(make(num_classes=classes, width=0.5), torch.randn(1, *shape)).dense_macs
    assert 0.2 < half / full < 0.35  # ~1/4: both channel counts halve


def test_fashion_cnn_converts_and_skips_work():
    from dynprune.models import fashion_cnn

    model = fashion_cnn().eval()
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        ref = model(x)
        dense = dynprune.flops(model, x).dense_macs
        assert 60e6 < dense < 80e6  # ~72 M MACs: compute dominates at batch 1
    conv = dynprune.convert(model, keep_ratio=1.0).eval()
    with torch.no_grad():
        assert ((conv(x) - ref).abs().max() / ref.abs().max()).item() < 1e-4
        half = dynprune.convert(fashion_cnn(), keep_ratio=0.5).eval()
        assert dynprune.flops(half, x).ratio < 0.4
