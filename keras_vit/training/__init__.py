"""Training: strategy factory, schedules, callbacks, DeiT distillation, the trainer."""

import importlib

# Imported on first use, so that `import keras_vit` can register the schedule
# (keras_vit.training.schedules) without loading TensorFlow under other backends.
_EXPORTS = {"TrainingDiverged": "callbacks", "get_strategy": "strategy",
            "TrainConfig": "trainer", "train": "trainer", "validate": "trainer"}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"keras_vit.training.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'keras_vit.training' has no attribute {name!r}")


__all__ = ["TrainConfig", "TrainingDiverged", "get_strategy", "train", "validate"]
