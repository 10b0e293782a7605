"""DynamicConv2d on layer shapes outside the benchmark's ResNet-18/VGG-16 set.

    python benchmarks/other_shapes.py [BATCH ...]      (default: 1 16)

Kernels 1/3/5, stride 2, channel counts that are not powers of two, at keep
0.5 on input and output channels, 2 threads; interleaved medians of dense
nn.Conv2d, DynamicConv2d (eval) and the static conv of the kept size, as in
`dynprune-bench layers`. Prints one line per shape.
"""
import sys

import torch
import torch.nn as nn

from dynprune.bench import interleaved_medians, keep_freed_memory, zero_channels
from dynprune.nn import DynamicConv2d

SHAPES = [  # (in channels, out channels, map size, kernel, stride)
    (256, 256, 14, 1, 1), (128, 256, 28, 3, 2), (64, 64, 32, 5, 1), (96, 96, 20, 3, 1),
    (48, 48, 10, 3, 1), (512, 512, 7, 1, 1), (64, 128, 56, 1, 2), (160, 160, 12, 3, 1),
    (384, 384, 13, 3, 1), (32, 32, 64, 3, 1),
    # one-pixel and two-by-two maps (late layers of a ResNet on small inputs)
    (512, 512, 1, 1, 1), (512, 512, 1, 3, 1), (512, 512, 2, 1, 1),
    (512, 512, 7, 3, 2),  # stride 2 to a 4x4 output (tap copies)
    (256, 512, 2, 3, 2),  # stride 2 to a one-pixel output (2x2 of the taps read the map)
    # 1x1 convs of ResNet-50 and MobileNetV2 blocks
    (1024, 256, 14, 1, 1), (512, 2048, 7, 1, 1), (2048, 512, 7, 1, 1), (24, 144, 56, 1, 1),
    (256, 64, 56, 1, 1), (64, 256, 56, 1, 1), (128, 512, 28, 1, 1), (512, 128, 28, 1, 1),
    (256, 1024, 14, 1, 1),
]


@torch.no_grad()
def case(cin, cout, size, kernel, stride, batch, keep=0.5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dense = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2).eval()
    dyn = DynamicConv2d.from_conv(dense, keep_ratio=keep).eval()
    dyn.gate.fc.weight.normal_(generator=gen)  # per-sample choices, as in dynprune.bench
    kin = max(1, round(keep * cin))
    x = zero_channels(torch.randn(batch, cin, size, size, generator=gen), kin, gen)
    static = nn.Conv2d(kin, dyn.k, kernel, stride=stride, padding=kernel // 2).eval()
    xs = torch.randn(batch, kin, size, size, generator=gen)
    return {"dense": lambda: dense(x), "dynamic": lambda: dyn(x), "static": lambda: static(xs)}


def main(argv):
    torch.set_num_threads(2)
    keep_freed_memory()
    batches = [int(b) for b in argv] or [1, 16]
    with torch.no_grad():
        for b in batches:
            for cin, cout, size, kernel, stride in SHAPES:
                m = interleaved_medians(case(cin, cout, size, kernel, stride, b),
                                        2.0 if b == 1 else 4.0)
                print(f"batch {b:<3} {cin}->{cout} {size}x{size} k{kernel} s{stride}: "
                      f"dense {m['dense'] * 1e3:7.3f} dynamic {m['dynamic'] * 1e3:7.3f} "
                      f"static {m['static'] * 1e3:7.3f} ms  dyn/static "
                      f"{m['dynamic'] / m['static']:.2f}  dense/dyn {m['dense'] / m['dynamic']:.2f}",
                      flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
