"""Semantic segmentation: the survey's segmentation transformers and what they share.

Every module here except the shared ones (``metrics``, ``losses``, ``data``) is a
family (SegFormer, SETR, Swin-UNet, MedT) and is imported automatically, which
registers its variants with ``task="segmentation"`` in the model registry. The
models output logits NHWC at the resolution their reference does (SegFormer: H/4);
``predict_masks`` takes them to per-pixel labels at the input size.
"""

import importlib
import pkgutil

from keras import ops

from keras_vit.segmentation.losses import SegmentationCrossEntropy, resize_logits
from keras_vit.segmentation.metrics import (
    ConfusionMatrix,
    SegmentationMeanIoU,
    segmentation_metrics,
)

_SHARED = ("metrics", "losses", "data", "training", "plots")

for _info in pkgutil.iter_modules(__path__):
    if _info.name not in _SHARED and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")


def predict_masks(model, images, batch_size=None):
    """Per-pixel class ids (B, H, W) int32 at the input size: the model's logits resized
    bilinearly (half-pixel centres, torch's ``align_corners=False``, as mmseg's and Hugging
    Face's post-processing), then the argmax over classes."""
    logits = model.predict(images, batch_size=batch_size, verbose=0) if batch_size else model(
        images, training=False)
    logits = logits[0] if isinstance(logits, (list, tuple)) else logits
    size = tuple(ops.shape(images)[1:3])
    return ops.cast(ops.argmax(resize_logits(logits, size), axis=-1), "int32")


__all__ = ["ConfusionMatrix", "SegmentationCrossEntropy", "SegmentationMeanIoU", "predict_masks", "resize_logits",
           "segmentation_metrics"]
