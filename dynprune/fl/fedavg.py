"""FedAvg: client sampling, local SGD with momentum, sample-weighted averaging.

Averaging covers every parameter *and* buffer (BatchNorm statistics, gate
priorities): floating tensors by the sample-weighted mean, integer buffers
(BatchNorm's num_batches_tracked) by the rounded weighted mean. Everything is
seeded: the same seed gives the same global model.
"""
from __future__ import annotations

import copy
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["weighted_average", "sample_clients", "local_train", "fedavg_round"]


def weighted_average(states: Sequence[Dict[str, torch.Tensor]],
                     weights: Sequence[float]) -> Dict[str, torch.Tensor]:
    """Sample-weighted mean of state dicts with identical keys and shapes."""
    if not states or len(states) != len(weights):
        raise ValueError("need one weight per state dict, and at least one state")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must sum to a positive number")
    keys = states[0].keys()
    for s in states[1:]:
        if s.keys() != keys:
            raise ValueError("state dicts have different keys")
    out = {}
    for key in keys:
        ref = states[0][key]
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for s, w in zip(states, weights):
            acc += s[key].detach().to(torch.float64) * (w / total)
        out[key] = acc.to(ref.dtype) if ref.is_floating_point() else acc.round().to(ref.dtype)
    return out


def sample_clients(num_clients: int, fraction: float, rng: np.random.Generator) -> List[int]:
    """max(1, round(fraction * num_clients)) distinct clients, sorted."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    m = max(1, int(round(fraction * num_clients)))
    return sorted(rng.choice(num_clients, size=m, replace=False).tolist())


def local_train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float,
                momentum: float = 0.9, batch_size: int = 32, seed: int = 0,
                extra_loss: Optional[Callable[[nn.Module], torch.Tensor]] = None) -> float:
    """SGD with momentum on (x, y) for ``epochs``; returns the mean training loss."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), batch_size):
            b = order[start:start + batch_size]
            if len(b) < 2 and any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                  for m in model.modules()):
                continue  # BatchNorm cannot train on a single sample
            loss = F.cross_entropy(model(x[b]), y[b])
            if extra_loss is not None:
                loss = loss + extra_loss(model)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return float(np.mean(losses)) if losses else float("nan")


def fedavg_round(global_model: nn.Module, client_data: Sequence, clients: Sequence[int], *,
                 epochs: int, lr: float, momentum: float = 0.9, batch_size: int = 32,
                 seed: int = 0, extra_loss=None) -> float:
    """One FedAvg round: each listed client trains a copy of the global model on
    its (x, y); the global model becomes their sample-weighted average.
    Returns the mean local training loss."""
    states, weights, losses = [], [], []
    for c in clients:
        x, y = client_data[c]
        local = copy.deepcopy(global_model)
        losses.append(local_train(local, x, y, epochs=epochs, lr=lr, momentum=momentum,
                                  batch_size=batch_size, seed=seed * 100003 + c,
                                  extra_loss=extra_loss))
        states.append(local.state_dict())
        weights.append(len(x))
    global_model.load_state_dict(weighted_average(states, weights))
    return float(np.nanmean(losses))
