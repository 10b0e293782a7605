"""FedAvg: the average is the sample-weighted mean; rounds are deterministic."""
import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

from dynprune.fl.fedavg import fedavg_round, local_train, sample_clients, weighted_average


def test_weighted_average_on_hand_built_parameters():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(10)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(20)}
    avg = weighted_average([a, b], [1, 3])  # weights 1/4 and 3/4
    assert torch.allclose(avg["w"], torch.tensor([2.5, 5.0]))
    assert avg["n"].dtype == torch.int64 and int(avg["n"]) == 18  # round(17.5) -> 18 (even)
    with pytest.raises(ValueError):
        weighted_average([a, {"v": torch.zeros(2), "n": torch.tensor(1)}], [1, 1])
    with pytest.raises(ValueError):
        weighted_average([a], [0])


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def client_data(n_clients=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(10 + 5 * c, 1, 6, 6, generator=g),
             torch.randint(0, 3, (10 + 5 * c,), generator=g)) for c in range(n_clients)]


def test_round_averages_params_and_buffers_by_samples():
    model, data = tiny_model(), client_data()
    locals_ = []
    for c in range(3):  # what each client would do on its own
        m = copy.deepcopy(model)
        local_train(m, *data[c], epochs=1, lr=0.1, batch_size=4, seed=7 * 100003 + c)
        locals_.append(m.state_dict())
    fedavg_round(model, data, [0, 1, 2], epochs=1, lr=0.1, batch_size=4, seed=7)
    sizes = [len(d[0]) for d in data]
    for key, value in model.state_dict().items():
        expected = sum(s[key].double() * n for s, n in zip(locals_, sizes)) / sum(sizes)
        if value.is_floating_point():
            assert torch.allclose(value.double(), expected, atol=1e-6), key
        else:
            assert int(value) == int(expected.round()), key


def test_rounds_are_deterministic_and_sampling_is_seeded():
    results = []
    for _ in range(2):
        model = tiny_model()
        rng = np.random.default_rng(5)
        for r in range(2):
            fedavg_round(model, client_data(), sample_clients(3, 0.67, rng), epochs=1, lr=0.05,
                         batch_size=4, seed=r)
        results.append(model.state_dict())
    for key in results[0]:
        assert torch.equal(results[0][key], results[1][key]), key
    assert sample_clients(10, 0.01, np.random.default_rng(0)) != []
    with pytest.raises(ValueError, match="fraction"):
        sample_clients(10, 0.0, np.random.default_rng(0))


def test_fedavg_learns_digits_on_iid_clients():
    from dynprune.fl import load_digits, partition
    from dynprune.models import fashion_cnn

    torch.manual_seed(0)
    ds = load_digits()
    splits = partition(ds.y_train, 4, "iid", seed=0)
    data = [(ds.x_train[s.train], ds.y_train[s.train]) for s in splits]
    model, rng = fashion_cnn(width=0.25), np.random.default_rng(0)
    for r in range(4):
        fedavg_round(model, data, sample_clients(4, 1.0, rng), epochs=1, lr=0.05, batch_size=32,
                     seed=r)
    model.eval()
    with torch.no_grad():
        acc = (model(ds.x_test).argmax(1) == ds.y_test).float().mean().item()
    assert acc > 0.6  # chance is 0.1
