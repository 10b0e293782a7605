"""Image datasets for the FL simulator, read from local files only.

* Fashion-MNIST / MNIST: the four IDX files (optionally gzipped), from
  ``--data-dir``, ``$DYNPRUNE_DATA`` or Debian's dataset-fashion-mnist
  (/usr/share/datasets/fashion-mnist).
* CIFAR-10: the python pickle batches (``data_batch_1..5``, ``test_batch``).
* digits: scikit-learn's bundled 8x8 digits (1797 images, no download), the
  tiny default for tests.

Every loader returns a :class:`Dataset` of float32 images in [0, 1], shaped
[N, C, H, W], with int64 labels. Missing, truncated or corrupt files raise
:class:`DatasetError`, naming the paths tried and how to get the data.
"""
from __future__ import annotations

import gzip
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch

__all__ = ["Dataset", "DatasetError", "load_cifar10", "load_dataset", "load_digits", "load_idx",
           "load_mnist_like"]

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
HINTS = {
    "fashion-mnist": "apt-get install -y dataset-fashion-mnist (files land in "
                     "/usr/share/datasets/fashion-mnist), or point --data-dir / DYNPRUNE_DATA "
                     "at a folder holding the four IDX files",
    "mnist": "put train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
             "t10k-labels-idx1-ubyte (optionally .gz) in --data-dir or DYNPRUNE_DATA",
    "cifar10": "unpack cifar-10-python.tar.gz so that data_batch_1..5 and test_batch are in "
               "--data-dir or DYNPRUNE_DATA (optionally under cifar-10-batches-py/)",
}


class DatasetError(RuntimeError):
    """A dataset could not be read; the message says where we looked and why."""


@dataclass
class Dataset:
    """Images ``x`` [N, C, H, W] float32 in [0, 1] and labels ``y`` [N] int64."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    def __post_init__(self):
        for x, y, split in ((self.x_train, self.y_train, "train"), (self.x_test, self.y_test, "test")):
            if x.shape[0] != y.shape[0]:
                raise DatasetError(f"{self.name} {split}: {x.shape[0]} images but {y.shape[0]} labels")


_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def load_idx(path: Path) -> np.ndarray:
    """Read one IDX file (``.gz`` allowed) into a numpy array, checking its header."""
    path = Path(path)
    try:
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DatasetError(f"{path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path} is truncated (header)")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise DatasetError(f"{path} has {len(raw)} bytes, its header promises {expected} "
                           "(truncated or corrupt)")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _candidates(name: str, data_dir: Optional[str]) -> List[Path]:
    dirs = []
    if data_dir:
        dirs.append(Path(data_dir))
    if os.environ.get("DYNPRUNE_DATA"):
        dirs.append(Path(os.environ["DYNPRUNE_DATA"]))
    if name == "fashion-mnist":
        dirs.append(DEBIAN_FASHION_MNIST)
    out = []
    for d in dirs:  # the folder itself, or a sub-folder named after the dataset
        out += [d, d / name, d / name.replace("-", "_"), d / "cifar-10-batches-py"]
    return out


def _find(folder: Path, stem: str) -> Optional[Path]:
    for suffix in ("", ".gz"):
        for candidate in (folder / (stem + suffix), folder / (stem.replace("-idx", ".idx") + suffix)):
            if candidate.is_file():
                return candidate
    return None


def load_mnist_like(name: str = "fashion-mnist", data_dir: Optional[str] = None) -> Dataset:
    """Fashion-MNIST or MNIST from IDX files (28x28 grayscale, 10 classes)."""
    stems = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    tried = _candidates(name, data_dir)
    for folder in tried:
        paths = [_find(folder, s) for s in stems]
        if all(paths):
            xtr, ytr, xte, yte = (load_idx(p) for p in paths)
            if xtr.ndim != 3 or xte.ndim != 3 or ytr.ndim != 1 or yte.ndim != 1:
                raise DatasetError(f"{name} in {folder}: unexpected array shapes "
                                   f"{xtr.shape}, {ytr.shape}, {xte.shape}, {yte.shape}")
            return Dataset(name, _images(xtr[:, None]), _labels(ytr), _images(xte[:, None]),
                           _labels(yte), 10)
    raise DatasetError(_missing(name, tried, ", ".join(stems)))


def load_cifar10(data_dir: Optional[str] = None) -> Dataset:
    """CIFAR-10 from its python pickle batches (32x32 RGB, 10 classes)."""
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    tried = _candidates("cifar10", data_dir)
    for folder in tried:
        if all((folder / n).is_file() for n in names):
            batches = [_cifar_batch(folder / n) for n in names]
            xtr = np.concatenate([b[0] for b in batches[:5]])
            ytr = np.concatenate([b[1] for b in batches[:5]])
            return Dataset("cifar10", _images(xtr), _labels(ytr), _images(batches[5][0]),
                           _labels(batches[5][1]), 10)
    raise DatasetError(_missing("cifar10", tried, ", ".join(names)))


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8x8 digits (values 0..16), split into train/test."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError as exc:
        raise DatasetError("the digits dataset needs scikit-learn: pip install scikit-learn") from exc
    d = sk_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    y = torch.from_numpy(d.target.astype(np.int64))
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(y)))
    test, train = order[:n_test], order[n_test:]
    return Dataset("digits", x[train], y[train], x[test], y[test], 10)


def load_dataset(name: str, data_dir: Optional[str] = None) -> Dataset:
    """By name: "fashion-mnist", "mnist", "cifar10" or "digits"."""
    if name in ("fashion-mnist", "mnist"):
        return load_mnist_like(name, data_dir)
    if name == "cifar10":
        return load_cifar10(data_dir)
    if name == "digits":
        return load_digits()
    raise ValueError(f"unknown dataset {name!r}: choose fashion-mnist, mnist, cifar10 or digits")


def _cifar_batch(path: Path):
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
        data, labels = np.asarray(d[b"data"], dtype=np.uint8), np.asarray(d[b"labels"])
    except Exception as exc:  # unpickling errors come in many types
        raise DatasetError(f"{path} is not a CIFAR-10 python batch: {exc}") from exc
    if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != labels.shape[0]:
        raise DatasetError(f"{path}: expected data [n, 3072] and n labels, got {data.shape} "
                           f"and {labels.shape}")
    return data.reshape(-1, 3, 32, 32), labels


def _images(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32) / 255.0)


def _labels(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.int64))


def _missing(name: str, tried: Sequence[Path], files: str) -> str:
    where = "\n  ".join(str(p) for p in tried) or "(no folder given)"
    return (f"{name} not found. Looked for {files} in:\n  {where}\n"
            f"To get it: {HINTS[name]}.")
