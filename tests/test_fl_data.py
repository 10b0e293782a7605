"""Dataset loaders on small files written here in the real formats."""
import gzip
import pickle
import struct

import numpy as np
import pytest

from dynprune.fl import DatasetError, load_cifar10, load_idx, load_mnist_like


def write_idx(path, array, gz=False):
    codes = {np.uint8: 0x08}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim]) + struct.pack(
        f">{array.ndim}I", *array.shape)
    data = header + array.tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


def write_mnist(folder, n_train=12, n_test=5, gz=False, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for stem, a in arrays.items():
        write_idx(folder / (stem + (".gz" if gz else "")), a, gz)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_like_round_trip(tmp_path, gz):
    arrays = write_mnist(tmp_path, gz=gz)
    ds = load_mnist_like("mnist", str(tmp_path))
    assert ds.x_train.shape == (12, 1, 28, 28) and ds.x_test.shape == (5, 1, 28, 28)
    assert ds.x_train.dtype.is_floating_point and float(ds.x_train.max()) <= 1.0
    np.testing.assert_array_equal(ds.y_train.numpy(), arrays["train-labels-idx1-ubyte"])
    np.testing.assert_allclose(ds.x_test.numpy()[:, 0] * 255,
                               arrays["t10k-images-idx3-ubyte"], atol=1e-3)


def test_data_dir_from_environment(tmp_path, monkeypatch):
    sub = tmp_path / "fashion-mnist"
    sub.mkdir()
    write_mnist(sub)
    monkeypatch.setenv("DYNPRUNE_DATA", str(tmp_path))
    assert load_mnist_like("fashion-mnist").x_train.shape[0] == 12


def test_missing_files_name_the_paths_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.delenv("DYNPRUNE_DATA", raising=False)
    with pytest.raises(DatasetError) as err:
        load_mnist_like("mnist", str(tmp_path))
    assert str(tmp_path) in str(err.value) and "t10k-labels-idx1-ubyte" in str(err.value)


def test_truncated_and_corrupt_idx(tmp_path):
    write_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(DatasetError, match="truncated or corrupt"):
        load_mnist_like("mnist", str(tmp_path))
    path.write_bytes(b"\x12\x34\x56\x78" + b"\0" * 40)
    with pytest.raises(DatasetError, match="magic"):
        load_idx(path)


def write_cifar(folder, n=4, seed=0):
    rng = np.random.default_rng(seed)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             b"labels": rng.integers(0, 10, n).tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(d, f)
        batches[name] = d
    return batches


def test_cifar10_round_trip_and_corruption(tmp_path):
    batches = write_cifar(tmp_path)
    ds = load_cifar10(str(tmp_path))
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_test.shape == (4, 3, 32, 32)
    np.testing.assert_array_equal(ds.y_test.numpy(), batches["test_batch"][b"labels"])
    first = batches["data_batch_1"][b"data"][0].reshape(3, 32, 32)
    np.testing.assert_allclose(ds.x_train[0].numpy() * 255, first, atol=1e-3)
    (tmp_path / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match="data_batch_3"):
        load_cifar10(str(tmp_path))


def test_digits_default_and_dispatch():
    from dynprune.fl import load_dataset

    ds = load_dataset("digits")
    assert ds.x_train.shape[1:] == (1, 8, 8) and len(ds.y_train) + len(ds.y_test) == 1797
    assert 0.0 <= float(ds.x_train.min()) and float(ds.x_train.max()) <= 1.0
    assert set(ds.y_test.tolist()) == set(range(10))
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet")
