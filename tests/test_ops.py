"""Tests of the custom op dynprune::gated_conv2d against its pure-PyTorch reference."""
from __future__ import annotations

import os
import random
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
import torch

import dynprune
from dynprune import ops as dp_ops
from conftest import max_rel_err

REL_TOL_F32 = 1e-5


@contextmanager
def torch_threads(n: int):
    """torch's intra-op thread count set to n inside the block, restored after."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(n)
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- helpers


def _out_size(size, pad, dil, k, stride):
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


def _sorted_subset(rng: random.Random, limit: int, k: int) -> list:
    return sorted(rng.sample(range(limit), k))


def _idx_tensor(rows, k, dtype=torch.int64):
    if len(rows) == 0:
        return torch.zeros(0, k, dtype=dtype)
    return torch.tensor(rows, dtype=dtype).reshape(len(rows), k)


@dataclass
class Case:
    x: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    out_idx: torch.Tensor
    out_scale: Optional[torch.Tensor]
    in_idx: Optional[torch.Tensor]
    stride: tuple
    padding: tuple
    dilation: tuple
    relu: bool

    def args(self):
        return (self.x, self.weight, self.bias, self.out_idx, self.out_scale, self.in_idx,
                self.stride, self.padding, self.dilation, self.relu)

    def double_args(self):
        d = lambda t: None if t is None else (t.double() if t.is_floating_point() else t)  # noqa: E731
        return (d(self.x), d(self.weight), d(self.bias), self.out_idx, d(self.out_scale),
                self.in_idx, self.stride, self.padding, self.dilation, self.relu)

    def describe(self):
        return (f"x={list(self.x.shape)} w={list(self.weight.shape)} bias={self.bias is not None} "
                f"stride={self.stride} padding={self.padding} dilation={self.dilation} "
                f"relu={self.relu} out_idx={self.out_idx.tolist()} "
                f"in_idx={None if self.in_idx is None else self.in_idx.tolist()}")


CIN_CHOICES = [1, 2, 3, 5, 8, 13, 16, 24, 37, 40]
COUT_CHOICES = [1, 3, 4, 5, 13, 17, 32, 37, 40]


def make_case(seed: int) -> Case:
    """A random, geometrically valid case; invalid geometries are regenerated."""
    rng = random.Random(1000 + seed)
    gen = torch.Generator().manual_seed(seed)
    # 5: the phased schedule on 2 threads; 4: each sample on one thread (see sparse_f32.cpp)
    n = [0, 1, 5, 4][seed % 4]
    explicit_in_idx = seed % 2 == 1
    while True:
        cin = rng.choice(CIN_CHOICES) if rng.random() < 0.6 else rng.randint(1, 40)
        cout = rng.choice(COUT_CHOICES) if rng.random() < 0.6 else rng.randint(1, 40)
        h, w = rng.randint(1, 20), rng.randint(1, 20)
        kh = rng.choice([1, 3, 5])
        kw = kh if rng.random() < 0.7 else rng.choice([1, 3, 5])
        dil = (rng.choice([1, 2]), rng.choice([1, 2]))
        if rng.random() < 0.25:  # 'same'-style padding, stride 1
            stride = (1, 1)
            pad = (dil[0] * (kh - 1) // 2, dil[1] * (kw - 1) // 2)
        else:
            stride = (rng.choice([1, 2]), rng.choice([1, 2]))
            pad = (rng.choice([0, 1, 2]), rng.choice([0, 1, 2]))
        if h + 2 * pad[0] >= dil[0] * (kh - 1) + 1 and w + 2 * pad[1] >= dil[1] * (kw - 1) + 1:
            break

    x = torch.randn(n, cin, h, w, generator=gen)
    weight = torch.randn(cout, cin, kh, kw, generator=gen) / (cin * kh * kw) ** 0.5
    bias = torch.randn(cout, generator=gen) if rng.random() < 0.6 else None
    relu = rng.random() < 0.5

    # Kept output channels: a different k per sample would need ragged rows, so k is shared
    # per case but the sets differ per sample.
    k = rng.randint(0, cout)
    out_idx = _idx_tensor([_sorted_subset(rng, cout, k) for _ in range(n)], k,
                          dtype=rng.choice([torch.int64, torch.int32]))
    out_scale = None
    if rng.random() < 0.75:
        # Includes negative values (and, with relu, channels that go to 0 entirely).
        out_scale = torch.empty(n, k).uniform_(-2.0, 2.0, generator=gen)

    # Zero a random subset of input channels in each sample.
    for i in range(n):
        nz = rng.randint(0, cin)
        if nz:
            x[i, _sorted_subset(rng, cin, nz)] = 0.0

    in_idx = None
    if explicit_in_idx:
        kin = rng.randint(0, cin)
        in_idx = _idx_tensor([_sorted_subset(rng, cin, kin) for _ in range(n)], kin,
                             dtype=rng.choice([torch.int64, torch.int32]))
    return Case(x, weight, bias, out_idx, out_scale, in_idx, stride, pad, dil, relu)


def pruned_mask(out_idx: torch.Tensor, n: int, cout: int) -> torch.Tensor:
    kept = torch.zeros(n, cout, dtype=torch.bool)
    if out_idx.numel():
        kept.scatter_(1, out_idx.long(), True)
    return ~kept


def assert_matches_reference(y: torch.Tensor, case: Case, tol: float = REL_TOL_F32):
    ref = dynprune.gated_conv2d_reference(*case.double_args())
    assert y.shape == ref.shape, case.describe()
    assert y.dtype == case.x.dtype
    if not torch.isnan(ref).any():
        assert not torch.isnan(y).any(), "NaN in output: " + case.describe()
    err = max_rel_err(y, ref)
    assert err < tol, f"rel err {err:.3g} >= {tol}: " + case.describe()
    pruned = pruned_mask(case.out_idx, case.x.shape[0], case.weight.shape[0])
    assert (y[pruned] == 0).all(), "pruned channel not exactly 0: " + case.describe()


# --------------------------------------------------------------------------- kernel vs reference

CASE_SEEDS = list(range(40))


@pytest.mark.parametrize("seed", CASE_SEEDS)
def test_random_cases_match_reference(seed):
    case = make_case(seed)
    y = dynprune.gated_conv2d(*case.args())
    assert_matches_reference(y, case)

    # The out variant must write every element of a NaN-poisoned buffer.
    buf = torch.full_like(y, float("nan"))
    c = case
    res = torch.ops.dynprune.gated_conv2d.out(
        c.x, c.weight, c.bias, c.out_idx, c.out_scale, c.in_idx, list(c.stride),
        list(c.padding), list(c.dilation), c.relu, out=buf)
    assert res.data_ptr() == buf.data_ptr()
    assert_matches_reference(buf, case)
    # Same float32 computation: the two entry points agree exactly.
    assert torch.equal(buf, y)


def test_random_cases_cover_the_grid():
    """The fixed seed list really exercises the combinations the kernel branches on."""
    cases = [make_case(s) for s in CASE_SEEDS]
    seen = {
        "N": {c.x.shape[0] for c in cases},
        "stride": {s for c in cases for s in c.stride},
        "dil": {d for c in cases for d in c.dilation},
        "k": {k for c in cases for k in c.weight.shape[2:]},
        "pad": {p for c in cases for p in c.padding},
        "relu": {c.relu for c in cases},
        "bias": {c.bias is not None for c in cases},
        "in_idx": {c.in_idx is not None for c in cases},
        "scale": {c.out_scale is not None for c in cases},
    }
    assert seen["N"] == {0, 1, 4, 5}
    assert seen["stride"] == {1, 2} and seen["dil"] == {1, 2} and seen["k"] == {1, 3, 5}
    assert {0, 1, 2} <= seen["pad"]
    for key in ("relu", "bias", "in_idx", "scale"):
        assert seen[key] == {False, True}, key
    assert any(c.x.shape[2] != c.x.shape[3] for c in cases)
    assert any(c.x.shape[1] % 2 == 1 and c.x.shape[1] > 1 for c in cases)
    assert any(c.out_scale is not None and (c.out_scale < 0).any() for c in cases)


def test_empty_keep_set_and_full_keep_set():
    x = torch.randn(3, 6, 7, 9)
    w = torch.randn(5, 6, 3, 3)
    b = torch.randn(5)
    y = dynprune.gated_conv2d(x, w, b, torch.zeros(3, 0, dtype=torch.long), None, None,
                              (1, 1), (1, 1), (1, 1), False)
    assert y.shape == (3, 5, 7, 9) and (y == 0).all()
    full = torch.arange(5).repeat(3, 1)
    case = Case(x, w, b, full, None, None, (1, 1), (1, 1), (1, 1), False)
    assert_matches_reference(dynprune.gated_conv2d(*case.args()), case)
    # All kept, scale 1, no relu: the dense conv.
    dense = torch.nn.functional.conv2d(x.double(), w.double(), b.double(), 1, 1)
    assert max_rel_err(dynprune.gated_conv2d(*case.args()), dense) < REL_TOL_F32


def test_in_idx_none_detects_single_nonzero_element():
    """Channel detection must keep a channel whose only non-zero value is its last pixel."""
    x = torch.zeros(2, 4, 6, 5)
    x[0, 2, -1, -1] = 3.0
    x[1, 0, 0, 0] = -1.5
    x[1, 3, 2, 4] = 2.0
    w = torch.randn(6, 4, 3, 3)
    oi = torch.tensor([[0, 2, 5], [1, 3, 4]])
    case = Case(x, w, None, oi, None, None, (1, 1), (1, 1), (1, 1), False)
    y = dynprune.gated_conv2d(*case.args())
    assert_matches_reference(y, case)
    assert y[0, 2].abs().sum() > 0


def test_in_idx_ignores_nonzero_channels_outside_it():
    x = torch.randn(2, 5, 8, 8)
    w = torch.randn(4, 5, 3, 3)
    oi = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]])
    ii = torch.tensor([[1, 3], [0, 4]])
    y = dynprune.gated_conv2d(x, w, None, oi, None, ii, (1, 1), (0, 0), (1, 1), False)
    x_masked = x.clone()
    x_masked[0, [0, 2, 4]] = 0
    x_masked[1, [1, 2, 3]] = 0
    ref = torch.nn.functional.conv2d(x_masked.double(), w.double())
    assert max_rel_err(y, ref) < REL_TOL_F32


# --------------------------------------------------------------------------- dtypes


def _low_precision_dtype():
    try:
        torch.nn.functional.conv2d(torch.ones(1, 1, 3, 3, dtype=torch.float16),
                                   torch.ones(1, 1, 1, 1, dtype=torch.float16))
        return torch.float16
    except RuntimeError:
        return torch.bfloat16


# dtype -> (tolerance vs the same-dtype reference, tolerance vs the float64 reference)
DTYPE_TOLS = {
    torch.float64: (1e-12, 1e-12),
    torch.float16: (2e-3, 1e-2),
    torch.bfloat16: (1e-2, 5e-2),
}


@pytest.mark.parametrize("dtype", [torch.float64, _low_precision_dtype()], ids=str)
@pytest.mark.parametrize("explicit_in_idx", [False, True])
def test_other_dtypes_give_reference_result(dtype, explicit_in_idx):
    tol_same, tol_f64 = DTYPE_TOLS[dtype]
    x = torch.randn(3, 7, 9, 6)
    x[1, [0, 4]] = 0
    w = torch.randn(10, 7, 3, 3) / 63 ** 0.5
    b = torch.randn(10)
    oi = torch.tensor([[0, 3, 4, 9], [1, 2, 5, 8], [0, 1, 2, 3]])
    s = torch.tensor([[1.0, -0.5, 2.0, 0.25], [0.5, 1.5, -1.0, 1.0], [1.0, 1.0, -2.0, 0.75]])
    ii = torch.tensor([[0, 2, 6], [1, 3, 5], [0, 1, 4]]) if explicit_in_idx else None
    args = (x.to(dtype), w.to(dtype), b.to(dtype), oi, s.to(dtype), ii, (2, 1), (1, 2), (1, 2),
            True)
    y = dynprune.gated_conv2d(*args)
    assert y.dtype == dtype
    ref_same = dynprune.gated_conv2d_reference(*args)
    ref64 = dynprune.gated_conv2d_reference(x.double(), w.double(), b.double(), oi, s.double(),
                                            ii, (2, 1), (1, 2), (1, 2), True)
    assert max_rel_err(y, ref_same) < tol_same
    assert max_rel_err(y, ref64) < tol_f64
    assert (y[pruned_mask(oi, 3, 10)] == 0).all()
    # Out variant, NaN-poisoned buffer.
    buf = torch.full_like(y, float("nan"))
    torch.ops.dynprune.gated_conv2d.out(*args[:6], [2, 1], [1, 2], [1, 2], True, out=buf)
    assert not buf.isnan().any()
    assert max_rel_err(buf, ref_same) < tol_same


# --------------------------------------------------------------------------- memory layouts


def _layout_case():
    x = torch.randn(4, 6, 11, 9)
    x[2, [1, 3]] = 0
    w = torch.randn(7, 6, 3, 3) / 54 ** 0.5
    b = torch.randn(7)
    oi = torch.tensor([[0, 2, 6], [1, 2, 3], [0, 4, 5], [3, 5, 6]])
    s = torch.randn(4, 3)
    return x, w, b, oi, s


@pytest.mark.parametrize("layout", ["slice_h", "slice_w", "transposed", "channels_last",
                                    "channels_last_weight", "channel_slice"])
@pytest.mark.parametrize("explicit_in_idx", [False, True])
def test_noncontiguous_and_channels_last_inputs(layout, explicit_in_idx):
    x, w, b, oi, s = _layout_case()
    if layout == "slice_h":
        x = torch.randn(4, 6, 22, 9)[:, :, ::2]
    elif layout == "slice_w":
        x = torch.randn(4, 6, 11, 18)[..., ::2]
    elif layout == "transposed":
        x = torch.randn(4, 6, 9, 11).transpose(2, 3)
    elif layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "channels_last_weight":
        w = w.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    elif layout == "channel_slice":
        x = torch.randn(4, 12, 11, 9)[:, ::2]
    if layout != "channels_last_weight":
        assert not x.is_contiguous()
    ii = torch.tensor([[0, 1, 5], [2, 3, 4], [0, 2, 4], [1, 3, 5]]) if explicit_in_idx else None
    # Non-contiguous index / scale tensors too.
    oi_nc = torch.stack([oi, oi], dim=2)[..., 0]
    s_nc = torch.stack([s, s], dim=2)[..., 1]
    assert not oi_nc.is_contiguous() and not s_nc.is_contiguous()
    case = Case(x, w, b, oi_nc, s_nc, ii, (1, 2), (1, 1), (1, 1), True)
    assert_matches_reference(dynprune.gated_conv2d(*case.args()), case)


def test_out_variant_noncontiguous_buffer():
    x, w, b, oi, s = _layout_case()
    case = Case(x, w, b, oi, s, None, (1, 1), (1, 1), (1, 1), False)
    buf = torch.full((4, 7, 11, 9), float("nan")).to(memory_format=torch.channels_last)
    torch.ops.dynprune.gated_conv2d.out(x, w, b, oi, s, None, [1, 1], [1, 1], [1, 1], False,
                                        out=buf)
    assert_matches_reference(buf, case)


def test_out_variant_rejects_bad_buffer():
    x, w, b, oi, s = _layout_case()
    for impl in (torch.ops.dynprune.gated_conv2d.out, dp_ops._reference_out):
        with pytest.raises(ValueError, match=r"out must have shape"):
            impl(x, w, b, oi, s, None, [1, 1], [1, 1], [1, 1], False,
                 out=torch.empty(4, 7, 11, 8))
        with pytest.raises(TypeError, match=r"dtype mismatch.*out"):
            impl(x, w, b, oi, s, None, [1, 1], [1, 1], [1, 1], False,
                 out=torch.empty(4, 7, 11, 9, dtype=torch.float64))


@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("size", [(7, 7), (3, 5), (9, 16)])
def test_1x1_reads_input_in_place(n, size):
    """1x1 stride-1 unpadded convs read x where it lies (no wide copy): their
    junk lanes read the next plane, here NaN channels outside in_idx, and the
    last plane is copied. Same result as the reference, NaN nowhere."""
    g = torch.Generator().manual_seed(n + size[1])
    cin, cout = 12, 10
    x = torch.randn(n, cin, *size, generator=g)
    in_idx = torch.tensor([[0, 2, 3, 5, 8, 11]] * n)
    x[:, [1, 4, 6, 7, 9, 10]] = float("nan")  # never read as data
    w = torch.randn(cout, cin, 1, 1, generator=g)
    oi = torch.tensor([[0, 3, 4, 9]] * n)
    s = torch.rand(n, 4, generator=g)
    case = Case(x, w, None, oi, s, in_idx, (1, 1), (0, 0), (1, 1), True)
    with torch_threads(2):
        y = dynprune.gated_conv2d(*case.args())
    assert not torch.isnan(y).any()
    assert_matches_reference(y, case)


def assert_poisoned_out_matches_reference(case: Case, shape, threads: int = 2):
    """gated_conv2d.out into a NaN-filled buffer of `shape` on `threads` threads:
    every element written, and the reference result."""
    out = torch.full(shape, float("nan"))
    with torch_threads(threads):
        torch.ops.dynprune.gated_conv2d.out(*case.args(), out=out)
    assert_matches_reference(out, case)


TAIL_1X1_GEOMETRIES = [  # 1x1 kernels whose output has 16m + 1 positions
    # (h, w, stride, padding): the last pixel is a dot product over channel windows
    (7, 7, 1, 0), (14, 14, 2, 0), (13, 13, 2, 0), (5, 5, 1, 1), (1, 17, 1, 0), (3, 11, 1, 0),
    # one output pixel: the dot product alone (no pixel vector)
    (1, 1, 1, 0), (2, 2, 2, 0), (1, 2, 2, 0),
]


@pytest.mark.parametrize("h,w,stride,padding", TAIL_1X1_GEOMETRIES)
@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("kin", [5, 60, 90])
def test_1x1_tail_pixel_matches_reference(h, w, stride, padding, n, kin):
    """1x1 maps of 16m + 1 outputs compute m vectors and the last pixel as a
    masked dot product over windows of 16 input channels (where the kept
    inputs fill enough of them; kin=5 does not). 90 channels: the last window
    is partial, and the last weight row is kept. Channels outside in_idx are
    NaN: the windows' masked lanes must not read them. Poisoned output."""
    g = torch.Generator().manual_seed(h * 1000 + w * 10 + n + kin)
    cin, cout, k = 90, 21, 13
    x = torch.randn(n, cin, h, w, generator=g)
    in_idx = torch.stack([torch.sort(torch.randperm(cin, generator=g)[:kin]).values
                          for _ in range(n)])
    outside = torch.ones(n, cin, dtype=torch.bool).scatter_(1, in_idx, False)
    x[outside] = float("nan")
    weight = torch.randn(cout, cin, 1, 1, generator=g)
    bias = torch.randn(cout, generator=g)
    oi = torch.stack([torch.cat([torch.sort(torch.randperm(cout - 1, generator=g)[:k - 1]).values,
                                 torch.tensor([cout - 1])]) for _ in range(n)])
    s = torch.rand(n, k, generator=g) - 0.3
    case = Case(x, weight, bias, oi, s, in_idx, (stride, stride), (padding, padding), (1, 1), True)
    ho, wo = (_out_size(d, padding, 1, 1, stride) for d in (h, w))
    assert ho * wo % 16 == 1
    assert_poisoned_out_matches_reference(case, (n, cout, ho, wo))


@pytest.mark.parametrize("n", [1, 3, 4])
def test_1x1_tail_pixel_with_an_empty_sample_and_wide_tiles(n):
    """1x1 on 7x7, inputs found by the scan, in tiles of up to 8 kept rows:
    batch 4 runs each sample whole (k = 23 = 8 + 8 + 7), batches 1 and 3
    split the kept rows into parts first (6 a part; 12 = 8 + 4). In batches
    3 and 4 sample 1 is all zero (no kept input: no windows, accumulators
    zero-filled)."""
    g = torch.Generator().manual_seed(n)
    cin, cout, k = 64, 40, 23
    x = torch.randn(n, cin, 7, 7, generator=g)
    for s in range(n):
        x[s, torch.randperm(cin, generator=g)[:20]] = 0
    if n > 1:
        x[1] = 0
    weight = torch.randn(cout, cin, 1, 1, generator=g)
    bias = torch.randn(cout, generator=g)
    oi = torch.stack([torch.sort(torch.randperm(cout, generator=g)[:k]).values for _ in range(n)])
    case = Case(x, weight, bias, oi, torch.rand(n, k, generator=g), None, (1, 1), (0, 0), (1, 1),
                False)
    assert_poisoned_out_matches_reference(case, (n, cout, 7, 7))


def test_out_variant_may_share_memory_with_x():
    """out=x: the kernel reads x while writing y (a 1x1 conv reads it in place),
    so such an out goes through a temporary; the result is the reference's."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 8, 6, 6, generator=g)
    w = torch.randn(8, 8, 1, 1, generator=g)
    oi = torch.tensor([[0, 2, 5]] * 4)
    case = Case(x.clone(), w, None, oi, None, None, (1, 1), (0, 0), (1, 1), False)
    expected = dp_ops.gated_conv2d_reference(*case.double_args())
    torch.ops.dynprune.gated_conv2d.out(x, w, None, oi, None, None, [1, 1], [0, 0], [1, 1],
                                        False, out=x)
    assert max_rel_err(x, expected) < 1e-5


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("size", [5, 7, 20])
def test_nan_input_propagates_like_the_reference(relu, size):
    """A NaN pixel in a kept input channel makes NaN every kept output its taps
    reach, ReLU or not (torch.relu keeps NaN); the rest matches the reference
    and pruned channels stay exactly 0. Covers the vector epilogue's runs
    (5x5, 7x7) and a map wider than one vector per row (20x20)."""
    g = torch.Generator().manual_seed(size + relu)
    n, cin, cout, k = 3, 12, 10, 6
    x = torch.randn(n, cin, size, size, generator=g)
    x[1, 4, size // 2, 1] = float("nan")
    weight = torch.randn(cout, cin, 3, 3, generator=g)
    bias = torch.randn(cout, generator=g)
    oi = torch.stack([torch.sort(torch.randperm(cout, generator=g)[:k]).values for _ in range(n)])
    scale = torch.rand(n, k, generator=g) - 0.5
    case = Case(x, weight, bias, oi, scale, None, (1, 1), (1, 1), (1, 1), relu)
    y = dynprune.gated_conv2d(*case.args())
    ref = dynprune.gated_conv2d_reference(*case.double_args())
    assert torch.equal(y.isnan(), ref.isnan())
    assert y.isnan().sum() == k * 3 * 3  # sample 1's kept channels, a 3x3 patch each
    finite = ~ref.isnan()
    assert max_rel_err(y[finite], ref[finite]) < REL_TOL_F32
    assert (y[pruned_mask(oi, n, cout)] == 0).all()


SHIFTED_GEOMETRIES = [  # stride 1, Wo == W, at most 64 output pixels: the shifted layout
    # (kh, kw, padding, dilation, h, w)
    (3, 3, (1, 1), (1, 1), 4, 4),
    (3, 3, (1, 1), (1, 1), 8, 8),
    (5, 5, (2, 2), (1, 1), 5, 5),
    (3, 5, (0, 2), (1, 1), 6, 7),
    (3, 3, (2, 2), (2, 2), 4, 6),
    # 16m + 1 pixels: m vectors and the tail pixel (taps in the lanes)
    (3, 3, (1, 1), (1, 1), 7, 7),
    (3, 3, (2, 2), (2, 2), 7, 7),
    (3, 3, (1, 1), (1, 1), 3, 11),
    (1, 3, (0, 1), (1, 1), 1, 17),
    # one output pixel: the tail alone, its valid taps the centre ones
    (3, 3, (1, 1), (1, 1), 1, 1),
    (3, 3, (2, 2), (2, 2), 1, 1),
    (1, 3, (0, 1), (1, 1), 1, 1),
]


@pytest.mark.parametrize("kh,kw,padding,dilation,h,w", SHIFTED_GEOMETRIES)
@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("explicit_in_idx", [False, True])
def test_shifted_layout_matches_reference(kh, kw, padding, dilation, h, w, n, explicit_in_idx):
    """Small stride-1 maps keep their width: the kernel copies each kept input
    channel as kw column-shifted copies and reads taps without junk columns."""
    g = torch.Generator().manual_seed(kh * 100 + kw * 10 + h + n)
    cin, cout = 21, 19
    x = torch.randn(n, cin, h, w, generator=g)
    x[:, [2, 9]] = 0
    weight = torch.randn(cout, cin, kh, kw, generator=g)
    bias = torch.randn(cout, generator=g)
    oi = torch.stack([torch.sort(torch.randperm(cout, generator=g)[:13]).values for _ in range(n)])
    s = torch.rand(n, 13, generator=g) - 0.3
    in_idx = None
    if explicit_in_idx:
        in_idx = torch.stack([torch.sort(torch.randperm(cin, generator=g)[:11]).values
                              for _ in range(n)])
    case = Case(x, weight, bias, oi, s, in_idx, (1, 1), padding, dilation, True)
    with torch_threads(2):
        y = dynprune.gated_conv2d(*case.args())
    assert y.shape[-2:] == (h + 2 * padding[0] - dilation[0] * (kh - 1), w)
    assert_matches_reference(y, case)


TAP_COPY_GEOMETRIES = [  # outputs of one block the shifted layout does not cover
    # (kh, kw, stride, padding, dilation, h, w): each tap's inputs copied as one run
    (3, 3, (2, 2), (1, 1), (1, 1), 7, 7),    # 4x4: one vector instead of two
    (3, 3, (2, 2), (1, 1), (1, 1), 14, 14),  # 7x7: three vectors and the tail
    (3, 3, (2, 2), (1, 1), (1, 1), 13, 13),
    (3, 3, (1, 1), (0, 0), (1, 1), 6, 6),    # stride 1, width not kept
    (2, 2, (2, 2), (0, 0), (1, 1), 9, 9),    # 4 taps
    (3, 3, (2, 2), (2, 2), (2, 2), 9, 9),
    (1, 3, (2, 2), (0, 1), (1, 1), 7, 7),
    (3, 3, (3, 3), (1, 1), (1, 1), 11, 11),
    (3, 3, (2, 2), (1, 1), (1, 1), 2, 2),    # one output pixel: the tail alone
]


@pytest.mark.parametrize("kh,kw,stride,padding,dilation,h,w", TAP_COPY_GEOMETRIES)
@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("explicit_in_idx", [False, True])
def test_tap_copy_layout_matches_reference(kh, kw, stride, padding, dilation, h, w, n,
                                           explicit_in_idx):
    """Strided or unpadded small maps: each kept input channel is copied once per
    tap as the output-sized run that tap reads; the taps read their runs, no
    junk columns. Zero channels, channels outside in_idx NaN (never read),
    poisoned output."""
    g = torch.Generator().manual_seed(kh * 1000 + h * 10 + stride[0] + n)
    cin, cout, k = 37, 23, 15
    x = torch.randn(n, cin, h, w, generator=g)
    x[:, [3, 11]] = 0
    in_idx = None
    if explicit_in_idx:
        in_idx = torch.stack([torch.sort(torch.randperm(cin, generator=g)[:20]).values
                              for _ in range(n)])
        outside = torch.ones(n, cin, dtype=torch.bool).scatter_(1, in_idx, False)
        x[outside] = float("nan")
    weight = torch.randn(cout, cin, kh, kw, generator=g)
    bias = torch.randn(cout, generator=g)
    oi = torch.stack([torch.sort(torch.randperm(cout, generator=g)[:k]).values for _ in range(n)])
    s = torch.rand(n, k, generator=g) - 0.3
    case = Case(x, weight, bias, oi, s, in_idx, stride, padding, dilation, True)
    ho, wo = (_out_size(d, p, dl, kk, st) for d, p, dl, kk, st in
              zip((h, w), padding, dilation, (kh, kw), stride))
    assert ho * wo <= 64
    assert_poisoned_out_matches_reference(case, (n, cout, ho, wo))


@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("k", [1, 8, 13])
@pytest.mark.parametrize("explicit_in_idx", [False, True])
def test_3x3_on_2x2_map_matches_reference(n, k, explicit_in_idx):
    """3x3, stride 1, padding 1 on a 2x2 map: lanes hold (output, input)
    pixel pairs, one permuted tap row per input channel. Tiles of 8 output
    channels with a remainder; an all-zero sample (no input channel read)."""
    g = torch.Generator().manual_seed(n * 100 + k)
    cin, cout = 23, 17
    x = torch.randn(n, cin, 2, 2, generator=g)
    x[:, [1, 4]] = 0
    x[-1] = 0
    weight = torch.randn(cout, cin, 3, 3, generator=g)
    bias = torch.randn(cout, generator=g)
    oi = torch.stack([torch.sort(torch.randperm(cout, generator=g)[:k]).values for _ in range(n)])
    s = torch.rand(n, k, generator=g) - 0.3
    in_idx = None
    if explicit_in_idx:
        in_idx = torch.stack([torch.sort(torch.randperm(cin, generator=g)[:9]).values
                              for _ in range(n)])
    for relu in (False, True):
        case = Case(x, weight, bias, oi, s, in_idx, (1, 1), (1, 1), (1, 1), relu)
        with torch_threads(2):
            y = dynprune.gated_conv2d(*case.args())
        assert_matches_reference(y, case)


# --------------------------------------------------------------------------- NaN / inf


@pytest.mark.parametrize("relu", [False, True])
def test_inf_nan_in_pruned_channel_gives_exact_zero(relu):
    x = torch.randn(2, 4, 6, 6)
    w = torch.randn(5, 4, 3, 3)
    b = torch.randn(5)
    # Channel 3 is pruned in both samples; its weights and bias are poisoned.
    w[3, 1, 1, 1] = float("inf")
    w[3, 2, 0, 0] = float("-inf")
    b[3] = float("nan")
    oi = torch.tensor([[0, 1, 4], [0, 2, 4]])
    s = torch.tensor([[1.0, -1.0, 0.5], [2.0, 1.0, -0.5]])
    case = Case(x, w, b, oi, s, None, (1, 1), (1, 1), (1, 1), relu)
    y = dynprune.gated_conv2d(*case.args())
    assert (y[:, 3] == 0).all()
    assert torch.isfinite(y).all()
    assert_matches_reference(y, case)


def test_inf_input_still_zero_in_pruned_channels():
    """An inf pixel reaches every output channel's conv; pruned ones must stay exactly 0."""
    x = torch.randn(2, 3, 6, 6)
    x[0, 1, 2, 3] = float("inf")
    x[1, 0, 0, 0] = float("nan")
    w = torch.randn(4, 3, 3, 3)
    oi = torch.tensor([[1, 2], [0, 3]])
    y = dynprune.gated_conv2d(x, w, None, oi, None, None, (1, 1), (1, 1), (1, 1), False)
    ref = dynprune.gated_conv2d_reference(x, w, None, oi, None, None, (1, 1), (1, 1), (1, 1),
                                          False)
    assert (y[0, [0, 3]] == 0).all() and (y[1, [1, 2]] == 0).all()
    # Kept channels: the non-finite pattern follows the reference.
    assert torch.equal(torch.isinf(y), torch.isinf(ref))
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    assert not torch.isfinite(y[0, 1]).all() and not torch.isfinite(y[1, 0]).all()


# --------------------------------------------------------------------------- bad input


def _good():
    return dict(
        x=torch.randn(2, 4, 6, 6),
        weight=torch.randn(5, 4, 3, 3),
        bias=torch.randn(5),
        out_idx=torch.tensor([[0, 2], [1, 4]]),
        out_scale=torch.ones(2, 2),
        in_idx=None,
        stride=(1, 1),
        padding=(1, 1),
        dilation=(1, 1),
        relu=False,
    )


BAD_INPUTS = {
    "x_3d": (dict(x=torch.randn(4, 6, 6)), ValueError, r"x must be 4-D"),
    "weight_3d": (dict(weight=torch.randn(5, 4, 3)), ValueError, r"weight must be 4-D"),
    "channel_mismatch": (dict(weight=torch.randn(5, 3, 3, 3)), ValueError,
                         r"channel mismatch: x has 4 input channels but weight expects 3"),
    "grouped_weight": (dict(weight=torch.randn(5, 2, 3, 3)), ValueError,
                       r"channel mismatch.*grouped convolutions are not supported"),
    "out_idx_too_large": (dict(out_idx=torch.tensor([[0, 2], [1, 5]])), ValueError,
                          r"out_idx.*out of range \[0, 5\)"),
    "out_idx_too_large_no_bias": (dict(out_idx=torch.tensor([[0, 2], [1, 5]]), bias=None),
                                  ValueError, r"out_idx.*out of range \[0, 5\)"),
    "out_idx_negative": (dict(out_idx=torch.tensor([[-1, 2], [1, 4]])), ValueError,
                         r"out_idx.*out of range \[0, 5\)"),
    "out_idx_unsorted": (dict(out_idx=torch.tensor([[0, 2], [4, 1]])), ValueError,
                         r"out_idx.*sorted ascending without duplicates"),
    "out_idx_duplicates": (dict(out_idx=torch.tensor([[2, 2], [1, 4]])), ValueError,
                           r"out_idx.*sorted ascending without duplicates"),
    "out_idx_float": (dict(out_idx=torch.tensor([[0.0, 2.0], [1.0, 4.0]])), TypeError,
                      r"out_idx must be an integer tensor"),
    "out_idx_bool": (dict(out_idx=torch.tensor([[True, False], [False, True]])), TypeError,
                     r"out_idx must be an integer tensor"),
    "out_idx_wrong_n": (dict(out_idx=torch.tensor([[0, 2], [1, 4], [0, 1]]),
                             out_scale=torch.ones(3, 2)), ValueError,
                        r"out_idx must have shape \[N=2, k\]"),
    "out_idx_1d": (dict(out_idx=torch.tensor([0, 2]), out_scale=torch.ones(2)), ValueError,
                   r"out_idx must have shape \[N=2, k\]"),
    "out_idx_too_many": (dict(out_idx=torch.arange(6).repeat(2, 1), out_scale=None),
                         ValueError, r"out_idx"),
    "out_scale_shape": (dict(out_scale=torch.ones(2, 3)), ValueError,
                        r"out_scale must have the shape of out_idx"),
    "out_scale_dtype": (dict(out_scale=torch.ones(2, 2, dtype=torch.float64)), TypeError,
                        r"dtype mismatch: x is .* but out_scale is"),
    "in_idx_out_of_range": (dict(in_idx=torch.tensor([[0, 4], [1, 2]])), ValueError,
                            r"in_idx.*out of range \[0, 4\)"),
    "in_idx_negative": (dict(in_idx=torch.tensor([[0, 1], [-2, 2]])), ValueError,
                        r"in_idx.*out of range \[0, 4\)"),
    "in_idx_unsorted": (dict(in_idx=torch.tensor([[0, 3], [2, 1]])), ValueError,
                        r"in_idx.*sorted ascending without duplicates"),
    "in_idx_float": (dict(in_idx=torch.tensor([[0.0, 3.0], [1.0, 2.0]])), TypeError,
                     r"in_idx must be an integer tensor"),
    "in_idx_wrong_n": (dict(in_idx=torch.tensor([[0, 3]])), ValueError,
                       r"in_idx must have shape \[N=2, k\]"),
    "dtype_mismatch_weight": (dict(weight=torch.randn(5, 4, 3, 3, dtype=torch.float64)),
                              TypeError, r"dtype mismatch: x is .* but weight is"),
    "dtype_mismatch_bias": (dict(bias=torch.randn(5, dtype=torch.float64)), TypeError,
                            r"dtype mismatch: x is .* but bias is"),
    "x_integer": (dict(x=torch.ones(2, 4, 6, 6, dtype=torch.int32),
                       weight=torch.ones(5, 4, 3, 3, dtype=torch.int32), bias=None,
                       out_scale=None), TypeError, r"x must be floating point"),
    "bias_wrong_shape": (dict(bias=torch.randn(4)), ValueError, r"bias must have shape \[5\]"),
    "bias_2d": (dict(bias=torch.randn(5, 1)), ValueError, r"bias must have shape \[5\]"),
    "kernel_larger_than_input": (dict(weight=torch.randn(5, 4, 9, 3)), ValueError,
                                 r"smaller than the dilated kernel"),
    "dilated_kernel_larger": (dict(dilation=(1, 5)), ValueError,
                              r"smaller than the dilated kernel"),
    "stride_zero": (dict(stride=(0, 1)), ValueError, r"stride and dilation must be positive"),
    "stride_negative": (dict(stride=(1, -2)), ValueError,
                        r"stride and dilation must be positive"),
    "dilation_zero": (dict(dilation=(0, 1)), ValueError,
                      r"stride and dilation must be positive"),
    "padding_negative": (dict(padding=(-1, 1)), ValueError, r"padding non-negative"),
    # F.conv2d refuses these; the float32 kernel used to return bias * scale
    "x_empty_spatial": (dict(x=torch.randn(2, 4, 0, 0), padding=(2, 2)), ValueError,
                        r"x must have a non-empty spatial size, got 0x0"),
    "no_input_channels": (dict(x=torch.randn(2, 0, 6, 6), weight=torch.randn(5, 0, 3, 3)),
                          ValueError, r"at least one output and one input channel"),
    "no_output_channels": (dict(weight=torch.randn(0, 4, 3, 3), bias=None,
                                out_idx=torch.zeros(2, 0, dtype=torch.long),
                                out_scale=torch.ones(2, 0)), ValueError,
                           r"at least one output and one input channel"),
}

IMPLS = {
    "native": dynprune.gated_conv2d,
    "reference": dynprune.gated_conv2d_reference,
}


@pytest.mark.parametrize("impl", list(IMPLS), ids=list(IMPLS))
@pytest.mark.parametrize("name", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input_raises_clear_error(name, impl):
    overrides, exc, pattern = BAD_INPUTS[name]
    kw = _good()
    kw.update(overrides)
    fn = IMPLS[impl]
    with pytest.raises(exc, match=pattern):
        fn(kw["x"], kw["weight"], kw["bias"], kw["out_idx"], kw["out_scale"], kw["in_idx"],
           kw["stride"], kw["padding"], kw["dilation"], kw["relu"])


@pytest.mark.parametrize("name", ["out_idx_too_large", "out_idx_unsorted", "in_idx_unsorted"])
def test_bad_index_values_raise_for_float64_too(name):
    """The non-float32 (dense) native path validates index values as well."""
    overrides, exc, pattern = BAD_INPUTS[name]
    kw = _good()
    kw.update(overrides)
    for key in ("x", "weight", "bias", "out_scale"):
        kw[key] = kw[key].double()
    with pytest.raises(exc, match=pattern):
        dynprune.gated_conv2d(*kw.values())


def test_good_inputs_do_not_raise():
    kw = _good()
    y = dynprune.gated_conv2d(*kw.values())
    ref = dynprune.gated_conv2d_reference(*kw.values())
    assert max_rel_err(y, ref) < REL_TOL_F32


# --------------------------------------------------------------------------- autograd


@pytest.mark.parametrize("explicit_in_idx", [False, True])
def test_gradcheck(explicit_in_idx):
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    oi = torch.tensor([[0, 2], [1, 3]])
    s = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    ii = torch.tensor([[0, 2], [1, 2]]) if explicit_in_idx else None

    def f(x, w, b, s):
        return dynprune.gated_conv2d(x, w, b, oi, s, ii, (1, 1), (1, 1), (1, 1), False)

    assert torch.autograd.gradcheck(f, (x, w, b, s))


def test_float32_grad_matches_reference_autograd():
    x = torch.randn(2, 5, 7, 6, requires_grad=True)
    w = torch.randn(6, 5, 3, 3, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    s = torch.randn(2, 3, requires_grad=True)
    oi = torch.tensor([[0, 2, 5], [1, 3, 4]])
    args = (oi, s, None, (2, 1), (1, 1), (1, 1), True)
    g = torch.randn(2, 6, 4, 6)
    y = dynprune.gated_conv2d(x, w, b, *args)
    grads = torch.autograd.grad(y, (x, w, b, s), g)
    y_ref = dynprune.gated_conv2d_reference(x, w, b, *args)
    grads_ref = torch.autograd.grad(y_ref, (x, w, b, s), g)
    for a, r in zip(grads, grads_ref):
        torch.testing.assert_close(a, r)


# --------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile(backend):
    torch._dynamo.reset()

    def f(x, w, b, oi, s):
        y = dynprune.gated_conv2d(x, w, b, oi, s, None, (1, 1), (1, 1), (1, 1), True)
        return y * 2 + 1

    x = torch.randn(2, 4, 6, 5)
    w = torch.randn(6, 4, 3, 3)
    b = torch.randn(6)
    oi = torch.tensor([[0, 3, 5], [1, 2, 4]])
    s = torch.randn(2, 3)
    compiled = torch.compile(f, backend=backend, fullgraph=False)
    torch.testing.assert_close(compiled(x, w, b, oi, s), f(x, w, b, oi, s))
    torch._dynamo.reset()


# --------------------------------------------------------------------------- backends


def test_backends_reports_cpu():
    info = dynprune.backends()
    assert isinstance(info, dict)
    assert info["cpu"] in ("native", "reference")
    if info["cpu"] == "reference":
        assert "cpu_error" in info
    if os.environ.get("DYNPRUNE_REQUIRE_NATIVE") == "1":
        assert info["cpu"] == "native", info.get("cpu_error")


def test_portable_path_without_avx512_matches_reference():
    """The non-AVX-512 kernel (forced by DYNPRUNE_DISABLE_AVX512) is correct too."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import torch, dynprune
        torch.manual_seed(0)
        worst = 0.0
        # the last case, a 4x4 output from 7x7 at stride 2, takes the tap copies
        for cin, cout, k, s, p, d, h, wd in [(5, 7, 3, 1, 1, 1, 9, 8), (6, 4, 3, 2, 2, 2, 9, 8),
                                             (3, 9, 1, 1, 0, 1, 9, 8), (6, 5, 3, 2, 1, 1, 7, 7)]:
            x = torch.randn(3, cin, h, wd)
            x[:, 1] = 0
            w, b = torch.randn(cout, cin, k, k), torch.randn(cout)
            idx = torch.stack([torch.sort(torch.randperm(cout)[:3]).values for _ in range(3)])
            sc = torch.randn(3, 3)
            args = (idx, sc, None, (s, s), (p, p), (d, d), True)
            y = dynprune.gated_conv2d(x, w, b, *args)
            ref = dynprune.gated_conv2d_reference(x.double(), w.double(), b.double(), idx,
                                                  sc.double(), *args[2:])
            worst = max(worst, ((y - ref).abs().max() / ref.abs().max()).item())
        print(worst)
    """)
    env = dict(os.environ, DYNPRUNE_DISABLE_AVX512="1")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip().splitlines()[-1]) < 1e-5


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("with_in_idx", [False, True])
def test_dynamic_conv2d_op_matches_reference(dtype, tol, with_in_idx):
    """Fused gate + conv: same channels, scales and outputs as the reference."""
    from dynprune.ops import dynamic_conv2d_reference

    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        n, cin, cout, k = 3, 7 + seed, 9 + 2 * seed, 4 + seed
        x = torch.randn(n, cin, 9, 10, generator=g, dtype=dtype)
        x[:, seed % cin] = 0
        w = torch.randn(cout, cin, 3, 3, generator=g, dtype=dtype)
        b = torch.randn(cout, generator=g, dtype=dtype)
        gw = torch.randn(cout, cin, generator=g, dtype=dtype)
        gb = torch.rand(cout, generator=g, dtype=dtype)
        prio = torch.rand(cout, generator=g, dtype=dtype)
        in_idx = None
        if with_in_idx:  # channels outside it are non-zero and must be ignored everywhere
            in_idx = torch.stack([torch.sort(torch.randperm(cin, generator=g)[:cin // 2]).values
                                  for _ in range(n)])
        args = (w, b, gw, gb, prio, k, in_idx, [2, 1], [1, 1], [1, 1], seed % 2 == 0)
        y, idx, scale = torch.ops.dynprune.dynamic_conv2d(x, *args)
        ry, ridx, rscale = dynamic_conv2d_reference(x.double(), *(a.double() if
                                                    isinstance(a, torch.Tensor) and a.is_floating_point()
                                                    else a for a in args))
        assert torch.equal(idx, ridx), f"seed {seed}: channel selection differs"
        assert max_rel_err(scale, rscale) < tol
        assert max_rel_err(y, ry) < tol


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("seed", [6, 7])  # N = 5 and N = 4
def test_thread_counts_give_the_same_result(threads, seed):
    """Both work schedules (per sample / phased) and any split agree exactly."""
    case = make_case(seed)
    y_default = dynprune.gated_conv2d(*case.args())
    with torch_threads(threads):
        y = dynprune.gated_conv2d(*case.args())
    assert torch.equal(y, y_default)


UNEVEN_SHARE_GEOMETRIES = [  # (cin, cout, k, size, kernel, stride): items of unequal work
    (40, 160, 80, 12, 3, 1),  # 3 wide blocks (the last short) x 3 channel parts (the last short)
    (48, 300, 256, 7, 3, 1),  # one block, 8 parts of 36 channels and one of 4
    (24, 512, 257, 28, 1, 1),  # 1x1: 13 blocks, a 16-position last one
    (32, 64, 45, 13, 3, 2),  # stride 2 on an odd map
]


@pytest.mark.parametrize("cin,cout,k,size,kernel,stride", UNEVEN_SHARE_GEOMETRIES)
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("threads", [2, 3, 5])
def test_static_shares_of_uneven_items_cover_every_output(cin, cout, k, size, kernel, stride, n,
                                                          threads):
    """Batches that do not run a sample per thread split the GEMM's items into
    contiguous shares of about equal work (sparse_f32.cpp), not equal counts:
    with short last blocks and channel parts, on 2, 3 and 5 threads, every
    output is written once (poisoned buffer) and matches the reference."""
    g = torch.Generator().manual_seed(cin + cout + k + size + n + threads)
    rng = random.Random(cin * 7 + size + n)
    x = torch.randn(n, cin, size, size, generator=g)
    case = Case(x, torch.randn(cout, cin, kernel, kernel, generator=g) / (cin * kernel) ** 0.5,
                torch.randn(cout, generator=g),
                _idx_tensor([_sorted_subset(rng, cout, k) for _ in range(n)], k),
                torch.rand(n, k, generator=g) + 0.5, None,
                (stride, stride), (kernel // 2, kernel // 2), (1, 1), rng.random() < 0.5)
    ho = _out_size(size, kernel // 2, 1, kernel, stride)
    assert_poisoned_out_matches_reference(case, (n, cout, ho, ho), threads)


SPLIT_SAMPLE_GEOMETRIES = [  # (cin, cout, k, size, kernel): samples of >= 8M multiply-adds
    (256, 256, 128, 7, 3),   # one block with the tail pixel; units of 48, 48, 32 channels
    (32, 64, 53, 28, 3),     # packed weights over 14 blocks: 4 panels x 2 channel units
    (128, 128, 64, 14, 3),   # output-channel form: a unit per tile of 32 channels
    (512, 256, 128, 14, 1),  # 1x1, output-channel form too
]


@pytest.mark.parametrize("cin,cout,k,size,kernel", SPLIT_SAMPLE_GEOMETRIES)
@pytest.mark.parametrize("n,threads", [(2, 2), (4, 2), (6, 3), (10, 5)])
def test_split_last_samples_match_reference(cin, cout, k, size, kernel, n, threads):
    """Batches of a sample per thread split their last samples into units that
    idle threads help with (sparse_f32.cpp): every output written once
    (poisoned buffer) and equal to the reference, random kept sets per sample."""
    g = torch.Generator().manual_seed(cin + k + size + n)
    rng = random.Random(cout * 3 + n + threads)
    x = torch.randn(n, cin, size, size, generator=g)
    x[:, torch.randperm(cin, generator=g)[: cin // 3]] = 0
    case = Case(x, torch.randn(cout, cin, kernel, kernel, generator=g) / (cin * kernel) ** 0.5,
                torch.randn(cout, generator=g),
                _idx_tensor([_sorted_subset(rng, cout, k) for _ in range(n)], k),
                torch.rand(n, k, generator=g) + 0.5, None,
                (1, 1), (kernel // 2, kernel // 2), (1, 1), rng.random() < 0.5)
    assert_poisoned_out_matches_reference(case, (n, cout, size, size), threads)


@pytest.mark.parametrize("n", [2, 13, 16])
@pytest.mark.parametrize("with_in_idx", [False, True])
@pytest.mark.parametrize("size", [4, 5, 14])
def test_batched_gate_matches_reference(n, with_in_idx, size):
    """Batches of a sample per thread compute the gate for all samples first
    (gate rows in blocks of 3, samples in groups of 8/4/2/1) where the plane is
    at most cout (4x4), else sample by sample (5x5, 14x14): same channels,
    scales and outputs as the reference, for ragged row, sample and input
    counts (cout 20 = 6 blocks of 3 + 2; cin 19 = 2 x 8 + 3)."""
    g = torch.Generator().manual_seed(n)
    cin, cout, k = 19, 20, 9
    x = torch.randn(n, cin, size, size, generator=g)  # cout = 20: 16 batched, 25 and 196 not
    x[:, 3] = 0
    w, b, gw, gb, prio = random_gated_layer(g, cin, cout, 3)
    in_idx = None
    if with_in_idx:
        in_idx = torch.stack([torch.sort(torch.randperm(cin, generator=g)[:11]).values
                              for _ in range(n)])
    args = (w, b, gw, gb, prio, k, in_idx, [1, 1], [1, 1], [1, 1], True)
    with torch_threads(2):
        y, idx, scale = torch.ops.dynprune.dynamic_conv2d(x, *args)
    ry, ridx, rscale = dynamic_reference_f64(x, args)
    assert torch.equal(idx, ridx)
    assert max_rel_err(scale, rscale) < 1e-6
    assert max_rel_err(y, ry) < 1e-5


def random_gated_layer(g, cin, cout, kernel):
    """Conv weight and bias, gate weight and bias, and priority of a random layer."""
    w = torch.randn(cout, cin, kernel, kernel, generator=g)
    b = torch.randn(cout, generator=g)
    gw, gb = torch.randn(cout, cin, generator=g), torch.rand(cout, generator=g)
    return w, b, gw, gb, torch.rand(cout, generator=g)


def dynamic_reference_f64(x, args):
    """dynamic_conv2d_reference on float64 copies of x and of args' float tensors."""
    from dynprune.ops import dynamic_conv2d_reference

    return dynamic_conv2d_reference(
        x.double(), *(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                      for a in args))


def assert_dynamic_matches_reference(x, args, threads):
    """dynamic_conv2d on `threads` threads picks the reference's channels and
    matches its float64 output."""
    with torch_threads(threads):
        y, idx, _ = torch.ops.dynprune.dynamic_conv2d(x, *args)
    ry, ridx, _ = dynamic_reference_f64(x, args)
    assert torch.equal(idx, ridx)
    assert max_rel_err(y, ry) < 1e-5


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("with_in_idx", [False, True])
@pytest.mark.parametrize("cout", [256, 301])
def test_small_input_large_gate_splits_its_rows(threads, with_in_idx, cout):
    """Batch 1, a small input and a large gate: the calling thread scans while
    the others load their share of the gate rows, then all compute uneven
    row shares (cout 301: the blocks of 3 do not split evenly)."""
    g = torch.Generator().manual_seed(cout + threads)
    cin = 256
    x = torch.randn(1, cin, 5, 5, generator=g)
    x[:, torch.randperm(cin, generator=g)[:100]] = 0
    w, b, gw, gb, prio = random_gated_layer(g, cin, cout, 3)
    in_idx = None
    if with_in_idx:
        in_idx = torch.sort(torch.randperm(cin, generator=g)[:120]).values[None]
    args = (w, b, gw, gb, prio, cout // 2, in_idx, [1, 1], [1, 1], [1, 1], True)
    assert_dynamic_matches_reference(x, args, threads)


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("cin,cout,k,size,kernel,stride", [
    (24, 20, 13, 7, 3, 1),    # shifted layout with the tail pixel
    (20, 18, 7, 4, 3, 1),     # shifted layout
    (16, 12, 7, 12, 3, 1),    # shifted layout over 3 blocks
    (10, 14, 8, 20, 3, 1),    # shifted layout over 7 blocks, packed weights
    (24, 16, 9, 7, 1, 1),     # 1x1 read in place (the last planes copied)
    (12, 40, 32, 14, 3, 1),   # output-channel form
    (16, 12, 5, 9, 3, 2),     # stride-phase wide grid
    (12, 10, 6, 12, 5, 1),    # 5x5 taps: padded grid over several blocks
])
def test_samples_on_one_thread_reuse_its_copies(threads, cin, cout, k, size, kernel, stride):
    """Batches of a sample per thread reuse each thread's wide-grid slots for
    all its samples (6 samples: 2-3 a thread): every sample still gets its own
    inputs, with different zero channels and kept sets per sample."""
    g = torch.Generator().manual_seed(cin * size + kernel)
    n = 6
    x = torch.randn(n, cin, size, size, generator=g)
    for s in range(n):
        x[s, torch.randperm(cin, generator=g)[: cin // 3]] = 0
    w, b, gw, gb, prio = random_gated_layer(g, cin, cout, kernel)
    pad = kernel // 2
    args = (w, b, gw, gb, prio, k, None, [stride] * 2, [pad] * 2, [1, 1], True)
    assert_dynamic_matches_reference(x, args, threads)


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("cin,cout,k,size", [
    (6, 8, 3, 5),      # set-up and GEMM on the calling thread
    (16, 32, 24, 24),  # set-up on the calling thread, GEMM across threads
    (256, 300, 150, 4),  # the same, but a gate of over 64k multiply-adds across threads
    (40, 24, 12, 32),  # every phase across threads (input over 32k floats)
])
def test_batch_one_schedules_match_reference(threads, cin, cout, k, size):
    """Batch 1 picks its schedule by size: each one gives the reference result."""
    g = torch.Generator().manual_seed(cin + size)
    x = torch.randn(1, cin, size, size, generator=g)
    x[:, 1] = 0
    w, b, gw, gb, prio = random_gated_layer(g, cin, cout, 3)
    args = (w, b, gw, gb, prio, k, None, [1, 1], [1, 1], [1, 1], True)
    assert_dynamic_matches_reference(x, args, threads)


@pytest.mark.parametrize("kernel,stride,padding,dilation", [
    (3, 1, 1, 1), (3, 1, 2, 2), (3, 2, 1, 1), (5, 1, 4, 2), (1, 1, 0, 1), (3, 2, 0, 2)])
@pytest.mark.parametrize("explicit_in_idx", [False, True])
def test_packed_weights_schedule_matches_reference(kernel, stride, padding, dilation,
                                                   explicit_in_idx):
    """Batches of a sample per thread on maps of many wide blocks pack each sample's
    kept weights (sparse_f32.cpp, kPackMinBlocks): that path against the reference,
    with k and kept inputs that leave partial register tiles. (Packing is AVX-512
    only; elsewhere this checks the row-pointer path on the same cases.)"""
    rng = random.Random(kernel * 100 + stride * 10 + dilation + explicit_in_idx)
    gen = torch.Generator().manual_seed(rng.randint(0, 2**31))
    n, cin, cout, k, size = 4, 23, 29, 13, 40
    x = torch.randn(n, cin, size, size, generator=gen)
    for i in range(n):
        x[i, _sorted_subset(rng, cin, rng.randint(0, cin // 2))] = 0.0
    in_idx = None
    if explicit_in_idx:
        in_idx = _idx_tensor([_sorted_subset(rng, cin, 11) for _ in range(n)], 11)
    case = Case(x, torch.randn(cout, cin, kernel, kernel, generator=gen) / (cin * kernel) ** 0.5,
                torch.randn(cout, generator=gen),
                _idx_tensor([_sorted_subset(rng, cout, k) for _ in range(n)], k),
                torch.empty(n, k).uniform_(-2.0, 2.0, generator=gen), in_idx,
                (stride, stride), (padding, padding), (dilation, dilation), True)
    with torch_threads(2):  # N = 4 on 2 threads: each sample on one thread
        y = dynprune.gated_conv2d(*case.args())
    assert_matches_reference(y, case)


def _check_cout_form(kernel, stride, padding, dilation, h, w, n, cin, k, explicit_in_idx,
                     threads=2):
    """One gated_conv2d call against the reference, and the same call with no kept
    input channel (bias and scale only)."""
    rng = random.Random(hash((kernel, stride, padding, dilation, h, w, n, cin, k,
                              explicit_in_idx)) % 2**31)
    gen = torch.Generator().manual_seed(rng.randint(0, 2**31))
    cout = 130
    x = torch.randn(n, cin, h, w, generator=gen)
    for i in range(n):
        x[i, _sorted_subset(rng, cin, rng.randint(0, cin // 2))] = 0.0
    in_idx = None
    if explicit_in_idx:
        kin = rng.randint(1, cin)
        in_idx = _idx_tensor([_sorted_subset(rng, cin, kin) for _ in range(n)], kin)
    case = Case(x, torch.randn(cout, cin, kernel, kernel, generator=gen) / (cin * kernel) ** 0.5,
                torch.randn(cout, generator=gen),
                _idx_tensor([_sorted_subset(rng, cout, k) for _ in range(n)], k),
                torch.empty(n, k).uniform_(-2.0, 2.0, generator=gen), in_idx,
                (stride, stride), (padding, padding), (dilation, dilation), rng.random() < 0.5)
    empty = Case(*case.args()[:5], torch.zeros(n, 0, dtype=torch.long), *case.args()[6:])
    with torch_threads(threads):
        y = dynprune.gated_conv2d(*case.args())
        y_empty = dynprune.gated_conv2d(*empty.args())
    assert_matches_reference(y, case)
    assert_matches_reference(y_empty, empty)


COUT_FORM_GEOMETRIES = [  # kernel, stride, padding, dilation, H, W
    (3, 1, 1, 1, 14, 14), (3, 1, 1, 1, 10, 20), (3, 1, 2, 2, 12, 15), (3, 2, 1, 1, 24, 24),
    (5, 1, 4, 2, 10, 10), (1, 1, 0, 1, 9, 9), (3, 2, 0, 2, 21, 21)]


@pytest.mark.parametrize("kernel,stride,padding,dilation,h,w", COUT_FORM_GEOMETRIES)
@pytest.mark.parametrize("k", [29, 32, 58, 64])
@pytest.mark.parametrize("explicit_in_idx", [False, True])
def test_output_channel_vector_form_matches_reference(kernel, stride, padding, dilation, h, w,
                                                      k, explicit_in_idx):
    """Batches of a sample per thread on small maps put kept output channels in the
    vector lanes (cout_vector.cpp): these geometries leave over 10% of the pixel
    form's lanes idle on 81..200 output pixels, with k filling >= 90% of 32-channel
    tiles, so that form runs here on AVX-512 CPUs (elsewhere this checks the pixel
    form). Rows split into segments (Wo = 15, 20), partial channel tiles (k = 29,
    58), stride, dilation, 1x1 and 5x5. N = 4 on 2 threads: a sample per thread."""
    _check_cout_form(kernel, stride, padding, dilation, h, w, 4, 37, k, explicit_in_idx)


@pytest.mark.parametrize("kernel,stride,padding,dilation,h,w", COUT_FORM_GEOMETRIES)
@pytest.mark.parametrize("n,cin,k", [(1, 37, 58), (1, 37, 120), (3, 37, 64), (1, 6, 64)])
def test_output_channel_vector_items_match_reference(kernel, stride, padding, dilation, h, w,
                                                     n, cin, k):
    """Smaller batches run the same form as one work item per (sample, 32 kept
    channels), where those items split evenly over the threads: 2, 4 and 6 items
    on 2 threads; (1, 6, 64) runs on the calling thread where its GEMM is under
    300k multiply-adds."""
    _check_cout_form(kernel, stride, padding, dilation, h, w, n, cin, k, True)


@pytest.mark.parametrize("relu", [False, True])
def test_output_channel_vector_form_keeps_nan_and_inf_like_the_reference(relu):
    """The output-channel form's vector epilogue: NaN passes ReLU (as torch.relu),
    -inf becomes 0 under ReLU, and pruned channels stay exactly 0. 14x14 map,
    4 samples on 2 threads, k = 64: the form runs here on AVX-512 CPUs."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(4, 16, 14, 14, generator=gen)
    x[0, 3, 5, 5] = float("nan")
    x[2, 7, 0, 13] = float("inf")
    x[3, 1, 9, 2] = float("-inf")
    w = torch.randn(96, 16, 3, 3, generator=gen) / 12
    oi = torch.stack([torch.randperm(96, generator=gen)[:64].sort().values for _ in range(4)])
    scale = torch.rand(4, 64, generator=gen) + 0.5
    args = (x, w, torch.randn(96, generator=gen), oi, scale, None, (1, 1), (1, 1), (1, 1), relu)
    with torch_threads(2):
        y = dynprune.gated_conv2d(*args)
    ref = dynprune.gated_conv2d_reference(*args)
    assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.isnan(y).any()
    assert torch.equal(torch.isinf(y), torch.isinf(ref))
    finite = torch.isfinite(ref)
    assert torch.allclose(y[finite], ref[finite], rtol=1e-5, atol=1e-5)
    kept = torch.zeros(4, 96, dtype=torch.bool).scatter(1, oi, True)
    assert (y[~kept] == 0).all()


@pytest.mark.parametrize("pos", [0, 63, 64, 200, 255, 259])
def test_in_idx_none_detects_one_value_anywhere_in_a_large_plane(pos):
    """Detection reads planes 64 floats at a time: a single non-zero in any group or
    in the tail keeps the channel; a NaN-only channel is kept too (NaN propagates);
    -0.0 everywhere is zero."""
    h, w = 20, 13  # 260 floats: four groups of 64 and a tail of 4
    x = torch.zeros(1, 4, h, w)
    x[0, 1].view(-1)[pos] = 0.5
    x[0, 2].view(-1)[pos] = float("nan")
    x[0, 3] = -0.0
    weight = torch.randn(5, 4, 3, 3)
    oi = torch.tensor([[0, 1, 2, 3, 4]])
    case = Case(x, weight, None, oi, None, None, (1, 1), (1, 1), (1, 1), False)
    y = dynprune.gated_conv2d(*case.args())
    ref = dynprune.gated_conv2d_reference(*case.double_args())
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    assert torch.isnan(y).any()  # the NaN channel was read
    finite = ~torch.isnan(ref)
    assert max_rel_err(y[finite], ref[finite]) < REL_TOL_F32


# --------------------------------------------------------------------------- output memory


@pytest.mark.parametrize("n,size,cout,offset", [
    (1, 96, 512, 0), (2, 65, 256, 0), (16, 33, 32, 0), (2, 65, 256, 3), (16, 12, 256, 0),
    (3, 14, 1024, 5)])
def test_large_output_zero_rows_are_exact(n, size, cout, offset):
    """Outputs of 2 MB and more get their pruned rows from streaming stores
    (rows of 144, 196, 1089 and 4225 floats start off the 64-byte lines;
    `offset` also misaligns the buffer itself). NaN-poisoned buffer: every
    zero must land, with samples run whole (N = 2, 16) and on the shared
    schedule (N = 1, 3)."""
    g = torch.Generator().manual_seed(size + n + offset)
    cin, k = 6, 5
    x = torch.randn(n, cin, size, size, generator=g)
    weight = torch.randn(cout, cin, 1, 1, generator=g)
    oi = torch.stack([torch.sort(torch.randperm(cout, generator=g)[:k]).values for _ in range(n)])
    s = torch.rand(n, k, generator=g)
    case = Case(x, weight, None, oi, s, None, (1, 1), (0, 0), (1, 1), False)
    assert n * cout * size * size >= 1 << 19
    flat = torch.full((n * cout * size * size + offset,), float("nan"))
    out = flat[offset:].view(n, cout, size, size)
    with torch_threads(2):
        torch.ops.dynprune.gated_conv2d.out(*case.args(), out=out)
    assert_matches_reference(out, case)
    pruned = torch.ones(n, cout, dtype=torch.bool).scatter(1, oi, False)
    assert (out[pruned] == 0).all()


def _native_cpu() -> bool:
    return dynprune.backends()["cpu"] == "native"


def test_reused_output_memory_is_fully_rewritten():
    """An output takes the memory of a freed one of the same size: poisoned with
    NaN first, every element must still be written (exact zeros in pruned rows)."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 9, 9)
    x[:, 3] = 0
    w = torch.randn(12, 8, 3, 3)
    idx = torch.tensor([[0, 4, 5, 11], [1, 2, 3, 9]])
    scale = torch.rand(2, 4) + 0.5
    ref = dynprune.gated_conv2d_reference(x.double(), w.double(), None, idx, scale.double(),
                                          None, (1, 1), (1, 1), (1, 1), False)
    first = dynprune.gated_conv2d(x, w, None, idx, scale, None, (1, 1), (1, 1), (1, 1), False)
    ptr = first.data_ptr()
    first.fill_(float("nan"))
    del first
    again = dynprune.gated_conv2d(x, w, None, idx, scale, None, (1, 1), (1, 1), (1, 1), False)
    if _native_cpu():
        assert again.data_ptr() == ptr  # the freed block came back
    assert not torch.isnan(again).any()
    assert max_rel_err(again, ref) < 1e-5
    pruned = torch.ones(2, 12, dtype=torch.bool).scatter(1, idx, False)
    assert (again[pruned] == 0).all()


def test_live_outputs_never_share_memory():
    x = torch.randn(1, 4, 6, 6)
    w = torch.randn(4, 4, 1, 1)
    idx = torch.tensor([[0, 2]])
    scale = torch.ones(1, 2)
    outs = [dynprune.gated_conv2d(x, w, None, idx, scale, None, (1, 1), (0, 0), (1, 1), False)
            for _ in range(3)]
    assert len({o.data_ptr() for o in outs}) == 3
    assert torch.equal(outs[0], outs[2])


def test_pooled_output_behaves_like_a_cpu_tensor():
    layer = dynprune.DynamicConv2d(6, 8, 3, padding=1, keep_ratio=0.5).eval()
    with torch.no_grad():
        y = layer(torch.randn(2, 6, 5, 5))
    assert y.is_contiguous() and y.device.type == "cpu"
    y.resize_(4, 8, 5, 5)  # resizable: grows through the same allocator
    y[2:] = 1.0
    assert y.shape == (4, 8, 5, 5) and (y[2:] == 1.0).all()
    assert torch.equal(torch.from_numpy(y.numpy()), y)


def test_release_memory_frees_idle_outputs():
    x = torch.randn(1, 16, 64, 64)
    w = torch.randn(16, 16, 1, 1)
    idx = torch.arange(8).view(1, 8)
    y = dynprune.gated_conv2d(x, w, None, idx, torch.ones(1, 8), None, (1, 1), (0, 0), (1, 1),
                              False)
    del y
    freed = dynprune.release_memory()
    if _native_cpu():
        from dynprune import _C
        assert freed >= 16 * 64 * 64 * 4
        assert _C.idle_output_bytes() == 0
    else:
        assert freed == 0
    assert dynprune.release_memory() == 0


def test_missing_extension_warns_plainly_and_falls_back(tmp_path):
    """A package copy without the built library imports, says the extension is
    not built (not Python's misleading circular-import message) and still
    computes correct results with the reference op."""
    import shutil
    import subprocess
    import sys
    import textwrap

    src = Path(dynprune.__file__).parent
    shutil.copytree(src, tmp_path / "dynprune", symlinks=False,
                    ignore=shutil.ignore_patterns("_C*", "__pycache__"))
    script = textwrap.dedent("""
        import os, sys, warnings
        # an editable install's finder would still serve the real dynprune._C
        sys.meta_path[:] = [f for f in sys.meta_path if "Editable" not in getattr(
            f, "__name__", type(f).__name__)]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch, dynprune
        assert dynprune.__file__.startswith(os.getcwd()), dynprune.__file__
        messages = [str(w.message) for w in caught if "native CPU kernels" in str(w.message)]
        assert len(messages) == 1, messages
        assert "not built" in messages[0] and "circular" not in messages[0], messages[0]
        info = dynprune.backends()
        assert info["cpu"] == "reference", info
        x, w = torch.randn(2, 4, 6, 6), torch.randn(5, 4, 3, 3)
        idx = torch.tensor([[0, 2], [1, 4]])
        y = dynprune.gated_conv2d(x, w, None, idx, None, None, (1, 1), (1, 1), (1, 1), False)
        ref = torch.nn.functional.conv2d(x, w, padding=1)
        for n in range(2):
            torch.testing.assert_close(y[n, idx[n]], ref[n, idx[n]])
            pruned = [c for c in range(5) if c not in idx[n].tolist()]
            assert (y[n, pruned] == 0).all()
        print("ok")
    """)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
