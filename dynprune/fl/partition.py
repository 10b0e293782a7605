"""Non-IID partitions of a dataset over federated clients.

Every partition assigns each training sample to exactly one client; each
client's samples are then split into its local train and test sets, so the
local test set follows that client's own label distribution. Seeded and
reproducible.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import numpy as np
import torch

__all__ = ["ClientSplit", "iid", "dirichlet", "shards", "partition", "describe"]


@dataclass
class ClientSplit:
    """Indices into the training set: this client's local train and test samples."""

    train: np.ndarray
    test: np.ndarray


def iid(labels: np.ndarray, clients: int, rng: np.random.Generator) -> List[np.ndarray]:
    """Uniformly random, equal-size shares."""
    return [np.sort(p) for p in np.array_split(rng.permutation(len(labels)), clients)]


def dirichlet(labels: np.ndarray, clients: int, beta: float,
              rng: np.random.Generator) -> List[np.ndarray]:
    """Label skew: each class is split over clients by proportions ~ Dir(beta).

    Smaller beta gives more skew (beta -> inf approaches IID).
    """
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    shares: List[list] = [[] for _ in range(clients)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        cuts = (np.cumsum(rng.dirichlet(np.full(clients, beta))) * len(idx)).astype(int)[:-1]
        for client, part in enumerate(np.split(idx, cuts)):
            shares[client].extend(part.tolist())
    return [np.sort(np.asarray(s, dtype=np.int64)) for s in shares]


def shards(labels: np.ndarray, clients: int, classes_per_client: int,
           rng: np.random.Generator) -> List[np.ndarray]:
    """Pathological non-IID (McMahan et al.): sort by label, cut into
    ``clients * classes_per_client`` shards, give each client that many."""
    if classes_per_client < 1:
        raise ValueError(f"classes_per_client must be >= 1, got {classes_per_client}")
    order = np.argsort(labels, kind="stable")
    pieces = np.array_split(order, clients * classes_per_client)
    pick = rng.permutation(len(pieces))
    return [np.sort(np.concatenate([pieces[j] for j in
                                    pick[i * classes_per_client:(i + 1) * classes_per_client]]))
            for i in range(clients)]


def partition(labels, clients: int, scheme: str = "dirichlet", *, beta: float = 0.5,
              classes_per_client: int = 2, test_fraction: float = 0.2,
              seed: int = 0) -> List[ClientSplit]:
    """Split sample indices over ``clients``, then each client's into train/test.

    Args:
        labels: [N] integer labels of the pool being partitioned.
        scheme: "iid", "dirichlet" or "shards".
        test_fraction: share of each client's samples held out as its local test set.
    """
    labels = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if clients < 1 or clients > len(labels):
        raise ValueError(f"clients must be in [1, {len(labels)}], got {clients}")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = iid(labels, clients, rng)
    elif scheme == "dirichlet":
        parts = dirichlet(labels, clients, beta, rng)
    elif scheme == "shards":
        parts = shards(labels, clients, classes_per_client, rng)
    else:
        raise ValueError(f"scheme must be 'iid', 'dirichlet' or 'shards', got {scheme!r}")
    splits = []
    for p in parts:
        p = rng.permutation(p)
        n_test = int(round(test_fraction * len(p)))
        splits.append(ClientSplit(np.sort(p[n_test:]), np.sort(p[:n_test])))
    return splits


def describe(splits: List[ClientSplit], labels, num_classes: int) -> str:
    """A printable table: samples and label histogram per client."""
    labels = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    lines = [f"{'client':>6} {'train':>6} {'test':>5} {'classes':>7}  label counts (train)"]
    for i, s in enumerate(splits):
        counts = np.bincount(labels[s.train], minlength=num_classes)
        lines.append(f"{i:>6} {len(s.train):>6} {len(s.test):>5} {int((counts > 0).sum()):>7}  "
                     + " ".join(f"{c:>4}" for c in counts))
    return "\n".join(lines)
