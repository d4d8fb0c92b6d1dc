"""Losses against pytorch-metric-learning (an independent reference) and hand-made cases."""

import math

import pytest
import torch
from pytorch_metric_learning import distances, miners, reducers
from pytorch_metric_learning import losses as pml_losses

from fashsim.train import losses


def _batch(seed=0, p=6, k=4, dim=16, normalise=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(p * k, dim, generator=g)
    if normalise:
        x = torch.nn.functional.normalize(x, dim=1)
    labels = torch.arange(p).repeat_interleave(k)
    return x.requires_grad_(), labels


def _pml_distance(metric):
    return distances.LpDistance(normalize_embeddings=False) if metric == "euclidean" else distances.CosineSimilarity()


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("seed", range(3))
def test_batch_hard_matches_pml(metric, seed):
    x, labels = _batch(seed)
    ours = losses.batch_hard_triplet_loss(x, labels, margin=0.2, metric=metric)
    distance = _pml_distance(metric)
    triplets = miners.BatchHardMiner(distance=distance)(x, labels)
    reference = pml_losses.TripletMarginLoss(margin=0.2, distance=distance, reducer=reducers.MeanReducer())(
        x, labels, triplets
    )
    assert ours.loss.item() == pytest.approx(reference.item(), abs=1e-5)
    # gradients agree too
    (g_ours,) = torch.autograd.grad(ours.loss, x)
    (g_ref,) = torch.autograd.grad(reference, x)
    assert torch.allclose(g_ours, g_ref, atol=1e-5)


def test_soft_margin_matches_pml_smooth_loss():
    x, labels = _batch(1)
    ours = losses.batch_hard_triplet_loss(x, labels, soft=True)
    distance = _pml_distance("euclidean")
    triplets = miners.BatchHardMiner(distance=distance)(x, labels)
    reference = pml_losses.TripletMarginLoss(
        margin=0.0, smooth_loss=True, distance=distance, reducer=reducers.MeanReducer()
    )(x, labels, triplets)
    assert ours.loss.item() == pytest.approx(reference.item(), abs=1e-5)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_batch_all_matches_pml(metric):
    x, labels = _batch(2)
    ours = losses.batch_all_triplet_loss(x, labels, margin=0.3, metric=metric)
    distance = _pml_distance(metric)
    triplets = miners.TripletMarginMiner(margin=0.3, type_of_triplets="all", distance=distance)(x, labels)
    reference = pml_losses.TripletMarginLoss(margin=0.3, distance=distance)(x, labels, triplets)  # AvgNonZero
    assert ours.loss.item() == pytest.approx(reference.item(), abs=1e-5)
    assert ours.floats()["triplets"] == 6 * 4 * 3 * 20  # anchors × positives × negatives


@pytest.mark.parametrize("mining,type_of_triplets", [("batch_all", "all"), ("semi_hard", "semihard")])
def test_uneven_classes_match_pml(mining, type_of_triplets):
    """Classes of 1, 2, 5 and 9 images: anchors have different numbers of positives and
    negatives (the padded rows of the gathered triplet tensor), and a singleton has none."""
    g = torch.Generator().manual_seed(7)
    x = torch.nn.functional.normalize(torch.randn(17, 8, generator=g), dim=1).requires_grad_()
    labels = torch.tensor([0] + [1] * 2 + [2] * 5 + [3] * 9)[torch.randperm(17, generator=g)]
    ours = losses.triplet_loss(x, labels, mining=mining, margin=0.4)
    distance = _pml_distance("euclidean")
    triplets = miners.TripletMarginMiner(margin=0.4, type_of_triplets=type_of_triplets, distance=distance)(x, labels)
    reducer = None if mining == "batch_all" else reducers.MeanReducer()  # AvgNonZero for batch-all
    reference = pml_losses.TripletMarginLoss(
        margin=0.4, distance=distance, **({"reducer": reducer} if reducer else {})
    )(x, labels, triplets)
    assert ours.loss.item() == pytest.approx(reference.item(), abs=1e-5)
    (g_ours,) = torch.autograd.grad(ours.loss, x)
    (g_ref,) = torch.autograd.grad(reference, x)
    assert torch.allclose(g_ours, g_ref, atol=1e-5)
    if mining == "batch_all":  # Σ over anchors of positives × negatives
        counts = torch.bincount(labels)
        assert ours.floats()["triplets"] == int((counts * (counts - 1) * (17 - counts)).sum())


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_semi_hard_matches_pml(metric):
    x, labels = _batch(3, normalise=True)
    ours = losses.semi_hard_triplet_loss(x, labels, margin=0.5, metric=metric)
    distance = _pml_distance(metric)
    triplets = miners.TripletMarginMiner(margin=0.5, type_of_triplets="semihard", distance=distance)(x, labels)
    reference = pml_losses.TripletMarginLoss(margin=0.5, distance=distance, reducer=reducers.MeanReducer())(
        x, labels, triplets
    )
    assert len(triplets[0]) == ours.floats()["triplets"] > 0
    assert ours.loss.item() == pytest.approx(reference.item(), abs=1e-5)


def test_hand_made_batch_hard():
    # 1-d embeddings: class 0 at 0 and 1, class 1 at 1.5 and 4
    x = torch.tensor([[0.0], [1.0], [1.5], [4.0]])
    labels = torch.tensor([0, 0, 1, 1])
    out = losses.batch_hard_triplet_loss(x, labels, margin=0.2)
    # anchor 0: hp=1, hn=1.5 -> 0 ; anchor 1: hp=1, hn=0.5 -> 0.7 ; anchor 2: hp=2.5, hn=0.5 -> 2.2 ; anchor 3: hp=2.5, hn=3 -> 0
    assert out.loss.item() == pytest.approx((0 + 0.7 + 2.2 + 0) / 4)
    assert out.floats()["active_fraction"] == pytest.approx(0.5)
    assert out.floats()["hardest_pos"] == pytest.approx((1 + 1 + 2.5 + 2.5) / 4)
    assert out.floats()["hardest_neg"] == pytest.approx((1.5 + 0.5 + 0.5 + 3) / 4)


def test_hand_made_batch_all_and_semi_hard():
    x = torch.tensor([[0.0], [1.0], [1.5], [4.0]])
    labels = torch.tensor([0, 0, 1, 1])
    # triplets (a,p,n) with gap+margin, margin 1: a0: (1-1.5+1)=.5,(1-4+1)=0 ; a1: (1-.5+1)=1.5,(1-3+1)=0
    # a2: (2.5-1.5+1)=2,(2.5-.5+1)=3 ; a3: (2.5-4+1)=0,(2.5-3+1)=.5  -> non-zero: .5,1.5,2,3,.5
    out = losses.batch_all_triplet_loss(x, labels, margin=1.0)
    assert out.loss.item() == pytest.approx((0.5 + 1.5 + 2 + 3 + 0.5) / 5)
    assert out.floats()["active_fraction"] == pytest.approx(5 / 8)
    semi = losses.semi_hard_triplet_loss(x, labels, margin=1.0)
    # semi-hard: d(a,p) < d(a,n) < d(a,p)+1 -> a0 with n=1.5 (gap -.5) and a3 with n=3 (gap -.5)
    assert semi.loss.item() == pytest.approx(0.5)
    assert semi.floats()["triplets"] == 2


def test_collapsed_embeddings_give_margin_loss_and_zero_spread():
    x = torch.ones(8, 4, requires_grad=True)
    labels = torch.arange(4).repeat_interleave(2)
    out = losses.batch_hard_triplet_loss(x, labels, margin=0.3)
    assert out.loss.item() == pytest.approx(0.3)
    assert out.floats()["hardest_pos"] == 0 and out.floats()["hardest_neg"] == 0
    out.loss.backward()
    assert torch.isfinite(x.grad).all()  # no NaN from sqrt at zero distance


def test_batches_without_valid_triplets():
    x = torch.randn(4, 3, requires_grad=True)
    out = losses.batch_hard_triplet_loss(x, torch.tensor([0, 1, 2, 3]))
    assert out.loss.item() == 0 and out.floats()["valid_anchors"] == 0
    out.loss.backward()


def test_dispatch_and_errors():
    x, labels = _batch(0)
    assert losses.triplet_loss(x, labels, mining="batch_all").loss.item() > 0
    with pytest.raises(ValueError, match="mining"):
        losses.triplet_loss(x, labels, mining="random")
    with pytest.raises(ValueError, match="soft"):
        losses.triplet_loss(x, labels, mining="batch_all", soft=True)
    with pytest.raises(ValueError, match="metric"):
        losses.pairwise_distances(x, "manhattan")


@pytest.mark.parametrize("alpha", [36.0, 45.0])
@pytest.mark.parametrize("seed", range(2))
def test_angular_matches_pml(alpha, seed):
    raw, labels = _batch(seed, normalise=False)
    x = torch.nn.functional.normalize(raw, dim=1)  # as the model's output: gradients live on the sphere
    ours = losses.angular_loss(x, labels, alpha_degrees=alpha)
    reference = pml_losses.AngularLoss(alpha=alpha, reducer=reducers.MeanReducer())(x, labels)
    assert ours.loss.item() == pytest.approx(reference.item(), rel=1e-5)
    (g_ours,) = torch.autograd.grad(ours.loss, raw, retain_graph=True)
    (g_ref,) = torch.autograd.grad(reference, raw)
    assert torch.allclose(g_ours, g_ref, atol=1e-5)
    assert ours.floats()["pairs"] == 6 * 4 * 3


def test_angular_hand_made():
    """One pair (a, p) and one negative n, computed by hand from the formula."""
    a = torch.tensor([1.0, 0.0])
    p = torch.tensor([0.6, 0.8])
    n = torch.tensor([0.0, 1.0])
    x = torch.stack([a, p, n])
    labels = torch.tensor([0, 0, 1])
    t2 = math.tan(math.radians(45.0)) ** 2  # = 1
    f_ap = 4 * t2 * float((a + p) @ n) - 2 * (1 + t2) * float(a @ p)  # anchor a, positive p
    f_pa = f_ap  # symmetric for the pair (p, a)
    expected = (math.log1p(math.exp(f_ap)) + math.log1p(math.exp(f_pa))) / 2
    out = losses.angular_loss(x, labels, alpha_degrees=45.0)
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.floats()["active_fraction"] == 1.0  # n is close to the pair's midpoint: 4·0.8 − 4·0.6 > 0
    far = losses.angular_loss(torch.stack([a, p, -a]), labels, alpha_degrees=45.0)
    assert far.floats()["active_fraction"] == 0.0 and far.loss.item() < out.loss.item()
