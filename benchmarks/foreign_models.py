"""Whole-network speed on models dynprune has never seen.

    python benchmarks/foreign_models.py [BATCH ...]      (default: 1)

The networks come from tests/zoo.py, written the way other projects write
them (torchvision's ResNet-18 layout with `out += identity`, a CIFAR VGG-16
with BatchNorm built from a config list, torchvision's MobileNetV2 layout with
depthwise convs and ReLU6); nothing in dynprune imports them. Each is
converted with `dynprune.convert` at the keep ratio that removes ~50% and
~75% of the executed MACs (bisection on `dynprune.flops`), then timed in
eval mode against the dense model, interleaved as in `dynprune-bench models`
(2 threads), and against the dense model with the fast path's dense layers
only ("dense+fast": convert() with no conv made dynamic), the pruning's own
share. The depthwise convs of MobileNetV2 stay dense (convert() leaves
grouped convs alone; they run a native depthwise kernel, in dense+fast too),
so its MAC reductions come from the 1x1 convs only.
"""
import copy
import os
import sys

import torch

import dynprune
from dynprune.bench import _bisect, interleaved_medians, keep_freed_memory

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))
from zoo import VGG16_CFG, mobilenet_v2, randomize_bn, resnet18, vgg_bn  # noqa: E402

MODELS = {  # name: (constructor, input shape)
    "tv-resnet18": (resnet18, (3, 224, 224)),
    "cifar-vgg16bn": (lambda: vgg_bn(cfg=VGG16_CFG), (3, 32, 32)),
    "mobilenetv2": (mobilenet_v2, (3, 224, 224)),
}


@torch.no_grad()
def main(argv):
    torch.set_num_threads(2)
    keep_freed_memory()
    batches = [int(b) for b in argv] or [1]
    print("| model | batch | keep | fewer MACs | dense ms | dense+fast ms | dynamic ms | speedup "
          "| vs dense+fast |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (make, shape) in MODELS.items():
        torch.manual_seed(0)
        dense = randomize_bn(make()).eval()
        # The dense model with the fast path's dense layers (BN folded, native
        # pools, classifier and depthwise convs) and no conv made dynamic: what
        # the dense ops alone gain, so the last column is the pruning's share.
        fast = dynprune.convert(copy.deepcopy(dense), filter_fn=lambda conv, name: False).eval()
        probe = torch.randn(1, *shape)
        for reduction in (0.5, 0.75):
            def executed(keep):
                return dynprune.flops(dynprune.convert(copy.deepcopy(dense), keep_ratio=keep),
                                      probe).ratio
            keep = round(_bisect(executed, 1 - reduction, 0.05, 1.0, 10), 3)
            dyn = dynprune.convert(copy.deepcopy(dense), keep_ratio=keep).eval()
            fewer = 1 - dynprune.flops(dyn, probe).ratio
            for b in batches:
                x = torch.randn(b, *shape)
                ref, got = dense(x), dyn(x)
                assert got.shape == ref.shape and torch.isfinite(got).all()
                m = interleaved_medians({"dense": lambda: dense(x), "fast": lambda: fast(x),
                                         "dynamic": lambda: dyn(x)}, 6.0 if b == 1 else 10.0)
                print(f"| {name} | {b} | {keep} | {100 * fewer:.1f}% | {m['dense'] * 1e3:.2f} "
                      f"| {m['fast'] * 1e3:.2f} | {m['dynamic'] * 1e3:.2f} "
                      f"| {m['dense'] / m['dynamic']:.2f} | {m['fast'] / m['dynamic']:.2f} |",
                      flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
