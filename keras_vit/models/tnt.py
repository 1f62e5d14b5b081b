"""TNT, Transformer in Transformer (Han et al. 2021): each 16x16 patch is split into 4x4
"pixel" sub-patches; an inner transformer attends among the pixels of each patch, its output
is projected into the patch token, and an outer transformer attends among the patches.

Names, hyperparameters and outputs match timm's ``tnt.py``. timm 1.0.31 has two layouts:
the default (``tnt_s_patch16_224``, ``tnt_b_patch16_224``, ``legacy=False``) cuts the image
into patches first and embeds each patch with its own zero-padded 7x7 stride-4 conv, and
projects pixels to the patch token with norm -> Linear (no bias) -> norm; the legacy one
(``tnt_s_legacy_patch16_224``) convolves the whole image first and projects with
norm (per pixel) -> Linear (bias). Both are here; the default is timm's.
"""

import keras
from keras import ops

from keras_vit.layers import (
    MapPositionEmbedding,
    Mlp,
    PositionEmbedding,
    PrefixTokens,
    ResidualBlock,
    dense,
    layer_norm,
)
from keras_vit.layers.attention import merge_heads, softmax_float32, split_heads
from keras_vit.layers.embedding import to_2tuple
from keras_vit.models.common import check_img_size, check_in_chans, token_trunk_model
from keras_vit.registry import INCEPTION_MEAN, INCEPTION_STD, register_variant

# TNT uses torch's nn.LayerNorm default everywhere.
LN_EPS = 1e-5


@keras.saving.register_keras_serializable(package="keras_vit")
class PatchesToBatch(keras.layers.Layer):
    """(B, gh*p, gw*q, C) -> (B*gh*gw, p, q, C): torch's Unfold(kernel=stride=(p, q)) with the
    patches in row-major order, folded into the batch. Reshapes and one transpose, all 4-D."""

    def __init__(self, patch_size, **kwargs):
        super().__init__(**kwargs)
        self.patch_size = to_2tuple(patch_size)

    def call(self, x):
        (p, q), (h, w, c) = self.patch_size, x.shape[1:]
        x = ops.reshape(x, (-1, p, w // q, q * c))  # (B*gh, p, gw, q*C)
        x = ops.transpose(x, (0, 2, 1, 3))  # (B*gh, gw, p, q*C)
        return ops.reshape(x, (-1, p, q, c))

    def compute_output_shape(self, input_shape):
        return (None,) + self.patch_size + (input_shape[-1],)

    def get_config(self):
        return {**super().get_config(), "patch_size": self.patch_size}


@keras.saving.register_keras_serializable(package="keras_vit")
class PixelsToPatches(keras.layers.Layer):
    """(B*N, P, C) pixel tokens -> (B, N, P*C) patch vectors, timm's ``reshape(B, N, -1)``."""

    def __init__(self, num_patches, **kwargs):
        super().__init__(**kwargs)
        self.num_patches = int(num_patches)

    def call(self, x):
        return ops.reshape(x, (-1, self.num_patches, x.shape[1] * x.shape[2]))

    def compute_output_shape(self, input_shape):
        return (None, self.num_patches, input_shape[1] * input_shape[2])

    def get_config(self):
        return {**super().get_config(), "num_patches": self.num_patches}


@keras.saving.register_keras_serializable(package="keras_vit")
class PatchPosition(PositionEmbedding):
    """TNT's ``patch_pos``: a learned (1, 1 + N, D) embedding of [CLS] + patch tokens; the
    converter of ``keras_vit/convert/tnt.py`` loads (and resamples) timm's ``patch_pos``."""


@keras.saving.register_keras_serializable(package="keras_vit")
class TntAttention(keras.layers.Layer):
    """timm TNT ``Attention``: fused ``qk`` (to 2 * hidden_dim) and a separate ``v`` (to dim)."""

    def __init__(self, dim, hidden_dim=None, num_heads=8, qkv_bias=False, attn_drop=0.0,
                 proj_drop=0.0, **kwargs):
        super().__init__(**kwargs)
        self.dim, self.hidden_dim = int(dim), int(hidden_dim or dim)
        self.num_heads, self.qkv_bias = int(num_heads), bool(qkv_bias)
        self.attn_drop, self.proj_drop = float(attn_drop), float(proj_drop)
        self.scale = (self.hidden_dim // self.num_heads) ** -0.5
        self.qk = dense(2 * self.hidden_dim, use_bias=qkv_bias, name="qk")
        self.v = dense(self.dim, use_bias=qkv_bias, name="v")
        self.proj = dense(self.dim, name="proj")
        self.attn_dropout = keras.layers.Dropout(self.attn_drop)
        self.proj_dropout = keras.layers.Dropout(self.proj_drop)

    def build(self, input_shape):
        self.qk.build(input_shape)
        self.v.build(input_shape)
        self.proj.build(tuple(input_shape[:-1]) + (self.dim,))

    def call(self, x, training=None):
        q, k = (split_heads(t, self.num_heads) for t in ops.split(self.qk(x), 2, axis=-1))
        v = split_heads(self.v(x), self.num_heads)
        attn = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2))) * ops.cast(self.scale, q.dtype)
        attn = self.attn_dropout(softmax_float32(attn), training=training)
        out = self.proj(merge_heads(ops.matmul(attn, v)))
        return self.proj_dropout(out, training=training)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.dim,)

    def get_config(self):
        return {**super().get_config(), "dim": self.dim, "hidden_dim": self.hidden_dim,
                "num_heads": self.num_heads, "qkv_bias": self.qkv_bias,
                "attn_drop": self.attn_drop, "proj_drop": self.proj_drop}


@keras.saving.register_keras_serializable(package="keras_vit")
class TntBlock(keras.layers.Layer):
    """timm TNT ``Block``: [pixels (B*N, P, c), patches (B, 1 + N, D)] -> the same two.

    The inner transformer (a pre-norm ``ResidualBlock`` of ``TntAttention``) on each
    patch's pixels; the pixels, flattened per patch and projected, are added to the
    patch tokens (not [CLS]); then the outer transformer (another) on the patches.
    timm's names are kept (``norm_in``, ``attn_in``, ..., ``norm_out``, ``mlp``);
    ``convert/tnt.py`` maps them without the ``inner`` / ``outer`` level.
    """

    def __init__(self, dim, dim_out, num_pixel, num_heads_in=4, num_heads_out=12, mlp_ratio=4.0,
                 qkv_bias=False, proj_drop=0.0, attn_drop=0.0, drop_path=0.0, legacy=False,
                 **kwargs):
        super().__init__(**kwargs)
        self.dim, self.dim_out, self.num_pixel = int(dim), int(dim_out), int(num_pixel)
        self.num_heads_in, self.num_heads_out = int(num_heads_in), int(num_heads_out)
        self.mlp_ratio, self.qkv_bias = float(mlp_ratio), bool(qkv_bias)
        self.proj_drop, self.attn_drop = float(proj_drop), float(attn_drop)
        self.drop_path_rate, self.legacy = float(drop_path), bool(legacy)
        attn = dict(qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        block = dict(norm_eps=LN_EPS, drop_path=drop_path)
        self.inner = ResidualBlock(
            TntAttention(dim, dim, num_heads_in, name="attn_in", **attn),
            Mlp(dim * 4, out_features=dim, drop=proj_drop, name="mlp_in"),
            norm_names=("norm_in", "norm_mlp_in"), name="inner", **block)
        self.norm1_proj = layer_norm(LN_EPS, name="norm1_proj")
        self.proj = dense(dim_out, use_bias=self.legacy, name="proj")
        self.norm2_proj = None if self.legacy else layer_norm(LN_EPS, name="norm2_proj")
        self.outer = ResidualBlock(
            TntAttention(dim_out, dim_out, num_heads_out, name="attn_out", **attn),
            Mlp(int(dim_out * mlp_ratio), out_features=dim_out, drop=proj_drop, name="mlp"),
            norm_names=("norm_out", "norm_mlp"), name="outer", **block)

    def build(self, inputs_shape):
        pixel_shape, patch_shape = inputs_shape
        self.inner.build(pixel_shape)
        flat = (None, patch_shape[1] - 1, self.num_pixel * self.dim)
        self.norm1_proj.build(pixel_shape if self.legacy else flat)
        self.proj.build(flat)
        if self.norm2_proj is not None:
            self.norm2_proj.build(patch_shape)
        self.outer.build(patch_shape)

    def call(self, inputs, training=None):
        pixel, patch = inputs
        pixel = self.inner(pixel, training=training)
        n = patch.shape[1] - 1
        if self.legacy:
            flat = ops.reshape(self.norm1_proj(pixel), (-1, n, self.num_pixel * self.dim))
            from_pixels = self.proj(flat)
        else:
            flat = ops.reshape(pixel, (-1, n, self.num_pixel * self.dim))
            from_pixels = self.norm2_proj(self.proj(self.norm1_proj(flat)))
        patch = ops.concatenate([patch[:, :1], patch[:, 1:] + from_pixels], axis=1)
        return [pixel, self.outer(patch, training=training)]

    def compute_output_shape(self, input_shape):
        return [tuple(s) for s in input_shape]

    def get_config(self):
        return {**super().get_config(), "dim": self.dim, "dim_out": self.dim_out,
                "num_pixel": self.num_pixel, "num_heads_in": self.num_heads_in,
                "num_heads_out": self.num_heads_out, "mlp_ratio": self.mlp_ratio,
                "qkv_bias": self.qkv_bias, "proj_drop": self.proj_drop,
                "attn_drop": self.attn_drop, "drop_path": self.drop_path_rate,
                "legacy": self.legacy}


def transformer_in_transformer(*, img_size=224, patch_size=16, in_chans=3, num_classes=1000,
                               global_pool="token", embed_dim=768, inner_dim=48, depth=12,
                               num_heads_inner=4, num_heads_outer=12, mlp_ratio=4.0,
                               qkv_bias=False, drop_rate=0.0, pos_drop_rate=0.0,
                               proj_drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0,
                               first_stride=4, legacy=False, features_only=False,
                               out_indices=None, name="tnt"):
    """Builds a TNT (timm ``TNT``) as a functional model.

    Pixels: each ``patch_size`` patch gives ceil(patch_size / first_stride)^2
    pixel tokens of width ``inner_dim``. global_pool: "token" ([CLS]) or "avg".
    features_only: the patch-token maps after the ``out_indices`` blocks
    (default the last 3, as timm) as (B, H/p, W/p, D).
    """
    h, w = check_img_size(img_size, patch_size)
    check_in_chans(in_chans)
    if global_pool not in ("token", "avg"):
        raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
    grid = (h // patch_size, w // patch_size)
    num_patches = grid[0] * grid[1]
    pixel_grid = -(-patch_size // first_stride)
    num_pixel = pixel_grid * pixel_grid

    inputs = keras.Input((h, w, in_chans), name="images")
    conv = keras.layers.Conv2D(inner_dim, 7, strides=first_stride, padding="valid",
                               name="pixel_embed.proj")
    pad = keras.layers.ZeroPadding2D(3, name="pixel_embed.pad")  # torch's padding=3
    if legacy:  # conv over the image, then cut the map into pixel blocks
        x = PatchesToBatch(pixel_grid, name="pixel_embed.unfold")(conv(pad(inputs)))
    else:  # cut the image into patches, then conv each (zero-padded at the patch border)
        x = conv(pad(PatchesToBatch(patch_size, name="pixel_embed.unfold")(inputs)))
    x = MapPositionEmbedding((pixel_grid, pixel_grid), name="pixel_pos")(x)
    pixel = keras.layers.Reshape((num_pixel, inner_dim), name="pixel_embed.flatten")(x)

    patch = PixelsToPatches(num_patches, name="pixel_embed.to_patches")(pixel)
    patch = layer_norm(LN_EPS, name="norm1_proj")(patch)
    patch = dense(embed_dim, name="proj")(patch)
    patch = layer_norm(LN_EPS, name="norm2_proj")(patch)
    patch = PrefixTokens(("cls_token",), stddev=0.02, name="cls_token")(patch)
    patch = PatchPosition(grid, 1, name="patch_pos")(patch)
    patch = keras.layers.Dropout(pos_drop_rate, name="pos_drop")(patch)

    def block(i, drop_path):
        return TntBlock(inner_dim, embed_dim, num_pixel, num_heads_inner, num_heads_outer,
                        mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate,
                        attn_drop=attn_drop_rate, drop_path=drop_path, legacy=legacy,
                        name=f"blocks.{i}")

    return token_trunk_model(inputs, [pixel, patch], block, depth, grid=grid,
                             num_classes=num_classes, name=name, drop_path_rate=drop_path_rate,
                             features_only=features_only, out_indices=out_indices,
                             tokens=lambda out: out[1], norm_eps=LN_EPS,
                             global_pool=global_pool, drop_rate=drop_rate)


def _tnt(name, **defaults):
    cfg = dict(input_size=224, mean=INCEPTION_MEAN, std=INCEPTION_STD, crop_pct=0.9,
               interpolation="bicubic")
    return register_variant(name, transformer_in_transformer, __name__, cfg, img_size=224,
                            patch_size=16, depth=12, qkv_bias=False, **defaults)


_tnt("tnt_s_legacy_patch16_224", embed_dim=384, inner_dim=24, num_heads_outer=6, legacy=True)
_tnt("tnt_s_patch16_224", embed_dim=384, inner_dim=24, num_heads_outer=6)
_tnt("tnt_b_patch16_224", embed_dim=640, inner_dim=40, num_heads_outer=10)
