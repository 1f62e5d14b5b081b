"""Trains a keras_vit model on one CPU, many GPUs, many machines or a TPU pod.

    python apps/train.py --model=vit_tiny_patch16_224 --img_size=32 --dataset=shapes \
        --epochs=10 --batch_size=128 --model_dir=runs/vit_tiny --export_dir=saved_models/vit_tiny

Resumes from --model_dir's newest usable checkpoint when started again with the same flags;
SIGTERM saves a checkpoint of the current step and exits with status 143. --model_dir may be
any path TensorFlow writes (gs://...); nothing is written there before every input is checked.
absl's --flagfile=FILE works; the resolved flags are written to MODEL_DIR/flags.txt.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import app_flags_text, fail, parse_model_args, prepare_environment  # noqa: E402

prepare_environment()

from absl import app, flags, logging  # noqa: E402

F = flags.FLAGS
flags.DEFINE_string("model", "vit_tiny_patch16_224", "Registered model name (keras_vit.list_models()).")
flags.DEFINE_string("model_args", "{}", "JSON dict of builder overrides, e.g. '{\"patch_size\": 4, \"depth\": 6}'.")
flags.DEFINE_enum("task", None, ["classification", "segmentation", "detection"],
                  "Task (default: the model's).")
flags.DEFINE_string("dataset", "shapes", "shapes | folder:PATH | tfrecord:GLOB | tfds:NAME "
                    "(segmentation: shapes | folder:PATH of images/ + annotations/; detection: shapes | "
                    "coco:ANNOTATIONS.json; docs/data.md).")
flags.DEFINE_integer("img_size", None, "Input size (default: the model's).")
flags.DEFINE_integer("train_samples", None, "shapes: number of training images.")
flags.DEFINE_integer("val_samples", None, "shapes: number of validation images.")
flags.DEFINE_integer("batch_size", 64, "Global batch size (divisible by the number of replicas).")
flags.DEFINE_integer("epochs", 10, "Epochs.")
flags.DEFINE_integer("steps_per_epoch", None, "Steps per epoch (default: one pass over the data).")
flags.DEFINE_enum("optimizer", "adamw", ["adamw", "sgd"], "Optimizer.")
flags.DEFINE_float("learning_rate", 1e-3, "Peak learning rate.")
flags.DEFINE_float("weight_decay", 0.05, "Decoupled weight decay.")
flags.DEFINE_float("warmup_epochs", 0.0, "Linear warmup length in epochs.")
flags.DEFINE_enum("schedule", None, ["cosine", "constant", "poly"],
                  "Schedule after warmup (default: cosine; segmentation: poly, power 1).")
flags.DEFINE_float("clip_norm", None, "Clip the gradients' global norm (0: off; default: "
                   "the task's, 0.1 for detection as DETR and Deformable DETR, else off).")
flags.DEFINE_float("label_smoothing", 0.0, "Label smoothing.")
flags.DEFINE_bool("randaugment", False, "RandAugment (Keras core layer) on training images.")
flags.DEFINE_float("mixup", 0.0, "MixUp alpha (0: off).")
flags.DEFINE_float("cutmix", 0.0, "CutMix alpha (0: off).")
flags.DEFINE_float("drop_path_rate", 0.0, "Stochastic depth rate.")
flags.DEFINE_string("teacher", None, "Distillation teacher: registered name, .keras file or SavedModel dir (a SavedModel: hard/soft only).")
flags.DEFINE_enum("distillation", "hard", ["hard", "soft", "minilm", "manifold"],
                  "With --teacher: DeiT's hard or soft label distillation, or a relation loss "
                  "added to the cross-entropy: minilm (last-block attention and value "
                  "relations, MiniLM/MiniLMv2) or manifold (patch-level manifold relations, "
                  "Hao et al. 2022); the relation kinds need ViT-style student and teacher "
                  "with the same patch grid.")
flags.DEFINE_enum("strategy", "auto", ["auto", "one_device", "mirrored", "multi_worker_mirrored", "tpu"], "tf.distribute strategy.")
flags.DEFINE_string("tpu", None, "TPU name or grpc:// address ('local' on a TPU VM).")
flags.DEFINE_enum("mixed_precision", "none", ["none", "mixed_float16", "mixed_bfloat16"], "Mixed precision policy.")
flags.DEFINE_bool("jit_compile", True, "Compile train/eval steps with XLA (off where it cannot compile them or is slower: README).")
flags.DEFINE_string("model_dir", "runs/default", "Checkpoints, TensorBoard logs, flags, curves.")
flags.DEFINE_string("export_dir", None, "Export SavedModel (and TFLite) here at the end.")
flags.DEFINE_enum("export_tflite", "none", ["none", "fp32", "fp16", "dynamic", "dynamic_mixed",
                                           "int8", "int8_mixed"],
                  "TFLite export (int8_mixed: int8 matmuls and convolutions, the rest float; "
                  "dynamic_mixed: dynamic range with the layers it costs most agreement float; "
                  "see apps/export.py).")
flags.DEFINE_integer("checkpoint_every", 100, "Save a checkpoint every N steps (and every epoch).")
flags.DEFINE_integer("keep_checkpoints", 2, "Keep the newest N step checkpoints (an unreadable "
                     "newest one falls back to the one before).")
flags.DEFINE_integer("seed", 0, "Random seed (data, init, augmentation).")
flags.DEFINE_bool("cache_data", False, "Hold the training files' bytes (image files, TFRecord "
                  "shards) in memory after one read, each worker its share; for data that fits.")
flags.DEFINE_bool("strict_data", False, "Fail on unreadable images (and bad masks) instead of skipping them.")
flags.DEFINE_bool("deterministic", True, "Deterministic ops: the same flags and seed give the "
                  "same weights. Keras does not XLA-compile the steps then; "
                  "--nodeterministic lets --jit_compile speed them up.")
flags.DEFINE_list("scale_range", ["0.5", "2.0"], "Segmentation: random rescale factors min,max "
                  "(mmseg's 0.5,2.0; objects that must be seen whole want a narrower range).")
flags.DEFINE_bool("reduce_zero_label", False, "Segmentation folders: mask id 0 is 'other' (ADE20K): ignored, ids shift down by one.")
flags.DEFINE_integer("cpu_replicas", 0, "Split the CPU into N logical devices (tests, mirrored on CPU).")


def config_from_flags():
    from keras_vit.training import TrainConfig

    fields = {k: getattr(F, k) for k in TrainConfig.__dataclass_fields__ if k != "model_args"}
    return TrainConfig(model_args=parse_model_args(F.model_args), **fields)


def main(argv):
    del argv
    if F.cpu_replicas:
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * F.cpu_replicas)
    from keras_vit.training import TrainingDiverged, train, validate
    from keras_vit.training.callbacks import Preempted
    from keras_vit.training.trainer import WorkerLost

    config = config_from_flags()
    try:
        validate(config)
    except ValueError as e:
        fail(str(e))
    try:  # writes nothing into --model_dir until every input has been checked
        summary = train(config, flags_text=app_flags_text())
    except (TrainingDiverged, ValueError) as e:  # checks that need data, strategy or model
        fail(str(e))
    except Preempted as e:
        stop(str(e), PREEMPTED_EXIT_CODE)
    except WorkerLost as e:
        stop(str(e), 1)
    print_summary(summary)


PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, what a shell reports for a job ended by SIGTERM


def stop(message, code):
    """Ends a run that started (preempted, a lost worker) with a message and ``code``."""
    logging.error(message)
    print(f"stopped: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def print_summary(s):
    lines = [f"model {s['model']} at {s['img_size']} px, {s['num_classes']} classes, "
             f"{s['steps']} steps in {s['train_seconds']:.0f} s "
             f"({s['train_images_per_second']:.1f} images/s, set-up included)"]
    if "val_accuracy" in s:
        lines.append(f"validation accuracy {100 * s['val_accuracy']:.1f}%")
    if "val_AP" in s:
        lines.append(f"validation AP {100 * s['val_AP']:.1f}, AP50 {100 * s['val_AP50']:.1f}")
    if "val_miou" in s:
        lines.append(f"validation mIoU {100 * s['val_miou']:.1f}%, pixel accuracy "
                     f"{100 * s['val_pixel_accuracy']:.1f}%")
    if "saved_model" in s:
        lines.append(f"SavedModel: {s['saved_model']}")
    if "tflite" in s:
        r = s["tflite"]
        lines.append(f"TFLite ({r['quantization']}): {r['path']} {r['size_bytes'] / 1e6:.2f} MB, "
                     + (f"top-1 agreement with Keras {100 * r['top1_agreement']:.1f}%, "
                        if r.get("top1_agreement") is not None else
                        f"per-pixel agreement with Keras {100 * r['pixel_agreement']:.1f}%, "
                        if r.get("pixel_agreement") is not None else
                        f"detections reproduced {100 * r['detection_agreement']:.1f}%, "
                        if r.get("detection_agreement") is not None else "") +
                     f"max abs diff {r['max_abs_diff']:.2e}")
    print("\n== summary ==\n" + "\n".join(lines), flush=True)
    logging.info("summary: %s", s)


if __name__ == "__main__":
    app.run(main)
