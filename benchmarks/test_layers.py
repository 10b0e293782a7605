"""Layer-level speed: dense nn.Conv2d vs DynamicConv2d (eval) vs static vs masking.

Kept fraction `keep` applies to input channels (zeroed per sample) and output
channels. The bar (keep 0.5): batch 1, DynamicConv2d <= 1.15x static and >= 2.5x
faster than dense on the ResNet-18 layers; batch 16, <= 1.3x static and >= 2x.

The cases run in an order that puts the providers of one (layer, batch, keep)
next to each other, so slow drift of a shared machine hits them alike.
"""
import pytest
import torch

from dynprune.bench import LAYERS, layer_case, rounds_for

BATCHES = (1, 16)
KEEPS = (0.75, 0.5, 0.25)
CASES = []
for _name, _c, _s in LAYERS:
    for _b in BATCHES:
        CASES.append((_name, _c, _s, _b, 1.0, "dense"))
        for _k in KEEPS:
            CASES += [(_name, _c, _s, _b, _k, p) for p in ("dynamic", "static", "masked")]


@pytest.mark.parametrize("name,channels,size,batch,keep,provider", CASES,
                         ids=[f"{c[0]}-b{c[3]}-{c[5]}-{c[4]}" for c in CASES])
def test_layer(benchmark, record, name, channels, size, batch, keep, provider):
    benchmark.group = f"{name} b{batch}"
    fn = layer_case(channels, size, batch, 0.5 if provider == "dense" else keep)[provider]
    with torch.no_grad():
        fn()  # warm-up outside the timer (primitive caches, scratch buffers)
        benchmark.pedantic(fn, rounds=rounds_for(fn, 0.4, 7, 400), iterations=1, warmup_rounds=2)
    record((name, batch, provider, keep), benchmark)
