"""CMT (Guo et al. 2022, "CMT: Convolutional Neural Networks Meet Vision Transformers").

A conv stem (3x3 stride-2 conv, two 3x3 convs, each followed by GELU then
BatchNorm), then four stages, each a 2x2 stride-2 patch-aggregation conv +
LayerNorm followed by CMT blocks:
  x = x + DWConv3x3(x)                                  local perception unit (LPU)
  x = x + LMHSA(LN(x))                                  lightweight MHSA
  x = x + IRFFN(LN(x))                                  inverted residual FFN
LMHSA computes keys and values from the map reduced by a depthwise k x k
stride-k conv + BatchNorm, and adds a learned relative position bias
``relative_pos_<stage>`` of shape (heads, queries, keys) shared by the
stage's blocks. Then a 1x1 conv to 1280 + BatchNorm + swish, average pooling
and the linear head.

The reference is the official code (huawei-noah/Efficient-AI-Backbones,
``cmt_pytorch/cmt.py``; timm has no CMT). Layer names mirror its module paths
(``stem_conv1``, ``patch_embed_a.proj``, ``blocks_c.3.attn.sr.0``,
``blocks_c.3.mlp.conv1.0``, ``relative_pos_c``, ``_fc``, ``head``), so its
state dicts load through ``keras_vit.load_timm_weights``. Like the official
code, the relative position bias has one entry per (query, key) pair, so its
shape depends on the input size: a model builds at any valid size with its
own table, and a checkpoint made at another size is refused with a clear
error (the official code does not resample it either).
"""

import math

import keras
from keras import ops

from keras_vit.layers import ResidualBlock, batch_norm, dense, layer_norm
from keras_vit.layers.attention import softmax_float32
from keras_vit.models.common import (check_img_size, check_in_chans, drop_path_rates,
                                     resolve_out_indices)
from keras_vit.registry import IMAGENET_MEAN, IMAGENET_STD, register_variant

STAGES = "abcd"
# torch's kaiming_normal_(mode="fan_out") of the official init.
CONV_INIT = keras.initializers.VarianceScaling(2.0, "fan_out", "untruncated_normal")


def _conv(filters, kernel, strides=1, padding="valid", name=None):
    return keras.layers.Conv2D(filters, kernel, strides=strides, padding=padding,
                               kernel_initializer=CONV_INIT, name=name)


def _dwconv(kernel, strides=1, padding="same", name=None):
    return keras.layers.DepthwiseConv2D(kernel, strides=strides, padding=padding,
                                        depthwise_initializer=CONV_INIT, name=name)


@keras.saving.register_keras_serializable(package="keras_vit")
class CMTRelativePosition(keras.layers.Layer):
    """The learned (heads, queries, keys) bias a stage's attention blocks share.

    Called on the stage's (B, H, W, C) map (only to place it in the graph);
    returns the table as (1, heads, H*W, H*W / sr^2).
    """

    def __init__(self, num_heads, num_queries, num_keys, **kwargs):
        super().__init__(**kwargs)
        self.num_heads, self.num_queries, self.num_keys = int(num_heads), int(num_queries), \
            int(num_keys)
        # torch.randn in the official code.
        self.relative_pos = self.add_weight(
            name="relative_pos", shape=(self.num_heads, self.num_queries, self.num_keys),
            initializer=keras.initializers.RandomNormal(stddev=1.0))

    def call(self, x):
        return ops.expand_dims(ops.cast(self.relative_pos, x.dtype), 0)

    def compute_output_shape(self, input_shape):
        return (1, self.num_heads, self.num_queries, self.num_keys)

    def get_config(self):
        return {**super().get_config(), "num_heads": self.num_heads,
                "num_queries": self.num_queries, "num_keys": self.num_keys}


@keras.saving.register_keras_serializable(package="keras_vit")
class CMTAttention(keras.layers.Layer):
    """Lightweight MHSA on a (B, H, W, C) map: queries from every position, keys and values
    from the map reduced by ``sr`` (depthwise sr x sr stride-sr conv ``sr.0`` + BatchNorm
    ``sr.1``), plus the stage's relative position bias. Returns (B, H, W, C)."""

    def __init__(self, dim, num_heads=8, qkv_bias=True, qk_ratio=1, sr_ratio=1, attn_drop=0.0,
                 proj_drop=0.0, **kwargs):
        super().__init__(**kwargs)
        self.dim, self.num_heads = int(dim), int(num_heads)
        self.qkv_bias, self.qk_ratio, self.sr_ratio = bool(qkv_bias), int(qk_ratio), int(sr_ratio)
        self.attn_drop, self.proj_drop = float(attn_drop), float(proj_drop)
        if self.dim % self.num_heads or (self.dim // self.qk_ratio) % self.num_heads:
            raise ValueError(f"dim {dim} (and dim / qk_ratio) must be divisible by num_heads "
                             f"{num_heads}")
        self.qk_dim = self.dim // self.qk_ratio
        # The official scale uses the value head size even when qk_ratio > 1.
        self.scale = (self.dim // self.num_heads) ** -0.5
        self.q = dense(self.qk_dim, use_bias=qkv_bias, name="q")
        self.k = dense(self.qk_dim, use_bias=qkv_bias, name="k")
        self.v = dense(self.dim, use_bias=qkv_bias, name="v")
        self.sr = self.sr_norm = None
        if self.sr_ratio > 1:
            self.sr = _dwconv(self.sr_ratio, strides=self.sr_ratio, padding="valid", name="sr.0")
            self.sr_norm = batch_norm("sr.1")
        self.attn_dropout = keras.layers.Dropout(self.attn_drop)
        self.proj = dense(self.dim, name="proj")
        self.proj_dropout = keras.layers.Dropout(self.proj_drop)

    def build(self, x_shape, relative_pos_shape=None):
        self.q.build(x_shape)
        kv_shape = x_shape
        if self.sr is not None:
            self.sr.build(x_shape)
            kv_shape = self.sr.compute_output_shape(x_shape)
            self.sr_norm.build(kv_shape)
        self.k.build(kv_shape)
        self.v.build(kv_shape)
        self.proj.build(tuple(x_shape[:-1]) + (self.dim,))

    def _heads(self, t):
        """(B, h, w, H*d) -> (B, H, h*w, d), 4-D throughout for TFLite."""
        n = t.shape[1] * t.shape[2]
        t = ops.reshape(t, (-1, n, self.num_heads, t.shape[-1] // self.num_heads))
        return ops.transpose(t, (0, 2, 1, 3))

    def call(self, x, relative_pos, training=None):
        h, w = x.shape[1], x.shape[2]
        kv = x if self.sr is None else self.sr_norm(self.sr(x), training=training)
        q, k, v = self._heads(self.q(x)), self._heads(self.k(kv)), self._heads(self.v(kv))
        logits = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2))) * ops.cast(self.scale, q.dtype)
        attn = softmax_float32(logits + relative_pos)
        attn = self.attn_dropout(attn, training=training)
        out = ops.transpose(ops.matmul(attn, v), (0, 2, 1, 3))
        out = ops.reshape(out, (-1, h, w, self.dim))
        return self.proj_dropout(self.proj(out), training=training)

    def compute_output_shape(self, x_shape, relative_pos_shape=None):
        return tuple(x_shape[:-1]) + (self.dim,)

    def get_config(self):
        return {**super().get_config(), "dim": self.dim, "num_heads": self.num_heads,
                "qkv_bias": self.qkv_bias, "qk_ratio": self.qk_ratio,
                "sr_ratio": self.sr_ratio, "attn_drop": self.attn_drop,
                "proj_drop": self.proj_drop}


@keras.saving.register_keras_serializable(package="keras_vit")
class InvertedResidualFFN(keras.layers.Layer):
    """IRFFN on a (B, H, W, C) map, the official ``Mlp``: 1x1 conv + GELU + BN (``conv1``),
    depthwise 3x3 conv with a residual (``proj``) + GELU + BN (``proj_bn``), 1x1 conv + BN
    (``conv2``)."""

    def __init__(self, dim, hidden_dim, drop=0.0, **kwargs):
        super().__init__(**kwargs)
        self.dim, self.hidden_dim, self.drop = int(dim), int(hidden_dim), float(drop)
        self.conv1 = _conv(self.hidden_dim, 1, name="conv1.0")
        self.conv1_bn = batch_norm("conv1.2")
        self.proj = _dwconv(3, name="proj")
        self.proj_bn = batch_norm("proj_bn")
        self.conv2 = _conv(self.dim, 1, name="conv2.0")
        self.conv2_bn = batch_norm("conv2.1")
        self.dropout = keras.layers.Dropout(self.drop)

    def build(self, x_shape):
        hidden = tuple(x_shape[:-1]) + (self.hidden_dim,)
        self.conv1.build(x_shape)
        for layer in (self.conv1_bn, self.proj, self.proj_bn, self.conv2):
            layer.build(hidden)
        self.conv2_bn.build(tuple(x_shape[:-1]) + (self.dim,))

    def call(self, x, training=None):
        gelu = keras.activations.gelu
        x = self.conv1_bn(gelu(self.conv1(x), approximate=False), training=training)
        x = self.dropout(x, training=training)
        x = self.proj(x) + x
        x = self.proj_bn(gelu(x, approximate=False), training=training)
        x = self.conv2_bn(self.conv2(x), training=training)
        return self.dropout(x, training=training)

    def compute_output_shape(self, x_shape):
        return tuple(x_shape[:-1]) + (self.dim,)

    def get_config(self):
        return {**super().get_config(), "dim": self.dim, "hidden_dim": self.hidden_dim,
                "drop": self.drop}


@keras.saving.register_keras_serializable(package="keras_vit")
class CMTBlock(ResidualBlock):
    """LPU (depthwise 3x3 ``proj`` + residual), then LMHSA and IRFFN in Pre-LN residual
    branches, on a (B, H, W, C) map; ``call(x, relative_pos)``, relative_pos going to LMHSA."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, qk_ratio=1, sr_ratio=1,
                 drop=0.0, attn_drop=0.0, drop_path=0.0, norm_eps=1e-6, **kwargs):
        super().__init__(
            CMTAttention(dim, num_heads, qkv_bias=qkv_bias, qk_ratio=qk_ratio, sr_ratio=sr_ratio,
                         attn_drop=attn_drop, proj_drop=drop, name="attn"),
            # int() as the official code: 46 * 3.6 -> 165 hidden channels.
            InvertedResidualFFN(dim, int(dim * mlp_ratio), drop=drop, name="mlp"),
            norm_eps=norm_eps, drop_path=drop_path, **kwargs)
        self.dim, self.num_heads, self.mlp_ratio = int(dim), int(num_heads), float(mlp_ratio)
        self.qkv_bias, self.qk_ratio, self.sr_ratio = bool(qkv_bias), int(qk_ratio), int(sr_ratio)
        self.drop, self.attn_drop = float(drop), float(attn_drop)
        self.proj = _dwconv(3, name="proj")

    def build(self, x_shape, relative_pos_shape=None):
        self.proj.build(x_shape)
        super().build(x_shape, relative_pos_shape)

    def call(self, x, relative_pos, training=None):
        # The LPU's residual comes before the skeleton's two branches.
        return super().call(self.proj(x) + x, relative_pos, training=training)

    def get_config(self):
        return {**self.block_config(), "dim": self.dim, "num_heads": self.num_heads,
                "mlp_ratio": self.mlp_ratio, "qkv_bias": self.qkv_bias,
                "qk_ratio": self.qk_ratio, "sr_ratio": self.sr_ratio, "drop": self.drop,
                "attn_drop": self.attn_drop}


def size_divisor(sr_ratios):
    """Inputs must be multiples of this: stride 32 overall, and each stage's map (stride
    4, 8, 16, 32) a multiple of its key reduction, as the official relative position
    table (queries // sr^2 keys) assumes."""
    return math.lcm(32, *(2 ** (i + 2) * int(sr) for i, sr in enumerate(sr_ratios)))


def cmt(*, img_size=224, in_chans=3, num_classes=1000, embed_dims=(46, 92, 184, 368),
        stem_channel=16, fc_dim=1280, num_heads=(1, 2, 4, 8), mlp_ratios=(3.6,) * 4,
        qkv_bias=True, depths=(2, 2, 10, 2), qk_ratio=1, sr_ratios=(8, 4, 2, 1), drop_rate=0.0,
        attn_drop_rate=0.0, drop_path_rate=0.0, fc_drop_rate=0.1, features_only=False,
        out_indices=None, name="cmt"):
    """Builds a CMT as a functional model (the official ``CMT`` class).

    fc_drop_rate: the dropout before the head (the official ``dp``: 0.1, 0.3 for CMT-B).
    features_only: the (B, H/s, W/s, C) maps after the stages in ``out_indices``
    (strides 4, 8, 16, 32; default all four; an int n: the last n, as every family).
    """
    if not all(len(t) == 4 for t in (embed_dims, num_heads, mlp_ratios, depths, sr_ratios)):
        raise ValueError("embed_dims, num_heads, mlp_ratios, depths and sr_ratios need one "
                         "entry per stage (4)")
    h, w = check_img_size(img_size, size_divisor(sr_ratios), what="CMT's size divisor")
    check_in_chans(in_chans)
    indices = resolve_out_indices(out_indices, 4, default="all", what="stages") \
        if features_only else ()

    inputs = keras.Input((h, w, in_chans), name="images")
    x = keras.layers.ZeroPadding2D(1, name="stem_pad")(inputs)  # torch's padding=1, stride 2
    for i in (1, 2, 3):
        x = _conv(stem_channel, 3, strides=2 if i == 1 else 1,
                  padding="valid" if i == 1 else "same", name=f"stem_conv{i}")(x)
        x = keras.layers.Activation("gelu", name=f"stem_relu{i}")(x)  # exact erf GELU
        x = batch_norm(f"stem_norm{i}")(x)

    dprs = drop_path_rates(drop_path_rate, sum(depths))
    features, cur = [], 0
    for s, stage in enumerate(STAGES):
        dim, heads, sr = embed_dims[s], num_heads[s], sr_ratios[s]
        x = _conv(dim, 2, strides=2, name=f"patch_embed_{stage}.proj")(x)
        # The patch embedding's LayerNorm has torch's default eps; the blocks' have 1e-6.
        x = layer_norm(1e-5, name=f"patch_embed_{stage}.norm")(x)
        gh, gw = x.shape[1], x.shape[2]
        rel = CMTRelativePosition(heads, gh * gw, (gh // sr) * (gw // sr),
                                  name=f"relative_pos_{stage}")(x)
        for j in range(depths[s]):
            x = CMTBlock(dim, heads, mlp_ratios[s], qkv_bias=qkv_bias, qk_ratio=qk_ratio,
                         sr_ratio=sr, drop=drop_rate, attn_drop=attn_drop_rate,
                         drop_path=dprs[cur + j], name=f"blocks_{stage}.{j}")(x, rel)
        cur += depths[s]
        if s in indices:
            features.append(x)
    if features_only:
        return keras.Model(inputs, features, name=name)

    x = _conv(fc_dim, 1, name="_fc")(x)
    x = batch_norm("_bn")(x)
    x = keras.layers.Activation("silu", name="_swish")(x)
    x = keras.layers.GlobalAveragePooling2D(name="_avg_pooling")(x)
    x = keras.layers.Dropout(fc_drop_rate, name="_drop")(x)
    if not num_classes:
        return keras.Model(inputs, x, name=name)
    return keras.Model(inputs, dense(num_classes, name="head")(x), name=name)


def _cmt(name, img_size, **defaults):
    """Registers a CMT variant; its default input size is the one the official README trains at."""
    cfg = dict(input_size=img_size, mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=0.9,
               interpolation="bicubic")
    return register_variant(name, cmt, __name__, cfg, img_size=img_size, **defaults)


_cmt("cmt_ti", 160)
_cmt("cmt_xs", 192, embed_dims=(52, 104, 208, 416), stem_channel=16, depths=(3, 3, 12, 3),
     mlp_ratios=(3.77,) * 4)
_cmt("cmt_s", 224, embed_dims=(64, 128, 256, 512), stem_channel=32, depths=(3, 3, 16, 3),
     mlp_ratios=(4.0,) * 4)
_cmt("cmt_b", 256, embed_dims=(76, 152, 304, 608), stem_channel=38, depths=(4, 4, 20, 4),
     mlp_ratios=(4.0,) * 4, fc_drop_rate=0.3)
