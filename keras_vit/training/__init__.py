"""Training: strategy factory, schedules, callbacks, DeiT distillation, the trainer."""

from keras_vit.training.callbacks import TrainingDiverged
from keras_vit.training.strategy import get_strategy
from keras_vit.training.trainer import TrainConfig, train, validate

__all__ = ["TrainConfig", "TrainingDiverged", "get_strategy", "train", "validate"]
