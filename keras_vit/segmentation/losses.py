"""The per-pixel cross-entropy of the segmentation references (mmseg, Hugging Face)."""

import keras
from keras import ops

IGNORE_INDEX = 255


def resize_logits(logits, size):
    """Logits NHWC resized to ``size`` bilinearly with half-pixel centres (torch's
    ``F.interpolate(..., mode="bilinear", align_corners=False)``); unchanged if already so."""
    if tuple(logits.shape[1:3]) == tuple(size):
        return logits
    return ops.image.resize(logits, size, interpolation="bilinear", antialias=False)


@keras.saving.register_keras_serializable(package="keras_vit")
class SegmentationCrossEntropy(keras.losses.Loss):
    """Mean cross-entropy over labelled pixels, the logits first resized to the labels' size
    (as the references compute the loss at full resolution); pixels labelled
    ``ignore_index`` count for nothing. Labels (B, H, W) int, logits (B, h, w, K)."""

    def __init__(self, ignore_index=IGNORE_INDEX, name="segmentation_cross_entropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.ignore_index = int(ignore_index)

    def call(self, y_true, y_pred):
        y_true = ops.cast(y_true, "int32")
        if len(y_true.shape) == 4:
            y_true = ops.squeeze(y_true, -1)
        y_pred = resize_logits(y_pred, tuple(y_true.shape[1:3]))
        valid = ops.not_equal(y_true, self.ignore_index)
        safe_labels = ops.where(valid, y_true, 0)
        per_pixel = keras.losses.sparse_categorical_crossentropy(safe_labels, y_pred,
                                                                 from_logits=True)
        weights = ops.cast(valid, per_pixel.dtype)
        # Each image's mean over its labelled pixels; Keras then averages over the batch.
        return ops.sum(per_pixel * weights, axis=(1, 2)) / ops.maximum(
            ops.sum(weights, axis=(1, 2)), 1.0)

    def get_config(self):
        return {**super().get_config(), "ignore_index": self.ignore_index}
