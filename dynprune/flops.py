"""Dense vs executed multiply-accumulates (MACs), per sample."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch
import torch.nn as nn

from dynprune.nn import DynamicConv2d

__all__ = ["FlopsReport", "flops"]


@dataclass
class FlopsReport:
    """MACs per sample, averaged over the example batch."""

    dense_macs: float
    executed_macs: float
    layers: List[dict] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        """executed / dense (0.5 = half the MACs)."""
        return self.executed_macs / self.dense_macs if self.dense_macs else 1.0

    def __str__(self) -> str:
        return (f"dense {self.dense_macs / 1e6:.2f} MMAC, executed {self.executed_macs / 1e6:.2f} "
                f"MMAC per sample ({100 * (1 - self.ratio):.1f}% fewer)")


def _active_channels(x: torch.Tensor) -> torch.Tensor:
    """Per sample, the number of input channels holding any non-zero value."""
    return x.ne(0).flatten(2).any(2).sum(1).to(torch.float64)


@torch.no_grad()
def flops(model: nn.Module, example_input: torch.Tensor) -> FlopsReport:
    """Count MACs of convolutions and linear layers on ``example_input``.

    Runs ``model`` in eval mode (restoring its mode afterwards). A
    DynamicConv2d executes ``k`` kept output channels over the input channels
    that are non-zero in each sample (what the kernel computes); a plain
    nn.Conv2d / nn.Linear executes everything. Other layers (BN, pooling,
    the gates' tiny linear layers) are not counted.
    """
    if isinstance(example_input, torch.Tensor) and example_input.dim() > 0 \
            and example_input.shape[0] == 0:
        raise ValueError("flops() counts MACs per sample: example_input has an empty batch")
    layers: List[dict] = []
    gates = {id(m.gate.fc) for m in model.modules() if isinstance(m, DynamicConv2d)}

    def conv_hook(name):
        def hook(mod, inputs, output):
            x = inputs[0]
            per_tap = mod.kernel_size[0] * mod.kernel_size[1] * output.shape[2] * output.shape[3]
            dense = mod.out_channels * (mod.in_channels // mod.groups) * per_tap
            if isinstance(mod, DynamicConv2d):
                executed = float((mod.k * _active_channels(x) * per_tap).mean())
            else:
                executed = float(dense)
            layers.append({"name": name, "dense": float(dense), "executed": executed})
        return hook

    def linear_hook(name):
        def hook(mod, inputs, output):
            macs = float(mod.in_features * mod.out_features * output[..., 0].numel()
                         / max(1, inputs[0].shape[0]))
            layers.append({"name": name, "dense": macs, "executed": macs})
        return hook

    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d):
            handles.append(mod.register_forward_hook(conv_hook(name)))
        elif isinstance(mod, nn.Linear) and id(mod) not in gates:
            handles.append(mod.register_forward_hook(linear_hook(name)))
    was_training = model.training
    model.eval()
    try:
        model(example_input)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return FlopsReport(sum(l["dense"] for l in layers), sum(l["executed"] for l in layers), layers)
