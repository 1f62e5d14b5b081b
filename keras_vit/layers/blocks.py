"""Transformer encoder and decoder blocks, in Pre-LN and Post-LN form.

Pre-LN  (ViT, GPT-2): x + f(LN(x)) -- what every vision backbone here uses.
Post-LN (Vaswani et al. 2017): LN(x + f(x)) -- the survey's original formulation.
"""

import keras
from keras import ops

from keras_vit.layers.attention import MultiHeadAttention
from keras_vit.layers.common import layer_norm
from keras_vit.layers.efficient_attention import attention_mixer
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
class ResidualBlock(keras.layers.Layer):
    """The skeleton every transformer block shares (timm's ``Block``; MetaFormer):

    Pre-LN:  x = x + drop_path(ls1(mixer(norm1(x)))); x = x + drop_path(ls2(mlp(norm2(x))))
    Post-LN: x = norm1(x + drop_path(mixer(x)));      x = norm2(x + drop_path(mlp(x)))

    The token mixer (attention of any kind) and the MLP are layers handed in; a
    family's block says only which. Sublayer names are timm's (``norm1``, the
    mixer's own name, usually ``attn``, ``ls1``, ``norm2``, ``mlp``, ``ls2``;
    ``norm_names`` / ``scale_names`` rename them where a reference names them
    otherwise), so checkpoints map by name. Extra positional and keyword
    arguments of ``call`` go to the mixer (masks, biases, relative positions).
    Families subclass it, building their mixer and MLP in ``__init__`` and
    keeping their own ``get_config``; used directly, the mixer and MLP are
    serialised with the block.
    """

    def __init__(self, mixer, mlp, norm_eps=1e-6, norm_first=True, init_values=None,
                 drop_path=0.0, norm_names=("norm1", "norm2"), scale_names=("ls1", "ls2"),
                 **kwargs):
        super().__init__(**kwargs)
        if isinstance(mixer, dict):
            mixer = keras.saving.deserialize_keras_object(mixer)
        if isinstance(mlp, dict):
            mlp = keras.saving.deserialize_keras_object(mlp)
        self.norm_eps, self.norm_first = float(norm_eps), bool(norm_first)
        self.init_values, self.drop_path_rate = init_values, float(drop_path)
        self.norm_names, self.scale_names = tuple(norm_names), tuple(scale_names)
        self.norm1 = layer_norm(norm_eps, name=self.norm_names[0])
        self.attn = mixer
        self.ls1 = _scale(init_values, self.scale_names[0])
        self.norm2 = layer_norm(norm_eps, name=self.norm_names[1])
        self.mlp = mlp
        self.ls2 = _scale(init_values, self.scale_names[1])
        self.drop_path = DropPath(drop_path, name="drop_path")

    def build(self, x_shape, *mixer_shapes):
        for layer in (self.norm1, self.norm2, self.mlp, self.ls1, self.ls2):
            if layer is not None:
                layer.build(x_shape)
        self.attn.build(x_shape, *mixer_shapes)

    def mix(self, x, *args, training=None, **kwargs):
        """The first residual branch's function, before LayerScale: the mixer."""
        return self.attn(x, *args, training=training, **kwargs)

    def feed_forward(self, x, training=None):
        """The second residual branch's function, before LayerScale: the MLP."""
        return self.mlp(x, training=training)

    def call(self, x, *args, training=None, **kwargs):
        def mixer(h):
            return _apply(self.ls1, self.mix(h, *args, training=training, **kwargs))

        def mlp(h):
            return _apply(self.ls2, self.feed_forward(h, training=training))

        if self.norm_first:
            x = x + self.drop_path(mixer(self.norm1(x)), training=training)
            return x + self.drop_path(mlp(self.norm2(x)), training=training)
        x = self.norm1(x + self.drop_path(mixer(x), training=training))
        return self.norm2(x + self.drop_path(mlp(x), training=training))

    def compute_output_shape(self, input_shape, *args, **kwargs):
        return input_shape

    def block_config(self):
        """The skeleton's own arguments, for subclasses' ``get_config``."""
        return {**super().get_config(), "norm_eps": self.norm_eps,
                "norm_first": self.norm_first, "init_values": self.init_values,
                "drop_path": self.drop_path_rate, "norm_names": self.norm_names,
                "scale_names": self.scale_names}

    def get_config(self):
        return {**self.block_config(),
                "mixer": keras.saving.serialize_keras_object(self.attn),
                "mlp": keras.saving.serialize_keras_object(self.mlp)}


@keras.saving.register_keras_serializable(package="keras_vit")
class TransformerBlock(ResidualBlock):
    """Encoder block: multi-head self-attention and MLP, each in a residual branch.

    ``call(x, attention_mask=None, bias=None)``; names as timm's ``Block``. ``attention``
    picks the token mixer (layers/efficient_attention.py: dense, linear, topk, bigbird), with
    ``attention_args`` its own arguments; every kind has the dense one's weights.
    ``head_dim`` and ``mlp_hidden_dim`` override dim // num_heads and int(dim * mlp_ratio)
    (pruned models: keras_vit.compress).
    """

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, drop=0.0, attn_drop=0.0,
                 drop_path=0.0, init_values=None, norm_first=True, norm_eps=1e-6, act="gelu",
                 attention="dense", attention_args=None, ranks=None, head_dim=None,
                 mlp_hidden_dim=None, **kwargs):
        ranks = dict(ranks or {})  # factorised linear layers by name: qkv, proj, fc1, fc2
        attn_ranks = {k: ranks[k] for k in ("qkv", "proj") if k in ranks}
        extra = dict(attention_args or {}, **({"ranks": attn_ranks} if attn_ranks else {}),
                     **({"head_dim": head_dim} if head_dim else {}))  # pruned heads
        super().__init__(
            attention_mixer(attention, dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                            proj_drop=drop, name="attn", **extra),
            Mlp(mlp_hidden_dim or int(dim * mlp_ratio), act=act, drop=drop, name="mlp",
                ranks={k: ranks[k] for k in ("fc1", "fc2") if k in ranks}),
            norm_eps=norm_eps, norm_first=norm_first, init_values=init_values,
            drop_path=drop_path, **kwargs)
        self.dim, self.num_heads, self.mlp_ratio = int(dim), int(num_heads), float(mlp_ratio)
        self.qkv_bias, self.drop, self.attn_drop = bool(qkv_bias), float(drop), float(attn_drop)
        self.act = act
        self.attention, self.attention_args = attention, dict(attention_args or {})
        self.ranks, self.head_dim = ranks, head_dim
        self.mlp_hidden_dim = int(mlp_hidden_dim) if mlp_hidden_dim else None  # pruned

    def get_config(self):
        config = self.block_config()
        for key in ("norm_names", "scale_names"):
            config.pop(key)
        return {**config, "dim": self.dim, "num_heads": self.num_heads,
                "mlp_ratio": self.mlp_ratio, "qkv_bias": self.qkv_bias, "drop": self.drop,
                "attn_drop": self.attn_drop, "act": self.act, "attention": self.attention,
                "attention_args": self.attention_args,
                **({"ranks": self.ranks} if self.ranks else {}),
                **({"head_dim": self.head_dim} if self.head_dim else {}),
                **({"mlp_hidden_dim": self.mlp_hidden_dim} if self.mlp_hidden_dim else {})}


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
