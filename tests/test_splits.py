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


def test_the_course_open_set_hides_whole_categories(fmnist_train):
    from fashsim.data.course_splits import make_course_splits
    from fashsim.data.fashion_mnist import CLASS_NAMES

    labels = fmnist_train.labels
    parts, meta = make_course_splits(labels, open_set_holdout=["Coat", "Shirt", "Sneaker"])
    held = [CLASS_NAMES.index(name) for name in ("Coat", "Shirt", "Sneaker")]
    for seen, closed in (("open_train", "train"), ("open_val", "val")):
        assert not np.isin(labels[parts[seen]], held).any()  # never trained or validated on
        assert np.isin(parts[seen], parts[closed]).all()  # the closed-set split, less those classes
        assert len(parts[seen]) == (~np.isin(labels[parts[closed]], held)).sum()
    assert meta["open_set_holdout"] == ["Coat", "Shirt", "Sneaker"]
    for bad in (["Cat"], []):
        with pytest.raises(ValueError, match="must name Fashion-MNIST categories"):
            make_course_splits(labels, open_set_holdout=bad)


def test_save_and_load_round_trip(tmp_path):
    parts = {"train": np.arange(5), "val": np.array([7, 9])}
    splits.save_splits(tmp_path / "s.npz", parts, seed=1, holdout=["Coat"])
    loaded, meta = splits.load_splits(tmp_path / "s.npz")
    assert meta == {"seed": 1, "holdout": ["Coat"]}
    assert loaded["val"].tolist() == [7, 9] and loaded["train"].tolist() == [0, 1, 2, 3, 4]
    assert not list(tmp_path.glob("*.tmp"))
