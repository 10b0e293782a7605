"""A/B run of the Triton kernel's variants on a GPU: one command for a short lease.

    python benchmarks/gpu_ab.py [--out DIR] [--ncu]

1. Correctness of every kernel variant (split reduction, 16-channel steps,
   64-bit offsets) at ResNet-18 sizes against the float64 reference.
2. Host time per call (the CPU side of a launch), by part, plus a cProfile of
   the whole call: plain timings of small layers measure this, not the GPU.
3. GPU time (CUDA graph replay) of each tuner candidate, with 32- and 64-bit
   offsets, on the ResNet-18 layers, float16, keep 0.5, batch 64 and 1; dense
   and static cuDNN beside; then the tuner's own pick.
4. With --ncu: Nsight Compute's summary of the conv kernel of 64x56x56 at
   batch 64, tile 128x32, gathering vs packed, where ncu is installed.
Prints short tables; writes everything to DIR/gpu_ab.json (and ncu.txt).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import math
import os
import pstats
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.testing

from dynprune.kernels import gated_conv as gc
from dynprune.ops import gated_conv2d_reference

LAYERS = [("r18.l1", 64, 56), ("r18.l2", 128, 28), ("r18.l3", 256, 14), ("r18.l4", 512, 7)]
DT = torch.float16
DEV = "cuda"
if not torch.cuda.is_available():  # a dry run of the script's own code (TRITON_INTERPRET=1)
    DEV, DT, LAYERS = "cpu", torch.float32, [("tiny", 32, 6)]


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def graph_ms(fn, rep=20):
    if DEV == "cuda":
        return triton.testing.do_bench_cudagraph(fn, rep=rep)
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def plain_ms(fn):
    if DEV == "cuda":
        return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
    return graph_ms(fn)


def case(c, size, batch, keep=0.5, seed=0, wt=True):
    g = torch.Generator().manual_seed(seed)
    k = math.ceil(keep * c)
    x = torch.randn(batch, c, size, size, generator=g)
    in_idx = torch.stack([torch.randperm(c, generator=g)[:k].sort().values for _ in range(batch)])
    listed = torch.zeros(batch, c, dtype=torch.bool).scatter_(1, in_idx, True)
    x = torch.where(listed[:, :, None, None], x, torch.zeros(()))
    w = torch.randn(c, c, 3, 3, generator=g) / (3 * math.sqrt(c))
    if wt:  # output channels contiguous: coalesced weight-tile loads
        w = w.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)
    out_idx = torch.stack([torch.randperm(c, generator=g)[:k].sort().values for _ in range(batch)])
    d = dict(x=x, w=w, b=torch.randn(c, generator=g), out_idx=out_idx,
             scale=torch.rand(batch, k, generator=g) + 0.5, in_idx=in_idx)
    d = {n: (t.to(DEV, DT) if t.is_floating_point() else t.to(DEV)) for n, t in d.items()}
    d["xs"] = torch.randn(batch, k, size, size, device=DEV, dtype=DT)
    d["ws"] = torch.randn(k, k, 3, 3, device=DEV, dtype=DT)
    return d


def call(d, config=None):
    return gc.gated_conv2d_triton(d["x"], d["w"], d["b"], d["out_idx"], d["scale"], d["in_idx"],
                                  (1, 1), (1, 1), (1, 1), True, config=config)


def cfg(bp, bco, bci, split=1, warps=None, stages=3, pack=0):
    warps = warps or (8 if bp * bco >= 16384 else 4)
    return gc._config(bp, bco, bci, warps, split, stages, pack)


PACKS = {0: "gather", 1: "packed", 2: "packed-coarse"}


def name(c):
    kw = c.kwargs
    return (f"P{kw['BLOCK_P']}xCO{kw['BLOCK_CO']}xCI{kw['BLOCK_CI']} w{c.num_warps}"
            f"{' s%d' % kw['SPLIT'] if kw['SPLIT'] > 1 else ''}"
            f"{' ' + PACKS[kw['PACK']] if kw.get('PACK') else ''}")


def check(rows):
    print("1. correctness (max-normalised error vs float64 reference, float16, batch 3):")
    ok = True
    for lname, c, size in LAYERS:
        d = case(c, size, 3, seed=1, wt=False)
        ref = gated_conv2d_reference(d["x"].double(), d["w"].double(), d["b"].double(),
                                     d["out_idx"], d["scale"].double(), d["in_idx"],
                                     (1, 1), (1, 1), (1, 1), True)
        errs = []
        for bci, split, wide, pack in [(32, 1, False, 0), (32, 4, False, 0), (16, 2, False, 0),
                                       (32, 1, True, 0), (32, 1, False, 1), (32, 4, False, 1),
                                       (32, 1, True, 1), (32, 1, False, 2)]:
            gc._FORCE_WIDE = wide
            try:  # the second call goes through the cached compiled kernels (_launch)
                y1 = call(d, cfg(32, 32, bci, split, pack=pack))
                y = call(d, cfg(32, 32, bci, split, pack=pack))
            finally:
                gc._FORCE_WIDE = False
            err = float((y.double() - ref).abs().max() / ref.abs().max())
            good = err < 1e-2 and not torch.isnan(y).any() and torch.equal(y, y1)
            ok &= good
            errs.append(f"ci{bci}/s{split}{'/64-bit' if wide else ''}/p{pack} {err:.1e}"
                        f"{'' if good else ' FAIL'}")
            rows.append(dict(part="check", layer=lname, block_ci=bci, split=split, wide=wide,
                             pack=pack, err=err))
        print(f"  {lname}: " + ", ".join(errs))
    return ok


def host_us(fn, n=300 if DEV == "cuda" else 2):
    fn()
    sync()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    dt = time.perf_counter() - t
    sync()
    return dt / n * 1e6


def host(rows):
    lname, c, size = LAYERS[0]
    print(f"2. host time per call, microseconds ({c}x{size}x{size}, batch 1, {DT}):")
    d = case(c, size, 1, wt=False)
    c0 = cfg(64, 32, 32)
    call(d, c0)
    launch = gc._Launch(d["x"], d["w"], d["b"], d["out_idx"], d["scale"], d["in_idx"], (1, 1),
                        (1, 1), (1, 1), True, None)
    launch.y.zero_()  # the conv kernel alone leaves pruned channels unwritten
    args = (*launch.tensors, launch.y, *launch.ints)
    grid = (triton.cdiv(launch.hw, 64), triton.cdiv(launch.k, 32), 1)
    jit = gc._gated_conv_kernel
    compiled = jit[grid](*args, **launch.consts, WIDE=launch.wide, **c0.all_kwargs())
    parts = {
        "F.conv2d dense": lambda: F.conv2d(d["x"], d["w"], None, 1, 1),
        "torch.zeros of y": lambda: torch.zeros_like(d["x"]),
        "_Launch (args, zeroed y)": lambda: gc._Launch(d["x"], d["w"], d["b"], d["out_idx"],
                                                       d["scale"], d["in_idx"], (1, 1), (1, 1),
                                                       (1, 1), True, None),
        "jit launch": lambda: jit[grid](*args, **launch.consts, WIDE=launch.wide,
                                        **c0.all_kwargs()),
        "whole call, given config": lambda: call(d, c0),
        "whole call, packed config": lambda: call(d, cfg(64, 32, 32, pack=1)),
        "pack() alone (2 buffers, 1 launch)": launch.pack,
        "torch.empty, packed input's size": lambda: torch.empty(
            (1, launch.hp * launch.wp, launch.ck), device=DEV, dtype=DT),
    }
    try:  # a compiled kernel launched directly: Triton-version dependent
        consts = [launch.consts[k] for k in ("KH", "KW", "HAS_BIAS", "HAS_SCALE", "RELU",
                                             "IS_FP32", "PRECISION", "UPCAST", "COUNT_GIVEN",
                                             "FLAT_Y")]
        full = (*args, *consts, *[c0.kwargs[k] for k in ("BLOCK_P", "BLOCK_CO", "BLOCK_CI",
                                                          "SPLIT")], launch.wide)
        runner = compiled[grid]
        y_ref = launch.y.clone()
        launch.y.zero_()
        runner(*full)
        sync()
        same = torch.equal(launch.y, y_ref)
        parts[f"compiled runner (output equal: {same})"] = lambda: runner(*full)
    except Exception as exc:
        print(f"  compiled runner: {type(exc).__name__}: {exc}")
    for label, fn in parts.items():
        us = host_us(fn)
        rows.append(dict(part="host", what=label, us=us))
        print(f"  {label:45} {us:7.1f}")
    for label, conf in (("given", c0), ("packed", cfg(64, 32, 32, pack=1))):
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(200 if DEV == "cuda" else 2):
            call(d, conf)
        prof.disable()
        sync()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(14)
        text = out.getvalue()
        rows.append(dict(part="cprofile", config=label, text=text))
        print(f"  cProfile, {label} config, 200 calls:")
        print("\n".join(line for line in text.splitlines()[6:24] if line.strip()))


def sweep(rows):
    print("3. GPU time (CUDA graph replay, us), float16, keep 0.5, kept inputs given, weight as"
          " nn.Conv2d stores it; every tuner candidate, best per kind (gathers, packed input"
          " and weights), the packing alone, then the tuner's own pick:")
    if DEV == "cuda":
        gc._SMS = torch.cuda.get_device_properties(0).multi_processor_count
    tuned = {}
    for lname, c, size in LAYERS:
        for batch in (64, 1):
            d = case(c, size, batch, wt=False)
            k, hw = d["out_idx"].shape[1], size * size
            x0 = torch.randn(batch, c, size, size, device=DEV, dtype=DT)
            w0 = torch.randn(c, c, 3, 3, device=DEV, dtype=DT)
            dense = graph_ms(lambda: F.conv2d(x0, w0, None, 1, 1), rep=30) * 1e3
            static = graph_ms(lambda: F.conv2d(d["xs"], d["ws"], None, 1, 1), rep=30) * 1e3
            launch = gc._Launch(d["x"], d["w"], d["b"], d["out_idx"], d["scale"], d["in_idx"],
                                (1, 1), (1, 1), (1, 1), True, None)
            best = {}
            cands = gc._candidates(batch, k, hw, k, False, launch.packed_w_size,
                                   launch.packed_x_size)
            if not any(c.kwargs.get("PACK") for c in cands):  # time the packed path anyway
                cands.append(cfg(64, 64 if k >= 64 else 32, 32, pack=1))
            for conf in cands:
                try:
                    call(d, conf)
                    t = graph_ms(lambda: call(d, conf), rep=10) * 1e3
                except Exception as exc:  # e.g. out of shared memory: the tuner skips those too
                    print(f"    {name(conf)}: {type(exc).__name__}")
                    continue
                kind = conf.kwargs.get("PACK", 0)
                rows.append(dict(part="sweep", layer=lname, batch=batch, config=name(conf),
                                 pack=kind, us=t))
                if t < best.get(kind, (1e30, None))[0]:
                    best[kind] = (t, conf)
            pack_us = graph_ms(launch.pack, rep=10) * 1e3
            call(d)  # the first call on this key runs the tuner
            pick = gc._CHOSEN.get(launch.key)
            t_pick = graph_ms(lambda: call(d), rep=30) * 1e3
            tuned[(lname, batch)] = pick
            rows.append(dict(part="summary", layer=lname, batch=batch, dense_us=dense,
                             static_us=static, tuned_us=t_pick, tuned=name(pick) if pick else None,
                             packing_us=pack_us,
                             **{f"best_{PACKS[kd]}": (bt, name(bc))
                                for kd, (bt, bc) in best.items()}))
            kinds = " | ".join(f"{PACKS[kd]} {bt:6.1f} {name(bc):26}" for kd, (bt, bc) in
                               sorted(best.items()))
            print(f"  {lname} b{batch:<3} dense {dense:6.1f} static {static:6.1f} | {kinds} | "
                  f"packing {pack_us:5.1f} | tuned {t_pick:6.1f}"
                  f" {name(pick) if pick else '?'} | dense/tuned {dense / t_pick:.2f} "
                  f"tuned/static {t_pick / static:.2f}", flush=True)
    return tuned


def prepare_blocks(rows):
    """_prepare_kernel alone at batch 64 with each block size changed in turn
    (rows per input block, taps per weight block, pixels per zero block)."""
    print("5. packing alone (CUDA graph replay, us), batch 64, by _prepare_kernel's blocks:")
    variants = {"rows1 taps9 zp64 (PACK=1)": (1, 0, 64), "rows4": (4, 0, 64), "taps1": (1, 1, 64),
                "zp256": (1, 0, 256), "rows4 taps1 zp256 (PACK=2)": (4, 1, 256)}
    for lname, c, size in LAYERS:
        d = case(c, size, 64, wt=False)
        launch = gc._Launch(d["x"], d["w"], d["b"], d["out_idx"], d["scale"], d["in_idx"],
                            (1, 1), (1, 1), (1, 1), True, None)
        cells = []
        for label, blocks in variants.items():
            us = graph_ms(lambda: launch.pack(blocks=blocks), rep=10) * 1e3
            rows.append(dict(part="prepare", layer=lname, variant=label, us=us))
            cells.append(f"{label} {us:6.1f}")
        us = graph_ms(lambda: launch.pack(zeros=False), rep=10) * 1e3
        rows.append(dict(part="prepare", layer=lname, variant="PACK=1 without zeros", us=us))
        print(f"  {lname}: " + " | ".join(cells) + f" | PACK=1 without zeros {us:6.1f}",
              flush=True)


def plain(rows, tuned):
    print("4. the tuned config, plain calls (do_bench) vs graph replay, us:")
    for (lname, batch), conf in tuned.items():
        c, size = next((c, s) for n, c, s in LAYERS if n == lname)
        d = case(c, size, batch, wt=False)
        p = plain_ms(lambda: call(d, conf)) * 1e3
        g = graph_ms(lambda: call(d, conf), rep=30) * 1e3
        rows.append(dict(part="plain", layer=lname, batch=batch, plain_us=p, graph_us=g))
        print(f"  {lname} b{batch:<3} plain {p:6.1f} graph {g:6.1f}")


def ncu_target(which):
    d = case(64, 56, 64, wt=False)
    call(d, cfg(128, 32, 32, pack=1 if which == "packed" else 0))
    sync()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--ncu", action="store_true")
    ap.add_argument("--ncu-target", choices=["gather", "packed"])
    a = ap.parse_args()
    if a.ncu_target:
        return ncu_target(a.ncu_target)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    card = torch.cuda.get_device_name() if DEV == "cuda" else "CPU dry run"
    print(f"{card}, torch {torch.__version__}, triton {triton.__version__},"
          f" ncu {shutil.which('ncu')}", flush=True)
    rows, t0 = [], time.time()
    try:
        if not check(rows):
            print("correctness FAILED: not timing")
            return 1
        for step in (host, sweep):
            try:
                res = step(rows)
            except Exception as exc:
                print(f"{step.__name__}: {type(exc).__name__}: {exc}")
                res = None
            print(f"   ({time.time() - t0:.0f} s)", flush=True)
            if step is sweep and res and all(res.values()):
                plain(rows, res)
        try:
            prepare_blocks(rows)
        except Exception as exc:
            print(f"prepare_blocks: {type(exc).__name__}: {exc}")
    finally:
        (out / "gpu_ab.json").write_text(json.dumps(rows, indent=1, default=str))
    if a.ncu and shutil.which("ncu"):
        text = ""
        for which in ("gather", "packed"):
            cmd = ["ncu", "--clock-control", "none", "-k",
                   "regex:_gated_conv_kernel|_packed_conv_kernel", "-c", "1",
                   "--section", "SpeedOfLight", "--section", "MemoryWorkloadAnalysis",
                   "--section", "Occupancy", "--section", "LaunchStats", sys.executable,
                   __file__, "--ncu-target", which]
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
                text += f"### {which}\n{r.stdout[-6000:]}\n{r.stderr[-2000:]}\n"
            except subprocess.TimeoutExpired:
                text += f"### {which}: ncu timed out\n"
        (out / "ncu.txt").write_text(text)
        keys = ("Duration", "Memory Throughput", "DRAM Throughput", "Compute (SM) Throughput",
                "Achieved Occupancy", "L1/TEX Hit", "L2 Hit", "Registers Per", "###", "Mem Busy",
                "Max Bandwidth", "Theoretical Occupancy", "Block Limit")
        print("\n".join(line for line in text.splitlines() if any(k in line for k in keys)))
    print(f"done in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
