"""Partition properties: coverage, skew, reproducibility."""
import numpy as np
import pytest

from dynprune.fl import describe, partition

LABELS = np.repeat(np.arange(10), 100)  # 1000 samples, 10 balanced classes


def all_indices(splits):
    return np.concatenate([np.concatenate([s.train, s.test]) for s in splits])


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
def test_every_sample_assigned_exactly_once(scheme):
    splits = partition(LABELS, 20, scheme, beta=0.5, classes_per_client=2, seed=1)
    idx = all_indices(splits)
    assert len(idx) == len(LABELS) and len(np.unique(idx)) == len(LABELS)
    for s in splits:
        assert len(np.intersect1d(s.train, s.test)) == 0


def label_skew(splits):
    """Mean total-variation distance between a client's label mix and the global one."""
    glob = np.bincount(LABELS, minlength=10) / len(LABELS)
    tv = []
    for s in splits:
        idx = np.concatenate([s.train, s.test])
        if len(idx):
            tv.append(0.5 * np.abs(np.bincount(LABELS[idx], minlength=10) / len(idx) - glob).sum())
    return float(np.mean(tv))


def test_dirichlet_skew_grows_as_beta_falls():
    skews = [np.mean([label_skew(partition(LABELS, 20, "dirichlet", beta=b, seed=s))
                      for s in range(3)]) for b in (100.0, 1.0, 0.1)]
    assert skews[0] < skews[1] < skews[2]
    assert label_skew(partition(LABELS, 20, "iid", seed=0)) < skews[1]


def test_shards_give_few_classes_per_client():
    for s in partition(LABELS, 10, "shards", classes_per_client=2, seed=0):
        classes = np.unique(LABELS[np.concatenate([s.train, s.test])])
        assert 1 <= len(classes) <= 2


def test_seeds_reproduce_and_differ():
    a = partition(LABELS, 8, "dirichlet", seed=3)
    b = partition(LABELS, 8, "dirichlet", seed=3)
    c = partition(LABELS, 8, "dirichlet", seed=4)
    assert all(np.array_equal(x.train, y.train) and np.array_equal(x.test, y.test)
               for x, y in zip(a, b))
    assert not all(np.array_equal(x.train, y.train) for x, y in zip(a, c))


def test_local_test_split_follows_client_labels():
    splits = partition(LABELS, 10, "shards", classes_per_client=1, test_fraction=0.25, seed=0)
    for s in splits:
        assert set(LABELS[s.test]) <= set(LABELS[s.train])
        assert abs(len(s.test) - 0.25 * (len(s.train) + len(s.test))) <= 1


def test_bad_arguments_and_describe():
    with pytest.raises(ValueError, match="beta"):
        partition(LABELS, 5, "dirichlet", beta=0)
    with pytest.raises(ValueError, match="scheme"):
        partition(LABELS, 5, "random")
    with pytest.raises(ValueError, match="clients"):
        partition(LABELS, 0)
    table = describe(partition(LABELS, 3, "iid"), LABELS, 10)
    assert len(table.splitlines()) == 4 and "label counts" in table
