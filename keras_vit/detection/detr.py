"""DETR (Carion et al. 2020, "End-to-End Object Detection with Transformers").

As facebookresearch/detr builds it: a ResNet with frozen BatchNorm (models/resnet.py,
torchvision layout; layer4 dilated for DC5) gives C5; a 1x1 conv ``input_proj`` maps it
to d; a 2-D sine position encoding (``PositionEmbeddingSine``: normalize=True, scale 2*pi,
temperature 10000, from the cumulative sums of the pixel mask downsampled to C5 by nearest
interpolation) is added to queries and keys of every attention that reads the map.
Six post-norm encoder layers (self-attention, ReLU FFN 2048, dropout 0.1), six post-norm
decoder layers on 100 learned queries (``query_embed``, added to the queries and keys of
the self-attention and to the queries of the cross-attention; the decoder input is zeros),
the decoder's final LayerNorm on every layer's output, a shared class head (num_classes +
1, no-object last) and a 3-layer box MLP with a sigmoid (cx, cy, w, h).

Layer names are the official module paths (``backbone.0.body`` a nested model holding the
ResNet's ``conv1`` ... ``layer4``; ``input_proj``; ``transformer.encoder.layers.i``;
``transformer.decoder.layers.i``; ``transformer.decoder.norm``; ``query_embed``;
``class_embed``; ``bbox_embed.layers.0`` ...). keras_vit/convert/detr.py splits the
attentions' ``in_proj_weight`` into q/k/v and renames transformers' ``DetrForObjectDetection``
keys to these.

``backbone`` takes any keras-vit classification name instead of a ResNet: its
``features_only`` model's last map (``backbone_args`` go to its builder), which no
reference offers; the pixel mask is then sliced to that map's stride.

Default size (800, 1344): DETR's 800x1333 resized images padded to the ResNet stride 32
(16 with DC5); any multiple of the backbone's stride builds.
"""

import keras
import numpy as np
from keras import ops

from keras_vit.layers import Mlp, ResidualBlock, dense, layer_norm
from keras_vit.layers.attention import masked_logits, merge_heads, softmax_float32, split_heads
from keras_vit.models.common import check_img_size, check_in_chans
from keras_vit.models.resnet import resnet
from keras_vit.detection.yolos import PredictionMLP
from keras_vit.registry import IMAGENET_MEAN, IMAGENET_STD, register_variant

_NORM_EPS = 1e-5  # torch's LayerNorm default, as DETR's transformer


@keras.saving.register_keras_serializable(package="keras_vit")
class PositionalAttention(keras.layers.Layer):
    """torch's ``nn.MultiheadAttention`` as DETR calls it: q = x + query_pos,
    k = context + key_pos, v = context (self-attention: context = x, key_pos = query_pos).

    Separate ``q_proj`` / ``k_proj`` / ``v_proj`` (their inputs differ, so no fused qkv;
    the official ``in_proj_weight`` is split by the converter) and ``out_proj``;
    ``attention_mask``: boolean, True = attend, broadcastable to (B, heads, Q, K) (DETR's
    key padding mask). Dropout on the attention weights (``attn_drop``) and the output
    (``proj_drop``: the layer's residual dropout).
    """

    def __init__(self, dim, num_heads=8, attn_drop=0.0, proj_drop=0.0, **kwargs):
        super().__init__(**kwargs)
        self.dim, self.num_heads = int(dim), int(num_heads)
        if self.dim % self.num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.attn_drop, self.proj_drop = float(attn_drop), float(proj_drop)
        self.scale = (self.dim // self.num_heads) ** -0.5
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
            dense(self.dim, name=n) for n in ("q_proj", "k_proj", "v_proj", "out_proj"))
        self.attn_dropout = keras.layers.Dropout(self.attn_drop)
        self.proj_dropout = keras.layers.Dropout(self.proj_drop)

    def build(self, x_shape, context_shape=None):
        context_shape = context_shape or x_shape
        self.q_proj.build(x_shape)
        self.k_proj.build(context_shape)
        self.v_proj.build(context_shape)
        self.out_proj.build(tuple(x_shape[:-1]) + (self.dim,))

    def call(self, x, context=None, query_pos=None, key_pos=None, attention_mask=None,
             training=None):
        if context is None:
            context, key_pos = x, query_pos
        q_in = x if query_pos is None else x + query_pos
        k_in = context if key_pos is None else context + key_pos
        q = split_heads(self.q_proj(q_in), self.num_heads)
        k = split_heads(self.k_proj(k_in), self.num_heads)
        v = split_heads(self.v_proj(context), self.num_heads)
        logits = ops.matmul(q * ops.cast(self.scale, q.dtype), ops.transpose(k, (0, 1, 3, 2)))
        if attention_mask is not None:
            logits = masked_logits(logits, attention_mask)
        attn = self.attn_dropout(softmax_float32(logits), training=training)
        out = self.out_proj(merge_heads(ops.matmul(attn, v)))
        return self.proj_dropout(out, training=training)

    def compute_output_shape(self, x_shape, *args, **kwargs):
        return tuple(x_shape[:-1]) + (self.dim,)

    def get_config(self):
        return {**super().get_config(), "dim": self.dim, "num_heads": self.num_heads,
                "attn_drop": self.attn_drop, "proj_drop": self.proj_drop}


@keras.saving.register_keras_serializable(package="keras_vit")
class DetrEncoderLayer(ResidualBlock):
    """``TransformerEncoderLayer`` (post-norm): norm1(x + attn(x + pos, x + pos, x)),
    norm2(x + FFN(x)); ``call(x, query_pos=pos, attention_mask=mask)``. The FFN's Linears
    are the official ``linear1`` / ``linear2`` (keras_vit/convert/detr.py)."""

    def __init__(self, dim, num_heads, ffn_dim, dropout=0.1, **kwargs):
        for key in ("mixer", "mlp", "norm_first", "norm_eps"):
            kwargs.pop(key, None)
        super().__init__(
            PositionalAttention(dim, num_heads, attn_drop=dropout, proj_drop=dropout,
                                name="self_attn"),
            Mlp(ffn_dim, act="relu", drop=dropout, name="mlp"),
            norm_eps=_NORM_EPS, norm_first=False, **kwargs)
        self.dim, self.num_heads = int(dim), int(num_heads)
        self.ffn_dim, self.dropout = int(ffn_dim), float(dropout)

    def get_config(self):
        return {**self.block_config(), "dim": self.dim, "num_heads": self.num_heads,
                "ffn_dim": self.ffn_dim, "dropout": self.dropout}


@keras.saving.register_keras_serializable(package="keras_vit")
class DetrDecoderLayer(keras.layers.Layer):
    """``TransformerDecoderLayer`` (post-norm): self-attention of the queries (query_pos on
    q and k), cross-attention (query_pos on q, the map's pos on k), ReLU FFN; each
    residual followed by its LayerNorm (``norm1`` .. ``norm3``)."""

    def __init__(self, dim, num_heads, ffn_dim, dropout=0.1, **kwargs):
        super().__init__(**kwargs)
        self.dim, self.num_heads = int(dim), int(num_heads)
        self.ffn_dim, self.dropout = int(ffn_dim), float(dropout)
        attn = dict(attn_drop=dropout, proj_drop=dropout)
        self.self_attn = PositionalAttention(dim, num_heads, name="self_attn", **attn)
        self.norm1 = layer_norm(_NORM_EPS, name="norm1")
        self.multihead_attn = PositionalAttention(dim, num_heads, name="multihead_attn", **attn)
        self.norm2 = layer_norm(_NORM_EPS, name="norm2")
        self.mlp = Mlp(ffn_dim, act="relu", drop=dropout, name="mlp")
        self.norm3 = layer_norm(_NORM_EPS, name="norm3")

    def build(self, tgt_shape, memory_shape=None):
        for norm in (self.norm1, self.norm2, self.norm3):
            norm.build(tgt_shape)
        self.self_attn.build(tgt_shape)
        self.multihead_attn.build(tgt_shape, memory_shape or tgt_shape)
        self.mlp.build(tgt_shape)

    def call(self, tgt, memory, query_pos, pos, memory_mask=None, training=None):
        tgt = self.norm1(tgt + self.self_attn(tgt, query_pos=query_pos, training=training))
        tgt = self.norm2(tgt + self.multihead_attn(tgt, memory, query_pos=query_pos,
                                                   key_pos=pos, attention_mask=memory_mask,
                                                   training=training))
        return self.norm3(tgt + self.mlp(tgt, training=training))

    def compute_output_shape(self, tgt_shape, *args, **kwargs):
        return tgt_shape

    def get_config(self):
        return {**super().get_config(), "dim": self.dim, "num_heads": self.num_heads,
                "ffn_dim": self.ffn_dim, "dropout": self.dropout}


def sine_divisors(num_pos_feats, temperature):
    """temperature ** (2 * (i // 2) / num_pos_feats): each sin/cos pair shares one."""
    i = np.arange(num_pos_feats)
    return (float(temperature) ** (2 * (i // 2) / num_pos_feats)).astype(np.float32)


@keras.saving.register_keras_serializable(package="keras_vit")
class SinePositionEmbedding(keras.layers.Layer):
    """DETR's ``PositionEmbeddingSine`` from a (B, h, w) mask (1 = real pixel) -> (B, h*w, 2F).

    y / x = cumulative sums of the mask down / across, normalised by the last row / column
    (+1e-6) and scaled by ``scale``; channels [y, x], each F wide with sin at even and cos
    at odd positions of pos / temperature ** (2 (i // 2) / F). The interleave is a constant
    even/odd select, so tensors stay 4-D (TFLite).
    """

    def __init__(self, num_pos_feats=128, temperature=10000, normalize=True,
                 scale=2 * np.pi, **kwargs):
        super().__init__(**kwargs)
        self.num_pos_feats, self.temperature = int(num_pos_feats), float(temperature)
        self.normalize, self.scale = bool(normalize), float(scale)

    def _encode(self, embed):
        f = self.num_pos_feats
        pos = embed[..., None] / ops.convert_to_tensor(sine_divisors(f, self.temperature))
        even = ops.convert_to_tensor((np.arange(f) % 2 == 0).astype(np.float32))
        return even * ops.sin(pos) + (1.0 - even) * ops.cos(pos)

    def call(self, mask):
        mask = ops.cast(mask, "float32")
        y = ops.cumsum(mask, axis=1)
        x = ops.cumsum(mask, axis=2)
        if self.normalize:
            y = y / (y[:, -1:, :] + 1e-6) * self.scale
            x = x / (x[:, :, -1:] + 1e-6) * self.scale
        pos = ops.concatenate([self._encode(y), self._encode(x)], axis=-1)
        h, w = mask.shape[1], mask.shape[2]
        return ops.reshape(pos, (-1, h * w, 2 * self.num_pos_feats))


    def get_config(self):
        return {**super().get_config(), "num_pos_feats": self.num_pos_feats,
                "temperature": self.temperature, "normalize": self.normalize,
                "scale": self.scale}


@keras.saving.register_keras_serializable(package="keras_vit")
class FeatureMask(keras.layers.Layer):
    """The (B, H, W) pixel mask at a (B, h, w, C) map's size, nearest as torch's
    ``F.interpolate`` (pixel i * H / h: a strided slice, h dividing H); all ones when no
    mask is given (the references' default)."""

    def call(self, feature, pixel_mask=None):
        if pixel_mask is None:
            return ops.ones_like(feature[..., 0])
        sh = pixel_mask.shape[1] // feature.shape[1]
        sw = pixel_mask.shape[2] // feature.shape[2]
        return ops.cast(pixel_mask[:, ::sh, ::sw], feature.dtype)



@keras.saving.register_keras_serializable(package="keras_vit")
class KeyPaddingMask(keras.layers.Layer):
    """(B, h, w) mask -> (B, 1, 1, h*w) boolean, True = attend (DETR's key padding mask)."""

    def call(self, mask):
        h, w = mask.shape[1], mask.shape[2]
        return ops.reshape(mask > 0.5, (-1, 1, 1, h * w))



@keras.saving.register_keras_serializable(package="keras_vit")
class QueryEmbedding(keras.layers.Layer):
    """The learned queries ``query_embed.weight`` (Q, d), broadcast to the batch of its input."""

    def __init__(self, num_queries, dim, **kwargs):
        super().__init__(**kwargs)
        self.num_queries, self.dim = int(num_queries), int(dim)

    def build(self, input_shape):
        self.weight = self.add_weight(name="weight", shape=(self.num_queries, self.dim),
                                      initializer=keras.initializers.RandomNormal(stddev=1.0))

    def call(self, x):
        return ops.zeros_like(x[:, :1, :1]) + ops.cast(self.weight, x.dtype)[None]


    def get_config(self):
        return {**super().get_config(), "num_queries": self.num_queries, "dim": self.dim}


@keras.saving.register_keras_serializable(package="keras_vit")
class ZerosLike(keras.layers.Layer):
    def call(self, x):
        return ops.zeros_like(x)



@keras.saving.register_keras_serializable(package="keras_vit")
class StackLayerOutputs(keras.layers.Layer):
    """Per-decoder-layer outputs (B, Q, C) each -> (B, L, Q, C)."""

    def call(self, outputs):
        return ops.stack(outputs, axis=1)



def _positive_int(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _backbone_model(backbone, backbone_args, depth, dilation, img_size, in_chans):
    """The backbone's features_only model of its last map, named as the official module."""
    if backbone == "resnet":
        return resnet(depth=depth, img_size=img_size, in_chans=in_chans, features_only=True,
                      out_indices=(3,), frozen_batch_norm=True,
                      replace_stride_with_dilation=(False, False, bool(dilation)),
                      name="backbone.0.body", **backbone_args)
    from keras_vit.registry import create_model

    body = create_model(backbone, img_size=img_size, in_chans=in_chans, features_only=True,
                        out_indices=(-1,), **backbone_args)
    # The same layers under the official module's name (a builder's name is its variant's).
    return keras.Model(body.inputs, body.outputs, name="backbone.0.body")


def detr(*, img_size=(800, 1344), in_chans=3, num_classes=91, num_queries=100,
         backbone="resnet", depth=50, dilation=False, backbone_args=None, hidden_dim=256,
         num_heads=8, enc_layers=6, dec_layers=6, ffn_dim=2048, dropout=0.1,
         train_backbone=True, aux_outputs=False, with_pixel_mask=False, name="detr"):
    """Builds DETR as a functional model (see the module docstring).

    backbone: "resnet" (torchvision ResNet-``depth`` with frozen BatchNorm, layer4 dilated
    when ``dilation``: DC5) or any registered keras-vit classification name, built
    ``features_only`` with ``backbone_args``. Outputs ``{"logits": (B, Q, num_classes + 1),
    "pred_boxes": (B, Q, 4)}`` and, with ``aux_outputs``, ``"aux_logits"`` /
    ``"aux_pred_boxes"`` (B, dec_layers - 1, Q, .) of the earlier decoder layers.
    train_backbone: as the official ``backbone.py``, a ResNet's ``conv1`` and ``layer1`` are
    never trained (not trainable) and layer2 .. layer4 are; False freezes the whole
    backbone (the official's lr_backbone=0). Other backbones stay as their builder makes them
    unless False.
    """
    for arg, value in (("num_classes", num_classes), ("num_queries", num_queries),
                       ("hidden_dim", hidden_dim), ("num_heads", num_heads),
                       ("enc_layers", enc_layers), ("dec_layers", dec_layers),
                       ("ffn_dim", ffn_dim)):
        _positive_int(arg, value)
    if hidden_dim % 2 or hidden_dim % num_heads:
        raise ValueError(f"hidden_dim {hidden_dim} must be even and divisible by num_heads "
                         f"{num_heads}")
    check_in_chans(in_chans)
    backbone_args = dict(backbone_args or {})
    if backbone == "resnet":
        h, w = check_img_size(img_size, 16 if dilation else 32, what="the backbone stride")
    elif dilation:
        raise ValueError("dilation (DC5) is for the ResNet backbone only")
    body = _backbone_model(backbone, backbone_args, depth, dilation, img_size, in_chans)
    for layer in body.layers:
        if not train_backbone or (backbone == "resnet" and not layer.name.startswith(
                ("layer2", "layer3", "layer4"))):
            layer.trainable = False
    h, w = body.input_shape[1:3]

    images = keras.Input((h, w, in_chans), name="images")
    pixel_mask = keras.Input((h, w), name="pixel_mask") if with_pixel_mask else None
    inputs = [images, pixel_mask] if with_pixel_mask else images
    feature = body(images)
    feature = feature[-1] if isinstance(feature, (list, tuple)) else feature
    fh, fw = feature.shape[1:3]

    mask = FeatureMask(name="feature_mask")(feature, pixel_mask)
    pos = SinePositionEmbedding(hidden_dim // 2, name="position_embedding")(mask)
    key_mask = KeyPaddingMask(name="key_padding_mask")(mask) if with_pixel_mask else None
    src = keras.layers.Conv2D(hidden_dim, 1, name="input_proj")(feature)
    memory = keras.layers.Reshape((fh * fw, hidden_dim), name="flatten")(src)
    for i in range(enc_layers):
        memory = DetrEncoderLayer(hidden_dim, num_heads, ffn_dim, dropout,
                                  name=f"transformer.encoder.layers.{i}")(
            memory, query_pos=pos, attention_mask=key_mask)

    query_pos = QueryEmbedding(num_queries, hidden_dim, name="query_embed")(memory)
    tgt = ZerosLike(name="decoder_input")(query_pos)  # the official decoder starts from zeros
    final_norm = layer_norm(_NORM_EPS, name="transformer.decoder.norm")
    class_embed = dense(num_classes + 1, name="class_embed")
    bbox_embed = PredictionMLP(hidden_dim, 4, 3, name="bbox_embed")
    sigmoid = keras.layers.Activation("sigmoid", name="box_sigmoid")
    logits, boxes = [], []
    for i in range(dec_layers):
        tgt = DetrDecoderLayer(hidden_dim, num_heads, ffn_dim, dropout,
                               name=f"transformer.decoder.layers.{i}")(
            tgt, memory, query_pos, pos, memory_mask=key_mask)
        if aux_outputs or i == dec_layers - 1:
            hs = final_norm(tgt)
            logits.append(class_embed(hs))
            boxes.append(sigmoid(bbox_embed(hs)))
    outputs = {"logits": logits[-1], "pred_boxes": boxes[-1]}
    if aux_outputs and dec_layers > 1:
        outputs["aux_logits"] = StackLayerOutputs(name="aux_logits")(logits[:-1])
        outputs["aux_pred_boxes"] = StackLayerOutputs(name="aux_pred_boxes")(boxes[:-1])
    return keras.Model(inputs, outputs, name=name)


def _detr(name, **defaults):
    cfg = dict(task="detection", input_size=(800, 1344), num_classes=91, mean=IMAGENET_MEAN,
               std=IMAGENET_STD)
    return register_variant(name, detr, __name__, cfg, num_classes=91, **defaults)


_detr("detr_resnet50", depth=50)
_detr("detr_resnet101", depth=101)
_detr("detr_resnet50_dc5", depth=50, dilation=True)
