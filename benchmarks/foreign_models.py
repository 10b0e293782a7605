"""Whole-network speed on models dynprune has never seen.

    python benchmarks/foreign_models.py [BATCH ...]      (default: 1)

The networks below are written here, the way other projects write them
(torchvision's ResNet-18 layout with `out += identity`, a CIFAR VGG-16 with
BatchNorm built from a config list, torchvision's MobileNetV2 layout with
depthwise convs and ReLU6), and nothing in dynprune imports them. Each is
converted with `dynprune.convert` at the keep ratio that removes ~50% and
~75% of the executed MACs (bisection on `dynprune.flops`), then timed in
eval mode against the dense model, interleaved as in `dynprune-bench models`
(2 threads). The depthwise convs of MobileNetV2 stay dense (convert() leaves
grouped convs alone), so its MAC reductions come from the 1x1 convs only.
"""
import copy
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import dynprune
from dynprune.bench import _bisect, interleaved_medians


class TorchvisionBlock(nn.Module):
    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TorchvisionResNet18(nn.Module):
    def __init__(self, num_classes=1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._stage(64, 1)
        self.layer2 = self._stage(128, 2)
        self.layer3 = self._stage(256, 2)
        self.layer4 = self._stage(512, 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)

    def _stage(self, planes, stride):
        down = None
        if stride != 1 or self.inplanes != planes:
            down = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False),
                                 nn.BatchNorm2d(planes))
        blocks = [TorchvisionBlock(self.inplanes, planes, stride, down),
                  TorchvisionBlock(planes, planes)]
        self.inplanes = planes
        return nn.Sequential(*blocks)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
             512, 512, 512, "M"]


class CifarVGG16BN(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        layers, c = [], 3
        for v in VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).view(x.size(0), -1))


def conv_bn_relu6(cin, cout, kernel=3, stride=1, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups,
                                   bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        layers = [conv_bn_relu6(cin, hidden, 1)] if expand != 1 else []
        layers += [conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    # (expansion, channels, blocks, first stride)
    SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, num_classes=1000):
        super().__init__()
        layers, c = [conv_bn_relu6(3, 32, 3, 2)], 32
        for t, out, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(c, out, s if i == 0 else 1, t))
                c = out
        layers.append(conv_bn_relu6(c, 1280, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


MODELS = {  # name: (constructor, input shape)
    "tv-resnet18": (TorchvisionResNet18, (3, 224, 224)),
    "cifar-vgg16bn": (CifarVGG16BN, (3, 32, 32)),
    "mobilenetv2": (MobileNetV2, (3, 224, 224)),
}


def randomize_bn(model):
    """Trained-looking BatchNorm statistics (fresh ones are the identity)."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1, generator=g)
            m.running_var.uniform_(0.5, 1.5, generator=g)
            m.weight.data.uniform_(0.5, 1.5, generator=g)
            m.bias.data.normal_(0, 0.1, generator=g)
    return model


@torch.no_grad()
def main(argv):
    torch.set_num_threads(2)
    batches = [int(b) for b in argv] or [1]
    print("| model | batch | keep | fewer MACs | dense ms | dynamic ms | speedup |")
    print("|---|---|---|---|---|---|---|")
    for name, (make, shape) in MODELS.items():
        torch.manual_seed(0)
        dense = randomize_bn(make()).eval()
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
                m = interleaved_medians({"dense": lambda: dense(x), "dynamic": lambda: dyn(x)},
                                        6.0 if b == 1 else 10.0)
                print(f"| {name} | {b} | {keep} | {100 * fewer:.1f}% | {m['dense'] * 1e3:.2f} "
                      f"| {m['dynamic'] * 1e3:.2f} | {m['dense'] / m['dynamic']:.2f} |",
                      flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
