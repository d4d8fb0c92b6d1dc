"""The embedding network: a CNN backbone + a projection head → L2-normalised embedding.

One network with shared weights embeds anchors, positives and negatives alike (the "siamese" /
triplet network); with P×K batches and online mining it simply embeds the whole batch.

Backbones by name (:data:`BACKBONES`): ``small_cnn`` (for 28×28 inputs, trained from scratch)
and torchvision's ``resnet18``, ``resnet50``, ``mobilenet_v2`` (greyscale or RGB input).
ImageNet weights come from torchvision's cache or download; offline without them the error says
how to get them. Random initialisation of a torchvision backbone must be asked for explicitly
(``weights=None``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import FashsimError
from .fileio import atomic_write_bytes
from .images import FASHION_MNIST_SPEC, IMAGENET_SPEC, InputSpec

BACKBONES = ("small_cnn", "resnet18", "resnet50", "mobilenet_v2")


class WeightsUnavailableError(FashsimError):
    """Pretrained weights were asked for but cannot be loaded (offline, no cached copy)."""


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """A VGG-style CNN for 28×28 images: one conv at full resolution, then two stages of two
    convs (14×14, 7×7), max-pooling in between, global average + max pooling at the end.

    About 0.3 M parameters and ~22 M multiply-adds per image: it trains at over a thousand
    images per second on two CPU cores.
    """

    def __init__(self, in_channels: int = 1, widths: tuple[int, int, int] = (32, 64, 128)) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.stage1 = nn.Sequential(_conv_bn_relu(in_channels, w1), nn.MaxPool2d(2))
        self.stage2 = nn.Sequential(_conv_bn_relu(w1, w2), _conv_bn_relu(w2, w2), nn.MaxPool2d(2))
        self.stage3 = nn.Sequential(_conv_bn_relu(w2, w3), _conv_bn_relu(w3, w3))
        self.out_features = 2 * w3  # average- and max-pooled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.stage2(self.stage1(x)))
        return torch.cat([F.adaptive_avg_pool2d(x, 1), F.adaptive_max_pool2d(x, 1)], dim=1).flatten(1)


def _torchvision_backbone(name: str, in_channels: int, weights: str | None) -> tuple[nn.Module, int]:
    import torchvision.models as tvm

    builder = getattr(tvm, name)
    tv_weights = None
    if weights == "imagenet":
        tv_weights = tvm.get_model_weights(name).DEFAULT
    elif weights is not None:
        raise ValueError(f"weights must be 'imagenet' or None, got {weights!r}")
    try:
        model = builder(weights=tv_weights)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        raise WeightsUnavailableError(
            f"ImageNet weights for {name} could not be loaded ({exc}).\n"
            f"  - online: run once with network access; torchvision caches them in {cache}\n"
            f"  - offline: copy the file {tv_weights.url.rsplit('/', 1)[-1]} into {cache}\n"
            f"  - or train from scratch by asking for random initialisation explicitly: weights=None"
        ) from None
    if name.startswith("resnet"):
        features = model.fc.in_features
        model.fc = nn.Identity()
    else:  # mobilenet_v2
        features = model.classifier[-1].in_features
        model.classifier = nn.Identity()
    if in_channels == 1:  # greyscale: one input channel whose filters are the sum of the RGB ones
        parent, attr = (model, "conv1") if name.startswith("resnet") else (model.features[0], "0")
        old = getattr(parent, attr) if attr != "0" else parent[0]
        new = nn.Conv2d(1, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False)
        with torch.no_grad():
            new.weight.copy_(old.weight.sum(1, keepdim=True))
        if attr == "0":
            parent[0] = new
        else:
            setattr(parent, attr, new)
    elif in_channels != 3:
        raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
    return model, features


def build_backbone(name: str, *, in_channels: int = 1, weights: str | None = None) -> tuple[nn.Module, int]:
    """``(module, feature_dim)`` for a backbone name in :data:`BACKBONES`."""
    if name == "small_cnn":
        if weights is not None:
            raise ValueError("small_cnn has no pretrained weights; use weights=None")
        net = SmallCNN(in_channels)
        return net, net.out_features
    if name in BACKBONES:
        return _torchvision_backbone(name, in_channels, weights)
    raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")


class EmbeddingNet(nn.Module):
    """Backbone → (dropout) → linear projection → BatchNorm ("BN-neck") → L2 normalisation.

    ``forward`` returns unit-length embeddings of size ``embedding_dim``; cosine similarity is
    their dot product. ``config`` holds everything needed to rebuild the network.
    """

    def __init__(
        self,
        backbone: str = "small_cnn",
        *,
        embedding_dim: int = 128,
        in_channels: int = 1,
        weights: str | None = None,
        input_spec: InputSpec | None = None,
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        self.backbone, features = build_backbone(backbone, in_channels=in_channels, weights=weights)
        self.projection = nn.Linear(features, embedding_dim)
        self.neck = nn.BatchNorm1d(embedding_dim)
        # optional classifier on the embedding: used only by the cross-entropy baseline
        self.classifier = nn.Linear(embedding_dim, num_classes) if num_classes else None
        spec = input_spec or (FASHION_MNIST_SPEC if backbone == "small_cnn" else IMAGENET_SPEC)
        self.config = {
            "backbone": backbone,
            "embedding_dim": embedding_dim,
            "in_channels": in_channels,
            "input_spec": spec.to_dict(),
            "num_classes": num_classes,
        }

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec.from_dict(self.config["input_spec"])

    @property
    def embedding_dim(self) -> int:
        return self.config["embedding_dim"]

    def raw_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding before L2 normalisation (what the classifier head sees)."""
        return self.neck(self.projection(self.backbone(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.raw_embedding(x).float(), dim=1)


def fingerprint(model: EmbeddingNet) -> str:
    """A short hash of the model's config and weights: an index built with one model refuses
    to be searched with another."""
    digest = hashlib.sha256(json.dumps(model.config, sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def atomic_torch_save(obj, path: str | os.PathLike) -> Path:
    """``torch.save`` written atomically (see :func:`fashsim.fileio.atomic_write_bytes`)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def save_model(model: EmbeddingNet, path: str | os.PathLike, **metadata) -> Path:
    """Save config + weights (+ JSON-able metadata) atomically, loadable on any device."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return atomic_torch_save({"config": model.config, "state_dict": state, "metadata": metadata}, path)


def load_model(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> EmbeddingNet:
    """Rebuild a model saved by :func:`save_model` (eval mode, on ``device``)."""
    path = Path(path)
    if not path.is_file():
        raise FashsimError(f"no model at {path}: train one first (notebook 02 or `python -m fashsim train`)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        config = blob["config"]
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise FashsimError(f"{path} is not a readable fashsim model ({exc})") from None
    model = EmbeddingNet(
        config["backbone"],
        embedding_dim=config["embedding_dim"],
        in_channels=config["in_channels"],
        input_spec=InputSpec.from_dict(config["input_spec"]),
        num_classes=config.get("num_classes", 0),
    )
    model.load_state_dict(blob["state_dict"])
    return model.to(device).eval()
