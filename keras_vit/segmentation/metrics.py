"""mIoU, per-class IoU and pixel accuracy from a confusion matrix accumulated over a dataset.

As mmseg's ``IoUMetric``: pixels labelled ``ignore_index`` are left out; a class that is
neither in the labels nor in the predictions of the whole dataset has no IoU (NaN) and is
left out of the mean.
"""

import keras
import numpy as np
from keras import ops

from keras_vit.segmentation.losses import IGNORE_INDEX, resize_logits


class ConfusionMatrix:
    """Accumulates ``matrix[true, predicted]`` pixel counts batch by batch (numpy, host side)."""

    def __init__(self, num_classes, ignore_index=IGNORE_INDEX):
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.matrix = np.zeros((self.num_classes, self.num_classes), np.int64)

    def update(self, labels, predictions):
        labels = np.asarray(labels).astype(np.int64).ravel()
        predictions = np.asarray(predictions).astype(np.int64).ravel()
        if labels.shape != predictions.shape:
            raise ValueError(f"labels and predictions differ in size: {labels.size} pixels vs "
                             f"{predictions.size}; resize the predictions to the labels first")
        keep = labels != self.ignore_index
        labels, predictions = labels[keep], predictions[keep]
        bad = labels[(labels < 0) | (labels >= self.num_classes)]
        if bad.size:
            raise ValueError(f"label {int(bad[0])} is outside the {self.num_classes} classes "
                             f"(0..{self.num_classes - 1}, or {self.ignore_index} to ignore)")
        self.matrix += np.bincount(labels * self.num_classes + predictions,
                                   minlength=self.num_classes ** 2).reshape(self.matrix.shape)
        return self

    def result(self):
        return segmentation_metrics(self.matrix)


def segmentation_metrics(matrix):
    """{"mIoU", "per_class_iou", "pixel_accuracy", "mean_accuracy", "per_class_accuracy"}
    from a confusion matrix (rows: true class, columns: predicted). Per-class values of
    classes absent from both labels and predictions are NaN (None in JSON)."""
    matrix = np.asarray(matrix, np.float64)
    true_positive = np.diag(matrix)
    labelled = matrix.sum(axis=1)
    union = labelled + matrix.sum(axis=0) - true_positive
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, true_positive / union, np.nan)
        accuracy = np.where(labelled > 0, true_positive / labelled, np.nan)
    total = matrix.sum()

    def mean(values):
        return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")

    return {"mIoU": mean(iou), "per_class_iou": [None if np.isnan(v) else float(v) for v in iou],
            "pixel_accuracy": float(true_positive.sum() / total) if total else float("nan"),
            "mean_accuracy": mean(accuracy),
            "per_class_accuracy": [None if np.isnan(v) else float(v) for v in accuracy]}


@keras.saving.register_keras_serializable(package="keras_vit")
class SegmentationMeanIoU(keras.metrics.MeanIoU):
    """Keras' MeanIoU on logits: resized to the labels' size, argmax, ignore index left out.
    A running estimate for the progress lines; the reported mIoU is ``evaluate_segmentation``."""

    def __init__(self, num_classes, name="mean_iou", ignore_class=IGNORE_INDEX, **kwargs):
        super().__init__(num_classes=num_classes, name=name, ignore_class=ignore_class,
                         sparse_y_true=True, sparse_y_pred=True, **kwargs)

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_pred = resize_logits(y_pred, tuple(y_true.shape[1:3]))
        return super().update_state(y_true, ops.argmax(y_pred, axis=-1), sample_weight)

    def get_config(self):
        config = super().get_config()
        for key in ("sparse_y_true", "sparse_y_pred", "axis", "target_class_ids"):
            config.pop(key, None)
        return config
