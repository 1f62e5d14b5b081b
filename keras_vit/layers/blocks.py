"""Transformer encoder and decoder blocks, in Pre-LN and Post-LN form.

Pre-LN  (ViT, GPT-2): x + f(LN(x)) -- what every vision backbone here uses.
Post-LN (Vaswani et al. 2017): LN(x + f(x)) -- the survey's original formulation.
"""

import keras
from keras import ops

from keras_vit.layers.attention import MultiHeadAttention
from keras_vit.layers.common import layer_norm
from keras_vit.layers.mlp import Mlp
from keras_vit.layers.regularization import DropPath, LayerScale


def causal_mask(length):
    """(1, 1, L, L) boolean mask, True where key position <= query position."""
    pos = ops.arange(length)
    return ops.expand_dims(pos[:, None] >= pos[None, :], (0, 1))


def _scale(init_values, name):
    return LayerScale(init_values, name=name) if init_values else None


def _apply(layer, x):
    return layer(x) if layer is not None else x


@keras.saving.register_keras_serializable(package="keras_vit")
class TransformerBlock(keras.layers.Layer):
    """Encoder block: multi-head self-attention and MLP, each in a residual branch.

    Sublayer names follow timm's ``Block`` (norm1, attn, ls1, norm2, mlp, ls2)
    so timm checkpoints map by name.
    """

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, drop=0.0, attn_drop=0.0,
                 drop_path=0.0, init_values=None, norm_first=True, norm_eps=1e-6, act="gelu",
                 **kwargs):
        super().__init__(**kwargs)
        self.dim, self.num_heads, self.mlp_ratio = int(dim), int(num_heads), float(mlp_ratio)
        self.qkv_bias, self.drop, self.attn_drop = bool(qkv_bias), float(drop), float(attn_drop)
        self.drop_path_rate, self.init_values = float(drop_path), init_values
        self.norm_first, self.norm_eps, self.act = bool(norm_first), float(norm_eps), act
        self.norm1 = layer_norm(norm_eps, name="norm1")
        self.attn = MultiHeadAttention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                                       proj_drop=drop, name="attn")
        self.ls1 = _scale(init_values, "ls1")
        self.norm2 = layer_norm(norm_eps, name="norm2")
        self.mlp = Mlp(int(dim * mlp_ratio), act=act, drop=drop, name="mlp")
        self.ls2 = _scale(init_values, "ls2")
        self.drop_path = DropPath(drop_path, name="drop_path")

    def build(self, x_shape):
        for layer in (self.norm1, self.attn, self.norm2, self.mlp, self.ls1, self.ls2):
            if layer is not None:
                layer.build(x_shape)

    def call(self, x, attention_mask=None, bias=None, training=None):
        def attn(h):
            return _apply(self.ls1, self.attn(h, attention_mask=attention_mask, bias=bias,
                                              training=training))

        def mlp(h):
            return _apply(self.ls2, self.mlp(h, training=training))

        if self.norm_first:
            x = x + self.drop_path(attn(self.norm1(x)), training=training)
            return x + self.drop_path(mlp(self.norm2(x)), training=training)
        x = self.norm1(x + self.drop_path(attn(x), training=training))
        return self.norm2(x + self.drop_path(mlp(x), training=training))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "dim": self.dim, "num_heads": self.num_heads,
                "mlp_ratio": self.mlp_ratio, "qkv_bias": self.qkv_bias, "drop": self.drop,
                "attn_drop": self.attn_drop, "drop_path": self.drop_path_rate,
                "init_values": self.init_values, "norm_first": self.norm_first,
                "norm_eps": self.norm_eps, "act": self.act}


@keras.saving.register_keras_serializable(package="keras_vit")
class TransformerDecoderBlock(keras.layers.Layer):
    """Decoder block: masked self-attention, cross-attention to the encoder output, MLP.

    ``call(x, memory, self_mask, memory_mask)``: boolean masks, True = attend,
    broadcastable to (B, heads, queries, keys); ``memory_mask`` is usually the
    encoder's padding. ``causal=True`` adds the mask that hides later positions.
    """

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, drop=0.0, attn_drop=0.0,
                 drop_path=0.0, norm_first=True, norm_eps=1e-6, act="gelu", causal=True,
                 **kwargs):
        super().__init__(**kwargs)
        self.causal = bool(causal)
        self.dim, self.num_heads, self.mlp_ratio = int(dim), int(num_heads), float(mlp_ratio)
        self.qkv_bias, self.drop, self.attn_drop = bool(qkv_bias), float(drop), float(attn_drop)
        self.drop_path_rate, self.norm_first = float(drop_path), bool(norm_first)
        self.norm_eps, self.act = float(norm_eps), act
        common = dict(qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.norm1 = layer_norm(norm_eps, name="norm1")
        self.self_attn = MultiHeadAttention(dim, num_heads, name="self_attn", **common)
        self.norm2 = layer_norm(norm_eps, name="norm2")
        self.cross_attn = MultiHeadAttention(dim, num_heads, cross=True, name="cross_attn", **common)
        self.norm3 = layer_norm(norm_eps, name="norm3")
        self.mlp = Mlp(int(dim * mlp_ratio), act=act, drop=drop, name="mlp")
        self.drop_path = DropPath(drop_path, name="drop_path")

    def build(self, x_shape, memory_shape=None):
        memory_shape = memory_shape or x_shape
        for norm in (self.norm1, self.norm2, self.norm3):
            norm.build(x_shape)
        self.self_attn.build(x_shape)
        self.cross_attn.build(x_shape, memory_shape)
        self.mlp.build(x_shape)

    def call(self, x, memory, self_mask=None, memory_mask=None, training=None):
        if self.causal:
            causal = causal_mask(ops.shape(x)[1])
            self_mask = causal if self_mask is None else ops.logical_and(self_mask, causal)
        branches = (
            (self.norm1, lambda h: self.self_attn(h, attention_mask=self_mask, training=training)),
            (self.norm2, lambda h: self.cross_attn(h, context=memory, attention_mask=memory_mask,
                                                   training=training)),
            (self.norm3, lambda h: self.mlp(h, training=training)),
        )
        for norm, branch in branches:
            if self.norm_first:
                x = x + self.drop_path(branch(norm(x)), training=training)
            else:
                x = norm(x + self.drop_path(branch(x), training=training))
        return x

    def compute_output_shape(self, input_shape, *args, **kwargs):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "dim": self.dim, "num_heads": self.num_heads,
                "mlp_ratio": self.mlp_ratio, "qkv_bias": self.qkv_bias, "drop": self.drop,
                "attn_drop": self.attn_drop, "drop_path": self.drop_path_rate,
                "norm_first": self.norm_first, "norm_eps": self.norm_eps, "act": self.act,
                "causal": self.causal}
