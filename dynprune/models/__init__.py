"""Reference networks built from plain nn.Conv2d; make them dynamic with convert()."""
from dynprune.models.resnet import ResNet18, resnet18

__all__ = ["ResNet18", "resnet18"]
