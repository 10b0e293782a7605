"""Whole-network speed: dense model vs converted model (fast path) vs a statically
thinner model with the same executed MACs (the limit), at ~50% and ~75% fewer
executed MACs. "dense_pool" is the dense model with the fast path's dense ops
(max-pool, global average pool, classifier at small batch), to show how much of
the speedup comes from pruning alone.

One benchmark per (model, batch): each round runs every provider once, in turn
(dynprune.bench.interleaved_medians), so the drift of a shared machine hits
them alike.

The bar (batch 1): ~50% fewer MACs -> >= 1.8x over dense for ResNet-18 (224) and
VGG-16, >= 1.5x for ResNet-20; ~75% fewer -> >= 3x for ResNet-18.
"""
import pytest
import torch

from dynprune.bench import MODEL_NAMES, interleaved_medians, model_case, model_providers

BATCHES = (1, 16)
CASES = [(m, b) for m in MODEL_NAMES for b in BATCHES]


@pytest.mark.parametrize("name,batch", CASES, ids=[f"{m}-b{b}" for m, b in CASES])
def test_model(benchmark, record_model, name, batch):
    benchmark.group = f"{name} b{batch}"
    case = model_case(name, batch)
    with torch.no_grad():
        medians = interleaved_medians(
            model_providers(case), 6.0 if batch == 1 else 10.0, min_rounds=5,
            run_rounds=lambda one_round, rounds: benchmark.pedantic(
                one_round, rounds=rounds, iterations=1))
    for (provider, reduction), seconds in medians.items():
        record_model((name, batch, provider, reduction), benchmark, case["rows"], seconds)
