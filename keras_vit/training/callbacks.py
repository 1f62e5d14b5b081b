"""Callbacks of the trainer: step checkpoints for exact resume (the newest N, each one file
with its step, written atomically), SIGTERM checkpoints, NaN stop, logs, curves."""

import io
import json
import math
import os
import time

import keras
import numpy as np
from absl import logging

CHECKPOINT_GLOB = "ckpt-*.weights.h5"
_TMP_PREFIX = ".tmp-"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class CheckpointError(ValueError):
    """A model_dir has checkpoints but none of them can be read."""


class Preempted(RuntimeError):
    """SIGTERM arrived; a checkpoint of the current step was saved before stopping."""


def checkpoint_dir(model_dir, chief=True, worker_index=0):
    # Non-chief workers write to their own scratch dir so the chief's is never clobbered.
    sub = "checkpoints" if chief else f"checkpoints_worker{worker_index}"
    return join(model_dir, sub)


def join(directory, name):
    """A path inside ``directory``, also for URLs (gs://, ram://)."""
    return directory.rstrip("/") + "/" + name


def checkpoint_path(ckpt_dir, step):
    return join(ckpt_dir, f"ckpt-{int(step):09d}.weights.h5")


def list_checkpoints(ckpt_dir):
    """[(step, path)] of the checkpoints in ``ckpt_dir``, oldest first."""
    import tensorflow as tf

    found = []
    for path in tf.io.gfile.glob(join(ckpt_dir, CHECKPOINT_GLOB)):
        digits = path.rsplit("/", 1)[-1][len("ckpt-"):-len(".weights.h5")]
        if digits.isdigit():
            found.append((int(digits), path))
    return sorted(found)


def latest_step(ckpt_dir):
    """The step of the newest checkpoint file (readable or not), or 0 when there is none."""
    found = list_checkpoints(ckpt_dir)
    return found[-1][0] if found else 0


def restore(model, ckpt_dir, with_optimizer=True):
    """Loads model + optimizer state of the newest readable checkpoint; returns its step (0
    when the directory has none). An unreadable one is reported and the one before it is
    used; when every one is unreadable, CheckpointError: never a silent start from scratch.
    ``with_optimizer=False``: the weights alone matter (evaluation, export), so an optimizer
    other than the run's (whose state Keras then skips) is no reason to reject the file."""
    found = list_checkpoints(ckpt_dir)
    problems = []
    for step, path in reversed(found):
        try:
            model.load_weights(path)
            stored = int(model.optimizer.iterations.numpy()) if with_optimizer else step
            if stored != step:
                raise ValueError(f"it holds step {stored}, its name says {step}")
        except Exception as e:  # h5py/Keras raise many types for truncated or foreign files
            problem = f"{path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            logging.warning("checkpoint %s is unreadable (%s); trying the previous one",
                            path, problem)
            problems.append(problem)
            continue
        if problems:
            logging.warning("resuming from the older checkpoint %s (step %d)", path, step)
        return step
    if problems:
        raise CheckpointError(
            f"--model_dir: no usable checkpoint in {ckpt_dir} ({'; '.join(problems)}). Not "
            "starting from scratch over them: move the directory away (or pass another "
            "--model_dir) to train anew.")
    return 0


def save_checkpoint(model, ckpt_dir, keep=2):
    """Writes model + optimizer (its step included) as one file: to a temporary name, flushed
    to disk, then renamed, so a reader sees a whole checkpoint or none; keeps the newest
    ``keep``. Returns the path."""
    import tensorflow as tf

    tf.io.gfile.makedirs(ckpt_dir)
    step = int(model.optimizer.iterations.numpy())
    path = checkpoint_path(ckpt_dir, step)
    tmp = join(ckpt_dir, f"{_TMP_PREFIX}{os.getpid()}-{path.rsplit('/', 1)[-1]}")
    model.save_weights(tmp)
    _fsync(tmp)
    tf.io.gfile.rename(tmp, path, overwrite=True)
    _fsync(ckpt_dir)
    for _, old in list_checkpoints(ckpt_dir)[:-max(int(keep), 1)]:
        tf.io.gfile.remove(old)
    return path


def remove_partial_checkpoints(ckpt_dir):
    """Deletes temporary files a killed save left behind (each worker owns its directory)."""
    import tensorflow as tf

    for path in tf.io.gfile.glob(join(ckpt_dir, _TMP_PREFIX + "*")):
        tf.io.gfile.remove(path)


def _fsync(path):
    if "://" in path:  # object stores commit a file whole when it is closed
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StepCheckpoint(keras.callbacks.Callback):
    """Saves model and optimizer every ``every_steps`` steps and at each epoch end, atomically,
    keeping the newest ``keep``.

    Checks the loss first: a NaN/Inf loss stops training and raises
    ``TrainingDiverged`` without overwriting the last good checkpoint.
    """

    def __init__(self, ckpt_dir, every_steps=100, keep=2):
        super().__init__()
        self.ckpt_dir, self.every_steps, self.keep = ckpt_dir, int(every_steps), int(keep)
        self.diverged_at = None
        self.saved_step = None

    def _step(self):
        return int(self.model.optimizer.iterations.numpy())

    def save(self):
        if self.saved_step != self._step():
            save_checkpoint(self.model, self.ckpt_dir, self.keep)
            self.saved_step = self._step()

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.diverged_at = self._step()
            self.model.stop_training = True
            return
        if self.every_steps and self._step() % self.every_steps == 0:
            self.save()

    def on_epoch_end(self, epoch, logs=None):
        if self.diverged_at is None:
            self.save()

    def on_train_end(self, logs=None):
        if self.diverged_at is not None:
            raise TrainingDiverged(
                f"loss became NaN/Inf at step {self.diverged_at}; training stopped. The last good "
                f"checkpoint (step {latest_step(self.ckpt_dir)}) is kept in {self.ckpt_dir}. "
                "Lower --learning_rate, add --warmup_epochs or use --mixed_precision=none.")


class SigtermCheckpoint(keras.callbacks.Callback):
    """On SIGTERM (what cloud VMs and TPU hosts get before they go), saves a checkpoint of the
    current step and raises ``Preempted``. In a multi-worker cluster the workers agree on the
    step with one scalar all-reduce per step, so all of them save the same step and stop."""

    def __init__(self, checkpoint, strategy):
        super().__init__()
        self.checkpoint, self.strategy = checkpoint, strategy
        self.received = False
        self._previous = None

    def install(self):
        """Takes over SIGTERM (main thread only); ``uninstall`` gives it back."""
        import signal

        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave SIGTERM as it is
            logging.warning("SIGTERM not watched: training does not run in the main thread")

    def uninstall(self):
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _handle(self, signum, frame):
        del signum, frame
        self.received = True

    def on_train_batch_end(self, batch, logs=None):
        from keras_vit.training.strategy import any_worker

        if not any_worker(self.strategy, self.received):
            return
        self.checkpoint.save()
        step = int(self.model.optimizer.iterations.numpy())
        raise Preempted(f"SIGTERM: saved a checkpoint at step {step} in "
                        f"{self.checkpoint.ckpt_dir} and stopped; run the same command again "
                        "to continue from that step")


class LearningRateLogger(keras.callbacks.Callback):
    """Puts the current learning rate into the logs (TensorBoard and history pick it up)."""

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            lr = self.model.optimizer.learning_rate
            logs["learning_rate"] = float(np.asarray(lr))


class AbslProgress(keras.callbacks.Callback):
    """Progress as absl log lines, for runs without a terminal (CI, clusters)."""

    def __init__(self, total_steps, every_steps=50):
        super().__init__()
        self.total_steps, self.every_steps = total_steps, max(int(every_steps), 1)
        self.start = None

    def on_train_begin(self, logs=None):
        self.start = time.time()

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        if step % self.every_steps == 0 or step == self.total_steps:
            rate = step / max(time.time() - self.start, 1e-9)
            items = _format_logs(logs)
            logging.info("step %d/%d %s (%.1f steps/s)", step, self.total_steps, items, rate)

    def on_epoch_end(self, epoch, logs=None):
        items = _format_logs(logs)
        logging.info("epoch %d: %s", epoch + 1, items)


def _format_logs(logs):
    # the learning rate in scientific notation: 1e-4 would print as 0.0001, 1e-5 as 0.0000
    return " ".join(f"{k}={float(v):.2e}" if k == "learning_rate" else f"{k}={float(v):.4f}"
                    for k, v in (logs or {}).items())


class HistoryFile(keras.callbacks.Callback):
    """Appends each epoch's logs to model_dir/history.json, so curves survive restarts."""

    def __init__(self, path):
        super().__init__()
        self.path = path

    def on_epoch_end(self, epoch, logs=None):
        history = load_history(self.path)
        history = [h for h in history if h["epoch"] != epoch + 1]
        history.append({"epoch": epoch + 1, **{k: float(v) for k, v in (logs or {}).items()}})
        write_text(self.path, json.dumps(sorted(history, key=lambda h: h["epoch"]), indent=1))


def write_text(path, text, mode="w"):
    """Writes a file anywhere TensorFlow can (local, gs://, ram://): to a temporary name,
    then renamed over ``path``."""
    import tensorflow as tf

    tmp = path + f".tmp-{os.getpid()}"
    with tf.io.gfile.GFile(tmp, mode) as f:
        f.write(text)
    tf.io.gfile.rename(tmp, path, overwrite=True)


def load_history(path):
    import tensorflow as tf

    if not tf.io.gfile.exists(path):
        return []
    with tf.io.gfile.GFile(path) as f:
        return json.load(f)


def plot_history(history, path):
    """Loss and the task's metric (accuracy, segmentation's mean_iou) per epoch as a PNG;
    the loss alone where the run logs no metric (detection)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return None
    epochs = [h["epoch"] for h in history]
    keys = ["loss"] + [k for k in ("accuracy", "mean_iou") if any(k in h for h in history)][:1]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for prefix, style in (("", "-"), ("val_", "--")):
            values = [h.get(prefix + key) for h in history]
            if any(v is not None for v in values):
                ax.plot(epochs, values, style, marker="o", label=prefix + key)
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    write_text(path, png.getvalue(), mode="wb")
    return path
