"""XCiT (El-Nouby et al. 2021): cross-covariance attention over channels, local patch
interaction, then CaiT-style class-attention layers.

Names, hyperparameters and outputs match timm's ``xcit.py``: a convolutional patch
embedding (3x3 stride-2 convs with BatchNorm and GELU), a Fourier positional encoding
projected by a 1x1 conv, XCA blocks (attention between the channels of L2-normalised
q and k, with a learned per-head temperature) each followed by an LPI (depthwise conv,
GELU, BatchNorm, depthwise conv) and an MLP, all with LayerScale, then class-attention
blocks on a prepended [CLS] token, a final LayerNorm and a linear head. The attention
cost is linear in the number of tokens, and any image size that the patch size divides
works with the same weights (the positional encoding has no learned grid).

Complete against timm 1.0.31: all 28 ``xcit_*`` variants (nano/tiny/small-12,
tiny/small/medium/large-24, patch 16 and 8, 224 and 384 px).
"""

import math

import keras
import numpy as np
from keras import ops

from keras_vit.layers import (
    Mlp,
    MultiHeadAttention,
    PrefixTokens,
    ResidualBlock,
    TokenPool,
    TokensToMap,
    activation,
    batch_norm,
    dense,
    layer_norm,
)
from keras_vit.layers.attention import merge_heads, softmax_float32, split_heads
from keras_vit.models.common import check_img_size, check_in_chans, resolve_out_indices
from keras_vit.registry import IMAGENET_MEAN, IMAGENET_STD, register_variant

def l2_normalize(x, axis=-1, eps=1e-12):
    """torch.nn.functional.normalize: x / max(||x||, eps), as rsqrt(max(sum x^2, eps^2))
    (builtin TFLite ops: SUM, MAXIMUM, RSQRT, MUL)."""
    sq = ops.sum(ops.square(x), axis=axis, keepdims=True)
    return x * ops.rsqrt(ops.maximum(sq, ops.cast(eps * eps, x.dtype)))


def fourier_features(grid_size, hidden_dim=32, temperature=10000.0, eps=1e-6):
    """timm's ``PositionalEncodingFourier`` before its projection, (1, H, W, 2 * hidden_dim),
    in float32 as torch computes it: [y features, x features], each sin/cos interleaved."""
    h, w = grid_size
    scale = np.float32(2 * math.pi)
    y = np.arange(1, h + 1, dtype=np.float32)
    x = np.arange(1, w + 1, dtype=np.float32)
    y = y / (y[-1] + np.float32(eps)) * scale
    x = x / (x[-1] + np.float32(eps)) * scale
    i = np.arange(hidden_dim, dtype=np.float32)
    dim_t = np.float32(temperature) ** (np.float32(2) * np.floor(i / 2) / np.float32(hidden_dim))

    def encode(v):  # (L,) -> (L, hidden_dim): sin of even, cos of odd channels, interleaved
        p = v[:, None] / dim_t
        return np.stack([np.sin(p[:, 0::2]), np.cos(p[:, 1::2])], axis=-1).reshape(len(v), -1)

    pos_y = np.broadcast_to(encode(y)[:, None, :], (h, w, hidden_dim))
    pos_x = np.broadcast_to(encode(x)[None, :, :], (h, w, hidden_dim))
    return np.concatenate([pos_y, pos_x], axis=-1)[None].astype(np.float32)


@keras.saving.register_keras_serializable(package="keras_vit")
class ConvPatchEmbed(keras.layers.Layer):
    """(B, H, W, C) -> (B, H/p * W/p, D) by log2(p) 3x3 stride-2 convs, each followed by
    BatchNorm, GELU between them (timm ``ConvPatchEmbed``; widths D/8, D/4, D/2, D for p=16).

    Sublayers are named as timm's ``proj`` Sequential (``proj.0.0`` conv, ``proj.0.1``
    BN, ``proj.1`` GELU, ...). Each conv pads 1 pixel on every side, explicitly, as torch.
    """

    def __init__(self, patch_size=16, embed_dim=768, act="gelu", **kwargs):
        super().__init__(**kwargs)
        if patch_size not in (8, 16):
            raise ValueError(f"ConvPatchEmbed needs patch_size 8 or 16, got {patch_size}")
        self.patch_size, self.embed_dim, self.act = int(patch_size), int(embed_dim), act
        n = int(math.log2(self.patch_size))
        self.widths = [self.embed_dim // 2 ** (n - 1 - i) for i in range(n)]
        self.convs = [keras.layers.Conv2D(c, 3, strides=2, padding="valid", use_bias=False,
                                          name=f"proj.{2 * i}.0")
                      for i, c in enumerate(self.widths)]
        self.bns = [batch_norm(f"proj.{2 * i}.1") for i in range(n)]
        self.act_fn = activation(act)

    def build(self, input_shape):
        b, h, w, c = input_shape
        for conv, bn, width in zip(self.convs, self.bns, self.widths):
            conv.build((b, h + 2 if h else None, w + 2 if w else None, c))
            h, w, c = (h // 2 if h else None), (w // 2 if w else None), width
            bn.build((b, h, w, c))

    def call(self, x, training=None):
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            x = bn(conv(ops.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))), training=training)
            if i < len(self.convs) - 1:
                x = self.act_fn(x)
        return ops.reshape(x, (-1, x.shape[1] * x.shape[2], self.embed_dim))

    def compute_output_shape(self, input_shape):
        h, w = input_shape[1], input_shape[2]
        n = h // self.patch_size * (w // self.patch_size) if h and w else None
        return (input_shape[0], n, self.embed_dim)

    def get_config(self):
        return {**super().get_config(), "patch_size": self.patch_size,
                "embed_dim": self.embed_dim, "act": self.act}


@keras.saving.register_keras_serializable(package="keras_vit")
class PositionalEncodingFourier(keras.layers.Layer):
    """Adds timm's ``PositionalEncodingFourier`` to (B, H*W, D) tokens: fixed sin/cos
    features of the (static) grid, a numpy constant, through the learned 1x1 conv
    ``token_projection``."""

    def __init__(self, grid_size, dim=768, hidden_dim=32, temperature=10000.0, **kwargs):
        super().__init__(**kwargs)
        self.grid_size = tuple(int(g) for g in grid_size)
        self.dim, self.hidden_dim, self.temperature = int(dim), int(hidden_dim), float(temperature)
        self.token_projection = keras.layers.Conv2D(self.dim, 1, name="token_projection")

    def build(self, input_shape):
        self.token_projection.build((1,) + self.grid_size + (2 * self.hidden_dim,))

    def call(self, x):
        table = fourier_features(self.grid_size, self.hidden_dim, self.temperature)
        pos = self.token_projection(ops.cast(table, self.compute_dtype))
        pos = ops.reshape(pos, (1, self.grid_size[0] * self.grid_size[1], self.dim))
        return x + ops.cast(pos, x.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "grid_size": self.grid_size, "dim": self.dim,
                "hidden_dim": self.hidden_dim, "temperature": self.temperature}


@keras.saving.register_keras_serializable(package="keras_vit")
class XCA(MultiHeadAttention):
    """Cross-covariance attention: per head, softmax(temperature * q_hat^T k_hat) mixes the
    d channels of v, where q_hat, k_hat are q, k L2-normalised over the tokens; the
    attention map is d x d, so the cost is linear in the number of tokens. Multi-head
    attention's fused ``qkv``, ``proj`` and dropouts; a learned per-head ``temperature``
    in place of its fixed scale."""

    def build(self, x_shape, context_shape=None):
        super().build(x_shape)
        # timm's shape (heads, 1, 1), so the checkpoint tensor loads as is.
        self.temperature = self.add_weight(name="temperature", shape=(self.num_heads, 1, 1),
                                           initializer="ones")

    def call(self, x, training=None):
        n, c, h = x.shape[1], self.inner_dim, self.num_heads
        # (B, N, 3C) -> (B, 3 heads, d, N), tokens last as timm: one transpose, then q, k, v
        # split, as MultiHeadAttention.project_qkv (no slices, whose gradients zero-fill)
        qkv = ops.transpose(ops.reshape(self.qkv(x), (-1, n, 3 * h, c // h)), (0, 2, 3, 1))
        q, k, v = ops.split(qkv, 3, axis=1)
        q, k = l2_normalize(q), l2_normalize(k)
        attn = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2))) * ops.cast(self.temperature, q.dtype)
        attn = self.attn_dropout(softmax_float32(attn), training=training)
        out = ops.transpose(ops.matmul(attn, v), (0, 3, 1, 2))  # (B, N, heads, d)
        out = self.proj(ops.reshape(out, (-1, n, c)))
        return self.proj_dropout(out, training=training)


@keras.saving.register_keras_serializable(package="keras_vit")
class ClassAttention(keras.layers.Layer):
    """CaiT's class attention (timm ``ClassAttn``): only the [CLS] token queries; keys and
    values come from all tokens. Separate ``q``, ``k``, ``v`` projections as timm's (so not
    multi-head attention's fused ``qkv``)."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, attn_drop=0.0, proj_drop=0.0, **kwargs):
        super().__init__(**kwargs)
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.dim, self.num_heads, self.qkv_bias = int(dim), int(num_heads), bool(qkv_bias)
        self.attn_drop, self.proj_drop = float(attn_drop), float(proj_drop)
        self.scale = (self.dim // self.num_heads) ** -0.5
        self.q = dense(self.dim, use_bias=qkv_bias, name="q")
        self.k = dense(self.dim, use_bias=qkv_bias, name="k")
        self.v = dense(self.dim, use_bias=qkv_bias, name="v")
        self.proj = dense(self.dim, name="proj")
        self.attn_dropout = keras.layers.Dropout(self.attn_drop)
        self.proj_dropout = keras.layers.Dropout(self.proj_drop)

    def build(self, input_shape):
        for layer in (self.q, self.k, self.v, self.proj):
            layer.build(input_shape)

    def call(self, x, training=None):
        """(B, N, D) -> the new [CLS] token, (B, 1, D)."""
        q = split_heads(self.q(x[:, :1]), self.num_heads) * ops.cast(self.scale, x.dtype)
        k, v = split_heads(self.k(x), self.num_heads), split_heads(self.v(x), self.num_heads)
        attn = softmax_float32(ops.matmul(q, ops.transpose(k, (0, 1, 3, 2))))
        attn = self.attn_dropout(attn, training=training)
        return self.proj_dropout(self.proj(merge_heads(ops.matmul(attn, v))), training=training)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], 1, self.dim)

    def get_config(self):
        return {**super().get_config(), "dim": self.dim, "num_heads": self.num_heads,
                "qkv_bias": self.qkv_bias, "attn_drop": self.attn_drop, "proj_drop": self.proj_drop}


@keras.saving.register_keras_serializable(package="keras_vit")
class LPI(keras.layers.Layer):
    """Local patch interaction: the tokens as their (H, W) map through a depthwise 3x3
    conv, GELU, BatchNorm and a second depthwise 3x3 conv (timm ``LPI``)."""

    def __init__(self, grid_size, kernel_size=3, act="gelu", **kwargs):
        super().__init__(**kwargs)
        self.grid_size = tuple(int(g) for g in grid_size)
        self.kernel_size, self.act = int(kernel_size), act
        # Stride 1, odd kernel: "same" pads k // 2 on every side, as torch's padding.
        self.conv1 = keras.layers.DepthwiseConv2D(self.kernel_size, padding="same", name="conv1")
        self.act_fn = activation(act)
        self.bn = batch_norm("bn")
        self.conv2 = keras.layers.DepthwiseConv2D(self.kernel_size, padding="same", name="conv2")

    def build(self, input_shape):
        shape = (input_shape[0],) + self.grid_size + (input_shape[-1],)
        for layer in (self.conv1, self.bn, self.conv2):
            layer.build(shape)

    def call(self, x, training=None):
        n, c = x.shape[1], x.shape[-1]
        x = ops.reshape(x, (-1,) + self.grid_size + (c,))  # row-major tokens = NHWC map
        x = self.bn(self.act_fn(self.conv1(x)), training=training)
        return ops.reshape(self.conv2(x), (-1, n, c))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "grid_size": self.grid_size,
                "kernel_size": self.kernel_size, "act": self.act}


class _XCiTBlock(ResidualBlock):
    """The skeleton's norm1 / attn / norm2 / mlp with XCiT's mixer, and timm's XCiT LayerScale:
    weights of the block itself (``gamma1``, ``gamma2``, ... initialised to ``eta``), so that
    checkpoints' ``blocks.N.gamma1`` load by name. Subclasses name the mixer and the branches."""

    MIXER = None
    GAMMAS = ("gamma1", "gamma2")

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, proj_drop=0.0,
                 attn_drop=0.0, drop_path=0.0, eta=1.0, norm_eps=1e-6, act="gelu", **kwargs):
        for key in ("init_values", "norm_names", "scale_names"):  # fixed here; in saved configs
            kwargs.pop(key, None)
        super().__init__(
            self.MIXER(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                       proj_drop=proj_drop, name="attn"),
            Mlp(int(dim * mlp_ratio), act=act, drop=proj_drop, name="mlp"),
            norm_eps=norm_eps, drop_path=drop_path, **kwargs)
        self.dim, self.num_heads, self.mlp_ratio = int(dim), int(num_heads), float(mlp_ratio)
        self.qkv_bias, self.proj_drop = bool(qkv_bias), float(proj_drop)
        self.attn_drop, self.eta, self.act = float(attn_drop), float(eta), act

    def build(self, x_shape):
        super().build(x_shape)
        for name in self.GAMMAS:
            setattr(self, name, self.add_weight(name=name, shape=(self.dim,),
                                                initializer=keras.initializers.Constant(self.eta)))

    def residual(self, x, branch, gamma, training=None):
        """x + drop_path(gamma * branch): one LayerScaled residual branch."""
        return x + self.drop_path(gamma * branch, training=training)

    def get_config(self):
        config = self.block_config()
        for key in ("init_values", "norm_names", "scale_names"):
            config.pop(key)
        return {**config, "dim": self.dim, "num_heads": self.num_heads,
                "mlp_ratio": self.mlp_ratio, "qkv_bias": self.qkv_bias,
                "proj_drop": self.proj_drop, "attn_drop": self.attn_drop, "eta": self.eta,
                "act": self.act}


@keras.saving.register_keras_serializable(package="keras_vit")
class XCABlock(_XCiTBlock):
    """x + g1 * XCA(norm1(x)), then + g3 * LPI(norm3(x)), then + g2 * MLP(norm2(x)), each
    branch with stochastic depth (timm ``XCABlock``; the 1-3-2 order is timm's): the
    skeleton with a third branch, LPI, between its two."""

    MIXER = XCA
    GAMMAS = ("gamma1", "gamma3", "gamma2")

    def __init__(self, dim, num_heads, grid_size, mlp_ratio=4.0, act="gelu", norm_eps=1e-6,
                 **kwargs):
        super().__init__(dim, num_heads, mlp_ratio, act=act, norm_eps=norm_eps, **kwargs)
        self.grid_size = tuple(int(g) for g in grid_size)
        self.norm3 = layer_norm(norm_eps, name="norm3")
        self.local_mp = LPI(self.grid_size, act=act, name="local_mp")

    def build(self, x_shape):
        super().build(x_shape)
        self.norm3.build(x_shape)
        self.local_mp.build(x_shape)

    def call(self, x, training=None):
        x = self.residual(x, self.mix(self.norm1(x), training=training), self.gamma1, training)
        x = self.residual(x, self.local_mp(self.norm3(x), training=training), self.gamma3,
                          training)
        return self.residual(x, self.mlp(self.norm2(x), training=training), self.gamma2, training)

    def get_config(self):
        return {**super().get_config(), "grid_size": self.grid_size}


@keras.saving.register_keras_serializable(package="keras_vit")
class ClassAttentionBlock(_XCiTBlock):
    """timm's XCiT ``ClassAttentionBlock``, reproduced exactly:

    x = x + g1 * [CA(norm1(x)), norm1(x)[1:]]   (patch tokens gain their own norm1)
    x = norm2(x) if tokens_norm else [norm2(x[0]), x[1:]]
    x = x + [g2 * MLP(x[0]), x[1:]]             (patch tokens are doubled, as timm's)

    Own ``call``: not the skeleton's math (the norms and residuals above differ from it).
    """

    MIXER = ClassAttention

    def __init__(self, dim, num_heads, mlp_ratio=4.0, tokens_norm=False, **kwargs):
        super().__init__(dim, num_heads, mlp_ratio, **kwargs)
        self.tokens_norm = bool(tokens_norm)

    def call(self, x, training=None):
        x_norm1 = self.norm1(x)
        x_attn = ops.concatenate([self.mix(x_norm1, training=training), x_norm1[:, 1:]], axis=1)
        x = self.residual(x, x_attn, self.gamma1, training)
        if self.tokens_norm:
            x = self.norm2(x)
        else:
            x = ops.concatenate([self.norm2(x[:, :1]), x[:, 1:]], axis=1)
        cls = self.gamma2 * self.mlp(x[:, :1], training=training)
        return x + self.drop_path(ops.concatenate([cls, x[:, 1:]], axis=1), training=training)

    def get_config(self):
        return {**super().get_config(), "tokens_norm": self.tokens_norm}


def xcit(*, img_size=224, patch_size=16, in_chans=3, num_classes=1000, global_pool="token",
         embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, qkv_bias=True, drop_rate=0.0,
         pos_drop_rate=0.0, proj_drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0,
         cls_attn_layers=2, use_pos_embed=True, eta=1.0, tokens_norm=False,
         features_only=False, out_indices=None, name="xcit"):
    """Builds an XCiT (timm ``Xcit``) as a functional model.

    drop_path_rate is the same for every XCA block and zero in the class-attention
    blocks, as timm's. eta: the LayerScale init. tokens_norm: whether the
    class-attention blocks' norm2 normalises every token or only [CLS].
    global_pool: "token" ([CLS]) or "avg" (mean of the patch tokens), after the final norm.
    features_only: the (B, H/p, W/p, D) token maps of the ``out_indices`` XCA blocks.
    """
    if patch_size not in (8, 16):
        raise ValueError(f"XCiT's convolutional patch embedding needs patch_size 8 or 16, "
                         f"got {patch_size}")
    h, w = check_img_size(img_size, patch_size)
    check_in_chans(in_chans)
    if global_pool not in ("token", "avg"):
        raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
    indices = set(resolve_out_indices(out_indices, depth)) if features_only else ()
    grid = (h // patch_size, w // patch_size)

    inputs = keras.Input((h, w, in_chans), name="images")
    x = ConvPatchEmbed(patch_size, embed_dim, name="patch_embed")(inputs)
    if use_pos_embed:
        x = PositionalEncodingFourier(grid, embed_dim, name="pos_embed")(x)
    x = keras.layers.Dropout(pos_drop_rate, name="pos_drop")(x)
    features = []
    for i in range(depth):
        x = XCABlock(embed_dim, num_heads, grid, mlp_ratio, qkv_bias=qkv_bias,
                     proj_drop=proj_drop_rate, attn_drop=attn_drop_rate,
                     drop_path=drop_path_rate, eta=eta, name=f"blocks.{i}")(x)
        if i in indices:
            features.append(TokensToMap(grid, 0, name=f"feature_{i}")(x))
    if features_only:
        return keras.Model(inputs, features, name=name)

    x = PrefixTokens(("cls_token",), stddev=0.02, name="prefix_tokens")(x)
    for i in range(cls_attn_layers):
        x = ClassAttentionBlock(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias,
                                proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, eta=eta,
                                tokens_norm=tokens_norm, name=f"cls_attn_blocks.{i}")(x)
    x = layer_norm(name="norm")(x)
    pooled = TokenPool(global_pool, 1, name="pool")(x)
    if not num_classes:
        return keras.Model(inputs, pooled, name=name)
    pooled = keras.layers.Dropout(drop_rate, name="head_drop")(pooled)
    return keras.Model(inputs, dense(num_classes, name="head")(pooled), name=name)


def _xcit(name, img_size=224, **defaults):
    """Registers a timm-named XCiT variant with timm's default_cfg."""
    cfg = dict(input_size=img_size, mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=1.0,
               interpolation="bicubic")
    return register_variant(name, xcit, __name__, cfg, img_size=img_size, **defaults)


# timm's XCiT variants: (size, depth) -> width, heads, LayerScale init, tokens_norm; each at
# patch 16 and 8 and at 224 and 384 px (the same weights' shapes: no learned grid).
_XCIT_SIZES = {
    ("nano", 12): dict(embed_dim=128, num_heads=4, eta=1.0, tokens_norm=False),
    ("tiny", 12): dict(embed_dim=192, num_heads=4, eta=1.0, tokens_norm=True),
    ("small", 12): dict(embed_dim=384, num_heads=8, eta=1.0, tokens_norm=True),
    ("tiny", 24): dict(embed_dim=192, num_heads=4, eta=1e-5, tokens_norm=True),
    ("small", 24): dict(embed_dim=384, num_heads=8, eta=1e-5, tokens_norm=True),
    ("medium", 24): dict(embed_dim=512, num_heads=8, eta=1e-5, tokens_norm=True),
    ("large", 24): dict(embed_dim=768, num_heads=16, eta=1e-5, tokens_norm=True),
}
for (_size, _depth), _arch in _XCIT_SIZES.items():
    for _patch in (16, 8):
        for _img in (224, 384):
            _xcit(f"xcit_{_size}_{_depth}_p{_patch}_{_img}", img_size=_img, patch_size=_patch,
                  depth=_depth, **_arch)
