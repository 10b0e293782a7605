"""What the FL report measures: accuracy, executed MACs and batch-1 latency."""
from __future__ import annotations

import statistics
import time
from typing import Dict

import torch
import torch.nn as nn

from dynprune.flops import flops

__all__ = ["accuracy", "executed_macs", "latency"]


@torch.inference_mode()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy in percent of ``model`` (put in eval mode) on (x, y)."""
    if len(x) == 0:
        return float("nan")
    model.eval()
    correct = 0
    for start in range(0, len(x), batch_size):
        logits = model(x[start:start + batch_size])
        correct += int((logits.argmax(1) == y[start:start + batch_size]).sum())
    return 100.0 * correct / len(x)


@torch.inference_mode()
def executed_macs(model: nn.Module, x: torch.Tensor) -> Dict[str, float]:
    """Dense and executed MACs per sample on the images ``x`` (real gate choices)."""
    model.eval()
    report = flops(model, x)
    return {"dense_macs": float(report.dense_macs), "executed_macs": float(report.executed_macs)}


@torch.inference_mode()
def latency(models: Dict[str, nn.Module], images: torch.Tensor, reps: int = 100) -> Dict[str, float]:
    """Median batch-1 latency in ms of each model, timed side by side.

    The models take turns on the same image, cycling through ``images`` (so
    dynamic gates see varied inputs), which spreads the host's noise evenly
    over them: their ratios are what to read.
    """
    for m in models.values():
        m.eval()
        m(images[:1])  # warm-up: caches, first-call setup
    times = {name: [] for name in models}
    for r in range(reps):
        x = images[r % len(images)].unsqueeze(0)
        for name, m in models.items():
            t0 = time.perf_counter()
            m(x)
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}
