"""Callbacks of the trainer: step checkpoints for exact resume, NaN stop, logs, curves."""

import json
import math
import os
import time

import keras
import numpy as np
from absl import logging

CHECKPOINT_NAME = "ckpt.weights.h5"
STATE_NAME = "ckpt.json"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def checkpoint_dir(model_dir, chief=True, worker_index=0):
    # Non-chief workers write to their own scratch dir so the chief's is never clobbered.
    sub = "checkpoints" if chief else f"checkpoints_worker{worker_index}"
    return os.path.join(model_dir, sub)


def latest_step(ckpt_dir):
    """The global step of the last saved checkpoint, or 0 when there is none."""
    path = os.path.join(ckpt_dir, STATE_NAME)
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return int(json.load(f)["step"])


def restore(model, ckpt_dir):
    """Loads model + optimizer state of the last checkpoint; returns its step (0 if none)."""
    step = latest_step(ckpt_dir)
    if step:
        model.load_weights(os.path.join(ckpt_dir, CHECKPOINT_NAME))
    return step


class StepCheckpoint(keras.callbacks.Callback):
    """Saves model and optimizer every ``every_steps`` steps and at each epoch end, atomically.

    Checks the loss first: a NaN/Inf loss stops training and raises
    ``TrainingDiverged`` without overwriting the last good checkpoint.
    """

    def __init__(self, ckpt_dir, every_steps=100):
        super().__init__()
        self.ckpt_dir, self.every_steps = ckpt_dir, int(every_steps)
        self.diverged_at = None

    def _step(self):
        return int(self.model.optimizer.iterations.numpy())

    def save(self):
        os.makedirs(self.ckpt_dir, exist_ok=True)
        step = self._step()
        tmp = os.path.join(self.ckpt_dir, f".tmp-{os.getpid()}.weights.h5")
        self.model.save_weights(tmp)
        os.replace(tmp, os.path.join(self.ckpt_dir, CHECKPOINT_NAME))
        tmp_state = os.path.join(self.ckpt_dir, f".tmp-{os.getpid()}.json")
        with open(tmp_state, "w") as f:
            json.dump({"step": step, "time": time.time()}, f)
        os.replace(tmp_state, os.path.join(self.ckpt_dir, STATE_NAME))

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
            items = " ".join(f"{k}={float(v):.4f}" for k, v in (logs or {}).items())
            logging.info("step %d/%d %s (%.1f steps/s)", step, self.total_steps, items, rate)

    def on_epoch_end(self, epoch, logs=None):
        items = " ".join(f"{k}={float(v):.4f}" for k, v in (logs or {}).items())
        logging.info("epoch %d: %s", epoch + 1, items)


class HistoryFile(keras.callbacks.Callback):
    """Appends each epoch's logs to model_dir/history.json, so curves survive restarts."""

    def __init__(self, path):
        super().__init__()
        self.path = path

    def on_epoch_end(self, epoch, logs=None):
        history = load_history(self.path)
        history = [h for h in history if h["epoch"] != epoch + 1]
        history.append({"epoch": epoch + 1, **{k: float(v) for k, v in (logs or {}).items()}})
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(sorted(history, key=lambda h: h["epoch"]), f, indent=1)
        os.replace(tmp, self.path)


def load_history(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)


def plot_history(history, path):
    """Loss and accuracy per epoch as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return None
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("loss", "accuracy")):
        for prefix, style in (("", "-"), ("val_", "--")):
            values = [h.get(prefix + key) for h in history]
            if any(v is not None for v in values):
                ax.plot(epochs, values, style, marker="o", label=prefix + key)
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
