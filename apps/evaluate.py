"""Evaluates a trained model: top-1/top-5, per-class accuracy, a confusion-matrix PNG.

    python apps/evaluate.py --model_path=runs/vit_tiny --dataset=shapes --split=validation

--model_path is a .keras file, a training model_dir (its preprocessing.json gives the
image size, mean/std and class names) or a registered name; without a preprocessing.json,
give --img_size and the defaults of --config_from apply.

A training run's model is evaluated by default on the run's own validation data: --dataset,
--val_samples, --seed and --img_size default to the run's (its flags.txt), so the top-1
printed here is the validation accuracy the training summary reported. A flag given on the
command line wins.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (fail, load_model, model_dir_of, prepare_environment,  # noqa: E402
                    read_preprocessing, run_data_settings)

prepare_environment()

from absl import app, flags  # noqa: E402

F = flags.FLAGS
flags.DEFINE_string("model_path", None, "A .keras file, a training model_dir or a registered "
                    "name.", required=True)
flags.DEFINE_string("dataset", None, "shapes | folder:PATH | tfrecord:GLOB | tfds:NAME "
                    "(default: the training run's, else shapes).")
flags.DEFINE_string("split", "validation", "Split to evaluate.")
flags.DEFINE_enum("precision", "float32", ["float32", "bfloat16", "float16"],
                  "Classifiers: evaluate the model under this Keras mixed policy (float32 "
                  "variables, bfloat16/float16 compute) and report its top-1 agreement with "
                  "float32 (on a CPU without AVX-512 BF16, bfloat16 is emulated: slower).")
flags.DEFINE_integer("val_samples", None, "Number of images (default: the training run's "
                     "--val_samples; all of the split for folders and TFRecords).")
flags.DEFINE_integer("batch_size", 64, "Batch size.")
flags.DEFINE_integer("img_size", None, "Input size (default: the run's, from "
                     "preprocessing.json / the model).")
flags.DEFINE_string("config_from", None, "Registered model whose mean/std/crop to use when the "
                    "model_dir has no preprocessing.json.")
flags.DEFINE_string("output_dir", None, "Where metrics.json and confusion_matrix.png go "
                    "(default: the model_dir, or next to the .keras file).")
flags.DEFINE_integer("seed", None, "Seed of the shapes data (default: the training run's "
                     "--seed, else 0).")
flags.DEFINE_enum("task", None, ["classification", "segmentation", "detection"],
                  "Task (default: the run's preprocessing.json, else the model's).")
flags.DEFINE_bool("reduce_zero_label", None, "Segmentation folders: ADE20K's 0 = 'other' "
                  "(default: the run's setting).")


def preprocessing(model_path, model):
    from keras_vit.registry import get_model_config

    prep = read_preprocessing(model_path)
    if prep:
        return prep
    cfg = get_model_config(F.config_from) if F.config_from else {}
    return dict(img_size=F.img_size or model.input_shape[1], mean=cfg.get("mean", (0.485, 0.456, 0.406)),
                std=cfg.get("std", (0.229, 0.224, 0.225)), crop_pct=cfg.get("crop_pct", 0.875),
                interpolation=cfg.get("interpolation", "bicubic"), class_names=None)


def data_settings(model_path, prep):
    """dataset, val_samples, seed, img_size: each flag given on the command line, else the
    training run's (flags.txt), else the defaults (shapes, the split's default size, 0, the
    model's input size); ``source`` says where they came from."""
    run = run_data_settings(model_path)
    given = {name: getattr(F, name) for name in ("dataset", "val_samples", "seed", "img_size")
             if F[name].present}
    defaults = dict(dataset="shapes", val_samples=None, seed=0, img_size=prep["img_size"])
    settings = {name: given.get(name, run.get(name, defaults[name])) for name in defaults}
    from_run = sorted(set(run) & set(defaults) - set(given))
    settings["source"] = (f"the training run's flags.txt ({', '.join(from_run)})" if from_run
                          else "the command line and defaults")
    return settings


def evaluate(model, pipe, num_classes, float32_model=None):
    """Top-1/top-5, per-class accuracy and the confusion matrix of ``model``; with
    ``float32_model`` (``model`` being its reduced-precision copy) also the share of images
    whose top-1 class the two agree on."""
    import numpy as np

    from keras_vit.models.common import graph_forward

    forward = graph_forward(model)
    reference_forward = graph_forward(float32_model) if float32_model is not None else None
    confusion = np.zeros((num_classes, num_classes), np.int64)
    top5 = total = agree = 0
    for images, labels in pipe:
        logits = np.asarray(forward(images), np.float32)
        if reference_forward is not None:
            reference = np.asarray(reference_forward(images))
            agree += int((reference.argmax(-1) == logits.argmax(-1)).sum())
        labels = np.asarray(labels)
        confusion += np.bincount(labels * num_classes + logits.argmax(-1),
                                 minlength=num_classes ** 2).reshape(num_classes, num_classes)
        k = min(5, num_classes)
        top5 += int((np.argsort(-logits, -1)[:, :k] == labels[:, None]).any(-1).sum())
        total += len(labels)
    per_class = confusion.diagonal() / np.maximum(confusion.sum(1), 1)
    metrics = dict(top1=float(confusion.trace() / max(total, 1)), top5=float(top5 / max(total, 1)),
                   per_class=per_class.tolist(), confusion=confusion.tolist(), count=int(total))
    if float32_model is not None:
        metrics["top1_agreement_with_float32"] = agree / max(total, 1)
    return metrics


def plot_confusion(confusion, names, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    confusion = np.asarray(confusion)
    fig, ax = plt.subplots(figsize=(1 + 0.6 * len(names), 1 + 0.6 * len(names)))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if confusion[i, j] > confusion.max() / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _registry_task(model):
    from keras_vit.registry import model_task

    return model_task(model)


def _run(evaluate_dataset, model, prep, data, out, **extra):
    """A dense task's evaluate_dataset on the run's data settings; a bad one fails clearly."""
    try:
        return evaluate_dataset(model, data["dataset"], F.split, img_size=data["img_size"],
                                mean=prep["mean"], std=prep["std"],
                                class_names=prep.get("class_names"), batch_size=F.batch_size,
                                num_samples=data["val_samples"], seed=data["seed"],
                                output_dir=out, **extra)
    except ValueError as e:
        fail(str(e))


def evaluate_segmentation(model, prep, data):
    """mIoU, per-class IoU, pixel accuracy -> metrics.json; segmentation_samples.png."""
    from keras_vit.segmentation.training import evaluate_dataset

    reduce_zero_label = (F.reduce_zero_label if F.reduce_zero_label is not None
                         else prep.get("reduce_zero_label", False))
    out = F.output_dir or model_dir_of(F.model_path)
    metrics = _run(evaluate_dataset, model, prep, data, out, reduce_zero_label=reduce_zero_label)
    print(f"mIoU {100 * metrics['mIoU']:.2f}%  pixel accuracy "
          f"{100 * metrics['pixel_accuracy']:.2f}%  ({metrics['count']} images)")
    for name, iou in zip(metrics["class_names"], metrics["per_class_iou"]):
        print(f"  {name:>12s} " + ("   n/a" if iou is None else f"{100 * iou:6.2f}%"))
    print(f"metrics and samples in {out}")


def evaluate_detection(model, prep, data):
    """COCO AP, AP50, AP75, AP small/medium/large -> metrics.json; detection_samples.png."""
    from keras_vit.detection.training import evaluate_dataset

    out = F.output_dir or model_dir_of(F.model_path)
    metrics = _run(evaluate_dataset, model, prep, data, out)
    print("  ".join(f"{name} " + ("n/a" if value is None else f"{100 * value:.1f}")
                    for name, value in metrics.items() if name.startswith("AP")) +
          f"  ({metrics['count']} images)")
    print(f"metrics and samples in {out}")


def main(argv):
    del argv
    from keras_vit.data import load_dataset, make_pipeline

    model = load_model(F.model_path)
    prep = preprocessing(F.model_path, model)
    data = data_settings(F.model_path, prep)
    img_size = data["img_size"]
    print(f"evaluating on {data['dataset']} ({F.split}, seed {data['seed']}, {img_size} px; "
          f"settings from {data['source']})")
    task = F.task or prep.get("task") or _registry_task(model)
    if F.precision != "float32" and task != "classification":
        fail(f"--precision={F.precision} evaluates classifiers; this is a {task} model")
    if task == "segmentation":
        return evaluate_segmentation(model, prep, data)
    if task == "detection":
        return evaluate_detection(model, prep, data)
    try:
        ds, info = load_dataset(data["dataset"], F.split, img_size=img_size, seed=data["seed"],
                                num_samples=data["val_samples"])
    except ValueError as e:
        fail(f"--dataset {data['dataset']!r}: {e}")
    names = prep.get("class_names") or info.class_names
    pipe = make_pipeline(ds, training=False, img_size=img_size, batch_size=F.batch_size,
                         num_classes=info.num_classes, mean=prep["mean"], std=prep["std"],
                         crop_pct=prep["crop_pct"], interpolation=prep["interpolation"])
    if F.precision == "float32":
        metrics = evaluate(model, pipe, info.num_classes)
    else:
        from keras_vit.precision import reduced_precision_note, with_dtype_policy

        note = reduced_precision_note(F.precision)
        if note:
            print(f"note: {note}", file=sys.stderr)
        metrics = evaluate(with_dtype_policy(model, F.precision), pipe, info.num_classes,
                           float32_model=model)
    metrics["precision"] = F.precision
    out = F.output_dir or model_dir_of(F.model_path)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(dict(metrics, class_names=names), f, indent=1)
    plot_confusion(metrics["confusion"], names, os.path.join(out, "confusion_matrix.png"))
    print(f"top-1 {100 * metrics['top1']:.2f}%  top-5 {100 * metrics['top5']:.2f}%  "
          f"({metrics['count']} images, {F.precision})")
    if "top1_agreement_with_float32" in metrics:
        print(f"top-1 agreement of {F.precision} with float32: "
              f"{100 * metrics['top1_agreement_with_float32']:.2f}%")
    for name, acc in zip(names, metrics["per_class"]):
        print(f"  {name:>12s} {100 * acc:6.2f}%")
    print(f"metrics and confusion matrix in {out}")


if __name__ == "__main__":
    app.run(main)
