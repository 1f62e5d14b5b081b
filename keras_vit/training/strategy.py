"""One factory for tf.distribute strategies: one CPU, many GPUs, many machines, TPU pods."""

import json
import os

import tensorflow as tf
from absl import logging

STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker_mirrored", "tpu")


def get_strategy(name="auto", tpu=None):
    """A tf.distribute strategy by name.

    auto: TPU if ``tpu`` is given, MultiWorkerMirrored if TF_CONFIG names a
    cluster, Mirrored over all GPUs if there are several, else OneDevice.
    """
    if name not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {name!r}")
    if name == "auto":
        if tpu:
            name = "tpu"
        elif _tf_config_has_cluster():
            name = "multi_worker_mirrored"
        elif len(tf.config.list_logical_devices("GPU")) > 1:
            name = "mirrored"
        else:
            name = "one_device"
    if name == "one_device":
        gpus = tf.config.list_logical_devices("GPU")
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    if name == "multi_worker_mirrored":
        if not _tf_config_has_cluster():
            raise ValueError("multi_worker_mirrored needs TF_CONFIG with a cluster and this "
                             "worker's task, e.g. TF_CONFIG='{\"cluster\": {\"worker\": "
                             "[\"host1:12345\", \"host2:12345\"]}, \"task\": {\"type\": "
                             "\"worker\", \"index\": 0}}'")
        return tf.distribute.MultiWorkerMirroredStrategy()
    return _tpu_strategy(tpu)


def _tf_config_has_cluster():
    try:
        config = json.loads(os.environ.get("TF_CONFIG", "{}"))
    except json.JSONDecodeError as e:
        raise ValueError(f"TF_CONFIG is not valid JSON: {e}") from e
    return bool(config.get("cluster"))


def _tpu_strategy(tpu):
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or "")
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, RuntimeError, tf.errors.OpError) as e:
        raise RuntimeError(
            f"No TPU found (--tpu={tpu!r}): {str(e).splitlines()[0] if str(e) else e!r}. On a Cloud "
            "TPU VM pass --tpu=local; on a TPU node pass its name or grpc:// address.") from e
    logging.info("TPU devices: %s", tf.config.list_logical_devices("TPU"))
    return tf.distribute.TPUStrategy(resolver)


def is_chief():
    """True on the worker that writes summaries, plots and exports (worker 0, or alone)."""
    config = json.loads(os.environ.get("TF_CONFIG", "{}") or "{}")
    task = config.get("task", {})
    return task.get("type", "worker") in ("chief", "worker") and task.get("index", 0) == 0 and (
        task.get("type") == "chief" or "chief" not in config.get("cluster", {}))
