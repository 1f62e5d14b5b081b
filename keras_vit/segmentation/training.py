"""What the trainer and the apps do differently for the segmentation task: data, loss and
metric, the deployable model and the evaluation (mIoU from a confusion matrix)."""

import keras
import numpy as np
from keras import ops

from keras_vit.segmentation.losses import IGNORE_INDEX, SegmentationCrossEntropy, resize_logits
from keras_vit.segmentation.metrics import ConfusionMatrix, SegmentationMeanIoU

# SETR's auxiliary heads weigh 0.4 of the main loss in the official configs.
AUX_LOSS_WEIGHT = 0.4


def segmentation_pipelines(config, img_size, cfg):
    """(training batches at a position: ``train_at(start, worker, num_workers, batch_size)``,
    validation pipeline or None, DatasetInfo, pipeline settings) for a TrainConfig, as the
    classification data step of the trainer returns them."""
    from absl import logging

    from keras_vit.data import share_source
    from keras_vit.segmentation.data import (load_segmentation_dataset,
                                             load_segmentation_examples,
                                             make_segmentation_pipeline)

    load = dict(img_size=img_size, seed=config.seed, strict=config.strict_data,
                reduce_zero_label=config.reduce_zero_label)
    train_examples, info = load_segmentation_examples(config.dataset, "train",
                                                      num_samples=config.train_samples, **load)
    try:
        val_ds, _ = load_segmentation_dataset(config.dataset, "validation",
                                              num_samples=config.val_samples,
                                              num_classes=info.num_classes, **load)
    except ValueError as e:
        logging.warning("no validation split (%s); training without validation", e)
        val_ds = None
    pipe = dict(img_size=img_size, batch_size=config.batch_size, mean=cfg["mean"],
                std=cfg["std"], seed=config.seed)
    scale_range = tuple(float(v) for v in config.scale_range)
    if len(scale_range) != 2 or not 0 < scale_range[0] <= scale_range[1]:
        raise ValueError(f"--scale_range must be two factors 0 < min <= max, got "
                         f"{config.scale_range}")

    examples_for = share_source(train_examples, config.cache_data)

    def train_at(start, worker, num_workers, batch_size):
        return make_segmentation_pipeline(
            examples_for(worker, num_workers), training=True, repeat=True, scale_range=scale_range,
            **dict(pipe, batch_size=batch_size), start=start, worker=worker,
            num_workers=num_workers)

    val_pipe = (make_segmentation_pipeline(val_ds, training=False, **pipe)
                if val_ds is not None else None)
    return train_at, val_pipe, info, dict(pipe, num_classes=info.num_classes,
                                            task="segmentation",
                                            reduce_zero_label=config.reduce_zero_label)


def segmentation_loss_and_metrics(model, num_classes):
    """The loss (a list with aux weights when the model has auxiliary heads) and metrics."""
    loss = SegmentationCrossEntropy()
    if len(model.outputs) > 1:  # [main, aux...]: SETR's training heads
        aux = len(model.outputs) - 1
        return ([loss] * (aux + 1), [1.0] + [AUX_LOSS_WEIGHT] * aux,
                [[SegmentationMeanIoU(num_classes)]] + [[] for _ in range(aux)])
    return loss, None, [SegmentationMeanIoU(num_classes)]


def segmentation_inference_model(model):
    """The deployable model: the main head alone when training added auxiliary heads."""
    if len(model.outputs) == 1:
        return model
    return keras.Model(model.inputs, model.outputs[0], name=model.name)


def evaluate_segmentation(model, pipe, num_classes, ignore_index=IGNORE_INDEX):
    """mIoU, per-class IoU, pixel accuracy (``segmentation_metrics``) over a pipeline of
    (images, masks), the logits resized to the masks' size as ``predict_masks`` does."""
    confusion = ConfusionMatrix(num_classes, ignore_index)
    for images, masks in pipe:
        logits = model(images, training=False)
        logits = logits[0] if isinstance(logits, (list, tuple)) else logits
        predicted = ops.argmax(resize_logits(logits, tuple(masks.shape[1:3])), axis=-1)
        confusion.update(np.asarray(masks), ops.convert_to_numpy(predicted))
    return confusion.result()


def evaluate_dataset(model, spec, split, *, img_size, mean, std, class_names=None,
                     batch_size=16, num_samples=None, seed=0, reduce_zero_label=False,
                     num_classes=None, output_dir=None, samples_to_plot=4):
    """``apps/evaluate.py --task=segmentation``: mIoU, per-class IoU and pixel accuracy of
    ``model`` on a split, and (with ``output_dir``) metrics.json plus segmentation_samples.png
    (image / ground truth / prediction of the first ``samples_to_plot`` images)."""
    import os

    from keras_vit.data import denormalise, write_evaluation
    from keras_vit.segmentation.data import load_segmentation_dataset, make_segmentation_pipeline
    from keras_vit.segmentation.plots import plot_segmentation_samples

    num_classes = num_classes or model.output_shape[-1]
    ds, info = load_segmentation_dataset(spec, split, img_size=img_size, seed=seed,
                                         num_samples=num_samples, num_classes=num_classes,
                                         reduce_zero_label=reduce_zero_label)
    pipe = make_segmentation_pipeline(ds, training=False, img_size=img_size,
                                      batch_size=batch_size, mean=mean, std=std, seed=seed)
    metrics = evaluate_segmentation(model, pipe, num_classes)
    sample = write_evaluation(metrics, info, class_names, output_dir, pipe, samples_to_plot)
    if sample is not None:
        images, masks = sample
        logits = model(images, training=False)
        predicted = ops.argmax(resize_logits(logits, tuple(masks.shape[1:3])), axis=-1)
        metrics["samples_png"] = plot_segmentation_samples(
            denormalise(images, mean, std), np.asarray(masks), ops.convert_to_numpy(predicted),
            os.path.join(output_dir, "segmentation_samples.png"), metrics["class_names"])
    return metrics
