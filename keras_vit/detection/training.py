"""What the trainer and the apps do differently for the detection task: data, the set
criterion around the model, the deployable model with its post-processing, and COCO mAP."""

import keras
import numpy as np
from keras import ops

from keras_vit.detection.losses import SetCriterion, SetPredictionModel
from keras_vit.detection.metrics import CocoEvaluator
from keras_vit.detection.postprocess import postprocess

PREDICTION_KEYS = ("logits", "pred_boxes")


def detection_pipelines(config, img_size, cfg):
    """(``train_at(start, worker, num_workers, batch_size)``: training batches at a
    position, validation pipeline or None, DatasetInfo, pipeline settings)."""
    from absl import logging

    from keras_vit.data import share_source
    from keras_vit.detection.data import (load_detection_dataset, load_detection_examples,
                                          make_detection_pipeline)

    train_examples, info = load_detection_examples(config.dataset, "train", img_size=img_size,
                                            seed=config.seed, num_samples=config.train_samples)
    try:
        val_ds, _ = load_detection_dataset(config.dataset, "validation", img_size=img_size,
                                           seed=config.seed, num_samples=config.val_samples)
    except ValueError as e:
        logging.warning("no validation split (%s); training without validation", e)
        val_ds = None
    pipe = dict(img_size=img_size, batch_size=config.batch_size, mean=cfg["mean"],
                std=cfg["std"], seed=config.seed)

    examples_for = share_source(train_examples, config.cache_data)

    def train_at(start, worker, num_workers, batch_size):
        return make_detection_pipeline(examples_for(worker, num_workers), training=True, repeat=True,
                                       **dict(pipe, batch_size=batch_size), start=start,
                                       worker=worker, num_workers=num_workers)

    val_pipe = (make_detection_pipeline(val_ds, training=False, **pipe)
                if val_ds is not None else None)
    return train_at, val_pipe, info, dict(pipe, num_classes=info.num_classes,
                                          task="detection")


def sigmoid_scores(model, num_classes):
    """Deformable DETR's logits have one column per class (sigmoid); DETR's one more."""
    return model.output["logits"].shape[-1] == num_classes


def build_detector(create, num_classes):
    """The detector with its auxiliary decoder outputs where it has them (the set criterion
    then weighs every decoder layer, as the references train)."""
    try:
        return create(aux_outputs=True)
    except (TypeError, ValueError) as e:
        if "aux_outputs" not in str(e):
            raise
        return create()


def detection_training_model(student, num_classes, matcher="in_graph"):
    """The student wrapped with its set criterion (focal for sigmoid detectors)."""
    criterion = SetCriterion(num_classes, focal=sigmoid_scores(student, num_classes),
                             matcher=matcher)
    return SetPredictionModel(student, criterion, name=f"{student.name}_set_prediction")


def detection_inference_model(model):
    """The deployable detector: the last decoder layer's logits and boxes alone."""
    if set(model.output) == set(PREDICTION_KEYS):
        return model
    return keras.Model(model.inputs, {k: model.output[k] for k in PREDICTION_KEYS},
                       name=model.name)


def with_postprocessing(model, num_classes, top_k=100):
    """The detector followed by ``postprocess``: scores, classes and xyxy boxes in input
    pixels, static shapes (what the SavedModel and TFLite exports run)."""
    size = model.input_shape[1:3] if not isinstance(model.input_shape, list) else \
        model.input_shape[0][1:3]
    outputs = postprocess(model.output, size, top_k=top_k,
                          sigmoid=sigmoid_scores(model, num_classes))
    return keras.Model(model.inputs, outputs, name=f"{model.name}_postprocessed")


def evaluate_detection(model, pipe, num_classes, top_k=100):
    """COCO AP, AP50, AP75, small/medium/large of ``model`` over a pipeline of (images,
    padded targets), boxes in the canvas' pixels."""
    sigmoid = sigmoid_scores(model, num_classes)
    evaluator = CocoEvaluator(num_classes)
    for images, targets in pipe:
        size = tuple(images.shape[1:3])
        outputs = model(images, training=False)
        found = postprocess({k: outputs[k] for k in PREDICTION_KEYS}, size, top_k, sigmoid)
        scale = np.array([size[1], size[0], size[1], size[0]], np.float32)
        gt = np.asarray(targets["boxes"])
        gt_xyxy = np.concatenate([gt[..., :2] - gt[..., 2:] / 2, gt[..., :2] + gt[..., 2:] / 2],
                                 -1) * scale
        for i in range(len(gt)):
            evaluator.add(gt_xyxy[i], np.asarray(targets["classes"])[i],
                          ops.convert_to_numpy(found["boxes"][i]),
                          ops.convert_to_numpy(found["scores"][i]),
                          ops.convert_to_numpy(found["classes"][i]), size)
    return evaluator.result()


def plot_detections(images, found, path, class_names, score_threshold=0.3, targets=None):
    """The images with their predicted boxes (score >= threshold, labelled) and, dashed, the
    ground truth; one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = len(images)
    fig, axes = plt.subplots(1, count, figsize=(3 * count, 3.2), squeeze=False)
    for i, ax in enumerate(axes[0]):
        ax.imshow(images[i])
        ax.set_axis_off()
        if targets is not None:
            for (x0, y0, x1, y1), cls in zip(*targets[i]):
                if cls >= 0:
                    ax.add_patch(matplotlib.patches.Rectangle(
                        (x0, y0), x1 - x0, y1 - y0, fill=False, ls="--", lw=1, color="white"))
        for (x0, y0, x1, y1), score, cls in zip(found["boxes"][i], found["scores"][i],
                                                found["classes"][i]):
            if score < score_threshold:
                continue
            ax.add_patch(matplotlib.patches.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False,
                                                      lw=1.5, color="yellow"))
            name = class_names[cls] if cls < len(class_names) else str(cls)
            ax.text(x0, y0, f"{name} {score:.2f}", fontsize=6, color="black",
                    backgroundcolor="yellow")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def evaluate_dataset(model, spec, split, *, img_size, mean, std, class_names=None,
                     batch_size=16, num_samples=None, seed=0, output_dir=None,
                     samples_to_plot=4):
    """``apps/evaluate.py --task=detection``: COCO AP, AP50, AP75, small/medium/large of
    ``model`` on a split, and (with ``output_dir``) metrics.json plus detection_samples.png."""
    import os

    from keras_vit.data import denormalise, write_evaluation
    from keras_vit.detection.data import load_detection_dataset, make_detection_pipeline

    model = detection_inference_model(model)
    ds, info = load_detection_dataset(spec, split, img_size=img_size, seed=seed,
                                      num_samples=num_samples)
    pipe = make_detection_pipeline(ds, training=False, img_size=img_size,
                                   batch_size=batch_size, mean=mean, std=std, seed=seed)
    num_classes = info.num_classes
    metrics = evaluate_detection(model, pipe, num_classes)
    sample = write_evaluation(metrics, info, class_names, output_dir, pipe, samples_to_plot)
    if sample is not None:
        images, targets = sample
        size = tuple(images.shape[1:3])
        found = postprocess(model(images, training=False), size,
                            sigmoid=sigmoid_scores(model, num_classes))
        found = {k: ops.convert_to_numpy(v) for k, v in found.items()}
        scale = np.array([size[1], size[0], size[1], size[0]], np.float32)
        gt = np.asarray(targets["boxes"])
        gt_xyxy = np.concatenate([gt[..., :2] - gt[..., 2:] / 2,
                                  gt[..., :2] + gt[..., 2:] / 2], -1) * scale
        metrics["samples_png"] = plot_detections(
            denormalise(images, mean, std), found,
            os.path.join(output_dir, "detection_samples.png"), metrics["class_names"],
            targets=list(zip(gt_xyxy, np.asarray(targets["classes"]))))
    return metrics
