"""DeepViT (Zhou et al. 2021): deeper ViTs through Re-attention.

Re-attention regenerates the attention maps of a block by mixing them across
heads with a learnable H x H matrix, so that deep blocks stop producing the
same ("collapsed") maps. In the official code (zhoudaquan/dvit_repo,
``models/deep_vision_transformer.py`` and ``models/layers.py``) the mixing is a
1x1 convolution over the head axis (``reatten_matrix``) followed by a
BatchNorm over heads (``var_norm``) and an optional scale (``reatten_scale``:
head_dim^-0.5 with ``transform_scale``, else 1). Its blocks also scale their
residual branches by ``scale_adjustment``: x + attn(LN(r x)) / r, then
x + mlp(LN(r x)) / r.

``deepvit_s`` / ``deepvit_l`` are the official ``deepvit_S`` / ``deepvit_L``
(the README's "DeepViT-16 / DeepViT-32, FC + BN, CNN patch processing"):
a three-convolution patch stem (``PatchEmbed_CNN``: 7x7 s2 conv + BN + ReLU,
3x3 conv + BN + ReLU, 8x8 s8 projection), width 396 / 420, 16 / 32 blocks,
12 heads, mlp_ratio 3, qkv bias, Re-attention in the last 5 / 12 blocks,
scale_adjustment 0.5; only deepvit_S sets transform_scale. ``deepvit_l_384``
is the official ``deepvit_L_384``; ``deepvit_patch16_224_re_attn_{16,24,32}b``
are the official ViT-style models with Re-attention (no BN scale, plain 16x16
patch embedding) in every block. Layer names mirror the official module paths
(``patch_embed.conv1``, ``blocks.15.attn.reatten_matrix``,
``blocks.15.attn.var_norm``), so an official state dict loads through
``keras_vit.load_timm_weights``.
"""

import keras
from keras import ops

from keras_vit.layers import (
    Mlp,
    MultiHeadAttention,
    PatchEmbed,
    PositionEmbedding,
    PrefixTokens,
    ResidualBlock,
    batch_norm,
)
from keras_vit.layers.attention import softmax_float32
from keras_vit.models.common import check_img_size, check_in_chans, token_trunk_model
from keras_vit.registry import INCEPTION_MEAN, INCEPTION_STD, register_variant


@keras.saving.register_keras_serializable(package="keras_vit")
class ReAttention(MultiHeadAttention):
    """The official ``ReAttention``: multi-head self-attention (``qkv``, ``proj``) whose softmax
    maps are re-generated, with ``apply_transform``, by ``var_norm(reatten_matrix(attn)) *
    reatten_scale``.

    ``reatten_matrix`` is a 1x1 convolution over the head axis (torch's Conv2d(H, H, 1)
    with bias on (B, H, N, N)); here a Conv2D on the (B, N, N, H) view, so the map is
    transposed to heads-last and back: 4-D tensors, builtin TFLite ops.
    """

    def __init__(self, dim, num_heads=8, qkv_bias=False, attn_drop=0.0, proj_drop=0.0,
                 apply_transform=True, transform_scale=False, **kwargs):
        for fixed in ("cross", "head_dim"):  # self-attention with dim / num_heads heads only
            kwargs.pop(fixed, None)
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                         proj_drop=proj_drop, **kwargs)
        self.apply_transform, self.transform_scale = bool(apply_transform), bool(transform_scale)
        self.reatten_scale = self.scale if self.transform_scale else 1.0
        if self.apply_transform:
            self.reatten_matrix = keras.layers.Conv2D(self.num_heads, 1, name="reatten_matrix")
            self.var_norm = batch_norm("var_norm")

    def build(self, input_shape):
        super().build(input_shape)
        if self.apply_transform:
            n = input_shape[1]
            self.reatten_matrix.build((None, n, n, self.num_heads))
            self.var_norm.build((None, n, n, self.num_heads))

    def attend(self, q, k, v, mask=None, bias=None, training=None):
        # The official order, (q k^T) * scale, and its transform of the dropped-out maps.
        attn = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2))) * ops.cast(self.scale, q.dtype)
        attn = self.attn_dropout(softmax_float32(attn), training=training)
        if self.apply_transform:
            mixed = self.reatten_matrix(ops.transpose(attn, (0, 2, 3, 1)))  # heads last
            mixed = self.var_norm(mixed, training=training)
            attn = ops.transpose(mixed, (0, 3, 1, 2)) * ops.cast(self.reatten_scale, attn.dtype)
        return ops.matmul(attn, v)

    def get_config(self):
        config = super().get_config()
        for fixed in ("cross", "head_dim"):
            config.pop(fixed)
        return {**config, "apply_transform": self.apply_transform,
                "transform_scale": self.transform_scale}


@keras.saving.register_keras_serializable(package="keras_vit")
class DeepViTBlock(ResidualBlock):
    """The official DeepViT ``Block`` (re_atten=True, as every DeepViT block):
    x + attn(LN(r x)) / r, then x + mlp(LN(r x)) / r, r = ``scale_adjustment``.

    LayerNorm eps 1e-6. Inside the norms r changes the result only through that
    epsilon, but the official code applies it there too, so it is kept; the /r
    scales the branches.
    """

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, drop=0.0, attn_drop=0.0,
                 drop_path=0.0, apply_transform=False, transform_scale=False,
                 scale_adjustment=1.0, **kwargs):
        super().__init__(
            ReAttention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop,
                        apply_transform=apply_transform, transform_scale=transform_scale,
                        name="attn"),
            Mlp(int(dim * mlp_ratio), drop=drop, name="mlp"), drop_path=drop_path, **kwargs)
        self.dim, self.num_heads, self.mlp_ratio = int(dim), int(num_heads), float(mlp_ratio)
        self.qkv_bias, self.drop, self.attn_drop = bool(qkv_bias), float(drop), float(attn_drop)
        self.apply_transform, self.transform_scale = bool(apply_transform), bool(transform_scale)
        self.scale_adjustment = float(scale_adjustment)

    def call(self, x, training=None):
        # Not the skeleton's x + f(LN(x)): each branch sees LN(r x) and is divided by r.
        r = self.scale_adjustment
        h = self.mix(self.norm1(x * r), training=training)
        x = x + self.drop_path(h / r, training=training)
        h = self.mlp(self.norm2(x * r), training=training)
        return x + self.drop_path(h, training=training) / r

    def get_config(self):
        return {**self.block_config(), "dim": self.dim, "num_heads": self.num_heads,
                "mlp_ratio": self.mlp_ratio, "qkv_bias": self.qkv_bias, "drop": self.drop,
                "attn_drop": self.attn_drop, "apply_transform": self.apply_transform,
                "transform_scale": self.transform_scale,
                "scale_adjustment": self.scale_adjustment}


def _cnn_patch_embed(x, patch_size, embed_dim):
    """The official ``PatchEmbed_CNN``: 7x7 s2 conv (64), BN, ReLU; 3x3 conv (64), BN, ReLU;
    a (p/2)x(p/2) stride-(p/2) projection. Explicit padding, as torch's Conv2d."""
    p = patch_size // 2
    x = keras.layers.ZeroPadding2D(3, name="patch_embed.pad1")(x)
    x = keras.layers.Conv2D(64, 7, strides=2, use_bias=False, name="patch_embed.conv1")(x)
    x = keras.layers.ReLU(name="patch_embed.relu1")(batch_norm("patch_embed.bn1")(x))
    x = keras.layers.ZeroPadding2D(1, name="patch_embed.pad2")(x)
    x = keras.layers.Conv2D(64, 3, use_bias=False, name="patch_embed.conv2")(x)
    x = keras.layers.ReLU(name="patch_embed.relu2")(batch_norm("patch_embed.bn2")(x))
    x = keras.layers.Conv2D(embed_dim, p, strides=p, name="patch_embed.proj")(x)
    return keras.layers.Reshape((x.shape[1] * x.shape[2], embed_dim),
                                name="patch_embed.flatten")(x)


def deep_vision_transformer(*, img_size=224, patch_size=16, in_chans=3, num_classes=1000,
                            embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
                            qkv_bias=False, reatten_blocks=None, transform_scale=False,
                            scale_adjustment=1.0, use_cnn_embed=False, drop_rate=0.0,
                            attn_drop_rate=0.0, drop_path_rate=0.0, features_only=False,
                            out_indices=None, name="deepvit"):
    """Builds a DeepViT (the official ``DeepVisionTransformer``) as a functional model.

    reatten_blocks: how many of the last blocks apply the Re-attention transform
    (None: all). use_cnn_embed: the official three-convolution patch stem instead
    of a single patch_size x patch_size convolution. features_only: the token
    maps of the ``out_indices`` blocks as (B, H/p, W/p, embed_dim) NHWC maps.
    """
    h, w = check_img_size(img_size, patch_size)
    check_in_chans(in_chans)
    if use_cnn_embed and patch_size % 2:
        raise ValueError(f"the CNN patch embedding needs an even patch_size, got {patch_size}")
    reatten_blocks = depth if reatten_blocks is None else int(reatten_blocks)
    if not 0 <= reatten_blocks <= depth:
        raise ValueError(f"reatten_blocks must be in [0, {depth}], got {reatten_blocks}")
    grid = (h // patch_size, w // patch_size)

    inputs = keras.Input((h, w, in_chans), name="images")
    if use_cnn_embed:
        x = _cnn_patch_embed(inputs, patch_size, embed_dim)
    else:
        x = PatchEmbed(patch_size, embed_dim, name="patch_embed")(inputs)
    x = PrefixTokens(("cls_token",), stddev=0.02, name="prefix_tokens")(x)
    x = PositionEmbedding(grid, 1, name="pos_embed")(x)
    x = keras.layers.Dropout(drop_rate, name="pos_drop")(x)

    def block(i, drop_path):
        return DeepViTBlock(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate,
                            attn_drop=attn_drop_rate, drop_path=drop_path,
                            apply_transform=i >= depth - reatten_blocks,
                            transform_scale=transform_scale, scale_adjustment=scale_adjustment,
                            name=f"blocks.{i}")

    # The official head: LayerNorm eps 1e-6, the [CLS] token, no dropout before it.
    return token_trunk_model(inputs, x, block, depth, grid=grid, num_classes=num_classes,
                             name=name, drop_path_rate=drop_path_rate,
                             features_only=features_only, out_indices=out_indices)


def _deepvit(name, img_size=224, **defaults):
    # The official default_cfgs: mean/std 0.5, crop 0.9 at 224 (1.0 at 384), bicubic.
    cfg = dict(input_size=img_size, mean=INCEPTION_MEAN, std=INCEPTION_STD,
               crop_pct=1.0 if img_size >= 384 else 0.9, interpolation="bicubic")
    return register_variant(name, deep_vision_transformer, __name__, cfg, img_size=img_size,
                            **defaults)


_COMMON = dict(patch_size=16, num_heads=12, mlp_ratio=3.0, qkv_bias=True)
_S = dict(_COMMON, embed_dim=396, depth=16, reatten_blocks=5, transform_scale=True,
          use_cnn_embed=True, scale_adjustment=0.5)
_L = dict(_COMMON, embed_dim=420, depth=32, reatten_blocks=12, use_cnn_embed=True,
          scale_adjustment=0.5)
_deepvit("deepvit_s", **_S)  # official deepvit_S
_deepvit("deepvit_l", **_L)  # official deepvit_L
_deepvit("deepvit_l_384", img_size=384, **_L)  # official deepvit_L_384
for _depth in (16, 24, 32):
    _deepvit(f"deepvit_patch16_224_re_attn_{_depth}b", embed_dim=384, depth=_depth, **_COMMON)

__all__ = ["DeepViTBlock", "ReAttention", "deep_vision_transformer"]
