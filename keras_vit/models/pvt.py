"""Pyramid Vision Transformer, v1 (Wang et al. 2021) and v2 (Wang et al. 2022).

Both are four-stage pyramids (strides 4, 8, 16, 32) whose attention takes its
keys and values from a map reduced by a strided conv (spatial-reduction
attention, ``SpatialReductionAttention``).

v1 (``pvt_tiny`` ... ``pvt_large``): non-overlapping patch embeddings
(4x4, then 2x2), a learned position embedding per stage, a [CLS] token added
in the last stage and classified after a final LayerNorm. timm lacks it: the
reference is the official ``classification/pvt.py`` (whai362/PVT), whose
state-dict names the Keras layers mirror (``patch_embed1.proj``,
``pos_embed1``, ``block1.0.attn.q``, ``cls_token``, ``norm``, ``head``).

v2 (``pvt_v2_b0`` ... ``pvt_v2_b5``, ``pvt_v2_b2_li``): overlapping patch
embeddings (7x7 stride 4, then 3x3 stride 2), no position embedding, a 3x3
depthwise conv inside the MLP, a LayerNorm after each stage, average-pooled
head; ``linear=True`` (B2-Li) pools keys/values to 7x7. Names,
hyperparameters and outputs match timm's ``pvt_v2.py`` (``stages.1.blocks.0.mlp.dwconv``).
"""

import keras
from keras import ops

from keras_vit.layers import (
    Mlp,
    PatchEmbed,
    PrefixTokens,
    ResidualBlock,
    SpatialReductionAttention,
    TokenPool,
    TokensToMap,
    activation,
    dense,
    layer_norm,
)
from keras_vit.models.common import (
    check_img_size,
    check_in_chans,
    drop_path_rates,
    per_stage,
    resolve_out_indices,
)
from keras_vit.registry import IMAGENET_MEAN, IMAGENET_STD, register_variant


@keras.saving.register_keras_serializable(package="keras_vit")
class PvtPositionEmbedding(keras.layers.Layer):
    """PVT v1's per-stage ``pos_embedN``: (1, num_prefix_tokens + gh*gw, D), added to the tokens.

    ``use_prefix=False`` (the official detection backbone's last stage, which
    drops the [CLS] token) adds only the grid part; the weight keeps its
    prefix row so checkpoints load unchanged. The checkpoint key is the
    layer's own path; a checkpoint made for another grid is resized bilinearly
    without antialias, as the official forward's ``F.interpolate`` does
    (``keras_vit/convert/pvt.py``).
    """

    def __init__(self, grid_size, num_prefix_tokens=0, use_prefix=True, stddev=0.02, **kwargs):
        super().__init__(**kwargs)
        self.grid_size = tuple(int(g) for g in grid_size)
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.use_prefix = bool(use_prefix)
        self.stddev = float(stddev)

    def build(self, input_shape):
        n = self.num_prefix_tokens + self.grid_size[0] * self.grid_size[1]
        self.pos_embed = self.add_weight(
            name="pos_embed", shape=(1, n, input_shape[-1]),
            initializer=keras.initializers.TruncatedNormal(stddev=self.stddev))

    def call(self, x):
        pos = self.pos_embed if self.use_prefix else self.pos_embed[:, self.num_prefix_tokens:]
        return x + ops.cast(pos, x.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "grid_size": self.grid_size,
                "num_prefix_tokens": self.num_prefix_tokens, "use_prefix": self.use_prefix,
                "stddev": self.stddev}


@keras.saving.register_keras_serializable(package="keras_vit")
class MlpWithDepthwiseConv(keras.layers.Layer):
    """PVT v2's FFN (timm ``MlpWithDepthwiseConv``): fc1, [ReLU], 3x3 depthwise conv, GELU, fc2.

    The depthwise conv runs on the (gh, gw) token map; stride 1 with
    padding 1 is Keras' "same" exactly. ``extra_relu`` is the -Li variant's.
    """

    def __init__(self, hidden_features, grid_size, out_features=None, extra_relu=False,
                 drop=0.0, **kwargs):
        super().__init__(**kwargs)
        self.hidden_features = int(hidden_features)
        self.grid_size = tuple(int(g) for g in grid_size)
        self.out_features = out_features
        self.extra_relu, self.drop = bool(extra_relu), float(drop)
        self.fc1 = dense(self.hidden_features, name="fc1")
        # timm's conv init: normal(0, sqrt(2 / fan_out)), fan_out = 3 * 3 per group.
        self.dwconv = keras.layers.DepthwiseConv2D(
            3, padding="same", name="dwconv",
            depthwise_initializer=keras.initializers.RandomNormal(stddev=(2.0 / 9) ** 0.5))
        self.fc2 = None  # width known at build time when out_features is None
        self.dropout = keras.layers.Dropout(self.drop)

    def build(self, input_shape):
        self.fc2 = dense(self.out_features or input_shape[-1], name="fc2")
        self.fc1.build(input_shape)
        self.dwconv.build((None,) + self.grid_size + (self.hidden_features,))
        self.fc2.build((None, None, self.hidden_features))

    def call(self, x, training=None):
        x = self.fc1(x)
        n = x.shape[1]
        x = ops.reshape(x, (-1,) + self.grid_size + (self.hidden_features,))
        if self.extra_relu:
            x = ops.relu(x)
        x = ops.reshape(self.dwconv(x), (-1, n, self.hidden_features))
        x = self.dropout(activation("gelu")(x), training=training)
        return self.dropout(self.fc2(x), training=training)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.out_features or input_shape[-1],)

    def get_config(self):
        return {**super().get_config(), "hidden_features": self.hidden_features,
                "grid_size": self.grid_size, "out_features": self.out_features,
                "extra_relu": self.extra_relu, "drop": self.drop}


@keras.saving.register_keras_serializable(package="keras_vit")
class PvtBlock(ResidualBlock):
    """x + SRA(LN(x)), then x + FFN(LN(x)) on the (B, prefix + gh*gw, C) tokens of one stage.

    Sublayers norm1, attn (q, kv, sr, norm, proj), norm2, mlp as in both
    reference codes. ``dwconv=True``: v2's FFN; ``linear``: v2-Li's pooled
    attention (and the FFN's extra ReLU). The attention's own LayerNorm is
    torch's default (eps 1e-5); the block norms take ``norm_eps`` (1e-6 in both).
    """

    def __init__(self, dim, num_heads, grid_size, mlp_ratio=4.0, sr_ratio=1, linear=False,
                 dwconv=False, qkv_bias=True, drop=0.0, attn_drop=0.0, drop_path=0.0,
                 norm_eps=1e-6, **kwargs):
        grid_size = tuple(int(g) for g in grid_size)
        hidden = int(dim * mlp_ratio)
        attn = SpatialReductionAttention(dim, num_heads, grid_size=grid_size, sr_ratio=sr_ratio,
                                         linear=linear, qkv_bias=qkv_bias, attn_drop=attn_drop,
                                         proj_drop=drop, name="attn")
        if dwconv:
            mlp = MlpWithDepthwiseConv(hidden, grid_size, extra_relu=linear, drop=drop, name="mlp")
        else:
            mlp = Mlp(hidden, drop=drop, name="mlp")
        super().__init__(attn, mlp, norm_eps=norm_eps, drop_path=drop_path, **kwargs)
        self.dim, self.num_heads, self.grid_size = int(dim), int(num_heads), grid_size
        self.mlp_ratio, self.sr_ratio = float(mlp_ratio), int(sr_ratio)
        self.linear, self.dwconv, self.qkv_bias = bool(linear), bool(dwconv), bool(qkv_bias)
        self.drop, self.attn_drop = float(drop), float(attn_drop)

    def get_config(self):
        return {**self.block_config(), "dim": self.dim, "num_heads": self.num_heads,
                "grid_size": self.grid_size, "mlp_ratio": self.mlp_ratio,
                "sr_ratio": self.sr_ratio, "linear": self.linear, "dwconv": self.dwconv,
                "qkv_bias": self.qkv_bias, "drop": self.drop, "attn_drop": self.attn_drop}


def check_pyramid(img_size, in_chans, first_stride, embed_dims, num_heads, mlp_ratios,
                  sr_ratios, depths, global_pool="avg"):
    """Validates a four-stage pyramid's arguments (PVT, Twins); returns (h, w), the stage
    grids and the per-stage tuples of embed_dims, num_heads, mlp_ratios, sr_ratios."""
    if global_pool not in ("", "avg"):
        raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
    n = len(depths)
    embed_dims, num_heads, mlp_ratios, sr_ratios = (
        per_stage(value, n, what) for value, what in (
            (embed_dims, "embed_dims"), (num_heads, "num_heads"), (mlp_ratios, "mlp_ratios"),
            (sr_ratios, "sr_ratios")))
    for d, hd in zip(embed_dims, num_heads):
        if d % hd:
            raise ValueError(f"embed dim {d} must be divisible by num_heads {hd}")
    stride = first_stride * 2 ** (n - 1)
    h, w = check_img_size(img_size, stride, what=f"the network stride ({first_stride} "
                                                 f"x 2^{n - 1} =)")
    check_in_chans(in_chans)
    grids = [(h // (first_stride * 2 ** k), w // (first_stride * 2 ** k)) for k in range(n)]
    for (gh, gw), sr in zip(grids, sr_ratios):
        if min(gh, gw) < sr:
            raise ValueError(f"img_size {img_size} gives a {gh}x{gw} stage grid, smaller than "
                             f"its sr_ratio {sr}; use at least {stride * sr} px")
    return (h, w), grids, embed_dims, num_heads, mlp_ratios, sr_ratios


def pyramid_stages(size, in_chans, depths, drop_path_rate, features_only, out_indices):
    """What a pyramid builder loops over: its input, the stages it builds (up to the last
    one features_only returns), the ``out_indices`` (default all stages; () when
    classifying) and an iterator over the blocks' drop-path rates."""
    n = len(depths)
    indices = resolve_out_indices(out_indices, n, default="all", what="stages") \
        if features_only else ()
    inputs = keras.Input(tuple(size) + (in_chans,), name="images")
    stages = range(max(indices) + 1 if features_only else n)
    return inputs, stages, indices, iter(drop_path_rates(drop_path_rate, sum(depths)))


def embed_stage(x, k, patch_size, dim, name):
    """PVT v1's (and Twins') patch embedding of stage k: a conv with kernel = stride
    (patch_size, then 2), then a LayerNorm with torch's default eps 1e-5."""
    return PatchEmbed(patch_size if k == 0 else 2, dim, norm=True, norm_eps=1e-5, name=name)(x)


def overlap_embed_stage(x, k, dim, name):
    """PVT v2's (and SegFormer's MiT) overlapping patch embedding of stage k (timm's
    ``OverlapPatchEmbed``): 7x7 stride 4, then 3x3 stride 2, padding = kernel // 2, then a
    LayerNorm with torch's eps 1e-5."""
    embed = dict(patch_size=7, stride=4, padding=3) if k == 0 else \
        dict(patch_size=3, stride=2, padding=1)
    return PatchEmbed(embed_dim=dim, norm=True, norm_eps=1e-5, name=name, **embed)(x)


def stage_map(x, k, grids, indices, features, name):
    """Stage k's tokens as the (B, h, w, C) map the next stage embeds, kept in ``features``
    when k is one of the ``indices``; a classifier's last stage stays tokens."""
    if k < len(grids) - 1 or k in indices:
        x = TokensToMap(grids[k], name=name)(x)
        if k in indices:
            features.append(x)
    return x


def pooled_head(inputs, x, global_pool, num_classes, drop_rate, name):
    """The pyramids' classifier on the last stage's normalised (B, N, C) tokens: average
    (``global_pool="avg"``), dropout, linear head; ``num_classes=0``: no head."""
    if global_pool == "avg":
        x = TokenPool("avg", num_prefix_tokens=0, name="pool")(x)
    if not num_classes:
        return keras.Model(inputs, x, name=name)
    x = keras.layers.Dropout(drop_rate, name="head_drop")(x)
    return keras.Model(inputs, dense(num_classes, name="head")(x), name=name)


def pyramid_vision_transformer(*, img_size=224, in_chans=3, num_classes=1000, patch_size=4,
                               embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8),
                               mlp_ratios=(8, 8, 4, 4), depths=(3, 4, 6, 3),
                               sr_ratios=(8, 4, 2, 1), qkv_bias=True, class_token=True,
                               drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0,
                               features_only=False, out_indices=None, name="pvt"):
    """Builds PVT v1 (official ``PyramidVisionTransformer``) as a functional model.

    Stage 1 embeds ``patch_size`` patches, later stages 2x2, so sizes are
    multiples of patch_size * 8 (32). The [CLS] token joins in the last stage;
    the logits are the head of its final-normalised value. features_only: the
    stage outputs of ``out_indices`` (default all) as (B, H/s, W/s, C) maps,
    s = 4, 8, 16, 32, taken after each stage's blocks (the last without its
    [CLS] token, before the final norm). ``class_token=False`` (features only)
    is the official detection backbone (``detection/pvt.py``), whose last stage
    has no [CLS] token and adds ``pos_embed4[:, 1:]``.
    """
    size, grids, embed_dims, num_heads, mlp_ratios, sr_ratios = check_pyramid(
        img_size, in_chans, patch_size, embed_dims, num_heads, mlp_ratios, sr_ratios, depths)
    if not class_token and not features_only:
        raise ValueError("PVT v1 classifies its [CLS] token: class_token=False needs "
                         "features_only=True (the detection backbone)")
    n = len(depths)
    if class_token and sr_ratios[-1] != 1:
        raise ValueError(f"the last stage holds the [CLS] token, so its sr_ratio must be 1, "
                         f"got {sr_ratios[-1]}")
    inputs, stages, indices, dpr = pyramid_stages(size, in_chans, depths, drop_path_rate,
                                                  features_only, out_indices)
    x, features = inputs, []
    for k in stages:
        x = embed_stage(x, k, patch_size, embed_dims[k], name=f"patch_embed{k + 1}")
        prefix = int(k == n - 1)
        if prefix and class_token:
            x = PrefixTokens(("cls_token",), stddev=0.02, name="cls_token")(x)
        x = PvtPositionEmbedding(grids[k], prefix, use_prefix=class_token,
                                 name=f"pos_embed{k + 1}")(x)
        x = keras.layers.Dropout(drop_rate, name=f"pos_drop{k + 1}")(x)
        for i in range(depths[k]):
            x = PvtBlock(embed_dims[k], num_heads[k], grids[k], mlp_ratio=mlp_ratios[k],
                         sr_ratio=sr_ratios[k], qkv_bias=qkv_bias, drop=drop_rate,
                         attn_drop=attn_drop_rate, drop_path=next(dpr), name=f"block{k + 1}.{i}")(x)
        if k < n - 1:
            x = TokensToMap(grids[k], name=f"stage{k + 1}_map")(x)
            if k in indices:
                features.append(x)
        elif k in indices:
            features.append(TokensToMap(grids[k], prefix if class_token else 0,
                                        name=f"stage{k + 1}_map")(x))
    if features_only:
        return keras.Model(inputs, features, name=name)

    x = layer_norm(1e-6, name="norm")(x)
    x = TokenPool("token", name="pool")(x)
    if not num_classes:
        return keras.Model(inputs, x, name=name)
    return keras.Model(inputs, dense(num_classes, name="head")(x), name=name)


def pyramid_vision_transformer_v2(*, img_size=224, in_chans=3, num_classes=1000,
                                  embed_dims=(64, 128, 256, 512), num_heads=(1, 2, 4, 8),
                                  mlp_ratios=(8, 8, 4, 4), depths=(3, 4, 6, 3),
                                  sr_ratios=(8, 4, 2, 1), qkv_bias=True, linear=False,
                                  global_pool="avg", drop_rate=0.0, proj_drop_rate=0.0,
                                  attn_drop_rate=0.0, drop_path_rate=0.0, features_only=False,
                                  out_indices=None, name="pvt_v2"):
    """Builds PVT v2 (timm ``PyramidVisionTransformerV2``) as a functional model.

    Overlapping patch embeddings: 7x7 stride 4 padding 3, then 3x3 stride 2
    padding 1, each followed by a LayerNorm (eps 1e-5); sizes are multiples
    of 32. Each stage ends in a LayerNorm; the head averages the last stage's
    tokens. features_only: the normalised stage outputs of ``out_indices``
    (default all) as (B, H/s, W/s, C) maps, s = 4, 8, 16, 32, as timm's.
    """
    size, grids, embed_dims, num_heads, mlp_ratios, sr_ratios = check_pyramid(
        img_size, in_chans, 4, embed_dims, num_heads, mlp_ratios, sr_ratios, depths, global_pool)
    inputs, stages, indices, dpr = pyramid_stages(size, in_chans, depths, drop_path_rate,
                                                  features_only, out_indices)
    x, features = inputs, []
    for k in stages:
        x = overlap_embed_stage(x, k, embed_dims[k],
                                name="patch_embed" if k == 0 else f"stages.{k}.downsample")
        for i in range(depths[k]):
            x = PvtBlock(embed_dims[k], num_heads[k], grids[k], mlp_ratio=mlp_ratios[k],
                         sr_ratio=sr_ratios[k], linear=linear, dwconv=True, qkv_bias=qkv_bias,
                         drop=proj_drop_rate, attn_drop=attn_drop_rate, drop_path=next(dpr),
                         name=f"stages.{k}.blocks.{i}")(x)
        x = layer_norm(1e-6, name=f"stages.{k}.norm")(x)
        x = stage_map(x, k, grids, indices, features, name=f"stages.{k}.map")
    if features_only:
        return keras.Model(inputs, features, name=name)

    return pooled_head(inputs, x, global_pool, num_classes, drop_rate, name)


_CFG = dict(input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=0.9,
            interpolation="bicubic")

# v1: the official repository's four classification models (timm has none).
V1 = dict(patch_size=4, embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8),
          mlp_ratios=(8, 8, 4, 4), sr_ratios=(8, 4, 2, 1), qkv_bias=True)
for _name, _depths in (("pvt_tiny", (2, 2, 2, 2)), ("pvt_small", (3, 4, 6, 3)),
                       ("pvt_medium", (3, 4, 18, 3)), ("pvt_large", (3, 8, 27, 3))):
    register_variant(_name, pyramid_vision_transformer, __name__, _CFG, depths=_depths, **V1)

# v2: timm's registered variants.
V2 = dict(embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8))
for _name, _extra in (
        ("pvt_v2_b0", dict(depths=(2, 2, 2, 2), embed_dims=(32, 64, 160, 256))),
        ("pvt_v2_b1", dict(depths=(2, 2, 2, 2))),
        ("pvt_v2_b2", dict(depths=(3, 4, 6, 3))),
        ("pvt_v2_b3", dict(depths=(3, 4, 18, 3))),
        ("pvt_v2_b4", dict(depths=(3, 8, 27, 3))),
        ("pvt_v2_b5", dict(depths=(3, 6, 40, 3), mlp_ratios=(4, 4, 4, 4))),
        ("pvt_v2_b2_li", dict(depths=(3, 4, 6, 3), linear=True))):
    register_variant(_name, pyramid_vision_transformer_v2, __name__, _CFG, **{**V2, **_extra})
