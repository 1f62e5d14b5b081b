"""One factory for tf.distribute strategies: one CPU, many GPUs, many machines, TPU pods."""

import json
import os

import keras
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



def is_multi_worker(strategy):
    """True when the strategy's replicas span several processes (a multi-worker cluster)."""
    return (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
            and strategy.num_replicas_in_sync > len(strategy.extended.worker_devices))


def _device_types(strategy):
    if strategy is None:
        return {"GPU"} if tf.config.list_logical_devices("GPU") else {"CPU"}
    return {tf.DeviceSpec.from_string(d).device_type or "CPU"
            for d in strategy.extended.worker_devices}


def resolve_jit_compile(requested, strategy=None, what="the train and eval steps", model=None):
    """Whether to XLA-compile under ``strategy``: the one decision every app makes.

    XLA has no CPU collectives ("Collectives are not yet implemented for CPU devices when
    compiling with XLA", then a crash): a step that all-reduces across replicas or workers
    on CPUs runs as a plain tf.function graph instead. Keras does not XLA-compile under op
    determinism either. A ``model`` with depthwise convolutions (PVT v2, XCiT, Twins, PiT,
    CMT, SegFormer) runs as a graph on CPUs too: XLA:CPU's depthwise convolution took 17.5x
    TensorFlow's kernel (benchmarks/README.md; PVT v2-B0 4.8 against 36 img/s). So does a
    model under a bfloat16 policy on CPUs: XLA:CPU does not call oneDNN's bfloat16 kernels
    (ViT-S mixed_bfloat16 train step 5.5 img/s under XLA, 7.0-7.9 as a graph). Everything
    else compiles as asked. Logs one line when it overrides the request."""
    if not requested:
        return False
    replicated = strategy is not None and (strategy.num_replicas_in_sync > 1
                                           or is_multi_worker(strategy))
    on_cpus = _device_types(strategy) == {"CPU"}
    cpu_model = model is not None and on_cpus
    if replicated and on_cpus:
        reason = (f"{type(strategy).__name__} with {strategy.num_replicas_in_sync} replicas on "
                  "CPU devices all-reduces inside the step, and XLA has no CPU collectives")
    elif _op_determinism_enabled():
        reason = "op determinism is on, and Keras does not XLA-compile deterministic steps"
    elif cpu_model and holds_depthwise_convolution(model):
        reason = ("the model holds depthwise convolutions, which XLA runs ~17x slower than "
                  "TensorFlow's own kernel on CPUs")
    elif cpu_model and "bfloat16" in model.dtype_policy.name:
        reason = ("the model computes in bfloat16, which XLA:CPU runs without oneDNN (a ViT-S "
                  "train step 0.7x the graph's)")
    else:
        return True
    logging.warning("XLA off for %s: %s; running them as tf.function graphs", what, reason)
    return False


def holds_depthwise_convolution(model):
    return any(isinstance(layer, keras.layers.DepthwiseConv2D)
               for layer in model._flatten_layers())


def _op_determinism_enabled():
    from tensorflow.python.framework.config import is_op_determinism_enabled  # what Keras reads

    return is_op_determinism_enabled()


def any_worker(strategy, flag):
    """True on every worker when ``flag`` is true on any of them (one scalar all-reduce in
    a multi-worker cluster, so that all workers act at the same step); ``flag`` elsewhere."""
    if not is_multi_worker(strategy):
        return bool(flag)
    value = strategy.run(lambda: tf.constant(1.0 if flag else 0.0))
    return float(strategy.reduce("SUM", value, axis=None)) > 0



def same_on_every_worker(strategy, value):
    """Whether an integer is the same on every worker (True outside a cluster): all equal
    exactly when sum(v)^2 == n * sum(v^2), one all-reduce of (1, v, v^2)."""
    if not is_multi_worker(strategy):
        return True
    v = float(value)
    total = strategy.reduce("SUM", strategy.run(lambda: tf.constant([1.0, v, v * v], tf.float64)),
                            axis=None).numpy()
    n, s1, s2 = total
    return abs(s1 * s1 - n * s2) < 0.5
