"""Metrics against hand computation, scikit-learn and pytorch-metric-learning's AccuracyCalculator."""

import numpy as np
import pytest
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from sklearn.metrics import average_precision_score

from fashsim.evaluation import metrics


def clustered(n=600, dim=16, classes=6, noise=0.9, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    x = rng.normal(size=(classes, dim))[labels] + noise * rng.normal(size=(n, dim))
    return x.astype(np.float32), labels


def test_hand_computed_leave_one_out():
    # 1-d-ish points on a circle: a0 a1 b0 b1 in angle order, so each item's neighbours are known
    angles = np.array([0.0, 0.1, 1.0, 1.15])
    x = np.stack([np.cos(angles), np.sin(angles)], 1)
    labels = np.array([0, 0, 1, 1])
    m = metrics.retrieval_metrics(x, labels, ks=(1, 2))
    # every item's nearest neighbour is its class mate; R = 1 for every query
    assert m["recall@1"] == 1.0 and m["precision@1"] == 1.0 and m["map@r"] == 1.0 and m["r_precision"] == 1.0
    assert m["precision@2"] == pytest.approx(0.5)
    labels = np.array([0, 1, 0, 1])  # now every nearest neighbour is wrong
    m = metrics.retrieval_metrics(x, labels, ks=(1, 2, 3))
    assert m["recall@1"] == 0.0 and m["map@r"] == 0.0
    # rank of the one relevant item: item 0 -> 2 (0.1 is b, 1.0 is a), item 1 -> 3, item 2 -> 3, item 3 -> 2
    assert m["recall@2"] == 0.5 and m["precision@2"] == pytest.approx((0.5 + 0 + 0 + 0.5) / 4)
    assert m["recall@3"] == 1.0 and m["map@r"] == 0.0


def test_map_at_r_by_hand():
    # query q with R=2 relevant items ranked 1st and 3rd: MAP@R = (1/2)(1/1 + 0) = 0.5
    gallery = np.array([[1.0, 0.0], [0.9, 0.1], [0.8, 0.3], [0.0, 1.0]], np.float32)
    labels = np.array([1, 0, 1, 0])
    m = metrics.retrieval_metrics(
        gallery, labels, query_embeddings=np.array([[1.0, 0.02]]), query_labels=np.array([1]), ks=(1,)
    )
    assert m["map@r"] == pytest.approx(0.5) and m["r_precision"] == pytest.approx(0.5)


@pytest.mark.parametrize("seed", [0, 1])
def test_leave_one_out_matches_pytorch_metric_learning(seed):
    x, labels = clustered(seed=seed)
    ours = metrics.retrieval_metrics(x, labels, ks=(1,))
    calc = AccuracyCalculator(
        include=("precision_at_1", "r_precision", "mean_average_precision_at_r"), k="max_bin_count", device=None
    )
    import torch

    ref = calc.get_accuracy(torch.from_numpy(metrics._normalise(x)), torch.from_numpy(labels))
    assert ours["precision@1"] == pytest.approx(ref["precision_at_1"], abs=1e-6)
    assert ours["r_precision"] == pytest.approx(ref["r_precision"], abs=1e-6)
    assert ours["map@r"] == pytest.approx(ref["mean_average_precision_at_r"], abs=1e-6)


def test_query_vs_gallery_matches_pytorch_metric_learning():
    import torch

    x, labels = clustered(n=800)
    q, g, ql, gl = x[:200], x[200:], labels[:200], labels[200:]
    ours = metrics.retrieval_metrics(g, gl, query_embeddings=q, query_labels=ql, ks=(1,))
    calc = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"), k="max_bin_count")
    ref = calc.get_accuracy(
        torch.from_numpy(metrics._normalise(q)),
        torch.from_numpy(ql),
        torch.from_numpy(metrics._normalise(g)),
        torch.from_numpy(gl),
    )
    assert ours["precision@1"] == pytest.approx(ref["precision_at_1"], abs=1e-6)
    assert ours["map@r"] == pytest.approx(ref["mean_average_precision_at_r"], abs=1e-6)


def test_chunking_does_not_change_results():
    x, labels = clustered(n=300)
    a = metrics.retrieval_metrics(x, labels, chunk_size=7)
    b = metrics.retrieval_metrics(x, labels, chunk_size=1000)
    assert a == pytest.approx(b)


def test_full_map_matches_sklearn():
    x, labels = clustered(n=200)
    xn = metrics._normalise(x)
    expected = []
    for i in range(len(x)):
        others = np.arange(len(x)) != i
        expected.append(average_precision_score(labels[others] == labels[i], xn[others] @ xn[i]))
    assert metrics.mean_average_precision(x, labels, chunk_size=33) == pytest.approx(np.mean(expected), abs=1e-6)


def test_triplet_accuracy_extremes():
    x, labels = clustered(n=400, noise=0.01)
    assert metrics.triplet_accuracy(x, labels, n_triplets=5000) == 1.0
    rng = np.random.default_rng(0)
    random = metrics.triplet_accuracy(rng.normal(size=(400, 16)), labels, n_triplets=20000)
    assert 0.45 < random < 0.55


def test_knn_confusion_and_per_class():
    x, labels = clustered(n=600, noise=0.05)
    predicted = metrics.knn_predict(x, labels, k=5)
    assert (predicted == labels).mean() == 1.0
    cm = metrics.confusion_matrix(labels, predicted, 6)
    assert np.trace(cm) == 600 and cm.sum() == 600
    assert set(metrics.per_class_recall_at_1(x, labels).values()) == {1.0}


def test_raw_pixels_on_real_fashion_mnist(fmnist_test):
    """The number everyone can reproduce: raw-pixel cosine kNN on the test split."""
    x = fmnist_test.images.reshape(len(fmnist_test), -1).astype(np.float32)
    m = metrics.retrieval_metrics(x, fmnist_test.labels)
    assert m["recall@1"] == pytest.approx(0.8146, abs=1e-4)
    assert m["map@r"] == pytest.approx(0.3308, abs=1e-3)
