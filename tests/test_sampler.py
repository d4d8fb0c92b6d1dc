from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from fashsim.data.sampler import PKBatchSampler


def test_every_batch_has_p_classes_times_k_images(fmnist_train):
    labels = fmnist_train.labels[:6000]
    sampler = PKBatchSampler(labels, p=8, k=4, seed=0)
    assert len(sampler) == 6000 // 32
    for batch in sampler:
        assert len(batch) == 32 and len(set(batch)) == 32  # no image twice in a batch
        counts = Counter(labels[batch].tolist())
        assert len(counts) == 8 and set(counts.values()) == {4}
        # laid out class by class: K consecutive indices share a label
        assert all(len(set(labels[batch[i : i + 4]])) == 1 for i in range(0, 32, 4))


def test_reproducible_by_seed_and_epoch(fmnist_test):
    labels = fmnist_test.labels
    a = list(PKBatchSampler(labels, p=10, k=5, seed=1))
    b = list(PKBatchSampler(labels, p=10, k=5, seed=1))
    assert a == b
    c = list(PKBatchSampler(labels, p=10, k=5, seed=2))
    assert a != c
    sampler = PKBatchSampler(labels, p=10, k=5, seed=1)
    sampler.set_epoch(1)
    assert list(sampler) != a


def test_an_epoch_covers_nearly_every_image(fmnist_test):
    labels = fmnist_test.labels
    sampler = PKBatchSampler(labels, p=10, k=10, seed=0)
    seen = {i for batch in sampler for i in batch}
    assert len(seen) == len(labels)  # balanced classes, queue per class: full coverage


def test_classes_smaller_than_k_repeat_images():
    labels = np.array([0] * 2 + [1] * 10 + [2] * 10)
    with pytest.warns(UserWarning, match="single image"):
        PKBatchSampler(np.array([0, 1, 1, 2, 2]), p=2, k=2)
    for batch in PKBatchSampler(labels, p=3, k=4, seed=0, batches_per_epoch=5):
        assert Counter(labels[batch].tolist()) == {0: 4, 1: 4, 2: 4}


def test_invalid_configurations():
    with pytest.raises(ValueError, match="only 2 classes"):
        PKBatchSampler([0, 0, 1, 1], p=3, k=2)
    with pytest.raises(ValueError, match="k >= 2"):
        PKBatchSampler([0, 0, 1, 1], p=2, k=1)


def test_works_as_a_dataloader_batch_sampler(fmnist_test):
    labels = torch.from_numpy(fmnist_test.labels[:1000])
    loader = DataLoader(TensorDataset(labels), batch_sampler=PKBatchSampler(labels.numpy(), p=5, k=4, seed=0))
    (first,) = next(iter(loader))
    assert first.shape == (20,) and len(first.unique()) == 5
