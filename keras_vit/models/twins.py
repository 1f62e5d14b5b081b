"""Twins (Chu et al. 2021): PCPVT and SVT, pyramids with a conditional position encoding.

Twins-PCPVT is PVT v1 (patch embeddings 4/2/2/2, global sub-sampled
attention) plus a PEG, a depthwise 3x3 conv with a residual after the first
block of each stage, in place of absolute position embeddings. Twins-SVT
alternates locally-grouped self-attention (LSA, attention inside ws x ws
windows) with global sub-sampled attention (GSA). The head averages the
normalised last-stage tokens.

Names, hyperparameters and outputs match timm's ``twins.py``; Keras layer
names mirror timm's module paths (``blocks.2.3.attn.qkv``,
``pos_block.1.proj.0``), so timm checkpoints load by name.
"""

import math

import keras
from keras import ops

from keras_vit.layers import (
    Mlp,
    MultiHeadAttention,
    ResidualBlock,
    SpatialReductionAttention,
    layer_norm,
)
from keras_vit.layers.attention import merge_heads
from keras_vit.models.common import per_stage
from keras_vit.models.pvt import (
    check_pyramid,
    embed_stage,
    pooled_head,
    pyramid_stages,
    stage_map,
)
from keras_vit.registry import IMAGENET_MEAN, IMAGENET_STD, register_variant


@keras.saving.register_keras_serializable(package="keras_vit")
class LocallyGroupedAttention(MultiHeadAttention):
    """LSA: self-attention inside non-overlapping ``window_size`` windows (timm ``LocallyGroupedAttn``).

    As timm (its ``forward`` with padding), the (h, w) map is zero-padded at
    the bottom and right to a multiple of the window; the padded tokens take
    part in the attention unmasked and are cropped after it. Windows are
    formed with 4-D reshapes and transposes only (builtin TFLite, one XNNPACK
    partition).
    """

    def __init__(self, dim, num_heads=8, grid_size=(14, 14), window_size=7, qkv_bias=True,
                 attn_drop=0.0, proj_drop=0.0, **kwargs):
        kwargs.pop("cross", None)
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                         proj_drop=proj_drop, cross=False, **kwargs)
        self.grid_size = tuple(int(g) for g in grid_size)
        self.window_size = int(window_size)
        if self.window_size < 2:
            raise ValueError(f"window_size must be >= 2, got {window_size}")

    def padded_size(self):
        ws = self.window_size
        return tuple(-(-g // ws) * ws for g in self.grid_size)

    def call(self, x, training=None):
        (h, w), (hp, wp), ws, c = self.grid_size, self.padded_size(), self.window_size, self.dim
        nw = wp // ws
        x = ops.reshape(x, (-1, h, w, c))
        if (hp, wp) != (h, w):
            x = ops.pad(x, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)))
        # (B, hp, wp, C) -> (B*nh, ws, nw, ws*C) -> (B*nh, nw, ws, ws*C) -> (B*nh*nw, ws*ws, C)
        x = ops.transpose(ops.reshape(x, (-1, ws, nw, ws * c)), (0, 2, 1, 3))
        x = ops.reshape(x, (-1, ws * ws, c))
        q, k, v = self.project_qkv(x)
        x = merge_heads(self.attend(q, k, v, training=training))
        x = ops.transpose(ops.reshape(x, (-1, nw, ws, ws * c)), (0, 2, 1, 3))
        x = ops.reshape(x, (-1, hp, wp, c))
        if (hp, wp) != (h, w):
            x = x[:, :h, :w, :]
        # proj is per token: applying it after the crop equals timm's order, on fewer tokens.
        x = ops.reshape(x, (-1, h * w, c))
        return self.proj_dropout(self.proj(x), training=training)

    def get_config(self):
        config = super().get_config()
        config.pop("cross")
        return {**config, "grid_size": self.grid_size, "window_size": self.window_size}


@keras.saving.register_keras_serializable(package="keras_vit")
class PosConv(keras.layers.Layer):
    """PEG (Chu et al. 2021, CPVT): tokens + depthwise 3x3 conv of their (h, w) map (timm ``PosConv``).

    The conv is named ``proj.0`` as timm's ``nn.Sequential`` entry.
    """

    def __init__(self, dim, grid_size, **kwargs):
        super().__init__(**kwargs)
        self.dim = int(dim)
        self.grid_size = tuple(int(g) for g in grid_size)
        # timm's init: normal(0, sqrt(2 / fan_out)), fan_out = 3*3*C / groups(C) = 9.
        self.proj = keras.layers.DepthwiseConv2D(
            3, padding="same", name="proj.0",
            depthwise_initializer=keras.initializers.RandomNormal(stddev=math.sqrt(2.0 / 9)))

    def build(self, x_shape):
        self.proj.build((None,) + self.grid_size + (self.dim,))

    def call(self, x):
        h, w = self.grid_size
        feat = ops.reshape(x, (-1, h, w, self.dim))
        return ops.reshape(self.proj(feat) + feat, (-1, h * w, self.dim))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "dim": self.dim, "grid_size": self.grid_size}


@keras.saving.register_keras_serializable(package="keras_vit")
class TwinsBlock(ResidualBlock):
    """Pre-LN block whose attention is LSA (``window_size`` > 1) or GSA (timm twins ``Block``).

    GSA is ``SpatialReductionAttention``: timm's GlobalSubSampleAttn has its
    q/kv/sr/norm/proj, with torch's default LayerNorm eps 1e-5 for ``norm``;
    the block norms use 1e-6.
    """

    def __init__(self, dim, num_heads, grid_size, mlp_ratio=4.0, sr_ratio=1, window_size=1,
                 proj_drop=0.0, attn_drop=0.0, drop_path=0.0, norm_eps=1e-6, **kwargs):
        grid_size, window_size = tuple(int(g) for g in grid_size), int(window_size or 1)
        common = dict(grid_size=grid_size, qkv_bias=True, attn_drop=attn_drop,
                      proj_drop=proj_drop, name="attn")
        if window_size > 1:
            attn = LocallyGroupedAttention(dim, num_heads, window_size=window_size, **common)
        else:
            attn = SpatialReductionAttention(dim, num_heads, sr_ratio=sr_ratio, norm_eps=1e-5,
                                             **common)
        super().__init__(attn, Mlp(int(dim * mlp_ratio), drop=proj_drop, name="mlp"),
                         norm_eps=norm_eps, drop_path=drop_path, **kwargs)
        self.dim, self.num_heads, self.mlp_ratio = int(dim), int(num_heads), float(mlp_ratio)
        self.grid_size, self.sr_ratio, self.window_size = grid_size, int(sr_ratio), window_size
        self.proj_drop, self.attn_drop = float(proj_drop), float(attn_drop)

    def get_config(self):
        return {**self.block_config(), "dim": self.dim, "num_heads": self.num_heads,
                "grid_size": self.grid_size, "mlp_ratio": self.mlp_ratio,
                "sr_ratio": self.sr_ratio, "window_size": self.window_size,
                "proj_drop": self.proj_drop, "attn_drop": self.attn_drop}


def twins(*, img_size=224, patch_size=4, in_chans=3, num_classes=1000, global_pool="avg",
          embed_dims=(64, 128, 256, 512), num_heads=(1, 2, 4, 8), mlp_ratios=(4, 4, 4, 4),
          depths=(3, 4, 6, 3), sr_ratios=(8, 4, 2, 1), wss=None, drop_rate=0.0,
          pos_drop_rate=0.0, proj_drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0,
          features_only=False, out_indices=None, name="twins"):
    """Builds a Twins model (timm ``Twins``) as a functional model.

    wss=None: PCPVT, every block GSA. With wss (one window size per stage):
    SVT, even blocks of a stage LSA with that window, odd blocks GSA. The first
    stage embeds ``patch_size`` patches, later ones 2x2, so sizes must be
    multiples of patch_size * 2**(stages - 1) (32). features_only: the stage
    outputs of ``out_indices`` (default all) as (B, H/s, W/s, C) maps, s = 4, 8,
    16, 32; the last one before the final norm, as timm's forward_intermediates.
    """
    size, grids, embed_dims, num_heads, mlp_ratios, sr_ratios = check_pyramid(
        img_size, in_chans, patch_size, embed_dims, num_heads, mlp_ratios, sr_ratios, depths,
        global_pool)
    wss = per_stage(wss, len(depths), "wss") if wss is not None else None
    inputs, stages, indices, dpr = pyramid_stages(size, in_chans, depths, drop_path_rate,
                                                  features_only, out_indices)
    x, features = inputs, []
    for k in stages:
        x = embed_stage(x, k, patch_size, embed_dims[k], name=f"patch_embeds.{k}")
        x = keras.layers.Dropout(pos_drop_rate, name=f"pos_drops.{k}")(x)
        for i in range(depths[k]):
            ws = 1 if wss is None or i % 2 == 1 else wss[k]
            x = TwinsBlock(embed_dims[k], num_heads[k], grids[k], mlp_ratio=mlp_ratios[k],
                           sr_ratio=sr_ratios[k], window_size=ws, proj_drop=proj_drop_rate,
                           attn_drop=attn_drop_rate, drop_path=next(dpr),
                           name=f"blocks.{k}.{i}")(x)
            if i == 0:
                x = PosConv(embed_dims[k], grids[k], name=f"pos_block.{k}")(x)
        x = stage_map(x, k, grids, indices, features, name=f"stages.{k}.map")
    if features_only:
        return keras.Model(inputs, features, name=name)

    x = layer_norm(1e-6, name="norm")(x)
    return pooled_head(inputs, x, global_pool, num_classes, drop_rate, name)


def _twins(name, **defaults):
    """Registers a timm-named Twins variant with timm's default_cfg."""
    cfg = dict(input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=0.9,
               interpolation="bicubic")
    return register_variant(name, twins, __name__, cfg, **defaults)


PCPVT = dict(patch_size=4, embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8),
             mlp_ratios=(8, 8, 4, 4), sr_ratios=(8, 4, 2, 1))
SVT = dict(patch_size=4, mlp_ratios=(4, 4, 4, 4), wss=(7, 7, 7, 7), sr_ratios=(8, 4, 2, 1))

_twins("twins_pcpvt_small", depths=(3, 4, 6, 3), **PCPVT)
_twins("twins_pcpvt_base", depths=(3, 4, 18, 3), **PCPVT)
_twins("twins_pcpvt_large", depths=(3, 8, 27, 3), **PCPVT)
_twins("twins_svt_small", embed_dims=(64, 128, 256, 512), num_heads=(2, 4, 8, 16),
       depths=(2, 2, 10, 4), **SVT)
_twins("twins_svt_base", embed_dims=(96, 192, 384, 768), num_heads=(3, 6, 12, 24),
       depths=(2, 2, 18, 2), **SVT)
_twins("twins_svt_large", embed_dims=(128, 256, 512, 1024), num_heads=(4, 8, 16, 32),
       depths=(2, 2, 18, 2), **SVT)
