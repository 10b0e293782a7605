"""Whole-network speed: dense model vs converted model (fast path) vs a statically
thinner model with the same executed MACs (the limit), at ~50% and ~75% fewer
executed MACs. "dense_pool" is the dense model with the fast path's max-pool, to
show how much of the speedup comes from pruning alone.

The bar (batch 1): ~50% fewer MACs -> >= 1.8x over dense for ResNet-18 (224) and
VGG-16, >= 1.5x for ResNet-20; ~75% fewer -> >= 3x for ResNet-18.
"""
import functools
import pytest
import torch

from dynprune.bench import MODEL_NAMES, REDUCTIONS, model_case, rounds_for

BATCHES = (1, 16)
PROVIDERS = [("dense", 0.0), ("dense_pool", 0.0)] + [
    (p, r) for r in REDUCTIONS for p in ("dynamic", "static")]
CASES = [(m, b, p, r) for m in MODEL_NAMES for b in BATCHES for p, r in PROVIDERS]


@functools.lru_cache(maxsize=1)
def _case(name, batch):
    return model_case(name, batch)


@pytest.mark.parametrize("name,batch,provider,reduction", CASES,
                         ids=[f"{c[0]}-b{c[1]}-{c[2]}-{c[3]}" for c in CASES])
def test_model(benchmark, record_model, name, batch, provider, reduction):
    benchmark.group = f"{name} b{batch}"
    case = _case(name, batch)
    fn = case[provider] if provider.startswith("dense") else case[(provider, reduction)]
    with torch.no_grad():
        fn()
        benchmark.pedantic(fn, rounds=rounds_for(fn, 1.0, 5, 200), iterations=1, warmup_rounds=1)
    record_model((name, batch, provider, reduction), benchmark, case["rows"])
