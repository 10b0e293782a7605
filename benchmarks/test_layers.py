"""Layer-level speed: dense nn.Conv2d vs DynamicConv2d (eval) vs static vs masking.

Kept fraction `keep` applies to input channels (zeroed per sample) and output
channels. The bar (keep 0.5): batch 1, DynamicConv2d <= 1.15x static and >= 2.5x
faster than dense on the ResNet-18 layers; batch 16, <= 1.3x static and >= 2x.

One benchmark per (layer, batch, keep): each round calls the four providers in
turn (dynprune.bench.interleaved_medians), so the drift of a shared machine
hits them alike; pytest-benchmark times the rounds, and each provider's median
goes to the ratio table and to the JSON's extra_info.
"""
import pytest
import torch

from dynprune.bench import LAYERS, PROVIDERS, interleaved_medians, layer_case

BATCHES = (1, 16)
KEEPS = (0.75, 0.5, 0.25)
CASES = [(name, c, s, b, k) for name, c, s in LAYERS for b in BATCHES for k in KEEPS]


@pytest.mark.parametrize("name,channels,size,batch,keep", CASES,
                         ids=[f"{c[0]}-b{c[3]}-{c[4]}" for c in CASES])
def test_layer(benchmark, record, name, channels, size, batch, keep):
    benchmark.group = f"{name} b{batch}"
    case = layer_case(channels, size, batch, keep)
    with torch.no_grad():
        medians = interleaved_medians(
            {p: case[p] for p in PROVIDERS}, 1.2, min_rounds=7,
            run_rounds=lambda one_round, rounds: benchmark.pedantic(
                one_round, rounds=rounds, iterations=1))
    for provider, seconds in medians.items():
        record((name, batch, provider, keep), benchmark, seconds)
