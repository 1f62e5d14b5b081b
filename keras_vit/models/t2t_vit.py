"""T2T-ViT (Yuan et al. 2021): Tokens-to-Token ViT.

The image is tokenised progressively: a soft split (torch's ``nn.Unfold``, k7
s4 p2) makes overlapping patches, a light transformer layer (a Performer, or a
plain one-head transformer in the ``_t`` variants) mixes them, the tokens are
re-structurised into a map and soft-split again (k3 s2 p1, twice), then
projected to the backbone width: 16x down-sampling in all. A [CLS] token and a
fixed sinusoidal position embedding precede a ViT backbone (mlp_ratio 3, no
qkv bias, LayerNorm eps 1e-5) and a linear head on the [CLS] token.

The reference is the official repository (yitu-opensource/T2T-ViT,
``models/t2t_vit.py``, ``token_performer.py``, ``token_transformer.py``);
timm has no T2T-ViT. Layer names mirror its module paths
(``tokens_to_token.attention1.kqv``, ``blocks.3.attn.qkv``), so an official
state dict loads through ``keras_vit.load_timm_weights``. As in the official
code, the position embedding and the Performer's random-feature matrix ``w``
are non-trainable weights (``nn.Parameter(requires_grad=False)`` there): they
are in its state dicts and in its parameter counts. The official released
checkpoints are evaluated with the default attention scale head_dim^-0.5
(``main.py`` builds the models with ``pretrained=False``), which is what the
blocks here use.
"""

import math

import keras
from keras import ops

from keras_vit.layers import (
    DropPath,
    Mlp,
    PositionEmbedding,
    TokensToMap,
    activation,
    dense,
    layer_norm,
    sinusoid_table,
)
from keras_vit.layers.attention import softmax_float32
from keras_vit.models.common import check_img_size, check_in_chans
from keras_vit.models.vit import vit_on_tokens
from keras_vit.registry import IMAGENET_MEAN, IMAGENET_STD, register_variant

TORCH_LN_EPS = 1e-5  # the official code uses nn.LayerNorm's default everywhere
# (kernel, stride, padding) of the three soft splits; their strides multiply to 16.
SOFT_SPLITS = ((7, 4, 2), (3, 2, 1), (3, 2, 1))


def _ln(name):
    return layer_norm(TORCH_LN_EPS, name=name)


def soft_split_size(size, kernel, stride, padding):
    return (size + 2 * padding - kernel) // stride + 1


def token_grid(h, w):
    """The token grid after the three soft splits."""
    for k, s, p in SOFT_SPLITS:
        h, w = soft_split_size(h, k, s, p), soft_split_size(w, k, s, p)
    return h, w


@keras.saving.register_keras_serializable(package="keras_vit")
class SoftSplit(keras.layers.Layer):
    """torch ``nn.Unfold`` on an NHWC map: (B, H, W, C) -> (B, H'*W', C*k*k).

    Features are ordered as torch's (channel, kernel row, kernel column), so the
    next linear layer takes official weights unchanged. Builtin TFLite ops
    only: explicit zero padding, one strided slice per kernel offset, and a
    3-D transpose from (offset, channel) to (channel, offset) order.
    """

    def __init__(self, kernel_size, stride, padding, **kwargs):
        super().__init__(**kwargs)
        self.kernel_size, self.stride, self.padding = int(kernel_size), int(stride), int(padding)

    def grid(self, h, w):
        k, s, p = self.kernel_size, self.stride, self.padding
        return soft_split_size(h, k, s, p), soft_split_size(w, k, s, p)

    def call(self, x):
        k, s, p = self.kernel_size, self.stride, self.padding
        channels = x.shape[-1]
        oh, ow = self.grid(x.shape[1], x.shape[2])
        if p:
            x = ops.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
        offsets = [x[:, i:i + s * (oh - 1) + 1:s, j:j + s * (ow - 1) + 1:s, :]
                   for i in range(k) for j in range(k)]
        x = ops.concatenate(offsets, axis=-1)  # (B, oh, ow, k*k*C), offset-major
        x = ops.reshape(x, (-1, k * k, channels))
        x = ops.transpose(x, (0, 2, 1))  # channel-major, as torch's Unfold
        return ops.reshape(x, (-1, oh * ow, channels * k * k))

    def compute_output_shape(self, input_shape):
        oh, ow = self.grid(input_shape[1], input_shape[2])
        return (input_shape[0], oh * ow, input_shape[3] * self.kernel_size ** 2)

    def get_config(self):
        return {**super().get_config(), "kernel_size": self.kernel_size, "stride": self.stride,
                "padding": self.padding}


# Not a ResidualBlock: the attention residual adds v (width emb), not the input (C*k*k).
@keras.saving.register_keras_serializable(package="keras_vit")
class TokenPerformer(keras.layers.Layer):
    """The official ``Token_performer``: one-head Performer attention with positive random
    features (FAVOR+), v as the residual, then an MLP of width ``emb``.

    Attention is linear in the number of tokens: with phi(x) = exp(w x - |x|^2 / 2) / sqrt(m),
    y = phi(q) (phi(k)^T v) / (phi(q) . sum_t phi(k_t) + 1e-8). ``w`` (m x emb, m =
    emb * kernel_ratio) is a fixed random orthogonal matrix scaled by sqrt(m): a
    non-trainable weight, as the official ``nn.Parameter(requires_grad=False)``.
    Note the official split order of the fused projection: k, q, v.
    """

    def __init__(self, emb, kernel_ratio=0.5, dp1=0.1, dp2=0.1, **kwargs):
        super().__init__(**kwargs)
        self.emb, self.kernel_ratio = int(emb), float(kernel_ratio)
        self.dp1, self.dp2 = float(dp1), float(dp2)
        self.m = int(self.emb * self.kernel_ratio)
        self.epsilon = 1e-8
        self.norm1 = _ln("norm1")
        self.kqv = dense(3 * self.emb, name="kqv")
        self.dp = keras.layers.Dropout(self.dp1)
        self.proj = dense(self.emb, name="proj")
        self.norm2 = _ln("norm2")
        self.fc1 = dense(self.emb, name="mlp.0")
        self.act = activation("gelu")
        self.fc2 = dense(self.emb, name="mlp.2")
        self.mlp_drop = keras.layers.Dropout(self.dp2)

    def build(self, input_shape):
        tokens = tuple(input_shape[:-1])
        self.norm1.build(input_shape)
        self.kqv.build(input_shape)
        for layer in (self.proj, self.norm2, self.fc1, self.fc2):
            layer.build(tokens + (self.emb,))
        self.w = self.add_weight(
            name="w", shape=(self.m, self.emb), trainable=False,
            initializer=keras.initializers.Orthogonal(gain=math.sqrt(self.m)))

    def prm_exp(self, x):
        xd = ops.sum(x * x, axis=-1, keepdims=True) / 2
        wtx = ops.matmul(x, ops.transpose(ops.cast(self.w, x.dtype)))
        return ops.exp(wtx - xd) / math.sqrt(self.m)

    def call(self, x, training=None):
        kqv = self.kqv(self.norm1(x))
        e = self.emb
        k, q, v = kqv[..., :e], kqv[..., e:2 * e], kqv[..., 2 * e:]
        kp, qp = self.prm_exp(k), self.prm_exp(q)  # (B, T, m)
        d = ops.matmul(qp, ops.expand_dims(ops.sum(kp, axis=1), -1))  # (B, T, 1)
        kptv = ops.matmul(ops.transpose(kp, (0, 2, 1)), v)  # (B, m, emb)
        y = ops.matmul(qp, kptv) / (d + self.epsilon)
        x = v + self.dp(self.proj(y), training=training)
        h = self.fc2(self.act(self.fc1(self.norm2(x))))
        return x + self.mlp_drop(h, training=training)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.emb,)

    def get_config(self):
        return {**super().get_config(), "emb": self.emb, "kernel_ratio": self.kernel_ratio,
                "dp1": self.dp1, "dp2": self.dp2}


# Not a ResidualBlock: the attention residual adds v (width in_dim), not the input (dim).
@keras.saving.register_keras_serializable(package="keras_vit")
class TokenTransformer(keras.layers.Layer):
    """The official ``Token_transformer`` (T2T-ViT_t): one-head attention from ``dim`` input
    features to ``in_dim``, v as the residual, then an MLP.

    The official scale is (dim // num_heads)^-0.5 with ``dim`` the *input* width
    (147 or 576), and its qkv reshape works only for one head.
    """

    def __init__(self, in_dim, num_heads=1, mlp_ratio=1.0, qkv_bias=False, drop=0.0,
                 attn_drop=0.0, drop_path=0.0, **kwargs):
        super().__init__(**kwargs)
        if int(num_heads) != 1:
            raise ValueError("the official Token_transformer supports num_heads=1 only")
        self.in_dim, self.num_heads, self.mlp_ratio = int(in_dim), 1, float(mlp_ratio)
        self.qkv_bias, self.drop, self.attn_drop = bool(qkv_bias), float(drop), float(attn_drop)
        self.drop_path_rate = float(drop_path)
        self.norm1 = _ln("norm1")
        self.qkv = dense(3 * self.in_dim, use_bias=self.qkv_bias, name="attn.qkv")
        self.attn_dropout = keras.layers.Dropout(self.attn_drop)
        self.proj = dense(self.in_dim, name="attn.proj")
        self.proj_dropout = keras.layers.Dropout(self.drop)
        self.norm2 = _ln("norm2")
        self.mlp = Mlp(int(self.in_dim * self.mlp_ratio), out_features=self.in_dim, drop=self.drop,
                       name="mlp")
        self.drop_path = DropPath(self.drop_path_rate, name="drop_path")

    def build(self, input_shape):
        tokens = tuple(input_shape[:-1])
        self.norm1.build(input_shape)
        self.qkv.build(input_shape)
        for layer in (self.proj, self.norm2, self.mlp):
            layer.build(tokens + (self.in_dim,))

    def call(self, x, training=None):
        scale = (x.shape[-1] // self.num_heads) ** -0.5
        qkv = self.qkv(self.norm1(x))
        e = self.in_dim
        q, k, v = qkv[..., :e], qkv[..., e:2 * e], qkv[..., 2 * e:]
        attn = softmax_float32(ops.matmul(q * scale, ops.transpose(k, (0, 2, 1))))
        attn = self.attn_dropout(attn, training=training)
        out = self.proj_dropout(self.proj(ops.matmul(attn, v)), training=training)
        x = v + out
        return x + self.drop_path(self.mlp(self.norm2(x), training=training), training=training)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.in_dim,)

    def get_config(self):
        return {**super().get_config(), "in_dim": self.in_dim, "num_heads": self.num_heads,
                "mlp_ratio": self.mlp_ratio, "qkv_bias": self.qkv_bias, "drop": self.drop,
                "attn_drop": self.attn_drop, "drop_path": self.drop_path_rate}


@keras.saving.register_keras_serializable(package="keras_vit")
class FixedSinusoidPositionEmbedding(PositionEmbedding):
    """Adds the official ``get_sinusoid_encoding`` table over [CLS] + grid tokens.

    A non-trainable weight ``pos_embed`` (1, N, D) initialised to the table
    (``keras_vit.layers.sinusoid_table``, the same formula), as the official
    ``nn.Parameter(requires_grad=False)``: official state dicts carry it and
    its parameter counts include it. A checkpoint made for another grid is
    resized bicubically, as the official ``utils.resize_pos_embed``.
    """

    def build(self, input_shape):
        table = sinusoid_table(*self.embedding_shape(input_shape)[1:])[None]
        self.pos_embed = self.add_weight(name="pos_embed", shape=table.shape, trainable=False,
                                         initializer="zeros")
        self.pos_embed.assign(table)


def check_t2t_img_size(img_size):
    """(h, w); the soft splits need each side a multiple of 16 (their total stride)."""
    return check_img_size(img_size, 16, what="the T2T soft-split stride (4 * 2 * 2)")


def t2t_vit(*, img_size=224, tokens_type="performer", in_chans=3, num_classes=1000,
            embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, qkv_bias=False, token_dim=64,
            drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0, features_only=False,
            out_indices=None, name="t2t_vit"):
    """Builds a T2T-ViT as a functional model (the official ``T2T_ViT``).

    tokens_type: "performer" (T2T-ViT) or "transformer" (T2T-ViT_t).
    features_only: the token maps of the ``out_indices`` backbone blocks as
    (B, H/16, W/16, embed_dim) NHWC maps.
    """
    h, w = check_t2t_img_size(img_size)
    check_in_chans(in_chans)
    if tokens_type not in ("performer", "transformer"):
        raise ValueError(f"tokens_type must be 'performer' or 'transformer', got {tokens_type!r}")
    grid = token_grid(h, w)

    inputs = keras.Input((h, w, in_chans), name="images")
    x, (gh, gw) = inputs, (h, w)
    for i, (k, s, p) in enumerate(SOFT_SPLITS):
        split = SoftSplit(k, s, p, name=f"tokens_to_token.soft_split{i}")
        x = split(x)
        gh, gw = split.grid(gh, gw)
        if i == len(SOFT_SPLITS) - 1:
            break
        attn_name = f"tokens_to_token.attention{i + 1}"
        if tokens_type == "performer":
            x = TokenPerformer(token_dim, kernel_ratio=0.5, name=attn_name)(x)
        else:
            x = TokenTransformer(token_dim, num_heads=1, mlp_ratio=1.0, name=attn_name)(x)
        # re-structurisation: tokens back to a (B, gh, gw, token_dim) map
        x = TokensToMap((gh, gw), 0, name=f"tokens_to_token.restructure{i + 1}")(x)
    x = dense(embed_dim, name="tokens_to_token.project")(x)

    # The official backbone: a [CLS] token drawn with std 0.02, the fixed sinusoid table,
    # torch's LayerNorm eps and no dropout before the head.
    return vit_on_tokens(inputs, x, grid, num_classes=num_classes, depth=depth,
                         num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                         drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
                         drop_path_rate=drop_path_rate, norm_eps=TORCH_LN_EPS, token_std=0.02,
                         position_embedding=FixedSinusoidPositionEmbedding, head_drop=False,
                         features_only=features_only, out_indices=out_indices, name=name)


def _t2t(name, **defaults):
    cfg = dict(input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=0.9,
               interpolation="bicubic")
    return register_variant(name, t2t_vit, __name__, cfg, img_size=224, **defaults)


# The official registrations (models/t2t_vit.py), same names and configurations.
_t2t("t2t_vit_7", tokens_type="performer", embed_dim=256, depth=7, num_heads=4, mlp_ratio=2.0)
_t2t("t2t_vit_10", tokens_type="performer", embed_dim=256, depth=10, num_heads=4, mlp_ratio=2.0)
_t2t("t2t_vit_12", tokens_type="performer", embed_dim=256, depth=12, num_heads=4, mlp_ratio=2.0)
for _tokens, _prefix in (("performer", "t2t_vit"), ("transformer", "t2t_vit_t")):
    _t2t(f"{_prefix}_14", tokens_type=_tokens, embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.0)
    _t2t(f"{_prefix}_19", tokens_type=_tokens, embed_dim=448, depth=19, num_heads=7, mlp_ratio=3.0)
    _t2t(f"{_prefix}_24", tokens_type=_tokens, embed_dim=512, depth=24, num_heads=8, mlp_ratio=3.0)

__all__ = ["FixedSinusoidPositionEmbedding", "SoftSplit", "TokenPerformer", "TokenTransformer",
           "t2t_vit", "token_grid"]
