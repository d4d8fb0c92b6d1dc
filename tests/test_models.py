import pytest
import torch

from fashsim.data.transforms import IMAGENET_SPEC
from fashsim.errors import FashsimError
from fashsim.model import networks as models
from fashsim.model import persistence


def test_small_cnn_embeddings_are_unit_vectors():
    net = models.EmbeddingNet("small_cnn", embedding_dim=64).eval()
    out = net(torch.randn(5, 1, 28, 28))
    assert out.shape == (5, 64)
    assert torch.allclose(out.norm(dim=1), torch.ones(5), atol=1e-5)
    assert net.input_spec.size == 28 and net.input_spec.dark_background


@pytest.mark.parametrize("name,channels,size", [("resnet18", 1, 64), ("mobilenet_v2", 3, 64), ("resnet50", 3, 32)])
def test_torchvision_backbones_random_init(name, channels, size):
    net = models.EmbeddingNet(name, in_channels=channels, weights=None).eval()
    out = net(torch.randn(2, channels, size, size))
    assert out.shape == (2, 128)
    assert net.input_spec.size == 224 and net.input_spec.channels == channels
    if channels == 3:
        assert net.input_spec == IMAGENET_SPEC


def test_greyscale_first_conv_sums_rgb_filters():
    torch.manual_seed(0)
    rgb, _ = models.build_backbone("resnet18", in_channels=3)
    torch.manual_seed(0)
    grey, _ = models.build_backbone("resnet18", in_channels=1)
    assert grey.conv1.weight.shape[1] == 1
    assert torch.allclose(grey.conv1.weight, rgb.conv1.weight.sum(1, keepdim=True))


def test_imagenet_weights_offline_give_actionable_error(tmp_path, monkeypatch):
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path))  # an empty cache
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # refused at once, even on a networked machine
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    try:
        with pytest.raises(models.WeightsUnavailableError) as info:
            models.build_backbone("resnet18", in_channels=3, weights="imagenet")
    finally:
        torch.hub.set_dir(old)
    message = str(info.value)
    assert "resnet18-" in message and str(tmp_path) in message and "weights=None" in message


def test_bad_names():
    with pytest.raises(ValueError, match="unknown backbone"):
        models.build_backbone("vit_h14")
    with pytest.raises(ValueError, match="no pretrained"):
        models.build_backbone("small_cnn", weights="imagenet")


def test_save_load_round_trip_and_fingerprint(tmp_path):
    net = models.EmbeddingNet("small_cnn").eval()
    x = torch.randn(3, 1, 28, 28)
    path = persistence.save_model(net, tmp_path / "m.pt", note="hello")
    loaded = persistence.load_model(path)
    assert torch.allclose(net(x), loaded(x), atol=1e-6)
    assert persistence.fingerprint(net) == persistence.fingerprint(loaded)
    with torch.no_grad():
        loaded.projection.bias.add_(0.01)
    assert persistence.fingerprint(net) != persistence.fingerprint(loaded)
    assert all(t.device.type == "cpu" for t in torch.load(path, weights_only=True)["state_dict"].values())
    assert not list(tmp_path.glob(".*.tmp"))


def test_unreadable_model_files(tmp_path):
    with pytest.raises(FashsimError, match="no model"):
        persistence.load_model(tmp_path / "absent.pt")
    net = models.EmbeddingNet("small_cnn")
    path = persistence.save_model(net, tmp_path / "m.pt")
    path.write_bytes(path.read_bytes()[:1000])  # truncated
    with pytest.raises(FashsimError, match="not a readable fashsim model"):
        persistence.load_model(path)


@pytest.mark.parametrize(
    "name,channels,size",
    [("small_cnn", 1, 28), ("resnet18", 1, 64), ("mobilenet_v2", 3, 64), ("efficientnet_lite0", 3, 64)],
)
def test_multi_scale_adds_intermediate_features(name, channels, size):
    torch.manual_seed(0)
    single = models.EmbeddingNet(name, in_channels=channels)
    multi = models.EmbeddingNet(name, in_channels=channels, multi_scale=True).eval()
    mid = multi.backbone.mid_channels
    assert multi.projection.in_features == single.projection.in_features + 2 * mid
    x = torch.randn(3, channels, size, size)
    features = multi.backbone(x)
    top = multi.backbone.backbone(x).flatten(1)
    assert torch.allclose(features[:, : top.shape[1]], top)
    stage_output = []
    multi.backbone.backbone.get_submodule(models.MID_STAGES[name]).register_forward_hook(
        lambda m, i, o: stage_output.append(o)
    )
    multi.backbone.backbone(x)
    assert torch.allclose(features[:, top.shape[1] : top.shape[1] + mid], stage_output[0].mean((2, 3)), atol=1e-5)
    out = multi(x)
    assert out.shape == (3, 128) and torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)


def test_multi_scale_round_trips(tmp_path):
    net = models.EmbeddingNet("small_cnn", multi_scale=True).eval()
    loaded = persistence.load_model(persistence.save_model(net, tmp_path / "m.pt"))
    x = torch.randn(2, 1, 28, 28)
    assert loaded.config["multi_scale"] and torch.allclose(net(x), loaded(x), atol=1e-6)


def test_flip_average_is_mirror_invariant_in_eval_only(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(4, 1, 28, 28)
    plain = models.EmbeddingNet("small_cnn").eval()
    averaged = models.EmbeddingNet("small_cnn", flip_average=True).eval()
    averaged.load_state_dict(plain.state_dict())
    out = averaged(x)
    assert torch.allclose(out, averaged(x.flip(-1)), atol=1e-5)  # an image and its mirror: one embedding
    assert torch.allclose(out.norm(dim=1), torch.ones(4), atol=1e-5)
    assert not torch.allclose(plain(x), plain(x.flip(-1)), atol=1e-3)  # without it they differ
    expected = torch.nn.functional.normalize(plain(x) + plain(x.flip(-1)), dim=1)
    assert torch.allclose(out, expected, atol=1e-5)
    persistence.save_model(averaged, tmp_path / "m.pt")
    loaded = persistence.load_model(tmp_path / "m.pt")
    assert loaded.config["flip_average"] is True and torch.allclose(loaded(x), out, atol=1e-5)
    assert persistence.fingerprint(loaded) != persistence.fingerprint(plain)  # an index knows which one built it
    averaged.train()  # training sees single images: the augmentation already flips them at random
    assert torch.allclose(averaged(x), plain.train()(x), atol=1e-5)
