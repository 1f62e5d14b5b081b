"""Multi-head scaled dot-product attention softmax(QK^T / sqrt(d_k)) V (Vaswani et al. 2017)."""

import keras
from keras import ops

from keras_vit.layers.common import dense, onednn_cpu


def split_heads(x, num_heads):
    """(B, N, H*d) -> (B, H, N, d); tensors stay 4-D so TFLite/XNNPACK keep one partition."""
    n = x.shape[1] if x.shape[1] is not None else ops.shape(x)[1]
    x = ops.reshape(x, (-1, n, num_heads, x.shape[-1] // num_heads))
    return ops.transpose(x, (0, 2, 1, 3))


def merge_heads(x):
    """(B, H, N, d) -> (B, N, H*d)."""
    n = x.shape[2] if x.shape[2] is not None else ops.shape(x)[2]
    x = ops.transpose(x, (0, 2, 1, 3))
    return ops.reshape(x, (-1, n, x.shape[2] * x.shape[3]))


def masked_logits(logits, mask):
    """Masked positions get a large negative logit (finite, so an all-masked row gives no NaN)."""
    big = 3e4 if logits.dtype == "float16" else 1e9
    return ops.where(mask, logits, ops.cast(-big, logits.dtype))


def softmax_float32(logits, axis=-1):
    """Softmax computed in float32 and returned in the logits' dtype: under a bfloat16
    policy, its 8-bit mantissa sums the exponentials of a long row with errors of a few
    percent (float32 and float64 logits: unchanged, no casts)."""
    dtype = keras.backend.standardize_dtype(logits.dtype)
    if dtype not in ("bfloat16", "float16"):
        return ops.softmax(logits, axis=axis)
    if dtype == "bfloat16" and onednn_cpu() and not _recording_gradients():
        # oneDNN's bfloat16 softmax computes in float32 and rounds once: bit-identical to
        # the casts below (tested) without casting the (B, H, N, N) logits twice. Not under
        # a gradient tape: TensorFlow's softmax gradient would run in bfloat16.
        return ops.softmax(logits, axis=axis)
    return ops.cast(ops.softmax(ops.cast(logits, "float32"), axis=axis), logits.dtype)


def _recording_gradients():
    from tensorflow.python.eager import record

    return record.could_possibly_record()


@keras.saving.register_keras_serializable(package="keras_vit")
class MultiHeadAttention(keras.layers.Layer):
    """Multi-head attention with output projection, self or cross.

    Self-attention projects q, k, v with one fused linear layer ``qkv`` (timm's
    layout). With ``cross=True`` queries come from ``x`` through ``q`` and keys
    and values from ``context`` through ``kv`` (the decoder's encoder-decoder
    attention). ``call`` takes an optional boolean ``attention_mask`` (True = attend) and
    an additive ``bias`` (relative position bias, causal masks), both
    broadcastable to (batch, heads, queries, keys).
    """

    def __init__(self, dim, num_heads=8, qkv_bias=True, attn_drop=0.0, proj_drop=0.0,
                 cross=False, head_dim=None, ranks=None, **kwargs):
        super().__init__(**kwargs)
        self.dim = int(dim)
        self.num_heads = int(num_heads)
        self.head_dim = int(head_dim) if head_dim else self.dim // self.num_heads
        if head_dim is None and self.dim % self.num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.inner_dim = self.head_dim * self.num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv_bias = bool(qkv_bias)
        self.attn_drop = float(attn_drop)
        self.proj_drop = float(proj_drop)
        self.cross = bool(cross)
        self.ranks = dict(ranks or {})  # factorised linear layers: {"qkv": r, "proj": r}
        if self.cross:
            self.q = dense(self.inner_dim, use_bias=qkv_bias, name="q")
            self.kv = dense(2 * self.inner_dim, use_bias=qkv_bias, name="kv")
        else:
            self.qkv = dense(3 * self.inner_dim, use_bias=qkv_bias, name="qkv",
                             rank=self.ranks.get("qkv"))
        self.attn_dropout = keras.layers.Dropout(self.attn_drop)
        self.proj = dense(self.dim, name="proj", rank=self.ranks.get("proj"))
        self.proj_dropout = keras.layers.Dropout(self.proj_drop)

    def build(self, x_shape, context_shape=None):
        if self.cross:
            self.q.build(x_shape)
            self.kv.build(context_shape if context_shape is not None else x_shape)
        else:
            self.qkv.build(x_shape)
        self.proj.build(tuple(x_shape[:-1]) + (self.inner_dim,))

    def project_qkv(self, x, context=None):
        """Returns q, k, v as (B, H, N, d)."""
        if self.cross:
            if context is None:
                raise ValueError("cross-attention needs a context (the keys/values input)")
            k, v = ops.split(self.kv(context), 2, axis=-1)
            return tuple(split_heads(t, self.num_heads) for t in (self.q(x), k, v))
        # One transpose of all 3 * heads, then q, k, v are contiguous slices of it: slicing
        # them out of the channels first costs three strided copies and three transposes
        # (all still 4-D for TFLite/XNNPACK). One split, not three slices: the gradient of a
        # split is one concat, of a slice a zero-filled full-size tensor each, summed.
        qkv = split_heads(self.qkv(x), 3 * self.num_heads)  # (B, 3H, N, d)
        return tuple(ops.split(qkv, 3, axis=1))

    def scores(self, q, k, mask=None, bias=None):
        """The attention logits QK^T / sqrt(d) (+ bias, masked), (B, H, queries, keys)."""
        logits = ops.matmul(q * ops.cast(self.scale, q.dtype), ops.transpose(k, (0, 1, 3, 2)))
        if bias is not None:
            logits = logits + ops.cast(bias, logits.dtype)
        if mask is not None:
            logits = masked_logits(logits, mask)
        return logits

    def attend(self, q, k, v, mask=None, bias=None, training=None):
        attn = softmax_float32(self.scores(q, k, mask, bias))
        attn = self.attn_dropout(attn, training=training)
        return ops.matmul(attn, v)

    def call(self, x, context=None, attention_mask=None, bias=None, training=None):
        q, k, v = self.project_qkv(x, context)
        out = merge_heads(self.attend(q, k, v, mask=attention_mask, bias=bias, training=training))
        return self.proj_dropout(self.proj(out), training=training)

    def compute_output_shape(self, input_shape, *args, **kwargs):
        return tuple(input_shape[:-1]) + (self.dim,)

    def get_config(self):
        return {**super().get_config(), "dim": self.dim, "num_heads": self.num_heads,
                "qkv_bias": self.qkv_bias, "attn_drop": self.attn_drop,
                "proj_drop": self.proj_drop, "cross": self.cross, "head_dim": self.head_dim,
                **({"ranks": self.ranks} if self.ranks else {})}
