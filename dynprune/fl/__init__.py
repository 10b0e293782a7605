"""Federated-learning simulator (issue 4, in progress): local datasets and
non-IID partitions so far; FedAvg, the pruning methods and the CLI are to come."""
from dynprune.fl.data import Dataset, DatasetError, load_cifar10, load_idx, load_mnist_like
from dynprune.fl.partition import ClientSplit, describe, partition

__all__ = ["ClientSplit", "Dataset", "DatasetError", "describe", "load_cifar10", "load_idx",
           "load_mnist_like", "partition"]
