"""keras-vit: the vision transformers of Han et al.'s survey as Keras 3 models."""

__version__ = "0.1.0"

from keras_vit import layers  # noqa: E402
from keras_vit.convert import load_checkpoint, load_timm_weights  # noqa: E402
from keras_vit.registry import (  # noqa: E402
    create_model,
    get_model_config,
    list_models,
    list_pretrained,
    register_model,
)

__all__ = ["create_model", "get_model_config", "layers", "list_models", "list_pretrained",
           "load_checkpoint", "load_timm_weights", "register_model"]
