"""CIFAR networks (32x32 input) built from plain nn.Conv2d: ResNet-20/56, VGG-16 with BN."""
from typing import Sequence

import torch
import torch.nn as nn

from dynprune.models.resnet import init_convs, make_stages


class CifarResNet(nn.Module):
    """He et al. CIFAR ResNet: 3 stages of n basic blocks (16/32/64 channels, scaled by
    ``width``); downsampling shortcuts are 1x1 conv + BN (option B)."""

    def __init__(self, depth: int, num_classes: int = 10, width: float = 1.0,
                 in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        widths = [max(1, round(c * width)) for c in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1, self.layer2, self.layer3 = make_stages(widths[0], widths, n)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)
        init_convs(self)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet20(num_classes: int = 10, width: float = 1.0, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(20, num_classes, width, in_channels)


def resnet56(num_classes: int = 10, width: float = 1.0) -> CifarResNet:
    return CifarResNet(56, num_classes, width)


VGG16_CFG: Sequence = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                       512, 512, 512, "M")


class VGG(nn.Module):
    """VGG-16 with BatchNorm for 32x32 input (conv-BN-ReLU, 5 max-pools, linear head)."""

    def __init__(self, cfg: Sequence = VGG16_CFG, num_classes: int = 10, width: float = 1.0):
        super().__init__()
        layers, c = [], 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                out = max(1, round(v * width))
                layers += [nn.Conv2d(c, out, 3, padding=1, bias=False), nn.BatchNorm2d(out),
                           nn.ReLU(inplace=True)]
                c = out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def vgg16(num_classes: int = 10, width: float = 1.0) -> VGG:
    return VGG(VGG16_CFG, num_classes, width)
