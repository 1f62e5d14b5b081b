"""Small factories that give every family timm's initialisers and numerics."""

import contextlib
import contextvars
import functools

import keras
from keras import ops

def trunc_normal(stddev=0.02):
    """timm's trunc_normal_(std=.02). A new instance per weight: Keras 3 gives an unseeded
    initializer instance the same values on every call, so sharing one would start
    every layer of a shape with identical weights."""
    return keras.initializers.TruncatedNormal(stddev=stddev)


def dense(units, use_bias=True, name=None, rank=None):
    """Linear layer with timm's init: trunc_normal(std=.02) weights, zero bias. With
    ``rank``: the factorised ``LowRankDense`` (keras_vit.compress.factorize_dense)."""
    if rank:
        return LowRankDense(units, rank, use_bias=use_bias, name=name)
    return Linear(units, use_bias=use_bias, kernel_initializer=trunc_normal(),
                  bias_initializer="zeros", name=name)


def flatten_tokens(x):
    """(..., C) -> (rows, C) and the function that gives a (rows, C') result the leading
    shape back. A linear layer on the 2-D form is one MatMul directly followed by its
    BiasAdd (and activation), the pattern TensorFlow's grappler fuses into one oneDNN
    kernel; on (B, N, C) Keras puts a Reshape between them and nothing fuses."""
    if len(x.shape) <= 2:
        return x, lambda y: y
    lead = tuple(x.shape[1:-1])
    if any(d is None for d in lead):  # sizes only known at run time
        lead = tuple(ops.shape(x)[1:-1])
    return ops.reshape(x, (-1, x.shape[-1])), lambda y: ops.reshape(y, (-1,) + lead + (y.shape[-1],))


@keras.saving.register_keras_serializable(package="keras_vit")
class Linear(keras.layers.Dense):
    """keras.layers.Dense that runs on inputs of any rank as one 2-D matmul (see
    ``flatten_tokens``): the same weights, config and results, and on CPU under TensorFlow
    the MatMul, bias and activation run as one fused oneDNN op (mixed_bfloat16 ViT-S/16
    inference +25-31%, benchmarks/README.md, "Fused linear layers")."""

    def call(self, inputs, training=None):
        x, restore = flatten_tokens(inputs)
        return restore(super().call(x, training=training))


@keras.saving.register_keras_serializable(package="keras_vit")
class LowRankDense(keras.layers.Layer):
    """y = (x A) B + b with A (in, rank) and B (rank, units): a Dense layer whose kernel is
    factorised, rank (in + units) weights instead of in x units."""

    def __init__(self, units, rank, use_bias=True, **kwargs):
        super().__init__(**kwargs)
        self.units, self.rank, self.use_bias = int(units), int(rank), bool(use_bias)

    def build(self, input_shape):
        self.kernel_a = self.add_weight(name="kernel_a", shape=(input_shape[-1], self.rank),
                                        initializer=trunc_normal())
        self.kernel_b = self.add_weight(name="kernel_b", shape=(self.rank, self.units),
                                        initializer=trunc_normal())
        self.bias = (self.add_weight(name="bias", shape=(self.units,), initializer="zeros")
                     if self.use_bias else None)

    def call(self, x):
        y = ops.matmul(ops.matmul(x, self.kernel_a), self.kernel_b)
        return y + self.bias if self.bias is not None else y

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    def get_config(self):
        return {**super().get_config(), "units": self.units, "rank": self.rank,
                "use_bias": self.use_bias}


def layer_norm(eps=1e-6, name=None):
    """LayerNorm with timm's ViT epsilon (1e-6; torch's default is 1e-5)."""
    return LayerNorm(epsilon=eps, name=name)


# Off while a model is traced for TFLite: the converter lowers the fused LayerNorm's NCHW
# batch norm with TRANSPOSEs, where Keras' form converts to plain MEAN / RSQRT / MUL ops; and
# BatchNorm's file stays the one Keras' form gives (tested against Keras in tests/).
_FUSED_NORMS = contextvars.ContextVar("fused_norms", default=True)


@contextlib.contextmanager
def unfused_norms():
    """Trace ``LayerNorm`` and ``BatchNorm`` in Keras' own forms (for the TFLite converter)."""
    token = _FUSED_NORMS.set(False)
    try:
        yield
    finally:
        _FUSED_NORMS.reset(token)


@functools.lru_cache(maxsize=None)
def onednn_cpu():
    """True where TensorFlow runs on CPUs only, with its oneDNN kernels on: where the fused
    LayerNorm and the bfloat16 softmax (layers.attention) apply."""
    if keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf
    from tensorflow.python.util import _pywrap_util_port

    return bool(_pywrap_util_port.IsMklEnabled()) and not (
        tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"))


@keras.saving.register_keras_serializable(package="keras_vit")
class LayerNorm(keras.layers.LayerNormalization):
    """keras.layers.LayerNormalization (same weights, config and results) that on
    TensorFlow on CPUs runs as one oneDNN kernel. Keras 3 writes LayerNorm as eight
    element-wise ops; TensorFlow's grappler fuses a LayerNorm into ``_MklLayerNorm`` only
    in the form Keras 2 wrote it: a training-mode FusedBatchNormV3 over a (1, rows, C, 1)
    view with Fill-ed unit scale and zero offset, then gamma and beta, on rank 2 or 3
    (ViT-S/16's shape, 8 x 197 x 384: 0.9 ms against 1.9 ms; benchmarks/README.md)."""

    def call(self, inputs):
        rank = len(inputs.shape)
        axes = [a % rank for a in (self.axis if isinstance(self.axis, (list, tuple)) else [self.axis])]
        dtype = keras.backend.standardize_dtype(inputs.dtype)
        if (axes != [rank - 1] or self.rms_scaling or not (self.center and self.scale)
                or dtype not in ("float32", "bfloat16", "float16")  # float64: no fused kernel
                or not _FUSED_NORMS.get() or not onednn_cpu()):
            return super().call(inputs)
        import tensorflow as tf

        x, channels = inputs, inputs.shape[-1]
        if x.dtype in (tf.bfloat16, tf.float16):  # float32, as Keras' own LayerNorm computes
            x = tf.cast(x, tf.float32)
        # the fusion takes rank 2 or 3: rows of C for Swin's (B, H, W, C) maps
        x, restore = flatten_tokens(x) if rank > 3 else (x, lambda y: y)
        if x is not inputs:
            # An identity grappler does not see through: it would move the cast after the
            # reshape below, or merge the two reshapes, and the pattern would not match.
            x = tf.raw_ops.PlaceholderWithDefault(input=x, shape=x.shape)
        shape = tf.shape(x)
        rows = tf.reduce_prod(shape[:-1], keepdims=True)
        # PlaceholderWithDefault is an identity that grappler does not constant-fold: with
        # static shapes the two Fills would otherwise become Consts and the pattern not match.
        rows = tf.raw_ops.PlaceholderWithDefault(input=rows, shape=[1])
        y = tf.reshape(x, tf.concat([[1], rows, [channels, 1]], axis=0))
        # The raw op: tf.nn.fused_batch_norm raises epsilon to at least 1.001e-5 (cuDNN's floor).
        y = tf.raw_ops.FusedBatchNormV3(
            x=y, scale=tf.fill(rows, 1.0), offset=tf.fill(rows, 0.0),
            mean=tf.constant([], tf.float32), variance=tf.constant([], tf.float32),
            epsilon=self.epsilon, data_format="NCHW", is_training=True)[0]
        y = tf.reshape(y, shape) * tf.cast(self.gamma, x.dtype) + tf.cast(self.beta, x.dtype)
        return tf.cast(restore(y), self.compute_dtype)


def fused_inference_batch_norm(x, scale, offset, mean, variance, epsilon):
    """Inference batch norm of an NHWC float32 map (scale / offset None: 1 / 0; variables or
    tensors) as the one op FusedBatchNormV3, which grappler fuses into the convolution
    before it (with its ReLU), on TensorFlow on CPUs with oneDNN and outside the TFLite
    trace; None elsewhere (the caller's own formula).
    Keras writes it as a multiply and an add over the whole map, which nothing fuses
    (ResNet-50 +4%, BoTNet-26 +7%, DETR-R50 at 512 px +6% images/s; benchmarks/README.md)."""
    if (len(x.shape) != 4 or keras.backend.standardize_dtype(x.dtype) != "float32"
            or not _FUSED_NORMS.get() or not onednn_cpu()):
        return None
    import tensorflow as tf

    channels = x.shape[-1]
    scale = tf.ones([channels]) if scale is None else tf.convert_to_tensor(scale)
    offset = tf.zeros([channels]) if offset is None else tf.convert_to_tensor(offset)
    return tf.raw_ops.FusedBatchNormV3(
        x=x, scale=scale, offset=offset, mean=tf.convert_to_tensor(mean),
        variance=tf.convert_to_tensor(variance), epsilon=epsilon, data_format="NHWC",
        is_training=False)[0]


@keras.saving.register_keras_serializable(package="keras_vit")
class BatchNorm(keras.layers.BatchNormalization):
    """keras.layers.BatchNormalization (same weights, config, training and results) whose
    inference (and a frozen one's training) on NHWC float32 maps is
    ``fused_inference_batch_norm``: one oneDNN kernel with the convolution before it."""

    def call(self, inputs, training=None, mask=None):
        if not (training and self.trainable) and mask is None and self.axis in (-1, 3):
            y = fused_inference_batch_norm(
                inputs, self.gamma if self.scale else None, self.beta if self.center else None,
                self.moving_mean, self.moving_variance, self.epsilon)
            if y is not None:
                return y
        return super().call(inputs, training=training, mask=mask)


def batch_norm(name=None, eps=1e-5):
    """torch's BatchNorm2d(eps=1e-5, momentum=0.1): Keras counts the momentum the other way."""
    return BatchNorm(epsilon=eps, momentum=0.9, name=name)


def gelu_exact(x):
    return keras.activations.gelu(x, approximate=False)


def quick_gelu(x):
    return x * ops.sigmoid(1.702 * x)


_ACTIVATIONS = {
    "gelu": gelu_exact,
    "gelu_tanh": lambda x: keras.activations.gelu(x, approximate=True),
    "quick_gelu": quick_gelu,
    "relu": keras.activations.relu,
    "silu": keras.activations.silu,
    "tanh": keras.activations.tanh,
    "hard_swish": keras.activations.hard_swish,
}


def activation(name):
    """An activation by name; a plain function, so layers stay Lambda-free when saved."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"Unknown activation {name!r}; expected one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]
