"""Reference checkpoints (timm / PyTorch / JAX) -> Keras weights, one mapping per family."""

from keras_vit.convert.checkpoint import load_checkpoint
from keras_vit.convert.core import load_timm_weights, register_layer_converter, weight_entries

__all__ = ["load_checkpoint", "load_timm_weights", "register_layer_converter", "weight_entries"]
