"""Reference networks built from plain nn.Conv2d; make them dynamic with convert().

Each takes ``width`` to scale all channel counts: the statically pruned model
with the same channel counts that benchmarks compare against.
"""
from dynprune.models.cifar import CifarResNet, VGG, resnet20, resnet56, vgg16
from dynprune.models.fashion import FashionCNN, fashion_cnn
from dynprune.models.resnet import ResNet18, resnet18

MODELS = {
    "resnet18": (resnet18, (3, 224, 224), 1000),
    "resnet20": (resnet20, (3, 32, 32), 10),
    "resnet56": (resnet56, (3, 32, 32), 10),
    "vgg16": (vgg16, (3, 32, 32), 10),
}

__all__ = ["CifarResNet", "FashionCNN", "MODELS", "ResNet18", "VGG", "fashion_cnn", "resnet18",
           "resnet20", "resnet56", "vgg16"]
