"""Reference checkpoints (timm / PyTorch / JAX) -> Keras weights, one mapping per family.

``core`` maps by layer names that mirror timm's module paths; a family module
here (``swin.py``, ...) registers converters for its own layers with
``register_layer_converter``. Every module is imported automatically.
"""

import importlib
import pkgutil

from keras_vit.convert.checkpoint import load_checkpoint
from keras_vit.convert.core import (
    load_timm_weights,
    register_layer_converter,
    register_state_dict_adapter,
    weight_entries,
)

for _info in pkgutil.iter_modules(__path__):
    if _info.name not in ("core", "checkpoint") and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["load_checkpoint", "load_timm_weights", "register_layer_converter",
           "register_state_dict_adapter", "weight_entries"]
