"""Federated-learning simulator (issue 4, in progress).

Done: local datasets (data.py), non-IID partitions (partition.py), FedAvg
(fedavg.py). To come: the four methods side by side, per-client gate
adaptation, the report (accuracy, executed MACs, measured latency), the
`dynprune-fl` CLI with checkpoints and --resume, plots.
"""
from dynprune.fl.data import (Dataset, DatasetError, load_cifar10, load_dataset, load_digits,
                              load_idx, load_mnist_like)
from dynprune.fl.fedavg import fedavg_round, local_train, sample_clients, weighted_average
from dynprune.fl.partition import ClientSplit, describe, partition

__all__ = ["ClientSplit", "Dataset", "DatasetError", "describe", "fedavg_round", "load_cifar10",
           "load_dataset", "load_digits", "load_idx", "load_mnist_like", "local_train", "partition", "sample_clients",
           "weighted_average"]
