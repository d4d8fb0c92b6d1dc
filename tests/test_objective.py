"""The loss of one batch (fashsim.train.objective.compute_loss) and the training configuration."""

import pytest
import torch
import torch.nn.functional as F

from fashsim.model.networks import EmbeddingNet
from fashsim.train import TrainConfig
from fashsim.train.config import setting_defaults
from fashsim.train.losses import angular_loss, triplet_loss
from fashsim.train.objective import Batch, compute_loss, mining_at, stats_to_floats


@pytest.fixture(scope="module")
def model_and_batch():
    torch.manual_seed(0)
    model = EmbeddingNet("small_cnn", num_classes=4).eval()  # eval: BatchNorm leaves its statistics alone
    x = torch.randn(16, 1, 28, 28)
    y = torch.arange(4).repeat_interleave(4)  # P=4 classes × K=4 images
    return model, Batch(x, y)


def _reference_embeddings(model, batch):
    raw = model.raw_embedding(batch.inputs)
    return raw, F.normalize(raw.float(), dim=1)


@pytest.mark.parametrize("mining", ["batch_hard", "batch_all", "semi_hard"])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_triplet_loss_for_every_mining(model_and_batch, mining, metric):
    model, batch = model_and_batch
    loss, stats = compute_loss(TrainConfig(mining=mining, metric=metric, margin=0.3), model, batch, step=0)
    stats = stats_to_floats(stats)
    _, embeddings = _reference_embeddings(model, batch)
    expected = triplet_loss(embeddings, batch.labels, mining=mining, margin=0.3, metric=metric)
    assert loss.item() == pytest.approx(expected.loss.item(), rel=1e-6)
    assert stats["loss"] == pytest.approx(loss.item())
    assert 0 < stats["spread"] <= 2.0  # unit vectors: mean pairwise distance


def test_soft_margin_batch_hard(model_and_batch):
    model, batch = model_and_batch
    loss, _ = compute_loss(TrainConfig(mining="batch_hard", soft_margin=True), model, batch, step=0)
    _, embeddings = _reference_embeddings(model, batch)
    expected = triplet_loss(embeddings, batch.labels, mining="batch_hard", soft=True)
    assert loss.item() == pytest.approx(expected.loss.item(), rel=1e-6)
    hinge, _ = compute_loss(TrainConfig(mining="batch_hard"), model, batch, step=0)
    assert loss.item() != pytest.approx(hinge.item())


def test_warmup_mining_switches_at_warmup_steps(model_and_batch):
    model, batch = model_and_batch
    config = TrainConfig(mining="batch_hard", warmup_mining="batch_all", warmup_steps=10)
    assert [mining_at(config, s) for s in (0, 9, 10, 500)] == ["batch_all", "batch_all", "batch_hard", "batch_hard"]
    _, embeddings = _reference_embeddings(model, batch)
    early, _ = compute_loss(config, model, batch, step=9)
    late, _ = compute_loss(config, model, batch, step=10)
    assert early.item() == pytest.approx(triplet_loss(embeddings, batch.labels, mining="batch_all").loss.item())
    assert late.item() == pytest.approx(triplet_loss(embeddings, batch.labels, mining="batch_hard").loss.item())


def test_ce_weight_adds_cross_entropy_on_the_neck(model_and_batch):
    model, batch = model_and_batch
    loss, stats = compute_loss(TrainConfig(mining="batch_hard", ce_weight=0.5), model, batch, step=0)
    stats = stats_to_floats(stats)
    raw, embeddings = _reference_embeddings(model, batch)
    ce = F.cross_entropy(model.classifier(raw), batch.labels).item()
    metric = triplet_loss(embeddings, batch.labels, mining="batch_hard").loss.item()
    assert stats["cross_entropy"] == pytest.approx(ce, rel=1e-6)
    assert loss.item() == pytest.approx(metric + 0.5 * ce, rel=1e-6)


def test_angular_and_cross_entropy_losses(model_and_batch):
    model, batch = model_and_batch
    raw, embeddings = _reference_embeddings(model, batch)
    angular, stats = compute_loss(TrainConfig(loss="angular", angular_alpha=35.0), model, batch, step=0)
    assert angular.item() == pytest.approx(angular_loss(embeddings, batch.labels, alpha_degrees=35.0).loss.item())
    ce, stats = compute_loss(TrainConfig(loss="cross_entropy"), model, batch, step=0)
    assert ce.item() == pytest.approx(F.cross_entropy(model.classifier(raw), batch.labels).item(), rel=1e-6)
    assert set(stats) == {"loss", "spread"}


def test_frozen_backbone_trains_the_head_on_features(model_and_batch):
    model, batch = model_and_batch
    features = model.backbone(batch.inputs).flatten(1).detach()
    config = TrainConfig(backbone="mobilenet_v2", weights="shipped", freeze_backbone=True, mining="batch_all")
    loss, _ = compute_loss(config, model, Batch(features, batch.labels), step=0)
    expected = triplet_loss(F.normalize(model.head(features), dim=1), batch.labels, mining="batch_all")
    assert loss.item() == pytest.approx(expected.loss.item(), rel=1e-6)


def test_compute_loss_is_pure(model_and_batch):
    model, batch = model_and_batch
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first, _ = compute_loss(TrainConfig(), model, batch, step=3)
    second, _ = compute_loss(TrainConfig(), model, batch, step=3)
    assert first.item() == second.item()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    first.backward()  # and it is differentiable
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize(
    "bad",
    [
        {"mining": "batch_hardest"},
        {"loss": "contrastive"},
        {"backbone": "vgg16"},
        {"weights": "internet"},
        {"device": "tpu"},
        {"metric": "manhattan"},
        {"warmup_mining": "everything"},
        {"soft_margin": True, "mining": "batch_all"},
        {"p": 1},
        {"ce_weight": -1.0},
    ],
)
def test_config_rejects_unknown_options_when_made(bad):
    with pytest.raises(ValueError):
        TrainConfig(**bad)


def test_config_weights_default_never_silently_random():
    assert TrainConfig().resolved_weights == "random"  # the small CNN has no pretrained weights
    assert TrainConfig(backbone="resnet50").resolved_weights == "imagenet"
    assert TrainConfig(backbone="mobilenet_v2").resolved_weights == "shipped"
    assert TrainConfig(backbone="resnet50", weights=None).resolved_weights == "random"  # asked for explicitly


def test_config_from_dict_refuses_unknown_settings():
    assert TrainConfig.from_dict({"mining": "batch_hard", "k": 8}) == TrainConfig(mining="batch_hard", k=8)
    with pytest.raises(ValueError, match="unknown training settings: minning"):
        TrainConfig.from_dict({"minning": "batch_hard"})
    assert TrainConfig.from_dict({"k": 8, "train_subset": 10}, ignore_unknown=True).k == 8
    assert setting_defaults()["mining"] == TrainConfig().mining
