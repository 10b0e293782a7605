"""`dynprune-bench`: the speed tables a user can reproduce.

    dynprune-bench layers [--batch 1 16] [--keep 0.75 0.5 0.25] [--threads 2]
    dynprune-bench models [--models resnet18 ...] [--batch 1 16] [--threads 2]
    dynprune-bench demo

`layers` times, on the 3x3 layers of ResNet-18 (224 input) and VGG-16 (32x32
input), a dense nn.Conv2d against DynamicConv2d in eval mode, a static conv of
the kept size (the physical limit) and masking (dense conv times a mask). The
kept fraction applies to both input channels (zeroed per sample) and output
channels. The pytest-benchmark suite in benchmarks/ measures the same cases.
"""
from __future__ import annotations

import argparse
import ctypes
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from dynprune.nn import DynamicConv2d

# (name, channels, spatial size) of the 3x3 convs (channels in == out).
RESNET18_LAYERS = [("r18.l1", 64, 56), ("r18.l2", 128, 28), ("r18.l3", 256, 14), ("r18.l4", 512, 7)]
VGG16_LAYERS = [("vgg.b1", 64, 32), ("vgg.b2", 128, 16), ("vgg.b3", 256, 8), ("vgg.b4", 512, 4),
                ("vgg.b5", 512, 2)]
LAYERS = RESNET18_LAYERS + VGG16_LAYERS
PROVIDERS = ("dense", "dynamic", "static", "masked")


def zero_channels(x: torch.Tensor, keep: int, gen: torch.Generator) -> torch.Tensor:
    """x with all but ``keep`` random channels per sample set to zero."""
    n, c = x.shape[:2]
    mask = torch.zeros(n, c)
    for i in range(n):
        mask[i, torch.randperm(c, generator=gen)[:keep]] = 1.0
    return x * mask[:, :, None, None]


@torch.no_grad()
def layer_case(channels: int, size: int, batch: int, keep: float,
               seed: int = 0) -> Dict[str, Callable[[], torch.Tensor]]:
    """The four ways to run one layer at one keep ratio, as zero-arg callables."""
    gen = torch.Generator().manual_seed(seed)
    dense = nn.Conv2d(channels, channels, 3, padding=1).eval()
    dyn = DynamicConv2d.from_conv(dense, keep_ratio=keep).eval()
    dyn.gate.fc.weight.normal_(generator=gen)  # trained-looking gate: per-sample choices
    k = dyn.k
    kin = max(1, round(keep * channels))
    x = zero_channels(torch.randn(batch, channels, size, size, generator=gen), kin, gen)
    static = nn.Conv2d(kin, k, 3, padding=1).eval()
    xs = torch.randn(batch, kin, size, size, generator=gen)
    idx, _ = dyn.gate.select(dyn.gate.saliency(x), k)
    mask = torch.zeros(batch, channels).scatter_(1, idx, 1.0)[:, :, None, None]
    return {
        "dense": lambda: dense(x),
        "dynamic": lambda: dyn(x),
        "static": lambda: static(xs),
        "masked": lambda: dense(x) * mask,
    }


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> bool:
    """Have glibc's malloc reuse freed memory for blocks up to 32 MB; returns
    whether it took (False off glibc).

    Every benchmark harness calls this first. By default glibc maps large
    blocks afresh and hands freed ones back to the OS, with a threshold that
    moves with what the process freed before, so whether PyTorch's conv output
    page-faults on every 4 KB depends on the process's history. Measured
    (2026-11-28, batch 16, the dense 128->512 1x1 conv on 28x28 timed in turns
    with the kernel and a 64->256 static conv): 7,116 faults a call and 22.2
    ms, against 156 and 9.4 ms with this; the static conv 11.4 ms against 2.8.
    dynprune's own outputs reuse freed blocks either way (csrc/output_pool.cpp),
    so without this the baselines, not the kernel, paid for the allocator.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    # 32 MB is glibc's largest mmap threshold; larger blocks are still mapped.
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))


def interleaved_medians(fns: Dict[object, Callable[[], object]], budget_s: float = 1.0,
                        min_rounds: int = 5, max_rounds: int = 400,
                        run_rounds: Optional[Callable[[Callable[[], None], int], None]] = None
                        ) -> Dict[object, float]:
    """Median wall time (s) of each callable, timed in turns: each round calls every
    one once, in an order rotated by one each round.

    On a shared, noisy machine the load drifts over seconds; taking turns puts
    that drift on every provider alike, so their ratios hold even when the
    absolute times do not. ``run_rounds(one_round, rounds)`` may drive the
    rounds (pytest-benchmark's pedantic mode does, in benchmarks/).
    """
    keys = list(fns)
    for k in keys:  # warm-up: primitive caches, scratch buffers
        fns[k]()
    t0 = time.perf_counter()
    for k in keys:
        fns[k]()
    once = max(time.perf_counter() - t0, 1e-6)
    rounds = max(min_rounds, min(max_rounds, int(budget_s / once)))
    times = {k: [] for k in keys}
    turn = [0]

    def one_round() -> None:
        shift = turn[0] % len(keys)
        turn[0] += 1
        for k in keys[shift:] + keys[:shift]:
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)

    if run_rounds is None:
        for _ in range(rounds):
            one_round()
    else:
        run_rounds(one_round, rounds)
    return {k: statistics.median(v) for k, v in times.items()}


def ratio_rows(medians: Dict[Tuple, float], layers=LAYERS, batches=(1, 16),
               keeps=(0.75, 0.5, 0.25)) -> List[dict]:
    """Rows of ratios from ``{(layer, batch, provider, keep): seconds}``.

    ``dense`` is stored under each keep it was timed beside (or keep=1.0).
    """
    rows = []
    for name, c, s in layers:
        for b in batches:
            for keep in keeps:
                dense = medians.get((name, b, "dense", keep), medians.get((name, b, "dense", 1.0)))
                dyn = medians.get((name, b, "dynamic", keep))
                if dense is None or dyn is None:
                    continue
                static = medians[(name, b, "static", keep)]
                masked = medians[(name, b, "masked", keep)]
                rows.append({
                    "layer": name, "shape": f"{c}x{s}x{s}", "batch": b, "keep": keep,
                    "dense_ms": 1e3 * dense, "dynamic_ms": 1e3 * dyn, "static_ms": 1e3 * static,
                    "masked_ms": 1e3 * masked, "dyn_over_static": dyn / static,
                    "dense_over_dyn": dense / dyn, "masked_over_dyn": masked / dyn,
                })
    return rows


def format_rows(rows: Sequence[dict]) -> str:
    head = ("| layer | shape | batch | keep | dense ms | dynamic ms | static ms | masked ms "
            "| dyn/static | dense/dyn | masked/dyn |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(
            f"| {r['layer']} | {r['shape']} | {r['batch']} | {r['keep']} | {r['dense_ms']:.3f} "
            f"| {r['dynamic_ms']:.3f} | {r['static_ms']:.3f} | {r['masked_ms']:.3f} "
            f"| {r['dyn_over_static']:.2f} | {r['dense_over_dyn']:.2f} | {r['masked_over_dyn']:.2f} |")
    return "\n".join(lines)


def run_layers(batches, keeps, budget_s: float) -> List[dict]:
    from tqdm import tqdm

    medians = {}
    jobs = [(l, b, k) for l in LAYERS for b in batches for k in keeps]
    for (name, c, s), b, keep in tqdm(jobs, desc="layers", unit="case"):
        case = layer_case(c, s, b, keep)
        with torch.no_grad():
            got = interleaved_medians({p: case[p] for p in PROVIDERS}, budget_s)
        medians.update({(name, b, p, keep): t for p, t in got.items()})
    return ratio_rows(medians, batches=batches, keeps=keeps)


# ------------------------------------------------------------------ whole networks

MODEL_NAMES = ("resnet18", "resnet20", "resnet56", "vgg16")
REDUCTIONS = (0.5, 0.75)  # target fraction of executed MACs removed


def _bisect(f, target: float, lo: float, hi: float, steps: int = 12) -> float:
    """x in [lo, hi] with increasing f(x) ~= target."""
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        if f(mid) < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@torch.no_grad()
def model_case(name: str, batch: int, reductions=REDUCTIONS, seed: int = 0) -> dict:
    """Callables for the dense model, the dense model with the fast pool, and, per
    target MAC reduction, the converted model (keep ratio found by bisection on
    executed MACs) and the statically thinner model with the same MACs (width
    found likewise): the physical limit."""
    from dynprune import convert, flops
    from dynprune.convert import _fast_ops
    from dynprune.models import MODELS

    make, shape, classes = MODELS[name]
    torch.manual_seed(seed)
    dense = make(num_classes=classes).eval()
    x = torch.randn(batch, *shape)
    probe = x[:1]
    dense_macs = flops(dense, probe).dense_macs
    pooled = _clone(dense)
    _fast_ops(pooled)
    case = {"x": x, "dense": lambda: dense(x), "dense_pool": lambda: pooled(x), "rows": []}
    for red in reductions:
        def executed(keep):
            return flops(convert(_clone(dense), keep_ratio=keep), probe).ratio
        keep = round(_bisect(executed, 1 - red, 0.05, 1.0, 10), 3)
        dyn = convert(_clone(dense), keep_ratio=keep).eval()
        dyn_ratio = flops(dyn, probe).ratio

        def static_ratio(w):
            return flops(make(num_classes=classes, width=w).eval(), probe).dense_macs / dense_macs
        width = round(_bisect(static_ratio, dyn_ratio, 0.05, 1.0, 10), 3)
        # The limit gets all the fast path does but the pruning: BatchNorms folded
        # into dense convs (the large ones on the native kernel), pools, classifier.
        # (Pools and classifier alone, before session 25, left its BNs unfolded
        # and its stem page-faulting: 3-7% slower, ResNet-18/20, VGG-16.)
        static = convert(make(num_classes=classes, width=width),
                         filter_fn=lambda conv, name: False).eval()
        case["rows"].append({"reduction": red, "keep": keep, "executed": dyn_ratio,
                             "width": width, "static_macs": static_ratio(width)})
        case[("dynamic", red)] = (lambda m: lambda: m(x))(dyn)
        case[("static", red)] = (lambda m: lambda: m(x))(static)
    return case


def model_rows(medians: Dict[Tuple, float], infos: Dict[Tuple, dict]) -> List[dict]:
    """Rows from ``{(model, batch, provider, reduction): s}`` and the cases' keep/width."""
    rows = []
    for (name, batch), info in infos.items():
        dense = medians.get((name, batch, "dense", 0.0))
        pool = medians.get((name, batch, "dense_pool", 0.0))
        for r in info:
            dyn = medians.get((name, batch, "dynamic", r["reduction"]))
            static = medians.get((name, batch, "static", r["reduction"]))
            if None in (dense, pool, dyn, static):
                continue
            rows.append({"model": name, "batch": batch, "target": r["reduction"], "keep": r["keep"],
                         "fewer_macs": 1 - r["executed"], "width": r["width"],
                         "dense_ms": 1e3 * dense, "dense_pool_ms": 1e3 * pool,
                         "dynamic_ms": 1e3 * dyn, "static_ms": 1e3 * static,
                         "speedup": dense / dyn, "speedup_vs_dense_pool": pool / dyn,
                         "dyn_over_static": dyn / static})
    return rows


def format_model_rows(rows: Sequence[dict]) -> str:
    lines = ["| model | batch | keep | fewer MACs | dense ms | dense+pool ms | dynamic ms "
             "| static ms (width) | speedup | vs dense+pool | dyn/static |", "|" + "---|" * 11]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['keep']} | {100 * r['fewer_macs']:.1f}% "
            f"| {r['dense_ms']:.2f} | {r['dense_pool_ms']:.2f} | {r['dynamic_ms']:.2f} "
            f"| {r['static_ms']:.2f} ({r['width']}) | {r['speedup']:.2f} "
            f"| {r['speedup_vs_dense_pool']:.2f} | {r['dyn_over_static']:.2f} |")
    return "\n".join(lines)


def model_providers(case: dict) -> Dict[Tuple[str, float], Callable[[], object]]:
    """``{(provider, reduction): callable}`` of a :func:`model_case`."""
    fns = {("dense", 0.0): case["dense"], ("dense_pool", 0.0): case["dense_pool"]}
    for r in case["rows"]:
        for p in ("dynamic", "static"):
            fns[(p, r["reduction"])] = case[(p, r["reduction"])]
    return fns


def run_models(names, batches, budget_s: float) -> List[dict]:
    from tqdm import tqdm

    medians, infos = {}, {}
    for name in tqdm(names, desc="models", unit="model"):
        for b in batches:
            case = model_case(name, b)
            infos[(name, b)] = case["rows"]
            with torch.no_grad():
                got = interleaved_medians(model_providers(case), budget_s)
            medians.update({(name, b) + key: t for key, t in got.items()})
    return model_rows(medians, infos)


def demo() -> None:
    """Convert a ResNet-18, show outputs match at keep 1, time keep 0.5."""
    from dynprune import convert, flops
    from dynprune.convert import _fast_ops
    from dynprune.models import resnet18

    torch.manual_seed(0)
    model = resnet18(num_classes=1000).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref = model(x)
        same = convert(_clone(model), keep_ratio=1.0).eval()
        err = ((same(x) - ref).abs().max() / ref.abs().max()).item()
        print(f"ResNet-18, keep_ratio=1.0: max relative difference to nn.Conv2d model {err:.2e}")
        half = convert(_clone(model), keep_ratio=0.5).eval()
        report = flops(half, x)
        pooled = _clone(model)
        _fast_ops(pooled)  # the fast path's dense ops alone (pools, classifier): their share
        t = interleaved_medians({"dense": lambda: model(x), "pool": lambda: pooled(x),
                                 "half": lambda: half(x)}, 3.0)
        t_dense, t_pool, t_half = t["dense"], t["pool"], t["half"]
    print(f"keep_ratio=0.5: {report}")
    print(f"batch 1, {torch.get_num_threads()} threads: dense {1e3 * t_dense:.1f} ms, "
          f"dense with the fast pools and classifier {1e3 * t_pool:.1f} ms, "
          f"dynamic {1e3 * t_half:.1f} ms")
    print(f"speedup {t_dense / t_half:.2f}x over the dense model, "
          f"{t_pool / t_half:.2f}x over dense with the same pools and classifier")


def _clone(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="dynprune-bench", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("layers", help="layer-level speed table")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--keep", type=float, nargs="+", default=[0.75, 0.5, 0.25])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--budget", type=float, default=1.0,
                   help="seconds of timing per (layer, batch, keep), all providers in turns")
    p = sub.add_parser("models", help="whole-network speed table")
    p.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--budget", type=float, default=4.0,
                   help="seconds of timing per (model, batch), all providers in turns")
    sub.add_parser("demo", help="convert ResNet-18, check outputs, print speedup")
    args = parser.parse_args(argv)
    keep_freed_memory()
    if args.cmd == "layers":
        torch.set_num_threads(args.threads)
        print(format_rows(run_layers(args.batch, args.keep, args.budget)))
    elif args.cmd == "models":
        torch.set_num_threads(args.threads)
        print(format_model_rows(run_models(args.models, args.batch, args.budget)))
    else:
        demo()


if __name__ == "__main__":
    main()
