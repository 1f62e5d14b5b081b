"""Spatial-reduction attention (PVT v1/v2, Twins' global sub-sampled attention, SegFormer).

Queries are every token; keys and values come from the token map reduced
by a strided conv (``sr_ratio``) and a LayerNorm, or, in PVT v2's linear
variant, average-pooled to 7x7 then a 1x1 conv, LayerNorm and GELU. Sublayer
names follow timm (q, kv, sr, norm, proj), as do PVT's and Twins' official repos.
"""

import keras
import numpy as np
from keras import ops

from keras_vit.layers.attention import MultiHeadAttention
from keras_vit.layers.common import activation, layer_norm


def adaptive_avg_pool_matrix(in_size, out_size):
    """(out, in) averaging matrix of torch's AdaptiveAvgPool1d (uneven windows included)."""
    mat = np.zeros((out_size, in_size), np.float32)
    for i in range(out_size):
        lo = (i * in_size) // out_size
        hi = -((-(i + 1) * in_size) // out_size)  # ceil
        mat[i, lo:hi] = 1.0 / (hi - lo)
    return mat


@keras.saving.register_keras_serializable(package="keras_vit")
class SpatialReductionAttention(MultiHeadAttention):
    """Multi-head attention whose keys/values come from a spatially reduced copy of the input.

    ``grid_size`` (h, w) is the token grid of the (B, h*w, C) input.
    ``linear=True``: PVT v2-Li's pooling to ``pool_size`` x ``pool_size``.
    """

    def __init__(self, dim, num_heads=8, grid_size=(14, 14), sr_ratio=1, linear=False,
                 pool_size=7, qkv_bias=True, attn_drop=0.0, proj_drop=0.0, norm_eps=1e-5,
                 **kwargs):
        kwargs.pop("cross", None)
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                         proj_drop=proj_drop, cross=True, **kwargs)
        self.grid_size = tuple(int(g) for g in grid_size)
        self.sr_ratio, self.linear = int(sr_ratio), bool(linear)
        self.pool_size, self.norm_eps = int(pool_size), float(norm_eps)
        self.sr = self.norm = None
        if self.linear:
            self.sr = keras.layers.Conv2D(self.dim, 1, name="sr")
        elif self.sr_ratio > 1:
            self.sr = keras.layers.Conv2D(self.dim, self.sr_ratio, strides=self.sr_ratio, name="sr")
        if self.sr is not None:
            self.norm = layer_norm(self.norm_eps, name="norm")

    def build(self, x_shape):
        h, w = self.grid_size
        if self.linear:
            self.sr.build((None, self.pool_size, self.pool_size, self.dim))
        elif self.sr is not None:
            self.sr.build((None, h, w, self.dim))
        if self.norm is not None:
            self.norm.build((None, None, self.dim))
        super().build(x_shape, (None, None, self.dim))

    def reduce(self, x):
        """(B, h*w, C) -> the (B, M, C) tokens keys and values are computed from."""
        if self.sr is None:
            return x
        h, w = self.grid_size
        x = ops.reshape(x, (-1, h, w, self.dim))
        if self.linear:
            # AdaptiveAvgPool2d(7) as two constant averaging matmuls (exact, builtin TFLite).
            ph = ops.convert_to_tensor(adaptive_avg_pool_matrix(h, self.pool_size), x.dtype)
            pw = ops.convert_to_tensor(adaptive_avg_pool_matrix(w, self.pool_size), x.dtype)
            x = ops.einsum("ph,bhwc->bpwc", ph, x)
            x = ops.einsum("qw,bpwc->bpqc", pw, x)
        x = self.sr(x)
        x = ops.reshape(x, (-1, x.shape[1] * x.shape[2], self.dim))
        x = self.norm(x)
        return activation("gelu")(x) if self.linear else x

    def call(self, x, training=None):
        return super().call(x, context=self.reduce(x), training=training)

    def get_config(self):
        config = super().get_config()
        config.pop("cross")
        return {**config, "grid_size": self.grid_size, "sr_ratio": self.sr_ratio,
                "linear": self.linear, "pool_size": self.pool_size, "norm_eps": self.norm_eps}
