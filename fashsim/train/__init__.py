"""Training: configuration, the loss of one batch (triplet mining, angular, cross-entropy), checkpoints and the loop."""

from .config import TrainConfig

__all__ = ["TrainConfig", "TrainResult", "train"]


def __getattr__(name: str):
    # the loop (and PyTorch with it) loads on first use: `fashsim.train.config` alone is enough to
    # list the command line's training flags
    if name in ("TrainResult", "train"):
        from . import loop

        return getattr(loop, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
