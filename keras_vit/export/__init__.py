"""SavedModel and TFLite export, each written atomically and verified against Keras."""

from keras_vit.export.saved_model import export_saved_model
from keras_vit.export.tflite import (
    QUANTIZATION_MODES,
    TFLiteExportError,
    export_tflite,
    verify_tflite,
)

__all__ = ["QUANTIZATION_MODES", "TFLiteExportError", "export_saved_model", "export_tflite",
           "verify_tflite"]
