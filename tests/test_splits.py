import numpy as np
import pytest

from fashsim.data import splits


def test_stratified_split_is_disjoint_complete_and_reproducible(fmnist_train):
    labels = fmnist_train.labels
    parts = splits.train_val_test_split(labels, val_fraction=0.1, test_fraction=0.2, seed=3)
    sizes = {k: len(v) for k, v in parts.items()}
    assert sizes == {"train": 42000, "val": 6000, "test": 12000}
    joined = np.concatenate(list(parts.values()))
    assert len(np.unique(joined)) == len(labels)  # disjoint and complete
    assert np.bincount(labels[parts["val"]]).tolist() == [600] * 10  # stratified
    again = splits.train_val_test_split(labels, val_fraction=0.1, test_fraction=0.2, seed=3)
    assert all(np.array_equal(parts[k], again[k]) for k in parts)
    other = splits.train_val_test_split(labels, val_fraction=0.1, test_fraction=0.2, seed=4)
    assert not np.array_equal(parts["val"], other["val"])


def test_no_test_part_by_default(fmnist_test):
    parts = splits.train_val_test_split(fmnist_test.labels)
    assert len(parts["test"]) == 0 and len(parts["val"]) == 1000


def test_bad_fractions():
    with pytest.raises(ValueError):
        splits.train_val_test_split([0, 1] * 10, val_fraction=0.6, test_fraction=0.5)


def test_open_set_hides_whole_categories(fmnist_train):
    labels = fmnist_train.labels
    parts = splits.open_set_split(labels, [4, 6, 7], val_fraction=0.1, seed=0)
    seen = np.concatenate([parts["train"], parts["val"]])
    assert not np.isin(labels[seen], [4, 6, 7]).any()
    assert set(np.unique(labels[parts["unseen"]])) == {4, 6, 7}
    assert len(seen) + len(parts["unseen"]) == len(labels)
    with pytest.raises(ValueError):
        splits.open_set_split(labels, [42])
    with pytest.raises(ValueError):
        splits.open_set_split(labels, range(10))


def test_save_and_load_round_trip(tmp_path):
    parts = {"train": np.arange(5), "val": np.array([7, 9])}
    splits.save_splits(tmp_path / "s.npz", parts, seed=1, holdout=["Coat"])
    loaded, meta = splits.load_splits(tmp_path / "s.npz")
    assert meta == {"seed": 1, "holdout": ["Coat"]}
    assert loaded["val"].tolist() == [7, 9] and loaded["train"].tolist() == [0, 1, 2, 3, 4]
    assert not list(tmp_path.glob("*.tmp"))
