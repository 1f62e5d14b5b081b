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
# Registers what the apps save with a model (the optimizer and its learning-rate schedule), so
# keras.saving.load_model("runs/<run>/model.keras") works after `import keras_vit` alone.
from keras_vit.training import schedules as _schedules  # noqa: E402,F401
from keras_vit.training import optimizers as _optimizers  # noqa: E402,F401
# ... and the compressed models' own layers (patch slimming, VTP's gates).
from keras_vit import compress  # noqa: E402,F401
from keras_vit.registry import _import_families  # noqa: E402

# Every family's layers and the segmentation losses/metrics a run's model.keras names.
_import_families()

__all__ = ["create_model", "get_model_config", "layers", "list_models", "list_pretrained",
           "load_checkpoint", "load_timm_weights", "register_model"]
