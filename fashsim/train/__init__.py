"""Training: configuration, the loss of one batch (triplet mining, angular, cross-entropy), checkpoints and the loop."""

from .loop import TrainConfig, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
