"""BoTNet (Srinivas et al. 2021, "Bottleneck Transformers for Visual Recognition").

A ResNet whose last bottleneck blocks replace the 3x3 convolution by global
multi-head self-attention with 2-D relative position logits (a height and a
width table, Bello et al.'s "relative logits"); a 2x2 average pool after the
attention does a block's stride 2.

Two sets of variants share the blocks below:

* ``botnet26t_256``, ``botnet50ts_256`` (SiLU): timm's ports (``byoanet.py`` +
  ``layers/bottleneck_attn.py``), all of timm's ``botnet*`` variants,
  layer names as timm's state dict, so ``load_timm_weights`` loads timm
  checkpoints. As in timm, the relative position tables are sized for the
  feature map of the ``img_size`` given at build time (timm's
  ``fixed_input_size``); a checkpoint made for another size does not load,
  as in timm.
* ``botnet_s1_50`` / ``botnet_s1_59``: the paper's classification models.
  ResNet-50 stages (7x7 stem, max pool, bottleneck ratio 1/4, 1x1-conv
  projection shortcuts, stride on the 3x3 conv) with BoT blocks (4 heads) in
  every block of the last stage, which has stride 1 ("S1": c5 stays at
  1/16 of the input, 14x14 at 224 px). S1-59 has stages (3, 4, 6, 6) and
  squeeze-excitation (ratio 1/16 of the block output) in every block, as the
  authors' parameter-count script (``madd_net(..., use_s1=True, is_bot=True,
  use_se=True)``) describes; S1-50 is ResNet-50 (3, 4, 6, 3) without SE.
  The paper gives 33.5M parameters for BoTNet-S1-59 and 20.8M for
  BoT50 / BoT-S1-50; ours count every BatchNorm and relative-position weight:
  33.66M and 20.87M (within 0.5%).
"""

import keras
import numpy as np
from keras import ops

from keras_vit.layers import DropPath, batch_norm, dense
from keras_vit.layers.attention import softmax_float32
from keras_vit.models.common import (
    check_img_size,
    check_in_chans,
    drop_path_rates,
    resolve_out_indices,
)
from keras_vit.registry import IMAGENET_MEAN, IMAGENET_STD, register_variant


def make_divisible(v, divisor=8, min_value=None, round_limit=0.9):
    """timm's channel rounding: nearest multiple of ``divisor``, never more than 10% down."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


def _rel_to_abs_index(height, width, rel_len, along):
    """Flat gather indices turning per-query relative logits into absolute ones.

    The logits are (height * width queries) x ``rel_len`` relative offsets,
    flattened; the result is (queries) x (keys along one axis), where the key
    at absolute position k of a query at position p reads offset k - p + L - 1
    (L = the axis length) -- what timm's pad-and-reshape trick selects.
    """
    qh, qw = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    q = (qh * width + qw).reshape(-1, 1)
    pos = (qh if along == "height" else qw).reshape(-1, 1)
    length = height if along == "height" else width
    k = np.arange(length).reshape(1, -1)
    return (q * rel_len + k - pos + length - 1).reshape(-1).astype("int32")


@keras.saving.register_keras_serializable(package="keras_vit")
class RelPosEmbed2D(keras.layers.Layer):
    """Split 2-D relative position logits (timm's ``PosEmbedRel``).

    Weights ``height_rel`` (2H-1, d) and ``width_rel`` (2W-1, d). For queries q
    (N, H*W, d) returns logits (N, H*W, H*W): q . height_rel[kh - qh] +
    q . width_rel[kw - qw]. The relative-to-absolute shift is a flat
    ``ops.take`` with constant indices and tensors stay <= 4-D (TFLite).
    """

    def __init__(self, feat_size, dim_head, scale=None, **kwargs):
        super().__init__(**kwargs)
        self.feat_size = tuple(int(s) for s in feat_size)
        self.dim_head = int(dim_head)
        self.scale = float(scale) if scale is not None else self.dim_head ** -0.5

    def build(self, input_shape):
        h, w = self.feat_size
        init = keras.initializers.TruncatedNormal(stddev=self.scale)
        self.height_rel = self.add_weight(name="height_rel", shape=(2 * h - 1, self.dim_head),
                                          initializer=init)
        self.width_rel = self.add_weight(name="width_rel", shape=(2 * w - 1, self.dim_head),
                                         initializer=init)

    def call(self, q):
        h, w = self.feat_size
        n = h * w
        idx_h = _rel_to_abs_index(h, w, 2 * h - 1, "height")
        idx_w = _rel_to_abs_index(h, w, 2 * w - 1, "width")
        rel_h = ops.matmul(q, ops.transpose(ops.cast(self.height_rel, q.dtype)))
        rel_w = ops.matmul(q, ops.transpose(ops.cast(self.width_rel, q.dtype)))
        rel_h = ops.take(ops.reshape(rel_h, (-1, n * (2 * h - 1))), idx_h, axis=1)
        rel_w = ops.take(ops.reshape(rel_w, (-1, n * (2 * w - 1))), idx_w, axis=1)
        logits = ops.reshape(rel_h, (-1, n, h, 1)) + ops.reshape(rel_w, (-1, n, 1, w))
        return ops.reshape(logits, (-1, n, n))

    def compute_output_shape(self, input_shape):
        n = self.feat_size[0] * self.feat_size[1]
        return (input_shape[0], n, n)

    def get_config(self):
        return {**super().get_config(), "feat_size": self.feat_size, "dim_head": self.dim_head,
                "scale": self.scale}


@keras.saving.register_keras_serializable(package="keras_vit")
class BottleneckAttention(keras.layers.Layer):
    """BoT multi-head self-attention on a (B, H, W, C) map (timm's ``BottleneckAttn``).

    A 1x1 conv ``qkv`` (no bias by default) gives q, k (``num_heads *
    dim_head`` channels each) and v (``dim_out`` channels), head-major as in
    timm. Logits are q.k * scale + relative position logits (or both scaled
    with ``scale_pos_embed``); ``stride=2`` average-pools the output 2x2.
    ``feat_size`` is the input map size the relative tables are made for.
    """

    def __init__(self, dim_out, feat_size, num_heads=4, dim_head=None, qk_ratio=1.0,
                 qkv_bias=False, scale_pos_embed=False, stride=1, **kwargs):
        super().__init__(**kwargs)
        if dim_out % num_heads:
            raise ValueError(f"dim_out {dim_out} must be divisible by num_heads {num_heads}")
        if stride not in (1, 2):
            raise ValueError(f"BottleneckAttention stride must be 1 or 2, got {stride}")
        self.dim_out, self.num_heads = int(dim_out), int(num_heads)
        self.feat_size = tuple(int(s) for s in feat_size)
        self.dim_head = dim_head
        self.qk_ratio, self.qkv_bias = float(qk_ratio), bool(qkv_bias)
        self.scale_pos_embed, self.stride = bool(scale_pos_embed), int(stride)
        self.dim_head_qk = int(dim_head) if dim_head else \
            make_divisible(self.dim_out * self.qk_ratio, divisor=8) // self.num_heads
        self.dim_head_v = self.dim_out // self.num_heads
        self.dim_out_qk = self.num_heads * self.dim_head_qk
        self.scale = self.dim_head_qk ** -0.5
        self.qkv = keras.layers.Conv2D(
            2 * self.dim_out_qk + self.dim_out, 1, use_bias=self.qkv_bias, name="qkv",
            kernel_initializer=keras.initializers.VarianceScaling(
                1.0, "fan_in", "truncated_normal"))
        self.pos_embed = RelPosEmbed2D(self.feat_size, self.dim_head_qk, self.scale,
                                       name="pos_embed")

    def build(self, input_shape):
        if tuple(input_shape[1:3]) != self.feat_size:
            raise ValueError(f"BottleneckAttention {self.name!r} was made for {self.feat_size} "
                             f"feature maps, got {tuple(input_shape[1:3])}")
        self.qkv.build(input_shape)
        self.pos_embed.build((None, self.feat_size[0] * self.feat_size[1], self.dim_head_qk))

    def _heads(self, t, dim_head):
        # (B, H, W, heads * d) -> (B * heads, H * W, d), channels head-major as timm's reshape.
        n = self.feat_size[0] * self.feat_size[1]
        t = ops.reshape(t, (-1, n, self.num_heads, dim_head))
        return ops.reshape(ops.transpose(t, (0, 2, 1, 3)), (-1, n, dim_head))

    def call(self, x):
        h, w = self.feat_size
        dqk = self.dim_out_qk
        qkv = self.qkv(x)
        q = self._heads(qkv[..., :dqk], self.dim_head_qk)
        k = self._heads(qkv[..., dqk:2 * dqk], self.dim_head_qk)
        v = self._heads(qkv[..., 2 * dqk:], self.dim_head_v)
        logits = ops.matmul(q, ops.transpose(k, (0, 2, 1)))
        if self.scale_pos_embed:
            logits = (logits + self.pos_embed(q)) * self.scale
        else:
            logits = logits * self.scale + self.pos_embed(q)
        out = ops.matmul(softmax_float32(logits), v)  # (B * heads, H * W, dv)
        out = ops.transpose(ops.reshape(out, (-1, self.num_heads, h * w, self.dim_head_v)),
                            (0, 2, 1, 3))
        out = ops.reshape(out, (-1, h, w, self.dim_out))
        if self.stride == 2:
            out = ops.average_pool(out, 2, 2, padding="valid")
        return out

    def compute_output_shape(self, input_shape):
        h, w = self.feat_size
        return (input_shape[0], h // self.stride, w // self.stride, self.dim_out)

    def get_config(self):
        return {**super().get_config(), "dim_out": self.dim_out, "feat_size": self.feat_size,
                "num_heads": self.num_heads, "dim_head": self.dim_head,
                "qk_ratio": self.qk_ratio, "qkv_bias": self.qkv_bias,
                "scale_pos_embed": self.scale_pos_embed, "stride": self.stride}


def _act(x, act, name):
    return keras.layers.Activation(act, name=name)(x) if act else x


def conv_norm_act(x, filters, kernel_size, stride, name, act="relu"):
    """timm's ``ConvNormAct``: conv (no bias, torch's symmetric padding made explicit), BN, act."""
    pad = ((stride - 1) + (kernel_size - 1)) // 2
    if pad:
        x = keras.layers.ZeroPadding2D(pad, name=f"{name}.pad")(x)
    x = keras.layers.Conv2D(filters, kernel_size, strides=stride, padding="valid",
                            use_bias=False, name=f"{name}.conv")(x)
    x = batch_norm(f"{name}.bn")(x)
    return _act(x, act, f"{name}.act")


@keras.saving.register_keras_serializable(package="keras_vit")
class MaxPool3x3S2(keras.layers.Layer):
    """torch's MaxPool2d(3, 2, padding=1): the padding is never the maximum. It pads with the
    input's minimum (every 3x3 window holds a real pixel, so the max is torch's): zero padding
    would be exact only after a ReLU (after SiLU, as in botnet50ts, inputs can be negative),
    and -inf became the range an int8 file calibrates, leaving no resolution for the pixels
    (XNNPACK refused the file)."""

    def call(self, x):
        x = ops.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=ops.min(x))
        return ops.max_pool(x, 3, 2, padding="valid")

    def compute_output_shape(self, input_shape):
        b, h, w, c = input_shape
        half = lambda s: None if s is None else (s - 1) // 2 + 1  # noqa: E731
        return (b, half(h), half(w), c)


def squeeze_excite(x, rd_channels, name):
    """timm's ``SEModule``: global mean, 1x1 conv, ReLU, 1x1 conv, sigmoid gate."""
    channels = x.shape[-1]
    s = keras.layers.GlobalAveragePooling2D(keepdims=True, name=f"{name}.pool")(x)
    s = keras.layers.Conv2D(rd_channels, 1, name=f"{name}.fc1")(s)
    s = keras.layers.Activation("relu", name=f"{name}.act")(s)
    s = keras.layers.Conv2D(channels, 1, activation="sigmoid", name=f"{name}.fc2")(s)
    return keras.layers.Multiply(name=f"{name}.gate")([x, s])


def bottleneck_block(x, out_chs, stride, name, kind="bottle", bottle_ratio=0.25, feat_size=None,
                     num_heads=4, act="relu", se_ratio=None, drop_path=0.0):
    """timm's ``BottleneckBlock`` (1x1 - 3x3 - 1x1) or ``SelfAttnBlock`` (1x1 - MHSA - BN act -
    1x1) with a conv1x1 projection shortcut when shape changes; optional SE before the add
    (``attn_last``)."""
    in_chs = x.shape[-1]
    mid = make_divisible(out_chs * bottle_ratio)
    shortcut = x
    if in_chs != out_chs or stride != 1:
        shortcut = conv_norm_act(x, out_chs, 1, stride, f"{name}.shortcut", act=None)
    y = conv_norm_act(x, mid, 1, 1, f"{name}.conv1_1x1", act)
    if kind == "bottle":
        y = conv_norm_act(y, mid, 3, stride, f"{name}.conv2_kxk", act)
    elif kind == "self_attn":
        y = BottleneckAttention(mid, feat_size, num_heads=num_heads, stride=stride,
                                name=f"{name}.self_attn")(y)
        y = _act(batch_norm(f"{name}.post_attn")(y), act, f"{name}.post_attn_act")
    else:
        raise ValueError(f"block kind must be 'bottle' or 'self_attn', got {kind!r}")
    y = conv_norm_act(y, out_chs, 1, 1, f"{name}.conv3_1x1", act=None)
    if se_ratio:
        y = squeeze_excite(y, make_divisible(out_chs * se_ratio), f"{name}.attn_last")
    if drop_path:
        y = DropPath(drop_path, name=f"{name}.drop_path")(y)
    y = keras.layers.Add(name=f"{name}.add")([y, shortcut])
    return _act(y, act, f"{name}.act")


def botnet(*, stages, stem="tiered", stem_chs=64, img_size=224, in_chans=3, num_classes=1000,
           num_heads=4, act="relu", se_ratio=None, drop_rate=0.0, drop_path_rate=0.0,
           features_only=False, out_indices=None, name="botnet"):
    """Builds a BoTNet as a functional model.

    stages: per stage (block kinds, out channels, stride, bottleneck ratio);
    block kinds are "bottle" or "self_attn", one per block. stem: "tiered"
    (timm's 3x3 stack 3/8, 1/2, 1 of ``stem_chs``) or "7x7" (ResNet's),
    each followed by a 3x3 stride-2 max pool. features_only: the outputs of
    the stages in ``out_indices`` (default all four) as NHWC maps.
    """
    stride_total = 4 * int(np.prod([s[2] for s in stages]))
    h, w = check_img_size(img_size, stride_total, what="the network stride")
    check_in_chans(in_chans)
    if stem not in ("tiered", "7x7"):
        raise ValueError(f"stem must be 'tiered' or '7x7', got {stem!r}")
    depths = [len(s[0]) for s in stages]
    indices = set(resolve_out_indices(out_indices if out_indices is not None else len(stages),
                                      len(stages))) if features_only else ()

    inputs = keras.Input((h, w, in_chans), name="images")
    if stem == "tiered":
        x = conv_norm_act(inputs, 3 * stem_chs // 8, 3, 2, "stem.conv1", act)
        x = conv_norm_act(x, stem_chs // 2, 3, 1, "stem.conv2", act)
        x = conv_norm_act(x, stem_chs, 3, 1, "stem.conv3", act)
    else:
        x = conv_norm_act(inputs, stem_chs, 7, 2, "stem.conv1", act)
    x = MaxPool3x3S2(name="stem.pool")(x)
    feat = (h // 4, w // 4)

    dpr = iter(drop_path_rates(drop_path_rate, sum(depths)))
    features = []
    for i, (kinds, out_chs, stride, ratio) in enumerate(stages):
        for j, kind in enumerate(kinds):
            s = stride if j == 0 else 1
            x = bottleneck_block(x, out_chs, s, f"stages.{i}.{j}", kind, ratio, feat_size=feat,
                                 num_heads=num_heads, act=act, se_ratio=se_ratio,
                                 drop_path=next(dpr))
            feat = (feat[0] // s, feat[1] // s)
        if i in indices:
            features.append(x)
    if features_only:
        return keras.Model(inputs, features, name=name)

    x = keras.layers.GlobalAveragePooling2D(name="head.global_pool")(x)
    if not num_classes:
        return keras.Model(inputs, x, name=name)
    x = keras.layers.Dropout(drop_rate, name="head.drop")(x)
    return keras.Model(inputs, dense(num_classes, name="head.fc")(x), name=name)


def _botnet(name, img_size, crop_pct, **defaults):
    cfg = dict(input_size=img_size, mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=crop_pct,
               interpolation="bicubic")
    return register_variant(name, botnet, __name__, cfg, img_size=img_size, **defaults)


def _stage(kinds, out_chs, stride, ratio=0.25):
    return (tuple(kinds), out_chs, stride, ratio)


# timm's botnet26t: ResNet-26-T layout, a tiered stem; self-attention in the last block of
# stage 3 and both blocks of stage 4.
_botnet("botnet26t_256", 256, 0.95, stem="tiered", stages=(
    _stage(["bottle"] * 2, 256, 1), _stage(["bottle"] * 2, 512, 2),
    _stage(["bottle", "self_attn"], 1024, 2), _stage(["self_attn"] * 2, 2048, 2)))

# timm's botnet50ts: ResNet-50-T layout with SiLU; self-attention in the last block of
# stage 2 and in every second block of stages 3 and 4.
_botnet("botnet50ts_256", 256, 0.95, stem="tiered", act="silu", stages=(
    _stage(["bottle"] * 3, 256, 1), _stage(["bottle"] * 3 + ["self_attn"], 512, 2),
    _stage(["bottle", "self_attn"] * 3, 1024, 2),
    _stage(["bottle", "self_attn", "bottle"], 2048, 2)))

# The paper's BoTNet-S1 classification models (no released weights; TPU ImageNet
# preprocessing: 224 px, 0.875 center crop).
_R50 = (_stage(["bottle"] * 3, 256, 1), _stage(["bottle"] * 4, 512, 2),
        _stage(["bottle"] * 6, 1024, 2))
_botnet("botnet_s1_50", 224, 0.875, stem="7x7",
        stages=_R50 + (_stage(["self_attn"] * 3, 2048, 1),))
_botnet("botnet_s1_59", 224, 0.875, stem="7x7", se_ratio=0.0625,
        stages=_R50 + (_stage(["self_attn"] * 6, 2048, 1),))
