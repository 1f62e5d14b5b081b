"""The image-classification trainer behind apps/train.py: data, model, strategy, checkpoints,
resume at the exact step, NaN stop, logs, curves, export."""

import dataclasses
import functools
import json
import os
import sys
import time

import keras
import numpy as np
from absl import logging

from keras_vit.models.common import graph_forward
from keras_vit.precision import reduced_precision_note
from keras_vit.training import callbacks as cb
from keras_vit.training.distillation import MODES as DISTILLATIONS, DistillationModel
from keras_vit.training.optimizers import AdamW
from keras_vit.training.schedules import WarmupSchedule
from keras_vit.training.strategy import (STRATEGIES, get_strategy, is_chief, is_multi_worker,
                                         resolve_jit_compile, same_on_every_worker)

OPTIMIZERS = ("adamw", "sgd")
PRECISIONS = ("none", "mixed_float16", "mixed_bfloat16")
TASKS = ("classification", "segmentation", "detection")
TFLITE_EXPORTS = ("none", "fp32", "fp16", "dynamic", "dynamic_mixed", "int8", "int8_mixed")
_TFLITE_MODE = {"fp32": "none", "fp16": "float16", "dynamic": "dynamic",
                "dynamic_mixed": "dynamic_mixed", "int8": "int8", "int8_mixed": "int8_mixed"}


@dataclasses.dataclass
class TrainConfig:
    model: str = "vit_tiny_patch16_224"
    task: str = None  # None: the model's (registry): classification, segmentation, detection
    model_args: dict = dataclasses.field(default_factory=dict)  # builder overrides (depth, ...)
    dataset: str = "shapes"
    img_size: int = None  # None: the model's default input size
    train_samples: int = None  # shapes only: images per split
    val_samples: int = None
    batch_size: int = 64  # global, over all replicas
    epochs: int = 10
    steps_per_epoch: int = None  # None: one pass over the training split
    optimizer: str = "adamw"
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 0.0
    schedule: str = None  # None: the task's (classification cosine, segmentation poly)
    clip_norm: float = None  # global gradient-norm clip; None: the task's (detection 0.1), 0 off
    label_smoothing: float = 0.0
    randaugment: bool = False
    mixup: float = 0.0
    cutmix: float = 0.0
    drop_path_rate: float = 0.0
    teacher: str = None
    distillation: str = "hard"
    strategy: str = "auto"
    tpu: str = None
    mixed_precision: str = "none"
    jit_compile: bool = True
    model_dir: str = "runs/default"
    export_dir: str = None
    export_tflite: str = "none"
    checkpoint_every: int = 100
    keep_checkpoints: int = 2  # the newest N step checkpoints are kept
    seed: int = 0
    strict_data: bool = False
    reduce_zero_label: bool = False  # segmentation folders: ADE20K's 0 = "other" -> ignored
    deterministic: bool = True  # op determinism: same flags, same weights; no XLA steps then
    scale_range: tuple = (0.5, 2.0)  # segmentation: random rescale factors (mmseg's)
    cache_data: bool = False  # hold the training files' bytes in memory (each worker its share)


def gradient_clip_norm(config, task):
    """The global gradient-norm clip of a run (0: none): --clip_norm, else the task's.
    DETR and Deformable DETR clip at 0.1 (their main.py's clip_max_norm); the classification
    and segmentation references do not clip."""
    if config.clip_norm is not None:
        return float(config.clip_norm)
    return 0.1 if task == "detection" else 0.0


def validate(config):
    """Every check that needs no data or model: a clear ValueError before any work starts."""
    from keras_vit.registry import list_models

    def need(cond, msg):
        if not cond:
            raise ValueError(msg)

    need(config.model in list_models(), _unknown_model(config.model))
    need(config.batch_size > 0, f"--batch_size must be positive, got {config.batch_size}")
    need(config.epochs > 0, f"--epochs must be positive, got {config.epochs}")
    need(config.steps_per_epoch is None or config.steps_per_epoch > 0,
         "--steps_per_epoch must be positive")
    need(config.optimizer in OPTIMIZERS, f"--optimizer must be one of {OPTIMIZERS}")
    need(config.clip_norm is None or config.clip_norm >= 0,
         f"--clip_norm must be >= 0 (0: no clipping), got {config.clip_norm}")
    need(config.schedule in (None,) + WarmupSchedule.SCHEDULES,
         f"--schedule must be one of {WarmupSchedule.SCHEDULES}")
    need(config.task in (None,) + TASKS, f"--task must be one of {TASKS}")
    task = _task(config)
    if task != "classification":
        kinds = {"segmentation": ("shapes", "folder", "tfrecord"),
                 "detection": ("shapes", "coco", "tfrecord")}[task]
        need(config.dataset.split(":", 1)[0] in kinds,
             f"--task={task} reads {', '.join(kinds[:-1])} or {kinds[-1]}, got --dataset={config.dataset!r}")
        need(not (config.teacher or config.mixup or config.cutmix or config.randaugment
                  or config.label_smoothing),
             "--teacher, --mixup, --cutmix, --randaugment and --label_smoothing are "
             f"classification options; --task={task} does not take them")
    need(config.strategy in STRATEGIES, f"--strategy must be one of {STRATEGIES}")
    need(config.mixed_precision in PRECISIONS, f"--mixed_precision must be one of {PRECISIONS}")
    need(config.export_tflite in TFLITE_EXPORTS, f"--export_tflite must be one of {TFLITE_EXPORTS}")
    need(config.distillation in DISTILLATIONS,
         f"--distillation must be one of {', '.join(DISTILLATIONS)}, got {config.distillation!r}")
    need(config.learning_rate > 0, "--learning_rate must be positive")
    need(0 <= config.label_smoothing < 1, "--label_smoothing must be in [0, 1)")
    need(config.mixup >= 0 and config.cutmix >= 0, "--mixup/--cutmix must be >= 0")
    need(0 <= config.drop_path_rate < 1, "--drop_path_rate must be in [0, 1)")
    need(config.warmup_epochs >= 0, "--warmup_epochs must be >= 0")
    need(config.keep_checkpoints >= 1, "--keep_checkpoints must be >= 1")
    need(not (config.cache_data and config.dataset.split(":", 1)[0] in ("shapes", "tfds")),
         "--cache_data holds the files of folder:, coco: and tfrecord: data in memory; "
         f"{config.dataset!r} has none")
    if config.strategy == "tpu" and config.mixed_precision == "mixed_float16":
        raise ValueError("TPUs train in mixed_bfloat16, not mixed_float16")
    if config.teacher and not (config.teacher in list_models() or os.path.exists(config.teacher)):
        raise ValueError(f"--teacher {config.teacher!r} is neither a registered model nor an "
                         "existing .keras file / SavedModel directory")
    kind = config.dataset.split(":", 1)[0]
    if task == "classification" and kind not in ("shapes", "folder", "tfrecord", "tfds"):
        raise ValueError(f"--dataset must be shapes, folder:PATH, tfrecord:GLOB or tfds:NAME, "
                         f"got {config.dataset!r}")
    if kind == "coco" and not os.path.exists(config.dataset.split(":", 1)[1]):
        raise ValueError(f"--dataset {config.dataset!r}: no such file")
    if kind == "folder" and not os.path.isdir(config.dataset.split(":", 1)[1]):
        raise ValueError(f"--dataset {config.dataset!r}: no such directory")


def _task(config):
    """The task of a run: --task, else the model's registry task."""
    from keras_vit.registry import get_model_config

    return config.task or get_model_config(config.model)["task"]


def _classification_pipelines(config, img_size, cfg, share=(0, 1)):
    """(``train_at(start, worker, num_workers, batch_size)``: training batches from a
    position of a worker's share, validation pipeline or None, DatasetInfo, settings)."""
    from keras_vit.data import load_dataset, load_examples, make_pipeline, share_source

    train_examples, info = load_examples(config.dataset, "train", img_size=img_size,
                                         seed=config.seed, num_samples=config.train_samples,
                                         strict=config.strict_data, share=share)
    try:
        val_ds, _ = load_dataset(config.dataset, "validation", img_size=img_size,
                                 seed=config.seed, num_samples=config.val_samples,
                                 strict=config.strict_data)
    except (ValueError, FileNotFoundError) as e:
        logging.warning("no validation split (%s); training without validation", e)
        val_ds = None
    pipe = dict(img_size=img_size, batch_size=config.batch_size, num_classes=info.num_classes,
                mean=cfg["mean"], std=cfg["std"], interpolation=cfg.get("interpolation", "bicubic"),
                crop_pct=cfg.get("crop_pct", 0.875), seed=config.seed)

    examples_for = share_source(train_examples, config.cache_data)

    def train_at(start, worker, num_workers, batch_size):
        return make_pipeline(examples_for(worker, num_workers), training=True, randaugment=config.randaugment,
                             mixup=config.mixup, cutmix=config.cutmix,
                             label_smoothing=config.label_smoothing, repeat=True,
                             **dict(pipe, batch_size=batch_size), start=start, worker=worker,
                             num_workers=num_workers)

    val_pipe = make_pipeline(val_ds, training=False, **pipe) if val_ds is not None else None
    return train_at, val_pipe, info, pipe


def _unknown_model(name):
    import difflib

    from keras_vit.registry import list_models

    close = difflib.get_close_matches(name, list_models(), n=5, cutoff=0.0)  # always some
    return f"--model {name!r} is not registered" + (f"; closest: {', '.join(close)}" if close else "")


def _build_student(config, num_classes, img_size):
    from keras_vit.registry import create_model

    kwargs = dict(config.model_args, num_classes=num_classes, img_size=img_size)
    if config.drop_path_rate:
        kwargs["drop_path_rate"] = config.drop_path_rate
    if config.teacher and "distilled" in config.model:
        kwargs["distilled_training"] = True
    if _task(config) == "detection":  # with the decoder layers' outputs for the aux losses
        from keras_vit.detection.training import build_detector

        return build_detector(lambda **extra: create_model(config.model, **kwargs, **extra),
                              num_classes)
    return create_model(config.model, **kwargs)


def _load_teacher(spec, num_classes, img_size):
    from keras_vit.registry import create_model, list_models

    if spec in list_models():
        return create_model(spec, num_classes=num_classes, img_size=img_size)
    if spec.endswith(".keras"):
        return keras.saving.load_model(spec)
    layer = keras.layers.TFSMLayer(spec, call_endpoint="serve")  # a SavedModel directory
    inputs = keras.Input((img_size, img_size, 3))
    return keras.Model(inputs, layer(inputs))


def inference_model(model):
    """The deployable model: distilled students average their two heads; segmentation
    models trained with auxiliary heads keep the main one."""
    from keras_vit.models.vit import distilled_inference_model
    from keras_vit.detection.training import detection_inference_model
    from keras_vit.registry import model_task
    from keras_vit.segmentation.training import segmentation_inference_model

    if model_task(model) == "segmentation":
        return segmentation_inference_model(model)
    if model_task(model) == "detection":
        return detection_inference_model(model)
    return distilled_inference_model(model) if len(model.outputs) == 2 else model


def _worker_index():
    return json.loads(os.environ.get("TF_CONFIG", "{}") or "{}").get("task", {}).get("index", 0)


def train(config, flags_text=None):
    """Trains as configured; resumes from model_dir's newest usable checkpoint. Returns a
    summary dict. Every input is checked (flags, model_dir, strategy, data, model, checkpoint)
    before anything in model_dir is written, so a run that fails to start changes nothing
    there; ``flags_text`` (the app's flags) goes to model_dir/flags.txt once it has started.
    Raises ValueError for bad input, cb.Preempted after a SIGTERM checkpoint,
    cb.TrainingDiverged on a NaN loss and WorkerLost when a cluster peer disappears.
    ``config.mixed_precision`` holds for the run only: the caller's dtype policy is back
    when it returns or raises."""
    previous_policy = keras.config.dtype_policy()
    try:
        return _train(config, flags_text)
    finally:
        keras.config.set_dtype_policy(previous_policy)


def _train(config, flags_text):
    from keras_vit.registry import get_model_config

    validate(config)
    check_model_dir_writable(config.model_dir)
    task = _task(config)
    start = time.time()
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        _enable_op_determinism()
    strategy = get_strategy(config.strategy, config.tpu)
    replicas = strategy.num_replicas_in_sync
    if config.batch_size % replicas:
        raise ValueError(f"--batch_size {config.batch_size} is not divisible by the "
                         f"{replicas} replicas")
    jit_compile = resolve_jit_compile(config.jit_compile, strategy)

    # Data
    cfg = get_model_config(config.model)
    img_size = config.img_size or cfg["input_size"]
    train_at, val_pipe, info, pipe = _load_pipelines(config, task, img_size, cfg, strategy)
    steps_per_epoch = config.steps_per_epoch or max(info.num_examples // config.batch_size, 1)
    total_steps = steps_per_epoch * config.epochs

    # Model, loss and metrics, optimizer
    if config.mixed_precision != "none":
        keras.mixed_precision.set_global_policy(config.mixed_precision)
        note = reduced_precision_note(config.mixed_precision)
        if note:
            logging.warning(note)
    with strategy.scope():
        student, model, optimizer = _compiled_model(config, task, info, img_size,
                                                    steps_per_epoch, total_steps, jit_compile)

    # Checkpoint to resume from
    chief = is_chief()
    ckpt_dir = cb.checkpoint_dir(config.model_dir, chief, _worker_index())
    step, source = _restore(model, config.model_dir, ckpt_dir, chief, strategy)
    if step:
        logging.info("resuming from step %d of %d (%s)", step, total_steps, source)

    # Started: the run's files
    if chief:
        if flags_text is not None:
            cb.write_text(cb.join(config.model_dir, "flags.txt"), flags_text)
        write_json(cb.join(config.model_dir, "config.json"), dataclasses.asdict(config))
        write_json(cb.join(config.model_dir, "preprocessing.json"),
                   dict(pipe, class_names=info.class_names, model=config.model))

    # Fit
    history_path = cb.join(config.model_dir, "history.json")
    checkpoints = cb.StepCheckpoint(ckpt_dir, config.checkpoint_every, config.keep_checkpoints)
    sigterm = cb.SigtermCheckpoint(checkpoints, strategy)
    callbacks = [checkpoints, sigterm, cb.LearningRateLogger(),
                 cb.HistoryFile(history_path) if chief else keras.callbacks.Callback()]
    if chief:
        callbacks.append(keras.callbacks.TensorBoard(cb.join(config.model_dir, "logs")))
    verbose = 1 if sys.stdout.isatty() else 0
    if not verbose:
        callbacks.append(cb.AbslProgress(total_steps, max(steps_per_epoch // 4, 1)))
    if config.teacher and val_pipe is not None:
        callbacks.insert(2, _DistilledValidation(student, val_pipe))
    fit_val = None if config.teacher else val_pipe
    if fit_val is not None and task != "segmentation" and _soft_labels(config):
        import tensorflow as tf  # the categorical loss wants one-hot targets

        fit_val = fit_val.map(lambda x, y: (x, tf.one_hot(y, info.num_classes)))
    sigterm.install()
    try:
        _fit(model, strategy, train_at, config.batch_size, fit_val, step, steps_per_epoch,
             config.epochs, callbacks, verbose)
    except Exception as e:
        _raise_if_worker_lost(e, strategy, cb.checkpoint_dir(config.model_dir))
        raise
    finally:
        sigterm.uninstall()
    final_step = int(optimizer.iterations.numpy())

    # Evaluate and export
    seconds = time.time() - start
    summary = dict(model=config.model, task=task, steps=final_step, total_steps=total_steps,
                   num_classes=info.num_classes, class_names=info.class_names,
                   img_size=img_size, train_seconds=round(seconds, 1),
                   # this run's steps over its whole time (set-up and tracing included)
                   train_images_per_second=round((final_step - step) * config.batch_size
                                                 / max(seconds, 1e-9), 1))
    deploy = inference_model(student)
    summary.update(_validation_metrics(deploy, task, val_pipe, info.num_classes))
    if chief:
        deploy.save(cb.join(config.model_dir, "model.keras"))
        summary["curve"] = cb.plot_history(cb.load_history(history_path),
                                           cb.join(config.model_dir, "training_curve.png"))
        if config.export_dir:
            exported = deploy
            if task == "detection":  # the post-processing runs inside the exported graph
                from keras_vit.detection.training import with_postprocessing

                exported = with_postprocessing(deploy, info.num_classes)
            summary.update(export_all(exported, config.export_dir, config.export_tflite,
                                      val_pipe))
        write_json(cb.join(config.model_dir, "summary.json"), summary)
    return summary


def _enable_op_determinism():
    """Same flags and seed, same weights: TensorFlow picks deterministic kernels (and raises
    for an op that has none) and runs tf.data deterministically (README: Determinism)."""
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()


class WorkerLost(RuntimeError):
    """A peer of a multi-worker cluster went away mid-training; every worker must restart."""


def check_model_dir_writable(model_dir):
    """A ValueError naming --model_dir unless a file can be created there (local, gs://,
    ram://): a read-only, full or misplaced directory fails before any work."""
    import tensorflow as tf

    probe = cb.join(model_dir, f".write-probe-{os.getpid()}")
    try:
        tf.io.gfile.makedirs(model_dir)
        with tf.io.gfile.GFile(probe, "w") as f:
            f.write("probe")
        tf.io.gfile.remove(probe)
    except (OSError, tf.errors.OpError) as e:
        raise ValueError(f"--model_dir {model_dir!r} is not writable: {_op_error_text(e)}"
                         ) from e


def _load_pipelines(config, task, img_size, cfg, strategy):
    """The task's (train, validation or None, info, settings); a ValueError naming --dataset
    when the data cannot be found or read. One training example is read now, so that a wrong
    record schema or an undecodable file fails here rather than at the first step."""
    import tensorflow as tf

    from keras_vit.detection import training as detection
    from keras_vit.segmentation import training as segmentation

    worker, num_workers = input_pipeline_of(strategy)
    make = {"segmentation": segmentation.segmentation_pipelines,
            "detection": detection.detection_pipelines}.get(
        task, functools.partial(_classification_pipelines, share=(worker, num_workers)))
    try:
        train_at, val_pipe, info, pipe = make(config, img_size, cfg)
        next(iter(train_at(0, worker, num_workers, config.batch_size).take(1)))
    except StopIteration as e:
        raise ValueError(f"--dataset {config.dataset!r}: no training examples") from e
    except (ValueError, OSError, tf.errors.OpError) as e:
        message = _op_error_text(e)
        if message.startswith("--"):
            raise
        raise ValueError(f"--dataset {config.dataset!r}: {message}") from e
    return train_at, val_pipe, info, pipe


def _op_error_text(error):
    """An error's message without TensorFlow's {{function_node ...}} and [Op:...] wrapping."""
    import re

    text = getattr(error, "message", None) or str(error)
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", text)
    return re.sub(r"\s*\[Op:\w+\]", "", text).strip()


def _soft_labels(config):
    return bool(config.mixup or config.cutmix or config.label_smoothing)


def _compiled_model(config, task, info, img_size, steps_per_epoch, total_steps, jit_compile):
    """(student, the model fit trains, its optimizer), compiled and built; call in scope."""
    import tensorflow as tf

    from keras_vit.detection import training as detection
    from keras_vit.segmentation import training as segmentation

    try:
        student = _build_student(config, info.num_classes, img_size)
    except TypeError as e:  # a builder keyword it does not take
        raise ValueError(f"--model_args {json.dumps(config.model_args)}: {config.model} "
                         f"does not take it ({e})") from e
    except ValueError as e:
        raise ValueError(f"--model {config.model} with --model_args "
                         f"{json.dumps(config.model_args)} at --img_size {img_size}: {e}") from e
    # The model's own layers decide too (depthwise convolutions: XLA is slower on CPUs).
    jit_compile = resolve_jit_compile(
        jit_compile, tf.distribute.get_strategy() if tf.distribute.has_strategy() else None,
        model=student)
    schedule = WarmupSchedule(config.learning_rate, total_steps,
                              int(config.warmup_epochs * steps_per_epoch),
                              config.schedule or ("poly" if task == "segmentation"
                                                  else "cosine"))
    clip = gradient_clip_norm(config, task)
    clip = {"global_clipnorm": clip} if clip else {}
    if config.optimizer == "adamw":
        optimizer = AdamW(schedule, weight_decay=config.weight_decay, **clip)
    else:
        optimizer = keras.optimizers.SGD(schedule, momentum=0.9, nesterov=True,
                                         weight_decay=config.weight_decay or None, **clip)
    if config.teacher:
        teacher = _load_teacher(config.teacher, info.num_classes, img_size)
        model = DistillationModel(student, teacher, config.distillation,
                                  label_smoothing=config.label_smoothing, seed=config.seed)
        model.compile(optimizer=optimizer, jit_compile=jit_compile)
    elif task == "detection":  # the set criterion (in-graph Hungarian matching) is the loss
        model = detection.detection_training_model(student, info.num_classes)
        model.compile(optimizer=optimizer, jit_compile=jit_compile)
    elif task == "segmentation":
        model = student
        loss, loss_weights, metrics = segmentation.segmentation_loss_and_metrics(
            student, info.num_classes)
        model.compile(optimizer=optimizer, loss=loss, loss_weights=loss_weights,
                      metrics=metrics, jit_compile=jit_compile)
    else:
        model = student
        soft = _soft_labels(config)
        loss = (keras.losses.CategoricalCrossentropy(from_logits=True) if soft
                else keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        metrics = [keras.metrics.CategoricalAccuracy(name="accuracy") if soft
                   else keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
        model.compile(optimizer=optimizer, loss=loss, metrics=metrics, jit_compile=jit_compile)
    optimizer.build(model.trainable_variables)
    return student, model, optimizer


def _restore(model, model_dir, ckpt_dir, chief, strategy):
    """(step, directory) of the newest usable checkpoint (step 0: none). Every worker reads the
    chief's checkpoints (a worker killed mid-run may have saved fewer), its own scratch copy
    only where it cannot see the chief's; all must restore the same step."""
    cb.remove_partial_checkpoints(ckpt_dir)
    chief_dir = cb.checkpoint_dir(model_dir)
    source = chief_dir if chief or cb.list_checkpoints(chief_dir) else ckpt_dir
    step = cb.restore(model, source)
    if not same_on_every_worker(strategy, step):
        raise ValueError(f"--model_dir: the workers restored different steps (this one {step} "
                         f"from {source}); give every worker the same --model_dir")
    return step, source


def _fit(model, strategy, train_at, batch_size, val_pipe, step, steps_per_epoch, epochs,
         callbacks, verbose):
    """Fits from ``step`` to the end: the rest of a partly done epoch, then whole epochs. The
    data starts at the step's position (nothing before it is read again)."""
    _build_before_multi_worker_fit(model, strategy, train_at, batch_size)
    epoch, offset = divmod(step, steps_per_epoch)
    data = training_data(train_at, strategy, batch_size, step)
    if step < steps_per_epoch * epochs and offset:
        model.fit(data, initial_epoch=epoch, epochs=epoch + 1,
                  steps_per_epoch=steps_per_epoch - offset, validation_data=val_pipe,
                  callbacks=callbacks, verbose=verbose, shuffle=False)  # tf.data shuffles
        data = training_data(train_at, strategy, batch_size, (epoch + 1) * steps_per_epoch)
        epoch += 1
    if epoch < epochs:
        model.fit(data, initial_epoch=epoch, epochs=epochs, steps_per_epoch=steps_per_epoch,
                  validation_data=val_pipe, callbacks=callbacks, verbose=verbose,
                  shuffle=False)


def input_pipeline_of(strategy):
    """(this process's input pipeline, how many): a worker of a multi-worker cluster; one
    pipeline otherwise (one device, mirrored replicas, TPU hosts: see training_data)."""
    if not is_multi_worker(strategy):
        return 0, 1
    workers = strategy.num_replicas_in_sync // len(strategy.extended.worker_devices)
    return _worker_index(), workers


def training_data(train_at, strategy, batch_size, step):
    """The training batches from ``step`` on. One replica: one stream at position
    step * batch_size. Several (mirrored, multi-worker, TPU): one stream per input pipeline
    (a worker, a TPU host) over its own share of the data, at its own position, each of its
    batches one replica's; nothing is read to be discarded (no auto-sharding)."""
    import tensorflow as tf

    if strategy.num_replicas_in_sync == 1:
        return train_at(step * batch_size, 0, 1, batch_size)

    def worker_stream(context):
        workers = context.num_input_pipelines
        return train_at(step * batch_size // workers, context.input_pipeline_id, workers,
                        context.get_per_replica_batch_size(batch_size))

    return strategy.distribute_datasets_from_function(worker_stream)


def _raise_if_worker_lost(error, strategy, resume_dir):
    """A collective that fails because a peer died (UnavailableError, "Socket closed", ...)
    ends this worker too: TF cannot rejoin a restarted worker into a running collective."""
    import tensorflow as tf

    if not (is_multi_worker(strategy) and isinstance(
            error, (tf.errors.UnavailableError, tf.errors.AbortedError,
                    tf.errors.CancelledError, tf.errors.DeadlineExceededError,
                    tf.errors.InternalError))):
        return
    lines = [line.strip() for line in _op_error_text(error).splitlines() if line.strip()]
    # "Graph execution error:" and the traced stack say nothing; the collective's line does
    first = next((line for line in lines if "abort" in line.lower() or "unhealthy" in line),
                 lines[0] if lines else "")
    raise WorkerLost(
        f"a worker of the cluster was lost ({type(error).__name__}: {first}); this worker "
        f"stops too. TensorFlow cannot rejoin a restarted worker into a running job: start "
        f"every worker again with the same command, and training resumes from the last "
        f"checkpoint (step {cb.latest_step(resume_dir)} in {resume_dir})"
    ) from error


def _validation_metrics(deploy, task, val_pipe, num_classes):
    from keras_vit.detection import training as detection
    from keras_vit.segmentation import training as segmentation

    if val_pipe is None:
        return {}
    if task == "detection":
        metrics = detection.evaluate_detection(deploy, val_pipe, num_classes)
        return {f"val_{name}": value for name, value in metrics.items()}
    if task == "segmentation":
        metrics = segmentation.evaluate_segmentation(deploy, val_pipe, num_classes)
        return dict(val_miou=metrics["mIoU"], val_pixel_accuracy=metrics["pixel_accuracy"],
                    val_per_class_iou=metrics["per_class_iou"])
    return {"val_accuracy": evaluate_accuracy(deploy, val_pipe)}


def _build_before_multi_worker_fit(model, strategy, train_at, batch_size):
    """Keras 3.15's fit builds metrics from a batch it first reduces eagerly across replicas,
    which MultiWorkerMirroredStrategy cannot do ("Attempt to convert a value (PerReplica...)").
    Build them from one local batch instead and skip that step."""
    import tensorflow as tf

    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return
    worker, num_workers = input_pipeline_of(strategy)
    sample = next(iter(train_at(0, worker, num_workers,
                                batch_size // strategy.num_replicas_in_sync).take(1)))
    with strategy.scope():
        model._symbolic_build(data_batch=sample)
    model._maybe_symbolic_build = lambda iterator=None, data_batch=None: None
    _patch_multi_worker_log_reduction()


def _patch_multi_worker_log_reduction():
    """Keras 3.15 averages each step's logs (scalars) across workers with
    ``strategy.reduce("MEAN", v, axis=0)``, which fails on rank-0 values; scalars need
    axis=None. Wraps Keras' reduce for collective multi-worker strategies only."""
    import tensorflow as tf
    from keras.src.backend.tensorflow import trainer as tf_trainer

    original = tf_trainer.reduce_per_replica
    if getattr(original, "_keras_vit_patched", False):
        return

    def reduce_per_replica(values, strategy, reduction):
        if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and reduction in (
                "mean", "auto"):
            def reduce(v):
                if isinstance(v, tf.distribute.DistributedValues) or tf.is_tensor(v):
                    return strategy.reduce("MEAN", v, axis=None)
                return v

            return keras.tree.map_structure(reduce, values)
        return original(values, strategy, reduction)

    reduce_per_replica._keras_vit_patched = True
    tf_trainer.reduce_per_replica = reduce_per_replica


class _DistilledValidation(keras.callbacks.Callback):
    """val_accuracy of the averaged-heads student, for distillation runs."""

    def __init__(self, student, val_pipe):
        super().__init__()
        self.student, self.val_pipe = student, val_pipe

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["val_accuracy"] = evaluate_accuracy(inference_model(self.student), self.val_pipe)


def write_json(path, obj):
    cb.write_text(path, json.dumps(obj, indent=1, default=str))


def read_json(path):
    import tensorflow as tf

    with tf.io.gfile.GFile(path) as f:
        return json.load(f)


def load_trained_model(path):
    """A trained model from a .keras file, or from a model_dir: its model.keras, else the
    model rebuilt from config.json with the last checkpoint's weights."""
    import tensorflow as tf

    if tf.io.gfile.exists(path) and not tf.io.gfile.isdir(path):
        return keras.saving.load_model(path)
    if not tf.io.gfile.isdir(path):
        raise ValueError(f"{path!r} is neither a .keras file nor a model_dir")
    if tf.io.gfile.exists(cb.join(path, "model.keras")):
        return keras.saving.load_model(cb.join(path, "model.keras"))
    config_path = cb.join(path, "config.json")
    ckpt_dir = cb.checkpoint_dir(path)
    if not (tf.io.gfile.exists(config_path) and cb.latest_step(ckpt_dir)):
        raise ValueError(f"{path!r} has no model.keras and no checkpoint with config.json")
    config = TrainConfig(**read_json(config_path))
    prep = read_json(cb.join(path, "preprocessing.json"))
    config.teacher = None  # the checkpoint holds the student alone when rebuilt for export
    model = _build_student(config, prep["num_classes"], prep["img_size"])
    model.compile(optimizer=keras.optimizers.AdamW(1e-3))
    model.optimizer.build(model.trainable_variables)
    cb.restore(model, ckpt_dir, with_optimizer=False)
    return inference_model(model)


def evaluate_accuracy(model, pipe):
    correct = total = 0
    forward = graph_forward(model)
    for images, labels in pipe:
        pred = np.asarray(forward(images)).argmax(-1)
        labels = np.asarray(labels)
        labels = labels.argmax(-1) if labels.ndim == 2 else labels
        correct += int((pred == labels).sum())
        total += len(labels)
    return correct / max(total, 1)


def representative_images(pipe, count=256):
    if pipe is None:
        return None
    batches, n = [], 0
    for images, _ in pipe:
        batches.append(np.asarray(images))
        n += len(batches[-1])
        if n >= count:
            break
    return np.concatenate(batches)[:count]


def export_all(model, export_dir, tflite_mode, val_pipe):
    """SavedModel + (optionally) a verified TFLite file; returns paths and the report. An
    export_dir that is a URL (gs://...) is written locally first, then copied there."""
    import shutil
    import tempfile

    if "://" not in export_dir:
        return _export_local(model, export_dir, tflite_mode, val_pipe)
    local = tempfile.mkdtemp(prefix="keras_vit_export-")
    try:
        out = _export_local(model, local, tflite_mode, val_pipe)
        _copy_tree(local, export_dir)
    finally:
        shutil.rmtree(local, ignore_errors=True)
    out["saved_model"] = cb.join(export_dir, "saved_model")
    if "tflite" in out:
        out["tflite"]["path"] = cb.join(export_dir, os.path.basename(out["tflite"]["path"]))
    return out


def _copy_tree(src, dst):
    import tensorflow as tf

    for root, _, files in os.walk(src):
        target = cb.join(dst, os.path.relpath(root, src)) if root != src else dst
        tf.io.gfile.makedirs(target)
        for name in files:
            tf.io.gfile.copy(os.path.join(root, name), cb.join(target, name), overwrite=True)


def _export_local(model, export_dir, tflite_mode, val_pipe):
    from keras_vit.export import export_saved_model, export_tflite

    os.makedirs(export_dir, exist_ok=True)
    out = {"saved_model": export_saved_model(model, os.path.join(export_dir, "saved_model"))}
    if tflite_mode != "none":
        from keras_vit.export.tflite import CALIBRATION_IMAGES, HELD_OUT_IMAGES, calibration_split

        data, held_out = calibration_split(
            representative_images(val_pipe, CALIBRATION_IMAGES + HELD_OUT_IMAGES))
        if tflite_mode.startswith("int8") and data is None:
            raise ValueError(f"an {tflite_mode} export needs validation data for calibration")
        suffix = "" if tflite_mode == "fp32" else f"_{tflite_mode}"
        report = export_tflite(model, os.path.join(export_dir, f"model{suffix}.tflite"),
                               quantization=_TFLITE_MODE[tflite_mode], representative_data=data,
                               verification_data=held_out)
        out["tflite"] = report
    return out
