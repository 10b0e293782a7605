"""The Triton gated convolution against the reference op.

Without a GPU (CI) these run under Triton's CPU interpreter (TRITON_INTERPRET=1,
set in conftest.py): the same kernel source, the same index handling and
masks, executed with numpy. Tolerances per dtype, relative to max |reference|
computed in float64 from the same rounded inputs:
  float32 -> TF32 tensor cores on a GPU: 5e-3 (the interpreter: 1e-3; it is exact to ~1e-6)
  float16 -> 1e-2, bfloat16 -> 2e-2 (products rounded to the storage type's
  precision, sums in float32).
"""
import random

import pytest
import torch

from conftest import max_rel_err
from dynprune.kernels.gated_conv import (active_channels, dynamic_conv2d_triton,
                                         gated_conv2d_triton)
from dynprune.ops import dynamic_conv2d_reference, gated_conv2d_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# TF32 rounds both factors to 10-bit mantissas (2^-11 each): on an H200 a small
# case measured 2.1e-3, so float32 gets 5e-3 on a GPU; the interpreter multiplies
# exactly, so 1e-3 holds there.
TOL = {torch.float32: 5e-3 if DEVICE == "cuda" else 1e-3, torch.float16: 1e-2,
       torch.bfloat16: 2e-2}


def random_case(rng: random.Random, gen: torch.Generator, dtype, cin_range=(1, 20)):
    n = rng.choice([1, 2, 3])
    cin, cout = rng.randint(*cin_range), rng.randint(1, 24)
    kh, kw = rng.choice([(1, 1), (3, 3), (5, 5), (3, 1)])
    sh, sw = rng.choice([1, 2]), rng.choice([1, 2])
    dh, dw = rng.choice([1, 2]), rng.choice([1, 2])
    ph, pw = rng.randint(0, kh // 2 * dh), rng.randint(0, kw // 2 * dw)
    h = rng.randint(max(1, dh * (kh - 1) + 1 - 2 * ph), 11)
    w = rng.randint(max(1, dw * (kw - 1) + 1 - 2 * pw), 11)
    x = torch.randn(n, cin, h, w, generator=gen)
    for i in range(n):  # random zero input channels per sample
        x[i, torch.randperm(cin, generator=gen)[:rng.randint(0, cin)]] = 0
    weight = torch.randn(cout, cin, kh, kw, generator=gen) / (cin * kh * kw) ** 0.5
    bias = torch.randn(cout, generator=gen) if rng.random() < 0.7 else None
    k = rng.randint(1, cout)
    out_idx = torch.stack([torch.randperm(cout, generator=gen)[:k].sort().values for _ in range(n)])
    out_scale = torch.rand(n, k, generator=gen) + 0.5 if rng.random() < 0.7 else None
    in_idx = None
    if rng.random() < 0.4:  # given input lists (the chaining case)
        kin = rng.randint(1, cin)
        in_idx = torch.stack([torch.randperm(cin, generator=gen)[:kin].sort().values
                              for _ in range(n)])
    args = [x, weight, bias, out_idx, out_scale, in_idx]
    cast = [t.to(DEVICE, dtype) if t is not None and t.is_floating_point() else
            (t.to(DEVICE) if t is not None else None) for t in args]
    geo = ((sh, sw), (ph, pw), (dh, dw), rng.random() < 0.5)
    return cast, geo


def reference64(args, geo):
    x, weight, bias, out_idx, out_scale, in_idx = args
    d = [t.double() if t is not None and t.is_floating_point() else t for t in args]
    return gated_conv2d_reference(*d, *geo)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seed", range(12))
def test_triton_matches_reference_on_random_cases(seed, dtype):
    rng, gen = random.Random(seed), torch.Generator().manual_seed(1000 + seed)
    args, geo = random_case(rng, gen, dtype)
    ref = reference64(args, geo)
    out = torch.full(ref.shape, float("nan"), dtype=dtype, device=DEVICE)  # poisoned
    y = gated_conv2d_triton(*args, *geo, out=out)
    assert y.data_ptr() == out.data_ptr()
    assert not torch.isnan(y).any(), "an output element was not written"
    assert max_rel_err(y, ref) < TOL[dtype], (seed, dtype, [t.shape if t is not None else None
                                                           for t in args], geo)
    # pruned channels are exact zeros
    kept = torch.zeros(ref.shape[:2], dtype=torch.bool, device=DEVICE).scatter(1, args[3], True)
    assert (y[~kept] == 0).all()
    # the allocating variant agrees
    assert torch.equal(gated_conv2d_triton(*args, *geo), y)


def test_active_channels_are_found_on_the_device_in_order():
    x = torch.randn(3, 6, 4, 4)
    x[0, [1, 4]] = 0
    x[1] = 0
    x[2, 3] = 0
    x[2, 3, 1, 1] = float("nan")  # NaN counts as non-zero
    lists, counts = active_channels(x)
    assert counts.tolist() == [4, 0, 6]
    assert lists[0, :4].tolist() == [0, 2, 3, 5]
    assert lists[2].tolist() == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("seed", range(3))
def test_active_channel_kernels_match_a_stable_sort(seed):
    """The two detection kernels (a scan per channel that stops at the first
    non-zero block, a prefix sum per sample) against the torch formulation:
    random zero channels, channels-last input, a NaN, and maps longer than one
    scan block whose only non-zero is the last element."""
    from dynprune.kernels import gated_conv as gc
    gen = torch.Generator().manual_seed(seed)
    for n, c, h, w in [(3, 37, 5, 7), (2, 5, 45, 47), (1, 70, 1, 1)]:
        x = torch.randn(n, c, h, w, generator=gen)
        x[torch.rand(n, c, generator=gen) < 0.5] = 0
        x[0, 0] = 0
        x[0, 0, -1, -1] = float("nan") if seed == 1 else 1.0  # late in the last block
        if seed == 2:
            x = x.to(memory_format=torch.channels_last)
        x = x.to(DEVICE)
        lists, counts = active_channels(x)
        ref_lists, ref_counts = gc._active_channels_torch(x)
        assert torch.equal(lists, ref_lists) and torch.equal(counts, ref_counts)


def test_all_zero_input_gives_bias_only_outputs():
    x = torch.zeros(2, 5, 6, 6, device=DEVICE)
    w = torch.randn(7, 5, 3, 3, device=DEVICE)
    b = torch.randn(7, device=DEVICE)
    idx = torch.tensor([[0, 3], [2, 6]], device=DEVICE)
    y = gated_conv2d_triton(x, w, b, idx, None, None, (1, 1), (1, 1), (1, 1), False)
    ref = gated_conv2d_reference(x, w, b, idx, None, None, (1, 1), (1, 1), (1, 1), False)
    assert torch.allclose(y, ref)


@pytest.mark.parametrize("seed", range(3))
def test_triton_dynamic_conv2d_picks_the_reference_channels(seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 8, 7, 7, generator=gen)
    x[1, 2] = 0
    w = torch.randn(10, 8, 3, 3, generator=gen) / 8
    gw, gb = torch.randn(10, 8, generator=gen), torch.randn(10, generator=gen)
    prio = torch.rand(10, generator=gen)
    in_idx = torch.tensor([[0, 1, 2, 5], [1, 3, 4, 7], [0, 2, 4, 6]]) if seed == 2 else None
    x, w, gw, gb, prio = (t.to(DEVICE) for t in (x, w, gw, gb, prio))
    in_idx = in_idx.to(DEVICE) if in_idx is not None else None
    y, idx, scale = dynamic_conv2d_triton(x, w, None, gw, gb, prio, 4, in_idx, (1, 1), (1, 1),
                                          (1, 1), True)
    ref_idx, ref_scale = dynamic_conv2d_reference(x, w, None, gw, gb, prio, 4, in_idx, (1, 1),
                                                  (1, 1), (1, 1), True)[1:]
    assert torch.equal(idx, ref_idx) and torch.equal(scale, ref_scale)
    ry = gated_conv2d_reference(x.double(), w.double(), None, ref_idx, ref_scale.double(), in_idx,
                                (1, 1), (1, 1), (1, 1), True)
    assert max_rel_err(y, ry) < TOL[torch.float32]


def test_unsupported_dtype_is_a_clear_error():
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="supports"):
        gated_conv2d_triton(x, torch.randn(2, 2, 3, 3, dtype=torch.float64), None,
                            torch.tensor([[0]]), None, None, (1, 1), (1, 1), (1, 1), False)


def test_cuda_entry_points_validate_and_route_dtypes():
    # The functions registered for CUDA, called here on the interpreter's tensors.
    from dynprune import ops
    x = torch.randn(2, 4, 5, 5, device=DEVICE)
    w = torch.randn(6, 4, 3, 3, device=DEVICE)
    idx = torch.tensor([[0, 2], [1, 5]], device=DEVICE)
    geo = ([1, 1], [1, 1], [1, 1], False)
    ref = gated_conv2d_reference(x, w, None, idx, None, None, *geo)
    assert max_rel_err(ops._triton_gated(x, w, None, idx, None, None, *geo), ref) < TOL[x.dtype]
    out = torch.full_like(ref, float("nan"))
    ops._triton_gated_out(x, w, None, idx, None, None, *geo, out=out)
    assert max_rel_err(out, ref) < TOL[x.dtype]
    with pytest.raises(ValueError, match="out must have shape"):
        ops._triton_gated_out(x, w, None, idx, None, None, *geo, out=out[:, :3])
    with pytest.raises(ValueError, match="channel mismatch"):
        ops._triton_gated(x[:, :3], w, None, idx, None, None, *geo)
    with pytest.raises(ValueError, match="out_idx must have shape"):
        ops._triton_gated(x, w, None, idx[:1], None, None, *geo)
    # float64 has no Triton path: the reference serves it, exactly
    y64 = ops._triton_gated(x.double(), w.double(), None, idx, None, None, *geo)
    assert torch.equal(y64, gated_conv2d_reference(x.double(), w.double(), None, idx, None,
                                                   None, *geo))


def test_gpu_check_script_correctness_part_runs(capsys):
    # benchmarks/gpu_check.py is for a GPU machine; its correctness check is
    # smoke-run here on a small layer so the script stays ready.
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.DEV = DEVICE
    assert mod.check_correctness(torch.Generator().manual_seed(0), [("tiny", 20, 6)])
    out = capsys.readouterr().out
    assert out.count(" ok") == 9 and out.count("packed") == 3 and "FAIL" not in out
    md = mod.markdown([dict(layer="l", shape="8x6x6", dtype="float16", batch=1, cuda_graph=True,
                            keep=0.5, dense_ms=1.0, static_ms=0.4, gated_ms=0.5, detect_ms=0.6,
                            dense_over_gated=2.0, gated_over_static=1.25)], "card", "date")
    assert ("| l | 8x6x6 | float16 | 1 | yes | 0.5 | 1.0000 | 0.4000 | 0.5000 | 0.6000 "
            "| 2.00 | 1.25 | - |") in md
    row = dict(layer="r18.l1", dtype="float16", keep=0.5, batch=64, cuda_graph=False, dense_ms=1.0,
               static_ms=0.4, gated_ms=0.45)
    assert "dense/gated 2.22 gated/static 1.12 (need >= 2, <= 1.3): met" in mod.bar_summary([row])
    row["gated_ms"] = 0.55  # 1.82x dense: missed
    assert "MISSED" in mod.bar_summary([row])


def test_gpu_ab_script_correctness_part_runs(capsys):
    # benchmarks/gpu_ab.py (the A/B script for a GPU lease) checks every kernel
    # variant before timing; that part is smoke-run here so the script stays ready.
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_ab.py"
    spec = importlib.util.spec_from_file_location("gpu_ab", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if DEVICE == "cpu":
        assert mod.LAYERS == [("tiny", 32, 6)]
    mod.LAYERS = [("tiny", 24, 5)]
    rows = []
    assert mod.check(rows)
    assert len(rows) == 8 and all(r["err"] < 1e-2 for r in rows)
    assert {r["pack"] for r in rows} == {0, 1, 2}
    assert "FAIL" not in capsys.readouterr().out


def test_any_weight_layout_gives_the_same_result():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 6, 5, 5, generator=gen).to(DEVICE)
    w = torch.randn(8, 6, 3, 3, generator=gen).to(DEVICE)
    w_t = w.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)  # output channels contiguous
    x_cl = x.to(memory_format=torch.channels_last)
    idx = torch.tensor([[1, 4, 7], [0, 2, 3]], device=DEVICE)
    geo = ((1, 1), (1, 1), (1, 1), False)
    ref = gated_conv2d_reference(x.double(), w.double(), None, idx, None, None, *geo)
    for xx, ww in ((x, w_t), (x_cl, w), (x_cl, w_t)):
        y = gated_conv2d_triton(xx, ww, None, idx, None, None, *geo)
        assert max_rel_err(y, ref) < TOL[torch.float32]


@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("seed", range(4))
def test_forced_tiles_and_split_reduction_match_the_reference(seed, split):
    """A tile given as a triton.Config, with and without a split reduction,
    computes the same function, with int32 and int64 index lists."""
    import triton
    rng, gen = random.Random(50 + seed), torch.Generator().manual_seed(2000 + seed)
    # up to 70 input channels: several 16-channel blocks for each part of a split
    args, geo = random_case(rng, gen, torch.float32, cin_range=(20, 70))
    ref = reference64(args, geo)
    config = triton.Config({"BLOCK_P": 16, "BLOCK_CO": 16, "BLOCK_CI": 16, "SPLIT": split},
                           num_warps=4)
    for cast in (torch.int32, torch.int64):
        a = [t.to(cast) if t is not None and not t.is_floating_point() else t for t in args]
        out = torch.full(ref.shape, float("nan"), device=DEVICE)
        y = gated_conv2d_triton(*a, *geo, out=out, config=config)
        assert not torch.isnan(y).any(), "an output element was not written"
        assert max_rel_err(y, ref) < TOL[torch.float32]


def test_tuner_candidates_fit_the_layer(monkeypatch):
    """Tiles no larger than the layer; a split reduction only where the grid is
    small, never more parts than 32-channel blocks; the untimed pick first."""
    from dynprune.kernels import gated_conv as gc
    monkeypatch.setattr(gc, "_INTERPRET", False)
    monkeypatch.setattr(gc, "_SMS", 132)
    for n, k, hw, act in [(64, 32, 3136, 32), (1, 32, 3136, 32), (1, 64, 784, 64),
                          (1, 128, 196, 128), (1, 256, 49, 256), (64, 256, 49, 256), (2, 5, 9, 3)]:
        cands = gc._candidates(n, k, hw, act)
        assert cands
        for c in cands:
            kw = c.kwargs
            assert kw["BLOCK_CO"] <= max(32, 1 << (k - 1).bit_length())
            assert kw["BLOCK_P"] <= max(32, 1 << (hw - 1).bit_length())
            programs = n * -(-hw // kw["BLOCK_P"]) * -(-k // kw["BLOCK_CO"])
            assert kw["SPLIT"] <= max(1, -(-act // kw["BLOCK_CI"]))
            if kw["SPLIT"] > 1:
                assert programs * kw["SPLIT"] <= 2 * 132
    batch64 = gc._candidates(64, 32, 3136, 32)[0].kwargs
    assert (batch64["BLOCK_P"], batch64["SPLIT"]) == (256, 1)
    batch1 = gc._candidates(1, 256, 49, 256)[0].kwargs
    assert (batch1["BLOCK_P"], batch1["BLOCK_CO"], batch1["SPLIT"]) == (32, 32, 8)


@pytest.mark.parametrize("split", [1, 3])
def test_64_bit_offsets_give_the_same_result(monkeypatch, split):
    """The 64-bit offset path (tensors spanning 2^31 elements; forced here)."""
    import triton
    from dynprune.kernels import gated_conv as gc
    monkeypatch.setattr(gc, "_FORCE_WIDE", True)
    rng, gen = random.Random(77 + split), torch.Generator().manual_seed(77 + split)
    args, geo = random_case(rng, gen, torch.float32, cin_range=(20, 70))
    config = triton.Config({"BLOCK_P": 16, "BLOCK_CO": 16, "BLOCK_CI": 16, "SPLIT": split},
                           num_warps=4)
    y = gated_conv2d_triton(*args, *geo, config=config)
    assert max_rel_err(y, reference64(args, geo)) < TOL[torch.float32]


def test_direct_launch_reuses_a_compiled_kernel_only_for_the_same_specialisation(monkeypatch):
    """_launch goes through the JIT once per signature, then through the
    compiled kernel's launcher with the constexprs in the kernel's own order;
    any change the JIT could specialise on (an int's value, a pointer's
    16-byte alignment, a dtype, a constexpr, an option) goes through the JIT
    again."""
    from dynprune.kernels import gated_conv as gc
    monkeypatch.setattr(gc, "_INTERPRET", False)
    monkeypatch.setattr(gc, "_COMPILED", {})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    calls = []

    class Compiled:
        def __getitem__(self, grid):
            return lambda *args: calls.append(("direct", grid, args))

    class Kernel:
        arg_names = ["x_ptr", "n", "A", "B"]

        def __getitem__(self, grid):
            def jit(*args, **kw):
                calls.append(("jit", grid, args, kw))
                return Compiled()
            return jit

    k, t = Kernel(), torch.zeros(8)
    gc._launch(k, (1, 1, 1), t, 5, B=2, A=3, num_warps=4)
    gc._launch(k, (2,), t, 5, B=2, A=3, num_warps=4)  # a short grid is padded to three
    assert calls[0][0] == "jit" and calls[1] == ("direct", (2, 1, 1), (t, 5, 3, 2))
    gc._launch(k, (1, 1, 1), t.clone(), 5, B=2, A=3, num_warps=4)  # another aligned buffer
    assert calls[2][0] == "direct"
    gc._launch(k, (1, 1, 1), t, 1, B=2, A=3, num_warps=4)   # 1 is specialised
    gc._launch(k, (1, 1, 1), t, 16, B=2, A=3, num_warps=4)  # so is divisibility by 16
    gc._launch(k, (1, 1, 1), t[1:], 5, B=2, A=3, num_warps=4)  # 4-byte aligned only
    gc._launch(k, (1, 1, 1), t.double(), 5, B=2, A=3, num_warps=4)
    gc._launch(k, (1, 1, 1), t, 5, B=2, A=4, num_warps=4)
    gc._launch(k, (1, 1, 1), t, 5, B=2, A=3, num_warps=8)
    assert [c[0] for c in calls[3:]] == ["jit"] * 6


@pytest.mark.parametrize("split,pack", [(1, 1), (3, 1), (1, 2)])
@pytest.mark.parametrize("seed", range(3))
def test_packed_path_matches_the_reference(seed, split, pack):
    """PACK=1 (input and weights copied per sample, then one flat loop over
    channel blocks and taps; PACK=2 the same with coarser packing blocks): the
    same function as the reference, all dtypes, lists given or found, every
    output element written, here also into a channels-last output buffer (y
    stored through row and column strides)."""
    import triton
    config = triton.Config({"BLOCK_P": 16, "BLOCK_CO": 16, "BLOCK_CI": 16, "SPLIT": split,
                            "PACK": pack}, num_warps=4)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        rng = random.Random(300 + 7 * seed + split)
        gen = torch.Generator().manual_seed(300 + 7 * seed + split)
        args, geo = random_case(rng, gen, dtype, cin_range=(10, 50))
        ref = reference64(args, geo)
        for layout in (torch.contiguous_format, torch.channels_last):
            out = torch.full(ref.shape, float("nan"), dtype=dtype, device=DEVICE)
            out = out.to(memory_format=layout)
            y = gated_conv2d_triton(*args, *geo, out=out, config=config)
            assert not torch.isnan(y).any(), "an output element was not written"
            assert max_rel_err(y, ref) < TOL[dtype]


def test_packed_candidates_only_where_the_weight_copy_is_small(monkeypatch):
    """The tuner times the packed path for unsplit tiles where the per-sample
    weight copy is at most _PACK_W_RATIO times the packed input."""
    from dynprune.kernels import gated_conv as gc
    monkeypatch.setattr(gc, "_INTERPRET", False)
    monkeypatch.setattr(gc, "_SMS", 132)
    small = gc._candidates(64, 32, 3136, 32, False, 64 * 9 * 32 * 64, 64 * 58 * 58 * 32)
    packed = [c for c in small if c.kwargs.get("PACK")]
    assert packed and all(c.kwargs["SPLIT"] == 1 for c in packed)
    assert not small[0].kwargs.get("PACK")  # the untimed pick stays the plain kernel
    large = gc._candidates(64, 256, 49, 256, False, 64 * 9 * 256 * 256, 64 * 81 * 256)
    assert not any(c.kwargs.get("PACK") for c in large)


@pytest.mark.parametrize("given,size,pack", [(True, (6, 5), 1), (False, (6, 5), 1),
                                             (True, (2, 70), 1), (True, (3, 70), 2),
                                             (False, (7, 5), 2)])
def test_packed_path_with_several_channel_blocks(given, size, pack):
    """More than 32 active inputs and kept outputs per sample: several 32-channel
    blocks of the packed input and weights (each must be copied), and poisoned
    packed buffers would show if one were not; rows wider than 64 padded
    columns are copied in several column blocks, and PACK=2's blocks of 4 rows
    end past the last row (5 and 9 padded rows here)."""
    import triton
    gen = torch.Generator().manual_seed(11)
    n, cin, cout, k = 2, 90, 80, 70
    x = torch.randn(n, cin, *size, generator=gen)
    x[0, torch.randperm(cin, generator=gen)[:20]] = 0
    w = torch.randn(cout, cin, 3, 3, generator=gen) / 30
    b = torch.randn(cout, generator=gen)
    out_idx = torch.stack([torch.randperm(cout, generator=gen)[:k].sort().values
                           for _ in range(n)])
    in_idx = (torch.stack([torch.randperm(cin, generator=gen)[:75].sort().values
                           for _ in range(n)]) if given else None)
    args = [t.to(DEVICE) if t is not None else None for t in (x, w, b, out_idx, None, in_idx)]
    geo = ((1, 1), (1, 1), (1, 1), True)
    ref = reference64(args, geo)
    empty = torch.empty

    def poisoned(*a, **kw):
        t = empty(*a, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    config = triton.Config({"BLOCK_P": 16, "BLOCK_CO": 32, "BLOCK_CI": 32, "SPLIT": 1,
                            "PACK": pack}, num_warps=4)
    torch.empty = poisoned  # the packed buffers start as NaN: every element must be written
    try:
        y = gated_conv2d_triton(*args, *geo, config=config)
    finally:
        torch.empty = empty
    assert not torch.isnan(y).any()
    assert max_rel_err(y, ref) < TOL[torch.float32]


def test_kernels_compile_for_hopper_without_a_gpu():
    """Every Triton kernel variant compiles for sm_90 (Triton and ptxas need no
    GPU), and the packed conv keeps what makes it fast: 16-byte cp.async tile
    loads, no register spills in 16-bit types. A subprocess: the kernels must be
    imported without TRITON_INTERPRET."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_compile.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "packed fp16 P128xCO32" in r.stdout and "FAILED" not in r.stdout


def test_a_packed_config_that_does_not_divide_the_buffers_is_refused():
    """The packed loads are unmasked, so a given config whose tiles would run
    past the packed buffers (64 kept outputs per tile where only 32 are
    packed) is a clear error, not an out-of-bounds read."""
    import triton
    x = torch.randn(1, 8, 5, 5, device=DEVICE)
    w = torch.randn(8, 8, 3, 3, device=DEVICE)
    idx = torch.tensor([[0, 3, 5]], device=DEVICE)
    config = triton.Config({"BLOCK_P": 16, "BLOCK_CO": 64, "BLOCK_CI": 32, "SPLIT": 1,
                            "PACK": 1}, num_warps=4)
    with pytest.raises(ValueError, match="BLOCK_CO must divide 32"):
        gated_conv2d_triton(x, w, None, idx, None, None, (1, 1), (1, 1), (1, 1), False,
                            config=config)
