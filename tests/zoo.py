"""Models written the way other projects write them (torchvision style), for
checking that convert() works on code it has never seen: small ones for the
tests (ZOO), full-size ones for benchmarks/foreign_models.py."""
import torch
import torch.nn as nn


def randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics, so a wrong fold cannot pass by accident."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.5, 0.5, generator=g)
    return model


def trained_looking(model: nn.Module) -> nn.Module:
    """Random gates on a converted model, so every sample keeps its own channels."""
    from dynprune import DynamicConv2d
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, DynamicConv2d):
            with torch.no_grad():
                # scales near 1 that vary per sample, so deep nets stay finite
                m.gate.fc.weight.normal_(0, 0.3 / m.in_channels ** 0.5, generator=g)
                m.gate.fc.bias.uniform_(0.8, 1.2, generator=g)
    return model


class BasicBlock(nn.Module):
    expansion = 1

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
        out += identity  # in place, as torchvision writes it
        return self.relu(out)


class ResNet(nn.Module):
    """Stages of BasicBlocks; the first block of each later stage halves the map.
    ``imagenet_stem``: 7x7 stride-2 conv and a max-pool (else one 3x3 conv)."""

    def __init__(self, widths=(8, 16, 32), blocks=1, imagenet_stem=False, num_classes=10):
        super().__init__()
        if imagenet_stem:
            self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        else:
            self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if imagenet_stem else nn.Identity()
        layers, inplanes = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(blocks):
                stride = 2 if i > 0 and j == 0 else 1
                down = None
                if stride != 1 or inplanes != w:
                    down = nn.Sequential(nn.Conv2d(inplanes, w, 1, stride, bias=False),
                                         nn.BatchNorm2d(w))
                layers.append(BasicBlock(inplanes, w, stride, down))
                inplanes = w
        self.layers = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layers(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def tiny_resnet(num_classes=10):
    return ResNet(num_classes=num_classes)


def resnet18(num_classes=1000):
    """torchvision's ResNet-18 layout (224x224 input)."""
    return ResNet((64, 128, 256, 512), 2, imagenet_stem=True, num_classes=num_classes)


VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
             512, 512, 512, "M"]


def vgg_bn(num_classes=10, cfg=(8, "M", 16, 16, "M", 32)):
    """A VGG with BatchNorm from a config list (VGG16_CFG: VGG-16 for 32x32 input)."""
    layers, c = [], 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            c = v
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))


class InvertedResidual(nn.Module):
    def __init__(self, inp, oup, stride, expand):
        super().__init__()
        hidden = inp * expand
        self.use_res = stride == 1 and inp == oup
        expand_layers = [nn.Conv2d(inp, hidden, 1, bias=False), nn.BatchNorm2d(hidden),
                         nn.ReLU6(inplace=True)] if expand != 1 else []
        self.conv = nn.Sequential(
            *expand_layers,
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),  # depthwise
            nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, oup, 1, bias=False), nn.BatchNorm2d(oup),
        )

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


def tiny_mobilenet(num_classes=10):
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(inplace=True),
        InvertedResidual(8, 8, 1, 2), InvertedResidual(8, 16, 2, 2), InvertedResidual(16, 16, 1, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes),
    )


def mobilenet_v2(num_classes=1000):
    """torchvision's MobileNetV2 layout (224x224 input)."""
    def conv_bn_relu6(cin, cout, kernel, stride):
        return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False),
                nn.BatchNorm2d(cout), nn.ReLU6(inplace=True)]
    layers, c = conv_bn_relu6(3, 32, 3, 2), 32
    # (expansion, channels, blocks, first stride)
    for t, out, n, s in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                         (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]:
        for i in range(n):
            layers.append(InvertedResidual(c, out, s if i == 0 else 1, t))
            c = out
    layers += conv_bn_relu6(c, 1280, 1, 1)
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2),
                         nn.Linear(1280, num_classes))


class DenseLayer(nn.Module):
    """DenseNet layer: BN-ReLU-Conv pre-activation, output concatenated."""

    def __init__(self, cin, growth):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, 2 * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(2 * growth)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(2 * growth, growth, 3, padding=1, bias=False)

    def forward(self, features):
        x = torch.cat(features, 1) if isinstance(features, list) else features
        x = self.conv1(self.relu1(self.norm1(x)))
        return self.conv2(self.relu2(self.norm2(x)))


class TinyDenseNet(nn.Module):
    def __init__(self, growth=6, num_classes=10):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.layers = nn.ModuleList([DenseLayer(8 + i * growth, growth) for i in range(3)])
        self.norm = nn.BatchNorm2d(8 + 3 * growth)
        self.fc = nn.Linear(8 + 3 * growth, num_classes)

    def forward(self, x):
        features = [self.conv0(x)]
        for layer in self.layers:
            features.append(layer(torch.cat(features, 1)))
        x = torch.relu(self.norm(torch.cat(features, 1)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


ZOO = {
    "resnet": tiny_resnet,
    "vgg": vgg_bn,
    "mobilenet": tiny_mobilenet,
    "densenet": TinyDenseNet,
}
