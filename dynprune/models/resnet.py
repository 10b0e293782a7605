"""ResNet-18 for 224x224 input, built from plain nn.Conv2d (torchvision layout)."""
import torch
import torch.nn as nn


class BasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


def make_stages(inplanes: int, widths, blocks: int) -> list:
    """ResNet stages of ``blocks`` BasicBlocks; every stage but the first halves the map."""
    stages = []
    for i, planes in enumerate(widths):
        stage = []
        for b in range(blocks):
            stage.append(BasicBlock(inplanes, planes, 2 if (i > 0 and b == 0) else 1))
            inplanes = planes
        stages.append(nn.Sequential(*stage))
    return stages


def init_convs(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


class ResNet18(nn.Module):
    """ResNet-18; ``width`` scales every channel count (a statically thinner net)."""

    def __init__(self, num_classes: int = 1000, width: float = 1.0):
        super().__init__()
        c = [max(1, round(v * width)) for v in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(3, c[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(c[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1, self.layer2, self.layer3, self.layer4 = make_stages(c[0], c, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c[3], num_classes)
        init_convs(self)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 1000, width: float = 1.0) -> ResNet18:
    return ResNet18(num_classes, width)
