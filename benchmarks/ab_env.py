"""A/B of a temporary environment toggle in the native kernels, in one process.

Usage:
    python benchmarks/ab_env.py VAR L:channels:size:batch:keep ... M:model:batch:reduction ...
           S:cin:cout:size:kernel:stride:batch ... [--reps R] [--rounds N]

(S: a layer of benchmarks/other_shapes.py, keep 0.5.)

For kernel experiments: the C++ side reads VAR (getenv once per call) to pick a
variant; remove the toggle before committing. "old" runs with VAR unset, "new"
with VAR=1, and their outputs must agree. Each timed call follows an untimed
dense call (caches as in the bench or inside a network), and the two variants
alternate which goes first: timing one variant right after the other on the
same layer favoured the second by 9-18% at batch 1 (ARCHITECTURE.md, "A/B
method"). Prints old/new time (> 1: new is faster) and both against the static
conv (or statically thinner model) timed the same way.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # other_shapes
from dynprune.bench import keep_freed_memory, layer_case, model_case  # noqa: E402


def case_for(spec: str):
    """(dynamic, dense, static) callables of an L:... layer or M:... model spec."""
    parts = spec.split(":")
    if parts[0] == "L":
        channels, size, batch = map(int, parts[1:4])
        case = layer_case(channels, size, batch, float(parts[4]))
        return case["dynamic"], case["dense"], case["static"]
    if parts[0] == "M":
        name, batch, red = parts[1], int(parts[2]), float(parts[3])
        case = model_case(name, batch, reductions=(red,))
        return case[("dynamic", red)], case["dense"], case[("static", red)]
    if parts[0] == "S":
        from other_shapes import case as shape_case
        cin, cout, size, kernel, stride, batch = map(int, parts[1:7])
        case = shape_case(cin, cout, size, kernel, stride, batch)
        return case["dynamic"], case["dense"], case["static"]
    raise SystemExit(f"bad spec {spec!r}: L:channels:size:batch:keep, M:model:batch:reduction "
                     "or S:cin:cout:size:kernel:stride:batch")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("var")
    ap.add_argument("specs", nargs="+")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    keep_freed_memory()

    def set_variant(new: bool) -> None:
        if new:
            os.environ[args.var] = "1"
        else:
            os.environ.pop(args.var, None)

    for spec in args.specs:
        dyn, dense, static = case_for(spec)
        with torch.no_grad():
            set_variant(False)
            a = dyn()
            set_variant(True)
            b = dyn()
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(a.abs().max())), \
                "the variants disagree"
            t0 = time.perf_counter()
            dense()
            dyn()
            rounds = args.rounds or max(10, min(300, int(3.0 / (time.perf_counter() - t0))))
            for _ in range(args.reps):
                times = {"old": [], "new": [], "static": [], "dense": []}
                for r in range(rounds):
                    for v in (("old", "new", "static") if r % 2 == 0 else ("new", "old", "static")):
                        dense()  # untimed: evicts as the bench and a network do
                        set_variant(v == "new")
                        fn = static if v == "static" else dyn
                        t = time.perf_counter()
                        fn()
                        times[v].append(time.perf_counter() - t)
                    t = time.perf_counter()
                    dense()
                    times["dense"].append(time.perf_counter() - t)
                m = {k: statistics.median(v) for k, v in times.items()}
                print(f"{spec}: old/new {m['old'] / m['new']:.3f}  "
                      f"dyn/static old {m['old'] / m['static']:.2f} new {m['new'] / m['static']:.2f}  "
                      f"dense/dyn old {m['dense'] / m['old']:.2f} new {m['dense'] / m['new']:.2f}  "
                      f"({rounds} rounds; ms old {m['old'] * 1e3:.3f} new {m['new'] * 1e3:.3f} "
                      f"static {m['static'] * 1e3:.3f} dense {m['dense'] * 1e3:.3f})", flush=True)
        set_variant(False)


if __name__ == "__main__":
    main()
