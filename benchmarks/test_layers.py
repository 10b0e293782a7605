"""Layer-level speed: dense nn.Conv2d vs DynamicConv2d (eval) vs static vs masking.

Kept fraction `keep` applies to input channels (zeroed per sample) and output
channels. The bar (keep 0.5): batch 1, DynamicConv2d <= 1.15x static and >= 2.5x
faster than dense on the ResNet-18 layers; batch 16, <= 1.3x static and >= 2x.
"""
import pytest
import torch

from dynprune.bench import LAYERS, layer_case

BATCHES = (1, 16)
KEEPS = (0.75, 0.5, 0.25)


def _run(benchmark, fn):
    with torch.no_grad():
        fn()  # warm-up outside the timer (primitive caches, allocator)
        benchmark.pedantic(fn, rounds=_rounds(fn), iterations=1, warmup_rounds=2)


def _rounds(fn, budget_s=0.25):
    import time
    t0 = time.perf_counter()
    fn()
    return max(5, min(300, int(budget_s / max(time.perf_counter() - t0, 1e-6))))


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name,channels,size", LAYERS, ids=[l[0] for l in LAYERS])
def test_dense(benchmark, record, name, channels, size, batch):
    benchmark.group = f"{name} b{batch}"
    case = layer_case(channels, size, batch, 0.5)
    _run(benchmark, case["dense"])
    record((name, batch, "dense", 1.0), benchmark)


@pytest.mark.parametrize("provider", ["dynamic", "static", "masked"])
@pytest.mark.parametrize("keep", KEEPS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name,channels,size", LAYERS, ids=[l[0] for l in LAYERS])
def test_pruned(benchmark, record, name, channels, size, batch, keep, provider):
    benchmark.group = f"{name} b{batch}"
    case = layer_case(channels, size, batch, keep)
    _run(benchmark, case[provider])
    record((name, batch, provider, keep), benchmark)
