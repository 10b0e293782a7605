"""Federated-learning simulator: non-IID clients that adapt their own pruning policy.

* data.py: local dataset loaders (Fashion-MNIST/MNIST IDX, CIFAR-10, digits)
* partition.py: IID, Dirichlet and shard partitions with per-client test splits
* fedavg.py: client sampling, local SGD, sample-weighted averaging
* experiment.py: the four methods (dense, static, dynamic, adaptive) side by side
* evaluate.py / report.py: accuracy, executed MACs, batch-1 latency; table, JSON, CSV, plots
* cli.py: ``dynprune-fl`` / ``python -m dynprune.fl``
"""
from dynprune.fl.data import (Dataset, DatasetError, load_cifar10, load_dataset, load_digits,
                              load_idx, load_mnist_like)
from dynprune.fl.experiment import METHODS, Config, run
from dynprune.fl.fedavg import fedavg_round, local_train, sample_clients, weighted_average
from dynprune.fl.partition import ClientSplit, describe, partition

__all__ = ["METHODS", "ClientSplit", "Config", "Dataset", "DatasetError", "describe",
           "fedavg_round", "load_cifar10", "load_dataset", "load_digits", "load_idx",
           "load_mnist_like", "local_train", "partition", "run", "sample_clients",
           "weighted_average"]
