"""A CNN for 28x28 grayscale images (Fashion-MNIST / MNIST) for the FL simulator.

Wide enough (32-256 channels, ~72 M MACs per image) that compute, not per-call
overhead, dominates at batch 1, so skipping channels shows in wall-clock time.
"""
import torch.nn as nn


def _block(cin: int, cout: int) -> list:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True)]


class FashionCNN(nn.Module):
    def __init__(self, num_classes: int = 10, width: float = 1.0, in_channels: int = 1):
        super().__init__()
        c = [max(1, round(v * width)) for v in (32, 64, 128, 128, 256)]
        self.features = nn.Sequential(
            *_block(in_channels, c[0]), *_block(c[0], c[1]), nn.MaxPool2d(2),   # 14x14
            *_block(c[1], c[2]), *_block(c[2], c[3]), nn.MaxPool2d(2),          # 7x7
            *_block(c[3], c[4]), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(c[4], num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))


def fashion_cnn(num_classes: int = 10, width: float = 1.0) -> FashionCNN:
    return FashionCNN(num_classes, width)
